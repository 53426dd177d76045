//! `qcow2`: qemu-img's verbs on the qcow2-async engine.
//!
//! Only the public engine API is used here. Verbs whose engine feature has not landed yet are
//! not offered rather than half-implemented.

mod demo;
mod info;
mod serve;

use std::process::ExitCode;

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
}

#[derive(Subcommand)]
enum Verb {
    /// Show information about an image (like `qemu-img info`).
    Info(info::InfoArgs),
    /// Create an image (like `qemu-img create -f qcow2`).
    Create(info::CreateArgs),
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
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
