//! `qcow2 serve`: exports an image over NBD (like `qemu-nbd`) or as a vhost-user-blk device
//! (like `qemu-storage-daemon --export type=vhost-user-blk`), until SIGINT or SIGTERM.

use std::path::PathBuf;

use clap::Args;
use qcow2_async::Image;
use qcow2_nbd::{ExportConfig, Listener, Server, ServerOptions, Source, TlsCredentials};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Where `serve` listens without `--socket` or `--bind` (loopback only, unlike qemu-nbd's
/// `0.0.0.0`: exposing a disk to the network should be a choice).
const DEFAULT_BIND: &str = "127.0.0.1:10809";

#[derive(Args)]
pub struct ServeArgs {
    /// Image file.
    filename: PathBuf,
    /// Image format (only qcow2).
    #[arg(short = 'f', long = "format", default_value = "qcow2")]
    format: String,
    /// Listen on this Unix socket (created; removed again on exit).
    #[arg(long, conflicts_with = "bind")]
    socket: Option<PathBuf>,
    /// Listen on this TCP address (default 127.0.0.1:10809).
    #[arg(long, value_name = "ADDR:PORT")]
    bind: Option<String>,
    /// Export read-only (the image is opened read-only).
    #[arg(long)]
    read_only: bool,
    /// Export name clients ask for (default: the empty, default export).
    #[arg(long, default_value = "")]
    export_name: String,
    /// Offer persistent bitmap NAME as metadata context `qemu:dirty-bitmap:NAME`
    /// (repeatable).
    #[arg(long, value_name = "NAME")]
    bitmap: Vec<String>,
    /// Export internal snapshot NAME (or id), read-only, instead of the live disk.
    #[arg(long, value_name = "NAME")]
    snapshot: Option<String>,
    /// A further export from the same server (repeatable; every export is listed by
    /// NBD_OPT_LIST, `nbdinfo --list`): `NAME=SNAPSHOT` serves internal snapshot SNAPSHOT
    /// (name or id) read-only as NAME; a bare `NAME` serves the live disk as NAME too, with
    /// the same --read-only and --bitmap choices as the main export.
    #[arg(
        long = "export",
        value_name = "NAME[=SNAPSHOT]",
        conflicts_with = "vhost_user_blk"
    )]
    exports: Vec<String>,
    /// `none` (O_DIRECT) or `writeback` (qemu-nbd's --cache).
    #[arg(long, default_value = "writeback")]
    cache: String,
    /// `io_uring` or `threads` (qemu-nbd's --aio).
    #[arg(long, default_value = "io_uring")]
    aio: String,
    /// Serve a vhost-user-blk device on this Unix socket instead of NBD (for QEMU's
    /// vhost-user-blk-pci, cloud-hypervisor, libblkio).
    #[arg(long, value_name = "SOCKET", conflicts_with_all = ["socket", "bind", "bitmap", "export_name"])]
    vhost_user_blk: Option<PathBuf>,
    /// Require TLS: X.509 credentials from DIR laid out as QEMU's tls-creds-x509
    /// (`server-cert.pem`, `server-key.pem`, and `ca-cert.pem` for --tls-verify-peer).
    /// Clients must send NBD_OPT_STARTTLS (qemu: `--object tls-creds-x509,...` and
    /// `tls-creds=ID`).
    #[arg(long, value_name = "DIR", conflicts_with = "vhost_user_blk")]
    tls_creds: Option<PathBuf>,
    /// Refuse clients without a certificate signed by DIR/ca-cert.pem.
    #[arg(long, requires = "tls_creds")]
    tls_verify_peer: bool,
    /// Request queues of the vhost-user-blk device (default: one per CPU).
    #[arg(long, value_name = "N", requires = "vhost_user_blk")]
    num_queues: Option<u16>,
    /// Serial number the vhost-user-blk device reports (up to 20 bytes).
    #[arg(long, requires = "vhost_user_blk", default_value = "")]
    serial: String,
}

pub async fn serve(a: ServeArgs) -> Result<u8> {
    if a.format != "qcow2" {
        return Err(format!("unsupported format '{}'", a.format).into());
    }
    // Bad credentials are reported before the image is opened (and locked).
    let tls = match &a.tls_creds {
        Some(dir) => Some(TlsCredentials::from_dir(dir, a.tls_verify_peer)?),
        None => None,
    };
    let read_only = a.read_only || a.snapshot.is_some();
    let mut opts = if read_only {
        crate::opts::ro()
    } else {
        crate::opts::rw()
    };
    opts.direct = match a.cache.as_str() {
        "none" | "directsync" => true,
        "writeback" | "writethrough" | "unsafe" => false,
        o => return Err(format!("invalid cache mode '{o}'").into()),
    };
    opts.aio = Some(match a.aio.as_str() {
        "io_uring" => qcow2_async::io::Aio::IoUring,
        "threads" => qcow2_async::io::Aio::Threads,
        o => return Err(format!("invalid aio '{o}' (io_uring or threads)").into()),
    });
    let img = crate::opts::open_image(&a.filename, &opts).await?;
    if let Some(sock) = &a.vhost_user_blk {
        return serve_vhost(&a, img, sock, read_only).await;
    }
    let live = |name: &str| {
        let mut e = ExportConfig::live(name);
        e.read_only = read_only;
        e.bitmaps = a.bitmap.clone();
        e
    };
    let snapshot = |name: &str, snap: &str| {
        let mut e = ExportConfig::live(name);
        e.source = Source::Snapshot(snap.to_owned());
        e.read_only = true;
        e
    };
    let mut exports = vec![match &a.snapshot {
        Some(snap) => snapshot(&a.export_name, snap),
        None => live(&a.export_name),
    }];
    for spec in &a.exports {
        exports.push(match spec.split_once('=') {
            Some((name, snap)) if !snap.is_empty() => snapshot(name, snap),
            Some(_) => return Err(format!("--export {spec}: no snapshot after '='").into()),
            None => live(spec),
        });
    }
    let names: Vec<String> = exports.iter().map(|e| format!("{:?}", e.name)).collect();
    let started = async {
        let mut opts = ServerOptions::default();
        opts.tls = tls;
        let server = Server::new(img.clone(), exports, opts).await?;
        let listener = match &a.socket {
            Some(p) => Listener::bind_unix(p)?,
            None => Listener::bind_tcp(a.bind.as_deref().unwrap_or(DEFAULT_BIND)).await?,
        };
        Ok::<_, qcow2_nbd::Error>((server, listener))
    };
    let (server, listener) = match started.await {
        Ok(s) => s,
        Err(e) => {
            img.close().await?;
            return Err(e.into());
        }
    };
    eprintln!(
        "qcow2: serving {} as export{} {} on {}{}",
        a.filename.display(),
        if names.len() > 1 { "s" } else { "" },
        names.join(", "),
        listener.local_addr()?,
        match (&a.tls_creds, a.tls_verify_peer) {
            (None, _) => "",
            (Some(_), false) => " (TLS required)",
            (Some(_), true) => " (TLS required, client certificates verified)",
        }
    );
    let srv = server.clone();
    let mut task = tokio::spawn(async move { srv.serve(listener).await });
    // Running requests finish and are answered before the connections close.
    let served = until_signal(&mut task, || server.shutdown()).await?;
    if let Some(p) = &a.socket {
        let _ = std::fs::remove_file(p);
    }
    drop(server);
    close_cleanly(img, served).await
}

/// Waits for `task` to end, or for SIGINT or SIGTERM; on a signal, calls `shutdown` (which
/// lets running requests finish) and then waits for `task`.
async fn until_signal<T>(
    task: &mut tokio::task::JoinHandle<T>,
    shutdown: impl FnOnce(),
) -> std::io::Result<std::result::Result<T, tokio::task::JoinError>> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = &mut *task => return Ok(r),
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    shutdown();
    Ok(task.await)
}

/// Closes the image (a clean close stores the bitmaps and clears the dirty bit) whatever
/// serving returned, then reports serving's error first.
async fn close_cleanly<E: std::error::Error + 'static>(
    img: Image,
    served: std::result::Result<std::result::Result<(), E>, tokio::task::JoinError>,
) -> Result<u8> {
    let closed = async {
        img.flush().await?;
        img.close().await
    }
    .await;
    served??;
    closed?;
    eprintln!("qcow2: image closed cleanly");
    Ok(0)
}

async fn serve_vhost(
    a: &ServeArgs,
    img: Image,
    sock: &std::path::Path,
    read_only: bool,
) -> Result<u8> {
    let mut o = qcow2_vhost::ExportOptions::new();
    o.read_only = read_only;
    o.snapshot = a.snapshot.clone();
    o.serial = a.serial.clone();
    if let Some(n) = a.num_queues {
        o.num_queues = n;
    }
    let export = match qcow2_vhost::Export::new(img.clone(), o).await {
        Ok(e) => e,
        Err(e) => {
            img.close().await?;
            return Err(e.into());
        }
    };
    let e = export.clone();
    let path = sock.to_owned();
    let mut task = tokio::spawn(async move { e.serve(path).await });
    eprintln!(
        "qcow2: serving {} as vhost-user-blk on {}",
        a.filename.display(),
        sock.display()
    );
    // Running requests finish and are answered before the frontend is let go.
    let served = until_signal(&mut task, || export.shutdown()).await?;
    drop(export);
    close_cleanly(img, served).await
}
