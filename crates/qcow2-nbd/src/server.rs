//! The server: listeners, the handshake, and the transmission phase.
//!
//! One task per connection does everything for it: it parses requests out of what it reads,
//! runs them concurrently as futures it polls itself (bounded by
//! [`ServerOptions::max_in_flight`] and a byte budget for payload buffers), so the queue
//! depth the client sends reaches the engine, and writes the replies in completion order,
//! those that completed together in one write. No task per request: with one, requests of a
//! connection were stolen by the other worker threads and every reply crossed threads twice
//! (22 µs of server CPU per 4 KiB read against 10.5 now, `BENCHMARKS.md`). Connections are
//! tasks of their own and spread over the workers. While a batch of replies is being
//! written the connection reads no new requests, so a client must read replies while it
//! sends (QEMU's and libnbd's do). Every connection shares the one [`Image`], so a flush on
//! any connection covers writes completed on all of them: exports advertise
//! `NBD_FLAG_CAN_MULTI_CONN`.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use qcow2_async::io::IoBuf;
use qcow2_async::qcow2_format::Version;
use qcow2_async::Image;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, instrument, warn};

use crate::error::{Error, Result};
use crate::proto::{self, errno, opt, rep, tflags, Command, Limits, MetaContext, Mode};
use crate::reply::{push_extent, Extent, Reply};
use crate::tls::TlsCredentials;

/// What an export shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The image as it is now (read-write unless the export or the image is read-only).
    Live,
    /// An internal snapshot, by id or name, always read-only.
    Snapshot(String),
}

/// One export of the image.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ExportConfig {
    /// Name clients ask for (`""` is the default export).
    pub name: String,
    /// What the export shows.
    pub source: Source,
    /// Refuse writes even if the image is writable.
    pub read_only: bool,
    /// Persistent bitmaps offered as `qemu:dirty-bitmap:NAME` contexts (live exports only).
    pub bitmaps: Vec<String>,
}

impl ExportConfig {
    /// The live image under `name`, read-write, no bitmaps.
    pub fn live(name: impl Into<String>) -> Self {
        ExportConfig {
            name: name.into(),
            source: Source::Live,
            read_only: false,
            bitmaps: Vec::new(),
        }
    }
}

/// Limits of the server.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerOptions {
    /// Requests of one connection that may run at once; further requests wait to be read.
    pub max_in_flight: usize,
    /// Bytes of read and write buffers of the requests one connection runs at once (at
    /// least [`proto::MAX_REQUEST`]): no request starts while they are reached, so the most
    /// a connection holds is this plus one request's payload being read.
    pub buffer_bytes: usize,
    /// After [`Server::shutdown`], how long connections get to finish running requests and
    /// deliver their replies before they are cut (a client that stalls mid-request or stops
    /// reading replies must not hold the shutdown forever).
    pub shutdown_grace: Duration,
    /// TLS credentials; `Some` makes TLS mandatory for every client (see
    /// [`TlsCredentials`]). Default `None`: plaintext only.
    pub tls: Option<TlsCredentials>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_in_flight: 128,
            buffer_bytes: 128 << 20,
            shutdown_grace: Duration::from_secs(10),
            tls: None,
        }
    }
}

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix domain socket.
    Unix(UnixListener),
}

impl Listener {
    /// Binds a TCP listener (`127.0.0.1:0` picks a free port).
    pub async fn bind_tcp(addr: &str) -> Result<Listener> {
        TcpListener::bind(addr)
            .await
            .map(Listener::Tcp)
            .map_err(Error::io("binding the TCP socket"))
    }

    /// Binds a Unix socket at `path` (which must not exist).
    pub fn bind_unix(path: &Path) -> Result<Listener> {
        UnixListener::bind(path)
            .map(Listener::Unix)
            .map_err(Error::io("binding the Unix socket"))
    }

    /// The bound address, for logs (and to learn the port picked for `:0`).
    pub fn local_addr(&self) -> Result<String> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()),
            Listener::Unix(l) => l
                .local_addr()
                .map(|a| format!("{:?}", a.as_pathname().unwrap_or(Path::new("?")))),
        }
        .map_err(Error::io("reading the socket address"))
    }
}

/// `BLOCK_STATUS` looks at most this far per request; the reply may cover less than asked,
/// which the protocol allows, and the client asks again.
const BLOCK_STATUS_SPAN: u64 = 1 << 30;
/// Descriptors per context in one `BLOCK_STATUS` reply.
const MAX_DESCRIPTORS: usize = 1 << 16;

/// An export resolved against the image.
#[derive(Debug)]
struct Export {
    name: String,
    source: Source,
    read_only: bool,
    size: u64,
    contexts: Vec<MetaContext>,
}

struct Shared {
    image: Image,
    exports: Vec<Export>,
    opts: ServerOptions,
    cluster: u64,
    version3: bool,
    stop: watch::Sender<bool>,
}

/// An NBD server for one image. Cheap to clone; every clone is the same server.
#[derive(Clone)]
pub struct Server {
    sh: Arc<Shared>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("image", &self.sh.image)
            .field("exports", &self.sh.exports)
            .finish()
    }
}

impl Server {
    /// Checks the exports against the image: snapshots and bitmaps must exist, bitmaps must
    /// be consistent, names unique.
    #[instrument(skip(image, exports, opts))]
    pub async fn new(
        image: Image,
        exports: Vec<ExportConfig>,
        opts: ServerOptions,
    ) -> Result<Self> {
        if opts.max_in_flight == 0 || opts.buffer_bytes < proto::MAX_REQUEST as usize {
            return Err(Error::Config(format!(
                "max_in_flight must be positive and buffer_bytes at least {} (got {opts:?})",
                proto::MAX_REQUEST
            )));
        }
        let bitmaps = image.bitmaps().await;
        let snapshots = image.list_snapshots().await?;
        let mut out: Vec<Export> = Vec::new();
        for e in exports {
            proto::decode_string(e.name.as_bytes())
                .map_err(|m| Error::Config(format!("export name {:?}: {m}", e.name)))?;
            if out.iter().any(|o| o.name == e.name) {
                return Err(Error::Config(format!("export {:?} given twice", e.name)));
            }
            let export = match &e.source {
                Source::Live => {
                    let mut contexts =
                        vec![MetaContext::BaseAllocation, MetaContext::AllocationDepth];
                    for b in &e.bitmaps {
                        match bitmaps.iter().find(|i| &i.name == b) {
                            None => return Err(Error::Config(format!("no bitmap named {b:?}"))),
                            Some(i) if i.inconsistent => {
                                return Err(Error::Config(format!(
                                    "bitmap {b:?} is inconsistent (the image was not closed \
                                     cleanly); it can only be removed"
                                )))
                            }
                            Some(_) => contexts.push(MetaContext::DirtyBitmap(b.clone())),
                        }
                    }
                    Export {
                        name: e.name,
                        read_only: e.read_only || image.is_read_only(),
                        size: image.virtual_size(),
                        source: e.source,
                        contexts,
                    }
                }
                Source::Snapshot(id) => {
                    if !e.bitmaps.is_empty() {
                        return Err(Error::Config(
                            "dirty bitmaps describe the live image, not a snapshot".into(),
                        ));
                    }
                    let snap = snapshots
                        .iter()
                        .find(|s| &s.id == id)
                        .or_else(|| snapshots.iter().find(|s| &s.name == id))
                        .ok_or_else(|| Error::Config(format!("no snapshot {id:?}")))?;
                    Export {
                        name: e.name,
                        read_only: true,
                        size: snap.disk_size,
                        source: e.source,
                        // As qemu-nbd -l: a snapshot's allocation, read from its own L1
                        // table. Bitmaps track the live disk only.
                        contexts: vec![MetaContext::BaseAllocation, MetaContext::AllocationDepth],
                    }
                }
            };
            out.push(export);
        }
        let version3 = image.header().await.header.version == Version::V3;
        Ok(Server {
            sh: Arc::new(Shared {
                cluster: image.cluster_size(),
                image,
                exports: out,
                opts,
                version3,
                stop: watch::channel(false).0,
            }),
        })
    }

    /// The image the server exports.
    pub fn image(&self) -> &Image {
        &self.sh.image
    }

    /// Stops every [`Server::serve`] loop and connection: no new connections or requests
    /// are taken, requests already running finish and are answered, then the connections
    /// close. `serve` returns once they have.
    pub fn shutdown(&self) {
        self.sh.stop.send_replace(true);
    }

    /// Accepts connections until [`Server::shutdown`], then waits for every connection to
    /// finish its running requests.
    #[instrument(skip_all)]
    pub async fn serve(&self, listener: Listener) -> Result<()> {
        let mut stop = self.sh.stop.subscribe();
        let mut conns = JoinSet::new();
        info!(
            addr = listener.local_addr().unwrap_or_default(),
            "NBD server listening"
        );
        loop {
            let accepted = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                Some(done) = conns.join_next(), if !conns.is_empty() => {
                    if let Err(e) = done {
                        warn!("connection task failed: {e}");
                    }
                    continue;
                }
                a = accept(&listener) => a,
            };
            match accepted {
                Ok(Stream::Tcp(s, peer)) => {
                    let _ = s.set_nodelay(true);
                    conns.spawn(self.clone().connection(s, peer));
                }
                Ok(Stream::Unix(s)) => {
                    conns.spawn(self.clone().connection(s, "unix".into()));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
        let drained = tokio::time::timeout(self.sh.opts.shutdown_grace, async {
            while let Some(done) = conns.join_next().await {
                if let Err(e) = done {
                    warn!("connection task failed: {e}");
                }
            }
        })
        .await;
        if drained.is_err() {
            warn!(
                left = conns.len(),
                "connections did not finish within the shutdown grace period: cut"
            );
            // Aborting a connection aborts its reply writer too; request tasks then find
            // nobody to answer and end after their engine call.
            conns.shutdown().await;
        }
        Ok(())
    }

    /// Serves one already-connected client (both halves of a stream) to the end.
    pub async fn serve_stream<R, W>(&self, r: R, w: W)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        self.clone()
            .connection(tokio::io::join(r, w), "stream".into())
            .await
    }

    #[instrument(skip(self, s))]
    async fn connection<S: Transport>(self, s: S, peer: String) {
        let mut stop = self.sh.stop.subscribe();
        if *stop.borrow() {
            return;
        }
        let negotiated = tokio::select! {
            n = self.handshake(s) => n,
            _ = stop.wait_for(|s| *s) => return,
        };
        let ended = match negotiated {
            Ok(Some(Negotiated::Plain(session, r))) => self.transmit(session, r, stop).await,
            Ok(Some(Negotiated::Tls(session, r))) => self.transmit(session, *r, stop).await,
            Ok(None) => return,
            Err(e) => {
                debug!("handshake ended: {e}");
                return;
            }
        };
        if let Err(e) = ended {
            debug!("connection ended: {e}");
        }
    }

    /// Runs the transmission phase on the negotiated stream, starting with whatever the
    /// client already pipelined behind its last option.
    async fn transmit<T: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        session: Session,
        r: BufReader<T>,
        stop: watch::Receiver<bool>,
    ) -> Result<()> {
        let ahead = r.buffer().to_vec();
        let export = &self.sh.exports[session.export];
        debug!(export = export.name, mode = ?session.mode, "transmission phase");
        self.transmission(session, r.into_inner(), ahead, stop)
            .await
    }

    /// Greeting, option haggling, and the TLS handshake when the client asks for it.
    /// `Ok(None)`: the client aborted.
    async fn handshake<S: Transport>(&self, s: S) -> Result<Option<Negotiated<S>>> {
        let io = Error::io("negotiating");
        let mut s = BufReader::with_capacity(64 << 10, s);
        s.write_all(&proto::greeting()).await.map_err(&io)?;
        s.flush().await.map_err(&io)?;
        let mut raw = [0u8; 4];
        s.read_exact(&mut raw).await.map_err(&io)?;
        let no_zeroes = proto::decode_client_flags(raw)? & proto::CLIENT_NO_ZEROES != 0;
        let Some(creds) = &self.sh.opts.tls else {
            return Ok(match self.options(&mut s, no_zeroes, Tls::Off).await? {
                Haggled::Go(session) => Some(Negotiated::Plain(session, s)),
                Haggled::Abort | Haggled::StartTls => None,
            });
        };
        match self.options(&mut s, no_zeroes, Tls::Required).await? {
            Haggled::StartTls => {}
            // Go cannot happen before STARTTLS: every other option is refused.
            Haggled::Abort | Haggled::Go(_) => return Ok(None),
        }
        // The client waits for the acknowledgement before its ClientHello: anything
        // already read past STARTTLS is not part of a TLS handshake.
        if !s.buffer().is_empty() {
            return Err(Error::TlsRequired("data sent behind NBD_OPT_STARTTLS"));
        }
        let tls = creds
            .acceptor
            .accept(s.into_inner())
            .await
            .map_err(Error::io("the TLS handshake"))?;
        debug!("TLS established");
        let mut s = BufReader::with_capacity(64 << 10, tls);
        Ok(match self.options(&mut s, no_zeroes, Tls::On).await? {
            Haggled::Go(session) => Some(Negotiated::Tls(session, Box::new(s))),
            Haggled::Abort | Haggled::StartTls => None,
        })
    }

    /// Option haggling over `s` (writes pass through the read buffer to the stream).
    async fn options<S>(&self, s: &mut BufReader<S>, no_zeroes: bool, tls: Tls) -> Result<Haggled>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let io = Error::io("negotiating");
        let mut mode = Mode::Simple;
        // Contexts chosen by the last SET_META_CONTEXT: (export, indices).
        let mut selected: Option<(usize, Vec<usize>)> = None;
        loop {
            let mut hb = [0u8; proto::OPTION_HEADER_LEN];
            s.read_exact(&mut hb).await.map_err(&io)?;
            let h = proto::decode_option_header(&hb)?;
            let mut data = vec![0u8; h.length as usize];
            s.read_exact(&mut data).await.map_err(&io)?;
            let o = h.option;
            let mut out = Vec::new();
            let err = |out: &mut Vec<u8>, kind: u32, msg: &str| {
                proto::option_reply(out, o, kind, msg.as_bytes())
            };
            // Before STARTTLS only STARTTLS and ABORT do anything (as qemu-nbd).
            if tls == Tls::Required && o != opt::ABORT {
                match o {
                    opt::STARTTLS if !data.is_empty() => {
                        return Err(Error::TlsRequired("NBD_OPT_STARTTLS with data"))
                    }
                    opt::STARTTLS => {
                        proto::option_reply(&mut out, o, rep::ACK, &[]);
                        s.write_all(&out).await.map_err(&io)?;
                        s.flush().await.map_err(&io)?;
                        return Ok(Haggled::StartTls);
                    }
                    opt::EXPORT_NAME => {
                        return Err(Error::TlsRequired("NBD_OPT_EXPORT_NAME before STARTTLS"))
                    }
                    _ => err(
                        &mut out,
                        rep::ERR_TLS_REQD,
                        "TLS is required: send NBD_OPT_STARTTLS first",
                    ),
                }
                s.write_all(&out).await.map_err(&io)?;
                s.flush().await.map_err(&io)?;
                continue;
            }
            match o {
                opt::EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    let Some(i) = self.find(&name) else {
                        return Err(proto::ProtoError::UnknownExport(name).into());
                    };
                    let session = Session::new(i, mode, selected);
                    let e = &self.sh.exports[i];
                    let flags = transmission_flags(e, &session);
                    proto::export_name_reply(&mut out, e.size, flags, no_zeroes);
                    s.write_all(&out).await.map_err(&io)?;
                    s.flush().await.map_err(&io)?;
                    return Ok(Haggled::Go(session));
                }
                opt::ABORT => {
                    proto::option_reply(&mut out, o, rep::ACK, &[]);
                    // The client may already be gone; that is fine.
                    let _ = s.write_all(&out).await;
                    let _ = s.flush().await;
                    return Ok(Haggled::Abort);
                }
                opt::LIST if !data.is_empty() => {
                    err(&mut out, rep::ERR_INVALID, "NBD_OPT_LIST takes no data")
                }
                opt::LIST => {
                    for e in &self.sh.exports {
                        proto::rep_server(&mut out, &e.name);
                    }
                    proto::option_reply(&mut out, o, rep::ACK, &[]);
                }
                opt::STARTTLS if !data.is_empty() => {
                    err(&mut out, rep::ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
                }
                opt::STARTTLS if tls == Tls::On => {
                    err(&mut out, rep::ERR_INVALID, "TLS already enabled")
                }
                opt::STARTTLS => err(&mut out, rep::ERR_POLICY, "TLS not configured"),
                opt::INFO | opt::GO => match proto::decode_info_request(&data) {
                    Err(m) => err(&mut out, rep::ERR_INVALID, m.0),
                    Ok(req) => match self.find(&req.name) {
                        None => err(&mut out, rep::ERR_UNKNOWN, "no such export"),
                        Some(i) => {
                            let session = Session::new(i, mode, selected.clone());
                            let e = &self.sh.exports[i];
                            let flags = transmission_flags(e, &session);
                            proto::info_export(&mut out, o, e.size, flags);
                            if req.items.contains(&proto::info::NAME) {
                                proto::info_string(&mut out, o, proto::info::NAME, &e.name);
                            }
                            // Sent whether asked or not (as qemu-nbd): the engine takes any
                            // byte alignment, so the minimum is 1.
                            let preferred = self.sh.cluster.clamp(4096, 1 << 20) as u32;
                            proto::info_block_size(&mut out, o, 1, preferred, proto::MAX_REQUEST);
                            proto::option_reply(&mut out, o, rep::ACK, &[]);
                            if o == opt::GO {
                                s.write_all(&out).await.map_err(&io)?;
                                s.flush().await.map_err(&io)?;
                                return Ok(Haggled::Go(session));
                            }
                        }
                    },
                },
                opt::STRUCTURED_REPLY | opt::EXTENDED_HEADERS => {
                    let to = match o {
                        opt::EXTENDED_HEADERS => Mode::Extended,
                        _ => Mode::Structured,
                    };
                    match mode.upgrade(to, data.is_empty()) {
                        Ok(m) => {
                            mode = m;
                            proto::option_reply(&mut out, o, rep::ACK, &[]);
                        }
                        Err((kind, msg)) => err(&mut out, kind, msg),
                    }
                }
                opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                    let set = o == opt::SET_META_CONTEXT;
                    if set {
                        selected = None;
                    }
                    match proto::decode_meta_request(&data) {
                        _ if mode == Mode::Simple => err(
                            &mut out,
                            rep::ERR_INVALID,
                            "negotiate structured replies first",
                        ),
                        Err(m) => err(&mut out, rep::ERR_INVALID, m.0),
                        Ok(req) => match self.find(&req.export) {
                            None => err(&mut out, rep::ERR_UNKNOWN, "no such export"),
                            Some(i) => {
                                let avail = &self.sh.exports[i].contexts;
                                let mut hits: Vec<usize> = Vec::new();
                                if !set && req.queries.is_empty() {
                                    hits = (0..avail.len()).collect();
                                }
                                for q in &req.queries {
                                    for h in proto::match_query(q, avail, !set) {
                                        if !hits.contains(&h) {
                                            hits.push(h);
                                        }
                                    }
                                }
                                for &h in &hits {
                                    let id = if set { h as u32 } else { 0 };
                                    proto::rep_meta_context(&mut out, o, id, &avail[h].name());
                                }
                                proto::option_reply(&mut out, o, rep::ACK, &[]);
                                if set {
                                    selected = Some((i, hits));
                                }
                            }
                        },
                    }
                }
                _ => err(&mut out, rep::ERR_UNSUP, "option not supported"),
            }
            s.write_all(&out).await.map_err(&io)?;
            s.flush().await.map_err(&io)?;
        }
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.sh.exports.iter().position(|e| e.name == name)
    }

    /// The transmission phase of one connection, in one task: it parses requests out of
    /// what it reads, runs up to `max_in_flight` of them at once as futures of its own
    /// (no task per request, so a request never hops to another worker thread), and writes
    /// the replies of every request that completed before it waits again, in one write.
    /// Reads are cancel-safe (`read_buf` / `read` into buffers the task owns), so waiting
    /// for input and for completions in one `select!` loses nothing.
    async fn transmission<S>(
        &self,
        s: Session,
        mut io: S,
        ahead: Vec<u8>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let limits = s.limits(&self.sh.exports[s.export]);
        let conn = Conn {
            sh: self.sh.clone(),
            export: s.export,
            contexts: s.contexts,
            limits,
        };
        let max_in_flight = self.sh.opts.max_in_flight;
        let budget = self.sh.opts.buffer_bytes;
        let mut input = Input::new(ahead, s.mode);
        let mut pool = BufPool::default();
        let mut out: Vec<u8> = Vec::with_capacity(OUT_CHUNK);
        let mut running = FuturesUnordered::new();
        let mut buffered = 0usize;
        let mut closing = false;
        let mut unflushed = false;
        let mut failed: Option<Error> = None;
        loop {
            // Start every request that is complete in the input, within the limits.
            while !closing && running.len() < max_in_flight && buffered < budget {
                match input.next(&limits) {
                    Parsed::NeedMore => break,
                    Parsed::Fatal(e) => {
                        failed = Some(e);
                        closing = true;
                    }
                    Parsed::Refused(h, rej) => {
                        debug!(cookie = h.cookie, kind = h.kind, "refused: {}", rej.reason);
                        unflushed = true;
                        out.extend_from_slice(&conn.error_reply(&h, rej.errno, rej.reason));
                        closing = rej.disconnect;
                    }
                    Parsed::Disconnect => closing = true,
                    Parsed::Request(h, command, payload) => {
                        // A read's reply buffer comes from the pool (Input leaves it empty).
                        let payload = match command {
                            Command::Read { len, .. } => pool.get(len as usize),
                            _ => payload,
                        };
                        let bytes = command.buffer_len() as usize;
                        buffered += bytes;
                        let conn = &conn;
                        running.push(Box::pin(async move {
                            let (head, data) = conn.execute(&h, command, payload).await;
                            (head, data, bytes)
                        }));
                    }
                }
            }
            // Collect what completed meanwhile, then send it in one go. (A TLS stream holds
            // what was written until it is flushed, large data written directly included.)
            while let Some(Some(done)) = running.next().now_or_never() {
                buffered -= done.2;
                unflushed = true;
                pool.put(queue_reply(&mut out, &mut io, done.0, done.1).await?);
            }
            if unflushed {
                io.write_all(&out)
                    .await
                    .map_err(Error::io("writing replies"))?;
                out.clear();
                io.flush().await.map_err(Error::io("writing replies"))?;
                unflushed = false;
            }
            if closing && running.is_empty() {
                break;
            }
            let can_read = !closing
                && (input.mid_payload() || (running.len() < max_in_flight && buffered < budget));
            tokio::select! {
                biased;
                // The guard wait_for returns is not Send: drop it inside the branch.
                _ = stop.wait_for(|s| *s).map(drop), if !closing => closing = true,
                Some(done) = running.next(), if !running.is_empty() => {
                    buffered -= done.2;
                    unflushed = true;
                    pool.put(queue_reply(&mut out, &mut io, done.0, done.1).await?);
                }
                read = input.fill(&mut io), if can_read => match read {
                    Ok(0) => {
                        // The client went away; a write whose payload it did not finish
                        // is dropped, nothing of it reaches the image.
                        closing = true;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        failed = Some(Error::io("reading a request")(e));
                        closing = true;
                    }
                },
            }
        }
        let _ = io.shutdown().await;
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn transmission_flags(e: &Export, s: &Session) -> u16 {
    let mut f = tflags::HAS_FLAGS | tflags::CAN_MULTI_CONN | tflags::SEND_CACHE;
    if s.mode >= Mode::Structured {
        f |= tflags::SEND_DF;
    }
    if s.limits(e).status_payload() {
        f |= tflags::BLOCK_STAT_PAYLOAD;
    }
    if e.read_only {
        f |= tflags::READ_ONLY;
    } else {
        f |= tflags::SEND_FLUSH
            | tflags::SEND_FUA
            | tflags::SEND_TRIM
            | tflags::SEND_WRITE_ZEROES
            | tflags::SEND_FAST_ZERO;
    }
    f
}

enum Stream {
    Tcp(tokio::net::TcpStream, String),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> io::Result<Stream> {
    match l {
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            Ok(Stream::Tcp(s, peer.to_string()))
        }
        Listener::Unix(l) => Ok(Stream::Unix(l.accept().await?.0)),
    }
}

/// A byte stream a connection runs on: TCP, a Unix socket, a caller's stream, or any of
/// them under TLS.
trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for T {}

/// Where the connection stands with TLS during option haggling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tls {
    /// Not configured: `NBD_OPT_STARTTLS` is refused by policy.
    Off,
    /// Configured, not started: only `STARTTLS` (and `ABORT`) are accepted.
    Required,
    /// Running over TLS.
    On,
}

/// How option haggling ended.
enum Haggled {
    Go(Session),
    Abort,
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake comes next.
    StartTls,
}

/// The handshake's outcome with the stream the transmission phase runs on.
enum Negotiated<S> {
    Plain(Session, BufReader<S>),
    /// Boxed: a TLS session's state is over a kilobyte.
    Tls(Session, Box<BufReader<tokio_rustls::server::TlsStream<S>>>),
}

/// What the handshake settled.
struct Session {
    export: usize,
    mode: Mode,
    /// Indices into the export's contexts, in the order selected.
    contexts: Vec<usize>,
}

impl Session {
    fn new(export: usize, mode: Mode, selected: Option<(usize, Vec<usize>)>) -> Self {
        // Contexts selected for a different export do not apply to this one.
        let contexts = match selected {
            Some((e, c)) if e == export && mode >= Mode::Structured => c,
            _ => Vec::new(),
        };
        Session {
            export,
            mode,
            contexts,
        }
    }

    fn limits(&self, export: &Export) -> Limits {
        Limits {
            size: export.size,
            read_only: export.read_only,
            mode: self.mode,
            contexts: self.contexts.len(),
        }
    }
}

/// Replies are gathered up to about this many bytes before they are written.
const OUT_CHUNK: usize = 64 << 10;
/// Data at least this long is written from its own buffer instead of being copied into the
/// batch of replies.
const WRITE_DIRECT: usize = 16 << 10;
/// The input buffer grows by this much when it runs out of room.
const READ_CHUNK: usize = 64 << 10;

/// Appends a reply to the batch `out`; large data goes out directly (after the batch, to
/// keep the order). Returns the data buffer, done with, for reuse.
async fn queue_reply<W: AsyncWrite + Unpin>(
    out: &mut Vec<u8>,
    w: &mut W,
    head: Vec<u8>,
    data: IoBuf,
) -> Result<IoBuf> {
    out.extend_from_slice(&head);
    if data.len() < WRITE_DIRECT {
        out.extend_from_slice(&data);
        if out.len() < OUT_CHUNK {
            return Ok(data);
        }
    }
    let io = Error::io("writing replies");
    w.write_all(out).await.map_err(&io)?;
    out.clear();
    if data.len() >= WRITE_DIRECT {
        w.write_all(&data).await.map_err(&io)?;
    }
    Ok(data)
}

/// Read buffers a connection reuses. A fresh page-aligned buffer per read cost more than
/// the read for large ones: perf showed nbdcopy's 256 KiB reads spending most of the
/// server's time mapping, zeroing and faulting in new pages (glibc maps allocations that
/// large, and unmaps them on free). Reads fill every byte of their buffer, so a reused one
/// needs no zeroing.
#[derive(Default)]
struct BufPool {
    free: Vec<IoBuf>,
}

impl BufPool {
    /// Buffers kept: a connection's usual queue depth.
    const KEEP: usize = 32;
    /// Larger buffers are not kept.
    const MAX_LEN: usize = 4 << 20;

    fn get(&mut self, len: usize) -> IoBuf {
        match self.free.iter().rposition(|b| b.len() == len) {
            Some(i) => self.free.swap_remove(i),
            None => IoBuf::zeroed(len, BUF_ALIGN),
        }
    }

    /// Keeps `b` if it is one of ours (page-aligned, owned) and of a size worth keeping.
    fn put(&mut self, b: IoBuf) {
        if b.alignment() != BUF_ALIGN || b.is_empty() || b.len() > Self::MAX_LEN {
            return;
        }
        if self.free.len() == Self::KEEP {
            self.free.swap_remove(0);
        }
        self.free.push(b);
    }
}

/// What the parser found next in a connection's input.
enum Parsed {
    /// Not a whole request yet (or its payload is still arriving).
    NeedMore,
    /// A request to run, with its payload (empty unless it carries one).
    Request(proto::RequestHeader, Command, IoBuf),
    /// A request refused before it runs; its payload (if any) is being dropped.
    Refused(proto::RequestHeader, proto::Rejection),
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// A protocol violation: the connection ends once running requests are answered.
    Fatal(Error),
}

/// A request whose payload is read from the socket straight into its own buffer.
struct Pending {
    h: proto::RequestHeader,
    command: Command,
    buf: IoBuf,
    filled: usize,
}

/// A connection's input: bytes read and not yet parsed, the payload being read, and the
/// payload of a refused request still to drop.
struct Input {
    buf: Vec<u8>,
    pos: usize,
    header_len: usize,
    mode: Mode,
    skip: u64,
    pending: Option<Pending>,
}

impl Input {
    fn new(ahead: Vec<u8>, mode: Mode) -> Self {
        let mut buf = ahead;
        buf.reserve(READ_CHUNK);
        Input {
            buf,
            pos: 0,
            header_len: mode.request_len(),
            mode,
            skip: 0,
            pending: None,
        }
    }

    /// Whether a payload is being read or dropped: reading goes on whatever the limits.
    fn mid_payload(&self) -> bool {
        self.skip > 0
            || self
                .pending
                .as_ref()
                .is_some_and(|p| p.filled < p.buf.len())
    }

    fn consume_skip(&mut self) {
        let n = self.skip.min((self.buf.len() - self.pos) as u64);
        self.pos += n as usize;
        self.skip -= n;
    }

    /// Drops parsed bytes from the front once they are all or many.
    fn compact(&mut self) {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos >= READ_CHUNK {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }

    fn next(&mut self, limits: &Limits) -> Parsed {
        if let Some(p) = &self.pending {
            if p.filled < p.buf.len() {
                return Parsed::NeedMore;
            }
            let p = self.pending.take().expect("checked above");
            return Parsed::Request(p.h, p.command, p.buf);
        }
        self.consume_skip();
        if self.skip > 0 || self.buf.len() - self.pos < self.header_len {
            self.compact();
            return Parsed::NeedMore;
        }
        let raw = &self.buf[self.pos..self.pos + self.header_len];
        let h = match proto::decode_request(raw, self.mode) {
            Ok(h) => h,
            Err(e) => return Parsed::Fatal(e.into()),
        };
        self.pos += self.header_len;
        let command = match proto::validate(&h, limits) {
            Ok(Command::Disconnect) => return Parsed::Disconnect,
            Ok(c) => c,
            Err(rej) => {
                self.skip = u64::from(rej.skip);
                self.consume_skip();
                return Parsed::Refused(h, rej);
            }
        };
        let incoming = command.payload_len() as usize;
        if incoming == 0 {
            return Parsed::Request(h, command, no_data());
        }
        // Page-aligned, so that an O_DIRECT image takes the payload as it is.
        let mut buf = IoBuf::zeroed(incoming, BUF_ALIGN);
        let n = incoming.min(self.buf.len() - self.pos);
        buf[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        if n == incoming {
            return Parsed::Request(h, command, buf);
        }
        self.compact();
        self.pending = Some(Pending {
            h,
            command,
            buf,
            filled: n,
        });
        Parsed::NeedMore
    }

    /// Reads more from the client: into the pending payload, or into the input buffer
    /// (dropping a refused payload as it comes). `Ok(0)` is the end of the stream.
    /// Cancel-safe: bytes are only ever read into buffers this owns.
    async fn fill<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> io::Result<usize> {
        if let Some(p) = self.pending.as_mut().filter(|p| p.filled < p.buf.len()) {
            let n = r.read(&mut p.buf[p.filled..]).await?;
            p.filled += n;
            return Ok(n);
        }
        self.compact();
        if self.buf.capacity() - self.buf.len() < self.header_len {
            self.buf.reserve(READ_CHUNK);
        }
        let n = r.read_buf(&mut self.buf).await?;
        self.consume_skip();
        Ok(n)
    }
}

/// What request tasks of one connection share.
struct Conn {
    sh: Arc<Shared>,
    export: usize,
    /// Indices into the export's contexts, in the order selected.
    contexts: Vec<usize>,
    /// The export's size and permissions and the session's mode.
    limits: Limits,
}

/// Alignment of the buffers the server reads into and writes from: a page, which every
/// O_DIRECT device accepts.
const BUF_ALIGN: usize = 4096;

fn no_data() -> IoBuf {
    IoBuf::from_vec(Vec::new())
}

/// Holes shorter than this go out as data: a hole chunk costs a 20- or 32-byte header plus
/// 12 bytes, and splitting a read into many small chunks costs the client more than the
/// zeros it saves.
const MIN_HOLE: u64 = 512;

impl Conn {
    fn export(&self) -> &Export {
        &self.sh.exports[self.export]
    }

    fn reply(&self, h: &proto::RequestHeader) -> Reply {
        Reply::new(self.limits.mode, h.cookie, h.offset)
    }

    fn error_reply(&self, h: &proto::RequestHeader, errno: u32, msg: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        self.reply(h).error(&mut out, errno, msg);
        out
    }

    fn engine_error(&self, h: &proto::RequestHeader, e: &qcow2_async::Error) -> Vec<u8> {
        warn!(cookie = h.cookie, "request failed: {e}");
        self.error_reply(h, crate::errno_map::nbd_errno(e), &e.to_string())
    }

    /// The reply to a command that ran on the engine: its own, or the engine's error.
    fn answer(
        &self,
        h: &proto::RequestHeader,
        r: qcow2_async::Result<(Vec<u8>, IoBuf)>,
    ) -> (Vec<u8>, IoBuf) {
        r.unwrap_or_else(|e| (self.engine_error(h, &e), no_data()))
    }

    /// The reply to a command that returns no data.
    fn done(&self, h: &proto::RequestHeader, r: qcow2_async::Result<()>) -> (Vec<u8>, IoBuf) {
        self.answer(
            h,
            r.map(|()| {
                let mut out = Vec::with_capacity(32);
                self.reply(h).done(&mut out);
                (out, no_data())
            }),
        )
    }

    /// Runs one validated command; returns the reply header and data.
    async fn execute(
        &self,
        h: &proto::RequestHeader,
        c: Command,
        payload: IoBuf,
    ) -> (Vec<u8>, IoBuf) {
        let img = &self.sh.image;
        let fua = |fua: bool| async move {
            if fua {
                img.flush().await
            } else {
                Ok(())
            }
        };
        match c {
            Command::Read { offset, len, df } => {
                self.answer(h, self.read(h, offset, len, df, payload).await)
            }
            Command::Write { offset, fua: f, .. } => {
                // The payload buffer goes to the engine as it is.
                let r = match img.write_buf(payload, offset).await {
                    Ok(_) => fua(f).await,
                    Err(e) => Err(e),
                };
                self.done(h, r)
            }
            Command::Flush => self.done(h, img.flush().await),
            Command::Cache { offset, len } => {
                let r = self.prefetch(offset, len).await;
                self.done(h, r)
            }
            Command::Trim {
                offset,
                len,
                fua: f,
            } => {
                let r = if len == 0 {
                    Ok(())
                } else {
                    match img.discard(offset, len).await {
                        Ok(()) => fua(f).await,
                        Err(e) => Err(e),
                    }
                };
                self.done(h, r)
            }
            Command::WriteZeroes {
                offset,
                len,
                fua: f,
                no_hole,
                fast,
            } => {
                if fast && !self.zeroing_is_fast(offset, len) {
                    let msg =
                        "zeroing this range would write data (not cluster aligned, or a v2 image)";
                    return (self.error_reply(h, errno::ENOTSUP, msg), no_data());
                }
                let r = if len == 0 {
                    Ok(())
                } else {
                    match img.write_zeroes(offset, len, !no_hole).await {
                        Ok(()) => fua(f).await,
                        Err(e) => Err(e),
                    }
                };
                self.done(h, r)
            }
            Command::BlockStatus {
                offset,
                len,
                req_one,
            } => {
                let r = self.block_status(h, offset, len, req_one, &self.contexts);
                self.answer(h, r.await)
            }
            Command::BlockStatusFiltered {
                offset, req_one, ..
            } => match self.status_filter(h, offset, &payload) {
                Ok((len, wanted)) => {
                    let r = self.block_status(h, offset, len, req_one, &wanted);
                    self.answer(h, r.await)
                }
                Err(rej) => (self.error_reply(h, rej.errno, rej.reason), no_data()),
            },
            Command::Disconnect => (Vec::new(), no_data()),
        }
    }

    /// A read. Structured replies without `DF` leave out what reads as zeros without being
    /// stored (`OFFSET_HOLE` chunks, as qemu-nbd's sparse reads); the common case, a read of
    /// allocated data, is one data chunk whose buffer the engine filled in place.
    async fn read(
        &self,
        h: &proto::RequestHeader,
        offset: u64,
        len: u32,
        df: bool,
        buf: IoBuf,
    ) -> qcow2_async::Result<(Vec<u8>, IoBuf)> {
        let img = &self.sh.image;
        let reply = self.reply(h);
        debug_assert_eq!(buf.len(), len as usize);
        let sparse = self.limits.mode >= Mode::Structured && !df && len > 0;
        let (buf, holes) = match &self.export().source {
            Source::Live if sparse => img.read_buf_sparse(buf, offset).await?,
            // Live reads hand the reply buffer itself to the engine (no copy out of a bounce
            // buffer when the range is mapped); snapshot reads go through slices.
            Source::Live => (img.read_buf(buf, offset).await?, Vec::new()),
            Source::Snapshot(id) => {
                let mut buf = buf;
                img.read_snapshot_at(id, &mut buf, offset).await?;
                (buf, Vec::new())
            }
        };
        let holes: Vec<_> = holes
            .into_iter()
            .filter(|r| r.end - r.start >= MIN_HOLE)
            .collect();
        let mut head = Vec::with_capacity(32);
        if holes.is_empty() {
            // Everything is in memory: no error can follow, so one chunk is final.
            reply.read(&mut head, len);
            return Ok((head, buf));
        }
        // Data and holes in guest order; the last chunk is final.
        let end = offset + u64::from(len);
        let mut at = offset;
        let mut pieces: Vec<(u64, u64, bool)> = Vec::with_capacity(2 * holes.len() + 1);
        for r in &holes {
            if r.start > at {
                pieces.push((at, r.start, false));
            }
            pieces.push((r.start, r.end, true));
            at = r.end;
        }
        if at < end {
            pieces.push((at, end, false));
        }
        let data_bytes: u64 = pieces.iter().filter(|p| !p.2).map(|p| p.1 - p.0).sum();
        let mut out = Vec::with_capacity(data_bytes as usize + 32 * pieces.len());
        for (i, &(from, to, hole)) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            let n = (to - from) as u32;
            if hole {
                reply.hole(&mut out, last, from, n);
            } else {
                reply.data(&mut out, last, from, n);
                out.extend_from_slice(&buf[(from - offset) as usize..(to - offset) as usize]);
            }
        }
        Ok((out, no_data()))
    }

    /// `NBD_CMD_CACHE`: reads the range and drops the data, as qemu-nbd's prefetch does, so
    /// that its L2 tables (and, on a buffered open, its data) are cached for the reads that
    /// follow. One bounded buffer, whatever the length.
    async fn prefetch(&self, offset: u64, len: u64) -> qcow2_async::Result<()> {
        const PIECE: u64 = 1 << 20;
        let img = &self.sh.image;
        let mut buf = vec![0u8; len.min(PIECE) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(PIECE) as usize;
            match &self.export().source {
                Source::Live => img.read_at(&mut buf[..n], at).await?,
                Source::Snapshot(id) => img.read_snapshot_at(id, &mut buf[..n], at).await?,
            }
            at += n as u64;
        }
        Ok(())
    }

    /// `FAST_ZERO` promise: on a v3 image, zeroing whole clusters only changes L2 entries
    /// (the engine never writes zero data for them). Partial clusters and v2 images may
    /// need data written, so those get `ENOTSUP` and the client falls back.
    fn zeroing_is_fast(&self, offset: u64, len: u64) -> bool {
        let cs = self.sh.cluster;
        let end = offset + len;
        self.sh.version3 && offset % cs == 0 && (end % cs == 0 || end == self.export().size)
    }

    /// The effect length and contexts of a filtered block status: every id must be one the
    /// client selected (as qemu-nbd, which refuses the request otherwise). The reply keeps
    /// the selection's order.
    fn status_filter(
        &self,
        h: &proto::RequestHeader,
        offset: u64,
        payload: &[u8],
    ) -> std::result::Result<(u64, Vec<usize>), proto::Rejection> {
        let invalid = |reason| proto::Rejection {
            errno: errno::EINVAL,
            skip: 0,
            disconnect: false,
            reason,
        };
        let f = proto::decode_status_payload(payload).map_err(|m| invalid(m.0))?;
        if f.ids
            .iter()
            .any(|id| !self.contexts.contains(&(*id as usize)))
        {
            return Err(invalid(
                "block status names a context that was not selected",
            ));
        }
        proto::validate_status_range(offset, f.len, &self.limits)?;
        debug!(cookie = h.cookie, ids = ?f.ids, "filtered block status");
        let wanted = self
            .contexts
            .iter()
            .copied()
            .filter(|c| f.ids.contains(&(*c as u32)))
            .collect();
        Ok((f.len, wanted))
    }

    async fn block_status(
        &self,
        h: &proto::RequestHeader,
        offset: u64,
        len: u64,
        req_one: bool,
        contexts: &[usize],
    ) -> qcow2_async::Result<(Vec<u8>, IoBuf)> {
        let img = &self.sh.image;
        let len = len.min(BLOCK_STATUS_SPAN);
        let end = offset + len;
        let mut out = Vec::new();
        // Both allocation contexts come from one walk of the mapping.
        let mut map = None;
        for (k, &ci) in contexts.iter().enumerate() {
            let mut ext: Vec<Extent> = Vec::new();
            let context = &self.export().contexts[ci];
            if matches!(
                context,
                MetaContext::BaseAllocation | MetaContext::AllocationDepth
            ) && map.is_none()
            {
                map = Some(match &self.export().source {
                    Source::Live => img.map(offset, len).await?,
                    Source::Snapshot(id) => img.map_snapshot(id, offset, len).await?,
                });
            }
            match context {
                MetaContext::BaseAllocation => {
                    for e in map.iter().flatten() {
                        let mut flags = 0;
                        if !e.data {
                            flags |= proto::STATE_HOLE;
                        }
                        if e.zero {
                            flags |= proto::STATE_ZERO;
                        }
                        push_extent(&mut ext, e.length, flags);
                    }
                }
                MetaContext::AllocationDepth => {
                    // qemu-nbd: 0 where no layer allocates, else 1 for this image, 2 for its
                    // backing file, and so on (bdrv_is_allocated_above's depth); zeros past
                    // the end of a short backing file count as that layer's.
                    for e in map.iter().flatten() {
                        let depth = match (e.present, e.short_layer) {
                            (true, _) => e.depth + 1,
                            (false, Some(layer)) => layer + 1,
                            (false, None) => 0,
                        };
                        push_extent(&mut ext, e.length, depth);
                    }
                }
                MetaContext::DirtyBitmap(name) => {
                    let mut pos = offset;
                    for r in img.dirty_ranges(name, offset..end).await? {
                        if r.start > pos {
                            push_extent(&mut ext, r.start - pos, 0);
                        }
                        push_extent(&mut ext, r.end - r.start, proto::STATE_DIRTY);
                        pos = r.end;
                    }
                    if pos < end {
                        push_extent(&mut ext, end - pos, 0);
                    }
                }
            }
            ext.truncate(if req_one { 1 } else { MAX_DESCRIPTORS });
            if ext.is_empty() {
                // Cannot happen for a non-empty range, but the protocol needs a descriptor.
                push_extent(&mut ext, len, 0);
            }
            let last = k + 1 == contexts.len();
            self.reply(h).block_status(&mut out, last, ci as u32, &ext);
        }
        Ok((out, no_data()))
    }
}
