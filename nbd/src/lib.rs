//! An async NBD client: fixed newstyle handshake with `NBD_OPT_GO`, structured replies,
//! `NBD_CMD_READ` and `NBD_CMD_BLOCK_STATUS` with meta contexts (`base:allocation`,
//! `qemu:dirty-bitmap:NAME`), and for writable exports `NBD_CMD_WRITE`, `NBD_CMD_FLUSH`,
//! `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_TRIM` (failback writes into the site's disks), over
//! TCP or a Unix socket, with many requests in flight on one connection.
//!
//! Everything the server sends is checked: magic numbers, handles, chunk types and
//! lengths, offsets against the request. A protocol error or a disconnect fails every
//! request in flight with the reason and closes the connection; every wait has a
//! deadline, so a silent server is an error, never a hang.

pub mod addr;
mod handshake;
pub mod proto;
mod reply;

use handshake::handshake;
use proto::*;
use reply::reply_loop;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;

pub use addr::{Address, NbdUri, UriError};

/// Block status requests are kept to this length (the protocol allows up to 4 GiB - 1).
pub const MAX_STATUS_REQUEST: u64 = 2 << 30;
/// Reads are kept to this length unless the server advertises a smaller maximum.
pub const MAX_READ_REQUEST: u32 = 32 << 20;
/// Structured reply chunks longer than this are refused (a read chunk of the largest
/// request plus its header, or a block status reply of 4M descriptors).
const MAX_CHUNK: u32 = (MAX_READ_REQUEST) + 64;
/// Option replies longer than this are refused.
const MAX_OPTION_REPLY: u32 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("cannot connect to {uri}: {source}")]
    Connect { uri: String, source: std::io::Error },
    #[error("{uri}: not an NBD server ({what})")]
    NotNbd { uri: String, what: String },
    #[error("{uri}: export {export:?} does not exist on the server")]
    NoSuchExport { uri: String, export: String },
    #[error("{uri}: {what}")]
    Unsupported { uri: String, what: String },
    #[error("{uri}: handshake failed: {what}")]
    Handshake { uri: String, what: String },
    #[error("{uri}: the server does not offer meta context {context:?}{hint}")]
    NoContext {
        uri: String,
        context: String,
        hint: String,
    },
    #[error("{uri}: {cmd} of {length} bytes at offset {offset} failed on the server: {errno} ({code}){message}")]
    Server {
        uri: String,
        cmd: &'static str,
        offset: u64,
        length: u32,
        code: u32,
        errno: &'static str,
        message: String,
    },
    #[error("{uri}: {what}; the connection is closed")]
    Protocol { uri: String, what: String },
    #[error("{uri}: {what}")]
    Closed { uri: String, what: String },
    #[error("{uri}: no answer {what} within {secs} s; the connection is closed")]
    Timeout {
        uri: String,
        what: String,
        secs: u64,
    },
    #[error("{uri}: request out of range: {what}")]
    Range { uri: String, what: String },
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Meta contexts to negotiate, e.g. `base:allocation`, `qemu:dirty-bitmap:b0`.
    pub meta_contexts: Vec<String>,
    /// Deadline for the handshake and for each request's reply.
    pub timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            meta_contexts: Vec::new(),
            timeout: Duration::from_secs(60),
        }
    }
}

/// What the handshake learned about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub transmission_flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
    pub structured_replies: bool,
    /// Negotiated meta contexts: name and the server's id for it.
    pub contexts: Vec<(String, u32)>,
}

impl ExportInfo {
    pub fn read_only(&self) -> bool {
        self.transmission_flags & TFLAG_READ_ONLY != 0
    }
    pub fn can_multi_conn(&self) -> bool {
        self.transmission_flags & TFLAG_CAN_MULTI_CONN != 0
    }
    pub fn can_flush(&self) -> bool {
        self.transmission_flags & TFLAG_SEND_FLUSH != 0
    }
    pub fn can_write_zeroes(&self) -> bool {
        self.transmission_flags & TFLAG_SEND_WRITE_ZEROES != 0
    }
    pub fn can_trim(&self) -> bool {
        self.transmission_flags & TFLAG_SEND_TRIM != 0
    }
}

/// One block status descriptor: `length` bytes from `offset` have `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub offset: u64,
    pub length: u64,
    pub flags: u32,
}

type Reader = BufReader<Box<dyn AsyncRead + Send + Unpin>>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// A connected client. Clones share the connection; requests from any clone run
/// concurrently.
#[derive(Debug, Clone)]
pub struct Client {
    shared: Arc<Shared>,
    info: Arc<ExportInfo>,
}

struct Shared {
    uri: String,
    timeout: Duration,
    writer: tokio::sync::Mutex<Writer>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_handle: AtomicU64,
    /// Why the connection is unusable, once it is.
    dead: Mutex<Option<String>>,
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Ids of every negotiated meta context: a block status reply has a chunk for each.
    context_ids: Vec<u32>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("uri", &self.uri).finish()
    }
}

struct Pending {
    cmd: u16,
    offset: u64,
    length: u32,
    state: State,
    error: Option<NbdError>,
    done: oneshot::Sender<Result<Done, NbdError>>,
}

enum State {
    Read {
        buf: Vec<u8>,
        covered: u64,
    },
    Status {
        context: u32,
        found: Vec<(u32, u32)>,
    },
    /// A command answered by success or an error only (write, flush, trim, zeroes).
    Ack,
}

enum Done {
    Read(Vec<u8>),
    Status(Vec<(u32, u32)>),
    Ack,
}

impl Client {
    /// Connects to `uri` and negotiates. Fails with a clear error when the server is not
    /// NBD, lacks the export, or does not offer a requested meta context.
    pub async fn connect(uri: &NbdUri, opts: &ConnectOptions) -> Result<Self, NbdError> {
        let name = uri.to_string();
        let connected = tokio::time::timeout(opts.timeout, async {
            Ok::<(Box<dyn AsyncRead + Send + Unpin>, Writer), std::io::Error>(match &uri.address {
                Address::Tcp { host, port } => {
                    let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                    s.set_nodelay(true)?;
                    let (r, w) = s.into_split();
                    (Box::new(r), Box::new(w))
                }
                Address::Unix { socket } => {
                    let s = tokio::net::UnixStream::connect(socket).await?;
                    let (r, w) = s.into_split();
                    (Box::new(r), Box::new(w))
                }
            })
        })
        .await;
        let (r, mut w) = match connected {
            Ok(Ok(rw)) => rw,
            Ok(Err(source)) => return Err(NbdError::Connect { uri: name, source }),
            Err(_) => {
                return Err(NbdError::Timeout {
                    uri: name,
                    what: "to the connection attempt".into(),
                    secs: opts.timeout.as_secs(),
                })
            }
        };
        let mut r = BufReader::with_capacity(256 << 10, r);
        let info = match tokio::time::timeout(
            opts.timeout,
            handshake(&mut r, &mut w, &name, &uri.export, &opts.meta_contexts),
        )
        .await
        {
            Ok(info) => info?,
            Err(_) => {
                return Err(NbdError::Timeout {
                    uri: name,
                    what: "during the handshake".into(),
                    secs: opts.timeout.as_secs(),
                })
            }
        };
        let shared = Arc::new(Shared {
            uri: name,
            timeout: opts.timeout,
            writer: tokio::sync::Mutex::new(w),
            pending: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            dead: Mutex::new(None),
            reader: Mutex::new(None),
            context_ids: info.contexts.iter().map(|(_, id)| *id).collect(),
        });
        let task = tokio::spawn(reply_loop(r, shared.clone()));
        *lock(&shared.reader) = Some(task);
        Ok(Self {
            shared,
            info: Arc::new(info),
        })
    }

    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    pub fn uri(&self) -> &str {
        &self.shared.uri
    }

    /// The largest read this client sends in one request.
    pub fn max_read(&self) -> u32 {
        self.info.max_block.clamp(512, MAX_READ_REQUEST)
    }

    /// Reads `length` bytes at `offset`; longer reads are split into requests the server
    /// accepts, sent together.
    pub async fn read(&self, offset: u64, length: usize) -> Result<Vec<u8>, NbdError> {
        self.check_range(offset, length as u64)?;
        let max = self.max_read() as usize;
        if length <= max {
            return self.read_one(offset, length as u32).await;
        }
        let pieces = (0..length).step_by(max).map(|start| {
            let n = max.min(length - start);
            self.read_one(offset + start as u64, n as u32)
        });
        let parts = futures::future::try_join_all(pieces).await?;
        Ok(parts.concat())
    }

    async fn read_one(&self, offset: u64, length: u32) -> Result<Vec<u8>, NbdError> {
        // Not zeroed: data chunks fill it in order (the usual case) without a memset.
        let state = State::Read {
            buf: Vec::with_capacity(length as usize),
            covered: 0,
        };
        match self
            .request(CMD_READ, 0, offset, length, state, &[])
            .await?
        {
            Done::Read(buf) => Ok(buf),
            _ => unreachable_reply(&self.shared.uri),
        }
    }

    /// The status of `[offset, offset+length)` in meta context `context` (which must
    /// have been negotiated), as contiguous descriptors covering exactly that range.
    pub async fn block_status(
        &self,
        context: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Status>, NbdError> {
        self.check_range(offset, length)?;
        let Some(&(_, id)) = self.info.contexts.iter().find(|(n, _)| n == context) else {
            return Err(NbdError::NoContext {
                uri: self.shared.uri.clone(),
                context: context.into(),
                hint: " (it was not negotiated at connect)".into(),
            });
        };
        let end = offset + length;
        let mut pos = offset;
        let mut out: Vec<Status> = Vec::new();
        while pos < end {
            let len = (end - pos).min(MAX_STATUS_REQUEST) as u32;
            let state = State::Status {
                context: id,
                found: Vec::new(),
            };
            let Done::Status(found) = self
                .request(CMD_BLOCK_STATUS, 0, pos, len, state, &[])
                .await?
            else {
                return unreachable_reply(&self.shared.uri);
            };
            let before = pos;
            for (l, flags) in found {
                if pos >= end {
                    break; // the last extent may run past the request: clip it
                }
                let l = u64::from(l).min(end - pos);
                match out.last_mut() {
                    Some(last) if last.flags == flags && last.offset + last.length == pos => {
                        last.length += l
                    }
                    _ => out.push(Status {
                        offset: pos,
                        length: l,
                        flags,
                    }),
                }
                pos += l;
            }
            if pos == before {
                return Err(self.protocol(format!(
                    "block status at offset {before} described no bytes"
                )));
            }
        }
        Ok(out)
    }

    /// Writes `data` at `offset`; longer writes are split into requests the server
    /// accepts, sent together. Durable only after [`Client::flush`].
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        self.check_range(offset, data.len() as u64)?;
        self.check_writable("write")?;
        let max = self.max_read() as usize;
        let pieces = data.chunks(max).enumerate().map(|(i, piece)| {
            let at = offset + (i * max) as u64;
            self.request(CMD_WRITE, 0, at, piece.len() as u32, State::Ack, piece)
        });
        futures::future::try_join_all(pieces).await?;
        Ok(())
    }

    /// Makes every completed write durable (`NBD_CMD_FLUSH`); a no-op on a server that
    /// does not offer it (it writes through).
    pub async fn flush(&self) -> Result<(), NbdError> {
        self.check_writable("flush")?;
        if !self.info.can_flush() {
            return Ok(());
        }
        self.request(CMD_FLUSH, 0, 0, 0, State::Ack, &[]).await?;
        Ok(())
    }

    /// Makes `[offset, offset+length)` read as zeroes: `NBD_CMD_WRITE_ZEROES` (which may
    /// punch holes) where the server offers it, else written zero buffers.
    pub async fn write_zeroes(&self, offset: u64, length: u64) -> Result<(), NbdError> {
        self.check_range(offset, length)?;
        self.check_writable("write zeroes")?;
        let end = offset + length;
        if !self.info.can_write_zeroes() {
            let step = u64::from(self.max_read());
            let zeroes = vec![0u8; step.min(length) as usize];
            let mut pos = offset;
            while pos < end {
                let n = step.min(end - pos) as usize;
                self.write(pos, &zeroes[..n]).await?;
                pos += n as u64;
            }
            return Ok(());
        }
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(MAX_STATUS_REQUEST) as u32;
            self.request(CMD_WRITE_ZEROES, 0, pos, n, State::Ack, &[])
                .await?;
            pos += u64::from(n);
        }
        Ok(())
    }

    /// Tells the server `[offset, offset+length)` is no longer needed (`NBD_CMD_TRIM`):
    /// it may read back as anything, so failback never uses it for data that must be
    /// zero. A no-op where the server does not offer it.
    pub async fn trim(&self, offset: u64, length: u64) -> Result<(), NbdError> {
        self.check_range(offset, length)?;
        self.check_writable("trim")?;
        if !self.info.can_trim() {
            return Ok(());
        }
        let end = offset + length;
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(MAX_STATUS_REQUEST) as u32;
            self.request(CMD_TRIM, 0, pos, n, State::Ack, &[]).await?;
            pos += u64::from(n);
        }
        Ok(())
    }

    fn check_writable(&self, what: &str) -> Result<(), NbdError> {
        if self.info.read_only() {
            return Err(NbdError::Unsupported {
                uri: self.shared.uri.clone(),
                what: format!("cannot {what}: the export is read-only (qemu-nbd without -r, nbdkit without -r)"),
            });
        }
        Ok(())
    }

    /// Ends the session politely (`NBD_CMD_DISC`).
    pub async fn disconnect(self) {
        let handle = self.shared.next_handle.fetch_add(1, Ordering::Relaxed);
        let mut w = self.shared.writer.lock().await;
        let _ = w
            .write_all(&request_header(CMD_DISC, 0, handle, 0, 0))
            .await;
        let _ = w.flush().await;
        let _ = w.shutdown().await;
        drop(w);
        self.shared.kill("the client disconnected".into());
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<(), NbdError> {
        match offset.checked_add(length) {
            Some(end) if end <= self.info.size && length > 0 => Ok(()),
            _ => Err(NbdError::Range {
                uri: self.shared.uri.clone(),
                what: format!(
                    "{length} bytes at offset {offset} in an export of {} bytes",
                    self.info.size
                ),
            }),
        }
    }

    fn protocol(&self, what: String) -> NbdError {
        self.shared.kill(what.clone());
        NbdError::Protocol {
            uri: self.shared.uri.clone(),
            what,
        }
    }

    async fn request(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        length: u32,
        state: State,
        payload: &[u8],
    ) -> Result<Done, NbdError> {
        let s = &self.shared;
        let handle = s.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&s.pending).insert(
            handle,
            Pending {
                cmd,
                offset,
                length,
                state,
                error: None,
                done: tx,
            },
        );
        // Checked after the insert: a reader that dies now still fails this request.
        if let Some(why) = lock(&s.dead).clone() {
            lock(&s.pending).remove(&handle);
            return Err(NbdError::Closed {
                uri: s.uri.clone(),
                what: why,
            });
        }
        let what = format!(
            "to {} of {length} bytes at offset {offset}",
            command_name(cmd)
        );
        let header = request_header(cmd, flags, handle, offset, length);
        let sent = tokio::time::timeout(s.timeout, async {
            let mut w = s.writer.lock().await;
            w.write_all(&header).await?;
            if !payload.is_empty() {
                w.write_all(payload).await?;
            }
            w.flush().await
        })
        .await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let why = format!("sending {} failed: {e}", command_name(cmd));
                s.kill(why.clone());
                return Err(NbdError::Closed {
                    uri: s.uri.clone(),
                    what: why,
                });
            }
            Err(_) => {
                s.kill(format!("the server stopped accepting requests ({what})"));
                return Err(NbdError::Timeout {
                    uri: s.uri.clone(),
                    what,
                    secs: s.timeout.as_secs(),
                });
            }
        }
        match tokio::time::timeout(s.timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(NbdError::Closed {
                uri: s.uri.clone(),
                what: lock(&s.dead)
                    .clone()
                    .unwrap_or_else(|| "the connection closed".into()),
            }),
            Err(_) => {
                s.kill(format!("no reply {what} within {} s", s.timeout.as_secs()));
                Err(NbdError::Timeout {
                    uri: s.uri.clone(),
                    what,
                    secs: s.timeout.as_secs(),
                })
            }
        }
    }
}

impl Shared {
    /// Marks the connection dead (first reason wins), stops the reply reader and fails
    /// every request in flight.
    fn kill(&self, why: String) {
        {
            let mut dead = lock(&self.dead);
            if dead.is_none() {
                *dead = Some(why.clone());
            }
        }
        if let Some(task) = lock(&self.reader).take() {
            task.abort();
        }
        let why = lock(&self.dead).clone().unwrap_or(why);
        for (_, p) in lock(&self.pending).drain() {
            let _ = p.done.send(Err(NbdError::Closed {
                uri: self.uri.clone(),
                what: why.clone(),
            }));
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // The last handle gone: stop the reader task (it holds the socket's read half).
        if Arc::strong_count(&self.shared) == 2 {
            if let Some(task) = lock(&self.shared.reader).take() {
                task.abort();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unreachable_reply<T>(uri: &str) -> Result<T, NbdError> {
    Err(NbdError::Protocol {
        uri: uri.into(),
        what: "internal: reply of the wrong kind".into(),
    })
}

fn request_header(cmd: u16, flags: u16, handle: u64, offset: u64, length: u32) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    h[8..16].copy_from_slice(&handle.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&length.to_be_bytes());
    h
}
