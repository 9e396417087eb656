//! Per-indicator disclosure-control settings with safe defaults.

use super::error::SdcError;
use super::noise::NoiseSettings;

/// Threshold (minimum frequency) rule: a cell with `0 < contributors < min_contributors`
/// is primary-sensitive ("small counts"). Default `min_contributors = 3`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThresholdRule {
    /// Minimum number of contributors for a cell to be publishable.
    pub min_contributors: u64,
}

impl Default for ThresholdRule {
    fn default() -> Self {
        ThresholdRule {
            min_contributors: 3,
        }
    }
}

/// (n, k) dominance rule: a magnitude cell is sensitive when its `n` largest
/// contributions sum to more than `k` percent of the cell total.
/// Default `(n, k) = (2, 85)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DominanceRule {
    /// Number of largest contributors considered.
    pub n: usize,
    /// Percentage threshold (0 < k <= 100).
    pub k: f64,
}

impl Default for DominanceRule {
    fn default() -> Self {
        DominanceRule { n: 2, k: 85.0 }
    }
}

/// p% rule: a magnitude cell with total `T` and largest contributions `x1 >= x2` is
/// sensitive when `T - x1 - x2 < p/100 * x1`. Default `p = 10`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PPercentRule {
    /// The percentage p (> 0).
    pub p: f64,
}

impl Default for PPercentRule {
    fn default() -> Self {
        PPercentRule { p: 10.0 }
    }
}

/// Protection level for threshold (small-count) cells: the attacker's feasible
/// interval must reach at least `max(relative_percent/100 * x, minimum)` above and
/// below the true value `x` (the lower side is capped at the value bound).
/// Default: 20 % with a minimum of 3 (for counts: "the attacker cannot tell 1 from 0 or 4").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProtectionLevel {
    /// Relative protection in percent of the cell value.
    pub relative_percent: f64,
    /// Absolute minimum protection, in the unit of the cell value.
    pub minimum: f64,
}

impl Default for ProtectionLevel {
    fn default() -> Self {
        ProtectionLevel {
            relative_percent: 20.0,
            minimum: 3.0,
        }
    }
}

/// Rounding of published values to the nearest multiple of `base` (halves away from zero).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundingRule {
    /// Rounding base, e.g. 5 (must be > 0).
    pub base: f64,
}

/// Names of the parameters that appear in [`super::params::AppliedParameters`];
/// used to mark parameters as secret (kept out of the published record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ParameterId {
    /// Threshold rule `n`.
    ThresholdMinContributors,
    /// Dominance rule `n`.
    DominanceN,
    /// Dominance rule `k`.
    DominanceK,
    /// p% rule `p`.
    PPercentP,
    /// Threshold protection level (relative part).
    ProtectionRelative,
    /// Threshold protection level (minimum part).
    ProtectionMinimum,
    /// Value bounds assumed for the attacker.
    ValueBounds,
    /// Secondary suppression method.
    SecondaryMethod,
    /// Rounding base.
    RoundingBase,
    /// Noise mechanism and its scale.
    NoiseMechanism,
    /// Clamp bound (sensitivity) of sums.
    NoiseClampBound,
    /// zCDP cost of the publish.
    NoiseRho,
}

/// All settings of one indicator. `Settings::default()` is the safe default:
/// threshold 3, dominance (2, 85 %), p% with p = 10, secondary suppression on,
/// non-negative values, no rounding, no noise, and the dominance `k`, the `p` and
/// the protection levels marked secret.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Threshold rule, or `None` to disable.
    pub threshold: Option<ThresholdRule>,
    /// Dominance (n, k) rule, or `None` to disable.
    pub dominance: Option<DominanceRule>,
    /// p% rule, or `None` to disable.
    pub p_percent: Option<PPercentRule>,
    /// Protection level of threshold cells.
    pub threshold_protection: ProtectionLevel,
    /// Whether secondary (complementary) suppression is performed for tables with margins.
    pub secondary: bool,
    /// Lower bound of any cell value known to an attacker (default `Some(0.0)`).
    pub lower_bound: Option<f64>,
    /// Upper bound of any cell value known to an attacker (default `None`).
    pub upper_bound: Option<f64>,
    /// Rounding of published values, or `None`.
    pub rounding: Option<RoundingRule>,
    /// Differential-privacy noise, or `None`.
    pub noise: Option<NoiseSettings>,
    /// Parameters kept out of the published record.
    pub secret_parameters: Vec<ParameterId>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            threshold: Some(ThresholdRule::default()),
            dominance: Some(DominanceRule::default()),
            p_percent: Some(PPercentRule::default()),
            threshold_protection: ProtectionLevel::default(),
            secondary: true,
            lower_bound: Some(0.0),
            upper_bound: None,
            rounding: None,
            noise: None,
            secret_parameters: vec![
                ParameterId::DominanceK,
                ParameterId::PPercentP,
                ParameterId::ProtectionRelative,
                ParameterId::ProtectionMinimum,
            ],
        }
    }
}

impl Settings {
    /// Checks that every parameter is in its valid range.
    pub fn validate(&self) -> Result<(), SdcError> {
        let bad = |m: &str| Err(SdcError::InvalidSettings(m.to_string()));
        if let Some(t) = self.threshold {
            if t.min_contributors == 0 {
                return bad("threshold min_contributors must be >= 1");
            }
        }
        if let Some(d) = self.dominance {
            if d.n == 0 || !(d.k > 0.0 && d.k <= 100.0) {
                return bad("dominance rule needs n >= 1 and 0 < k <= 100");
            }
        }
        if let Some(p) = self.p_percent {
            if !(p.p > 0.0 && p.p.is_finite()) {
                return bad("p% rule needs p > 0");
            }
        }
        let pl = self.threshold_protection;
        let valid = pl.relative_percent.is_finite()
            && pl.minimum.is_finite()
            && pl.relative_percent >= 0.0
            && pl.minimum > 0.0;
        if !valid {
            return bad("protection level must be finite, relative >= 0 and minimum > 0");
        }
        if let (Some(l), Some(u)) = (self.lower_bound, self.upper_bound) {
            if l.partial_cmp(&u) != Some(std::cmp::Ordering::Less) {
                return bad("lower bound must be below upper bound");
            }
        }
        if let Some(r) = self.rounding {
            if !(r.base > 0.0 && r.base.is_finite()) {
                return bad("rounding base must be > 0");
            }
        }
        if let Some(n) = &self.noise {
            n.validate()?;
        }
        Ok(())
    }

    /// Whether a parameter is marked secret.
    pub fn is_secret(&self, id: ParameterId) -> bool {
        self.secret_parameters.contains(&id)
    }
}
