//! The applied parameters of a publish, for the signed record.

use super::noise::NoiseMechanism;
use super::settings::{ParameterId, Settings};

/// One applied parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedParameter {
    /// Which parameter.
    pub id: ParameterId,
    /// Rule name, e.g. `threshold`, `dominance`, `p-percent`.
    pub rule: &'static str,
    /// Parameter name within the rule, e.g. `n`, `k`, `p`.
    pub name: &'static str,
    /// Value rendered as text.
    pub value: String,
    /// Kept out of the published record by the office.
    pub secret: bool,
}

/// The rules and parameters applied to a table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppliedParameters {
    /// All parameters, public and secret.
    pub entries: Vec<AppliedParameter>,
}

impl AppliedParameters {
    /// Collects the parameters of `settings` (disabled rules are omitted).
    pub fn from_settings(settings: &Settings, noise_rho: Option<f64>) -> Self {
        let mut entries = Vec::new();
        let mut push = |id, rule, name, value: String| {
            entries.push(AppliedParameter {
                id,
                rule,
                name,
                value,
                secret: settings.is_secret(id),
            })
        };
        if let Some(t) = settings.threshold {
            push(
                ParameterId::ThresholdMinContributors,
                "threshold",
                "n",
                t.min_contributors.to_string(),
            );
            let pl = settings.threshold_protection;
            push(
                ParameterId::ProtectionRelative,
                "threshold-protection",
                "relative-percent",
                fmt_num(pl.relative_percent),
            );
            push(
                ParameterId::ProtectionMinimum,
                "threshold-protection",
                "minimum",
                fmt_num(pl.minimum),
            );
        }
        if let Some(d) = settings.dominance {
            push(ParameterId::DominanceN, "dominance", "n", d.n.to_string());
            push(ParameterId::DominanceK, "dominance", "k", fmt_num(d.k));
        }
        if let Some(p) = settings.p_percent {
            push(ParameterId::PPercentP, "p-percent", "p", fmt_num(p.p));
        }
        push(
            ParameterId::ValueBounds,
            "attacker-model",
            "value-bounds",
            format!(
                "[{}, {}]",
                settings.lower_bound.map_or("-inf".into(), fmt_num),
                settings.upper_bound.map_or("+inf".into(), fmt_num)
            ),
        );
        if settings.secondary {
            push(
                ParameterId::SecondaryMethod,
                "secondary",
                "method",
                "hypercube+lp-audit".into(),
            );
        }
        if let Some(r) = settings.rounding {
            push(
                ParameterId::RoundingBase,
                "rounding",
                "base",
                fmt_num(r.base),
            );
        }
        if let Some(n) = &settings.noise {
            let m = match n.mechanism {
                NoiseMechanism::Laplace { epsilon } => {
                    format!("discrete-laplace epsilon={}/{}", epsilon.num, epsilon.den)
                }
                NoiseMechanism::Gaussian { sigma_squared } => format!(
                    "discrete-gaussian sigma^2={}/{}",
                    sigma_squared.num, sigma_squared.den
                ),
            };
            push(ParameterId::NoiseMechanism, "noise", "mechanism", m);
            push(
                ParameterId::NoiseClampBound,
                "noise",
                "clamp-bound",
                n.clamp_bound.to_string(),
            );
            if let Some(rho) = noise_rho {
                push(ParameterId::NoiseRho, "noise", "rho-zcdp", fmt_num(rho));
            }
        }
        AppliedParameters { entries }
    }

    /// The parameters that may go into the published record.
    pub fn public(&self) -> Vec<&AppliedParameter> {
        self.entries.iter().filter(|e| !e.secret).collect()
    }
}

fn fmt_num(x: f64) -> String {
    format!("{x}")
}
