//! `civex`: the admin CLI. Every command talks to a node over gRPC, except
//! `init` and `verify` (files) and `demo`/`bench` (which start nodes).

mod bench;
mod client;
mod commands;
mod demo;
mod output;
mod region;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use output::Format;

/// civex: signed, replicated city indicators and shared-service offers.
#[derive(Parser)]
#[command(name = "civex", version)]
struct Cli {
    /// Node to talk to, host:port.
    #[arg(
        long,
        global = true,
        env = "CIVEX_NODE",
        default_value = "127.0.0.1:7400"
    )]
    node: String,
    /// Output: a table for people, or JSON for scripts.
    #[arg(long, global = true, value_enum, default_value = "table")]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a node directory: node.toml and a feed key (mode 0600).
    Init {
        /// Directory to create (must not hold a node already).
        dir: PathBuf,
        /// Origin id, [a-z0-9][a-z0-9-]{0,63}, e.g. br-ibge-3550308.
        #[arg(long)]
        origin: String,
        /// Display name of the city.
        #[arg(long, default_value = "")]
        name: String,
        /// Listen address written to node.toml.
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: String,
    },
    /// Publish into the node's feed.
    #[command(subcommand)]
    Publish(commands::PublishCommand),
    /// Shared-service offers: publish, withdraw, respond.
    #[command(subcommand)]
    Offer(commands::OfferCommand),
    /// Retract an earlier entry of the node's own feed.
    Retract {
        /// Seq of the entry.
        seq: u64,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Query observations and offers held by the node.
    #[command(subcommand)]
    Query(commands::QueryCommand),
    /// Follow feeds.
    #[command(subcommand)]
    Feed(commands::FeedCommand),
    /// Heads per origin, peers and their lag.
    Status,
    /// Re-verify every entry in a node's store (the node must be stopped).
    Verify {
        /// The node's node.toml (store directory and keys).
        #[arg(long, default_value = "node.toml")]
        config: PathBuf,
    },
    /// Start a demo region of city nodes on loopback and print a regional table.
    Demo {
        /// Leave the nodes running and print their addresses.
        #[arg(long)]
        keep_running: bool,
    },
    /// Measure this machine: Ed25519 ceiling, verify, durable publish, catch-up.
    Bench(bench::BenchArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Init {
            dir,
            origin,
            name,
            listen,
        } => commands::init(&dir, &origin, &name, &listen, cli.output),
        Command::Publish(command) => commands::publish(&cli.node, cli.output, command).await,
        Command::Offer(command) => commands::offer(&cli.node, cli.output, command).await,
        Command::Retract { seq, reason } => {
            commands::retract(&cli.node, cli.output, seq, reason).await
        }
        Command::Query(command) => commands::query(&cli.node, cli.output, command).await,
        Command::Feed(command) => commands::feed(&cli.node, cli.output, command).await,
        Command::Status => commands::status(&cli.node, cli.output).await,
        Command::Verify { config } => commands::verify(&config, cli.output),
        Command::Demo { keep_running } => demo::run(keep_running, cli.output).await,
        Command::Bench(args) => bench::run(args).await,
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("civex: {err:#}");
            ExitCode::FAILURE
        }
    }
}
