//! The commands that talk to one node, and `init` / `verify`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{anyhow, bail, Context};
use civex_node::{
    config::{template_with_operators, Config},
    core::{
        feed::{authenticate, replacements_of, Entry, Replacement, Tip, Uncovered},
        ids::{check_origin_id, hex, unhex},
        ingest::{area_slug, parse_area, parse_csv, parse_json, InputRow},
        sdc::LargestContributions,
    },
    keys::{
        create_key_file, genesis_key, load_key_file, parse_public_key, public_key_hex,
        write_secret_file, KeyResolver, Member,
    },
    pki::{request, Identity},
    publish::rfc3339,
};
use civex_proto::v1::{self as pb, entry_body::Payload, subscribe_response::Event};
use clap::Subcommand;
use serde_json::json;

use crate::{
    client::{self, describe, with_retry, Node},
    output::{self, Format, Progress},
};

/// `civex publish ...`
#[derive(Subcommand)]
pub(crate) enum PublishCommand {
    /// Publish a CSV or JSON file of indicator rows as one atomic entry.
    Indicators {
        /// The file (.csv or .json; see the README for the columns).
        file: PathBuf,
        /// Show what would be published and why each cell is suppressed,
        /// publishing nothing. The reasons may repeat contributor counts:
        /// keep the output local.
        #[arg(long)]
        dry_run: bool,
        /// Seconds to keep retrying while the node is unavailable.
        #[arg(long, default_value_t = 10)]
        wait_secs: u64,
    },
}

/// `civex offer ...`
#[derive(Subcommand)]
pub(crate) enum OfferCommand {
    /// Publish or replace an offer.
    Publish(OfferArgs),
    /// Withdraw an offer for good.
    Withdraw {
        /// Offer id.
        id: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Answer another city's offer.
    Respond {
        /// Origin of the offering city.
        #[arg(long)]
        origin: String,
        /// Offer id.
        #[arg(long)]
        offer: String,
        /// interest, accept or decline.
        #[arg(long)]
        kind: String,
        /// Message to the offering city.
        #[arg(long, default_value = "")]
        message: String,
        /// Version hash answered (hex); default: the latest held.
        #[arg(long)]
        version: Option<String>,
    },
}

/// The fields of an offer.
#[derive(clap::Args)]
pub(crate) struct OfferArgs {
    /// Offer id, [a-z0-9][a-z0-9-]{0,63}.
    #[arg(long)]
    id: String,
    /// Title.
    #[arg(long)]
    title: String,
    /// Description.
    #[arg(long, default_value = "")]
    description: String,
    /// Functional area (1-7 or its name, e.g. infrastructure).
    #[arg(long)]
    area: String,
    /// Category slug, e.g. waste-collection.
    #[arg(long)]
    category: String,
    /// Capacity.
    #[arg(long, default_value = "")]
    capacity: String,
    /// Terms.
    #[arg(long, default_value = "")]
    terms: String,
    /// Region where it applies.
    #[arg(long, default_value = "")]
    region: String,
    /// Valid from (YYYY-MM-DD or RFC 3339, UTC).
    #[arg(long)]
    valid_from: String,
    /// Valid until, exclusive (YYYY-MM-DD or RFC 3339, UTC).
    #[arg(long)]
    valid_until: String,
    /// Role contact (an office, never a person's private data).
    #[arg(long)]
    contact: String,
}

/// `civex query ...`
#[derive(Subcommand)]
pub(crate) enum QueryCommand {
    /// Current observations, all pages.
    Observations {
        /// Functional area (repeatable).
        #[arg(long)]
        area: Vec<String>,
        /// Indicator code (repeatable).
        #[arg(long)]
        indicator: Vec<String>,
        /// Origin (repeatable).
        #[arg(long)]
        origin: Vec<String>,
        /// Earliest period, e.g. 2024 or 2025-Q1.
        #[arg(long)]
        from: Option<String>,
        /// Latest period.
        #[arg(long)]
        to: Option<String>,
        /// Rows per request.
        #[arg(long, default_value_t = 500)]
        page_size: u32,
    },
    /// Active offers.
    Offers {
        /// Functional area (repeatable).
        #[arg(long)]
        area: Vec<String>,
        /// Category (repeatable).
        #[arg(long)]
        category: Vec<String>,
        /// Origin (repeatable).
        #[arg(long)]
        origin: Vec<String>,
        /// Include withdrawn, retracted and expired offers.
        #[arg(long)]
        all: bool,
    },
}

/// `civex feed ...`
#[derive(Subcommand)]
pub(crate) enum FeedCommand {
    /// Follow feeds live from the start, verifying every entry.
    Tail {
        /// Use the pinned keys of this node.toml (and its own key), and the
        /// keys of the members its federation roster names.
        #[arg(long)]
        config: Option<PathBuf>,
        /// A pinned key, ORIGIN=HEX (repeatable).
        #[arg(long)]
        key: Vec<String>,
        /// Follow only these origins (default: every origin with a key).
        #[arg(long)]
        origin: Vec<String>,
        /// Stop after this many entries.
        #[arg(long)]
        count: Option<u64>,
    },
}

/// What `civex init` makes.
pub(crate) struct InitOptions<'a> {
    pub(crate) dir: &'a Path,
    pub(crate) origin: &'a str,
    pub(crate) name: &'a str,
    pub(crate) listen: &'a str,
    /// The federation's CA certificate, to install as tls/ca.pem.
    pub(crate) join: Option<&'a Path>,
    /// Plain gRPC on loopback instead of mutual TLS.
    pub(crate) insecure: bool,
    /// Operators who may publish and administer it.
    pub(crate) operators: &'a [String],
}

pub(crate) fn init(options: &InitOptions<'_>, format: Format) -> anyhow::Result<ExitCode> {
    let InitOptions {
        dir,
        origin,
        name,
        listen,
        join,
        insecure,
        operators,
    } = *options;
    check_origin_id(origin).map_err(|m| anyhow!("--origin: {m}"))?;
    let config_path = dir.join("node.toml");
    if config_path.exists() {
        bail!(
            "{} already exists: not overwriting a node",
            config_path.display()
        );
    }
    let mut text = template_with_operators(origin, name, listen, operators);
    if insecure {
        text = text.replace("mode = \"mutual\"", "mode = \"insecure\"");
    }
    let parsed =
        Config::parse(&text).map_err(|m| anyhow!("internal: template does not parse: {m}"))?;
    parsed.validate().map_err(|m| {
        // The field at fault names the flag that set it.
        let flag = [
            ("origin:", "--origin"),
            ("listen:", "--listen"),
            ("tls.operators:", "--operator"),
        ]
        .iter()
        .find(|(field, _)| m.starts_with(field))
        .map_or("--listen, --origin or --operator", |(_, flag)| flag);
        anyhow!("{flag}: {m}")
    })?;
    let ca = match join {
        Some(path) => {
            let ca = std::fs::read_to_string(path)
                .with_context(|| format!("--join {}: cannot read", path.display()))?;
            if !ca.contains("-----BEGIN CERTIFICATE-----") {
                bail!(
                    "--join {}: not a PEM certificate (the federation's ca.pem)",
                    path.display()
                );
            }
            Some(ca)
        }
        None => None,
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key = create_key_file(&dir.join(&parsed.key_file))?;
    let public = public_key_hex(&key.verifying_key());
    std::fs::write(dir.join("feed.pub"), format!("{public}\n"))?;
    let request = if insecure {
        None
    } else {
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls)
            .with_context(|| format!("cannot create {}", tls.display()))?;
        let (request, tls_key) = request(&Identity::Origin(origin.to_owned()))?;
        write_secret_file(&dir.join(&parsed.tls.key_file), tls_key.as_bytes())?;
        let request_path = tls.join("request.csr");
        std::fs::write(&request_path, request)
            .with_context(|| format!("cannot write {}", request_path.display()))?;
        if let Some(ca) = &ca {
            std::fs::write(dir.join(&parsed.tls.ca_file), ca).with_context(|| {
                format!("cannot write the CA certificate into {}", tls.display())
            })?;
        }
        Some(request_path)
    };
    std::fs::write(&config_path, text)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    match format {
        Format::Json => output::json(&json!({
            "config": config_path, "origin": origin, "feed_key": public,
            "certificate_request": request,
        })),
        Format::Table => {
            println!("created {}", config_path.display());
            println!("feed key (mode 0600): {}", dir.join("feed.key").display());
            println!("public feed key, for peers' trusted_origins:");
            println!("  \"{origin}\" = \"{public}\"");
            if let Some(request) = &request {
                println!(
                    "TLS key (mode 0600) and certificate request: {}",
                    request.display()
                );
                println!("send the request to your federation admin, who runs:");
                println!(
                    "  civex ca issue --ca CA_DIR --origin {origin} --csr request.csr --out DIR"
                );
                println!(
                    "and put the cert.pem{} it writes into {}",
                    if ca.is_none() { " and ca.pem" } else { "" },
                    dir.join("tls").display()
                );
            }
            println!("start it: civex-node --config {}", config_path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_receipt(format: Format, receipt: &pb::Receipt) {
    match format {
        Format::Json => output::json(&json!({
            "origin": receipt.origin, "feed_id": hex(&receipt.feed_id),
            "first_seq": receipt.first_seq, "seq": receipt.seq,
            "entry_hash": hex(&receipt.entry_hash), "published": receipt.published,
            "suppressed": receipt.suppressed,
        })),
        Format::Table => output::table(
            &["origin", "seq", "entry hash", "published", "suppressed"],
            &[vec![
                receipt.origin.clone(),
                if receipt.first_seq > 0 && receipt.first_seq < receipt.seq {
                    format!("{}..{}", receipt.first_seq, receipt.seq)
                } else {
                    receipt.seq.to_string()
                },
                hex(&receipt.entry_hash),
                receipt.published.to_string(),
                receipt.suppressed.to_string(),
            ]],
        ),
    }
}

/// Reads a CSV or JSON indicator file; errors read `FILE:LINE: column: what`.
pub(crate) fn read_rows(file: &Path) -> anyhow::Result<Vec<InputRow>> {
    let bytes = std::fs::read(file).with_context(|| format!("{}: cannot read", file.display()))?;
    let text = String::from_utf8(bytes).map_err(|err| {
        let valid = &err.as_bytes()[..err.utf8_error().valid_up_to()];
        let line = 1 + valid.iter().filter(|b| **b == b'\n').count();
        anyhow!(
            "{}:{line}: not UTF-8 text (save the file as UTF-8; nothing was published)",
            file.display()
        )
    })?;
    let is_json = file
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let rows = if is_json {
        parse_json(&text)
    } else {
        parse_csv(&text)
    };
    rows.map_err(|err| anyhow!("{}:{err}", file.display()))
}

pub(crate) fn row_message(row: &InputRow) -> pb::IndicatorRow {
    let (largest_values, largest_shares) = match &row.largest {
        None => (Vec::new(), Vec::new()),
        Some(LargestContributions::Values(values)) => (values.clone(), Vec::new()),
        Some(LargestContributions::Shares(shares)) => (Vec::new(), shares.clone()),
    };
    pb::IndicatorRow {
        indicator: row.indicator.clone(),
        catalog_edition: row.catalog_edition.clone(),
        area: row.area as i32,
        ref_area: row.ref_area.clone(),
        period: row.period.clone(),
        value: row.value,
        unit: row.unit.clone(),
        obs_status: row.obs_status as i32,
        method_notes: row.method_notes.clone(),
        contributors: row.contributors,
        breakdown: row.breakdown.clone(),
        largest_values,
        largest_shares,
    }
}

/// Rewrites the node's "row N: ..." into "FILE:LINE: ...".
fn locate(file: &Path, rows: &[InputRow], message: &str) -> String {
    let located = message
        .strip_prefix("row ")
        .and_then(|rest| rest.split_once(": "))
        .and_then(|(n, rest)| Some((n.parse::<usize>().ok()?, rest)))
        .and_then(|(n, rest)| Some((rows.get(n.checked_sub(1)?)?.line, rest)));
    match located {
        Some((line, rest)) => format!("{}:{line}: {rest}", file.display()),
        None => format!("{}: {message}", file.display()),
    }
}

pub(crate) async fn publish(
    node: &Node,
    format: Format,
    command: PublishCommand,
) -> anyhow::Result<ExitCode> {
    let PublishCommand::Indicators {
        file,
        dry_run,
        wait_secs,
    } = command;
    let rows = read_rows(&file)?;
    let request = pb::PublishIndicatorsRequest {
        idempotency_key: node.idempotency_key()?,
        rows: rows.iter().map(row_message).collect(),
    };
    let publisher = client::publish(node)?;
    if dry_run {
        let result = with_retry(Duration::from_secs(wait_secs), || {
            let (mut publisher, request) = (publisher.clone(), request.clone());
            async move { publisher.preview_indicators(request).await }
        })
        .await;
        return match result {
            Ok(preview) => Ok(print_preview(format, preview.get_ref())),
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                bail!(
                    "{} (this publish would be refused)",
                    locate(&file, &rows, status.message())
                )
            }
            Err(status) if is_too_large(&status) => bail!(too_large(&file, &request, &status)),
            Err(status) => bail!("dry run failed: {}", describe(&status)),
        };
    }
    let result = client::retrying(Duration::from_secs(wait_secs), || {
        let (mut publisher, request) = (publisher.clone(), request.clone());
        async move { publisher.publish_indicators(request).await }
    })
    .await;
    let failed = match result {
        Ok(receipt) => {
            print_receipt(format, receipt.get_ref());
            return Ok(ExitCode::SUCCESS);
        }
        Err(failed) => failed,
    };
    // A refusal the node explained is named as such; an answer that may
    // have been lost says how to learn it.
    let status = &failed.status;
    if !failed.maybe_done {
        match status.code() {
            tonic::Code::InvalidArgument => bail!(
                "{} (nothing was published)",
                locate(&file, &rows, status.message())
            ),
            tonic::Code::FailedPrecondition => bail!("{}: {}", file.display(), status.message()),
            _ if is_too_large(status) => bail!(too_large(&file, &request, status)),
            _ => {}
        }
    }
    bail!(
        "{}: {}",
        file.display(),
        client::publish_failed(&failed, &request.idempotency_key)
    )
}

/// Whether a call failed because its message is above a size limit (the
/// node's `limits.max_message_bytes`, or this CLI's).
fn is_too_large(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
    ) && status.message().contains("message length too large")
}

/// What to tell the operator of a file too large for one message.
fn too_large(
    file: &Path,
    request: &pb::PublishIndicatorsRequest,
    status: &tonic::Status,
) -> String {
    format!(
        "{}: {} rows make a request of {} bytes, more than one message may hold ({}); \
         nothing was published: split the file, or raise limits.max_message_bytes in the \
         node's config (this CLI sends at most {} bytes)",
        file.display(),
        request.rows.len(),
        prost::Message::encoded_len(request),
        status.message(),
        client::MAX_MESSAGE
    )
}

/// Prints what a publish would do; exit code 1 when it would be refused.
fn print_preview(format: Format, preview: &pb::IndicatorPreview) -> ExitCode {
    let value = |v: Option<f64>| v.map_or_else(|| "confidential".to_owned(), |v| v.to_string());
    let rules = |r: &pb::DisclosureRules| {
        r.parameters
            .iter()
            .map(|p| {
                let secret = r.withheld.contains(&format!("{}.{}", p.rule, p.name));
                format!(
                    "{}.{}={}{}",
                    p.rule,
                    p.name,
                    p.value,
                    if secret { " (secret)" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    match format {
        Format::Json => output::json(&json!({
            "cells": preview.cells.iter().map(|c| json!({
                "indicator": c.indicator, "catalog_edition": c.catalog_edition,
                "ref_area": c.ref_area, "period": c.period, "breakdown": c.breakdown,
                "conf_status": conf_status(c.conf_status), "value": c.value, "reason": c.reason,
            })).collect::<Vec<_>>(),
            "rules": preview.rules.iter().map(|r| json!({
                "aggregation": r.aggregation, "parameters": rules(r), "withheld": r.withheld,
            })).collect::<Vec<_>>(),
            "budget": preview.budget.iter().map(|b| json!({
                "indicator": b.indicator, "catalog_edition": b.catalog_edition, "period": b.period,
                "needed": b.needed, "spent": b.spent, "limit": b.limit,
            })).collect::<Vec<_>>(),
            "refusal": preview.refusal,
        })),
        Format::Table => {
            output::table(
                &[
                    "indicator",
                    "ref area",
                    "breakdown",
                    "period",
                    "value",
                    "status",
                    "why",
                ],
                &preview
                    .cells
                    .iter()
                    .map(|c| {
                        vec![
                            c.indicator.clone(),
                            c.ref_area.clone(),
                            c.breakdown.clone(),
                            c.period.clone(),
                            value(c.value),
                            conf_status(c.conf_status).to_owned(),
                            c.reason.clone(),
                        ]
                    })
                    .collect::<Vec<_>>(),
            );
            for r in &preview.rules {
                println!("rules ({}): {}", r.aggregation, rules(r));
            }
            for b in &preview.budget {
                println!(
                    "privacy budget {} {}: this publish spends rho {}, {} of {} spent before",
                    b.indicator, b.period, b.needed, b.spent, b.limit
                );
            }
            if preview.refusal.is_empty() {
                println!("dry run: nothing was published");
            } else {
                println!(
                    "dry run: this publish would be refused: {}",
                    preview.refusal
                );
            }
        }
    }
    if preview.refusal.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Parses a UTC date (YYYY-MM-DD) or RFC 3339 time (`Z` or an offset such
/// as `-03:00`) into Unix seconds.
pub(crate) fn parse_time(field: &str, text: &str) -> anyhow::Result<i64> {
    let wrong = || anyhow!("{field}: {text:?} is not a date (YYYY-MM-DD) or RFC 3339 time");
    let full = if text.len() == 10 {
        format!("{text}T00:00:00Z")
    } else {
        text.to_owned()
    };
    // humantime reads UTC only: an offset is taken off by hand.
    let (local, offset) = match full.len().checked_sub(6).map(|at| full.split_at(at)) {
        Some((local, zone))
            if zone.len() == 6 && matches!(&zone[..1], "+" | "-") && zone.as_bytes()[3] == b':' =>
        {
            let hours: i64 = zone[1..3].parse().map_err(|_| wrong())?;
            let minutes: i64 = zone[4..].parse().map_err(|_| wrong())?;
            if hours > 23 || minutes > 59 {
                return Err(wrong());
            }
            let seconds = hours * 3600 + minutes * 60;
            (
                local,
                if zone.starts_with('-') {
                    -seconds
                } else {
                    seconds
                },
            )
        }
        _ => (full.trim_end_matches('Z'), 0),
    };
    let time = humantime::parse_rfc3339_weak(local).map_err(|_| wrong())?;
    let seconds = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| anyhow!("{field}: {text:?} is before 1970"))?
        .as_secs() as i64
        - offset;
    if seconds < 0 {
        bail!("{field}: {text:?} is before 1970");
    }
    Ok(seconds)
}

/// A time in a signed entry, for people. Any i64 may arrive from a peer's
/// feed: times past year 9999 are named so, never formatted (humantime
/// cannot), and times before 1970 read as 1970.
fn format_unix(seconds: i64) -> String {
    rfc3339(seconds.max(0)).unwrap_or_else(|| "after 9999-12-31".into())
}

fn format_micros(micros: i64) -> String {
    if micros <= 0 {
        return "-".into();
    }
    format_unix(micros / 1_000_000)
}

fn area_arg(text: &str) -> anyhow::Result<i32> {
    parse_area(text)
        .map(|a| a as i32)
        .map_err(|m| anyhow!("--area: {m}"))
}

/// Sends a publish (`key` its idempotency key), retrying while the node
/// is unavailable, and prints its receipt.
async fn send_publish<F, Fut>(
    node: &Node,
    format: Format,
    key: &[u8],
    call: F,
) -> anyhow::Result<ExitCode>
where
    F: Fn(civex_proto::v1::publish_client::PublishClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<pb::Receipt>, tonic::Status>>,
{
    let publisher = client::publish(node)?;
    match client::retrying(Duration::from_secs(10), || call(publisher.clone())).await {
        Ok(receipt) => {
            print_receipt(format, receipt.get_ref());
            Ok(ExitCode::SUCCESS)
        }
        Err(failed) => bail!(client::publish_failed(&failed, key)),
    }
}

pub(crate) async fn offer(
    node: &Node,
    format: Format,
    command: OfferCommand,
) -> anyhow::Result<ExitCode> {
    let idempotency_key = node.idempotency_key()?;
    match command {
        OfferCommand::Publish(args) => {
            let request = pb::PublishOfferRequest {
                idempotency_key,
                offer: Some(pb::ServiceOffer {
                    offer_id: args.id,
                    title: args.title,
                    description: args.description,
                    area: area_arg(&args.area)?,
                    category: args.category,
                    capacity: args.capacity,
                    terms: args.terms,
                    region: args.region,
                    valid_from_unix: parse_time("--valid-from", &args.valid_from)?,
                    valid_until_unix: parse_time("--valid-until", &args.valid_until)?,
                    contact_role: args.contact,
                }),
            };
            send_publish(node, format, &request.idempotency_key, |mut c| {
                let request = request.clone();
                async move { c.publish_offer(request).await }
            })
            .await
        }
        OfferCommand::Withdraw { id, reason } => {
            let request = pb::WithdrawOfferRequest {
                idempotency_key,
                offer_id: id,
                reason,
            };
            send_publish(node, format, &request.idempotency_key, |mut c| {
                let request = request.clone();
                async move { c.withdraw_offer(request).await }
            })
            .await
        }
        OfferCommand::Respond {
            origin,
            offer,
            kind,
            message,
            version,
        } => {
            let kind = match kind.as_str() {
                "interest" => pb::ResponseKind::Interest,
                "accept" => pb::ResponseKind::Accept,
                "decline" => pb::ResponseKind::Decline,
                other => bail!("--kind: {other:?} is not interest, accept or decline"),
            };
            let version = match version {
                Some(text) => unhex(&text).map_err(|m| anyhow!("--version: {m}"))?,
                None => Vec::new(),
            };
            let request = pb::RespondOfferRequest {
                idempotency_key,
                offer_origin: origin,
                offer_id: offer,
                offer_version_hash: version,
                kind: kind as i32,
                message,
            };
            send_publish(node, format, &request.idempotency_key, |mut c| {
                let request = request.clone();
                async move { c.respond_offer(request).await }
            })
            .await
        }
    }
}

pub(crate) async fn retract(
    node: &Node,
    format: Format,
    seq: u64,
    reason: String,
) -> anyhow::Result<ExitCode> {
    let request = pb::RetractRequest {
        idempotency_key: node.idempotency_key()?,
        seq,
        reason,
    };
    send_publish(node, format, &request.idempotency_key, |mut c| {
        let request = request.clone();
        async move { c.retract(request).await }
    })
    .await
}

/// `civex roster ...` (on the federation's roster origin)
#[derive(Subcommand)]
pub(crate) enum RosterCommand {
    /// Add a member, or update it: every node pinning the roster origin
    /// learns its feed key from this signed entry.
    Add {
        /// The member's origin id.
        origin: String,
        /// Its feed key (hex; the `feed.pub` its `civex init` wrote).
        #[arg(long)]
        key: String,
        /// Display name.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Remove a member: its feed is no longer replicated (what is held stays).
    Remove {
        /// The member's origin id.
        origin: String,
    },
    /// Replace a member's lost feed key: its feed ends at the newest entry
    /// this node holds and goes on under the new key and a new feed id;
    /// later entries of the old feed are refused everywhere.
    ReplaceKey {
        /// The member's origin id.
        origin: String,
        /// Its new feed key (hex; printed by `civex key replace`).
        #[arg(long)]
        key: String,
        /// Refuse unless this is the seq of the member's newest entry this
        /// node holds (the feed ends there: a check that the roster keeps
        /// what the member published).
        #[arg(long)]
        last_seq: Option<u64>,
    },
}

pub(crate) async fn roster(
    node: &Node,
    format: Format,
    command: RosterCommand,
) -> anyhow::Result<ExitCode> {
    let entry = match command {
        RosterCommand::Add { origin, key, name } => pb::RosterEntry {
            feed_key: parse_public_key(&key)
                .map_err(|m| anyhow!("--key: {m}"))?
                .to_bytes()
                .to_vec(),
            origin,
            name,
            tls_identity: String::new(),
            removed: false,
            replacements: Vec::new(),
        },
        RosterCommand::Remove { origin } => pb::RosterEntry {
            origin,
            removed: true,
            ..Default::default()
        },
        RosterCommand::ReplaceKey {
            origin,
            key,
            last_seq,
        } => {
            let request = pb::ReplaceFeedKeyRequest {
                idempotency_key: node.idempotency_key()?,
                origin,
                new_feed_key: parse_public_key(&key)
                    .map_err(|m| anyhow!("--key: {m}"))?
                    .to_bytes()
                    .to_vec(),
                last_seq: last_seq.unwrap_or(0),
            };
            if request.last_seq == 0 && last_seq.is_some() {
                bail!("--last-seq: entries start at seq 1");
            }
            return send_publish(node, format, &request.idempotency_key, |mut c| {
                let request = request.clone();
                async move { c.replace_feed_key(request).await }
            })
            .await;
        }
    };
    let request = pb::PublishRosterRequest {
        idempotency_key: node.idempotency_key()?,
        entry: Some(entry),
    };
    send_publish(node, format, &request.idempotency_key, |mut c| {
        let request = request.clone();
        async move { c.publish_roster(request).await }
    })
    .await
}

/// `civex key replace`: a new feed key for a node whose key was lost,
/// made offline; the roster origin names it with `civex roster replace-key`.
pub(crate) fn replace_lost_key(
    config_path: &Path,
    first_key: Option<&str>,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path, std::env::vars())?;
    let key_file = &config.key_file;
    if key_file.exists() {
        bail!(
            "{}: the feed key is there; a key that is not lost is changed with `civex key \
             rotate`; if it leaked, move it out of the way first",
            key_file.display()
        );
    }
    let first_file = key_file.with_extension("pub");
    match (first_file.exists(), first_key) {
        (true, Some(_)) => bail!(
            "--first-key: {} names the feed's first key already",
            first_file.display()
        ),
        (true, None) => {
            let text = std::fs::read_to_string(&first_file)
                .with_context(|| format!("{}: cannot read", first_file.display()))?;
            parse_public_key(&text).map_err(|m| anyhow!("{}: {m}", first_file.display()))?;
        }
        (false, Some(hex_key)) => {
            let key = parse_public_key(hex_key).map_err(|m| anyhow!("--first-key: {m}"))?;
            civex_node::keys::replace_file(
                &first_file,
                format!("{}\n", public_key_hex(&key)).as_bytes(),
            )
            .with_context(|| format!("{}: cannot write", first_file.display()))?;
        }
        (false, None) => bail!(
            "{} is missing too: it names the feed's first key, which verifying the feed's \
             history needs; give --first-key HEX (the key the federation roster names for {})",
            first_file.display(),
            config.origin
        ),
    }
    let key = create_key_file(key_file)?;
    let public = public_key_hex(&key.verifying_key());
    match format {
        Format::Json => println!(
            "{}",
            json!({"origin": config.origin, "key_file": key_file.display().to_string(), "new_key": public})
        ),
        Format::Table => {
            println!("new feed key {} written (mode 0600)", key_file.display());
            println!("public key: {public}");
            println!(
                "next: the federation's roster operator runs `civex roster replace-key {} --key {public}`; \
                 this node publishes again once it has that roster entry",
                config.origin
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `civex key rotate`: the node makes a new feed key and hands its feed to
/// it with an entry signed by the current key.
pub(crate) async fn rotate_key(node: &Node, format: Format) -> anyhow::Result<ExitCode> {
    let request = pb::RotateKeyRequest {
        idempotency_key: node.idempotency_key()?,
    };
    let code = send_publish(node, format, &request.idempotency_key, |mut c| {
        let request = request.clone();
        async move { c.rotate_key(request).await }
    })
    .await?;
    if code == ExitCode::SUCCESS && format == Format::Table {
        println!(
            "the node now signs with a new key, in its key file (key_file in node.toml): back \
             that file up now; a copy of the old one no longer starts the node"
        );
    }
    Ok(code)
}

fn obs_status(value: i32) -> &'static str {
    match pb::ObservationStatus::try_from(value) {
        Ok(pb::ObservationStatus::Normal) => "normal",
        Ok(pb::ObservationStatus::Estimated) => "estimated",
        Ok(pb::ObservationStatus::Provisional) => "provisional",
        Ok(pb::ObservationStatus::Break) => "break",
        Err(_) => "unknown",
    }
}

fn conf_status(value: i32) -> &'static str {
    match pb::ConfidentialityStatus::try_from(value) {
        Ok(pb::ConfidentialityStatus::Free) => "free",
        Ok(pb::ConfidentialityStatus::SuppressedSmallCounts) => "small-counts",
        Ok(pb::ConfidentialityStatus::SuppressedDominance) => "dominance",
        Ok(pb::ConfidentialityStatus::SuppressedSecondary) => "secondary",
        Err(_) => "unknown",
    }
}

/// Reads every page of a listing: `fetch` is asked for the page of each
/// token (the empty token first) and answers its items and the next token,
/// empty after the last page. A node that hands out a token already asked
/// with is stopped, so pages that go round in a circle, however wide,
/// cannot keep the reading going.
async fn every_page<T>(
    mut fetch: impl AsyncFnMut(String) -> anyhow::Result<(Vec<T>, String)>,
) -> anyhow::Result<Vec<T>> {
    let mut asked = std::collections::HashSet::new();
    let mut token = String::new();
    let mut items = Vec::new();
    loop {
        asked.insert(token.clone());
        let (page, next) = fetch(token).await?;
        items.extend(page);
        if next.is_empty() {
            return Ok(items);
        }
        if asked.contains(&next) {
            bail!(
                "the node handed out page token {next:?} a second time: its pages do not advance"
            );
        }
        token = next;
    }
}

/// Fetches every page of observations.
pub(crate) async fn all_observations(
    node: &Node,
    request: pb::ObservationsRequest,
) -> anyhow::Result<Vec<pb::ObservationRecord>> {
    let mut query = client::query(node).await?;
    every_page(async |page_token| {
        let request = pb::ObservationsRequest {
            page_token,
            ..request.clone()
        };
        let page = query
            .observations(request)
            .await
            .map_err(|s| anyhow!("query refused: {}", describe(&s)))?
            .into_inner();
        Ok((page.observations, page.next_page_token))
    })
    .await
}

/// Fetches every page of offers.
pub(crate) async fn all_offers(
    node: &Node,
    request: pb::OffersRequest,
) -> anyhow::Result<Vec<pb::OfferRecord>> {
    let mut query = client::query(node).await?;
    every_page(async |page_token| {
        let request = pb::OffersRequest {
            page_token,
            ..request.clone()
        };
        let page = query
            .offers(request)
            .await
            .map_err(|s| anyhow!("query refused: {}", describe(&s)))?
            .into_inner();
        Ok((page.offers, page.next_page_token))
    })
    .await
}

/// How far this node is behind a peer in one origin: by the further of
/// what the peer delivered and what it reported (unverified).
fn lag_of(o: &pb::PeerOriginLag) -> u64 {
    o.peer_seq.max(o.reported_seq).saturating_sub(o.held_seq)
}

/// Fetches every page of the node's heads, checking that their origins
/// go up (as the node promises).
pub(crate) async fn all_heads(node: &Node) -> anyhow::Result<Vec<pb::Head>> {
    let mut feed = client::feed(node).await?;
    let mut last: Option<String> = None;
    every_page(async |page_token| {
        let request = pb::HeadsRequest {
            page_size: civex_node::service::MAX_CURSORS as u32,
            page_token,
        };
        let token = request.page_token.clone();
        let page = feed
            .heads(request)
            .await
            .map_err(|s| anyhow!("heads refused (page token {token:?}): {}", describe(&s)))?
            .into_inner();
        for head in &page.heads {
            if let Some(last) = last.as_ref().filter(|last| head.origin <= **last) {
                bail!(
                    "the node listed origin {:?} after {:?}: its heads are not in order",
                    head.origin,
                    last
                );
            }
            last = Some(head.origin.clone());
        }
        Ok((page.heads, page.next_page_token))
    })
    .await
}

fn value_text(observation: &pb::Observation) -> String {
    observation
        .value
        .map_or_else(|| "confidential".to_owned(), |v| v.to_string())
}

pub(crate) async fn query(
    node: &Node,
    format: Format,
    command: QueryCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        QueryCommand::Observations {
            area,
            indicator,
            origin,
            from,
            to,
            page_size,
        } => {
            let request = pb::ObservationsRequest {
                areas: area.iter().map(|a| area_arg(a)).collect::<Result<_, _>>()?,
                indicators: indicator,
                origins: origin,
                period_from: from.unwrap_or_default(),
                period_to: to.unwrap_or_default(),
                page_size,
                page_token: String::new(),
            };
            let records = all_observations(node, request).await?;
            match format {
                Format::Json => output::json(&serde_json::Value::Array(
                    records
                        .iter()
                        .map(|r| {
                            let o = r.observation.clone().unwrap_or_default();
                            let rules = r.rules.clone().unwrap_or_default();
                            json!({
                                "origin": r.origin, "seq": r.seq, "indicator": o.indicator,
                                "catalog_edition": o.catalog_edition, "area": area_slug(o.area),
                                "ref_area": o.ref_area, "breakdown": o.breakdown,
                                "period": o.period, "value": o.value,
                                "unit": o.unit, "obs_status": obs_status(o.obs_status),
                                "conf_status": conf_status(o.conf_status),
                                "rules": format!("{} v{}", rules.name, rules.version),
                            })
                        })
                        .collect(),
                )),
                Format::Table => output::table(
                    &[
                        "origin",
                        "indicator",
                        "ref area",
                        "breakdown",
                        "period",
                        "value",
                        "unit",
                        "area",
                        "status",
                    ],
                    &records
                        .iter()
                        .map(|r| {
                            let o = r.observation.clone().unwrap_or_default();
                            vec![
                                r.origin.clone(),
                                o.indicator.clone(),
                                o.ref_area.clone(),
                                o.breakdown.clone(),
                                o.period.clone(),
                                value_text(&o),
                                o.unit.clone(),
                                area_slug(o.area).to_owned(),
                                obs_status(o.obs_status).to_owned(),
                            ]
                        })
                        .collect::<Vec<_>>(),
                ),
            }
        }
        QueryCommand::Offers {
            area,
            category,
            origin,
            all,
        } => {
            let request = pb::OffersRequest {
                areas: area.iter().map(|a| area_arg(a)).collect::<Result<_, _>>()?,
                categories: category,
                origins: origin,
                include_inactive: all,
                ..Default::default()
            };
            let offers = all_offers(node, request).await?;
            print_offers(format, &offers);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn response_kind(value: i32) -> &'static str {
    match pb::ResponseKind::try_from(value) {
        Ok(pb::ResponseKind::Interest) => "interest",
        Ok(pb::ResponseKind::Accept) => "accept",
        Ok(pb::ResponseKind::Decline) => "decline",
        _ => "unknown",
    }
}

pub(crate) fn print_offers(format: Format, offers: &[pb::OfferRecord]) {
    match format {
        Format::Json => output::json(&serde_json::Value::Array(
            offers
                .iter()
                .map(|r| {
                    let o = r.offer.clone().unwrap_or_default();
                    json!({
                        "origin": r.origin, "offer_id": o.offer_id, "version": hex(&r.version_hash),
                        "seq": r.seq, "title": o.title, "area": area_slug(o.area),
                        "category": o.category, "capacity": o.capacity, "region": o.region,
                        "valid_from": format_unix(o.valid_from_unix),
                        "valid_until": format_unix(o.valid_until_unix),
                        "contact": o.contact_role, "active": r.active,
                        "responses": r.responses.iter().map(|p| {
                            let resp = p.response.clone().unwrap_or_default();
                            json!({"origin": p.origin, "seq": p.seq, "kind": response_kind(resp.kind), "message": resp.message})
                        }).collect::<Vec<_>>(),
                        "more_responses": r.more_responses,
                    })
                })
                .collect(),
        )),
        Format::Table => output::table(
            &["origin", "offer", "title", "area", "category", "valid until", "active", "responses"],
            &offers
                .iter()
                .map(|r| {
                    let o = r.offer.clone().unwrap_or_default();
                    let mut responses = r
                        .responses
                        .iter()
                        .map(|p| {
                            let kind = p.response.as_ref().map_or(0, |x| x.kind);
                            format!("{}:{}", p.origin, response_kind(kind))
                        })
                        .collect::<Vec<_>>();
                    if r.more_responses {
                        responses.push("(more not shown)".into());
                    }
                    let responses = responses.join(" ");
                    vec![
                        r.origin.clone(),
                        o.offer_id.clone(),
                        o.title.clone(),
                        area_slug(o.area).to_owned(),
                        o.category.clone(),
                        format_unix(o.valid_until_unix),
                        if r.active { "yes" } else { "no" }.to_owned(),
                        responses,
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
}

fn describe_payload(body: &pb::EntryBody) -> String {
    match &body.payload {
        Some(Payload::Indicators(batch)) => {
            let suppressed = batch
                .observations
                .iter()
                .filter(|o| o.value.is_none())
                .count();
            format!(
                "indicators: {} cells, {suppressed} suppressed",
                batch.observations.len()
            )
        }
        Some(Payload::Offer(offer)) => format!("offer {}: {}", offer.offer_id, offer.title),
        Some(Payload::Withdrawal(w)) => format!("withdrawal of offer {}", w.offer_id),
        Some(Payload::Response(r)) => {
            format!(
                "{} for offer {}/{}",
                response_kind(r.kind),
                r.offer_origin,
                r.offer_id
            )
        }
        Some(Payload::Retraction(r)) => format!("retraction of seq {}", r.seq),
        Some(Payload::KeyRotation(r)) => format!("key rotation to {}", hex(&r.new_key)),
        Some(Payload::Roster(r)) if r.removed => format!("roster: {} removed", r.origin),
        Some(Payload::Roster(r)) => format!(
            "roster: {} ({}) with key {}",
            r.origin,
            r.name,
            hex(&r.feed_key)
        ),
        None => "unknown payload kind".into(),
    }
}

fn resolver_for(
    config: Option<&Path>,
    keys: &[String],
) -> anyhow::Result<BTreeMap<String, ed25519_dalek::VerifyingKey>> {
    let mut resolved = BTreeMap::new();
    if let Some(path) = config {
        let config = Config::load(path, std::env::vars())?;
        resolved.extend(
            config
                .pinned_keys()
                .map_err(|m| anyhow!("{}: {m}", path.display()))?,
        );
        let own = load_key_file(&config.key_file)?;
        resolved.insert(config.origin.clone(), genesis_key(&config.key_file, &own)?);
    }
    for pair in keys {
        let (origin, key) = pair
            .split_once('=')
            .ok_or_else(|| anyhow!("--key: {pair:?} is not ORIGIN=HEX"))?;
        check_origin_id(origin).map_err(|m| anyhow!("--key: {m}"))?;
        resolved.insert(
            origin.to_owned(),
            parse_public_key(key).map_err(|m| anyhow!("--key {origin}: {m}"))?,
        );
    }
    if resolved.is_empty() {
        bail!("no keys to verify with: give --config node.toml or --key ORIGIN=HEX");
    }
    Ok(resolved)
}

/// Decodes and verifies consecutive entries of `origin` after `tip` with
/// `key`, moving both past them (a rotation or a lost key's replacement
/// changes the key). Entries a later signature may still cover wait in
/// `uncovered`, and are verified again with the next entries.
fn verified(
    node: &Node,
    origin: &str,
    key: &mut ed25519_dalek::VerifyingKey,
    replacements: &[Replacement],
    tip: &mut Option<Tip>,
    uncovered: &mut Uncovered,
    entries: Vec<pb::SignedEntry>,
) -> anyhow::Result<Vec<Entry>> {
    let refused = |e: civex_node::core::feed::FeedError| {
        anyhow!("refused entry of {origin} from {}: {e}", node.address)
    };
    let entries = entries
        .into_iter()
        .map(Entry::decode)
        .collect::<Result<Vec<_>, _>>()
        .map_err(refused)?;
    let held = std::mem::take(uncovered);
    let out = authenticate(origin, key, replacements, *tip, held, entries);
    if let Some((fault, _)) = out.refused {
        return Err(refused(fault));
    }
    (*tip, *key, *uncovered) = (out.tip, out.key, out.uncovered);
    Ok(out.accepted)
}

/// The refusal of `first`, an entry whose signature fails, when the node's
/// backlog ended before a later signature covered it.
fn uncovered_error(node: &Node, first: &Entry) -> anyhow::Error {
    anyhow!(
        "refused entry of {} from {}: seq {} has an invalid signature, and no later signature covers it",
        first.body.origin,
        node.address,
        first.body.seq
    )
}

/// The members (feed key of seq 1 and lost keys' replacements) in the
/// roster origin's feed as the node holds it now, every entry verified
/// with the roster origin's key (and the keys its rotations name).
async fn roster_members(
    node: &Node,
    roster_origin: &str,
    key: ed25519_dalek::VerifyingKey,
) -> anyhow::Result<(BTreeMap<String, Member>, u64)> {
    let mut stream = client::subscribe_from_start(node, &[roster_origin.to_owned()]).await?;
    let (mut key, mut tip, mut uncovered) = (key, None, Uncovered::default());
    let mut members = BTreeMap::new();
    while let Some(message) = stream
        .message()
        .await
        .map_err(|s| anyhow!("roster stream failed: {}", describe(&s)))?
    {
        let batch = match message.event {
            Some(Event::Entries(batch)) => batch,
            Some(Event::Drained(_)) => break,
            _ => continue,
        };
        let entries = batch.entries;
        let origin = &batch.origin;
        for entry in verified(
            node,
            origin,
            &mut key,
            &[],
            &mut tip,
            &mut uncovered,
            entries,
        )? {
            if let Some((origin, member)) = roster_member(&entry)? {
                match member {
                    Some(member) => members.insert(origin, member),
                    None => members.remove(&origin),
                };
            }
        }
    }
    if let Some(first) = uncovered.entries().first() {
        return Err(uncovered_error(node, first));
    }
    Ok((members, tip.map_or(0, |t| t.seq)))
}

/// What a verified roster entry says of its member: `None` if it is not a
/// roster entry; the member's origin and, unless removed, its keys.
fn roster_member(entry: &Entry) -> anyhow::Result<Option<(String, Option<Member>)>> {
    let Some(Payload::Roster(member)) = &entry.body.payload else {
        return Ok(None);
    };
    let key = <[u8; 32]>::try_from(member.feed_key.as_slice())
        .ok()
        .and_then(|bytes| ed25519_dalek::VerifyingKey::from_bytes(&bytes).ok());
    let keys = match key {
        Some(key) if !member.removed => {
            let replacements = replacements_of(member).ok_or_else(|| {
                anyhow!(
                    "the roster's entry for {} at seq {} names malformed key replacements",
                    member.origin,
                    entry.body.seq
                )
            })?;
            Some(Member {
                key,
                replacements,
                removed: false,
            })
        }
        _ => None,
    };
    Ok(Some((member.origin.clone(), keys)))
}

pub(crate) async fn feed(
    node: &Node,
    format: Format,
    command: FeedCommand,
) -> anyhow::Result<ExitCode> {
    let FeedCommand::Tail {
        config,
        key,
        origin,
        count,
    } = command;
    let mut keys = resolver_for(config.as_deref(), &key)?;
    // Members' keys from the federation roster, read and verified first.
    let roster_origin = match &config {
        Some(path) => {
            Config::load(path, std::env::vars())?
                .federation
                .roster_origin
        }
        None => None,
    };
    let mut replacements: BTreeMap<String, Vec<Replacement>> = BTreeMap::new();
    // The roster's entries after those read now are followed while the tail
    // runs: a lost key's replacement applies at once, and without --origin
    // members the roster adds are followed too.
    let follow_roster = roster_origin.clone().filter(|r| keys.contains_key(r));
    let mut members = BTreeMap::new();
    let mut roster_read = 0;
    if let Some(roster_origin) = roster_origin {
        if let Some(&roster_key) = keys.get(&roster_origin) {
            (members, roster_read) = roster_members(node, &roster_origin, roster_key).await?;
            for (origin, member) in &members {
                // A key given by hand wins, as a pinned key does on a node.
                let key = *keys.entry(origin.clone()).or_insert(member.key);
                if key == member.key {
                    replacements.insert(origin.clone(), member.replacements.clone());
                }
            }
        }
    }
    let origins: Vec<String> = if origin.is_empty() {
        keys.keys().cloned().collect()
    } else {
        for o in &origin {
            if !keys.contains_key(o) {
                bail!("--origin {o}: no key to verify it with");
            }
        }
        origin.clone()
    };
    // What is shown: every origin followed, or those asked for.
    let shown = |o: &str| origin.is_empty() || origin.iter().any(|asked| asked == o);
    // The roster origin is read again from its start (its rotations
    // followed), shown only if asked for.
    let mut tips: BTreeMap<String, Option<Tip>> = origins
        .iter()
        .chain(follow_roster.as_ref())
        .map(|o| (o.clone(), None))
        .collect();
    let mut stream = client::subscribe_at(node, &tips).await?;
    let mut uncovered: BTreeMap<String, Uncovered> = BTreeMap::new();
    let mut seen = 0u64;
    if count == Some(0) {
        return Ok(ExitCode::SUCCESS);
    }
    while let Some(message) = stream
        .message()
        .await
        .map_err(|s| anyhow!("stream failed: {}", describe(&s)))?
    {
        let batch = match message.event {
            Some(Event::Entries(batch)) => batch,
            // The node's backlog ended: nothing more covers what waits.
            Some(Event::Drained(drained)) => {
                if let Some(first) = uncovered
                    .get(&drained.origin)
                    .and_then(|u| u.entries().first())
                {
                    return Err(uncovered_error(node, first));
                }
                continue;
            }
            Some(Event::NotServed(not_served)) => bail!(
                "the node does not serve origin {} to this identity ({})",
                not_served.origin,
                not_served.reason
            ),
            _ => continue,
        };
        let (Some(key), Some(tip)) = (keys.get_mut(&batch.origin), tips.get_mut(&batch.origin))
        else {
            bail!(
                "the node sent origin {:?}, which was not asked for",
                batch.origin
            );
        };
        let replaced = replacements
            .get(&batch.origin)
            .map_or(&[][..], Vec::as_slice);
        let held = uncovered.entry(batch.origin.clone()).or_default();
        let entries = verified(node, &batch.origin, key, replaced, tip, held, batch.entries)?;
        let mut joined = false;
        for entry in &entries {
            let new_in_roster = follow_roster.as_deref() == Some(entry.body.origin.as_str())
                && entry.body.seq > roster_read;
            let Some((member, named)) = roster_member(entry)?.filter(|_| new_in_roster) else {
                continue;
            };
            // A removed member is followed on; what it published stays valid.
            let Some(named) = named else { continue };
            match members.get(&member) {
                None if !keys.contains_key(&member) && origin.is_empty() => {
                    keys.insert(member.clone(), named.key);
                    tips.insert(member.clone(), None);
                    replacements.insert(member.clone(), named.replacements.clone());
                    members.insert(member, named);
                    joined = true;
                }
                Some(known) if known.key == named.key && replacements.contains_key(&member) => {
                    replacements.insert(member.clone(), named.replacements.clone());
                    members.insert(member, named);
                }
                // A key given by hand, or another first key: left as is.
                _ => {}
            }
        }
        for entry in entries.into_iter().filter(|e| shown(&e.body.origin)) {
            match format {
                Format::Json => println!(
                    "{}",
                    json!({
                        "origin": entry.body.origin, "seq": entry.body.seq,
                        "time": format_micros(entry.body.time_unix_micros),
                        "hash": hex(&entry.hash), "what": describe_payload(&entry.body),
                    })
                ),
                Format::Table => println!(
                    "{}  {:>6}  {}  {}  {}",
                    entry.body.origin,
                    entry.body.seq,
                    format_micros(entry.body.time_unix_micros),
                    &hex(&entry.hash)[..16],
                    describe_payload(&entry.body)
                ),
            }
            seen += 1;
            if count.is_some_and(|c| seen >= c) {
                return Ok(ExitCode::SUCCESS);
            }
        }
        if joined {
            // A new member: subscribe again, every origin from where it is
            // (entries held back come again).
            stream = client::subscribe_at(node, &tips).await?;
            uncovered.clear();
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `civex peer ...`
#[derive(Subcommand)]
pub(crate) enum PeerCommand {
    /// Add a peer (or replace the one of the same name): the node starts
    /// replicating from it at once. Persisted and audited.
    Add {
        /// Name, [a-z0-9][a-z0-9-]{0,63}.
        name: String,
        /// host:port of its node.
        #[arg(long)]
        address: String,
        /// Origin id its certificate must name.
        #[arg(long)]
        origin: String,
        /// An origin it may read from this node (repeatable); default: all.
        /// It may always read its own origin's feed back.
        #[arg(long = "read")]
        may_read: Vec<String>,
        /// Take only its own origin from it, not other origins it relays.
        #[arg(long)]
        no_relay: bool,
    },
    /// Remove a peer: replication from it stops; what it sent stays.
    Remove {
        /// Name of the peer.
        name: String,
    },
    /// Every peer, from node.toml and from runtime changes.
    List,
}

pub(crate) async fn peer(
    node: &Node,
    format: Format,
    command: PeerCommand,
) -> anyhow::Result<ExitCode> {
    let mut admin = client::admin(node).await?;
    let refused = |s: tonic::Status| anyhow!("refused: {}", describe(&s));
    let peers = match command {
        PeerCommand::Add {
            name,
            address,
            origin,
            may_read,
            no_relay,
        } => {
            let request = pb::AddPeerRequest {
                peer: Some(pb::PeerRecord {
                    name,
                    address,
                    origin,
                    may_read,
                    relay: !no_relay,
                    source: String::new(),
                }),
            };
            vec![admin.add_peer(request).await.map_err(refused)?.into_inner()]
        }
        PeerCommand::Remove { name } => {
            admin
                .remove_peer(pb::RemovePeerRequest { name: name.clone() })
                .await
                .map_err(refused)?;
            match format {
                Format::Json => output::json(&json!({ "removed": name })),
                Format::Table => println!("removed peer {name}"),
            }
            return Ok(ExitCode::SUCCESS);
        }
        PeerCommand::List => {
            admin
                .list_peers(pb::ListPeersRequest {})
                .await
                .map_err(refused)?
                .into_inner()
                .peers
        }
    };
    match format {
        Format::Json => output::json(&json!(peers
            .iter()
            .map(|p| json!({
                "name": p.name, "address": p.address, "origin": p.origin,
                "may_read": p.may_read, "relay": p.relay, "source": p.source,
            }))
            .collect::<Vec<_>>())),
        Format::Table => output::table(
            &["peer", "address", "origin", "may read", "relay", "source"],
            &peers
                .iter()
                .map(|p| {
                    vec![
                        p.name.clone(),
                        p.address.clone(),
                        p.origin.clone(),
                        if p.may_read.is_empty() {
                            "all".to_owned()
                        } else {
                            p.may_read.join(",")
                        },
                        if p.relay { "yes" } else { "no" }.to_owned(),
                        p.source.clone(),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn audit(node: &Node, format: Format) -> anyhow::Result<ExitCode> {
    let mut admin = client::admin(node).await?;
    let entries = every_page(async |page_token| {
        let page = admin
            .audit_log(pb::AuditLogRequest {
                page_token,
                ..Default::default()
            })
            .await
            .map_err(|s| anyhow!("refused: {}", describe(&s)))?
            .into_inner();
        Ok((page.entries, page.next_page_token))
    })
    .await?;
    match format {
        Format::Json => output::json(&json!(entries
            .iter()
            .map(|e| json!({
                "time": format_micros(e.time_unix_micros), "who": e.who,
                "action": e.action, "detail": e.detail,
            }))
            .collect::<Vec<_>>())),
        Format::Table => output::table(
            &["time", "who", "action", "detail"],
            &entries
                .iter()
                .map(|e| {
                    vec![
                        format_micros(e.time_unix_micros),
                        e.who.clone(),
                        e.action.clone(),
                        e.detail.clone(),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// "(N more ... not shown)" for a list the node cut, or nothing.
fn not_shown(count: u64, what: &str) -> Option<String> {
    (count > 0).then(|| format!("({count} more {what} not shown)"))
}

/// The first 16 hex digits of a hash, for tables.
fn short_hex(bytes: &[u8]) -> String {
    hex(&bytes[..bytes.len().min(8)])
}

fn conflict_json(c: &pb::ConflictReport) -> serde_json::Value {
    json!({
        "origin": c.origin, "kind": c.kind, "seq": c.seq, "peer": c.peer,
        "detected": format_micros(c.detected_unix_micros),
        "held_seq": c.held_seq, "held_hash": hex(&c.held_hash), "held_size": c.held_size,
        "other_hash": hex(&c.other_hash), "other_size": c.other_size,
    })
}

pub(crate) async fn status(node: &Node, format: Format) -> anyhow::Result<ExitCode> {
    let status = client::status(node)
        .await?
        .node_status(pb::NodeStatusRequest {})
        .await
        .map_err(|s| anyhow!("status refused: {}", describe(&s)))?
        .into_inner();
    match format {
        Format::Json => output::json(&json!({
            "origin": status.origin,
            "publish_ready": status.publish_ready,
            "index_pieces_pending": status.index_pieces_pending,
            "heads": status.heads.iter().map(|h| json!({
                "origin": h.origin, "feed_id": hex(&h.feed_id), "seq": h.seq,
                "entry_hash": hex(&h.entry_hash), "time": format_micros(h.time_unix_micros),
                "received": format_micros(h.received_unix_micros),
            })).collect::<Vec<_>>(),
            "heads_not_shown": status.heads_not_shown,
            "peers": status.peers.iter().map(|p| json!({
                "name": p.name, "address": p.address, "connected": p.connected,
                "last_error": p.last_error, "refused": p.refused,
                "origins": p.origins.iter().map(|o| json!({
                    "origin": o.origin, "held_seq": o.held_seq, "peer_seq": o.peer_seq,
                    "reported_seq": o.reported_seq, "lag": lag_of(o),
                })).collect::<Vec<_>>(),
                "origins_not_shown": p.origins_not_shown,
                "origins_behind": p.origins_behind,
                "entries_behind": p.entries_behind,
            })).collect::<Vec<_>>(),
            "peers_not_shown": status.peers_not_shown,
            "conflicts": status.conflicts.iter().map(conflict_json).collect::<Vec<_>>(),
            "conflicts_not_shown": status.conflicts_not_shown,
        })),
        Format::Table => {
            println!(
                "node {}: publishing {}",
                status.origin,
                if status.publish_ready {
                    "open"
                } else {
                    "closed (waiting for a peer or the disk)"
                }
            );
            println!();
            output::table(
                &["origin", "seq", "last entry time", "received"],
                &status
                    .heads
                    .iter()
                    .map(|h| {
                        vec![
                            h.origin.clone(),
                            h.seq.to_string(),
                            format_micros(h.time_unix_micros),
                            format_micros(h.received_unix_micros),
                        ]
                    })
                    .collect::<Vec<_>>(),
            );
            if let Some(more) = not_shown(status.heads_not_shown, "origins") {
                println!("{more}");
            }
            if !status.peers.is_empty() {
                println!();
                let mut rows = Vec::new();
                for peer in &status.peers {
                    // The origins this node lags furthest behind first.
                    let mut lag = peer
                        .origins
                        .iter()
                        .map(|o| format!("{}:{}", o.origin, lag_of(o)))
                        .collect::<Vec<_>>();
                    lag.extend(not_shown(peer.origins_not_shown, "origins"));
                    let behind = match peer.origins_behind {
                        0 => "-".to_owned(),
                        n => format!(
                            "{n} origin{}, {} entries",
                            if n == 1 { "" } else { "s" },
                            peer.entries_behind
                        ),
                    };
                    rows.push(vec![
                        peer.name.clone(),
                        peer.address.clone(),
                        if peer.connected { "yes" } else { "no" }.to_owned(),
                        behind,
                        lag.join(" "),
                        peer.refused.to_string(),
                        peer.last_error.clone(),
                    ]);
                }
                output::table(
                    &[
                        "peer",
                        "address",
                        "connected",
                        "behind",
                        "lag",
                        "refused",
                        "last error",
                    ],
                    &rows,
                );
            }
            if let Some(more) = not_shown(status.peers_not_shown, "peers") {
                println!("{more}");
            }
            if !status.conflicts.is_empty() {
                println!();
                println!("conflicts on record (these origins are not replicated):");
                output::table(
                    &[
                        "origin",
                        "kind",
                        "seq",
                        "held",
                        "other",
                        "from peer",
                        "detected",
                    ],
                    &status
                        .conflicts
                        .iter()
                        .map(|c| {
                            vec![
                                c.origin.clone(),
                                c.kind.clone(),
                                c.seq.to_string(),
                                short_hex(&c.held_hash),
                                short_hex(&c.other_hash),
                                c.peer.clone(),
                                format_micros(c.detected_unix_micros),
                            ]
                        })
                        .collect::<Vec<_>>(),
                );
                if let Some(more) = not_shown(status.conflicts_not_shown, "conflicts") {
                    println!("{more}");
                }
                println!("the evidence, both entries as signed: civex conflict ORIGIN");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One entry of conflict evidence, for JSON: what it is and its signed
/// bytes, so anyone holding the origin's key can check it.
fn evidence_json(signed: &pb::SignedEntry) -> serde_json::Value {
    let mut value = match Entry::decode(signed.clone()) {
        Ok(entry) => json!({
            "seq": entry.body.seq, "feed_id": hex(&entry.body.feed_id),
            "prev_hash": hex(&entry.body.prev_hash),
            "time": format_micros(entry.body.time_unix_micros),
            "hash": hex(&entry.hash), "what": describe_payload(&entry.body),
        }),
        Err(err) => json!({ "error": err.to_string() }),
    };
    value["size"] = json!(signed.body.len() + signed.signature.len());
    value["body"] = json!(hex(&signed.body));
    value["signature"] = json!(hex(&signed.signature));
    value
}

/// `civex conflict ORIGIN`: the evidence of a conflict on record.
pub(crate) async fn conflict(
    node: &Node,
    format: Format,
    origin: &str,
) -> anyhow::Result<ExitCode> {
    let evidence = client::status(node)
        .await?
        .conflict_evidence(pb::ConflictEvidenceRequest {
            origin: origin.to_owned(),
        })
        .await
        .map_err(|s| anyhow!("no evidence: {}", describe(&s)))?
        .into_inner();
    let report = evidence.report.unwrap_or_default();
    let (held, other) = (
        evidence.held.unwrap_or_default(),
        evidence.other.unwrap_or_default(),
    );
    match format {
        Format::Json => {
            let mut value = conflict_json(&report);
            value["held"] = evidence_json(&held);
            value["other"] = evidence_json(&other);
            output::json(&value);
        }
        Format::Table => {
            println!(
                "{} of {} at seq {}, from peer {}, found {}; both entries are signed by its key",
                report.kind,
                report.origin,
                report.seq,
                report.peer,
                format_micros(report.detected_unix_micros)
            );
            println!();
            let row = |role: &str, signed: &pb::SignedEntry| {
                let size = (signed.body.len() + signed.signature.len()).to_string();
                match Entry::decode(signed.clone()) {
                    Ok(entry) => vec![
                        role.to_owned(),
                        entry.body.seq.to_string(),
                        hex(&entry.body.feed_id),
                        format_micros(entry.body.time_unix_micros),
                        hex(&entry.hash),
                        size,
                        describe_payload(&entry.body),
                    ],
                    Err(err) => vec![
                        role.to_owned(),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                        size,
                        err.to_string(),
                    ],
                }
            };
            output::table(
                &["entry", "seq", "feed id", "time", "hash", "bytes", "what"],
                &[row("held", &held), row("other", &other)],
            );
            println!();
            println!("--output json prints both entries' signed bytes (body and signature, hex)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn verify(config_path: &Path, format: Format) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path, std::env::vars())?;
    let keys = node_keys(&config, config_path)?;
    let opened =
        civex_node::store::SledStore::open_existing(&config.data_dir, config.store.cache_mb << 20)?;
    let unrecorded = opened
        .unrecorded_log()
        .map(|(log, bytes)| (log.to_owned(), bytes));
    let store: civex_node::store::SharedStore = std::sync::Arc::new(opened);
    // Members' keys from the roster origin's entries held, as the node
    // learns them (the roster origin's own feed is verified with its pinned
    // key like any other: a tampered roster makes the report unclean).
    civex_node::replicate::Roster::new(
        config.federation.roster_origin.clone(),
        keys.clone(),
        store.clone(),
    )
    .refresh()?;
    let total: u64 = store.heads()?.iter().map(|(_, h)| h.tip.seq).sum();
    let progress = Progress::new("verifying", total);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let started = std::time::Instant::now();
    let report =
        civex_node::audit::audit(store.as_ref(), &keys, threads, &|done| progress.set(done))?;
    progress.finish();
    print_report(&report, started.elapsed().as_secs_f64(), format);
    if let Some((log, bytes)) = unrecorded {
        // On stderr, so that --output json stays one document.
        eprintln!(
            "warning: {}: {bytes} bytes past the length the store recorded: the end of a \
             commit a crash cut short (the node moves it to a file of its own at its next \
             start), or, if the node did not crash, commits the store lost (sled's db damaged); \
             their entries are not verified here",
            log.display()
        );
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The keys a node verifies with: its own (of seq 1) and its pinned ones;
/// the roster's members are added from the store. The own key of seq 1 is
/// read from `feed.pub` where there is one, so that verifying needs no
/// secret (the key may be kept apart, spec rule 10); only without it is
/// it derived from the key file.
pub(crate) fn node_keys(
    config: &Config,
    config_path: &Path,
) -> anyhow::Result<std::sync::Arc<KeyResolver>> {
    let public = config.key_file.with_extension("pub");
    let genesis = match std::fs::read_to_string(&public) {
        Ok(text) => civex_node::keys::parse_public_key(&text)
            .map_err(|err| anyhow!("{}: {err}", public.display()))?,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            genesis_key(&config.key_file, &load_key_file(&config.key_file)?)?
        }
        Err(err) => return Err(anyhow!("{}: cannot read: {err}", public.display())),
    };
    let pinned = config
        .pinned_keys()
        .map_err(|m| anyhow!("{}: {m}", config_path.display()))?;
    Ok(std::sync::Arc::new(KeyResolver::new(
        &config.origin,
        genesis,
        pinned,
    )))
}

/// Prints what an audit of a store found, per origin.
pub(crate) fn print_report(report: &civex_node::audit::Report, seconds: f64, format: Format) {
    match format {
        Format::Json => output::json(&json!({
            "clean": report.is_clean(),
            "verified": report.verified(),
            "seconds": seconds,
            "origins": report.origins.iter().map(|o| json!({
                "origin": o.origin, "verified": o.verified, "head_seq": o.head_seq, "problem": o.problem,
                "covered_bad_signatures": o.covered, "first_covered_seq": o.first_covered,
            })).collect::<Vec<_>>(),
        })),
        Format::Table => {
            output::table(
                &["origin", "verified", "head", "result"],
                &report
                    .origins
                    .iter()
                    .map(|o| {
                        vec![
                            o.origin.clone(),
                            o.verified.to_string(),
                            o.head_seq.to_string(),
                            match (&o.problem, o.first_covered) {
                                (Some(problem), _) => problem.clone(),
                                (None, None) => "ok".into(),
                                (None, Some(first)) => format!(
                                    "ok; entries whose own signature is bad, covered by the \
                                     origin's later signatures (so authentic): {}, the first at \
                                     seq {first}; tell the origin's operators",
                                    o.covered
                                ),
                            },
                        ]
                    })
                    .collect::<Vec<_>>(),
            );
            println!(
                "{} entries verified in {seconds:.1} s ({:.0}/s): {}",
                report.verified(),
                report.verified() as f64 / seconds.max(1e-9),
                if report.is_clean() {
                    "all good"
                } else {
                    "BAD ENTRIES FOUND"
                }
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offer_times_take_dates_utc_and_offsets() {
        let at = |text: &str| parse_time("--valid-from", text);
        assert_eq!(at("2026-01-01").unwrap(), 1_767_225_600);
        assert_eq!(at("2026-01-01T00:00:00Z").unwrap(), 1_767_225_600);
        // Midnight in São Paulo is 03:00 UTC.
        assert_eq!(
            at("2026-01-01T00:00:00-03:00").unwrap(),
            1_767_225_600 + 3 * 3600
        );
        assert_eq!(at("2026-01-01T05:30:00+05:30").unwrap(), 1_767_225_600);
        for wrong in ["2026-01-01T00:00:00+25:00", "2026-13-01", "soon"] {
            let err = at(wrong).unwrap_err().to_string();
            assert!(err.starts_with("--valid-from: "), "{err}");
        }
    }

    #[test]
    fn any_time_a_peer_signs_can_be_shown() {
        use civex_node::publish::LAST_RFC3339_SECOND;
        assert_eq!(format_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_unix(-5), "1970-01-01T00:00:00Z");
        assert_eq!(format_unix(LAST_RFC3339_SECOND), "9999-12-31T23:59:59Z");
        assert_eq!(format_unix(LAST_RFC3339_SECOND + 1), "after 9999-12-31");
        assert_eq!(format_unix(i64::MAX), "after 9999-12-31");
        assert_eq!(format_micros(i64::MAX), "after 9999-12-31");
        assert_eq!(format_micros(1_500_000), "1970-01-01T00:00:01Z");
    }

    /// Pages served from `next`: token -> (items, next token).
    fn pages(next: &[(&str, &str)]) -> anyhow::Result<Vec<String>> {
        let next: std::collections::HashMap<_, _> = next.iter().copied().collect();
        let mut fetched = 0;
        let reading = every_page(async |token: String| {
            fetched += 1;
            assert!(fetched < 10, "the reading did not stop");
            let to = next.get(token.as_str()).copied().unwrap_or("");
            Ok((vec![format!("after {token:?}")], to.to_owned()))
        });
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(reading)
    }

    #[test]
    fn a_page_token_handed_out_twice_stops_the_reading() {
        let read = pages(&[("", "a"), ("a", "b")]).unwrap();
        assert_eq!(read, ["after \"\"", "after \"a\"", "after \"b\""]);
        for circle in [
            &[("", "a"), ("a", "a")][..],
            &[("", "a"), ("a", "b"), ("b", "a")],
        ] {
            let err = pages(circle).unwrap_err().to_string();
            assert!(err.contains("\"a\" a second time"), "{err}");
        }
    }
}
