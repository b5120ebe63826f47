//! vcsim (VMware's vSphere simulator, built by `scripts/setup` from `tests/vcsim`) and a
//! SOAP proxy in front of it that adds what vcsim lacks: `QueryChangedDiskAreas`
//! answers (recorded-response shapes after the vSphere API reference, paged), CBT change
//! ids in disk backings, an injected `NotAuthenticated` (session expiry), and a delay to
//! stop runs in the middle.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running vcsim, stopped on drop.
#[derive(Debug)]
pub struct Vcsim {
    child: Child,
    /// `http://127.0.0.1:PORT/sdk` (credentials: user / pass).
    pub url: String,
    /// vcsim's datastores (Go's temp dir): removed with it, not left in /tmp.
    _tmp: tempfile::TempDir,
}

impl Drop for Vcsim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vcsim {
    pub fn start() -> Self {
        let bin = crate::repo_root().join(".local/bin/vcsim");
        assert!(
            bin.exists(),
            "{} is missing: run scripts/setup",
            bin.display()
        );
        let tmp = tempfile::tempdir().expect("a temp dir for vcsim");
        let mut child = Command::new(&bin)
            .env("TMPDIR", tmp.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start vcsim");
        let stdout = child.stdout.take().expect("vcsim stdout");
        // The first line is the URL; it comes once the server listens.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("vcsim printed no URL within 30 s");
        let url = line.trim().replace("//user:pass@", "//");
        assert!(url.starts_with("http://"), "vcsim said {line:?}");
        Self {
            child,
            url,
            _tmp: tmp,
        }
    }
}

/// How the proxy answers `QueryChangedDiskAreas`.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// Areas for changeId `*` (every allocated area), as (start, length).
    pub allocated: Vec<(u64, u64)>,
    /// Areas for any other changeId (the changes since it).
    pub changed: Vec<(u64, u64)>,
    /// Answer a non-`*` changeId with a FileFault (CBT was reset).
    pub reject_change_ids: bool,
    /// Areas per page: the answer is paged by `startOffset`.
    pub page_bytes: u64,
    /// Answer the next call of this method with `NotAuthenticated` (and forget it).
    pub expire_session_at: Option<String>,
    /// Hold `QueryChangedDiskAreas` answers this long.
    pub delay: Duration,
    /// Disk sizes by device key: areas are clipped to the disk asked about.
    pub capacities: std::collections::HashMap<i32, u64>,
}

/// What went through the proxy.
#[derive(Debug, Default)]
pub struct Seen {
    pub methods: Vec<String>,
    /// changeIds asked of QueryChangedDiskAreas, in order.
    pub change_ids: Vec<String>,
    pub start_offsets: Vec<u64>,
}

/// A SOAP proxy in front of vcsim.
#[derive(Debug, Clone)]
pub struct SoapProxy {
    pub url: String,
    pub script: Arc<Mutex<Script>>,
    pub seen: Arc<Mutex<Seen>>,
}

fn between<'a>(s: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let i = s.find(open)? + open.len();
    let rest = &s[i..];
    Some(&rest[..rest.find(close)?])
}

fn envelope(inner: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>{inner}</soapenv:Body></soapenv:Envelope>"#
    )
}

fn fault(kind: &str, message: &str) -> (u16, String) {
    (
        500,
        envelope(&format!(
            r#"<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>{message}</faultstring><detail><{kind}Fault xmlns="urn:vim25" xsi:type="{kind}"></{kind}Fault></detail></soapenv:Fault>"#
        )),
    )
}

impl SoapProxy {
    pub async fn start(upstream: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let url = format!(
            "http://{}/sdk",
            listener.local_addr().expect("proxy address")
        );
        let proxy = Self {
            url,
            script: Arc::default(),
            seen: Arc::default(),
        };
        let (p, upstream) = (proxy.clone(), upstream.to_string());
        let http = reqwest::Client::new();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (p, upstream, http) = (p.clone(), upstream.clone(), http.clone());
                tokio::spawn(async move {
                    let _ = p.serve(stream, &upstream, &http).await;
                });
            }
        });
        proxy
    }

    async fn serve(
        &self,
        mut s: tokio::net::TcpStream,
        upstream: &str,
        http: &reqwest::Client,
    ) -> std::io::Result<()> {
        // One request per connection (`Connection: close`).
        let mut buf = Vec::new();
        let header_end = loop {
            let mut chunk = [0u8; 8192];
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
        let mut cookie = None;
        let mut length = 0usize;
        for line in head.lines() {
            if let Some((k, v)) = line.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = v.trim().parse().unwrap_or(0),
                    "cookie" => cookie = Some(v.trim().to_string()),
                    _ => {}
                }
            }
        }
        while buf.len() < header_end + length {
            let mut chunk = vec![0u8; header_end + length - buf.len()];
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = String::from_utf8_lossy(&buf[header_end..]).to_string();
        let method = between(&body, "<soapenv:Body><", " ")
            .unwrap_or("")
            .to_string();
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .methods
            .push(method.clone());

        let expire = {
            let mut sc = self.script.lock().unwrap_or_else(|e| e.into_inner());
            if sc.expire_session_at.as_deref() == Some(method.as_str()) {
                sc.expire_session_at = None;
                true
            } else {
                false
            }
        };
        let (status, reply, set_cookie) = if expire {
            let (st, b) = fault("NotAuthenticated", "The session is not authenticated.");
            (st, b, None)
        } else if method == "QueryChangedDiskAreas" {
            let (st, b) = self.qcda(&body).await;
            (st, b, None)
        } else {
            let mut req = http
                .post(upstream)
                .header("Content-Type", "text/xml; charset=utf-8")
                .header("SOAPAction", "urn:vim25/6.7")
                .body(body.clone());
            if let Some(c) = &cookie {
                req = req.header("Cookie", c);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let st = resp.status().as_u16();
            let set_cookie = resp
                .headers()
                .get_all("set-cookie")
                .iter()
                .filter_map(|v| v.to_str().ok().map(str::to_string))
                .collect::<Vec<_>>();
            let mut text = resp
                .text()
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            // vcsim has no CBT: give each disk backing a changeId naming the object read
            // (the snapshot's id for snapshot disks), as vSphere's change ids move on
            // with every snapshot.
            if text.contains("VirtualDiskFlatVer2BackingInfo") && !text.contains("<changeId>") {
                let obj = between(&body, "<obj type=\"", "</obj>")
                    .and_then(|s| s.split('>').nth(1))
                    .unwrap_or("x")
                    .to_string();
                text = text.replace(
                    "</diskMode>",
                    &format!("</diskMode><changeId>52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 00/{obj}</changeId>"),
                );
            }
            (st, text, Some(set_cookie))
        };
        let mut out = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: text/xml; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
            if status == 200 { "OK" } else { "Internal Server Error" },
            reply.len()
        );
        for c in set_cookie.unwrap_or_default() {
            out.push_str(&format!("Set-Cookie: {c}\r\n"));
        }
        out.push_str("\r\n");
        s.write_all(out.as_bytes()).await?;
        s.write_all(reply.as_bytes()).await?;
        s.shutdown().await
    }

    /// A `QueryChangedDiskAreas` answer, shaped as vSphere's `DiskChangeInfo`.
    async fn qcda(&self, body: &str) -> (u16, String) {
        let change_id = between(body, "<changeId>", "</changeId>")
            .unwrap_or("")
            .to_string();
        let start: u64 = between(body, "<startOffset>", "</startOffset>")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let script = self
            .script
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.change_ids.push(change_id.clone());
            seen.start_offsets.push(start);
        }
        if !script.delay.is_zero() {
            tokio::time::sleep(script.delay).await;
        }
        if change_id != "*" && script.reject_change_ids {
            return fault(
                "FileFault",
                "Error caused by file /vmfs/volumes/ds/vm/disk1-ctk.vmdk",
            );
        }
        let key: i32 = between(body, "<deviceKey>", "</deviceKey>")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let cap = script.capacities.get(&key).copied().unwrap_or(u64::MAX);
        let areas: Vec<(u64, u64)> = if change_id == "*" {
            &script.allocated
        } else {
            &script.changed
        }
        .iter()
        .filter(|(s, _)| *s < cap)
        .map(|(s, l)| (*s, (*l).min(cap - s)))
        .collect();
        let areas = &areas;
        // Pages of `page_bytes` from `start`; a page covers up to the end of its last area.
        let end_all = areas.iter().map(|(s, l)| s + l).max().unwrap_or(start);
        let page = if script.page_bytes == 0 {
            u64::MAX
        } else {
            script.page_bytes
        };
        let page_end = start.saturating_add(page).min(end_all.max(start));
        let in_page: Vec<(u64, u64)> = areas
            .iter()
            .copied()
            .filter(|(s, _)| *s >= start && *s < page_end)
            .collect();
        let covered = in_page
            .iter()
            .map(|(s, l)| s + l)
            .max()
            .unwrap_or(page_end)
            .max(page_end);
        let inner: String = in_page
            .iter()
            .map(|(s, l)| {
                format!("<changedArea><start>{s}</start><length>{l}</length></changedArea>")
            })
            .collect();
        let length = covered - start;
        (
            200,
            envelope(&format!(
                r#"<QueryChangedDiskAreasResponse xmlns="urn:vim25"><returnval><startOffset>{start}</startOffset><length>{length}</length>{}</returnval></QueryChangedDiskAreasResponse>"#,
                inner
            )),
        )
    }
}
