//! The gRPC layer: translates between `civex.v1` requests and the core,
//! maps domain errors to status codes (in one place, [`ToStatus`]), and
//! serves subscriptions from the store.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    ops::Bound,
    pin::Pin,
    sync::Arc,
};

use civex_proto::v1::{
    self as pb, feed_server::Feed, publish_server::Publish, query_server::Query,
    status_server::Status as StatusApi, subscribe_response::Event, EntryBody, SignedEntry,
};
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::{
    core::{
        feed::{entry_hash, replacements_of, Entry, Replacement},
        ids::{check_origin_id, hex, quote},
        ingest::{conf_status, InputRow, PreparedBatch},
        sdc::LargestContributions,
    },
    peers::{PeerPolicy, PeerRegistry},
    pki::Identity,
    publish::{self, PublishError, Publisher, Receipt},
    query::{self, ObservationFilter, OfferFilter, QueryError},
    replicate::{Replication, Roster},
    status::{conflict_report, head_message, node_status, PeerView, StatusInput},
    store::{Head, SharedStore, Store, StoreError},
    tls::PeerInfo,
    writer::{DurableHeads, WriteError, Writer},
};

/// Who may call a service. Roles come only from the certificate's
/// identity; a plain loopback connection (explicit insecure mode) may do
/// everything.
#[derive(Clone, Copy)]
enum Access {
    /// Operators only (publish, query, status); the text names the action.
    Operators(&'static str),
    /// Operators and member nodes (any origin certified by the federation
    /// CA): the feed, which then admits only the members it knows.
    Members,
}

impl Access {
    /// An interceptor admitting the callers this access allows; operators
    /// only if named in `operators` (`tls.operators`).
    fn check(
        self,
        operators: Arc<HashSet<String>>,
    ) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
        move |request: Request<()>| {
            let Some(info) = request.extensions().get::<PeerInfo>() else {
                return Err(Status::unauthenticated(
                    "no peer identity on this connection",
                ));
            };
            match (&info.identity, self) {
                (None, _) | (Some(Identity::Origin(_)), Access::Members) => Ok(request),
                (Some(Identity::Operator(name)), _) if operators.contains(name) => Ok(request),
                (Some(identity @ Identity::Operator(_)), _) => {
                    tracing::warn!(peer = %info.addr, %identity, "call refused: not an operator of this node");
                    Err(Status::permission_denied(format!(
                        "{identity} is not an operator of this node (tls.operators in its node.toml)"
                    )))
                }
                (Some(identity), Access::Operators(what)) => {
                    tracing::warn!(peer = %info.addr, %identity, what, "call refused: needs an operator");
                    Err(Status::permission_denied(format!(
                        "{what} needs an operator certificate (civex:operator:<name>); \
                         this connection is {identity}"
                    )))
                }
            }
        }
    }
}

/// Entries per subscription message at most.
const ENTRIES_PER_MESSAGE: usize = 1024;
/// Entry bytes per subscription message at most (one entry may exceed it
/// alone, up to 64 KiB). Fixed by the protocol, not by this node's limits,
/// so every peer whose `max_message_bytes` is at the minimum (2 MiB) can
/// take every message.
const MESSAGE_ENTRY_BYTES: usize = 1 << 20;
/// Messages buffered per subscriber: with the message size cap this bounds
/// a slow subscriber's memory.
const SUBSCRIBER_BUFFER: usize = 4;
/// Publishes of one PublishIndicatorsStream queued or being made durable at
/// once (two more: the one being answered, the one being read); the node
/// reads no further request until one is answered.
const STREAM_PUBLISHES_IN_FLIGHT: usize = 1024;
/// Receipts of one PublishIndicatorsStream buffered for a slow reader.
const STREAM_RECEIPTS_BUFFERED: usize = 64;
/// Cursors per subscription at most (a replicating node that knows more
/// origins opens several subscriptions).
pub const MAX_CURSORS: usize = 4096;

/// Maps a domain error to a gRPC status. The one place where that happens.
pub trait ToStatus {
    /// The status for this error.
    fn to_status(&self) -> Status;
}

impl ToStatus for StoreError {
    fn to_status(&self) -> Status {
        match self {
            StoreError::Io { .. } => Status::unavailable(self.to_string()),
            StoreError::Corrupt { .. } => Status::data_loss(self.to_string()),
        }
    }
}

impl ToStatus for WriteError {
    fn to_status(&self) -> Status {
        match self {
            WriteError::Store(err) => err.to_status(),
            WriteError::Stopped => Status::unavailable(self.to_string()),
            // The own-feed tip moved under a publish: safe to retry.
            WriteError::Chain(_) => {
                Status::unavailable(format!("{self}; retry with the same idempotency key"))
            }
            WriteError::Fork { .. } => Status::aborted(self.to_string()),
            // A member's feed grew under a replacement of its key: checked
            // again on retry.
            WriteError::HeadMoved { .. } => Status::failed_precondition(self.to_string()),
        }
    }
}

impl ToStatus for PublishError {
    fn to_status(&self) -> Status {
        match self {
            PublishError::Invalid(_) | PublishError::Row(_) => {
                Status::invalid_argument(self.to_string())
            }
            PublishError::NotFound(_) => Status::not_found(self.to_string()),
            PublishError::KeyReused(_) => Status::already_exists(self.to_string()),
            PublishError::InProgress(_) => Status::unavailable(self.to_string()),
            PublishError::Internal(_) => Status::internal(self.to_string()),
            PublishError::NotReady(_) => Status::unavailable(self.to_string()),
            PublishError::Refused(_) => Status::failed_precondition(self.to_string()),
            PublishError::Store(err) => err.to_status(),
            PublishError::Write(err) => err.to_status(),
        }
    }
}

impl ToStatus for QueryError {
    fn to_status(&self) -> Status {
        match self {
            QueryError::Invalid(_) => Status::invalid_argument(self.to_string()),
            QueryError::Store(err) => err.to_status(),
        }
    }
}

fn invalid(message: String) -> Status {
    Status::invalid_argument(message)
}

/// Checks and copies a 16-byte idempotency key.
fn idempotency_key(bytes: &[u8]) -> Result<[u8; 16], Status> {
    bytes.try_into().map_err(|_| {
        invalid(format!(
            "idempotency_key: must be 16 bytes, got {}",
            bytes.len()
        ))
    })
}

/// Request fingerprint: SHA-256 of the request encoded without its key.
fn fingerprint<M: Message + Clone>(
    kind: &str,
    request: &M,
    clear_key: impl FnOnce(&mut M),
) -> [u8; 32] {
    let mut copy = request.clone();
    clear_key(&mut copy);
    let mut hasher = Sha256::new();
    hasher.update(kind.as_bytes());
    hasher.update([0]);
    hasher.update(copy.encode_to_vec());
    hasher.finalize().into()
}

fn receipt(receipt: Receipt) -> pb::Receipt {
    pb::Receipt {
        origin: receipt.origin,
        feed_id: receipt.feed_id.to_vec(),
        first_seq: receipt.first_seq,
        seq: receipt.seq,
        entry_hash: receipt.hash.to_vec(),
        published: receipt.published,
        suppressed: receipt.suppressed,
    }
}

fn area_of(field: &str, value: i32) -> Result<pb::FunctionalArea, Status> {
    match pb::FunctionalArea::try_from(value) {
        Ok(area) if area != pb::FunctionalArea::Unspecified => Ok(area),
        _ => Err(invalid(format!(
            "{field}: {value} is not a functional area (1-7)"
        ))),
    }
}

fn input_row(index: usize, row: pb::IndicatorRow) -> Result<InputRow, Status> {
    let row_no = index + 1;
    let area = match row.area {
        0 => pb::FunctionalArea::Unspecified,
        area => area_of(&format!("row {row_no}: area"), area)?,
    };
    let largest = match (row.largest_values.is_empty(), row.largest_shares.is_empty()) {
        (true, true) => None,
        (false, true) => Some(LargestContributions::Values(row.largest_values)),
        (true, false) => Some(LargestContributions::Shares(row.largest_shares)),
        (false, false) => {
            return Err(invalid(format!(
                "row {row_no}: largest_shares: give largest_values or largest_shares, not both"
            )))
        }
    };
    Ok(InputRow {
        line: 0,
        area,
        obs_status: pb::ObservationStatus::try_from(row.obs_status).map_err(|_| {
            invalid(format!(
                "row {row_no}: obs_status: {} is not a status",
                row.obs_status
            ))
        })?,
        indicator: row.indicator,
        catalog_edition: row.catalog_edition,
        ref_area: row.ref_area,
        period: row.period,
        value: row.value,
        unit: row.unit,
        method_notes: row.method_notes,
        contributors: row.contributors,
        breakdown: row.breakdown,
        largest,
    })
}

/// A PublishIndicators request checked: its key, fingerprint and rows.
fn indicators_request(
    request: pb::PublishIndicatorsRequest,
) -> Result<([u8; 16], [u8; 32], publish::Request), Status> {
    let print = fingerprint("indicators", &request, |r| r.idempotency_key.clear());
    let key = idempotency_key(&request.idempotency_key)?;
    let rows = input_rows(request.rows)?;
    Ok((key, print, publish::Request::Indicators(rows)))
}

fn input_rows(rows: Vec<pb::IndicatorRow>) -> Result<Vec<InputRow>, Status> {
    rows.into_iter()
        .enumerate()
        .map(|(index, row)| input_row(index, row))
        .collect()
}

fn preview(prepared: PreparedBatch) -> pb::IndicatorPreview {
    pb::IndicatorPreview {
        cells: prepared
            .report
            .into_iter()
            .map(|cell| pb::PreviewCell {
                conf_status: conf_status(cell.status) as i32,
                indicator: cell.indicator,
                catalog_edition: cell.edition,
                ref_area: cell.ref_area,
                period: cell.period,
                breakdown: cell.breakdown,
                value: cell.value,
                reason: cell.reason,
            })
            .collect(),
        rules: prepared.full_rules,
        budget: prepared
            .budget
            .into_iter()
            .map(|b| pb::PreviewBudget {
                indicator: b.indicator,
                catalog_edition: b.edition,
                period: b.period,
                needed: b.needed,
                spent: b.spent,
                limit: b.limit,
            })
            .collect(),
        refusal: prepared.refusal.unwrap_or_default(),
    }
}

/// The Publish service.
pub struct PublishService {
    publisher: Arc<Publisher>,
    roster: Arc<Roster>,
    store: SharedStore,
    /// What peers report of each origin's head.
    replication: Arc<Replication>,
    /// One roster change at a time: each reads the member's entry it
    /// replaces (its key replacements carry over). Held until the change
    /// is durable and the roster re-read, even if the caller goes away.
    roster_changes: Arc<tokio::sync::Mutex<()>>,
    /// Turns true at shutdown: publish streams stop reading.
    shutdown: watch::Receiver<bool>,
    /// Bytes of requests all publish streams together hold unanswered at
    /// most (`limits.publish_stream_bytes`).
    stream_bytes: u32,
    /// Those bytes not held now.
    stream_budget: Arc<tokio::sync::Semaphore>,
    /// Message size limit (`limits.max_message_bytes`).
    max_message_bytes: usize,
}

impl PublishService {
    /// Refuses roster changes on a node that is not the roster origin.
    fn check_roster_origin(&self) -> Result<(), Status> {
        if self.roster.origin.as_deref() == Some(self.publisher.origin()) {
            return Ok(());
        }
        Err(Status::failed_precondition(format!(
            "this node ({}) is not the federation's roster origin (federation.roster_origin: {})",
            self.publisher.origin(),
            self.roster.origin.as_deref().unwrap_or("unset")
        )))
    }

    /// The roster's latest entry about `origin` (a removal included).
    fn member(&self, origin: &str) -> Result<Option<pb::RosterEntry>, Status> {
        Ok(self
            .store
            .roster(self.publisher.origin())
            .map_err(|e| e.to_status())?
            .into_iter()
            .find(|entry| entry.origin == origin))
    }

    async fn publish(
        &self,
        key: &[u8],
        fingerprint: [u8; 32],
        request: publish::Request,
    ) -> Result<Response<pb::Receipt>, Status> {
        self.publish_then(key, fingerprint, request, None, |_| {})
            .await
    }

    /// Publishes a roster entry holding the roster lock until the entry is
    /// durable and the roster re-read; with `feed_end`, only if the
    /// member's head is still the entry it names ([`crate::writer::FeedEnd`]).
    async fn publish_roster_change(
        &self,
        key: &[u8],
        fingerprint: [u8; 32],
        request: publish::Request,
        feed_end: Option<crate::writer::FeedEnd>,
        lock: tokio::sync::OwnedMutexGuard<()>,
    ) -> Result<Response<pb::Receipt>, Status> {
        let roster = self.roster.clone();
        self.publish_then(key, fingerprint, request, feed_end, move |published| {
            if published {
                if let Err(err) = roster.refresh() {
                    tracing::error!(error = %err, "the roster could not be re-read after a change");
                }
            }
            drop(lock);
        })
        .await
    }

    /// Publishes, then runs `then` with whether it was published.
    async fn publish_then(
        &self,
        key: &[u8],
        fingerprint: [u8; 32],
        request: publish::Request,
        feed_end: Option<crate::writer::FeedEnd>,
        then: impl FnOnce(bool) + Send + 'static,
    ) -> Result<Response<pb::Receipt>, Status> {
        let key = idempotency_key(key)?;
        // Run to completion even if the caller goes away: a publish that
        // was queued keeps its idempotency key busy until it is durable or
        // failed, so a retry never signs a second entry for it.
        let publisher = self.publisher.clone();
        let task = tokio::spawn(async move {
            let done = publisher
                .publish_ending(key, fingerprint, request, feed_end)
                .await;
            then(done.is_ok());
            done
        });
        match task.await {
            Ok(Ok(done)) => Ok(Response::new(receipt(done))),
            Ok(Err(err)) => {
                tracing::info!(error = %err, "publish refused");
                Err(err.to_status())
            }
            Err(err) => Err(Status::internal(format!("publish task failed: {err}"))),
        }
    }
}

#[tonic::async_trait]
impl Publish for PublishService {
    async fn publish_indicators(
        &self,
        request: Request<pb::PublishIndicatorsRequest>,
    ) -> Result<Response<pb::Receipt>, Status> {
        let (key, print, job) = indicators_request(request.into_inner())?;
        self.publish(&key, print, job).await
    }

    type PublishIndicatorsStreamStream = ReceiverStream<Result<pb::Receipt, Status>>;

    async fn publish_indicators_stream(
        &self,
        request: Request<tonic::Streaming<pb::PublishIndicatorsRequest>>,
    ) -> Result<Response<Self::PublishIndicatorsStreamStream>, Status> {
        let mut requests = request.into_inner();
        let publisher = self.publisher.clone();
        // Submitted publishes in request order: (index, key, the task that
        // awaits its receipt).
        let (submitted, mut answers) = mpsc::channel(STREAM_PUBLISHES_IN_FLIGHT);
        let (receipts, out) = mpsc::channel(STREAM_RECEIPTS_BUFFERED);
        // Bytes of requests held at once by all streams (a request counts
        // until it is answered), so streams of large requests, however
        // many, cannot make the node's memory grow by a thousand times the
        // message limit each. The semaphore is fair: a large request waits
        // its turn, and those after it wait behind it.
        let stream_bytes = self.stream_bytes;
        let budget = self.stream_budget.clone();
        let mut shutdown = self.shutdown.clone();
        // One request at a time, read, checked and queued to the sequencer,
        // so they are signed in request order.
        tokio::spawn(async move {
            for index in 0u64.. {
                // Reading stops once the stream failed or its caller left,
                // and when the node stops (the stream then ends with what
                // was queued answered, and this request refused).
                let next = tokio::select! {
                    biased;
                    () = submitted.closed() => break,
                    _ = shutdown.wait_for(|stop| *stop) => Err(Status::unavailable(
                        "the node is shutting down; send this request and those after it \
                         again, with their idempotency keys",
                    )),
                    next = requests.message() => next,
                };
                let (key, publish) = match next {
                    Ok(None) => break,
                    Err(status) => (String::new(), Err(status)),
                    Ok(Some(request)) => {
                        let size = request.encoded_len().clamp(1, stream_bytes as usize);
                        let Ok(bytes) = budget.clone().acquire_many_owned(size as u32).await else {
                            break;
                        };
                        // The stream failed, or its caller left: nothing
                        // more is published.
                        if submitted.is_closed() {
                            break;
                        }
                        // Named in a refusal only when it is a key: a
                        // malformed one may be megabytes.
                        let key = match request.idempotency_key.len() {
                            16 => hex(&request.idempotency_key),
                            _ => String::new(),
                        };
                        let publish = match indicators_request(request) {
                            Ok((key, print, job)) => publisher
                                .submit(key, print, job)
                                .await
                                .map_err(|err| err.to_status()),
                            Err(status) => Err(status),
                        };
                        // Its bytes are held until it is durable (or has
                        // failed), not until its receipt is sent: a caller
                        // that stops reading receipts holds no budget from
                        // the other streams. The task runs on when the
                        // answers are gone (a request before it failed, or
                        // the caller left), so its key stays busy until it
                        // is durable and a retry cannot sign it twice.
                        let publish = publish.map(|queued| {
                            tokio::spawn(async move {
                                let receipt = queued.receipt().await;
                                drop(bytes);
                                receipt
                            })
                        });
                        (key, publish)
                    }
                };
                let failed = publish.is_err();
                match submitted.send((index, key, publish)).await {
                    Err(_) => break,
                    Ok(()) if failed => break,
                    Ok(()) => {}
                }
            }
        });
        // Answers in request order. After a failure, or once the caller has
        // gone, nothing more is submitted or sent, but the publishes already
        // queued are still awaited: each keeps its idempotency key busy
        // until its entry is durable, so a retry cannot sign it twice.
        tokio::spawn(async move {
            let mut open = true;
            while let Some((index, key, publish)) = answers.recv().await {
                let answer = match publish {
                    Ok(receipt) => match receipt.await {
                        Ok(receipt) => receipt.map_err(|err| err.to_status()),
                        Err(err) => Err(Status::internal(format!("publish task failed: {err}"))),
                    },
                    Err(status) => Err(status),
                };
                if !open {
                    continue;
                }
                let status = match answer {
                    Ok(done) => match receipts.send(Ok(receipt(done))).await {
                        Ok(()) => continue,
                        Err(_) => None,
                    },
                    Err(status) => Some(status),
                };
                // Closed before the failure is sent, so a request sent after
                // the caller saw it is never published.
                answers.close();
                open = false;
                if let Some(status) = status {
                    tracing::info!(index, error = %status.message(), "streamed publish refused");
                    let named = match key.is_empty() {
                        true => format!("request {index} of the stream"),
                        false => format!("request {index} of the stream (idempotency key {key})"),
                    };
                    let status =
                        Status::new(status.code(), format!("{named}: {}", status.message()));
                    let _ = receipts.send(Err(status)).await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(out)))
    }

    async fn preview_indicators(
        &self,
        request: Request<pb::PublishIndicatorsRequest>,
    ) -> Result<Response<pb::IndicatorPreview>, Status> {
        let rows = input_rows(request.into_inner().rows)?;
        let publisher = self.publisher.clone();
        let prepared = tokio::task::spawn_blocking(move || publisher.preview(&rows))
            .await
            .map_err(|err| Status::internal(format!("preview task failed: {err}")))?
            .map_err(|err| err.to_status())?;
        // A preview cell is larger than its row: a file near the message
        // limit may publish (as a group) but not preview in one answer.
        let answer = preview(prepared);
        let size = prost::Message::encoded_len(&answer);
        if size > self.max_message_bytes {
            return Err(Status::out_of_range(format!(
                "rows: the preview of these {} cells takes {size} bytes, above \
                 limits.max_message_bytes ({}): preview the file in parts (publishing it whole \
                 is not limited so)",
                answer.cells.len(),
                self.max_message_bytes
            )));
        }
        Ok(Response::new(answer))
    }

    async fn publish_offer(
        &self,
        request: Request<pb::PublishOfferRequest>,
    ) -> Result<Response<pb::Receipt>, Status> {
        let request = request.into_inner();
        let print = fingerprint("offer", &request, |r| r.idempotency_key.clear());
        let offer = request
            .offer
            .ok_or_else(|| invalid("offer: missing".into()))?;
        self.publish(
            &request.idempotency_key,
            print,
            publish::Request::Offer(offer),
        )
        .await
    }

    async fn withdraw_offer(
        &self,
        request: Request<pb::WithdrawOfferRequest>,
    ) -> Result<Response<pb::Receipt>, Status> {
        let request = request.into_inner();
        let print = fingerprint("withdraw", &request, |r| r.idempotency_key.clear());
        let job = publish::Request::Withdraw {
            offer_id: request.offer_id,
            reason: request.reason,
        };
        self.publish(&request.idempotency_key, print, job).await
    }

    async fn respond_offer(
        &self,
        request: Request<pb::RespondOfferRequest>,
    ) -> Result<Response<pb::Receipt>, Status> {
        let request = request.into_inner();
        let print = fingerprint("respond", &request, |r| r.idempotency_key.clear());
        let version = match request.offer_version_hash.len() {
            0 => None,
            32 => request.offer_version_hash.as_slice().try_into().ok(),
            n => {
                return Err(invalid(format!(
                    "offer_version_hash: must be 32 bytes, got {n}"
                )))
            }
        };
        let kind = match pb::ResponseKind::try_from(request.kind) {
            Ok(kind) => kind,
            Err(_) => {
                return Err(invalid(format!(
                    "kind: {} is not a response kind",
                    request.kind
                )))
            }
        };
        let job = publish::Request::Respond {
            offer_origin: request.offer_origin,
            offer_id: request.offer_id,
            version,
            kind,
            message: request.message,
        };
        self.publish(&request.idempotency_key, print, job).await
    }

    async fn publish_roster(
        &self,
        request: Request<pb::PublishRosterRequest>,
    ) -> Result<Response<pb::Receipt>, Status> {
        let request = request.into_inner();
        let print = fingerprint("roster", &request, |r| r.idempotency_key.clear());
        self.check_roster_origin()?;
        let mut entry = request
            .entry
            .ok_or_else(|| invalid("entry: missing".into()))?;
        check_origin_id(&entry.origin).map_err(|m| invalid(format!("entry.origin: {m}")))?;
        let one_at_a_time = self.roster_changes.clone().lock_owned().await;
        if !entry.replacements.is_empty() {
            return Err(invalid(
                "entry.replacements: set only by ReplaceFeedKey (civex roster replace-key)".into(),
            ));
        }
        let uri = Identity::Origin(entry.origin.clone()).uri();
        if entry.removed {
            if !entry.feed_key.is_empty()
                || !entry.name.is_empty()
                || !entry.tls_identity.is_empty()
            {
                return Err(invalid("entry: a removal names only the origin".into()));
            }
            // The removal keeps the member's keys: what is held of its feed
            // stays verifiable, and a later re-add keeps its history.
            if let Some(current) = self.member(&entry.origin)? {
                entry.feed_key = current.feed_key;
                entry.replacements = current.replacements;
            }
        } else {
            let key: [u8; 32] = entry.feed_key.as_slice().try_into().map_err(|_| {
                invalid(format!(
                    "entry.feed_key: {} bytes, expected a 32-byte Ed25519 key",
                    entry.feed_key.len()
                ))
            })?;
            crate::keys::parse_public_key(&crate::core::ids::hex(&key))
                .map_err(|m| invalid(format!("entry.feed_key: {m}")))?;
            if entry.name.chars().count() > 200 {
                return Err(invalid("entry.name: longer than 200 characters".into()));
            }
            match entry.tls_identity.as_str() {
                "" => entry.tls_identity = uri,
                named if named == uri => {}
                other => {
                    return Err(invalid(format!(
                        "entry.tls_identity: {other:?} is not {uri:?}"
                    )))
                }
            }
            // An update (or a re-add after a removal) keeps the member's key
            // replacements while its key of seq 1 stays: the history they
            // name stays verifiable.
            if let Some(current) = self.member(&entry.origin)? {
                if current.feed_key == entry.feed_key {
                    entry.replacements = current.replacements;
                }
            }
        }
        self.publish_roster_change(
            &request.idempotency_key,
            print,
            publish::Request::Roster(entry),
            None,
            one_at_a_time,
        )
        .await
    }

    async fn replace_feed_key(
        &self,
        request: Request<pb::ReplaceFeedKeyRequest>,
    ) -> Result<Response<pb::Receipt>, Status> {
        let request = request.into_inner();
        let print = fingerprint("replace-key", &request, |r| r.idempotency_key.clear());
        self.check_roster_origin()?;
        let one_at_a_time = self.roster_changes.clone().lock_owned().await;
        // A retry gets its receipt, whatever the roster holds by now.
        let repeat = self
            .publisher
            .replay(
                &idempotency_key(&request.idempotency_key)?,
                &print,
                publish::Outline::of_roster,
                None,
            )
            .map_err(|e| e.to_status())?;
        if let Some(done) = repeat {
            return Ok(Response::new(receipt(done)));
        }
        let origin = request.origin;
        check_origin_id(&origin).map_err(|m| invalid(format!("origin: {m}")))?;
        if origin == self.publisher.origin() {
            // Its roster entry would be the next entry of the very feed it
            // ends; a node holding its key hands it on with a rotation.
            return Err(invalid(format!(
                "origin: {origin} is this node's own origin, whose key it holds; hand the feed \
                 to a new key with civex key rotate"
            )));
        }
        let new_key: [u8; 32] = request.new_feed_key.as_slice().try_into().map_err(|_| {
            invalid(format!(
                "new_feed_key: {} bytes, expected a 32-byte Ed25519 key",
                request.new_feed_key.len()
            ))
        })?;
        crate::keys::parse_public_key(&hex(&new_key))
            .map_err(|m| invalid(format!("new_feed_key: {m}")))?;
        let mut member = self
            .member(&origin)?
            .filter(|m| !m.removed)
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "origin: {origin} is not a member of the roster"
                ))
            })?;
        let rotations = self.store.rotations(&origin).map_err(|e| e.to_status())?;
        let mut used = std::iter::once(member.feed_key.as_slice())
            .chain(
                member
                    .replacements
                    .iter()
                    .map(|r| r.new_feed_key.as_slice()),
            )
            .chain(rotations.iter().map(|(_, key)| key.as_slice()));
        if used.any(|key| key == new_key) {
            return Err(invalid(format!(
                "new_feed_key: {origin}'s feed has used this key already; make a new one"
            )));
        }
        let held = self
            .store
            .head(&origin)
            .map_err(|e| e.to_status())?
            .map_or(0, |h| h.tip.seq);
        if held == 0 {
            return Err(Status::failed_precondition(format!(
                "this node holds no entry of {origin}, so it cannot name the last one to keep; \
                 let it replicate the member first"
            )));
        }
        // Nor may a peer hold more: it could not follow the new feed. A
        // head a peer only claims (it sent nothing up to it that verified)
        // does not count: it names no entry this node could keep, and
        // would hold the replacement back for as long as the peer kept
        // claiming it; it is logged with the replacement.
        let peers = self.replication.peers();
        let ahead = crate::replicate::holding_more(&peers, &origin, held);
        if let Some((peer, seq)) = ahead {
            return Err(Status::failed_precondition(format!(
                "peer {peer} holds {origin}'s feed up to seq {seq}, this node up to seq {held}; \
                 let this node catch up first, so the replacement keeps every entry"
            )));
        }
        // Ending the feed before the newest entry held is refused: nodes
        // holding the later entries could not follow the new feed.
        let last_seq = match request.last_seq {
            0 => held,
            seq if seq == held => seq,
            seq => {
                return Err(invalid(format!(
                    "last_seq: {seq}; this node holds {origin}'s feed up to seq {held}, and a \
                     replacement keeps every entry it holds"
                )))
            }
        };
        for (peer, claimed) in crate::replicate::claims_past(&peers, &origin, held) {
            tracing::warn!(peer = %peer, claimed_seq = claimed, last_seq,
                "replacing {origin}'s key at seq {last_seq}, this node's head, although the peer \
                 claims the feed up to seq {claimed}: it sent nothing past this node's head that \
                 verified, so the claim is not counted");
        }
        let last = self
            .store
            .entries(&origin, last_seq, 1, usize::MAX)
            .map_err(|e| e.to_status())?
            .into_iter()
            .next()
            .and_then(|signed| Entry::decode(signed).ok())
            .ok_or_else(|| {
                Status::internal(format!("{origin} seq {last_seq} does not read back"))
            })?;
        // The writer stores the roster entry only if the member's head is
        // still this entry (replicated entries of it may be stored until
        // then), and from then on refuses later entries of the feed it ends.
        let mut feed_end = crate::writer::FeedEnd {
            origin: origin.clone(),
            feed_id: last.feed_id(),
            seq: last_seq,
            hash: last.hash,
            abandoned: None,
            enforce: self.roster.replaces_keys_of(&origin),
        };
        let mut new_feed_id = [0u8; 16];
        getrandom::getrandom(&mut new_feed_id)
            .map_err(|err| Status::internal(format!("no randomness for a feed id: {err}")))?;
        // A replacement whose feed has no entry anywhere yet (its key was
        // lost before its first use, or named wrongly) is amended in place:
        // nothing was signed under it.
        if member
            .replacements
            .last()
            .is_some_and(|newest| newest.last_seq == last_seq)
        {
            let amended = member.replacements.pop();
            // Replication jobs made before the roster is read again may
            // still carry it: the writer refuses its feed's entries.
            feed_end.abandoned = amended.and_then(|r| r.new_feed_id.try_into().ok());
        }
        member.replacements.push(pb::FeedReplacement {
            old_feed_id: last.body.feed_id.clone(),
            last_seq,
            last_hash: last.hash.to_vec(),
            new_feed_id: new_feed_id.to_vec(),
            new_feed_key: new_key.to_vec(),
        });
        if replacements_of(&member).is_none() {
            return Err(Status::failed_precondition(format!(
                "{origin}'s entry at seq {last_seq} is not in the feed the roster's last \
                 replacement started: this node's copy of the member's feed is stale"
            )));
        }
        self.publish_roster_change(
            &request.idempotency_key,
            print,
            publish::Request::Roster(member),
            Some(feed_end),
            one_at_a_time,
        )
        .await
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::Receipt>, Status> {
        let request = request.into_inner();
        let print = fingerprint("rotate-key", &request, |r| r.idempotency_key.clear());
        self.publish(&request.idempotency_key, print, publish::Request::RotateKey)
            .await
    }

    async fn retract(
        &self,
        request: Request<pb::RetractRequest>,
    ) -> Result<Response<pb::Receipt>, Status> {
        let request = request.into_inner();
        let print = fingerprint("retract", &request, |r| r.idempotency_key.clear());
        let job = publish::Request::Retract {
            seq: request.seq,
            reason: request.reason,
        };
        self.publish(&request.idempotency_key, print, job).await
    }
}

/// The Feed service: subscriptions and heads.
pub struct FeedService {
    store: SharedStore,
    writer: Writer,
    shutdown: watch::Receiver<bool>,
    streams: StreamSlots,
    registry: Arc<PeerRegistry>,
    roster: Arc<Roster>,
    /// This node's origin, named in refusals.
    origin: String,
}

impl FeedService {
    /// The admission of the caller of `request`, watching for changes from
    /// before its first check.
    fn admission<T>(&self, request: &Request<T>) -> Admission {
        let identity = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|info| info.identity.clone());
        Admission {
            node: self.origin.clone(),
            identity,
            peers_changed: self.registry.changes(),
            roster_changed: self.roster.changes(),
            registry: self.registry.clone(),
            roster: self.roster.clone(),
        }
    }
}

/// Who may read from this node, and what (spec rule 6). An origin must be
/// a member this node knows: a peer (`node.toml` or `civex peer add`),
/// pinned in `trusted_origins`, or on the roster and not removed; a peer
/// with a read policy reads only what it allows, any other member
/// everything. Operators this node names and plain loopback connections
/// (insecure mode) read everything. Checked when a stream opens and again
/// whenever the peers or the roster change.
struct Admission {
    node: String,
    identity: Option<Identity>,
    registry: Arc<PeerRegistry>,
    roster: Arc<Roster>,
    peers_changed: watch::Receiver<u64>,
    roster_changed: watch::Receiver<u64>,
}

impl Admission {
    /// `None`: every origin may be read; `Some`: what the policy allows.
    fn check(&self) -> Result<Option<PeerPolicy>, Status> {
        let Some(identity @ Identity::Origin(origin)) = &self.identity else {
            return Ok(None);
        };
        if let Some(policy) = self.registry.policy_for(origin) {
            return Ok(Some(policy));
        }
        if self.roster.is_member(origin) {
            return Ok(None);
        }
        let node = &self.node;
        Err(Status::permission_denied(
            if self.roster.was_removed(origin) {
                format!("node {node} does not admit {identity}: the federation roster removed it")
            } else {
                format!(
                    "node {node} does not know {identity}: on {node}, pin its feed key under \
                 [trusted_origins] in node.toml, add it as a peer (civex peer add; {node} then \
                 also replicates from it), or have the federation roster add it"
                )
            },
        ))
    }

    /// Why a subscription opened when the subscriber could read `readable`
    /// must end now, if it must: the subscriber is no longer known, or what
    /// it may read changed (it subscribes again under the new policy).
    fn end(&self, readable: &Option<PeerPolicy>) -> Option<Status> {
        match self.check() {
            Err(refused) => Some(refused),
            Ok(now) if readable_set(&now) != readable_set(readable) => Some(Status::unavailable(
                "what this subscriber may read from this node changed; subscribe again",
            )),
            Ok(_) => None,
        }
    }

    /// Whether the peers or the roster changed since last asked.
    fn changed(&mut self) -> bool {
        // Marks seen only the version looked at: a change made right after
        // is still reported next time.
        let mut changed = false;
        for watched in [&mut self.peers_changed, &mut self.roster_changed] {
            if watched.has_changed().unwrap_or(false) {
                watched.borrow_and_update();
                changed = true;
            }
        }
        changed
    }

    /// Waits for a change of the peers or the roster. Both senders live as
    /// long as the registry and roster this admission holds.
    async fn wait_changed(&mut self) {
        tokio::select! {
            _ = self.peers_changed.changed() => {}
            _ = self.roster_changed.changed() => {}
        }
    }
}

/// The origins a policy lets a subscriber read: `None` for every origin.
fn readable_set(policy: &Option<PeerPolicy>) -> Option<std::collections::BTreeSet<&str>> {
    policy
        .as_ref()
        .filter(|p| !p.may_read.is_empty())
        .map(|p| p.may_read.iter().map(String::as_str).collect())
}

/// Open subscriptions per peer (its certificate identity, or its address on
/// a plain connection), capped.
#[derive(Clone)]
struct StreamSlots {
    open: Arc<std::sync::Mutex<HashMap<String, usize>>>,
    cap: usize,
}

/// One open subscription; frees its slot when dropped.
struct StreamSlot {
    slots: StreamSlots,
    peer: String,
}

impl StreamSlots {
    /// Takes a slot of `peer`: its identity, or its IP address on a plain
    /// connection.
    fn acquire(&self, peer: String) -> Result<StreamSlot, Status> {
        let mut open = self
            .open
            .lock()
            .map_err(|_| Status::internal("subscription slots are poisoned"))?;
        let count = open.entry(peer.clone()).or_default();
        if *count >= self.cap {
            let who = &peer;
            tracing::warn!(peer = %who, cap = self.cap, "subscription refused: too many open streams");
            return Err(Status::resource_exhausted(format!(
                "{who} already has {count} open subscriptions, the limit (limits.max_streams_per_peer)"
            )));
        }
        *count += 1;
        Ok(StreamSlot {
            slots: self.clone(),
            peer,
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.slots.open.lock() {
            if let Some(count) = open.get_mut(&self.peer) {
                *count -= 1;
                if *count == 0 {
                    open.remove(&self.peer);
                }
            }
        }
    }
}

/// A claimed position of the subscriber, checked once this node holds it.
#[derive(Clone)]
struct Claim {
    seq: u64,
    hash: Vec<u8>,
    feed_id: Vec<u8>,
}

struct OriginCursor {
    next: u64,
    claim: Option<Claim>,
    drained: bool,
    stopped: bool,
}

impl OriginCursor {
    fn from_seq(seq: u64, claim: Option<Claim>) -> Self {
        Self {
            next: seq + 1,
            claim,
            drained: false,
            stopped: false,
        }
    }
}

/// What a claim comes to against the head held.
enum ClaimCheck {
    /// Not held yet: wait.
    Wait,
    /// Matches: serve from it.
    Matches,
    /// Differs: send this evidence and stop the origin.
    Differs(Option<pb::SignedEntry>),
}

/// Checks a subscriber's cursor against what this node holds; a claim in
/// the feed that the roster started after a lost key (`replacements`) is
/// one this node may simply not have reached yet.
fn check_claim(
    store: &dyn Store,
    origin: &str,
    head: Option<&Head>,
    claim: &Claim,
    replacements: &[Replacement],
) -> Result<ClaimCheck, StoreError> {
    let Some(head) = head else {
        return Ok(ClaimCheck::Wait);
    };
    if head.tip.seq < claim.seq {
        // Ahead in the same feed, or in the new feed that goes on after the
        // point this node holds up to: wait, and check once caught up.
        let later_feed = replacements
            .iter()
            .any(|r| r.new_feed_id.as_slice() == claim.feed_id && head.tip.seq <= r.last_seq);
        if head.tip.feed_id.as_slice() == claim.feed_id || later_feed {
            return Ok(ClaimCheck::Wait);
        }
        // Another feed ahead of this node.
        return Ok(ClaimCheck::Differs(first_entry(store, origin)?));
    }
    // The entry held at the claimed seq decides (its hash covers its feed
    // id: after a lost key's replacement the head's feed id is a newer one).
    let held = store
        .entries(origin, claim.seq, 1, usize::MAX)?
        .into_iter()
        .next();
    let matches = held
        .as_ref()
        .is_some_and(|e| entry_hash(&e.body, &e.signature).as_slice() == claim.hash);
    if matches {
        return Ok(ClaimCheck::Matches);
    }
    let other_feed = held
        .as_ref()
        .and_then(|e| EntryBody::decode(e.body.as_ref()).ok())
        .is_some_and(|body| body.feed_id != claim.feed_id);
    Ok(ClaimCheck::Differs(if other_feed {
        first_entry(store, origin)?
    } else {
        held
    }))
}

/// The evidence for a subscriber that holds another feed of `origin`: the
/// first entry held, the genesis of this node's feed, which the subscriber
/// checks with the origin's first key (a later entry may be signed by a
/// key it never learned), so a re-created feed is on record whatever the
/// seqs each side holds.
fn first_entry(store: &dyn Store, origin: &str) -> Result<Option<SignedEntry>, StoreError> {
    Ok(store.entries(origin, 1, 1, usize::MAX)?.into_iter().next())
}

/// Sends one event unless the subscriber left or the node is stopping.
async fn send_event(
    tx: &mpsc::Sender<Result<pb::SubscribeResponse, Status>>,
    shutdown: &mut watch::Receiver<bool>,
    event: Event,
) -> bool {
    send_message(
        tx,
        shutdown,
        Ok(pb::SubscribeResponse { event: Some(event) }),
    )
    .await
}

/// Sends one message unless the subscriber left or the node is stopping.
async fn send_message(
    tx: &mpsc::Sender<Result<pb::SubscribeResponse, Status>>,
    shutdown: &mut watch::Receiver<bool>,
    message: Result<pb::SubscribeResponse, Status>,
) -> bool {
    tokio::select! {
        sent = tx.send(message) => sent.is_ok(),
        _ = shutdown.wait_for(|stop| *stop) => false,
    }
}

impl FeedService {
    /// Sends each origin's backlog, then its live tail, read from the store
    /// up to the durable heads after every "head advanced" notification;
    /// never buffers per origin.
    async fn serve(
        store: SharedStore,
        mut committed: watch::Receiver<DurableHeads>,
        mut shutdown: watch::Receiver<bool>,
        request: pb::SubscribeRequest,
        mut admission: Admission,
        readable: Option<PeerPolicy>,
        tx: mpsc::Sender<Result<pb::SubscribeResponse, Status>>,
    ) -> Result<(), StoreError> {
        let mut recheck = false;
        let mut origins: BTreeMap<String, OriginCursor> = BTreeMap::new();
        for cursor in request.cursors {
            if let Some(policy) = readable.as_ref().filter(|p| !p.may_read(&cursor.origin)) {
                let not_served = pb::OriginNotServed {
                    origin: cursor.origin,
                    reason: policy.read_policy(),
                };
                if !send_event(&tx, &mut shutdown, Event::NotServed(not_served)).await {
                    return Ok(());
                }
                continue;
            }
            let claim = (cursor.seq > 0).then(|| Claim {
                seq: cursor.seq,
                hash: cursor.entry_hash.clone(),
                feed_id: cursor.feed_id.clone(),
            });
            origins.insert(cursor.origin, OriginCursor::from_seq(cursor.seq, claim));
        }
        loop {
            if admission.changed() || recheck {
                recheck = false;
                // Who may read what changed: a subscriber no longer known
                // is cut off, one that may now read other origins
                // subscribes again under the new policy.
                if let Some(status) = admission.end(&readable) {
                    tracing::info!(identity = ?admission.identity, reason = %status.message(), "subscription ended");
                    send_message(&tx, &mut shutdown, Err(status)).await;
                    return Ok(());
                }
            }
            let heads = committed.borrow_and_update().clone();
            if request.all_origins {
                let readable = |origin: &str| readable.as_ref().is_none_or(|p| p.may_read(origin));
                for origin in heads.keys().filter(|o| readable(o)) {
                    origins
                        .entry(origin.clone())
                        .or_insert_with(|| OriginCursor::from_seq(0, None));
                }
            }
            let mut sent_entries = false;
            // The roster origin first: a member's entries under a key the
            // roster has just named verify only once that roster entry is
            // read, and it is durable here before (or with) them.
            let roster_origin = admission.roster.origin.as_deref();
            let mut pass: Vec<_> = origins.iter_mut().filter(|(_, c)| !c.stopped).collect();
            pass.sort_by_key(|(origin, _)| Some(origin.as_str()) != roster_origin);
            for (origin, cursor) in pass {
                let head = heads.get(origin);
                let head_seq = head.map_or(0, |h| h.tip.seq);
                if let Some(claim) = &cursor.claim {
                    let replacements = admission.roster.replacements(origin);
                    match check_claim(store.as_ref(), origin, head, claim, &replacements)? {
                        ClaimCheck::Wait => {
                            // This node holds less than the subscriber: say
                            // so once (its own-feed check needs it), keep the
                            // claim to check once this node catches up.
                            if !cursor.drained {
                                cursor.drained = true;
                                let drained = pb::BacklogDrained {
                                    origin: origin.clone(),
                                    head_seq,
                                };
                                if !send_event(&tx, &mut shutdown, Event::Drained(drained)).await {
                                    return Ok(());
                                }
                            }
                            continue;
                        }
                        ClaimCheck::Matches => cursor.claim = None,
                        ClaimCheck::Differs(held) => {
                            cursor.stopped = true;
                            let mismatch = pb::CursorMismatch {
                                origin: origin.clone(),
                                held,
                                feed_id: head.map(|h| h.tip.feed_id.to_vec()).unwrap_or_default(),
                            };
                            if !send_event(&tx, &mut shutdown, Event::Mismatch(mismatch)).await {
                                return Ok(());
                            }
                            continue;
                        }
                    }
                }
                if cursor.next <= head_seq {
                    let wanted =
                        (head_seq - cursor.next + 1).min(ENTRIES_PER_MESSAGE as u64) as usize;
                    let entries =
                        store.entries(origin, cursor.next, wanted, MESSAGE_ENTRY_BYTES)?;
                    if !entries.is_empty() {
                        cursor.next += entries.len() as u64;
                        sent_entries = true;
                        let batch = pb::EntryBatch {
                            origin: origin.clone(),
                            entries,
                        };
                        if !send_event(&tx, &mut shutdown, Event::Entries(batch)).await {
                            return Ok(());
                        }
                    }
                }
                if !cursor.drained && cursor.next > head_seq {
                    cursor.drained = true;
                    let drained = pb::BacklogDrained {
                        origin: origin.clone(),
                        head_seq,
                    };
                    if !send_event(&tx, &mut shutdown, Event::Drained(drained)).await {
                        return Ok(());
                    }
                }
            }
            if *shutdown.borrow() {
                return Ok(());
            }
            if !sent_entries {
                tokio::select! {
                    changed = committed.changed() => if changed.is_err() { return Ok(()) },
                    // Both senders live as long as the admission holds them.
                    _ = admission.wait_changed() => recheck = true,
                    _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
                    _ = tx.closed() => return Ok(()),
                }
            }
        }
    }
}

type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Feed for FeedService {
    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let info = request.extensions().get::<PeerInfo>().cloned();
        let address = info.as_ref().map(|info| info.addr.to_string());
        let peer = info.map_or_else(String::new, |info| match &info.identity {
            Some(identity) => identity.to_string(),
            None => info.addr.ip().to_string(),
        });
        let admission = self.admission(&request);
        let mut edge = self.admission(&request);
        let readable = admission.check().inspect_err(|refused| {
            tracing::warn!(%peer, address = ?address, reason = %refused.message(), "subscription refused");
        })?;
        let request = request.into_inner();
        if request.cursors.len() > MAX_CURSORS {
            return Err(invalid(format!(
                "cursors: {} cursors, at most {MAX_CURSORS} per subscription",
                request.cursors.len()
            )));
        }
        for (i, cursor) in request.cursors.iter().enumerate() {
            check_origin_id(&cursor.origin)
                .map_err(|m| invalid(format!("cursors[{i}].origin: {m}")))?;
            if cursor.seq == u64::MAX {
                return Err(invalid(format!(
                    "cursors[{i}].seq: {} is past any feed's last seq",
                    cursor.seq
                )));
            }
            if cursor.seq > 0 && (cursor.entry_hash.len() != 32 || cursor.feed_id.len() != 16) {
                return Err(invalid(format!(
                    "cursors[{i}]: a cursor past seq 0 needs a 16-byte feed_id and a 32-byte entry_hash"
                )));
            }
        }
        // Origins the policy leaves out are answered `OriginNotServed` and
        // the others served; only a subscription to nothing it may read is
        // refused (a node always names its own origin and those it pins).
        if let Some(policy) = &readable {
            let unreadable = |c: &pb::Cursor| !policy.may_read(&c.origin);
            if !request.all_origins && request.cursors.iter().all(unreadable) {
                if let Some(cursor) = request.cursors.first() {
                    return Err(Status::permission_denied(format!(
                        "{peer} may not read origin {} from this node ({})",
                        quote(&cursor.origin),
                        policy.read_policy()
                    )));
                }
            }
        }
        if request.cursors.is_empty() && !request.all_origins {
            return Err(invalid(
                "cursors: name at least one origin, or set all_origins".into(),
            ));
        }
        let slot = self.streams.acquire(peer.clone())?;
        tracing::info!(%peer, origins = request.cursors.len(), all = request.all_origins, "subscription opened");
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        let store = self.store.clone();
        let committed = self.writer.committed();
        let shutdown = self.shutdown.clone();
        // Messages queued for a slow subscriber are checked again on their
        // way out once the peers or the roster changed: a subscriber removed
        // or restricted meanwhile gets none of them, only why it was cut.
        let (readable_then, mut ended) = (readable.clone(), false);
        let messages = ReceiverStream::new(rx).map_while(move |message| {
            if ended {
                return None;
            }
            if edge.changed() {
                if let Some(status) = edge.end(&readable_then) {
                    ended = true;
                    return Some(Err(status));
                }
            }
            Some(message)
        });
        tokio::spawn(async move {
            let _slot = slot;
            let error_tx = tx.clone();
            if let Err(err) =
                Self::serve(store, committed, shutdown, request, admission, readable, tx).await
            {
                tracing::error!(error = %err, "subscription ended by a store error");
                let _ = error_tx.send(Err(err.to_status())).await;
            }
            tracing::debug!(peer = ?peer, "subscription closed");
        });
        Ok(Response::new(Box::pin(messages)))
    }

    async fn heads(
        &self,
        request: Request<pb::HeadsRequest>,
    ) -> Result<Response<pb::HeadsResponse>, Status> {
        // Heads name what this node holds: only for those who may read it.
        let readable = self.admission(&request).check()?;
        let request = request.into_inner();
        let after = match request.page_token.as_str() {
            "" => None,
            token => Some(
                token
                    .strip_prefix("heads-after-")
                    .filter(|origin| check_origin_id(origin).is_ok())
                    .ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "page_token: {} is not a token this node issued",
                            quote(&token.chars().take(100).collect::<String>())
                        ))
                    })?,
            ),
        };
        // The durable heads, as Subscribe serves: sled shows a batch before
        // it is synced, and a head a crash may lose must not be named.
        let heads = self.writer.heads();
        let from = after.map_or(Bound::Unbounded, |after| Bound::Excluded(after.to_owned()));
        let limit = match request.page_size {
            0 => MAX_CURSORS,
            size => (size as usize).min(MAX_CURSORS),
        };
        let mut page: Vec<(&String, &Head)> = heads
            .range((from, Bound::Unbounded))
            .filter(|(origin, _)| readable.as_ref().is_none_or(|p| p.may_read(origin)))
            .take(limit + 1)
            .collect();
        let next_page_token = match page.len() > limit {
            true => format!("heads-after-{}", page[limit - 1].0),
            false => String::new(),
        };
        // A caller that does not page (an older CLI) is refused rather than
        // answered in part.
        if request.page_size == 0 && !next_page_token.is_empty() {
            return Err(Status::failed_precondition(format!(
                "page_size: 0 asks for every head, and there are more than {MAX_CURSORS}: ask \
                 page by page (page_size at most {MAX_CURSORS}, then page_token; this civex \
                 client is older than paged heads if it sent this)"
            )));
        }
        page.truncate(limit);
        Ok(Response::new(pb::HeadsResponse {
            heads: page
                .into_iter()
                .map(|(origin, head)| head_message(origin.clone(), head))
                .collect(),
            next_page_token,
        }))
    }
}

/// The Query service.
pub struct QueryService {
    store: SharedStore,
    /// Whose durable heads bound every answer ([`query::Durable`]).
    writer: Writer,
}

fn areas_of(values: &[i32]) -> Result<Vec<pb::FunctionalArea>, Status> {
    values.iter().map(|v| area_of("areas", *v)).collect()
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[tonic::async_trait]
impl Query for QueryService {
    async fn observations(
        &self,
        request: Request<pb::ObservationsRequest>,
    ) -> Result<Response<pb::ObservationsResponse>, Status> {
        let request = request.into_inner();
        let filter = ObservationFilter {
            areas: areas_of(&request.areas)?,
            indicators: request.indicators,
            origins: request.origins,
            period_from: Some(request.period_from),
            period_to: Some(request.period_to),
        };
        let (store, durable) = (self.store.clone(), self.writer.heads());
        let page = tokio::task::spawn_blocking(move || {
            query::observations(
                store.as_ref(),
                query::Durable(&durable),
                &filter,
                request.page_size as usize,
                Some(&request.page_token),
            )
        })
        .await
        .map_err(|err| Status::internal(format!("query task failed: {err}")))?
        .map_err(|e| e.to_status())?;
        Ok(Response::new(pb::ObservationsResponse {
            observations: page
                .rows
                .into_iter()
                .map(|row| pb::ObservationRecord {
                    origin: row.key.origin,
                    seq: row.seq,
                    observation: Some(row.observation),
                    rules: row.rules,
                })
                .collect(),
            next_page_token: page.next.unwrap_or_default(),
        }))
    }

    async fn offers(
        &self,
        request: Request<pb::OffersRequest>,
    ) -> Result<Response<pb::OffersResponse>, Status> {
        let request = request.into_inner();
        let filter = OfferFilter {
            areas: areas_of(&request.areas)?,
            categories: request.categories,
            origins: request.origins,
            include_inactive: request.include_inactive,
        };
        let (store, durable) = (self.store.clone(), self.writer.heads());
        let page = tokio::task::spawn_blocking(move || {
            query::offers(
                store.as_ref(),
                query::Durable(&durable),
                &filter,
                now_unix(),
                request.page_size as usize,
                Some(&request.page_token),
            )
        })
        .await
        .map_err(|err| Status::internal(format!("query task failed: {err}")))?
        .map_err(|e| e.to_status())?;
        Ok(Response::new(pb::OffersResponse {
            next_page_token: page.next.unwrap_or_default(),
            offers: page
                .offers
                .into_iter()
                .map(|state| pb::OfferRecord {
                    origin: state.version.origin,
                    seq: state.version.seq,
                    version_hash: state.version.hash.to_vec(),
                    offer: Some(state.version.offer),
                    active: state.active,
                    responses: state
                        .responses
                        .into_iter()
                        .map(|r| pb::ResponseRecord {
                            origin: r.responder,
                            seq: r.seq,
                            response: Some(r.response),
                        })
                        .collect(),
                    more_responses: state.more_responses,
                })
                .collect(),
        }))
    }
}

/// The Status service.
pub struct StatusService {
    store: SharedStore,
    writer: Writer,
    publisher: Arc<Publisher>,
    replication: Arc<Replication>,
}

#[tonic::async_trait]
impl StatusApi for StatusService {
    async fn node_status(
        &self,
        _request: Request<pb::NodeStatusRequest>,
    ) -> Result<Response<pb::NodeStatusResponse>, Status> {
        let heads = self.writer.heads();
        let replicated = self.replication.peers();
        let peers = replicated
            .iter()
            .map(|peer| PeerView {
                name: &peer.name,
                address: &peer.address,
                state: peer.state.lock().map(|s| s.clone()).unwrap_or_default(),
            })
            .collect();
        let conflicts = self.store.conflicts().map_err(|e| e.to_status())?;
        Ok(Response::new(node_status(StatusInput {
            origin: self.publisher.origin(),
            heads: &heads,
            peers,
            publish_ready: self.publisher.is_ready(),
            index_pieces_pending: self
                .store
                .index_pieces_pending()
                .map_err(|e| e.to_status())?,
            conflicts: &conflicts,
        })))
    }

    async fn conflict_evidence(
        &self,
        request: Request<pb::ConflictEvidenceRequest>,
    ) -> Result<Response<pb::ConflictEvidenceResponse>, Status> {
        let origin = request.into_inner().origin;
        check_origin_id(&origin).map_err(|m| invalid(format!("origin: {m}")))?;
        let record = self
            .store
            .conflict(&origin)
            .map_err(|e| e.to_status())?
            .ok_or_else(|| {
                Status::not_found(format!("origin: no conflict of {origin} is on record here"))
            })?;
        Ok(Response::new(pb::ConflictEvidenceResponse {
            report: Some(conflict_report(&record)),
            held: Some(record.conflict.held.signed),
            other: Some(record.conflict.other.signed),
        }))
    }
}

/// The Admin service: peers at runtime, the audit log.
pub struct AdminService {
    /// This node's origin.
    origin: String,
    registry: Arc<PeerRegistry>,
    replication: Arc<Replication>,
    /// `tls.mode = "insecure"`: peers must be on loopback.
    insecure: bool,
}

fn who(request: &Request<impl Sized>) -> String {
    match request.extensions().get::<PeerInfo>() {
        Some(PeerInfo {
            identity: Some(identity),
            ..
        }) => identity.to_string(),
        Some(info) => format!("local ({})", info.addr),
        None => "unknown".into(),
    }
}

fn peer_record(policy: PeerPolicy) -> pb::PeerRecord {
    pb::PeerRecord {
        name: policy.name,
        address: policy.address,
        origin: policy.origin.unwrap_or_default(),
        may_read: policy.may_read,
        relay: policy.relay,
        source: policy.source,
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn add_peer(
        &self,
        request: Request<pb::AddPeerRequest>,
    ) -> Result<Response<pb::PeerRecord>, Status> {
        let who = who(&request);
        let record = request
            .into_inner()
            .peer
            .ok_or_else(|| invalid("peer: missing".into()))?;
        let policy = PeerPolicy {
            name: record.name,
            address: record.address,
            origin: (!record.origin.is_empty()).then_some(record.origin),
            may_read: record.may_read,
            relay: record.relay,
            source: String::new(),
        };
        policy
            .check(self.insecure)
            .map_err(|m| invalid(format!("peer.{m}")))?;
        if policy.origin.as_deref() == Some(self.origin.as_str()) {
            return Err(invalid(format!(
                "peer.origin: {} is this node's own origin: a node does not replicate from itself",
                self.origin
            )));
        }
        let (registry, insecure) = (self.registry.clone(), self.insecure);
        let stored = tokio::task::spawn_blocking(move || registry.add(&who, policy, insecure))
            .await
            .map_err(|err| Status::internal(err.to_string()))?
            .map_err(|err| match err.refused {
                true => Status::failed_precondition(err.message),
                false => Status::unavailable(err.to_string()),
            })?;
        self.replication.add(&stored);
        tracing::info!(peer = %stored.name, address = %stored.address, "peer added");
        Ok(Response::new(peer_record(stored)))
    }

    async fn remove_peer(
        &self,
        request: Request<pb::RemovePeerRequest>,
    ) -> Result<Response<pb::RemovePeerResponse>, Status> {
        let who = who(&request);
        let name = request.into_inner().name;
        let registry = self.registry.clone();
        let removed = {
            let name = name.clone();
            tokio::task::spawn_blocking(move || registry.remove(&who, &name))
                .await
                .map_err(|err| Status::internal(err.to_string()))?
                .map_err(|err| Status::unavailable(err.to_string()))?
        };
        if !removed {
            return Err(Status::not_found(format!("name: no peer named {name:?}")));
        }
        self.replication.remove(&name);
        tracing::info!(peer = %name, "peer removed");
        Ok(Response::new(pb::RemovePeerResponse {}))
    }

    async fn list_peers(
        &self,
        _request: Request<pb::ListPeersRequest>,
    ) -> Result<Response<pb::ListPeersResponse>, Status> {
        Ok(Response::new(pb::ListPeersResponse {
            peers: self.registry.list().into_iter().map(peer_record).collect(),
        }))
    }

    async fn audit_log(
        &self,
        request: Request<pb::AuditLogRequest>,
    ) -> Result<Response<pb::AuditLogResponse>, Status> {
        let request = request.into_inner();
        let start = match request.page_token.as_str() {
            "" => 0,
            token => token
                .strip_prefix("audit-")
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| {
                    Status::invalid_argument("page_token: not a token this node issued")
                })?,
        };
        let limit = match request.page_size {
            0 => AUDIT_PAGE,
            n => (n as usize).min(AUDIT_PAGE),
        };
        let registry = self.registry.clone();
        let records = tokio::task::spawn_blocking(move || registry.audit_log())
            .await
            .map_err(|err| Status::internal(format!("audit log task failed: {err}")))?
            .map_err(|err| Status::unavailable(err.to_string()))?;
        let (total, mut entries, mut bytes) = (records.len(), Vec::new(), 0);
        let mut next = start;
        for record in records.into_iter().skip(start) {
            if entries.len() >= limit || bytes >= query::PAGE_BYTES {
                break;
            }
            let entry = pb::AuditEntry {
                time_unix_micros: record.time_unix_micros,
                who: record.who,
                action: record.action,
                detail: record.detail,
            };
            bytes += entry.encoded_len();
            entries.push(entry);
            next += 1;
        }
        Ok(Response::new(pb::AuditLogResponse {
            entries,
            next_page_token: match next < total {
                true => format!("audit-{next}"),
                false => String::new(),
            },
        }))
    }
}

/// Audit entries a page holds at most.
const AUDIT_PAGE: usize = 1000;

/// Everything the services share.
pub struct Services {
    /// The store.
    pub store: SharedStore,
    /// The writer.
    pub writer: Writer,
    /// The publisher.
    pub publisher: Arc<Publisher>,
    /// Replication from peers (for status and runtime changes).
    pub replication: Arc<Replication>,
    /// Peers and their policies, persisted and audited.
    pub registry: Arc<PeerRegistry>,
    /// The federation roster.
    pub roster: Arc<Roster>,
    /// Operators who may publish, query and administer (`tls.operators`).
    pub operators: Vec<String>,
    /// `tls.mode = "insecure"`.
    pub insecure: bool,
    /// Turns true at shutdown.
    pub shutdown: watch::Receiver<bool>,
    /// Message size limit.
    pub max_message_bytes: usize,
    /// Open subscriptions per peer (identity, or address) at most.
    pub max_streams_per_peer: usize,
    /// Bytes of requests all publish streams together hold unanswered at
    /// most.
    pub publish_stream_bytes: u32,
}

/// Builds the router: civex services, health (`grpc.health.v1`) and
/// reflection (v1 and v1alpha), with explicit message size limits.
pub async fn router(
    services: Services,
) -> Result<tonic::service::Routes, tonic_reflection::server::Error> {
    use pb::{
        feed_server::FeedServer, publish_server::PublishServer, query_server::QueryServer,
        status_server::StatusServer,
    };
    let max = services.max_message_bytes;
    let operators = Arc::new(services.operators.iter().cloned().collect::<HashSet<_>>());
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<PublishServer<PublishService>>()
        .await;
    health_reporter
        .set_serving::<FeedServer<FeedService>>()
        .await;
    health_reporter
        .set_serving::<QueryServer<QueryService>>()
        .await;
    health_reporter
        .set_serving::<StatusServer<StatusService>>()
        .await;
    health_reporter
        .set_serving::<pb::admin_server::AdminServer<AdminService>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(civex_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(civex_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    use tonic::service::interceptor::InterceptedService;
    let publish = PublishServer::new(PublishService {
        publisher: services.publisher.clone(),
        roster: services.roster.clone(),
        store: services.store.clone(),
        replication: services.replication.clone(),
        roster_changes: Arc::default(),
        shutdown: services.shutdown.clone(),
        stream_bytes: services.publish_stream_bytes,
        stream_budget: Arc::new(tokio::sync::Semaphore::new(
            services.publish_stream_bytes as usize,
        )),
        max_message_bytes: max,
    })
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let publish = InterceptedService::new(
        publish,
        Access::Operators("publishing").check(operators.clone()),
    );
    let feed = FeedServer::new(FeedService {
        store: services.store.clone(),
        writer: services.writer.clone(),
        shutdown: services.shutdown.clone(),
        streams: StreamSlots {
            open: Arc::default(),
            cap: services.max_streams_per_peer,
        },
        registry: services.registry.clone(),
        roster: services.roster.clone(),
        origin: services.publisher.origin().to_owned(),
    })
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let feed = InterceptedService::new(feed, Access::Members.check(operators.clone()));
    let query = QueryServer::new(QueryService {
        store: services.store.clone(),
        writer: services.writer.clone(),
    })
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let query = InterceptedService::new(
        query,
        Access::Operators("querying").check(operators.clone()),
    );
    let own_origin = services.publisher.origin().to_owned();
    let status = StatusServer::new(StatusService {
        store: services.store,
        writer: services.writer,
        publisher: services.publisher,
        replication: services.replication.clone(),
    })
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let status = InterceptedService::new(
        status,
        Access::Operators("node status").check(operators.clone()),
    );
    let admin = pb::admin_server::AdminServer::new(AdminService {
        origin: own_origin,
        registry: services.registry,
        replication: services.replication,
        insecure: services.insecure,
    })
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let admin = InterceptedService::new(
        admin,
        Access::Operators("peer administration").check(operators.clone()),
    );
    Ok(tonic::service::Routes::new(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(publish)
        .add_service(feed)
        .add_service(query)
        .add_service(status)
        .add_service(admin))
}
