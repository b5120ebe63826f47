//! The fixed newstyle handshake: options, `NBD_OPT_GO`, meta contexts, the export's
//! size and flags.

use super::*;

pub(super) async fn handshake(
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

pub(super) fn handshake_err(uri: &str, what: &str) -> NbdError {
    NbdError::Handshake {
        uri: uri.into(),
        what: what.into(),
    }
}

pub(super) fn option_error(uri: &str, option: &str, t: u32, data: &[u8]) -> NbdError {
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

pub(super) fn put_str32(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

pub(super) async fn send_option(w: &mut Writer, option: u32, data: &[u8]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(16 + data.len());
    buf.extend_from_slice(&IHAVEOPT.to_be_bytes());
    buf.extend_from_slice(&option.to_be_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
    w.write_all(&buf).await?;
    w.flush().await
}

pub(super) async fn option_reply(
    r: &mut Reader,
    uri: &str,
    option: u32,
) -> Result<(u32, Vec<u8>), NbdError> {
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
