//! `qcow2`: qemu-img's verbs on the qcow2-async engine.
//!
//! Only the public engine API is used here. Spellings, option names, JSON field names and
//! exit codes follow qemu-img; where this tool is stricter (a shrink that would cut data)
//! the help text says so.

/// `println!` for the tool's output: when stdout is closed early (`qcow2 info | head`) the
/// process ends quietly with status 141, as it would by the SIGPIPE that Rust ignores,
/// instead of panicking in `println!`.
macro_rules! outln {
    ($($t:tt)*) => {
        $crate::write_out(format_args!($($t)*))
    };
}

mod bench;
mod chain;
mod check;
mod convert;
mod demo;
mod info;
mod opts;
mod progress;
mod serve;
mod snapshot;

use std::process::ExitCode;

/// Writes one line of output (see `outln!`).
pub(crate) fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("qcow2: writing the output: {e}");
        std::process::exit(1);
    }
}

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "qcow2",
    version,
    about = "qcow2 image tool on the qcow2-async engine (qemu-img compatible spellings)"
)]
struct Cli {
    #[command(subcommand)]
    verb: Verb,
    #[command(flatten)]
    keys: opts::KeyArgs,
    #[command(flatten)]
    share: opts::ShareArgs,
    #[command(flatten)]
    remote: opts::RemoteArgs,
}

#[derive(Subcommand)]
enum Verb {
    /// Show information about an image (like `qemu-img info`).
    Info(info::InfoArgs),
    /// Create an image (like `qemu-img create -f qcow2`).
    Create(info::CreateArgs),
    /// Check an image's metadata (like `qemu-img check`; exit 0 clean, 2 corrupt, 3 leaks).
    Check(check::CheckArgs),
    /// Show where every guest byte comes from (like `qemu-img map`).
    Map(check::MapArgs),
    /// Convert between qcow2 and raw, optionally compressed (like `qemu-img convert`).
    Convert(convert::ConvertArgs),
    /// Compare two images' guest view (like `qemu-img compare`; exit 0 same, 1 different).
    Compare(convert::CompareArgs),
    /// Internal snapshots: -l, -c, -a, -d (like `qemu-img snapshot`).
    Snapshot(snapshot::SnapshotArgs),
    /// Persistent dirty bitmaps (like `qemu-img bitmap`).
    Bitmap(snapshot::BitmapArgs),
    /// Change the virtual size (like `qemu-img resize`).
    Resize(chain::ResizeArgs),
    /// Merge an image into its backing file (like `qemu-img commit`).
    Commit(chain::CommitArgs),
    /// Change the backing file (like `qemu-img rebase`).
    Rebase(chain::RebaseArgs),
    /// Change image options in place (like `qemu-img amend`).
    Amend(chain::AmendArgs),
    /// Compute the file size an image needs (like `qemu-img measure`).
    Measure(convert::MeasureArgs),
    /// Measure I/O performance (qemu-img bench's knobs, plus --random and --read-percent).
    Bench(bench::BenchArgs),
    /// Run a built-in demo workload: a backing chain, many concurrent writers, verification.
    Demo(demo::DemoArgs),
    /// Export an image over NBD until SIGINT/SIGTERM (like `qemu-nbd`).
    Serve(serve::ServeArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("QCOW2_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = opts::load_secret(&cli.keys)
        .and_then(|()| opts::load_share(&cli.share))
        .and_then(|()| opts::load_remote(&cli.remote))
    {
        eprintln!("qcow2: {e}");
        return ExitCode::from(1);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Verb::Bench(a) = &cli.verb {
        if let Some(n) = a.workers {
            builder.worker_threads(n.max(1));
        }
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("qcow2: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async {
        match cli.verb {
            Verb::Info(a) => info::info(a).await,
            Verb::Create(a) => info::create(a).await,
            Verb::Check(a) => check::check(a).await,
            Verb::Map(a) => check::map(a).await,
            Verb::Convert(a) => convert::convert(a).await,
            Verb::Compare(a) => convert::compare(a).await,
            Verb::Snapshot(a) => snapshot::snapshot(a).await,
            Verb::Bitmap(a) => snapshot::bitmap(a).await,
            Verb::Resize(a) => chain::resize(a).await,
            Verb::Commit(a) => chain::commit(a).await,
            Verb::Rebase(a) => chain::rebase(a).await,
            Verb::Amend(a) => chain::amend(a).await,
            Verb::Measure(a) => convert::measure(a).await,
            Verb::Bench(a) => bench::bench(a).await,
            Verb::Demo(a) => demo::demo(a).await,
            Verb::Serve(a) => serve::serve(a).await,
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("qcow2: {e}");
            ExitCode::from(1)
        }
    }
}
