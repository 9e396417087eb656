//! `civex bench`: what this machine does, measured in one run.
//!
//! 1. Ed25519 verify ceiling: strict single-signature checks on one core and
//!    on every core, and batch checks of 64 on every core.
//! 2. `civex verify` (the same audit code) over `--entries` stored entries
//!    of about 300 bytes.
//! 3. Catch-up: a fresh node replicates those entries from a node holding
//!    them, fully verified and durable, end to end over gRPC.
//! 4. Durable publish: `--publishers` concurrent publishers, then p50/p99
//!    ack latency at a fixed `--rate`.

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
    core::{
        feed::{Entry, Tip, GENESIS_PREV_HASH},
        index::records_of,
    },
    keys::{create_key_file, public_key_hex, KeyResolver},
    store::{CommitBatch, Head, SledStore, Store},
};
use civex_proto::v1::{self as pb, entry_body::Payload, EntryBody};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::{
    client,
    output::Progress,
    region::{held_seq, node_status, start_region, wait_until, CitySpec, Federation},
};

/// Flags of `civex bench`.
#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    /// Entries for the verify and catch-up runs.
    #[arg(long, default_value_t = 1_000_000)]
    entries: u64,
    /// Concurrent publishers in the throughput run.
    #[arg(long, default_value_t = 64)]
    publishers: usize,
    /// Publishes in the throughput run.
    #[arg(long, default_value_t = 40_000)]
    publishes: u64,
    /// Rate of the latency run, publishes per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds of the latency run.
    #[arg(long, default_value_t = 5)]
    latency_secs: u64,
    /// Where the stores go (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Which measurements to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "ceiling,verify,catch-up,publish"
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
    /// Catch-up replication of the stored entries to a fresh node.
    CatchUp,
    /// Durable publish throughput and ack latency.
    Publish,
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
                        method_notes: "synthetic benchmark entry, about three hundred bytes in all with its signature"
                            .into(),
                        breakdown: String::new(),
                    }],
                    rules: Some(pb::DisclosureRules {
                        name: "civex-threshold".into(),
                        version: "1".into(),
                        min_contributors: 3,
                    }),
                    group: None,
                })),
            };
            let entry = Entry::sign(key, body)?;
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
    if wants(Part::Verify) || wants(Part::CatchUp) {
        source_runs(&args, root, ceiling.as_ref()).await?;
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

        if let (true, Some(ceiling)) = (args.parts.contains(&Part::Verify), ceiling) {
            verify_part(store, &origin_keys, total, ceiling).await?;
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
        let own = SigningKey::from_bytes(&[99; 32]);
        let pinned = origin_keys
            .iter()
            .map(|(o, k)| (o.clone(), k.verifying_key()))
            .collect();
        let keys = KeyResolver::new("bench-source", own.verifying_key(), pinned);
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
    let trusted: String = origin_keys
        .iter()
        .map(|(o, k)| format!("\"{o}\" = \"{}\"\n", public_key_hex(&k.verifying_key())))
        .collect();
    let federation = Federation::create(root)?;
    let source_listener = civex_node::transport::bind("127.0.0.1:0").await?;
    let source_address = source_listener.local_addr()?.to_string();
    let source = federation.client(&source_address);
    let write = |dir: &Path,
                 origin: &str,
                 address: &str,
                 peers: &str|
     -> anyhow::Result<civex_node::config::Config> {
        let text = civex_node::config::template(origin, origin, address)
            .replace(
                "[trusted_origins]\n",
                &format!("[trusted_origins]\n{trusted}"),
            )
            .replace("level = \"info\"", "level = \"warn\"")
            .replace("cache_mb = 64", "cache_mb = 1024")
            .replace("allow_without_peers = false", "allow_without_peers = true")
            + peers;
        let path = dir.join("node.toml");
        std::fs::write(&path, text)?;
        federation.equip(dir, origin)?;
        Ok(civex_node::config::Config::load(&path, std::iter::empty())?)
    };
    let source_config = write(source_dir, "bench-source", &source_address, "")?;
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

    let dest_dir = root.join("dest");
    std::fs::create_dir_all(&dest_dir)?;
    create_key_file(&dest_dir.join("feed.key"))?;
    let dest_listener = civex_node::transport::bind("127.0.0.1:0").await?;
    let dest_address = dest_listener.local_addr()?.to_string();
    let dest = federation.client(&dest_address);
    let dest_config = write(
        &dest_dir,
        "bench-dest",
        &dest_address,
        &format!(
            "\n[[peers]]\nname = \"source\"\naddress = \"{source_address}\"\norigin = \"bench-source\"\n"
        ),
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
    let mut held = 0;
    while held < total {
        held = 0;
        for (origin, _) in origin_keys {
            held += held_seq(&dest, origin).await;
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
    let request = move |n: u64| pb::PublishIndicatorsRequest {
        idempotency_key: [&key_prefix[..8], &n.to_be_bytes()[..]].concat(),
        rows: vec![pb::IndicatorRow {
            indicator: format!("bench.publish-{}", n % 50),
            catalog_edition: "bench".into(),
            area: (n % 7 + 1) as i32,
            ref_area: "bench-publisher".into(),
            period: "2025".into(),
            value: n as f64,
            unit: "count".into(),
            obs_status: 0,
            method_notes: "durable publish benchmark row, padded to about three hundred bytes"
                .into(),
            contributors: 10,
        }],
    };

    // Throughput with many concurrent publishers.
    let next = Arc::new(AtomicU64::new(0));
    let progress = Arc::new(Progress::new("durable publish", args.publishes));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.publishers {
        // Each publisher is its own client with its own connection.
        let (mut publisher, next, progress, request) = (
            client::publish(&node)?,
            next.clone(),
            progress.clone(),
            request.clone(),
        );
        let limit = args.publishes;
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= limit {
                    return Ok::<(), anyhow::Error>(());
                }
                publisher
                    .publish_indicators(request(n))
                    .await
                    .map_err(|s| anyhow!("publish failed: {}", s.message()))?;
                if n % 1000 == 0 {
                    progress.set(n);
                }
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    progress.finish();
    println!(
        "durable publish: {} entries from {} concurrent publishers in {:.1} s: {:.0}/s",
        args.publishes,
        args.publishers,
        elapsed.as_secs_f64(),
        rate(args.publishes, elapsed)
    );

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
