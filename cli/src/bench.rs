//! `civex bench`: what this machine does, measured in one run.
//!
//! 1. Ed25519 verify ceiling: strict single-signature checks on one core and
//!    on every core, and batch checks of 64 on every core.
//! 2. `civex verify` (the same audit code) over `--entries` stored entries
//!    of about 300 bytes.
//! 3. Catch-up: a fresh node replicates those entries from a node holding
//!    them, fully verified and durable, end to end over gRPC. Restore: a
//!    backup file of them restored into a fresh store (`civex restore`).
//! 4. Live replication of `--live-entries` entries from node A to node B
//!    (subscribed to A, over mTLS), in two variants: (a) published through
//!    A's gRPC Publish API, one `PublishIndicatorsStream` keeping
//!    `--in-flight` publishes unanswered (as NATS's bench keeps acks in
//!    flight); (b)
//!    replication alone: entries signed before the run stream into A's
//!    replication path at full speed from a stand-in source, A relays them.
//! 5. Durable publish: `--publishers` concurrent publishers, each waiting
//!    for its durable receipt before its next publish: unary calls, each
//!    publisher on its own connection, then sharing a few; then each on its
//!    own connection and publish stream. Then p50/p99 ack latency at a
//!    fixed `--rate`.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::anyhow;
use civex_node::{
    backup::{BackupWriter, RestoreStep},
    core::{
        feed::{Entry, Tip, GENESIS_PREV_HASH},
        index::records_of,
    },
    keys::{create_key_file, public_key_hex, KeyResolver},
    pki::Identity,
    store::{CommitBatch, Head, SledStore, Store},
    tls::{Tls, TlsFiles},
    transport::Security,
};
use civex_proto::v1::{
    self as pb, entry_body::Payload, publish_client::PublishClient, status_client::StatusClient,
    EntryBody,
};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tonic::{transport::Channel, Request, Response, Status};

use crate::{
    client,
    output::Progress,
    region::{node_status, start_region, wait_until, CitySpec, Federation},
};

/// Flags of `civex bench`.
#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    /// Entries for the verify and catch-up runs.
    #[arg(long, default_value_t = 1_000_000)]
    entries: u64,
    /// Entries of each live replication run.
    #[arg(long, default_value_t = 100_000)]
    live_entries: u64,
    /// Concurrent publishers in the throughput runs.
    #[arg(long, default_value_t = 64)]
    publishers: usize,
    /// Publishes the live run (a) keeps unanswered on its publish stream.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// Connections the publishers of the second throughput run share
    /// (the first gives each publisher its own); 0 skips that run.
    #[arg(long, default_value_t = 4)]
    shared_connections: usize,
    /// Publishes in the throughput run.
    #[arg(long, default_value_t = 40_000)]
    publishes: u64,
    /// Rate of the latency run, publishes per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds of the latency run.
    #[arg(long, default_value_t = 5)]
    latency_secs: u64,
    /// Districts and categories of the disclosure-control table.
    #[arg(long, default_value_t = 100)]
    sdc_size: usize,
    /// Where the stores go (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Which measurements to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "ceiling,verify,restore,catch-up,live,publish,sdc"
    )]
    parts: Vec<Part>,
}

/// One measurement of the bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Part {
    /// Ed25519 verification ceiling.
    Ceiling,
    /// `civex verify` over the stored entries.
    Verify,
    /// `civex restore` of a backup of the stored entries into a fresh store.
    Restore,
    /// Catch-up replication of the stored entries to a fresh node.
    CatchUp,
    /// Live replication: entries produced on node A, held verified and
    /// durable on node B, which is subscribed to A.
    Live,
    /// Durable publish throughput and ack latency.
    Publish,
    /// Disclosure control and its audit on a 100 x 100 table with margins.
    Sdc,
}

const ORIGINS: usize = 4;

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// Strict and batch Ed25519 verification rates (per second).
struct Ceiling {
    single_one_core: f64,
    single_all_cores: f64,
    batch_all_cores: f64,
}

fn ceiling() -> Ceiling {
    let key = SigningKey::from_bytes(&[7; 32]);
    let public = key.verifying_key();
    let messages: Vec<Vec<u8>> = (0..1024u32)
        .map(|i| {
            let mut m = b"civex/v1/entry\0".to_vec();
            m.extend(std::iter::repeat_n((i % 251) as u8, 236));
            m.extend_from_slice(&i.to_be_bytes());
            m
        })
        .collect();
    let signatures: Vec<Signature> = messages.iter().map(|m| key.sign(m)).collect();
    let window = Duration::from_millis(1500);
    let strict = |public: &VerifyingKey| {
        let started = Instant::now();
        let mut done = 0u64;
        while started.elapsed() < window {
            for (m, s) in messages.iter().zip(&signatures) {
                assert!(public.verify_strict(m, s).is_ok());
            }
            done += messages.len() as u64;
        }
        rate(done, started.elapsed())
    };
    let batch = |public: &VerifyingKey| {
        let keys = vec![*public; 64];
        let started = Instant::now();
        let mut done = 0u64;
        while started.elapsed() < window {
            for (ms, ss) in messages.chunks(64).zip(signatures.chunks(64)) {
                let refs: Vec<&[u8]> = ms.iter().map(Vec::as_slice).collect();
                assert!(ed25519_dalek::verify_batch(&refs, ss, &keys).is_ok());
            }
            done += messages.len() as u64;
        }
        rate(done, started.elapsed())
    };
    let single_one_core = strict(&public);
    let all = |f: &(dyn Fn(&VerifyingKey) -> f64 + Sync)| -> f64 {
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..cores()).map(|_| scope.spawn(|| f(&public))).collect();
            workers.into_iter().map(|w| w.join().unwrap_or(0.0)).sum()
        })
    };
    Ceiling {
        single_one_core,
        single_all_cores: all(&strict),
        batch_all_cores: all(&batch),
    }
}

/// The synthetic entry `seq` of `origin`'s benchmark feed (about 300
/// bytes signed), linked to `tip`.
fn bench_entry(
    key: &SigningKey,
    origin: &str,
    seq: u64,
    tip: Option<Tip>,
) -> anyhow::Result<Entry> {
    let s = seq;
    let body = EntryBody {
        origin: origin.into(),
        feed_id: vec![0x42; 16],
        seq: s,
        prev_hash: tip.map_or(GENESIS_PREV_HASH, |t| t.hash).to_vec(),
        time_unix_micros: 1_764_000_000_000_000 + s as i64,
        idempotency_key: (s as u128).to_be_bytes().to_vec(),
        payload: Some(Payload::Indicators(pb::IndicatorBatch {
            observations: vec![pb::Observation {
                indicator: format!("bench.indicator-{}", s % 97),
                catalog_edition: "bench".into(),
                area: (s % 7 + 1) as i32,
                ref_area: origin.into(),
                period: format!("{}-{:02}", 2000 + (s / 12) % 25, s % 12 + 1),
                value: Some(s as f64 / 7.0),
                unit: "count".into(),
                obs_status: 0,
                conf_status: 0,
                method_notes:
                    "synthetic benchmark entry, about three hundred bytes in all with its signature"
                        .into(),
                breakdown: String::new(),
                rules: 0,
            }],
            rules: vec![pb::DisclosureRules {
                name: "civex-sdc".into(),
                version: "2".into(),
                aggregation: "ratio".into(),
                ..Default::default()
            }],
            group: None,
            privacy: Vec::new(),
        })),
    };
    Ok(Entry::sign(key, body)?)
}

/// Signs `count` chained entries of about 300 bytes for `origin`, storing
/// them in `store` in commits of 4096, as replicated entries would be.
fn fill_origin(
    store: &SledStore,
    key: &SigningKey,
    origin: &str,
    count: u64,
    done: &AtomicU64,
) -> anyhow::Result<()> {
    let mut tip: Option<Tip> = None;
    let mut seq = 1;
    while seq <= count {
        let end = (seq + 4095).min(count);
        let mut run = Vec::with_capacity((end - seq + 1) as usize);
        for s in seq..=end {
            let entry = bench_entry(key, origin, s, tip)?;
            tip = Some(entry.tip());
            run.push(entry);
        }
        let last = tip.ok_or_else(|| anyhow!("empty run"))?;
        let batch = CommitBatch {
            index: run.iter().flat_map(records_of).collect(),
            runs: vec![run],
            heads: vec![(
                origin.to_owned(),
                Head {
                    tip: last,
                    received_unix_micros: 0,
                },
            )],
            idempotency: Vec::new(),
            conflicts: Vec::new(),
        };
        store.commit(&batch)?;
        done.fetch_add(end - seq + 1, Ordering::Relaxed);
        seq = end + 1;
    }
    Ok(())
}

fn entry_size_of_sample() -> usize {
    let dir = tempfile::tempdir().ok();
    let Some(dir) = dir else { return 0 };
    let Ok(store) = SledStore::open(dir.path(), 1 << 20) else {
        return 0;
    };
    let key = SigningKey::from_bytes(&[1; 32]);
    let done = AtomicU64::new(0);
    if fill_origin(&store, &key, "sample", 1, &done).is_err() {
        return 0;
    }
    store
        .entries("sample", 1, 1, usize::MAX)
        .ok()
        .and_then(|e| e.into_iter().next())
        .map_or(0, |e| e.body.len() + e.signature.len())
}

pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let temp = tempfile::Builder::new()
        .prefix("civex-bench-")
        .tempdir_in(args.dir.as_deref().unwrap_or(&std::env::temp_dir()))?;
    let root = temp.path();
    println!(
        "civex bench: {} cores, stores under {}",
        cores(),
        root.display()
    );

    let wants = |part| args.parts.contains(&part);
    if wants(Part::Sdc) {
        let size = args.sdc_size;
        tokio::task::spawn_blocking(move || crate::sdc_bench::run(size)).await??;
    }

    // 1. Ceiling.
    let ceiling = if wants(Part::Ceiling) || wants(Part::Verify) {
        let ceiling = tokio::task::spawn_blocking(ceiling).await?;
        println!(
        "ed25519 strict verify: {:.0}/s on one core, {:.0}/s on {} cores; batch of 64: {:.0}/s on {} cores",
        ceiling.single_one_core,
        ceiling.single_all_cores,
        cores(),
        ceiling.batch_all_cores,
        cores()
        );
        Some(ceiling)
    } else {
        None
    };
    if wants(Part::Verify) || wants(Part::Restore) || wants(Part::CatchUp) {
        source_runs(&args, root, ceiling.as_ref()).await?;
    }
    if wants(Part::Live) {
        live_runs(root, &args).await?;
    }
    if wants(Part::Publish) {
        publish_runs(root, &args).await?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Fills a source store, then measures verify and catch-up over it.
async fn source_runs(
    args: &BenchArgs,
    root: &Path,
    ceiling: Option<&Ceiling>,
) -> anyhow::Result<()> {
    // 2. A source store with `entries` entries over ORIGINS origins.
    let source_dir = root.join("source");
    std::fs::create_dir_all(&source_dir)?;
    let origin_keys: Vec<(String, SigningKey)> = (0..ORIGINS)
        .map(|i| {
            (
                format!("bench-city-{i}"),
                SigningKey::from_bytes(&[i as u8 + 10; 32]),
            )
        })
        .collect();
    let per_origin = args.entries / ORIGINS as u64;
    let total = per_origin * ORIGINS as u64;
    {
        let store = Arc::new(SledStore::open(&source_dir.join("data"), 256 << 20)?);
        let done = Arc::new(AtomicU64::new(0));
        let progress = Progress::new("signing and storing", total);
        let started = Instant::now();
        let workers: Vec<_> = origin_keys
            .iter()
            .cloned()
            .map(|(origin, key)| {
                let (store, done) = (store.clone(), done.clone());
                std::thread::spawn(move || fill_origin(&store, &key, &origin, per_origin, &done))
            })
            .collect();
        while workers.iter().any(|w| !w.is_finished()) {
            progress.set(done.load(Ordering::Relaxed));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow!("a fill thread panicked"))??;
        }
        progress.finish();
        println!(
            "prepared {total} signed entries of {} bytes in {:.1} s",
            entry_size_of_sample(),
            started.elapsed().as_secs_f64()
        );
        // A node that has served for a while has folded its query index;
        // this store was just filled by bulk commits. Fold it now, so the
        // source node does not fold it while it serves the catch-up (it
        // would compete for the cores and for sled's lock, which the two
        // in-process nodes share). Not measured.
        let folding = Instant::now();
        let folder = store.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            while folder.merge_index_pieces(64)? > 0 {}
            Ok(())
        })
        .await??;
        println!(
            "folded the source's query index in {:.1} s",
            folding.elapsed().as_secs_f64()
        );

        if let (true, Some(ceiling)) = (args.parts.contains(&Part::Verify), ceiling) {
            verify_part(store.clone(), &origin_keys, total, ceiling).await?;
        }
        if args.parts.contains(&Part::Restore) {
            restore_part(root, store, &origin_keys, total).await?;
        }
    }
    if args.parts.contains(&Part::CatchUp) {
        catch_up_part(root, &source_dir, &origin_keys, total).await?;
    }
    Ok(())
}

/// `civex verify`'s audit over the source store.
async fn verify_part(
    store: Arc<SledStore>,
    origin_keys: &[(String, SigningKey)],
    total: u64,
    ceiling: &Ceiling,
) -> anyhow::Result<()> {
    {
        let keys = source_keys(origin_keys);
        let started = Instant::now();
        let report = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || {
                civex_node::audit::audit(store.as_ref(), &keys, cores(), &|_| {})
            })
            .await??
        };
        let elapsed = started.elapsed();
        if !report.is_clean() || report.verified() != total {
            return Err(anyhow!(
                "verify found problems in the benchmark store: {:?}",
                report.origins
            ));
        }
        let verify_rate = rate(total, elapsed);
        println!(
            "verify: {total} entries, every link and every signature, in {:.1} s: {verify_rate:.0}/s = {:.0}% of the strict {}-core ceiling, {:.0}% of the batch ceiling",
            elapsed.as_secs_f64(),
            100.0 * verify_rate / ceiling.single_all_cores,
            cores(),
            100.0 * verify_rate / ceiling.batch_all_cores
        );
    }
    Ok(())
}

/// The keys that verify the source store.
fn source_keys(origin_keys: &[(String, SigningKey)]) -> KeyResolver {
    let own = SigningKey::from_bytes(&[99; 32]);
    let pinned = origin_keys
        .iter()
        .map(|(o, k)| (o.clone(), k.verifying_key()))
        .collect();
    KeyResolver::new("bench-source", own.verifying_key(), pinned)
}

/// A backup file of the source store (written from the store: `civex
/// backup` reads the same entries through a node's feed API), restored
/// into a fresh store as `civex restore` does, every signature checked.
async fn restore_part(
    root: &Path,
    store: Arc<SledStore>,
    origin_keys: &[(String, SigningKey)],
    total: u64,
) -> anyhow::Result<()> {
    let file = root.join("source.backup");
    let origins: Vec<String> = origin_keys.iter().map(|(o, _)| o.clone()).collect();
    let backup = file.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut writer = BackupWriter::create(&backup)?;
        for origin in &origins {
            let mut next = 1;
            loop {
                let page = store.entries(origin, next, 8192, usize::MAX)?;
                if page.is_empty() {
                    break;
                }
                next += page.len() as u64;
                for signed in &page {
                    writer.append(signed)?;
                }
            }
        }
        writer.finish()?;
        Ok(())
    })
    .await??;
    let size = std::fs::metadata(&file)?.len();
    let progress = Progress::new("restoring", total);
    let started = Instant::now();
    // When the last entry was written (the audit follows).
    let written = std::sync::Mutex::new(started);
    let restored = civex_node::backup::restore(
        &root.join("restored"),
        &file,
        "bench-source",
        None,
        Arc::new(source_keys(origin_keys)),
        256 << 20,
        &|step| {
            if let RestoreStep::Written(done) = step {
                progress.set(done);
                if let Ok(mut at) = written.lock() {
                    *at = Instant::now();
                }
            }
        },
    )
    .await?;
    progress.finish();
    let elapsed = started.elapsed();
    let writing = written
        .lock()
        .map_or(elapsed, |at| at.duration_since(started));
    if restored.report.verified() != total {
        return Err(anyhow!(
            "the restore verified {} of {total} entries",
            restored.report.verified()
        ));
    }
    println!(
        "restore: a backup of {total} entries ({size} bytes) into a fresh store, every link and \
         every signature checked, durable, in {:.1} s: {:.0}/s (written, links checked, in {:.1} s; \
         then every signature in {:.1} s)",
        elapsed.as_secs_f64(),
        rate(total, elapsed),
        writing.as_secs_f64(),
        (elapsed - writing).as_secs_f64()
    );
    std::fs::remove_dir_all(root.join("restored"))?;
    std::fs::remove_file(&file)?;
    Ok(())
}

/// 3. Catch-up: the source store behind a node, a fresh node replicating it.
async fn catch_up_part(
    root: &Path,
    source_dir: &Path,
    origin_keys: &[(String, SigningKey)],
    total: u64,
) -> anyhow::Result<()> {
    create_key_file(&source_dir.join("feed.key"))?;
    let elapsed = catch_up(root, source_dir, origin_keys, total).await?;
    println!(
        "catch-up: {total} entries verified and durable on a fresh node in {:.1} s: {:.0}/s",
        elapsed.as_secs_f64(),
        rate(total, elapsed)
    );
    Ok(())
}

async fn catch_up(
    root: &Path,
    source_dir: &Path,
    origin_keys: &[(String, SigningKey)],
    total: u64,
) -> anyhow::Result<Duration> {
    let federation = Federation::create(root)?;
    let source_listener = civex_node::transport::bind("127.0.0.1:0").await?;
    let source_address = source_listener.local_addr()?.to_string();
    let source = federation.client(&source_address);
    let trusted: Vec<(String, VerifyingKey)> = origin_keys
        .iter()
        .map(|(o, k)| (o.clone(), k.verifying_key()))
        .collect();
    let write = |dir: &Path, origin: &str, address: &str, peers: &[BenchPeer<'_>]| {
        bench_config(&federation, dir, origin, address, &trusted, peers)
    };
    let dest_dir = root.join("dest");
    std::fs::create_dir_all(&dest_dir)?;
    let dest_key = create_key_file(&dest_dir.join("feed.key"))?;
    // The source admits the destination's subscription: it knows its key.
    let source_config = bench_config(
        &federation,
        source_dir,
        "bench-source",
        &source_address,
        &[
            trusted.clone(),
            vec![("bench-dest".to_owned(), dest_key.verifying_key())],
        ]
        .concat(),
        &[],
    )?;
    let (stop_source, source_stopped) = tokio::sync::oneshot::channel::<()>();
    let source_task = tokio::spawn(civex_node::node::run(
        source_config,
        source_listener,
        async move {
            let _ = source_stopped.await;
        },
    ));
    wait_until("the source node", Duration::from_secs(30), || async {
        node_status(&source).await.is_some()
    })
    .await?;

    let dest_listener = civex_node::transport::bind("127.0.0.1:0").await?;
    let dest_address = dest_listener.local_addr()?.to_string();
    let dest = federation.client(&dest_address);
    let dest_config = write(
        &dest_dir,
        "bench-dest",
        &dest_address,
        &[BenchPeer {
            name: "source",
            address: &source_address,
            origin: "bench-source",
        }],
    )?;
    let progress = Progress::new("catch-up", total);
    let (stop_dest, dest_stopped) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let dest_task = tokio::spawn(civex_node::node::run(
        dest_config,
        dest_listener,
        async move {
            let _ = dest_stopped.await;
        },
    ));
    // One status connection, one call per poll for every origin: a new
    // mutual-TLS connection per origin every 20 ms (as before) cost the
    // two cores about 200 handshakes a second during the measurement.
    let mut status: Option<StatusClient<Channel>> = None;
    let mut held = 0;
    while held < total {
        if status.is_none() {
            status = client::status(&dest).await.ok();
        }
        if let Some(client) = status.as_mut() {
            match client.node_status(pb::NodeStatusRequest {}).await {
                Ok(answer) => {
                    held = answer
                        .into_inner()
                        .heads
                        .iter()
                        .filter(|h| origin_keys.iter().any(|(o, _)| *o == h.origin))
                        .map(|h| h.seq)
                        .sum();
                }
                Err(_) => status = None,
            }
        }
        progress.set(held);
        if started.elapsed() > Duration::from_secs(1800) {
            return Err(anyhow!(
                "catch-up did not finish in 30 minutes ({held} of {total})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    progress.finish();
    // The feed is caught up; the query index of bulk commits folds next.
    let folding = Instant::now();
    wait_until(
        "the query index to fold",
        Duration::from_secs(1800),
        || async {
            node_status(&dest)
                .await
                .is_some_and(|s| s.index_pieces_pending == 0)
        },
    )
    .await?;
    println!(
        "query index folded {:.1} s after catch-up ({:.0} entries/s with the index)",
        folding.elapsed().as_secs_f64(),
        rate(total, started.elapsed())
    );
    let _ = stop_dest.send(());
    let _ = stop_source.send(());
    dest_task.await??;
    source_task.await??;
    Ok(elapsed)
}

/// A peer of a benchmark node: name, address, the origin its certificate names.
struct BenchPeer<'a> {
    name: &'a str,
    address: &'a str,
    origin: &'a str,
}

/// Writes `dir/node.toml` for a benchmark node (warn logs, a 1 GiB cache,
/// `trusted` pinned, `peers` to subscribe to), issues its certificate, and
/// loads it.
fn bench_config(
    federation: &Federation,
    dir: &Path,
    origin: &str,
    address: &str,
    trusted: &[(String, VerifyingKey)],
    peers: &[BenchPeer<'_>],
) -> anyhow::Result<civex_node::config::Config> {
    let trusted: String = trusted
        .iter()
        .map(|(o, k)| format!("\"{o}\" = \"{}\"\n", public_key_hex(k)))
        .collect();
    let peers: String = peers
        .iter()
        .map(|p| {
            format!(
                "\n[[peers]]\nname = \"{}\"\naddress = \"{}\"\norigin = \"{}\"\n",
                p.name, p.address, p.origin
            )
        })
        .collect();
    let operators = [crate::region::OPERATOR.to_owned()];
    let text = civex_node::config::template_with_operators(origin, origin, address, &operators)
        .replace(
            "[trusted_origins]\n",
            &format!("[trusted_origins]\n{trusted}"),
        )
        .replace("level = \"info\"", "level = \"warn\"")
        .replace("cache_mb = 64", "cache_mb = 1024")
        .replace("allow_without_peers = false", "allow_without_peers = true")
        + &peers;
    let path = dir.join("node.toml");
    std::fs::write(&path, text)?;
    federation.equip(dir, origin)?;
    Ok(civex_node::config::Config::load(&path, std::iter::empty())?)
}

/// The indicator row publish number `n` of a benchmark run: one entry of
/// about 300 bytes once signed.
fn indicator_request(key_prefix: &[u8], origin: &str, n: u64) -> pb::PublishIndicatorsRequest {
    pb::PublishIndicatorsRequest {
        idempotency_key: [&key_prefix[..8], &n.to_be_bytes()[..]].concat(),
        rows: vec![pb::IndicatorRow {
            // Greenhouse gas emissions per capita (ISO 37120:2014 8.3, a
            // public figure: one rule set parameter) of 50 different years:
            // an entry of about 300 bytes.
            indicator: "8.3".into(),
            catalog_edition: "iso37120:2014".into(),
            area: 0,
            ref_area: origin.into(),
            period: (1976 + n % 50).to_string(),
            value: n as f64,
            unit: String::new(),
            obs_status: 0,
            method_notes: "bench".into(),
            ..Default::default()
        }],
    }
}

/// How the publishers of a throughput run reach the node.
#[derive(Clone, Copy)]
enum Calls {
    /// Unary calls over this many connections, shared round robin.
    Unary(usize),
    /// Each publisher on its own connection and publish stream.
    Streams,
}

/// Publishes requests 0..`count` through `publishers` concurrent clients,
/// each waiting for its durable receipt before its next publish.
fn spawn_publishers<R>(
    node: &client::Node,
    publishers: usize,
    calls: Calls,
    count: u64,
    request: R,
    progress: Option<Arc<Progress>>,
) -> anyhow::Result<Vec<JoinHandle<anyhow::Result<()>>>>
where
    R: Fn(u64) -> pb::PublishIndicatorsRequest + Clone + Send + 'static,
{
    let publishers = publishers.max(1);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    // One channel per connection (a channel multiplexes concurrent calls
    // over its one HTTP/2 connection).
    let connections = match calls {
        Calls::Unary(connections) => connections.clamp(1, publishers),
        Calls::Streams => publishers,
    };
    let channels = (0..connections)
        .map(|_| client::publish(node))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for i in 0..publishers {
        let (mut publisher, next, progress, request) = (
            channels[i % channels.len()].clone(),
            next.clone(),
            progress.clone(),
            request.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut stream = match calls {
                Calls::Unary(_) => None,
                Calls::Streams => Some(open_publish_stream(&mut publisher, 1).await?),
            };
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= count {
                    return Ok(());
                }
                match &mut stream {
                    None => {
                        publisher
                            .publish_indicators(request(n))
                            .await
                            .map_err(|s| anyhow!("publish failed: {}", s.message()))?;
                    }
                    Some((requests, receipts)) => {
                        requests
                            .send(request(n))
                            .await
                            .map_err(|_| anyhow!("the publish stream closed"))?;
                        receipts
                            .message()
                            .await
                            .map_err(|s| anyhow!("publish failed: {}", s.message()))?
                            .ok_or_else(|| anyhow!("the publish stream ended"))?;
                    }
                }
                if let (0, Some(progress)) = (n % 1000, &progress) {
                    progress.set(n);
                }
            }
        }));
    }
    Ok(tasks)
}

/// Opens a `PublishIndicatorsStream`: the sender of its requests (at most
/// `capacity` waiting to go out) and its receipts.
async fn open_publish_stream(
    publisher: &mut PublishClient<Channel>,
    capacity: usize,
) -> anyhow::Result<(
    mpsc::Sender<pb::PublishIndicatorsRequest>,
    tonic::Streaming<pb::Receipt>,
)> {
    let (requests, stream) = mpsc::channel(capacity);
    let receipts = publisher
        .publish_indicators_stream(tokio_stream::wrappers::ReceiverStream::new(stream))
        .await
        .map_err(|s| anyhow!("publish stream failed: {}", s.message()))?
        .into_inner();
    Ok((requests, receipts))
}

/// Publishes requests 0..`count` over one `PublishIndicatorsStream`,
/// sending a request only while fewer than `in_flight` are unanswered, and
/// checks that every receipt came back, in order.
async fn stream_publish<R>(
    node: client::Node,
    count: u64,
    in_flight: usize,
    request: R,
) -> anyhow::Result<()>
where
    R: Fn(u64) -> pb::PublishIndicatorsRequest + Send + 'static,
{
    let mut publisher = client::publish(&node)?;
    let window = Arc::new(tokio::sync::Semaphore::new(in_flight.max(1)));
    let (requests, mut receipts) = open_publish_stream(&mut publisher, in_flight.max(1)).await?;
    let sender = {
        let window = window.clone();
        tokio::spawn(async move {
            for n in 0..count {
                window.acquire().await?.forget();
                if requests.send(request(n)).await.is_err() {
                    break;
                }
            }
            anyhow::Ok(())
        })
    };
    let received = async {
        let (mut last_seq, mut received) = (0, 0);
        while let Some(receipt) = receipts
            .message()
            .await
            .map_err(|s| anyhow!("publish stream failed: {}", s.message()))?
        {
            if receipt.seq <= last_seq {
                return Err(anyhow!(
                    "receipt of seq {} after seq {last_seq}",
                    receipt.seq
                ));
            }
            (last_seq, received) = (receipt.seq, received + 1);
            window.add_permits(1);
        }
        Ok(received)
    }
    .await;
    // The sender stops waiting for room if the stream ended early.
    window.close();
    let received = received?;
    if received != count {
        return Err(anyhow!(
            "the publish stream ended after {received} of {count} receipts"
        ));
    }
    sender.await?
}

/// A node run in-process by the live runs.
struct LiveNode {
    client: client::Node,
    status: Option<StatusClient<Channel>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), civex_node::node::NodeError>>>,
}

impl LiveNode {
    /// Starts `civex_node::node::run` on `listener` and waits until it
    /// answers status calls.
    async fn start(
        federation: &Federation,
        config: civex_node::config::Config,
        listener: tokio::net::TcpListener,
    ) -> anyhow::Result<Self> {
        let client = federation.client(&listener.local_addr()?.to_string());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(civex_node::node::run(config, listener, async move {
            let _ = stopped.await;
        }));
        let mut node = Self {
            client,
            status: None,
            stop: Some(stop),
            task: Some(task),
        };
        let probe = node.client.clone();
        wait_until("a live-run node", Duration::from_secs(30), || async {
            node_status(&probe).await.is_some()
        })
        .await?;
        // One connection for every later poll.
        node.status = Some(client::status(&node.client).await?);
        Ok(node)
    }

    /// The node's status, through its kept connection.
    async fn status(&mut self) -> anyhow::Result<pb::NodeStatusResponse> {
        let status = self
            .status
            .as_mut()
            .ok_or_else(|| anyhow!("no status connection"))?;
        Ok(status
            .node_status(pb::NodeStatusRequest {})
            .await
            .map_err(|s| anyhow!("node status failed: {}", s.message()))?
            .into_inner())
    }

    /// Waits until the node's first peer has an open subscription stream.
    async fn wait_subscribed(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = self.status().await?;
            if status.peers.first().is_some_and(|p| p.connected) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(anyhow!(
                    "the node did not subscribe to its peer in 30 s: {:?}",
                    status.peers.first().map(|p| &p.last_error)
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Verified and durable seq held for `origin` (the writer's durable heads).
    async fn held(&mut self, origin: &str) -> anyhow::Result<u64> {
        Ok(self
            .status()
            .await?
            .heads
            .into_iter()
            .find(|h| h.origin == origin)
            .map_or(0, |h| h.seq))
    }

    async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.status = None;
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }
}

/// When the entries reached each node of a live run.
struct Arrival {
    /// All `count` held verified and durable on the relaying node A.
    on_a: Duration,
    /// All held verified and durable on the subscriber B: the end to end time.
    on_b: Duration,
}

/// Polls A and B every 5 ms (durable heads, through kept connections) until
/// B holds `count` entries of `origin`, timing from `started`. `producer`
/// is the task producing the entries; its failure ends the wait.
async fn follow(
    a: &mut LiveNode,
    b: &mut LiveNode,
    origin: &str,
    count: u64,
    started: Instant,
    mut producer: JoinHandle<anyhow::Result<()>>,
    progress: &Progress,
) -> anyhow::Result<Arrival> {
    let limit = Duration::from_secs(120 + count / 1000);
    let mut on_a = None;
    let mut produced = false;
    loop {
        if !produced && producer.is_finished() {
            (&mut producer).await??;
            produced = true;
        }
        if on_a.is_none() && a.held(origin).await? >= count {
            on_a = Some(started.elapsed());
        }
        let held = b.held(origin).await?;
        progress.set(held);
        if held >= count {
            let on_b = started.elapsed();
            if !produced {
                producer.await??;
            }
            return Ok(Arrival {
                on_a: on_a.unwrap_or(on_b),
                on_b,
            });
        }
        if started.elapsed() > limit {
            let last_error = |status: pb::NodeStatusResponse| {
                status
                    .peers
                    .first()
                    .map(|p| p.last_error.clone())
                    .unwrap_or_default()
            };
            return Err(anyhow!(
                "live replication did not finish in {limit:?} ({held} of {count} on B; \
                 A's peer error: {:?}, B's peer error: {:?})",
                last_error(a.status().await?),
                last_error(b.status().await?)
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Average size (body and signature) of the first entries of `origin` that
/// `node` serves, read through a subscription.
async fn served_entry_size(node: &client::Node, origin: &str) -> anyhow::Result<usize> {
    let mut stream = client::subscribe_from_start(node, &[origin.to_owned()]).await?;
    while let Some(message) = stream
        .message()
        .await
        .map_err(|s| anyhow!("subscription failed: {}", s.message()))?
    {
        if let Some(pb::subscribe_response::Event::Entries(batch)) = message.event {
            let bytes: usize = batch
                .entries
                .iter()
                .map(|e| e.body.len() + e.signature.len())
                .sum();
            return Ok(bytes / batch.entries.len().max(1));
        }
    }
    Err(anyhow!("{origin}: no entries served"))
}

/// 4. Live replication, both variants.
async fn live_runs(root: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    live_publish(
        &root.join("live-publish"),
        args.live_entries,
        args.in_flight,
    )
    .await?;
    live_relay(&root.join("live-relay"), args.live_entries).await
}

/// Live (a): entries published through node A's gRPC Publish API, over one
/// publish stream with `in_flight` publishes unanswered (A validates, signs
/// and commits each durably before its receipt), while node B, subscribed
/// to A over mTLS, verifies and stores them.
async fn live_publish(root: &Path, count: u64, in_flight: usize) -> anyhow::Result<()> {
    const A: &str = "bench-live-a";
    const B: &str = "bench-live-b";
    let federation = Federation::create(root)?;
    let (a_dir, b_dir) = (root.join(A), root.join(B));
    std::fs::create_dir_all(&a_dir)?;
    std::fs::create_dir_all(&b_dir)?;
    let a_key = create_key_file(&a_dir.join("feed.key"))?;
    let b_key = create_key_file(&b_dir.join("feed.key"))?;
    let a_listener = civex_node::transport::bind("127.0.0.1:0").await?;
    let a_address = a_listener.local_addr()?.to_string();
    let b_listener = civex_node::transport::bind("127.0.0.1:0").await?;
    let b_address = b_listener.local_addr()?.to_string();
    // A admits B's subscription: it knows B's key.
    let a_config = bench_config(
        &federation,
        &a_dir,
        A,
        &a_address,
        &[(B.to_owned(), b_key.verifying_key())],
        &[],
    )?;
    let b_config = bench_config(
        &federation,
        &b_dir,
        B,
        &b_address,
        &[(A.to_owned(), a_key.verifying_key())],
        &[BenchPeer {
            name: A,
            address: &a_address,
            origin: A,
        }],
    )?;
    let mut a = LiveNode::start(&federation, a_config, a_listener).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !a.status().await?.publish_ready {
        if Instant::now() > deadline {
            return Err(anyhow!("node A did not open publishing in 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut b = LiveNode::start(&federation, b_config, b_listener).await?;
    // B is subscribed to A, and caught up: A holds nothing yet.
    b.wait_subscribed().await?;

    let key_prefix = client::idempotency_key()?;
    let request = move |n: u64| indicator_request(&key_prefix, A, n);
    let progress = Progress::new("live replication (publish API)", count);
    let started = Instant::now();
    let producer = tokio::spawn(stream_publish(a.client.clone(), count, in_flight, request));
    let arrival = follow(&mut a, &mut b, A, count, started, producer, &progress).await?;
    progress.finish();
    let size = served_entry_size(&a.client, A).await?;
    println!(
        "live replication (a) through the publish API: {count} entries of {size} bytes published on node A over one publish stream \
         with {in_flight} publishes unanswered (gRPC PublishIndicatorsStream, mTLS; A validates, signs and commits each durably \
         before its receipt), replicated over mTLS to node B, \
         which verifies and commits them durably: all held on B {:.1} s after the first publish: {:.0}/s end to end \
         (A held all, durable and acked, at {:.1} s: {:.0}/s)",
        arrival.on_b.as_secs_f64(),
        rate(count, arrival.on_b),
        arrival.on_a.as_secs_f64(),
        rate(count, arrival.on_a),
    );
    b.stop().await?;
    a.stop().await?;
    Ok(())
}

/// A stand-in for an origin's node: serves a feed of entries signed before
/// the run from memory, as fast as the subscriber reads, once `go` turns
/// true; every other origin asked for is reported drained at seq 0.
struct SourceFeed {
    origin: String,
    entries: Arc<Vec<pb::SignedEntry>>,
    head: pb::Head,
    go: watch::Receiver<bool>,
}

type SourceStream = tokio_stream::wrappers::ReceiverStream<Result<pb::SubscribeResponse, Status>>;

#[tonic::async_trait]
impl pb::feed_server::Feed for SourceFeed {
    type SubscribeStream = SourceStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<SourceStream>, Status> {
        use pb::subscribe_response::Event;
        let event = |event| Ok(pb::SubscribeResponse { event: Some(event) });
        let cursors = request.into_inner().cursors;
        // As many messages in flight as a node allows a subscriber.
        let (tx, rx) = mpsc::channel(4);
        let (origin, entries, mut go) =
            (self.origin.clone(), self.entries.clone(), self.go.clone());
        tokio::spawn(async move {
            let mut from = None;
            for cursor in cursors {
                if cursor.origin == origin {
                    from = Some(cursor.seq as usize);
                    continue;
                }
                let drained = pb::BacklogDrained {
                    origin: cursor.origin,
                    head_seq: 0,
                };
                if tx.send(event(Event::Drained(drained))).await.is_err() {
                    return;
                }
            }
            if let Some(mut next) = from {
                if go.wait_for(|go| *go).await.is_err() {
                    return;
                }
                // At most 1,024 entries per message, as a node sends them.
                while next < entries.len() {
                    let end = (next + 1024).min(entries.len());
                    let batch = pb::EntryBatch {
                        origin: origin.clone(),
                        entries: entries[next..end].to_vec(),
                    };
                    if tx.send(event(Event::Entries(batch))).await.is_err() {
                        return;
                    }
                    next = end;
                }
                let drained = pb::BacklogDrained {
                    origin,
                    head_seq: entries.len() as u64,
                };
                if tx.send(event(Event::Drained(drained))).await.is_err() {
                    return;
                }
            }
            tx.closed().await;
        });
        Ok(Response::new(SourceStream::new(rx)))
    }

    async fn heads(
        &self,
        _request: Request<pb::HeadsRequest>,
    ) -> Result<Response<pb::HeadsResponse>, Status> {
        Ok(Response::new(pb::HeadsResponse {
            heads: vec![self.head.clone()],
            next_page_token: String::new(),
        }))
    }
}

/// Live (b): replication alone. Node A cannot be handed entries of its own
/// feed from outside `node::run` (its writer is private to it), so A relays
/// an origin it replicates: a source serves pre-signed entries of origin C
/// from memory at full speed, A verifies and commits them durably and serves
/// them to B, which verifies and commits them durably.
async fn live_relay(root: &Path, count: u64) -> anyhow::Result<()> {
    const C: &str = "bench-relay-c";
    const A: &str = "bench-relay-a";
    const B: &str = "bench-relay-b";
    let federation = Federation::create(root)?;
    let c_key = SigningKey::from_bytes(&[77; 32]);

    // Signed before the clock starts: one origin signs serially, each entry
    // naming the previous hash.
    let signing = Instant::now();
    let entries = {
        let key = c_key.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Entry>> {
            let mut tip = None;
            let mut entries = Vec::with_capacity(count as usize);
            for seq in 1..=count {
                let entry = bench_entry(&key, C, seq, tip)?;
                tip = Some(entry.tip());
                entries.push(entry);
            }
            Ok(entries)
        })
        .await??
    };
    let signed_in = signing.elapsed();
    let last = entries
        .last()
        .map(Entry::tip)
        .ok_or_else(|| anyhow!("--live-entries must be at least 1"))?;
    let size = entries
        .iter()
        .map(|e| e.signed.body.len() + e.signed.signature.len())
        .sum::<usize>()
        / entries.len();
    let (go, go_rx) = watch::channel(false);
    let source = SourceFeed {
        origin: C.into(),
        entries: Arc::new(entries.into_iter().map(|e| e.signed).collect()),
        head: pb::Head {
            origin: C.into(),
            feed_id: last.feed_id.to_vec(),
            seq: last.seq,
            entry_hash: last.hash.to_vec(),
            time_unix_micros: last.time_unix_micros,
            received_unix_micros: 0,
        },
        go: go_rx,
    };

    // The source serves over mTLS with a certificate naming origin C.
    let c_dir = root.join(C);
    std::fs::create_dir_all(&c_dir)?;
    federation.equip(&c_dir, C)?;
    let c_tls = Tls::load(
        TlsFiles::in_dir(&c_dir.join("tls")),
        Some(Identity::Origin(C.into())),
    )?;
    let c_listener = civex_node::transport::bind("127.0.0.1:0").await?;
    let c_address = c_listener.local_addr()?.to_string();
    let (stop_source, source_stopped) = oneshot::channel::<()>();
    let source_task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                pb::feed_server::FeedServer::new(source)
                    .max_encoding_message_size(client::MAX_MESSAGE),
            )
            .serve_with_incoming_shutdown(
                civex_node::transport::incoming(
                    c_listener,
                    Security::Mutual(c_tls),
                    Duration::from_secs(5),
                ),
                async move {
                    let _ = source_stopped.await;
                },
            ),
    );

    let (a_dir, b_dir) = (root.join(A), root.join(B));
    std::fs::create_dir_all(&a_dir)?;
    std::fs::create_dir_all(&b_dir)?;
    create_key_file(&a_dir.join("feed.key"))?;
    let b_key = create_key_file(&b_dir.join("feed.key"))?;
    let a_listener = civex_node::transport::bind("127.0.0.1:0").await?;
    let a_address = a_listener.local_addr()?.to_string();
    let b_listener = civex_node::transport::bind("127.0.0.1:0").await?;
    let b_address = b_listener.local_addr()?.to_string();
    let trusted = [(C.to_owned(), c_key.verifying_key())];
    // A admits B's subscription: it knows B's key.
    let a_config = bench_config(
        &federation,
        &a_dir,
        A,
        &a_address,
        &[trusted[0].clone(), (B.to_owned(), b_key.verifying_key())],
        &[BenchPeer {
            name: C,
            address: &c_address,
            origin: C,
        }],
    )?;
    let b_config = bench_config(
        &federation,
        &b_dir,
        B,
        &b_address,
        &trusted,
        &[BenchPeer {
            name: A,
            address: &a_address,
            origin: A,
        }],
    )?;
    let mut a = LiveNode::start(&federation, a_config, a_listener).await?;
    a.wait_subscribed().await?;
    let mut b = LiveNode::start(&federation, b_config, b_listener).await?;
    b.wait_subscribed().await?;

    let progress = Progress::new("live replication (relay)", count);
    let started = Instant::now();
    go.send_replace(true);
    let producer = tokio::spawn(async { Ok(()) });
    let arrival = follow(&mut a, &mut b, C, count, started, producer, &progress).await?;
    progress.finish();
    println!(
        "live replication (b) replication only: {count} entries of {size} bytes of origin C, signed before the run, \
         streamed at full speed from memory over mTLS into node A's replication path (A verifies and commits them durably, \
         as if appended to its feed) and relayed over mTLS to node B, which verifies and commits them durably: \
         all held on B {:.1} s after the first was sent: {:.0}/s end to end (A held all at {:.1} s: {:.0}/s); \
         signing them took {:.1} s ({:.0}/s on one core: one origin's own producing ceiling)",
        arrival.on_b.as_secs_f64(),
        rate(count, arrival.on_b),
        arrival.on_a.as_secs_f64(),
        rate(count, arrival.on_a),
        signed_in.as_secs_f64(),
        rate(count, signed_in),
    );
    b.stop().await?;
    a.stop().await?;
    let _ = stop_source.send(());
    source_task.await??;
    Ok(())
}

async fn publish_runs(root: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    let specs = [CitySpec {
        origin: "bench-publisher",
        name: "bench",
        districts: &[],
        peers: Vec::new(),
    }];
    let mut nodes = start_region(&root.join("publish"), &specs, true).await?;
    let node = nodes[0].client.clone();
    wait_until("the publishing node", Duration::from_secs(30), || async {
        node_status(&node).await.is_some_and(|s| s.publish_ready)
    })
    .await?;
    let publisher = client::publish(&node)?;
    // One random prefix per run; each publish gets its own key.
    let key_prefix = client::idempotency_key()?;
    let request = move |n: u64| indicator_request(&key_prefix, "bench-publisher", n);

    // Throughput with many concurrent publishers: unary calls, each on its
    // own connection, then sharing a few (as one client process would);
    // then each on its own connection and publish stream.
    let mut runs = vec![(
        Calls::Unary(args.publishers),
        "each on its own connection".to_owned(),
    )];
    if args.shared_connections > 0 {
        let shared = args.shared_connections.min(args.publishers.max(1));
        runs.push((
            Calls::Unary(shared),
            format!("sharing {shared} connections"),
        ));
    }
    runs.push((
        Calls::Streams,
        "each on its own connection and publish stream, one publish at a time".to_owned(),
    ));
    for (run, (calls, how)) in runs.into_iter().enumerate() {
        let offset = 100_000_000 * (run as u64 + 1);
        let progress = Arc::new(Progress::new("durable publish", args.publishes));
        let started = Instant::now();
        let tasks = spawn_publishers(
            &node,
            args.publishers,
            calls,
            args.publishes,
            {
                let request = request.clone();
                move |n| request(offset + n)
            },
            Some(progress.clone()),
        )?;
        for task in tasks {
            task.await??;
        }
        let elapsed = started.elapsed();
        progress.finish();
        println!(
            "durable publish: {} entries from {} concurrent publishers, {how}, in {:.1} s: {:.0}/s",
            args.publishes,
            args.publishers,
            elapsed.as_secs_f64(),
            rate(args.publishes, elapsed)
        );
    }

    // Ack latency at a fixed rate.
    let count = args.rate * args.latency_secs;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(count as usize);
    for n in 0..count {
        ticker.tick().await;
        let mut publisher = publisher.clone();
        let req = request(1_000_000 + n);
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            publisher
                .publish_indicators(req)
                .await
                .map_err(|s| anyhow!("publish failed: {}", s.message()))?;
            Ok::<Duration, anyhow::Error>(sent.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    for task in tasks {
        latencies.push(task.await??);
    }
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    println!(
        "ack latency at {}/s for {} s: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        args.rate,
        args.latency_secs,
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        latencies.last().map_or(0.0, |l| l.as_secs_f64() * 1e3)
    );
    for node in &mut nodes {
        node.stop().await?;
    }
    Ok(())
}
