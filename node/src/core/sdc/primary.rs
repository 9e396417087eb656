//! Primary disclosure rules: threshold, (n, k) dominance and p%.
//!
//! Each sensitive cell gets a *protection interval*: the published table must leave
//! an attacker unable to exclude `x + upper` and `x - lower`, where `x` is the true value.
//!
//! * Threshold cells: `upper = lower = max(relative_percent/100 * |x|, minimum)`.
//! * p% cells (total `T`, largest `x1 >= x2`): `upper = lower = p/100 * x1 - (T - x1 - x2)`,
//!   the classical required protection (Cox 1981; Hundepool et al., *Statistical
//!   Disclosure Control*, 2012, §4.2): if the second-largest contributor can bound `T`
//!   from above by `T + upper`, its estimate of `x1` is off by at least `p %`.
//! * (n, k) cells (sum of the `n` largest `S_n`): `upper = lower = 100/k * S_n - T`,
//!   the amount by which `T` must be uncertain for the cell to look safe.
//!
//! Protection is symmetric (conservative; the upper side is the one the literature
//! requires), the lower side is capped at `x - lower_bound` and the upper side at
//! `upper_bound - x`. When several rules fire, the largest protection is kept and the
//! status follows the precedence SmallCounts > Dominance.

use super::error::SdcError;
use super::settings::Settings;
use super::table::{AggregationKind, LargestContributions, Table};

/// Confidentiality status of a published cell.
///
/// Mapping to statistical-office vocabulary (SDMX `CONF_STATUS`-like):
/// `Free` = free for publication (F), `SmallCounts` = primary confidential by the
/// threshold rule (C), `Dominance` = primary confidential by dominance or p% (C, D),
/// `Secondary` = secondary confidentiality set to protect a primary cell (D).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CellStatus {
    /// Published.
    Free,
    /// Suppressed: fewer contributors than the threshold.
    SmallCounts,
    /// Suppressed: a few contributors dominate the value ((n, k) or p% rule).
    Dominance,
    /// Suppressed to protect another suppressed cell (complementary suppression).
    Secondary,
}

impl CellStatus {
    /// Whether the cell's value is withheld.
    pub fn is_suppressed(self) -> bool {
        !matches!(self, CellStatus::Free)
    }

    /// Whether this is a primary (rule-triggered) suppression.
    pub fn is_primary(self) -> bool {
        matches!(self, CellStatus::SmallCounts | CellStatus::Dominance)
    }

    /// Stable name used in text formats: `free`, `small-counts`, `dominance`, `secondary`.
    pub fn name(self) -> &'static str {
        match self {
            CellStatus::Free => "free",
            CellStatus::SmallCounts => "small-counts",
            CellStatus::Dominance => "dominance",
            CellStatus::Secondary => "secondary",
        }
    }
}

/// Result of the primary rules for one sensitive cell.
#[derive(Debug, Clone, PartialEq)]
pub struct PrimaryFinding {
    /// `SmallCounts` or `Dominance`.
    pub status: CellStatus,
    /// Local (dry-run only) explanation; may contain contributor counts and shares.
    pub reason: String,
    /// Required upper protection (absolute, >= 0).
    pub upper: f64,
    /// Required lower protection (absolute, >= 0).
    pub lower: f64,
}

/// Applies the primary rules to every cell; `None` means the cell is not sensitive.
pub fn evaluate(
    table: &Table,
    settings: &Settings,
) -> Result<Vec<Option<PrimaryFinding>>, SdcError> {
    (0..table.cells().len())
        .map(|i| evaluate_cell(table, settings, i))
        .collect()
}

fn evaluate_cell(
    table: &Table,
    settings: &Settings,
    i: usize,
) -> Result<Option<PrimaryFinding>, SdcError> {
    let cell = &table.cells()[i];
    let x = cell.value;
    let c = cell.contributors;
    if c == 0 && x == 0.0 {
        // Empty cell: no contributor to protect.
        return Ok(None);
    }
    let mut status = None;
    let mut reasons = Vec::new();
    let mut protection: f64 = 0.0;

    if let Some(t) = settings.threshold {
        if c < t.min_contributors {
            status = Some(CellStatus::SmallCounts);
            reasons.push(format!(
                "{c} contributor{}, below threshold {}",
                if c == 1 { "" } else { "s" },
                t.min_contributors
            ));
            let pl = settings.threshold_protection;
            protection = protection.max((pl.relative_percent / 100.0 * x.abs()).max(pl.minimum));
        }
    }

    let magnitude_rules = settings.dominance.is_some() || settings.p_percent.is_some();
    if table.kind().is_magnitude() && magnitude_rules {
        let rule = if settings.dominance.is_some() {
            "dominance"
        } else {
            "p%"
        };
        let Some(largest) = &cell.largest else {
            return Err(SdcError::MissingLargestContributions {
                cell: table.label(i),
                rule,
            });
        };
        let needed = settings
            .dominance
            .map_or(0, |d| d.n)
            .max(if settings.p_percent.is_some() { 2 } else { 0 });
        let (total, top) = contributions(table, i, largest, needed)?;
        if let Some(p) = settings.p_percent {
            let x1 = top.first().copied().unwrap_or(0.0);
            let x2 = top.get(1).copied().unwrap_or(0.0);
            let rest = (total - x1 - x2).max(0.0);
            if rest < p.p / 100.0 * x1 {
                status.get_or_insert(CellStatus::Dominance);
                reasons.push(format!(
                    "p% rule: contributors other than the two largest hold {:.1}% of the largest, below p={}%",
                    100.0 * rest / x1,
                    p.p
                ));
                protection = protection.max(p.p / 100.0 * x1 - rest);
            }
        }
        if let Some(d) = settings.dominance {
            let sn: f64 = top.iter().take(d.n).sum();
            if total > 0.0 && sn > d.k / 100.0 * total {
                status.get_or_insert(CellStatus::Dominance);
                let who = if d.n == 1 {
                    "largest contributor holds".to_string()
                } else {
                    format!("{} largest contributors hold", d.n)
                };
                reasons.push(format!("{who} {:.0}% > k={}%", 100.0 * sn / total, d.k));
                protection = protection.max(100.0 / d.k * sn - total);
            }
        }
    }

    let Some(status) = status else {
        return Ok(None);
    };
    // Express the protection in the unit of the cell value.
    let scale = match table.kind() {
        AggregationKind::Mean if c > 0 && status == CellStatus::Dominance => 1.0 / c as f64,
        _ => 1.0,
    };
    let prot = protection * scale;
    let mut lower = prot;
    let mut upper = prot;
    if let Some(l) = settings.lower_bound {
        lower = lower.min((x - l).max(0.0));
    }
    if let Some(u) = settings.upper_bound {
        upper = upper.min((u - x).max(0.0));
    }
    Ok(Some(PrimaryFinding {
        status,
        reason: reasons.join("; "),
        upper,
        lower,
    }))
}

/// Returns the total to which the dominance rules apply and the largest contributions,
/// sorted descending.
fn contributions(
    table: &Table,
    i: usize,
    largest: &LargestContributions,
    needed: usize,
) -> Result<(f64, Vec<f64>), SdcError> {
    let cell = &table.cells()[i];
    let invalid = |reason: &str| SdcError::InvalidContributions {
        cell: table.label(i),
        reason: reason.to_string(),
    };
    let total = match table.kind() {
        AggregationKind::Mean => cell.value * cell.contributors as f64,
        AggregationKind::Ratio => {
            if matches!(largest, LargestContributions::Values(_)) {
                return Err(invalid(
                    "ratio cells need contribution shares of the numerator",
                ));
            }
            1.0
        }
        _ => cell.value,
    };
    let mut top = match largest {
        LargestContributions::Values(v) => v.clone(),
        LargestContributions::Shares(s) => {
            if s.iter().any(|&x| !(0.0..=1.0 + 1e-12).contains(&x)) {
                return Err(invalid("shares must lie in [0, 1]"));
            }
            s.iter().map(|&x| x * total).collect()
        }
    };
    if top.iter().any(|x| !x.is_finite() || *x < 0.0) {
        return Err(invalid("contributions must be finite and non-negative"));
    }
    top.sort_by(|a, b| b.total_cmp(a));
    let sum: f64 = top.iter().sum();
    if sum > total.abs() * (1.0 + 1e-9) + 1e-9 {
        return Err(invalid(
            "the largest contributions do not fit the cell's value and contributors",
        ));
    }
    if (top.len() as u64) > cell.contributors {
        return Err(invalid(
            "the largest contributions do not fit the cell's value and contributors",
        ));
    }
    // The message names the rules' need, never the cell's contributor
    // count, which may be smaller.
    let rules_need = needed;
    let needed = (needed as u64).min(cell.contributors) as usize;
    if top.len() < needed {
        return Err(invalid(&format!(
            "the enabled rules need the {rules_need} largest contributions (or all of \
             them, if fewer)"
        )));
    }
    Ok((total, top))
}
