//! Protocol robustness: a tiny NBD server that shakes hands properly, then misbehaves.
//! Each misbehaviour must be a clear error, quickly (deadlines), never a hang or panic.
#![allow(clippy::unwrap_used)]

use pilotlight_nbd::proto::*;
use pilotlight_nbd::{Client, ConnectOptions, NbdError, NbdUri};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

const SIZE: u64 = 1 << 20;

#[derive(Debug, Clone, Copy)]
enum Misbehave {
    BadReplyMagic,
    WrongHandle,
    OversizedChunk,
    TruncatedHeader,
    DisconnectMidRead,
    DataOutsideRequest,
    ErrorChunkThenFine,
    ShortRead,
    Silent,
    UnknownContext,
    ZeroLengthDescriptor,
    CloseWithTwoInFlight,
    /// Valid, unusual: a read answered as a hole, then the last part, then the middle.
    PiecesOutOfOrder,
}

async fn opt_reply(s: &mut UnixStream, opt: u32, t: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&t.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await.unwrap();
}

/// A correct fixed-newstyle handshake: structured replies, meta contexts (ids from 1 in
/// the order asked), GO with size and block sizes.
async fn handshake(s: &mut UnixStream) {
    s.write_all(&NBDMAGIC.to_be_bytes()).await.unwrap();
    s.write_all(&IHAVEOPT.to_be_bytes()).await.unwrap();
    s.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
        .await
        .unwrap();
    s.read_u32().await.unwrap();
    loop {
        assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
        let opt = s.read_u32().await.unwrap();
        let len = s.read_u32().await.unwrap();
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await.unwrap();
        match opt {
            OPT_STRUCTURED_REPLY => opt_reply(s, opt, REP_ACK, &[]).await,
            OPT_SET_META_CONTEXT => {
                let name_len = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                let mut at = 4 + name_len;
                let n = u32::from_be_bytes(data[at..at + 4].try_into().unwrap());
                at += 4;
                for i in 0..n {
                    let l = u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
                    let name = &data[at + 4..at + 4 + l];
                    at += 4 + l;
                    let mut r = (i + 1).to_be_bytes().to_vec();
                    r.extend_from_slice(name);
                    opt_reply(s, opt, REP_META_CONTEXT, &r).await;
                }
                opt_reply(s, opt, REP_ACK, &[]).await;
            }
            OPT_GO => {
                let mut e = INFO_EXPORT.to_be_bytes().to_vec();
                e.extend_from_slice(&SIZE.to_be_bytes());
                e.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_READ_ONLY).to_be_bytes());
                opt_reply(s, opt, REP_INFO, &e).await;
                let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                for v in [1u32, 4096, 1 << 20] {
                    b.extend_from_slice(&v.to_be_bytes());
                }
                opt_reply(s, opt, REP_INFO, &b).await;
                opt_reply(s, opt, REP_ACK, &[]).await;
                return;
            }
            other => opt_reply(s, other, REP_ERR_UNSUP, &[]).await,
        }
    }
}

/// (type, handle, offset, length) of the next request.
async fn request(s: &mut UnixStream) -> (u16, u64, u64, u32) {
    assert_eq!(s.read_u32().await.unwrap(), REQUEST_MAGIC);
    let _flags = s.read_u16().await.unwrap();
    let t = s.read_u16().await.unwrap();
    let h = s.read_u64().await.unwrap();
    let o = s.read_u64().await.unwrap();
    let l = s.read_u32().await.unwrap();
    (t, h, o, l)
}

fn chunk(flags: u16, kind: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&handle.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

fn data_chunk(flags: u16, handle: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    chunk(flags, REPLY_TYPE_OFFSET_DATA, handle, &p)
}

/// A correct reply to a read: the bytes are the offset's low byte.
async fn answer_read(s: &mut UnixStream, h: u64, o: u64, l: u32) {
    let data: Vec<u8> = (0..l as u64).map(|i| (o + i) as u8).collect();
    s.write_all(&data_chunk(REPLY_FLAG_DONE, h, o, &data))
        .await
        .unwrap();
}

async fn misbehave(mut s: UnixStream, how: Misbehave) {
    handshake(&mut s).await;
    let (_, h, o, l) = request(&mut s).await;
    match how {
        Misbehave::BadReplyMagic => {
            s.write_all(&0xdead_beefu32.to_be_bytes()).await.unwrap();
            s.write_all(&[0u8; 20]).await.unwrap();
        }
        Misbehave::WrongHandle => answer_read(&mut s, h + 1000, o, l).await,
        Misbehave::OversizedChunk => {
            let mut b = chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, h, &[]);
            b[16..20].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
            s.write_all(&b).await.unwrap();
        }
        Misbehave::TruncatedHeader => {
            let b = data_chunk(REPLY_FLAG_DONE, h, o, &[0u8; 16]);
            s.write_all(&b[..10]).await.unwrap();
            return; // closes
        }
        Misbehave::DisconnectMidRead => {
            let b = data_chunk(REPLY_FLAG_DONE, h, o, &vec![7u8; l as usize]);
            s.write_all(&b[..20 + 8 + 100]).await.unwrap();
            return;
        }
        Misbehave::DataOutsideRequest => {
            s.write_all(&data_chunk(
                REPLY_FLAG_DONE,
                h,
                o + 512,
                &vec![1u8; l as usize],
            ))
            .await
            .unwrap();
        }
        Misbehave::ErrorChunkThenFine => {
            let msg = b"disk on fire";
            let mut p = 5u32.to_be_bytes().to_vec(); // EIO
            p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            p.extend_from_slice(msg);
            s.write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, h, &p))
                .await
                .unwrap();
            let (_, h, o, l) = request(&mut s).await;
            answer_read(&mut s, h, o, l).await;
        }
        Misbehave::ShortRead => {
            s.write_all(&data_chunk(
                REPLY_FLAG_DONE,
                h,
                o,
                &vec![1u8; l as usize / 2],
            ))
            .await
            .unwrap();
        }
        Misbehave::Silent => {}
        Misbehave::PiecesOutOfOrder => {
            let q = u64::from(l / 4);
            let data =
                |from: u64, n: u64| -> Vec<u8> { (from..from + n).map(|i| i as u8).collect() };
            let mut hole = o.to_be_bytes().to_vec();
            hole.extend_from_slice(&(q as u32).to_be_bytes());
            s.write_all(&chunk(0, REPLY_TYPE_OFFSET_HOLE, h, &hole))
                .await
                .unwrap();
            s.write_all(&data_chunk(0, h, o + 3 * q, &data(o + 3 * q, q)))
                .await
                .unwrap();
            s.write_all(&data_chunk(REPLY_FLAG_DONE, h, o + q, &data(o + q, 2 * q)))
                .await
                .unwrap();
        }
        Misbehave::UnknownContext => {
            let mut p = 77u32.to_be_bytes().to_vec();
            p.extend_from_slice(&l.to_be_bytes());
            p.extend_from_slice(&0u32.to_be_bytes());
            s.write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, h, &p))
                .await
                .unwrap();
        }
        Misbehave::ZeroLengthDescriptor => {
            let mut p = 1u32.to_be_bytes().to_vec();
            p.extend_from_slice(&0u32.to_be_bytes());
            p.extend_from_slice(&0u32.to_be_bytes());
            s.write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, h, &p))
                .await
                .unwrap();
        }
        Misbehave::CloseWithTwoInFlight => {
            let _second = request(&mut s).await;
            return;
        }
    }
    // Hold the connection open until the client goes away.
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink).await;
}

/// Starts the server for one connection and connects a client to it.
async fn client(how: Misbehave, contexts: &[&str]) -> (Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("bad.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        misbehave(s, how).await;
    });
    let uri = NbdUri::parse(&format!("nbd+unix:///x?socket={}", socket.display())).unwrap();
    let opts = ConnectOptions {
        meta_contexts: contexts.iter().map(|c| c.to_string()).collect(),
        timeout: Duration::from_secs(2),
    };
    (Client::connect(&uri, &opts).await.unwrap(), dir)
}

/// The error of one read (at most 10 s: a hang fails the test).
async fn read_err(how: Misbehave) -> (NbdError, Client, tempfile::TempDir) {
    let (c, dir) = client(how, &[]).await;
    let e = tokio::time::timeout(Duration::from_secs(10), c.read(4096, 4096))
        .await
        .expect("the client must not hang")
        .unwrap_err();
    (e, c, dir)
}

#[tokio::test]
async fn malformed_replies_are_clear_errors_and_close_the_connection() {
    for (how, want) in [
        (Misbehave::BadReplyMagic, "bad magic 0xdeadbeef"),
        (Misbehave::WrongHandle, "which no request in flight has"),
        (Misbehave::OversizedChunk, "at most"),
        (
            Misbehave::TruncatedHeader,
            "closed the connection in a structured reply",
        ),
        (
            Misbehave::DisconnectMidRead,
            "closed the connection in the middle of read data",
        ),
        (
            Misbehave::DataOutsideRequest,
            "outside the request [4096, 8192)",
        ),
        (Misbehave::ShortRead, "after 2048 bytes"),
    ] {
        let (e, c, _dir) = read_err(how).await;
        let msg = e.to_string();
        assert!(msg.contains(want), "{how:?}: {msg}");
        assert!(msg.contains("nbd+unix:///x"), "names the server: {msg}");
        // The connection is dead: later requests fail at once, with the same reason.
        let again = c.read(0, 512).await.unwrap_err().to_string();
        assert!(again.contains(want), "{how:?} then: {again}");
    }
}

#[tokio::test]
async fn a_server_error_fails_only_its_request() {
    let (e, c, _dir) = read_err(Misbehave::ErrorChunkThenFine).await;
    match &e {
        NbdError::Server {
            errno,
            message,
            offset,
            ..
        } => {
            assert_eq!(*errno, "EIO");
            assert!(message.contains("disk on fire"));
            assert_eq!(*offset, 4096);
        }
        other => panic!("{other}"),
    }
    let ok = c.read(8192, 512).await.unwrap();
    assert_eq!(ok[0], 0, "(8192 as u8)");
    assert_eq!(ok[1], 1);
}

#[tokio::test]
async fn read_pieces_in_any_order_and_holes_assemble() {
    let (c, _dir) = client(Misbehave::PiecesOutOfOrder, &[]).await;
    let got = c.read(4096, 4096).await.unwrap();
    let want: Vec<u8> = (4096u64..8192)
        .map(|i| if i < 4096 + 1024 { 0 } else { i as u8 })
        .collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn a_silent_server_times_out() {
    let (e, _c, _dir) = read_err(Misbehave::Silent).await;
    assert!(matches!(e, NbdError::Timeout { secs: 2, .. }), "{e}");
    assert!(
        e.to_string().contains("READ of 4096 bytes at offset 4096"),
        "{e}"
    );
}

#[tokio::test]
async fn bad_block_status_replies() {
    for (how, want) in [
        (
            Misbehave::UnknownContext,
            "meta context id 77, which was not negotiated",
        ),
        (Misbehave::ZeroLengthDescriptor, "descriptor of length 0"),
    ] {
        let (c, _dir) = client(how, &["base:allocation"]).await;
        let e = tokio::time::timeout(
            Duration::from_secs(10),
            c.block_status("base:allocation", 0, SIZE),
        )
        .await
        .unwrap()
        .unwrap_err();
        assert!(e.to_string().contains(want), "{how:?}: {e}");
    }
}

#[tokio::test]
async fn a_disconnect_fails_every_request_in_flight() {
    let (c, _dir) = client(Misbehave::CloseWithTwoInFlight, &[]).await;
    let (a, b) = tokio::time::timeout(
        Duration::from_secs(10),
        futures::future::join(c.read(0, 4096), c.read(4096, 4096)),
    )
    .await
    .unwrap();
    for r in [a, b] {
        let e = r.unwrap_err().to_string();
        assert!(e.contains("closed the connection"), "{e}");
    }
}

#[tokio::test]
async fn handshake_failures() {
    let dir = tempfile::tempdir().unwrap();
    for (greeting, want) in [
        (
            b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
            "not an NBD server",
        ),
        (
            NBDMAGIC.to_be_bytes()[..5].to_vec(),
            "closed the connection",
        ),
        (
            [NBDMAGIC.to_be_bytes(), OLDSTYLE_MAGIC.to_be_bytes()].concat(),
            "oldstyle",
        ),
    ] {
        let socket = dir.path().join(format!("h{}.sock", greeting.len()));
        let listener = UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(&greeting).await.unwrap();
        });
        let uri = NbdUri::parse(&format!("nbd+unix:///x?socket={}", socket.display())).unwrap();
        let opts = ConnectOptions {
            timeout: Duration::from_secs(2),
            ..Default::default()
        };
        let e = Client::connect(&uri, &opts).await.unwrap_err().to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
}
