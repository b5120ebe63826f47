//! A loopback HTTP/1.1 proxy in front of the emulator that makes chosen requests fail as
//! a stopped server does (the connection closes with no answer), so transient failures
//! of one kind of request can be produced end to end. It takes one request per
//! connection (asking the emulator to close after answering), which is how it sees each
//! request line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Default)]
struct Rules {
    /// (substring of the request line, how many more to fail)
    fail: Vec<(String, u32)>,
}

#[derive(Debug)]
pub struct FaultProxy {
    pub endpoint: String,
    rules: Arc<Mutex<Rules>>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`http://127.0.0.1:PORT`) on a free loopback port.
    pub async fn start(upstream: &str) -> Self {
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let endpoint = format!("http://{}", listener.local_addr().expect("proxy address"));
        let rules = Arc::new(Mutex::new(Rules::default()));
        let failed = Arc::new(AtomicU64::new(0));
        let (r, f) = (rules.clone(), failed.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (r, f, up) = (r.clone(), f.clone(), upstream.clone());
                tokio::spawn(async move {
                    let _ = serve(client, &up, &r, &f).await;
                });
            }
        });
        FaultProxy {
            endpoint,
            rules,
            failed,
            task,
        }
    }

    /// The next `n` requests whose request line (`GET /bucket/key HTTP/1.1`) contains
    /// `contains` get no answer.
    pub fn fail_next(&self, contains: &str, n: u32) {
        self.rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fail
            .push((contains.to_string(), n));
    }

    /// How many requests it has failed.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut client: TcpStream,
    upstream: &str,
    rules: &Mutex<Rules>,
    failed: &AtomicU64,
) -> std::io::Result<()> {
    // The request head.
    let mut buf = Vec::with_capacity(4096);
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 1 << 20 {
            return Ok(());
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let request_line = head.lines().next().unwrap_or_default().to_string();
    {
        let mut r = rules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rule) = r
            .fail
            .iter_mut()
            .find(|(s, n)| *n > 0 && request_line.contains(s.as_str()))
        {
            rule.1 -= 1;
            failed.fetch_add(1, Ordering::Relaxed);
            // As a stopped server: no answer, the connection just ends.
            return Ok(());
        }
    }
    // Forward with `Connection: close`, so the next request comes on a new connection.
    let mut out = String::new();
    for (i, line) in head.split("\r\n").enumerate() {
        if line.is_empty() {
            continue;
        }
        if i > 0 && line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut up = TcpStream::connect(upstream).await?;
    up.write_all(out.as_bytes()).await?;
    up.write_all(&buf[head_end..]).await?;
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = up.split();
    // Request body up, answer down; done when the emulator has answered and closed.
    let upload = async {
        let _ = tokio::io::copy(&mut cr, &mut uw).await;
    };
    let download = async {
        let _ = tokio::io::copy(&mut ur, &mut cw).await;
        let _ = cw.shutdown().await;
    };
    // The answer ends the exchange, whatever the client does with its side.
    tokio::select! {
        _ = download => {}
        _ = async { upload.await; std::future::pending::<()>().await } => {}
    }
    Ok(())
}
