//! An async NBD client: fixed newstyle handshake with `NBD_OPT_GO`, structured replies,
//! `NBD_CMD_READ` and `NBD_CMD_BLOCK_STATUS` with meta contexts (`base:allocation`,
//! `qemu:dirty-bitmap:NAME`), over TCP or a Unix socket, with many requests in flight on
//! one connection.
//!
//! Everything the server sends is checked: magic numbers, handles, chunk types and
//! lengths, offsets against the request. A protocol error or a disconnect fails every
//! request in flight with the reason and closes the connection; every wait has a
//! deadline, so a silent server is an error, never a hang.

pub mod addr;
pub mod proto;

use proto::*;
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
}

enum Done {
    Read(Vec<u8>),
    Status(Vec<(u32, u32)>),
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
        match self.request(CMD_READ, 0, offset, length, state).await? {
            Done::Read(buf) => Ok(buf),
            Done::Status(_) => unreachable_reply(&self.shared.uri),
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
            let Done::Status(found) = self.request(CMD_BLOCK_STATUS, 0, pos, len, state).await?
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

// ---- handshake ----------------------------------------------------------------------------

async fn handshake(
    r: &mut Reader,
    w: &mut Writer,
    uri: &str,
    export: &str,
    contexts: &[String],
) -> Result<ExportInfo, NbdError> {
    let io = |e: std::io::Error| NbdError::Handshake {
        uri: uri.into(),
        what: if e.kind() == std::io::ErrorKind::UnexpectedEof {
            "the server closed the connection".into()
        } else {
            e.to_string()
        },
    };
    let magic = r.read_u64().await.map_err(io)?;
    if magic != NBDMAGIC {
        return Err(NbdError::NotNbd {
            uri: uri.into(),
            what: format!("greeting starts with {magic:#018x}, not NBDMAGIC"),
        });
    }
    let style = r.read_u64().await.map_err(io)?;
    if style == OLDSTYLE_MAGIC {
        return Err(NbdError::Unsupported {
            uri: uri.into(),
            what: "oldstyle negotiation is not supported; use a newstyle server".into(),
        });
    }
    if style != IHAVEOPT {
        return Err(NbdError::NotNbd {
            uri: uri.into(),
            what: format!("unknown negotiation magic {style:#018x}"),
        });
    }
    let flags = r.read_u16().await.map_err(io)?;
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Unsupported {
            uri: uri.into(),
            what: "the server does not do fixed newstyle negotiation".into(),
        });
    }
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if flags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    w.write_all(&cflags.to_be_bytes()).await.map_err(io)?;

    // Structured replies: needed for block status.
    send_option(w, OPT_STRUCTURED_REPLY, &[])
        .await
        .map_err(io)?;
    let (t, data) = option_reply(r, uri, OPT_STRUCTURED_REPLY).await?;
    let structured = match t {
        REP_ACK => true,
        REP_ERR_UNSUP | REP_ERR_POLICY => false,
        _ => return Err(option_error(uri, "NBD_OPT_STRUCTURED_REPLY", t, &data)),
    };

    let mut negotiated = Vec::new();
    if !contexts.is_empty() {
        if !structured {
            return Err(NbdError::Unsupported {
                uri: uri.into(),
                what: "the server has no structured replies, so no block status".into(),
            });
        }
        let mut data = Vec::new();
        put_str32(&mut data, export);
        data.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
        for c in contexts {
            put_str32(&mut data, c);
        }
        send_option(w, OPT_SET_META_CONTEXT, &data)
            .await
            .map_err(io)?;
        loop {
            let (t, data) = option_reply(r, uri, OPT_SET_META_CONTEXT).await?;
            match t {
                REP_META_CONTEXT => {
                    if data.len() < 4 {
                        return Err(handshake_err(uri, "meta context reply shorter than its id"));
                    }
                    let id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                    let name = String::from_utf8_lossy(&data[4..]).into_owned();
                    negotiated.push((name, id));
                }
                REP_ACK => break,
                REP_ERR_UNKNOWN => {
                    return Err(NbdError::NoSuchExport {
                        uri: uri.into(),
                        export: export.into(),
                    })
                }
                _ => return Err(option_error(uri, "NBD_OPT_SET_META_CONTEXT", t, &data)),
            }
        }
        for c in contexts {
            if !negotiated.iter().any(|(n, _)| n == c) {
                let hint = match c.strip_prefix("qemu:dirty-bitmap:") {
                    Some(b) => format!(
                        ": the image has no bitmap {b:?} or it is not exported (qemu-nbd -B {b})"
                    ),
                    None => String::new(),
                };
                return Err(NbdError::NoContext {
                    uri: uri.into(),
                    context: c.clone(),
                    hint,
                });
            }
        }
    }

    let mut data = Vec::new();
    put_str32(&mut data, export);
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(w, OPT_GO, &data).await.map_err(io)?;
    let mut size_flags = None;
    let (mut min_block, mut preferred_block, mut max_block) = (1, 4096, MAX_READ_REQUEST);
    loop {
        let (t, data) = option_reply(r, uri, OPT_GO).await?;
        match t {
            REP_INFO => {
                if data.len() < 2 {
                    return Err(handshake_err(uri, "NBD_REP_INFO without a type"));
                }
                let kind = u16::from_be_bytes([data[0], data[1]]);
                let body = &data[2..];
                match kind {
                    INFO_EXPORT if body.len() == 10 => {
                        let size = u64::from_be_bytes(body[0..8].try_into().unwrap_or_default());
                        let flags = u16::from_be_bytes([body[8], body[9]]);
                        size_flags = Some((size, flags));
                    }
                    INFO_BLOCK_SIZE if body.len() == 12 => {
                        let g = |i: usize| {
                            u32::from_be_bytes(body[i..i + 4].try_into().unwrap_or_default())
                        };
                        (min_block, preferred_block, max_block) = (g(0), g(4), g(8));
                    }
                    INFO_EXPORT | INFO_BLOCK_SIZE => {
                        return Err(handshake_err(uri, "NBD_REP_INFO of the wrong length"))
                    }
                    _ => {} // other information we did not ask for: ignore
                }
            }
            REP_ACK => break,
            REP_ERR_UNKNOWN => {
                return Err(NbdError::NoSuchExport {
                    uri: uri.into(),
                    export: export.into(),
                })
            }
            REP_ERR_TLS_REQD => {
                return Err(NbdError::Unsupported {
                    uri: uri.into(),
                    what: "the server requires TLS, which this client does not do".into(),
                })
            }
            _ => return Err(option_error(uri, "NBD_OPT_GO", t, &data)),
        }
    }
    let Some((size, transmission_flags)) = size_flags else {
        return Err(handshake_err(
            uri,
            "NBD_OPT_GO ended without the export's size",
        ));
    };
    if transmission_flags & TFLAG_HAS_FLAGS == 0 {
        return Err(handshake_err(
            uri,
            "transmission flags lack NBD_FLAG_HAS_FLAGS",
        ));
    }
    if min_block == 0 || !min_block.is_power_of_two() || max_block < min_block {
        return Err(handshake_err(
            uri,
            &format!("nonsensical block sizes: min {min_block}, max {max_block}"),
        ));
    }
    Ok(ExportInfo {
        size,
        transmission_flags,
        min_block,
        preferred_block,
        max_block,
        structured_replies: structured,
        contexts: negotiated,
    })
}

fn handshake_err(uri: &str, what: &str) -> NbdError {
    NbdError::Handshake {
        uri: uri.into(),
        what: what.into(),
    }
}

fn option_error(uri: &str, option: &str, t: u32, data: &[u8]) -> NbdError {
    let message = String::from_utf8_lossy(data);
    let what = if t & REP_FLAG_ERROR != 0 {
        format!(
            "{option} refused: {}{}",
            rep_error_name(t),
            if message.is_empty() {
                String::new()
            } else {
                format!(": {message}")
            }
        )
    } else {
        format!("{option}: unexpected reply type {t}")
    };
    NbdError::Handshake {
        uri: uri.into(),
        what,
    }
}

fn put_str32(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

async fn send_option(w: &mut Writer, option: u32, data: &[u8]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(16 + data.len());
    buf.extend_from_slice(&IHAVEOPT.to_be_bytes());
    buf.extend_from_slice(&option.to_be_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
    w.write_all(&buf).await?;
    w.flush().await
}

async fn option_reply(r: &mut Reader, uri: &str, option: u32) -> Result<(u32, Vec<u8>), NbdError> {
    let io = |e: std::io::Error| {
        handshake_err(
            uri,
            &if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "the server closed the connection".to_string()
            } else {
                e.to_string()
            },
        )
    };
    let magic = r.read_u64().await.map_err(io)?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(handshake_err(
            uri,
            &format!("option reply with bad magic {magic:#x}"),
        ));
    }
    let opt = r.read_u32().await.map_err(io)?;
    if opt != option {
        return Err(handshake_err(
            uri,
            &format!("reply for option {opt} while waiting for option {option}"),
        ));
    }
    let t = r.read_u32().await.map_err(io)?;
    let len = r.read_u32().await.map_err(io)?;
    if len > MAX_OPTION_REPLY {
        return Err(handshake_err(
            uri,
            &format!("option reply of {len} bytes (at most {MAX_OPTION_REPLY})"),
        ));
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data).await.map_err(io)?;
    Ok((t, data))
}

// ---- transmission: the reply reader -----------------------------------------------------

/// Reads replies until the connection ends or breaks; hands each to its request.
async fn reply_loop(mut r: Reader, shared: Arc<Shared>) {
    let why = match read_replies(&mut r, &shared).await {
        Ok(()) => "the server closed the connection".to_string(),
        Err(why) => why,
    };
    // Not `kill` (it would abort this very task): mark dead and fail the rest.
    {
        let mut dead = lock(&shared.dead);
        if dead.is_none() {
            *dead = Some(why);
        }
    }
    let why = lock(&shared.dead).clone().unwrap_or_default();
    for (_, p) in lock(&shared.pending).drain() {
        let _ = p.done.send(Err(NbdError::Closed {
            uri: shared.uri.clone(),
            what: why.clone(),
        }));
    }
}

/// Appends bytes from `r` to `buf` until it is `len` long, without zeroing first.
async fn fill_to(r: &mut Reader, buf: &mut Vec<u8>, len: usize) -> std::io::Result<()> {
    buf.reserve(len.saturating_sub(buf.len()));
    while buf.len() < len {
        let want = len - buf.len();
        let n = (&mut *r).take(want as u64).read_buf(buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

fn io_why(e: std::io::Error, during: &str) -> String {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        format!("the server closed the connection {during}")
    } else {
        format!("reading {during} failed: {e}")
    }
}

/// `Ok(())` on a clean end between replies; `Err(why)` on a protocol or I/O error.
async fn read_replies(r: &mut Reader, shared: &Shared) -> Result<(), String> {
    loop {
        let mut magic = [0u8; 4];
        match r.read(&mut magic[..1]).await {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(io_why(e, "between replies")),
        }
        r.read_exact(&mut magic[1..])
            .await
            .map_err(|e| io_why(e, "in a reply header"))?;
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => simple_reply(r, shared).await?,
            STRUCTURED_REPLY_MAGIC => structured_chunk(r, shared).await?,
            other => {
                return Err(format!(
                    "reply with bad magic {other:#010x} (out of step, or not NBD)"
                ))
            }
        }
    }
}

fn take(shared: &Shared, handle: u64) -> Result<Pending, String> {
    lock(&shared.pending)
        .remove(&handle)
        .ok_or_else(|| format!("reply for handle {handle}, which no request in flight has"))
}

fn server_error(shared: &Shared, p: &Pending, code: u32, message: String) -> NbdError {
    NbdError::Server {
        uri: shared.uri.clone(),
        cmd: command_name(p.cmd),
        offset: p.offset,
        length: p.length,
        code,
        errno: errno_name(code),
        message: if message.is_empty() {
            String::new()
        } else {
            format!(": {message}")
        },
    }
}

async fn simple_reply(r: &mut Reader, shared: &Shared) -> Result<(), String> {
    let code = r.read_u32().await.map_err(|e| io_why(e, "in a reply"))?;
    let handle = r.read_u64().await.map_err(|e| io_why(e, "in a reply"))?;
    let mut p = take(shared, handle)?;
    if code != 0 {
        let e = server_error(shared, &p, code, String::new());
        let _ = p.done.send(Err(e));
        return Ok(());
    }
    let done = match &mut p.state {
        State::Read { buf, .. } => {
            fill_to(r, buf, p.length as usize)
                .await
                .map_err(|e| io_why(e, "in the middle of read data"))?;
            Done::Read(std::mem::take(buf))
        }
        State::Status { .. } => {
            return Err("simple reply to BLOCK_STATUS (it needs structured replies)".into())
        }
    };
    let _ = p.done.send(Ok(done));
    Ok(())
}

async fn structured_chunk(r: &mut Reader, shared: &Shared) -> Result<(), String> {
    let during = "in a structured reply";
    let flags = r.read_u16().await.map_err(|e| io_why(e, during))?;
    let kind = r.read_u16().await.map_err(|e| io_why(e, during))?;
    let handle = r.read_u64().await.map_err(|e| io_why(e, during))?;
    let length = r.read_u32().await.map_err(|e| io_why(e, during))?;
    if length > MAX_CHUNK {
        return Err(format!(
            "reply chunk of {length} bytes for handle {handle} (at most {MAX_CHUNK})"
        ));
    }
    let mut p = take(shared, handle)?;
    let (req_start, req_end) = (p.offset, p.offset + u64::from(p.length));
    match kind {
        REPLY_TYPE_NONE => {
            if length != 0 || flags & REPLY_FLAG_DONE == 0 {
                return Err("NBD_REPLY_TYPE_NONE with a payload or without DONE".into());
            }
        }
        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
            let State::Read { buf, covered } = &mut p.state else {
                return Err(format!(
                    "read data in reply to {} (handle {handle})",
                    command_name(p.cmd)
                ));
            };
            if length < 8 || (kind == REPLY_TYPE_OFFSET_HOLE && length != 12) {
                return Err(format!("read chunk of bad length {length}"));
            }
            let offset = r.read_u64().await.map_err(|e| io_why(e, during))?;
            let n = if kind == REPLY_TYPE_OFFSET_DATA {
                u64::from(length - 8)
            } else {
                u64::from(r.read_u32().await.map_err(|e| io_why(e, during))?)
            };
            if n == 0 || offset < req_start || offset.saturating_add(n) > req_end {
                return Err(format!(
                    "read chunk of {n} bytes at offset {offset} outside the request [{req_start}, {req_end})"
                ));
            }
            let (at, n_us) = ((offset - req_start) as usize, n as usize);
            if at > buf.len() {
                buf.resize(at, 0); // a later piece first: the gap is filled by others
            }
            if kind == REPLY_TYPE_OFFSET_HOLE {
                if at + n_us > buf.len() {
                    buf.resize(at + n_us, 0);
                }
                buf[at..at + n_us].fill(0);
            } else if at == buf.len() {
                fill_to(r, buf, at + n_us)
                    .await
                    .map_err(|e| io_why(e, "in the middle of read data"))?;
            } else {
                // An earlier piece after a later one: overwrite in place.
                if at + n_us > buf.len() {
                    buf.resize(at + n_us, 0);
                }
                r.read_exact(&mut buf[at..at + n_us])
                    .await
                    .map_err(|e| io_why(e, "in the middle of read data"))?;
            }
            *covered += n;
        }
        REPLY_TYPE_BLOCK_STATUS => {
            let State::Status { context, found } = &mut p.state else {
                return Err(format!(
                    "block status in reply to {} (handle {handle})",
                    command_name(p.cmd)
                ));
            };
            if length < 12 || (length - 4) % 8 != 0 {
                return Err(format!("block status chunk of bad length {length}"));
            }
            let id = r.read_u32().await.map_err(|e| io_why(e, during))?;
            let mut body = vec![0u8; (length - 4) as usize];
            r.read_exact(&mut body)
                .await
                .map_err(|e| io_why(e, during))?;
            if !shared.context_ids.contains(&id) {
                return Err(format!(
                    "block status for meta context id {id}, which was not negotiated"
                ));
            }
            // One chunk per negotiated context: keep the one asked for.
            for d in body.chunks_exact(8).filter(|_| id == *context) {
                let len = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
                let fl = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
                if len == 0 {
                    return Err("block status descriptor of length 0".into());
                }
                found.push((len, fl));
            }
        }
        k if k & REPLY_TYPE_ERROR_BIT != 0 => {
            if length < 6 {
                return Err(format!("error chunk of bad length {length}"));
            }
            let code = r.read_u32().await.map_err(|e| io_why(e, during))?;
            let mlen = r.read_u16().await.map_err(|e| io_why(e, during))?;
            if u32::from(mlen) > length - 6 {
                return Err(format!(
                    "error message of {mlen} bytes in a chunk of {length}"
                ));
            }
            let mut rest = vec![0u8; (length - 6) as usize];
            r.read_exact(&mut rest)
                .await
                .map_err(|e| io_why(e, during))?;
            let mut message = String::from_utf8_lossy(&rest[..mlen as usize]).into_owned();
            if k == REPLY_TYPE_ERROR_OFFSET && rest.len() >= mlen as usize + 8 {
                let o = &rest[mlen as usize..mlen as usize + 8];
                let at = u64::from_be_bytes(o.try_into().unwrap_or_default());
                message = format!("{message} (at offset {at})");
            }
            if code == 0 {
                return Err("error chunk with error code 0".into());
            }
            if p.error.is_none() {
                p.error = Some(server_error(shared, &p, code, message));
            }
        }
        other => return Err(format!("reply chunk of unknown type {other}")),
    }
    if flags & REPLY_FLAG_DONE == 0 {
        lock(&shared.pending).insert(handle, p);
        return Ok(());
    }
    let result = match (p.error.take(), &mut p.state) {
        (Some(e), _) => Err(e),
        (None, State::Read { buf, covered }) => {
            if *covered != u64::from(p.length) {
                return Err(format!(
                    "the server ended a read of {} bytes at offset {} after {covered} bytes",
                    p.length, p.offset
                ));
            }
            Ok(Done::Read(std::mem::take(buf)))
        }
        (None, State::Status { found, .. }) => {
            if found.is_empty() {
                return Err(format!(
                    "the server ended block status at offset {} with no descriptors",
                    p.offset
                ));
            }
            Ok(Done::Status(std::mem::take(found)))
        }
    };
    let _ = p.done.send(result);
    Ok(())
}
