//! The reply loop: simple and structured replies read off the connection and handed to
//! the requests waiting for them.

use super::*;

/// Reads replies until the connection ends or breaks; hands each to its request.
pub(super) async fn reply_loop(mut r: Reader, shared: Arc<Shared>) {
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
pub(super) async fn fill_to(r: &mut Reader, buf: &mut Vec<u8>, len: usize) -> std::io::Result<()> {
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

pub(super) fn io_why(e: std::io::Error, during: &str) -> String {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        format!("the server closed the connection {during}")
    } else {
        format!("reading {during} failed: {e}")
    }
}

/// `Ok(())` on a clean end between replies; `Err(why)` on a protocol or I/O error.
pub(super) async fn read_replies(r: &mut Reader, shared: &Shared) -> Result<(), String> {
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

pub(super) fn take(shared: &Shared, handle: u64) -> Result<Pending, String> {
    lock(&shared.pending)
        .remove(&handle)
        .ok_or_else(|| format!("reply for handle {handle}, which no request in flight has"))
}

pub(super) fn server_error(shared: &Shared, p: &Pending, code: u32, message: String) -> NbdError {
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

pub(super) async fn simple_reply(r: &mut Reader, shared: &Shared) -> Result<(), String> {
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
        State::Ack => Done::Ack,
    };
    let _ = p.done.send(Ok(done));
    Ok(())
}

pub(super) async fn structured_chunk(r: &mut Reader, shared: &Shared) -> Result<(), String> {
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
        (None, State::Ack) => Ok(Done::Ack),
    };
    let _ = p.done.send(result);
    Ok(())
}
