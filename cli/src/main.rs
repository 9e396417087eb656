//! `civex`: the admin CLI. Every command talks to a node over gRPC, except
//! `init`, `verify` and `restore` (files) and `demo`/`bench` (which start
//! nodes).

mod backup;
mod bench;
mod ca;
mod catalog;
mod client;
mod commands;
mod demo;
mod output;
mod region;
mod sdc_bench;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use output::Format;

/// mimalloc: catch-up and publish spend much of their time allocating and
/// freeing small objects (decoded entries, sled nodes, gRPC frames), where
/// glibc's malloc was about a third of the CPU time of a catch-up.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Operator identity for mutual TLS: a directory with ca.pem, cert.pem
    /// and key.pem, as made by `civex ca issue --operator NAME --out DIR`.
    #[arg(long, global = true, env = "CIVEX_IDENTITY")]
    identity: Option<PathBuf>,
    /// Talk plain gRPC, to a node with tls.mode = "insecure" (loopback).
    #[arg(long, global = true, env = "CIVEX_INSECURE")]
    insecure: bool,
    /// The origin the node's certificate must name: needed to publish
    /// indicators (their contributor counts go to that node and no other);
    /// otherwise any member node of the federation is accepted at --node.
    #[arg(long, global = true, env = "CIVEX_EXPECT_ORIGIN")]
    expect_origin: Option<String>,
    /// For a command that publishes: its idempotency key (32 hex digits),
    /// as a publish whose answer was lost printed it. The node then shows
    /// that publish's receipt if it was made, and makes it if not; a
    /// different request with it is refused. Without it, a fresh key.
    #[arg(long, global = true, value_name = "HEX")]
    idempotency_key: Option<String>,
    /// Output: a table for people, or JSON for scripts.
    #[arg(long, global = true, value_enum, default_value = "table")]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a node directory: node.toml, a feed key (mode 0600), and a
    /// TLS key with a certificate request for the federation admin.
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
        /// Join a federation: install its CA certificate (the file the
        /// admin gave you) as tls/ca.pem.
        #[arg(long, value_name = "CA_FILE", conflicts_with = "insecure_node")]
        join: Option<PathBuf>,
        /// A node for local experiments: plain gRPC on loopback, no TLS.
        #[arg(long = "insecure-node")]
        insecure_node: bool,
        /// An operator who may publish and administer this node: the name
        /// in their civex:operator:<name> certificate (repeatable).
        #[arg(long = "operator")]
        operators: Vec<String>,
    },
    /// The federation's certificate authority: create it, issue and revoke
    /// certificates.
    #[command(subcommand)]
    Ca(ca::CaCommand),
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
    /// Heads per origin, peers and their lag, conflicts on record (long
    /// lists are cut, saying how much is not shown).
    Status,
    /// The evidence of a conflict on record (a fork, or a feed started
    /// over; civex status lists them): both entries as the node received
    /// them, each signed by the origin's key, so anyone can check them.
    Conflict {
        /// The origin whose feed conflicts.
        origin: String,
    },
    /// Peers at runtime: add, remove, list (persisted and audited).
    #[command(subcommand)]
    Peer(commands::PeerCommand),
    /// Who changed what on the node, and when.
    Audit,
    /// The node's feed key.
    #[command(subcommand)]
    Key(KeyCommand),
    /// The federation roster (on the roster origin's node): members and
    /// their feed keys, as signed entries.
    #[command(subcommand)]
    Roster(commands::RosterCommand),
    /// The indicator catalog: list, show an indicator with its disclosure
    /// control, validate a city's own catalog file (local files only).
    #[command(subcommand)]
    Catalog(catalog::CatalogCommand),
    /// Write every entry the node holds (every origin, from seq 1) to a
    /// backup file, while the node runs. Keys are not in it.
    Backup {
        /// The backup file (written as FILE.part, renamed when whole).
        #[arg(long)]
        out: PathBuf,
    },
    /// Build a stopped node's store from a backup file: every entry is
    /// checked, then the whole store verified, before it is put in place.
    /// The data directory must be absent or empty.
    Restore {
        /// The node's node.toml (store directory and keys).
        #[arg(long, default_value = "node.toml")]
        config: PathBuf,
        /// The backup file, made by `civex backup`.
        file: PathBuf,
    },
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

/// `civex key ...`
#[derive(Subcommand)]
enum KeyCommand {
    /// Hand the feed to a new key made on the node: an entry signed by the
    /// current key names the new one. Peers follow it from the feed; their
    /// trusted_origins stay as they are. Back up the new key file.
    Rotate,
    /// After the feed key was lost (or leaked: move it away first), make a
    /// new one in the node's directory, offline. The federation's roster
    /// origin then names it (`civex roster replace-key`), and the feed goes
    /// on under it, with a new feed id, after the last entry the roster
    /// keeps; the history stays verifiable with the old keys.
    Replace {
        /// The node's config (names the key file).
        #[arg(long, default_value = "node.toml")]
        config: std::path::PathBuf,
        /// The feed's first key (hex), if `feed.pub` is lost too: the key
        /// the roster names for this origin.
        #[arg(long)]
        first_key: Option<String>,
    },
}

fn main() -> ExitCode {
    civex_node::allocator::tune();
    quiet_on_a_closed_pipe();
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(run()),
        Err(err) => {
            eprintln!("civex: cannot start the async runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `civex status | head -2`: once the reader has closed the pipe, printing
/// fails (Rust ignores SIGPIPE) and `println!` panics. End quietly then,
/// with the status a process killed by SIGPIPE has (128 + 13), as the
/// shell's other tools do; any other panic keeps its message.
fn quiet_on_a_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

async fn run() -> ExitCode {
    let Cli {
        node,
        identity,
        insecure,
        expect_origin,
        idempotency_key,
        output,
        command,
    } = Cli::parse();
    let result = match command {
        Command::Init {
            dir,
            origin,
            name,
            listen,
            join,
            insecure_node,
            operators,
        } => commands::init(
            &commands::InitOptions {
                dir: &dir,
                origin: &origin,
                name: &name,
                listen: &listen,
                join: join.as_deref(),
                insecure: insecure_node,
                operators: &operators,
            },
            output,
        ),
        Command::Ca(command) => ca::run(command, output),
        Command::Verify { config } => commands::verify(&config, output),
        Command::Restore { config, file } => backup::restore(&config, &file, output).await,
        Command::Key(KeyCommand::Replace { config, first_key }) => {
            commands::replace_lost_key(&config, first_key.as_deref(), output)
        }
        Command::Catalog(command) => catalog::run(command, output),
        Command::Demo { keep_running } => demo::run(keep_running, output).await,
        Command::Bench(args) => bench::run(args).await,
        talk => match client::Node::from_flags(
            &node,
            identity.as_deref(),
            insecure,
            expect_origin.as_deref(),
            idempotency_key.as_deref(),
        ) {
            Ok(node) => talk_to(&node, output, talk).await,
            Err(err) => Err(err),
        },
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("civex: {err:#}");
            // A script reading stdout gets a document too.
            if output == Format::Json {
                output::json(&serde_json::json!({ "error": format!("{err:#}") }));
            }
            ExitCode::FAILURE
        }
    }
}

/// Runs a command that talks to a node.
async fn talk_to(
    node: &client::Node,
    output: Format,
    command: Command,
) -> anyhow::Result<ExitCode> {
    node.check_insecure_origin().await?;
    let publishes = matches!(
        command,
        Command::Publish(_)
            | Command::Offer(_)
            | Command::Retract { .. }
            | Command::Key(KeyCommand::Rotate)
            | Command::Roster(_)
    );
    if node.idempotency_key.is_some() && !publishes {
        anyhow::bail!(
            "--idempotency-key: only for a command that publishes (this one publishes nothing)"
        );
    }
    match command {
        Command::Publish(command) => {
            node.require_expected(
                "publishing indicators sends the file's contributor counts to the node",
            )?;
            commands::publish(node, output, command).await
        }
        Command::Offer(command) => commands::offer(node, output, command).await,
        Command::Retract { seq, reason } => commands::retract(node, output, seq, reason).await,
        Command::Query(command) => commands::query(node, output, command).await,
        Command::Feed(command) => commands::feed(node, output, command).await,
        Command::Status => commands::status(node, output).await,
        Command::Conflict { origin } => commands::conflict(node, output, &origin).await,
        Command::Backup { out } => backup::backup(node, output, &out).await,
        Command::Peer(command) => commands::peer(node, output, command).await,
        Command::Audit => commands::audit(node, output).await,
        Command::Key(KeyCommand::Rotate) => commands::rotate_key(node, output).await,
        Command::Roster(command) => commands::roster(node, output, command).await,
        _ => unreachable!("commands that talk to no node are run by main"),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every environment variable a flag reads is one that loading a
    /// `node.toml` leaves alone (else `civex verify --config` or
    /// `civex-node`, run from a shell set up for the CLI, refuse to start).
    #[test]
    fn every_flag_variable_is_known_to_the_node_config() {
        fn collect(command: &clap::Command, names: &mut Vec<String>) {
            for arg in command.get_arguments() {
                if let Some(name) = arg.get_env() {
                    names.push(name.to_string_lossy().into_owned());
                }
            }
            for sub in command.get_subcommands() {
                collect(sub, names);
            }
        }
        let mut names = Vec::new();
        collect(&super::Cli::command(), &mut names);
        assert!(names.iter().any(|n| n == "CIVEX_NODE"), "{names:?}");
        for name in names {
            assert!(
                civex_node::config::CLIENT_VARIABLES.contains(&name.as_str()),
                "{name} is read by a civex flag but refused when node.toml is loaded"
            );
        }
    }
}
