//! Clients that break the protocol, speak it badly, or leave mid-request, spoken as raw
//! bytes over TCP: they get protocol errors or a disconnect, never a crash, and the image
//! stays consistent. Also the parts of the protocol QEMU's client does not exercise
//! (REQ_ONE, FAST_ZERO refusals, out-of-order pipelined replies).

#[path = "support/wire.rs"]
mod wire;

use std::path::Path;
use std::time::Duration;

use qcow2_async::{CreateOptions, Image, OpenOptions, Verdict};
use qcow2_nbd::proto::{self, cflags, cmd, errno, opt, rep};
use qcow2_nbd::{ExportConfig, Listener, Server, ServerOptions};
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wire::{go_payload, option_reply, read_n, send_option, u32_at, u64_at};

const SIZE: u64 = 4 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    img: Image,
    server: Server,
    task: tokio::task::JoinHandle<qcow2_nbd::Result<()>>,
    addr: String,
}

async fn fixture() -> Fixture {
    fixture_with(ServerOptions::default()).await
}

async fn fixture_with(opts: ServerOptions) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let img = Image::create(&path, &CreateOptions::new(SIZE), &OpenOptions::default())
        .await
        .unwrap();
    let server = Server::new(img.clone(), vec![ExportConfig::live("")], opts)
        .await
        .unwrap();
    let listener = Listener::bind_tcp("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = server.clone();
    let task = tokio::spawn(async move { srv.serve(listener).await });
    Fixture {
        _dir: dir,
        path,
        img,
        server,
        task,
        addr,
    }
}

impl Fixture {
    /// Stops the server, closes the image and checks it from a fresh open.
    async fn finish(self) {
        self.server.shutdown();
        self.task.await.unwrap().unwrap();
        // The server's handle of the image goes too: until the last one does, the image's
        // lock keeps the checking open below out.
        drop(self.server);
        self.img.close().await.unwrap();
        assert_clean(&self.path).await;
    }
}

async fn assert_clean(path: &Path) {
    let img = Image::open(path, &OpenOptions::read_only()).await.unwrap();
    let report = img.check(None).await.unwrap();
    assert_eq!(report.verdict(), Verdict::Clean, "{report:?}");
}

/// The server closes the connection (after possibly sending some bytes first).
async fn assert_closed(s: &mut TcpStream) {
    let mut sink = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut sink)).await;
    assert!(r.is_ok(), "the server should have closed the connection");
}

/// Connects and answers the greeting with `flags`.
async fn connect(addr: &str, flags: u32) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let g = read_n(&mut s, 18).await;
    assert_eq!(g, proto::greeting());
    s.write_all(&flags.to_be_bytes()).await.unwrap();
    s
}

fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Sends `NBD_OPT_GO` for the default export and reads replies to the ACK; returns the
/// transmission flags.
async fn go(s: &mut TcpStream) -> u16 {
    send_option(s, opt::GO, &go_payload("")).await;
    let mut flags = None;
    loop {
        let (o, kind, data) = option_reply(s).await;
        assert_eq!(o, opt::GO);
        match kind {
            rep::INFO if u16::from_be_bytes([data[0], data[1]]) == proto::info::EXPORT => {
                assert_eq!(u64_at(&data, 2), SIZE);
                flags = Some(u16::from_be_bytes([data[10], data[11]]));
            }
            rep::INFO => {}
            rep::ACK => return flags.expect("NBD_INFO_EXPORT before the ACK"),
            other => panic!("unexpected GO reply {other:#x}"),
        }
    }
}

/// Negotiates structured replies and `base:allocation`, then GO.
async fn go_structured(s: &mut TcpStream) -> u16 {
    send_option(s, opt::STRUCTURED_REPLY, &[]).await;
    assert_eq!(option_reply(s).await.1, rep::ACK);
    send_option(
        s,
        opt::SET_META_CONTEXT,
        &meta_payload("", &["base:allocation"]),
    )
    .await;
    let (_, kind, data) = option_reply(s).await;
    assert_eq!(kind, rep::META_CONTEXT);
    assert_eq!(&data[4..], b"base:allocation");
    assert_eq!(option_reply(s).await.1, rep::ACK);
    go(s).await
}

fn request(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = proto::REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// A simple reply: (error, cookie).
async fn simple_reply(s: &mut TcpStream) -> (u32, u64) {
    let h = read_n(s, 16).await;
    assert_eq!(u32_at(&h, 0), proto::SIMPLE_REPLY_MAGIC);
    (u32_at(&h, 4), u64_at(&h, 8))
}

/// A structured chunk: (flags, type, cookie, payload).
async fn chunk(s: &mut TcpStream) -> (u16, u16, u64, Vec<u8>) {
    let h = read_n(s, 20).await;
    assert_eq!(u32_at(&h, 0), proto::STRUCTURED_REPLY_MAGIC);
    let len = u32_at(&h, 16) as usize;
    (
        u16::from_be_bytes([h[4], h[5]]),
        u16::from_be_bytes([h[6], h[7]]),
        u64_at(&h, 8),
        read_n(s, len).await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_fixed_newstyle_or_with_unknown_flags_are_disconnected() {
    let f = fixture().await;
    for flags in [0u32, proto::CLIENT_NO_ZEROES, 1 | 4, u32::MAX] {
        let mut s = connect(&f.addr, flags).await;
        // Anything the client sends next is ignored.
        let _ = s.write_all(&[0u8; 16]).await;
        assert_closed(&mut s).await;
    }
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_option_magic_and_huge_option_payloads_disconnect() {
    let f = fixture().await;
    let mut s = connect(&f.addr, 1).await;
    s.write_all(&[0x55u8; 16]).await.unwrap();
    assert_closed(&mut s).await;
    let mut s = connect(&f.addr, 1).await;
    let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt::GO.to_be_bytes());
    b.extend_from_slice(&(1u32 << 30).to_be_bytes());
    s.write_all(&b).await.unwrap();
    assert_closed(&mut s).await;
    // EXPORT_NAME cannot fail politely: an unknown export ends the connection.
    let mut s = connect(&f.addr, 1).await;
    send_option(&mut s, opt::EXPORT_NAME, b"nope").await;
    assert_closed(&mut s).await;
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_options_get_errors_and_negotiation_goes_on() {
    let f = fixture().await;
    let mut s = connect(&f.addr, 3).await;
    let mut truncated = go_payload("");
    truncated.pop();
    let cases: Vec<(u32, Vec<u8>, u32)> = vec![
        (opt::GO, truncated, rep::ERR_INVALID),
        (opt::GO, go_payload("missing"), rep::ERR_UNKNOWN),
        (opt::INFO, u32::MAX.to_be_bytes().to_vec(), rep::ERR_INVALID),
        (opt::LIST, vec![1], rep::ERR_INVALID),
        // No TLS configured: refused by policy, as qemu-nbd without --tls-creds.
        (opt::STARTTLS, vec![], rep::ERR_POLICY),
        (77, vec![1, 2, 3], rep::ERR_UNSUP),
        // Metadata contexts need structured replies first.
        (
            opt::SET_META_CONTEXT,
            meta_payload("", &["base:allocation"]),
            rep::ERR_INVALID,
        ),
        (opt::STRUCTURED_REPLY, vec![0], rep::ERR_INVALID),
    ];
    for (o, data, want) in cases {
        send_option(&mut s, o, &data).await;
        let (ro, kind, _) = option_reply(&mut s).await;
        assert_eq!((ro, kind), (o, want), "option {o}");
    }
    send_option(&mut s, opt::LIST, &[]).await;
    let (_, kind, data) = option_reply(&mut s).await;
    assert_eq!((kind, data), (rep::SERVER, vec![0, 0, 0, 0]));
    assert_eq!(option_reply(&mut s).await.1, rep::ACK);
    send_option(&mut s, opt::STRUCTURED_REPLY, &[]).await;
    assert_eq!(option_reply(&mut s).await.1, rep::ACK);
    // A lying query count, then a LIST of every context.
    let mut lying = meta_payload("", &[]);
    lying[4..8].copy_from_slice(&1000u32.to_be_bytes());
    send_option(&mut s, opt::LIST_META_CONTEXT, &lying).await;
    assert_eq!(option_reply(&mut s).await.1, rep::ERR_INVALID);
    send_option(&mut s, opt::LIST_META_CONTEXT, &meta_payload("", &[])).await;
    let (_, kind, data) = option_reply(&mut s).await;
    assert_eq!(
        (kind, &data[4..]),
        (rep::META_CONTEXT, &b"base:allocation"[..])
    );
    let (_, kind, data) = option_reply(&mut s).await;
    assert_eq!(
        (kind, &data[4..]),
        (rep::META_CONTEXT, &b"qemu:allocation-depth"[..])
    );
    assert_eq!(option_reply(&mut s).await.1, rep::ACK);
    let flags = go(&mut s).await;
    assert_ne!(flags & proto::tflags::CAN_MULTI_CONN, 0);
    s.write_all(&request(0, cmd::READ, 9, 0, 512))
        .await
        .unwrap();
    // Nothing was written: the read is one hole (offset and length, no data), as from
    // qemu-nbd.
    let (_, kind, cookie, data) = chunk(&mut s).await;
    assert_eq!((kind, cookie), (proto::chunk::OFFSET_HOLE, 9));
    assert_eq!(
        data,
        [&0u64.to_be_bytes()[..], &512u32.to_be_bytes()].concat()
    );
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_errors_and_the_connection_survives() {
    let f = fixture().await;
    let mut s = connect(&f.addr, 1).await;
    go(&mut s).await;
    let mut payload = vec![0x77u8; 1024];
    let cases: Vec<(Vec<u8>, u32)> = vec![
        (request(0, cmd::READ, 1, SIZE - 511, 512), errno::EINVAL),
        (request(0, cmd::READ, 2, u64::MAX, 2), errno::EINVAL),
        (
            request(0, cmd::READ, 3, 0, proto::MAX_REQUEST + 1),
            errno::EOVERFLOW,
        ),
        (
            [request(0, cmd::WRITE, 4, SIZE - 512, 1024), payload.clone()].concat(),
            errno::ENOSPC,
        ),
        (
            [
                request(cflags::NO_HOLE, cmd::WRITE, 5, 0, 1024),
                payload.clone(),
            ]
            .concat(),
            errno::EINVAL,
        ),
        (request(0, 42, 6, 0, 0), errno::EINVAL),
        (request(0, cmd::BLOCK_STATUS, 7, 0, 4096), errno::EINVAL),
        (request(0, cmd::TRIM, 8, SIZE, 1), errno::EINVAL),
    ];
    for (bytes, want) in cases {
        s.write_all(&bytes).await.unwrap();
        let (e, _) = simple_reply(&mut s).await;
        assert_eq!(e, want, "request {:?}", &bytes[..28]);
    }
    // The skipped payloads were not taken for requests: the stream is still in step.
    payload.fill(0x42);
    s.write_all(
        &[
            request(cflags::FUA, cmd::WRITE, 10, 4096, 1024),
            payload.clone(),
        ]
        .concat(),
    )
    .await
    .unwrap();
    assert_eq!(simple_reply(&mut s).await, (0, 10));
    s.write_all(&request(0, cmd::READ, 11, 4096, 1024))
        .await
        .unwrap();
    assert_eq!(simple_reply(&mut s).await, (0, 11));
    assert_eq!(read_n(&mut s, 1024).await, payload);
    // Oversized writes cannot be skipped: error, then disconnect.
    s.write_all(&request(0, cmd::WRITE, 12, 0, proto::MAX_REQUEST + 1))
        .await
        .unwrap();
    assert_eq!(simple_reply(&mut s).await, (errno::EOVERFLOW, 12));
    assert_closed(&mut s).await;
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_magic_disconnects_and_the_server_keeps_serving() {
    let f = fixture().await;
    let mut s = connect(&f.addr, 1).await;
    go(&mut s).await;
    let mut bad = request(0, cmd::READ, 1, 0, 512);
    bad[0] ^= 0xff;
    s.write_all(&bad).await.unwrap();
    assert_closed(&mut s).await;
    let mut s = connect(&f.addr, 1).await;
    go(&mut s).await;
    s.write_all(&request(0, cmd::FLUSH, 2, 0, 0)).await.unwrap();
    assert_eq!(simple_reply(&mut s).await, (0, 2));
    s.write_all(&request(0, cmd::DISC, 3, 0, 0)).await.unwrap();
    assert_closed(&mut s).await;
    f.finish().await;
}

/// A client that leaves halfway through a write payload: that write never happens, the
/// writes before it do, and the image is consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mid_request_leaves_the_image_consistent() {
    let f = fixture().await;
    let mut s = connect(&f.addr, 1).await;
    go(&mut s).await;
    let mut burst = Vec::new();
    for i in 0..32u64 {
        burst.extend(request(0, cmd::WRITE, i, i * 65536, 65536));
        burst.extend(vec![i as u8 + 1; 65536]);
    }
    burst.extend(request(0, cmd::WRITE, 99, 3 << 20, 65536));
    burst.extend(vec![0xee; 1000]);
    s.write_all(&burst).await.unwrap();
    // Leave with a FIN after the last byte, reading the replies until the server hangs up:
    // closing with replies unread would send a reset instead, and the kernel drops whatever
    // of the burst was still unsent, which would make the complete writes racy.
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    drop(s);
    let mut s = connect(&f.addr, 1).await;
    go(&mut s).await;
    s.write_all(&request(0, cmd::FLUSH, 1, 0, 0)).await.unwrap();
    assert_eq!(simple_reply(&mut s).await, (0, 1));
    s.write_all(&request(0, cmd::READ, 2, 3 << 20, 65536))
        .await
        .unwrap();
    assert_eq!(simple_reply(&mut s).await, (0, 2));
    assert_eq!(read_n(&mut s, 65536).await, vec![0u8; 65536]);
    drop(s);
    // Every complete write that was read reaches the image (the first connection may
    // still be finishing them: poll).
    let mut buf = vec![0u8; 65536];
    for i in 0..32u64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            f.img.read_at(&mut buf, i * 65536).await.unwrap();
            if buf.iter().all(|&b| b == i as u8 + 1) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "write {i} never landed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    f.finish().await;
}

/// Many requests sent without waiting: every one is answered exactly once (in whatever
/// order they complete), with the right data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_each_answered_once() {
    let f = fixture().await;
    let mut s = connect(&f.addr, 1).await;
    go(&mut s).await;
    let mut burst = Vec::new();
    for i in 0..48u64 {
        burst.extend(request(0, cmd::WRITE, i, i * 8192, 4096));
        burst.extend(vec![i as u8; 4096]);
    }
    s.write_all(&burst).await.unwrap();
    let mut seen = [false; 48];
    for _ in 0..48 {
        let (e, c) = simple_reply(&mut s).await;
        assert_eq!(e, 0);
        assert!(
            !std::mem::replace(&mut seen[c as usize], true),
            "cookie {c} twice"
        );
    }
    let mut reads = Vec::new();
    for i in 0..48u64 {
        reads.extend(request(0, cmd::READ, 1000 + i, i * 8192, 4096));
    }
    s.write_all(&reads).await.unwrap();
    for _ in 0..48 {
        let (e, c) = simple_reply(&mut s).await;
        assert_eq!(e, 0);
        let data = read_n(&mut s, 4096).await;
        assert!(data.iter().all(|&b| u64::from(b) == c - 1000));
    }
    f.finish().await;
}

/// Structured replies: block status with and without REQ_ONE, read and error chunks,
/// and FAST_ZERO refused where the engine would have to write data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_replies_block_status_and_fast_zero() {
    let f = fixture().await;
    let mut s = connect(&f.addr, 3).await;
    let flags = go_structured(&mut s).await;
    assert_ne!(flags & proto::tflags::SEND_DF, 0);
    assert_ne!(flags & proto::tflags::SEND_FAST_ZERO, 0);
    s.write_all(&[request(0, cmd::WRITE, 1, 0, 65536), vec![9u8; 65536]].concat())
        .await
        .unwrap();
    assert_eq!(simple_reply(&mut s).await, (0, 1));

    s.write_all(&request(0, cmd::BLOCK_STATUS, 2, 0, 1 << 20))
        .await
        .unwrap();
    let (fl, kind, cookie, p) = chunk(&mut s).await;
    assert_eq!(
        (fl, kind, cookie),
        (proto::chunk::FLAG_DONE, proto::chunk::BLOCK_STATUS, 2)
    );
    assert_eq!(u32_at(&p, 0), 0, "context id from SET_META_CONTEXT");
    let desc: Vec<(u32, u32)> = p[4..]
        .chunks(8)
        .map(|c| (u32_at(c, 0), u32_at(c, 4)))
        .collect();
    let hz = proto::STATE_HOLE | proto::STATE_ZERO;
    assert_eq!(desc, vec![(65536, 0), ((1 << 20) - 65536, hz)]);

    s.write_all(&request(cflags::REQ_ONE, cmd::BLOCK_STATUS, 3, 0, 1 << 20))
        .await
        .unwrap();
    let (_, _, _, p) = chunk(&mut s).await;
    assert_eq!(p.len(), 12, "one descriptor");

    s.write_all(&request(cflags::DF, cmd::READ, 4, 65536 - 8, 16))
        .await
        .unwrap();
    let (fl, kind, _, p) = chunk(&mut s).await;
    assert_eq!(
        (fl, kind),
        (proto::chunk::FLAG_DONE, proto::chunk::OFFSET_DATA)
    );
    assert_eq!(u64_at(&p, 0), 65536 - 8);
    assert_eq!(&p[8..], &[9, 9, 9, 9, 9, 9, 9, 9, 0, 0, 0, 0, 0, 0, 0, 0]);

    s.write_all(&request(0, cmd::READ, 5, SIZE, 1))
        .await
        .unwrap();
    let (fl, kind, cookie, p) = chunk(&mut s).await;
    assert_eq!(
        (fl, kind, cookie),
        (proto::chunk::FLAG_DONE, proto::chunk::ERROR, 5)
    );
    assert_eq!(u32_at(&p, 0), errno::EINVAL);

    let fast = cflags::FAST_ZERO;
    s.write_all(&request(fast, cmd::WRITE_ZEROES, 6, 4096, 4096))
        .await
        .unwrap();
    let (_, kind, _, p) = chunk(&mut s).await;
    assert_eq!((kind, u32_at(&p, 0)), (proto::chunk::ERROR, errno::ENOTSUP));
    s.write_all(&request(fast, cmd::WRITE_ZEROES, 7, 0, 65536))
        .await
        .unwrap();
    assert_eq!(simple_reply(&mut s).await, (0, 7));
    s.write_all(&request(0, cmd::READ, 8, 0, 4)).await.unwrap();
    let (_, _, _, p) = chunk(&mut s).await;
    assert_eq!(&p[8..], &[0, 0, 0, 0]);
    f.finish().await;
}

/// Random bytes after a good handshake (some with a valid request magic, so they get past
/// the first check) never crash the server; it keeps serving and the image stays clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_request_streams_never_crash_the_server() {
    let f = fixture().await;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0x6e6264);
    for round in 0..24 {
        let mut s = connect(&f.addr, 1 | (round % 2)).await;
        go(&mut s).await;
        let mut junk = Vec::new();
        for _ in 0..rng.gen_range(1..8) {
            let kind = rng.gen_range(0..10u16);
            let len = match rng.gen_range(0..3) {
                0 => rng.gen_range(0..4096),
                1 => rng.gen(),
                _ => 512,
            };
            let off = match rng.gen_range(0..3) {
                0 => rng.gen_range(0..SIZE),
                1 => rng.gen(),
                _ => SIZE - 512,
            };
            junk.extend(request(rng.gen(), kind, rng.gen(), off, len));
            let extra = rng.gen_range(0..2048);
            junk.extend((0..extra).map(|_| rng.gen::<u8>()));
        }
        let _ = s.write_all(&junk).await;
        // Either side may end it; the server must not hang on a half-sent request forever.
        drop(s);
    }
    let mut s = connect(&f.addr, 1).await;
    go(&mut s).await;
    s.write_all(&request(0, cmd::READ, 1, 0, 512))
        .await
        .unwrap();
    assert_eq!(simple_reply(&mut s).await, (0, 1));
    read_n(&mut s, 512).await;
    drop(s);
    f.finish().await;
}

/// Shutdown does not wait forever for a client that stalls mid-payload or never reads its
/// replies: after the grace period those connections are cut, the writes that were complete
/// still land, and the image closes cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_stalled_clients_after_the_grace_period() {
    let f = fixture_with({
        let mut o = ServerOptions::default();
        o.shutdown_grace = Duration::from_millis(300);
        o
    })
    .await;
    let mut stalled = connect(&f.addr, 1).await;
    go(&mut stalled).await;
    stalled
        .write_all(&[request(0, cmd::WRITE, 1, 0, 4096), vec![1; 4096]].concat())
        .await
        .unwrap();
    assert_eq!(simple_reply(&mut stalled).await, (0, 1));
    stalled
        .write_all(&[request(0, cmd::WRITE, 2, 8192, 4096), vec![2; 100]].concat())
        .await
        .unwrap();
    // A client that floods reads and never takes the replies.
    let mut deaf = connect(&f.addr, 1).await;
    go(&mut deaf).await;
    let mut reads = Vec::new();
    for i in 0..64 {
        reads.extend(request(0, cmd::READ, i, 0, 1 << 20));
    }
    deaf.write_all(&reads).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t0 = std::time::Instant::now();
    f.server.shutdown();
    let mut buf = vec![0u8; 4096];
    f.img.read_at(&mut buf, 0).await.unwrap();
    assert_eq!(buf, vec![1; 4096]);
    let Fixture {
        _dir,
        path,
        img,
        task,
        server,
        ..
    } = f;
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("serve returned")
        .unwrap()
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5));
    img.read_at(&mut buf, 8192).await.unwrap();
    assert_eq!(buf, vec![0; 4096], "the incomplete write never happened");
    drop(server); // its handle of the image would keep the checking open out
    img.close().await.unwrap();
    assert_clean(&path).await;
    drop((stalled, deaf));
}

fn ext_request(flags: u16, kind: u16, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
    let mut b = proto::EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// An extended reply chunk: (flags, type, cookie, offset, payload).
async fn ext_chunk(s: &mut TcpStream) -> (u16, u16, u64, u64, Vec<u8>) {
    let h = read_n(s, 32).await;
    assert_eq!(u32_at(&h, 0), proto::EXTENDED_REPLY_MAGIC);
    let len = u64_at(&h, 24) as usize;
    (
        u16::from_be_bytes([h[4], h[5]]),
        u16::from_be_bytes([h[6], h[7]]),
        u64_at(&h, 8),
        u64_at(&h, 16),
        read_n(s, len).await,
    )
}

/// Extended headers as QEMU 10's client negotiates them (`qemu-io` and `qemu-img` exercise
/// the common path in `nbd_interop`); here what they do not: structured replies refused
/// after them, 64-bit lengths, `BLOCK_STATUS_EXT` extents, a block-status context filter,
/// unknown filter ids, and a compact request where extended ones were negotiated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_headers_carry_64_bit_requests_and_replies() {
    let f = fixture().await;
    f.img.write_at(&[0x42; 65536], 65536).await.unwrap();
    let mut s = connect(&f.addr, 1).await;
    send_option(&mut s, opt::EXTENDED_HEADERS, &[]).await;
    assert_eq!(option_reply(&mut s).await.1, rep::ACK);
    send_option(&mut s, opt::EXTENDED_HEADERS, &[]).await;
    assert_eq!(option_reply(&mut s).await.1, rep::ERR_INVALID);
    send_option(&mut s, opt::STRUCTURED_REPLY, &[]).await;
    assert_eq!(option_reply(&mut s).await.1, rep::ERR_EXT_HEADER_REQD);
    let queries = ["base:allocation", "qemu:allocation-depth"];
    send_option(&mut s, opt::SET_META_CONTEXT, &meta_payload("", &queries)).await;
    let mut ids = Vec::new();
    for want in queries {
        let (_, kind, data) = option_reply(&mut s).await;
        assert_eq!((kind, &data[4..]), (rep::META_CONTEXT, want.as_bytes()));
        ids.push(u32_at(&data, 0));
    }
    assert_eq!(option_reply(&mut s).await.1, rep::ACK);
    let flags = go(&mut s).await;
    assert_ne!(flags & proto::tflags::BLOCK_STAT_PAYLOAD, 0);

    // A read: one data chunk whose header echoes the request's offset.
    s.write_all(&ext_request(0, cmd::READ, 1, 65536, 4096))
        .await
        .unwrap();
    let (fl, kind, cookie, off, data) = ext_chunk(&mut s).await;
    assert_eq!(
        (fl, kind, cookie, off),
        (1, proto::chunk::OFFSET_DATA, 1, 65536)
    );
    assert_eq!(&data[8..], &[0x42; 4096][..]);
    // Success without data is a final NONE chunk, not a simple reply.
    s.write_all(&ext_request(0, cmd::FLUSH, 2, 0, 0))
        .await
        .unwrap();
    let (fl, kind, cookie, _, data) = ext_chunk(&mut s).await;
    assert_eq!(
        (fl, kind, cookie, data.len()),
        (1, proto::chunk::NONE, 2, 0)
    );
    // Block status of the whole disk: 64-bit descriptors, both contexts, in order.
    s.write_all(&ext_request(0, cmd::BLOCK_STATUS, 3, 0, SIZE))
        .await
        .unwrap();
    for (k, &id) in ids.iter().enumerate() {
        let (fl, kind, cookie, _, data) = ext_chunk(&mut s).await;
        assert_eq!((kind, cookie), (proto::chunk::BLOCK_STATUS_EXT, 3));
        assert_eq!(fl, u16::from(k == 1), "the last context's chunk is final");
        assert_eq!(u32_at(&data, 0), id);
        let n = u32_at(&data, 4) as usize;
        assert_eq!(data.len(), 8 + 16 * n);
        let ext: Vec<(u64, u64)> = (0..n)
            .map(|i| (u64_at(&data, 8 + 16 * i), u64_at(&data, 16 + 16 * i)))
            .collect();
        assert_eq!(ext.iter().map(|e| e.0).sum::<u64>(), SIZE);
        // The written cluster is data at depth 1; the rest is a hole, depth 0.
        let (data_flags, rest) = if k == 0 {
            (0, u64::from(proto::STATE_HOLE | proto::STATE_ZERO))
        } else {
            (1, 0)
        };
        assert_eq!(
            ext,
            vec![(65536, rest), (65536, data_flags), (SIZE - 131072, rest)]
        );
    }
    // The same, filtered to the depth context by a payload.
    let mut req = ext_request(cflags::PAYLOAD_LEN, cmd::BLOCK_STATUS, 4, 0, 12);
    req.extend_from_slice(&SIZE.to_be_bytes());
    req.extend_from_slice(&ids[1].to_be_bytes());
    s.write_all(&req).await.unwrap();
    let (fl, kind, _, _, data) = ext_chunk(&mut s).await;
    assert_eq!(
        (fl, kind, u32_at(&data, 0)),
        (1, proto::chunk::BLOCK_STATUS_EXT, ids[1])
    );
    // A filter naming a context that was not selected: EINVAL, and the payload is consumed.
    let mut req = ext_request(cflags::PAYLOAD_LEN, cmd::BLOCK_STATUS, 5, 0, 12);
    req.extend_from_slice(&SIZE.to_be_bytes());
    req.extend_from_slice(&77u32.to_be_bytes());
    s.write_all(&req).await.unwrap();
    let (_, kind, cookie, _, data) = ext_chunk(&mut s).await;
    assert_eq!(
        (kind, cookie, u32_at(&data, 0)),
        (proto::chunk::ERROR, 5, errno::EINVAL)
    );
    // A trim with a 64-bit length past the end, then one that fits.
    s.write_all(&ext_request(0, cmd::TRIM, 6, 0, 1 << 33))
        .await
        .unwrap();
    let (_, kind, _, _, data) = ext_chunk(&mut s).await;
    assert_eq!(
        (kind, u32_at(&data, 0)),
        (proto::chunk::ERROR, errno::EINVAL)
    );
    s.write_all(&ext_request(0, cmd::TRIM, 7, 0, SIZE))
        .await
        .unwrap();
    assert_eq!(ext_chunk(&mut s).await.1, proto::chunk::NONE);
    // A compact request now is a protocol violation: the server hangs up once it has the
    // 32 bytes of what it takes for an extended header.
    let mut compact = request(0, cmd::FLUSH, 8, 0, 0);
    compact.extend_from_slice(&[0; 4]);
    s.write_all(&compact).await.unwrap();
    assert_closed(&mut s).await;
    f.finish().await;
}
