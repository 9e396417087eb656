//! `civex backup` (from a running node, over its feed API) and `civex
//! restore` (into a stopped node's data directory). The file format and the
//! restore itself are `civex_node::backup`.

use std::{
    collections::BTreeMap,
    path::Path,
    process::ExitCode,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
};

use anyhow::{anyhow, bail};
use civex_node::{
    backup::{restore as restore_store, BackupWriter, RestoreError, RestoreStep},
    config::Config,
    core::feed::Entry,
};
use civex_proto::v1::{self as pb, subscribe_response::Event};
use serde_json::json;

use crate::{
    client::{self, describe, Node},
    commands::{all_heads, node_keys, print_report},
    output::{self, Format, Progress},
};

/// Writes every entry the node holds, of every origin it holds, to `out`:
/// each origin from seq 1 to the head the node reports when its backlog
/// has been sent (a durable head, so never inside a publish group of the
/// node's own feed); entries that arrive later are left out.
pub(crate) async fn backup(node: &Node, format: Format, out: &Path) -> anyhow::Result<ExitCode> {
    let heads = all_heads(node).await?;
    // Origin -> (last seq written, the head its backlog ended at).
    let mut origins: BTreeMap<String, (u64, Option<u64>)> = heads
        .iter()
        .filter(|h| h.seq > 0)
        .map(|h| (h.origin.clone(), (0, None)))
        .collect();
    let total: u64 = heads.iter().map(|h| h.seq).sum();
    let mut file = BackupWriter::create(out)?;
    let progress = Progress::new("backing up", total);
    let mut written = 0u64;
    // A subscription takes at most `MAX_CURSORS` origins: a hub holding
    // more is read one group of origins after another.
    let asked: Vec<String> = origins.keys().cloned().collect();
    for group in asked.chunks(civex_node::service::MAX_CURSORS) {
        let mut draining = group.len();
        let mut stream = client::subscribe_from_start(node, group).await?;
        while draining > 0 {
            let message = stream
                .message()
                .await
                .map_err(|s| anyhow!("the feed stream failed: {}", describe(&s)))?
                .ok_or_else(|| {
                    anyhow!("the node ended the feed stream before the backup was whole")
                })?;
            match message.event {
                Some(Event::Entries(batch)) => {
                    for signed in batch.entries {
                        let entry = Entry::decode(signed)
                            .map_err(|e| anyhow!("the node sent a malformed entry: {e}"))?;
                        let (origin, seq) = (&entry.body.origin, entry.body.seq);
                        let Some((last, end)) = origins.get_mut(origin) else {
                            bail!("the node sent origin {origin:?}, which was not asked for");
                        };
                        if end.is_some_and(|end| seq > end) {
                            continue;
                        }
                        if seq != *last + 1 {
                            bail!("the node sent origin {origin} seq {seq} after seq {last}");
                        }
                        *last = seq;
                        file.append(&entry.signed)?;
                        written += 1;
                        if written.is_multiple_of(4096) {
                            progress.set(written);
                        }
                    }
                }
                Some(Event::Drained(drained)) => {
                    let Some((last, end)) = origins.get_mut(&drained.origin) else {
                        continue;
                    };
                    if end.is_some() {
                        continue;
                    }
                    if *last != drained.head_seq {
                        bail!(
                            "the node's backlog of origin {} ended at seq {last}, but it holds \
                             seq {}",
                            drained.origin,
                            drained.head_seq
                        );
                    }
                    *end = Some(drained.head_seq);
                    draining -= 1;
                }
                Some(Event::Mismatch(mismatch)) => {
                    bail!(
                        "the node refused to serve origin {} from its start",
                        mismatch.origin
                    )
                }
                Some(Event::NotServed(not_served)) => {
                    bail!(
                        "the node does not serve origin {} to this identity ({}): back up \
                         with an operator identity",
                        not_served.origin,
                        not_served.reason
                    )
                }
                None => {}
            }
        }
    }
    let count = file.finish()?;
    progress.finish();
    // Fork evidence is the node's own record, not entries of a feed.
    let conflicts = client::status(node)
        .await?
        .node_status(pb::NodeStatusRequest {})
        .await
        .map_or(0, |status| {
            let status = status.into_inner();
            status.conflicts.len() as u64 + status.conflicts_not_shown
        });
    if conflicts > 0 {
        eprintln!(
            "civex: note: {conflicts} origins have fork evidence on record here (civex status); \
             it is not in the backup, so a node restored from it replicates those origins again \
             until it meets the fork again"
        );
    }
    let size = std::fs::metadata(out).map_or(0, |m| m.len());
    match format {
        Format::Json => output::json(&json!({
            "file": out.display().to_string(),
            "entries": count,
            "bytes": size,
            "origins": origins.iter().map(|(origin, (last, _))| json!({
                "origin": origin, "head_seq": last,
            })).collect::<Vec<_>>(),
        })),
        Format::Table => {
            output::table(
                &["origin", "entries"],
                &origins
                    .iter()
                    .map(|(origin, (last, _))| vec![origin.clone(), last.to_string()])
                    .collect::<Vec<_>>(),
            );
            println!(
                "{count} entries of {} origins written to {} ({size} bytes); the keys are not \
                 in it: keep the node's key files apart",
                origins.len(),
                out.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Builds the store of the node `config_path` describes from `file`.
pub(crate) async fn restore(
    config_path: &Path,
    file: &Path,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path, std::env::vars())?;
    let keys = node_keys(&config, config_path)?;
    let file_size = std::fs::metadata(file)
        .map_err(|e| anyhow!("{}: cannot read it: {e}", file.display()))?
        .len();
    // About 330 bytes a record: a guess for the bar only.
    let writing = Progress::new("restoring", file_size / 330);
    let written = AtomicU64::new(0);
    let verifying = OnceLock::new();
    let started = std::time::Instant::now();
    let restored = restore_store(
        &config.data_dir,
        file,
        &config.origin,
        config.federation.roster_origin.as_deref(),
        Arc::clone(&keys),
        config.store.cache_mb << 20,
        &|step| match step {
            RestoreStep::Written(done) => {
                written.store(done, Ordering::Relaxed);
                writing.set(done);
            }
            RestoreStep::Verified(done) => verifying
                .get_or_init(|| {
                    writing.finish();
                    Progress::new("verifying", written.load(Ordering::Relaxed))
                })
                .set(done),
        },
    )
    .await;
    match verifying.get() {
        Some(bar) => bar.finish(),
        None => writing.finish(),
    }
    let seconds = started.elapsed().as_secs_f64();
    match restored {
        Ok(restored) => {
            print_report(&restored.report, seconds, format);
            if format == Format::Table {
                println!(
                    "restored into {}; start the node: with peers configured, it fetches any \
                     newer entries of its own feed before it publishes again",
                    config.data_dir.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(RestoreError::Unverified(report)) => {
            print_report(&report, seconds, format);
            eprintln!(
                "civex: {}: entries of the backup do not verify; nothing was restored",
                file.display()
            );
            Ok(ExitCode::FAILURE)
        }
        Err(err) => Err(err.into()),
    }
}
