//! The disclosure-control pipeline: primary rules, secondary suppression,
//! optional noise, rounding; output split into published data and local notes.
//!
//! Order: (1) primary rules on the true values; (2) secondary suppression, verified
//! by the LP audit against the values as they will be published *without* noise
//! (rounded when rounding is configured: the attacker is assumed to know that each
//! published value lies in its rounding interval, and noise can only add
//! uncertainty); (3) noise on the free cells (values taken to the nearest integer
//! unit, noise added, negative results clamped to the lower bound as post-processing);
//! (4) rounding of the free cells to the base.

use super::audit::{self, AuditReport, Knowledge, Requirement};
use super::error::SdcError;
use super::noise::{publish_cost, sample_noise, NoiseSeed, PrivacyCost, SeededRng};
use super::params::AppliedParameters;
use super::primary::{self, CellStatus, PrimaryFinding};
use super::rounding::{round_to_base, rounding_interval};
use super::secondary::{self, SecondaryInput};
use super::settings::Settings;
use super::table::{AggregationKind, Coord, Table};

/// One cell of the published table: safe to publish as is.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishedCell {
    /// Coordinates, one per dimension.
    pub coords: Vec<Coord>,
    /// Published value, `None` when suppressed.
    pub value: Option<f64>,
    /// Confidentiality status.
    pub status: CellStatus,
}

/// The published table (no contributor counts, contributions or reasons).
#[derive(Debug, Clone, PartialEq)]
pub struct PublishedTable {
    /// Indicator.
    pub indicator: String,
    /// Period.
    pub period: String,
    /// Dimension names.
    pub dimensions: Vec<String>,
    /// Cells, in input order.
    pub cells: Vec<PublishedCell>,
}

/// A local (dry-run) explanation for one suppressed cell. May contain contributor
/// counts and shares: never publish it.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalNote {
    /// Cell index in the input order.
    pub cell: usize,
    /// Cell label, e.g. `district-07/retail`.
    pub label: String,
    /// Status of the cell.
    pub status: CellStatus,
    /// Human-readable reason.
    pub reason: String,
}

/// Everything the operator may look at locally; never published.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LocalReport {
    /// One note per suppressed cell, in input order.
    pub notes: Vec<LocalNote>,
}

/// Result of [`protect`].
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The data that may be published.
    pub published: PublishedTable,
    /// Local explanations for the dry run; never publish.
    pub local: LocalReport,
    /// The applied rules and parameters, each flagged public or secret.
    pub parameters: AppliedParameters,
    /// Privacy cost to debit from the ledger (when noise is configured).
    pub privacy_cost: Option<PrivacyCost>,
}

/// Protects a table without noise (error if noise is configured: use
/// [`protect_with_seed`] then).
pub fn protect(table: &Table, settings: &Settings) -> Result<Outcome, SdcError> {
    if settings.noise.is_some() {
        return Err(SdcError::InvalidNoise(
            "noise is configured: call protect_with_seed".into(),
        ));
    }
    run(table, settings, None)
}

/// Protects a table, drawing all noise from the caller-stored `seed` (a retry with
/// the same seed and input yields the same output).
pub fn protect_with_seed(
    table: &Table,
    settings: &Settings,
    seed: &NoiseSeed,
) -> Result<Outcome, SdcError> {
    run(table, settings, Some(seed))
}

/// Protects a table with a fresh seed from the operating system; returns the seed
/// so the caller can store it for idempotent retries.
pub fn protect_with_fresh_seed(
    table: &Table,
    settings: &Settings,
) -> Result<(Outcome, NoiseSeed), SdcError> {
    let seed = NoiseSeed::generate()?;
    let out = run(table, settings, Some(&seed))?;
    Ok((out, seed))
}

/// The attacker's interval for each cell if it were published (rounding only).
pub fn published_intervals(table: &Table, settings: &Settings) -> Vec<(f64, f64)> {
    table
        .cells()
        .iter()
        .map(|c| match settings.rounding {
            None => (c.value, c.value),
            Some(r) => {
                let integer = table.kind() == AggregationKind::Count
                    && r.base.fract() == 0.0
                    && c.value.fract() == 0.0;
                rounding_interval(round_to_base(c.value, r.base), r.base, integer)
            }
        })
        .collect()
}

/// Dimensions along which the table publishes a total with its parts: a
/// contributor counts in one cell per level of each.
pub fn margin_dimensions(table: &Table) -> usize {
    (0..table.dimensions().len())
        .filter(|&d| table.has_total(d) && !table.codes(d).is_empty())
        .count()
}

pub(super) fn requirements(table: &Table, findings: &[Option<PrimaryFinding>]) -> Vec<Requirement> {
    findings
        .iter()
        .enumerate()
        .filter_map(|(i, f)| {
            f.as_ref().map(|f| {
                let x = table.cells()[i].value;
                Requirement {
                    cell: i,
                    at_most_lower: x - f.lower,
                    at_least_upper: x + f.upper,
                }
            })
        })
        .collect()
}

/// Full interval audit of a suppression pattern: exact feasible range of every
/// suppressed cell and the primary cells whose protection interval is not covered.
/// `statuses` is the status per cell (e.g. from an [`Outcome`]).
pub fn audit(
    table: &Table,
    settings: &Settings,
    statuses: &[CellStatus],
) -> Result<AuditReport, SdcError> {
    audit_knowing(table, settings, statuses, &[])
}

/// [`audit`] for an attacker who also knows, for some cells, an interval
/// holding the true value (`known[i]`, from an earlier version of the
/// table): a suppressed cell's, or one narrowing a published cell's
/// interval (an exact value then, rounded now); `known` may be shorter
/// than the table.
pub fn audit_knowing(
    table: &Table,
    settings: &Settings,
    statuses: &[CellStatus],
    known: &[Option<(f64, f64)>],
) -> Result<AuditReport, SdcError> {
    let knowledge = knowledge_of(table, settings, statuses, known)?;
    let findings = primary::evaluate(table, settings)?;
    audit::full_audit(
        table.constraints(),
        &knowledge,
        settings.lower_bound,
        settings.upper_bound,
        &requirements(table, &findings),
    )
}

/// What an attacker knows of each cell of `table` published with
/// `statuses` (one per cell, else an error), knowing `known` besides (see
/// [`audit_knowing`]).
pub(super) fn knowledge_of(
    table: &Table,
    settings: &Settings,
    statuses: &[CellStatus],
    known: &[Option<(f64, f64)>],
) -> Result<Vec<Knowledge>, SdcError> {
    if statuses.len() != table.cells().len() {
        return Err(SdcError::InvalidSettings(format!(
            "audit needs one status per cell ({} given, {} cells)",
            statuses.len(),
            table.cells().len()
        )));
    }
    let intervals = published_intervals(table, settings);
    Ok(statuses
        .iter()
        .zip(&intervals)
        .enumerate()
        .map(|(i, (s, &(a, b)))| match known.get(i).copied().flatten() {
            Some((lo, hi)) if !s.is_suppressed() && a.max(lo) <= b.min(hi) => {
                Knowledge::Interval(a.max(lo), b.min(hi))
            }
            _ if !s.is_suppressed() => Knowledge::Interval(a, b),
            Some((lo, hi)) => Knowledge::Interval(lo, hi),
            None => Knowledge::Suppressed,
        })
        .collect())
}

fn run(table: &Table, settings: &Settings, seed: Option<&NoiseSeed>) -> Result<Outcome, SdcError> {
    settings.validate()?;
    for (i, c) in table.cells().iter().enumerate() {
        let below = settings.lower_bound.is_some_and(|l| c.value < l);
        let above = settings.upper_bound.is_some_and(|u| c.value > u);
        if below || above {
            return Err(SdcError::ValueOutOfBounds {
                cell: table.label(i),
                value: c.value,
            });
        }
    }
    let n = table.cells().len();
    let findings = primary::evaluate(table, settings)?;
    let intervals = published_intervals(table, settings);
    let choices = if settings.secondary && !table.constraints().is_empty() {
        secondary::suppress(SecondaryInput {
            table,
            primary: &findings,
            published_interval: &intervals,
            lower: settings.lower_bound,
            upper: settings.upper_bound,
            singletons: true,
        })?
    } else {
        vec![None; n]
    };

    let margin_dims = margin_dimensions(table);
    let privacy_cost = settings
        .noise
        .as_ref()
        .map(|ns| publish_cost(ns, margin_dims));
    let mut rng = match (&settings.noise, seed) {
        (Some(_), Some(s)) => Some(SeededRng::new(s)),
        (Some(_), None) => {
            return Err(SdcError::InvalidNoise(
                "noise configured but no seed".into(),
            ))
        }
        _ => None,
    };

    let mut cells = Vec::with_capacity(n);
    let mut notes = Vec::new();
    for (i, c) in table.cells().iter().enumerate() {
        let (status, reason) = match (&findings[i], &choices[i]) {
            (Some(f), _) => (f.status, Some(f.reason.clone())),
            (None, Some(ch)) => (
                CellStatus::Secondary,
                Some(format!(
                    "suppressed to protect {}{}",
                    table.label(ch.protects),
                    if ch.fallback { " (fallback)" } else { "" }
                )),
            ),
            (None, None) => (CellStatus::Free, None),
        };
        let value = if status.is_suppressed() {
            None
        } else {
            let mut v = c.value;
            if let (Some(ns), Some(r)) = (&settings.noise, rng.as_mut()) {
                v = v.round() + sample_noise(r, ns) as f64;
                if let Some(l) = settings.lower_bound {
                    v = v.max(l);
                }
            }
            if let Some(r) = settings.rounding {
                v = round_to_base(v, r.base);
            }
            Some(v)
        };
        if let Some(reason) = reason {
            notes.push(LocalNote {
                cell: i,
                label: table.label(i),
                status,
                reason,
            });
        }
        cells.push(PublishedCell {
            coords: c.coords.clone(),
            value,
            status,
        });
    }
    Ok(Outcome {
        published: PublishedTable {
            indicator: table.indicator().to_string(),
            period: table.period().to_string(),
            dimensions: table.dimensions().to_vec(),
            cells,
        },
        local: LocalReport { notes },
        parameters: AppliedParameters::from_settings(settings, privacy_cost.map(|c| c.rho)),
        privacy_cost,
    })
}
