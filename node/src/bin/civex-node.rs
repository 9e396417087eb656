//! `civex-node --config node.toml`: the node daemon. Parses flags, loads and
//! validates the config before binding anything, sets up logs, and runs
//! [`civex_node::node::run`] until SIGTERM or ctrl-c.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// mimalloc: catch-up and publish spend much of their time allocating and
/// freeing small objects (decoded entries, sled nodes, gRPC frames), where
/// glibc's malloc was about a third of the CPU time of a catch-up.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A civex node: publishes this city's signed feed and replicates its peers'.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path of node.toml.
    #[arg(long, short, default_value = "node.toml")]
    config: PathBuf,
    /// Write the address actually bound (useful with port 0) to this file
    /// once the node listens.
    #[arg(long)]
    address_file: Option<PathBuf>,
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is
/// called, before anything binds, so a signal during start-up is not lost.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}

fn main() -> std::process::ExitCode {
    civex_node::allocator::tune();
    let ran = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(run()));
    match ran {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // One line: what failed and why, each cause once; no backtrace
            // (RUST_BACKTRACE is for panics, not for a refused config).
            eprintln!("civex-node: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = civex_node::config::Config::load(&args.config, std::env::vars())?;
    civex_node::node::init_logging(&config.log.format, &config.log.level);
    let security = civex_node::node::security(&config)?;
    civex_node::node::preflight(&config)?;
    let shutdown = shutdown_signal()?;
    let listener = civex_node::transport::bind(&config.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (listen in {})",
                config.listen,
                args.config.display()
            )
        })?;
    if let Some(path) = &args.address_file {
        let address = listener.local_addr()?.to_string();
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, format!("{address}\n"))
            .and_then(|()| std::fs::rename(&temporary, path))
            .with_context(|| format!("--address-file {}: cannot write", path.display()))?;
    }
    civex_node::node::run_secured(config, security, listener, shutdown).await?;
    Ok(())
}
