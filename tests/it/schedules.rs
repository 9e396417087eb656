//! Seeded fault schedules. Three cities replicate each other in a mesh,
//! each dialled through a proxy, while a schedule drawn from a seed
//! publishes in the background, cuts, stalls and slows links, and kills
//! (SIGKILL) or stops (SIGTERM) and restarts nodes, publishes in flight
//! included. After each schedule every publish that failed is retried with
//! its idempotency key; then every node holds every origin's whole feed,
//! byte for byte the same, with every acknowledged publish in it, and every
//! store verifies.
//!
//! A seed fixes the schedule, not the interleaving: the nodes are real
//! processes on real sockets. The seeds of `ci_seeds` run in CI; more run by hand
//! with `FAULT_SEEDS=1-150 cargo nextest run -E 'test(seeded_fault)'`
//! (about a second a seed: nextest stops a test after 5 minutes), and
//! `FAULT_STEPS=40` for longer schedules.
//! A failure names its seed, and stderr lists every step taken.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use civex_node::core::feed::{entry_hash, Entry};
use civex_proto::v1::{self as pb, entry_body::Payload};

use crate::support::{
    civex_async, connect, eventually, key, make_key, operator, row, stdout, whole_feed,
    write_node_dir, ChildNode, Faults, Proxy, Spec, DEADLINE, NOWHERE,
};

/// Seeds run when `FAULT_SEEDS` is not set (not `CIVEX_*`: the nodes
/// refuse settings they do not know): 1 to 8, and 86, whose kill of a node
/// still opening its store once left the store unopenable (its timing is
/// not reproduced: a unit test of the store guards that).
fn ci_seeds() -> Vec<u64> {
    (1..=8).chain([86]).collect()
}
/// Steps of each schedule, unless `FAULT_STEPS` says.
fn steps() -> usize {
    std::env::var("FAULT_STEPS").map_or(16, |s| {
        s.parse()
            .unwrap_or_else(|_| panic!("FAULT_STEPS: {s:?} is not a number of steps"))
    })
}
const ORIGINS: [&str; 3] = ["city-a", "city-b", "city-c"];

/// SplitMix64: a seeded, dependency-free source of schedule choices.
struct Draw(u64);

impl Draw {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    }
}

/// One city: its directory, the proxy its peers dial, its process if up.
struct City {
    origin: &'static str,
    dir: PathBuf,
    proxy: Proxy,
    node: Option<ChildNode>,
    faults: Faults,
}

impl City {
    async fn start(&mut self) {
        let node = ChildNode::start_async(&self.dir).await;
        self.proxy.set_target(&node.address);
        self.node = Some(node);
    }

    fn address(&self) -> &str {
        &self.node.as_ref().expect("the node is up").address
    }
}

type Request = pb::PublishIndicatorsRequest;

/// A publish and its receipt.
type Acked = (Request, pb::Receipt);

/// Publishes `requests` in order on the node at `address`, stopping at the
/// first failure (each call bounded): those acknowledged, and the requests
/// whose fate is unknown.
async fn publish_all(address: String, requests: Vec<Request>) -> (Vec<Acked>, Vec<Request>) {
    let mut acked = Vec::new();
    let mut requests = requests.into_iter();
    let timeout = Duration::from_secs(5);
    if let Ok(channel) = civex_node::transport::connect(&address, &operator(), None, timeout).await
    {
        let mut client = pb::publish_client::PublishClient::new(channel);
        while let Some(request) = requests.next() {
            let call = client.publish_indicators(request.clone());
            match tokio::time::timeout(Duration::from_secs(30), call).await {
                Ok(Ok(receipt)) => acked.push((request, receipt.into_inner())),
                _ => return (acked, std::iter::once(request).chain(requests).collect()),
            }
        }
    }
    (acked, requests.collect())
}

/// Waits until every city's node has opened publishing; a node that
/// exited meanwhile fails the test with its log.
async fn wait_publishing(seed: u64, cities: &mut [City]) {
    for city in cities {
        let node = city.node.as_mut().expect("the node is up");
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = node.child.try_wait().unwrap() {
                let log = node.log_text();
                panic!("seed {seed}: {} exited ({status}):\n{log}", city.origin);
            }
            let timeout = Duration::from_secs(5);
            if let Ok(channel) =
                civex_node::transport::connect(&node.address, &operator(), None, timeout).await
            {
                let status = pb::status_client::StatusClient::new(channel)
                    .node_status(pb::NodeStatusRequest {})
                    .await;
                if status.is_ok_and(|s| s.into_inner().publish_ready) {
                    break;
                }
            }
            let origin = city.origin;
            assert!(
                Instant::now() < deadline,
                "seed {seed}: {origin} did not open publishing"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// (seq, entry hash) of `origin` held by the node at `address`.
async fn head(address: &str, origin: &str) -> (u64, Vec<u8>) {
    pb::status_client::StatusClient::new(connect(address).await)
        .node_status(pb::NodeStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .heads
        .into_iter()
        .find(|h| h.origin == origin)
        .map_or((0, Vec::new()), |h| (h.seq, h.entry_hash))
}

fn seeds() -> Vec<u64> {
    let Ok(text) = std::env::var("FAULT_SEEDS") else {
        return ci_seeds();
    };
    let parse = |s: &str| {
        s.trim()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("FAULT_SEEDS: {s:?} is not a seed (try 1-200 or 4,9)"))
    };
    text.split(',')
        .flat_map(|part| match part.split_once('-') {
            Some((from, to)) => (parse(from)..=parse(to)).collect::<Vec<_>>(),
            None => vec![parse(part)],
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_fault_schedules_lose_duplicate_and_fork_nothing() {
    let mut acked_live = 0;
    for seed in seeds() {
        acked_live += run_schedule(seed).await;
    }
    assert!(
        acked_live > 0,
        "no publish was acknowledged during any schedule"
    );
}

/// Runs the schedule of `seed`; returns how many publishes were
/// acknowledged while it ran (before the retries).
async fn run_schedule(seed: u64) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<String> = ORIGINS
        .iter()
        .map(|o| make_key(&dir.path().join(o)))
        .collect();
    let mut cities = Vec::new();
    for origin in ORIGINS {
        cities.push(City {
            origin,
            dir: dir.path().join(origin),
            proxy: Proxy::start(NOWHERE).await,
            node: None,
            faults: Faults::default(),
        });
    }
    // Each city dials the other two through their proxies, pinning their keys.
    for (i, city) in cities.iter().enumerate() {
        let mut spec = Spec::new(city.origin);
        for j in (0..ORIGINS.len()).filter(|j| *j != i) {
            spec = spec
                .peer(ORIGINS[j], &cities[j].proxy.address)
                .trust(ORIGINS[j], &keys[j]);
        }
        write_node_dir(&city.dir, &spec, "127.0.0.1:0");
    }
    for city in &mut cities {
        city.start().await;
    }
    wait_publishing(seed, &mut cities).await;

    let mut draw = Draw(seed);
    let mut publishing = Vec::new();
    let mut row_number = 0u64;
    for step in 0..steps() {
        let city = &mut cities[draw.below(ORIGINS.len() as u64) as usize];
        let what = match (draw.below(8), &mut city.node) {
            (_, None) => {
                city.start().await;
                format!("restart {}", city.origin)
            }
            // In the background: the next steps may hit it in flight.
            (0..=2, Some(node)) => {
                let count = 1 + draw.below(4);
                let requests = (0..count)
                    .map(|_| {
                        row_number += 1;
                        let indicator = format!("k{}", row_number % 50);
                        Request {
                            idempotency_key: key(),
                            rows: vec![row(&indicator, city.origin, "2025", row_number as f64, 10)],
                        }
                    })
                    .collect();
                let task = tokio::spawn(publish_all(node.address.clone(), requests));
                publishing.push((city.origin, task));
                format!("publish {count} on {}", city.origin)
            }
            (3, _) => {
                city.proxy.cut();
                format!("cut the links to {}", city.origin)
            }
            (4, _) => {
                city.faults.stalled = !city.faults.stalled;
                city.proxy.set_faults(city.faults);
                let stalled = city.faults.stalled;
                format!("stalled={stalled} the links to {}", city.origin)
            }
            (5, _) => {
                city.faults.delay = Duration::from_millis(draw.below(6));
                city.proxy.set_faults(city.faults);
                let delay = city.faults.delay;
                format!("delay {delay:?} on the links to {}", city.origin)
            }
            (6, Some(node)) => {
                node.sigkill();
                city.node = None;
                format!("SIGKILL {}", city.origin)
            }
            (_, Some(node)) => {
                let status = node.sigterm();
                let origin = city.origin;
                assert_eq!(
                    status.code(),
                    Some(0),
                    "seed {seed} step {step}: {origin} on SIGTERM"
                );
                city.start().await;
                format!("SIGTERM and restart {origin}")
            }
        };
        eprintln!("seed {seed} step {step}: {what}");
    }

    // Heal: every link clear, every node up and publishing.
    for city in &mut cities {
        city.faults = Faults::default();
        city.proxy.set_faults(city.faults);
        if city.node.is_none() {
            city.start().await;
        }
    }
    wait_publishing(seed, &mut cities).await;
    let addresses: Vec<String> = cities.iter().map(|c| c.address().to_owned()).collect();
    // A publish that failed (refused while publishing was closed, or cut
    // off by a kill or a cut) is retried with its idempotency key: it gets
    // its first receipt if it was published, else it is published now.
    let mut acked: BTreeMap<&str, Vec<Acked>> = BTreeMap::new();
    let (mut acked_live, mut retried) = (0, 0);
    for (origin, task) in publishing {
        let (done, in_doubt) = task.await.unwrap();
        acked_live += done.len();
        acked.entry(origin).or_default().extend(done);
        let i = ORIGINS.iter().position(|o| *o == origin).unwrap();
        let mut client = pb::publish_client::PublishClient::new(connect(&addresses[i]).await);
        for request in in_doubt {
            let receipt = client
                .publish_indicators(request.clone())
                .await
                .unwrap_or_else(|status| panic!("seed {seed}: a retry on {origin}: {status}"));
            acked
                .entry(origin)
                .or_default()
                .push((request, receipt.into_inner()));
            retried += 1;
        }
    }

    for (i, origin) in ORIGINS.iter().enumerate() {
        let own = head(&addresses[i], origin).await;
        let receipts = acked.get(origin).map(Vec::as_slice).unwrap_or_default();
        let mut seqs: Vec<u64> = receipts.iter().map(|(_, r)| r.seq).collect();
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(
            seqs.len(),
            receipts.len(),
            "seed {seed}: two publishes of {origin} acknowledged with one seq"
        );
        // Every publish issued is in the feed once: nothing else, nothing twice.
        assert_eq!(
            own.0,
            receipts.len() as u64,
            "seed {seed}: {origin} holds {} entries for {} publishes",
            own.0,
            receipts.len()
        );
        let what = format!("seed {seed}: every node to hold {origin} up to {}", own.0);
        eventually(&what, || async {
            for address in &addresses {
                if head(address, origin).await != own {
                    return false;
                }
            }
            true
        })
        .await;
        let feed = whole_feed(&addresses[i], origin).await;
        assert_eq!(feed.len() as u64, own.0, "seed {seed}: gaps in {origin}");
        for address in &addresses {
            let held = whole_feed(address, origin).await;
            assert!(
                held == feed,
                "seed {seed}: {address} holds another {origin} feed"
            );
        }
        for (request, receipt) in receipts {
            let entry = feed.get(receipt.seq as usize - 1).unwrap_or_else(|| {
                panic!(
                    "seed {seed}: {origin} seq {} acknowledged, lost",
                    receipt.seq
                )
            });
            assert_eq!(
                entry_hash(&entry.body, &entry.signature).to_vec(),
                receipt.entry_hash,
                "seed {seed}: {origin} seq {} is not the entry acknowledged",
                receipt.seq
            );
            let body = Entry::decode(entry.clone()).unwrap().body;
            let Some(Payload::Indicators(batch)) = body.payload else {
                panic!(
                    "seed {seed}: {origin} seq {} is not indicators",
                    receipt.seq
                );
            };
            assert_eq!(
                batch.observations[0].value,
                Some(request.rows[0].value),
                "seed {seed}: {origin} seq {} holds another publish than its receipt's",
                receipt.seq
            );
        }
    }
    // Every store verifies entry by entry.
    for city in &mut cities {
        let mut node = city.node.take().unwrap();
        assert_eq!(
            node.sigterm().code(),
            Some(0),
            "seed {seed}: {} on SIGTERM",
            city.origin
        );
        let config = city.dir.join("node.toml");
        let out = civex_async(&["verify", "--config", config.to_str().unwrap()]).await;
        let report = stdout(&out);
        assert!(
            out.status.success(),
            "seed {seed}: {} does not verify: {report}",
            city.origin
        );
    }
    let total: usize = acked.values().map(Vec::len).sum();
    eprintln!("seed {seed}: converged, {total} publishes acknowledged ({retried} on a retry)");
    acked_live
}
