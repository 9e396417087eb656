//! Wiring: [`run`] opens the store, starts the writer, the publisher, one
//! replication task per peer and the gRPC server on a listener it is given,
//! and shuts all of it down in order.

use std::{future::Future, sync::Arc};

use ed25519_dalek::{SigningKey, VerifyingKey};
use tokio::{net::TcpListener, sync::watch};

use crate::{
    config::{Config, TlsMode},
    core::feed::{key_after, replacements_of},
    gate::PublishGate,
    keys::{genesis_key, load_key_file, noise_key, recover_rotation, KeyError, KeyResolver},
    peers::{PeerRegistry, PeersError},
    pki::Identity,
    publish::{FeedKey, IndicatorRules, Publisher},
    replicate::{Replication, Replicator, Roster},
    service::{router, Services},
    store::{SharedStore, SledStore, Store, StoreError},
    tls::{Tls, TlsError, TlsFiles},
    transport::{self, Security},
    writer::Writer,
};

/// Why the node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The feed key.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The config.
    #[error("config: {0}")]
    Config(String),
    /// The TLS files (the error names the file).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The runtime peers file (the error names the file).
    #[error(transparent)]
    Peers(#[from] PeersError),
    /// The server.
    #[error("gRPC server: {0}")]
    Server(String),
}

/// The catalog and disclosure policy, and the noise key (created when an
/// indicator has noise and the file is missing).
fn indicator_rules(config: &Config) -> Result<IndicatorRules, NodeError> {
    let (catalog, policy) = config.indicator_rules().map_err(NodeError::Config)?;
    let noised = policy.overrides.iter().any(|o| o.noise.is_some());
    let noise_key = noise_key(&config.disclosure.noise_key_file, noised)?;
    Ok(IndicatorRules {
        districts: config.districts.clone(),
        catalog,
        policy,
        noise_key,
    })
}

/// Loads the node's TLS files (mutual mode): its certificate must name
/// its origin and chain to the CA.
pub fn security(config: &Config) -> Result<Security, NodeError> {
    Ok(match config.tls.mode {
        TlsMode::Insecure => Security::Insecure,
        TlsMode::Mutual => Security::Mutual(Tls::load(
            TlsFiles {
                ca: config.tls.ca_file.clone(),
                cert: config.tls.cert_file.clone(),
                key: config.tls.key_file.clone(),
                crl: config.tls.crl_file.clone(),
            },
            Some(Identity::Origin(config.origin.clone())),
        )?),
    })
}

/// The feed key, after finishing (or dropping) a rotation a crash cut
/// short. It must be the key in force at the own feed's head: a key file
/// restored from before a rotation would sign entries every peer refuses.
fn own_key(config: &Config, store: &dyn Store) -> Result<(SigningKey, VerifyingKey), NodeError> {
    let rotations = store.rotations(&config.origin)?;
    recover_rotation(&config.key_file, rotations.last().map(|(_, key)| *key))?;
    let key = load_key_file(&config.key_file)?;
    // The roster's entry for this node, with the replacements of its lost
    // keys (the roster origin's feed is verified like any other).
    let member = match &config.federation.roster_origin {
        Some(roster) => store
            .roster(roster)?
            .into_iter()
            .find(|entry| entry.origin == config.origin && !entry.removed),
        None => None,
    };
    let replaced = member.as_ref().is_some_and(|m| !m.replacements.is_empty());
    let genesis_file = config.key_file.with_extension("pub");
    if (!rotations.is_empty() || replaced) && !genesis_file.exists() {
        return Err(NodeError::Config(format!(
            "{}: missing; after a key rotation or replacement it names the feed's first key, \
             which verifying the own feed needs; restore it from the backup",
            genesis_file.display()
        )));
    }
    let genesis = genesis_key(&config.key_file, &key)?;
    let replacements = member
        .filter(|m| m.feed_key == genesis.to_bytes())
        .and_then(|m| replacements_of(&m))
        .unwrap_or_default();
    let Some(head) = store.head(&config.origin)? else {
        return Ok((key, genesis));
    };
    let in_force = key_after(
        &config.origin,
        &genesis,
        &replacements,
        &rotations,
        head.tip.seq,
    )
    .map_err(|err| NodeError::Config(err.to_string()))?;
    let own = key.verifying_key();
    if own != in_force {
        let retired = own == genesis
            || rotations.iter().any(|(_, k)| *k == own.to_bytes())
            || replacements.iter().any(|r| r.new_key == own);
        // With no roster to name a replacement, a key not in force is refused
        // once the feed has rotated (a store restored from an older backup
        // than the key file starts, and catches up from peers).
        if retired || (config.federation.roster_origin.is_none() && !rotations.is_empty()) {
            return Err(NodeError::Config(format!(
                "{}: this is not the key in force for this node's feed at seq {}, which is {}; \
                 restore the key file of the newest rotation or replacement",
                config.key_file.display(),
                head.tip.seq,
                crate::core::ids::hex(&in_force.to_bytes())
            )));
        }
        tracing::warn!(
            key_file = %config.key_file.display(),
            "the feed key is not the key in force at this node's head; publishing stays closed \
             until the federation roster names it as the replacement of a lost key"
        );
    }
    Ok((key, genesis))
}

/// Runs a node on `listener` until `shutdown` completes. Acknowledged work
/// is durable already; in-flight writes finish; subscribers see their
/// streams end cleanly.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    config.validate().map_err(NodeError::Config)?;
    let security = security(&config)?;
    run_secured(config, security, listener, shutdown).await
}

/// The start-up checks that need neither the store nor a socket: the feed
/// key file (there, a key, readable by its owner only) and the runtime
/// peers (`data/peers.json`, checked against the transport mode).
/// `civex-node` runs them before it binds, so a node that would refuse to
/// start never listens, nor writes its `--address-file`. [`run_secured`]
/// checks the same again, with the store.
pub fn preflight(config: &Config) -> Result<(), NodeError> {
    load_key_file(&config.key_file)?;
    PeerRegistry::open(
        &config.data_dir,
        &config.peers,
        config.tls.mode == TlsMode::Insecure,
    )?;
    Ok(())
}

/// [`run`] with the TLS files already loaded by [`security`].
pub async fn run_secured(
    config: Config,
    security: Security,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let pinned = config.pinned_keys().map_err(NodeError::Config)?;
    let cache_bytes = config.store.cache_mb.saturating_mul(1 << 20);
    let store_dir = config.data_dir.clone();
    let store: SharedStore =
        tokio::task::spawn_blocking(move || SledStore::open(&store_dir, cache_bytes))
            .await
            .map_err(|err| NodeError::Server(format!("store open task failed: {err}")))?
            .map(Arc::new)?;
    if let Security::Mutual(tls) = &security {
        tls.remember_revocations(&config.data_dir.join("revocations"))?;
    }
    let (key, genesis) = own_key(&config, store.as_ref())?;
    let (writer, writer_thread) = Writer::start(store.clone())?;

    let keys = Arc::new(KeyResolver::new(&config.origin, genesis, pinned));
    let roster = Roster::new(
        config.federation.roster_origin.clone(),
        keys.clone(),
        store.clone(),
    );
    roster.refresh()?;
    let registry = Arc::new(PeerRegistry::open(
        &config.data_dir,
        &config.peers,
        config.tls.mode == TlsMode::Insecure,
    )?);
    let initial_peers = registry.list();
    let gate = PublishGate::new(
        initial_peers.iter().map(|peer| peer.name.clone()).collect(),
        config.publish.allow_without_peers,
    );
    let publisher = Arc::new(Publisher::new(
        config.origin.clone(),
        FeedKey {
            signing: key,
            file: config.key_file.clone(),
            genesis,
        },
        Arc::new(indicator_rules(&config)?),
        keys.clone(),
        store.clone(),
        writer.clone(),
        gate.clone(),
    ));
    let (stop, stopping) = watch::channel(false);
    let indexer = tokio::spawn(fold_index_pieces(
        store.clone(),
        writer.committed(),
        stopping.clone(),
    ));

    let quarantined = store
        .conflicts()?
        .into_iter()
        .map(|record| {
            tracing::error!(origin = %record.conflict.held.body.origin,
                kind = record.conflict.kind.name(), peer = %record.peer,
                "a conflict is on record for this origin: it is not replicated");
            record.conflict.held.body.origin
        })
        .collect();
    let replicator = Replicator {
        own_origin: config.origin.clone(),
        keys,
        store: store.clone(),
        writer: writer.clone(),
        timing: config.replication.clone(),
        max_message_bytes: config.limits.max_message_bytes,
        gate,
        security: security.clone(),
        quarantined: Arc::new(std::sync::Mutex::new(quarantined)),
        roster: roster.clone(),
    };
    let replication = Replication::start(replicator, &initial_peers, stopping.clone());

    let routes = router(Services {
        store: store.clone(),
        writer: writer.clone(),
        publisher: publisher.clone(),
        replication: replication.clone(),
        registry,
        roster,
        operators: config.tls.operators.clone(),
        insecure: config.tls.mode == TlsMode::Insecure,
        shutdown: stopping.clone(),
        max_message_bytes: config.limits.max_message_bytes,
        max_streams_per_peer: config.limits.max_streams_per_peer,
        publish_stream_bytes: config.limits.publish_stream_bytes,
    })
    .await
    .map_err(|err| NodeError::Server(err.to_string()))?;
    let address =
        transport::local_address(&listener).map_err(|err| NodeError::Server(err.to_string()))?;
    tracing::info!(origin = %config.origin, %address, peers = initial_peers.len(), "civex node serving");

    let stop_on_signal = {
        let stop = stop.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down");
            stop.send_replace(true);
        }
    };
    let reloader = match &security {
        Security::Mutual(tls) => {
            let mut stopping = stopping.clone();
            Some(tokio::spawn(tls.clone().reload_every(
                std::time::Duration::from_millis(config.tls.reload_ms),
                async move {
                    let _ = stopping.wait_for(|stop| *stop).await;
                },
            )))
        }
        Security::Insecure => None,
    };
    let incoming = transport::incoming(
        listener,
        security,
        std::time::Duration::from_millis(config.tls.handshake_timeout_ms),
    );
    let server = transport::server()
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, stop_on_signal);
    // A stream whose reader stopped never finishes: after the grace period
    // the server is dropped and its connections close.
    let grace = std::time::Duration::from_millis(config.limits.shutdown_grace_ms);
    let mut stopping_now = stopping.clone();
    let served = tokio::select! {
        served = server => served,
        _ = async move {
            let _ = stopping_now.wait_for(|stop| *stop).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "streams still open after the shutdown grace period; closing them");
            Ok(())
        }
    };
    stop.send_replace(true);
    replication.join().await;
    let _ = indexer.await;
    if let Some(reloader) = reloader {
        let _ = reloader.await;
    }
    drop(publisher);
    drop(store);
    // The writer finishes what is queued and ends, even if a connection
    // that is still closing holds a handle.
    writer.close().await;
    drop(writer);
    let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    tracing::info!("civex node stopped");
    served.map_err(|err| NodeError::Server(err.to_string()))
}

/// Folds packed index pieces (written by bulk commits) into the ordered
/// index in the background: once commits pause for 250 ms, or after a
/// minute of steady commits (so folding does not slow a long catch-up;
/// queries meanwhile merge the pieces not folded yet).
async fn fold_index_pieces(
    store: SharedStore,
    mut committed: watch::Receiver<crate::writer::DurableHeads>,
    mut stopping: watch::Receiver<bool>,
) {
    use std::time::{Duration, Instant};
    const IDLE: Duration = Duration::from_millis(250);
    const MAX_DEFER: Duration = Duration::from_secs(60);
    // The first pass folds what an earlier run left, once start-up is quiet.
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                changed = committed.changed() => if changed.is_err() { return },
                _ = stopping.wait_for(|stop| *stop) => return,
            }
        }
        first = false;
        let deferred = Instant::now();
        while deferred.elapsed() < MAX_DEFER {
            tokio::select! {
                changed = tokio::time::timeout(IDLE, committed.changed()) => match changed {
                    Err(_) => break,
                    Ok(Err(_)) => return,
                    Ok(Ok(())) => {}
                },
                _ = stopping.wait_for(|stop| *stop) => return,
            }
        }
        let store = store.clone();
        let stop = stopping.clone();
        // Folds in small steps and stops between them at shutdown (pieces
        // left are folded after the next start).
        let folded = tokio::task::spawn_blocking(move || loop {
            if *stop.borrow() {
                return Ok(());
            }
            match store.merge_index_pieces(16) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(err) => return Err(err),
            }
        })
        .await;
        if let Ok(Err(err)) = folded {
            tracing::warn!(error = %err, "folding index pieces failed; queries read them unfolded");
        }
    }
}

/// Sets up tracing logs on stderr: human-readable or JSON, at `level`.
/// Human logs are coloured only on a terminal: written to a file or a
/// pipe (a systemd journal, a container's log), colour codes would be
/// noise in every line.
pub fn init_logging(format: &str, level: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::{filter::LevelFilter, fmt, prelude::*};
    let level: LevelFilter = level.parse().unwrap_or(LevelFilter::INFO);
    let registry = tracing_subscriber::registry().with(level);
    let result = if format == "json" {
        registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .try_init()
    } else {
        registry
            .with(
                fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .try_init()
    };
    let _ = result;
}
