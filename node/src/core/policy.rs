//! Disclosure policy: which disclosure-control settings apply to which
//! indicator. Defaults follow whose records the indicator is computed from
//! (catalog `subjects`); the node's configuration changes them per node
//! and per indicator.

use super::catalog::{Catalog, Indicator, Subjects};
use super::sdc::{
    DominanceRule, NoiseMechanism, NoiseSettings, PPercentRule, ParameterId, ProtectionLevel,
    Rational, RoundingRule, Settings, ThresholdRule,
};

/// Text names of the parameters a node may keep secret, as `rule.name`.
pub const PARAMETER_NAMES: [(&str, ParameterId); 12] = [
    ("threshold.n", ParameterId::ThresholdMinContributors),
    (
        "threshold-protection.relative-percent",
        ParameterId::ProtectionRelative,
    ),
    (
        "threshold-protection.minimum",
        ParameterId::ProtectionMinimum,
    ),
    ("dominance.n", ParameterId::DominanceN),
    ("dominance.k", ParameterId::DominanceK),
    ("p-percent.p", ParameterId::PPercentP),
    ("attacker-model.value-bounds", ParameterId::ValueBounds),
    ("secondary.method", ParameterId::SecondaryMethod),
    ("rounding.base", ParameterId::RoundingBase),
    ("noise.mechanism", ParameterId::NoiseMechanism),
    ("noise.clamp-bound", ParameterId::NoiseClampBound),
    ("noise.rho-zcdp", ParameterId::NoiseRho),
];

/// Settings for one indicator, as configured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Override {
    /// Indicator code.
    pub code: String,
    /// Catalog edition (resolved when the policy is built).
    pub edition: Option<String>,
    /// Threshold rule.
    pub min_contributors: Option<u64>,
    /// Whether the dominance and p% rules apply (magnitudes only).
    pub dominance: Option<bool>,
    /// Whether secondary suppression runs.
    pub secondary: Option<bool>,
    /// Rounding base.
    pub rounding_base: Option<f64>,
    /// Differential-privacy noise (counts and sums only).
    pub noise: Option<NoiseSettings>,
    /// Privacy budget (zCDP rho) per period; required with noise.
    pub budget_rho: Option<f64>,
    /// Whether the noise's clamp bound was given (required for sums).
    pub clamp_given: bool,
}

/// The whole policy of a node.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Threshold rule for persons and businesses.
    pub min_contributors: u64,
    /// Dominance rule for businesses' magnitudes.
    pub dominance: DominanceRule,
    /// p% rule for businesses' magnitudes.
    pub p_percent: PPercentRule,
    /// Protection interval of threshold cells.
    pub protection: ProtectionLevel,
    /// Parameters left out of signed entries.
    pub secret: Vec<ParameterId>,
    /// Per-indicator settings.
    pub overrides: Vec<Override>,
}

impl Default for Policy {
    fn default() -> Self {
        let defaults = Settings::default();
        Self {
            min_contributors: ThresholdRule::default().min_contributors,
            dominance: DominanceRule::default(),
            p_percent: PPercentRule::default(),
            protection: ProtectionLevel::default(),
            secret: defaults.secret_parameters,
            overrides: Vec::new(),
        }
    }
}

/// The settings of one indicator and the budget they spend from.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// Engine settings.
    pub settings: Settings,
    /// Privacy budget per period (rho), when noise is configured.
    pub budget_rho: Option<f64>,
}

/// Parses `num/den` (or a whole number) into a positive rational.
pub fn parse_rational(text: &str) -> Result<Rational, String> {
    let (num, den) = text.split_once('/').unwrap_or((text, "1"));
    match (num.trim().parse::<u64>(), den.trim().parse::<u64>()) {
        (Ok(num), Ok(den)) if num > 0 && den > 0 => Ok(Rational::new(num, den)),
        _ => Err(format!(
            "{text:?} is not a positive fraction such as \"1/2\" or \"25\""
        )),
    }
}

/// Parses a secret parameter name.
pub fn parse_parameter(text: &str) -> Result<ParameterId, String> {
    PARAMETER_NAMES
        .iter()
        .find(|(name, _)| *name == text)
        .map(|(_, id)| *id)
        .ok_or_else(|| {
            let names: Vec<&str> = PARAMETER_NAMES.iter().map(|(n, _)| *n).collect();
            format!("unknown parameter {text:?} (known: {})", names.join(", "))
        })
}

/// Builds noise settings from a mechanism name and its parameter.
pub fn noise_settings(
    mechanism: &str,
    parameter: &str,
    clamp_bound: u64,
) -> Result<NoiseSettings, String> {
    let value = parse_rational(parameter)?;
    let mechanism = match mechanism {
        "laplace" => NoiseMechanism::Laplace { epsilon: value },
        "gaussian" => NoiseMechanism::Gaussian {
            sigma_squared: value,
        },
        other => return Err(format!("unknown noise {other:?} (laplace, gaussian)")),
    };
    let settings = NoiseSettings {
        mechanism,
        clamp_bound,
        cells_per_contributor: None,
    };
    settings.validate().map_err(|e| e.to_string())?;
    Ok(settings)
}

impl Policy {
    /// Checks the per-indicator settings against the catalog and fills in
    /// their editions. Errors name `disclosure.indicator[N]`.
    pub fn check(&mut self, catalog: &Catalog) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for (index, o) in self.overrides.iter_mut().enumerate() {
            let at = format!("disclosure.indicator[{index}] ({})", o.code);
            let indicator = catalog
                .find(&o.code, o.edition.as_deref())
                .map_err(|m| format!("{at}: {m}"))?;
            o.edition = Some(indicator.edition.clone());
            if !seen.insert((indicator.code.clone(), indicator.edition.clone())) {
                return Err(format!(
                    "{at}: {} of {} has settings twice; keep one table per indicator",
                    indicator.code, indicator.edition
                ));
            }
            let public = indicator.subjects == Subjects::Public;
            let useless = [
                (public && o.min_contributors.is_some(), "min_contributors"),
                (public && o.secondary.is_some(), "secondary"),
                (
                    o.dominance.is_some() && (public || !indicator.kind.is_magnitude()),
                    "dominance",
                ),
            ];
            if let Some((_, name)) = useless.iter().find(|(useless, _)| *useless) {
                return Err(format!(
                    "{at}: {name} does not apply to {} (a {} of {} records)",
                    indicator.code,
                    indicator.kind.name(),
                    indicator.subjects.name()
                ));
            }
            if o.noise.is_some()
                && indicator.kind == super::sdc::AggregationKind::Sum
                && !o.clamp_given
            {
                return Err(format!(
                    "{at}: noise on a sum needs clamp_bound, the most one contributor may add (contributions are clamped to it before summing)"
                ));
            }
            if o.min_contributors == Some(0) {
                return Err(format!("{at}: min_contributors must be at least 1"));
            }
            if let Some(base) = o.rounding_base {
                if !(base > 0.0 && base.is_finite()) {
                    return Err(format!("{at}: rounding_base must be above 0"));
                }
            }
            match (&o.noise, o.budget_rho) {
                (Some(_), None) => {
                    return Err(format!(
                        "{at}: noise needs budget_rho, the privacy budget per period"
                    ))
                }
                (None, Some(_)) => return Err(format!("{at}: budget_rho is set without noise")),
                (Some(_), Some(rho)) if !(rho > 0.0 && rho.is_finite()) => {
                    return Err(format!("{at}: budget_rho must be above 0"))
                }
                _ => {}
            }
            if o.noise.is_some() && !indicator.kind.is_additive() {
                return Err(format!(
                    "{at}: noise applies to counts and sums only; {} is a {}",
                    o.code,
                    indicator.kind.name()
                ));
            }
        }
        for (index, o) in self.overrides.iter().enumerate() {
            let edition = o.edition.as_deref();
            let indicator = catalog.find(&o.code, edition).map_err(|m| m.to_string())?;
            self.resolve(indicator)
                .settings
                .validate()
                .map_err(|e| format!("disclosure.indicator[{index}] ({}): {e}", o.code))?;
        }
        Ok(())
    }

    /// The settings for `indicator`.
    pub fn resolve(&self, indicator: &Indicator) -> Resolved {
        let o = self
            .overrides
            .iter()
            .find(|o| {
                o.code == indicator.code && o.edition.as_deref() == Some(indicator.edition.as_str())
            })
            .cloned()
            .unwrap_or_default();
        let protected = indicator.subjects != Subjects::Public;
        let businesses = indicator.subjects == Subjects::Businesses;
        let dominance = o.dominance.unwrap_or(businesses) && indicator.kind.is_magnitude();
        let additive = indicator.kind.is_additive();
        let settings = Settings {
            threshold: protected.then(|| ThresholdRule {
                min_contributors: o.min_contributors.unwrap_or(self.min_contributors),
            }),
            dominance: dominance.then_some(self.dominance),
            p_percent: dominance.then_some(self.p_percent),
            threshold_protection: self.protection,
            secondary: protected && additive && o.secondary.unwrap_or(true),
            lower_bound: additive.then_some(0.0),
            upper_bound: None,
            rounding: o.rounding_base.map(|base| RoundingRule { base }),
            noise: o.noise,
            secret_parameters: self.secret.clone(),
        };
        Resolved {
            settings,
            budget_rho: o.budget_rho,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::sdc::AggregationKind;

    fn catalog() -> Catalog {
        Catalog::with_city_file(crate::core::catalog::tests::TEST_CATALOG, "test.toml").unwrap()
    }

    #[test]
    fn defaults_follow_the_subjects() {
        let catalog = catalog();
        let policy = Policy::default();
        let get = |code| policy.resolve(catalog.find(code, None).unwrap()).settings;
        let jobs = get("jobs");
        assert!(jobs.threshold.is_some() && jobs.dominance.is_none() && jobs.secondary);
        let turnover = get("turnover");
        assert!(turnover.dominance.is_some() && turnover.p_percent.is_some());
        let roads = get("roads");
        assert!(roads.threshold.is_none() && roads.dominance.is_none() && !roads.secondary);
        let rate = get("rate");
        assert!(rate.threshold.is_some() && !rate.secondary && rate.lower_bound.is_none());
        assert_eq!(
            catalog.find("rate", None).unwrap().kind,
            AggregationKind::Ratio
        );
    }

    #[test]
    fn overrides_are_checked_against_the_catalog() {
        let catalog = catalog();
        let noise = noise_settings("laplace", "1/2", 1).unwrap();
        let mut policy = Policy {
            overrides: vec![Override {
                code: "jobs".into(),
                noise: Some(noise),
                budget_rho: Some(1.0),
                rounding_base: Some(5.0),
                ..Override::default()
            }],
            ..Policy::default()
        };
        policy.check(&catalog).unwrap();
        let resolved = policy.resolve(catalog.find("jobs", None).unwrap());
        assert_eq!(resolved.budget_rho, Some(1.0));
        assert_eq!(resolved.settings.rounding.unwrap().base, 5.0);
        let bad = |o: Override, expected: &str| {
            let mut policy = Policy {
                overrides: vec![o],
                ..Policy::default()
            };
            let err = policy.check(&catalog).unwrap_err();
            assert!(err.starts_with("disclosure.indicator[0]"), "{err}");
            assert!(err.contains(expected), "{err} lacks {expected}");
        };
        bad(
            Override {
                code: "nope".into(),
                ..Override::default()
            },
            "unknown indicator",
        );
        bad(
            Override {
                code: "jobs".into(),
                noise: Some(noise),
                ..Override::default()
            },
            "needs budget_rho",
        );
        bad(
            Override {
                code: "rate".into(),
                noise: Some(noise),
                budget_rho: Some(1.0),
                ..Override::default()
            },
            "counts and sums only",
        );
        bad(
            Override {
                code: "turnover".into(),
                noise: Some(noise),
                budget_rho: Some(1.0),
                ..Override::default()
            },
            "noise on a sum needs clamp_bound",
        );
        bad(
            Override {
                code: "roads".into(),
                min_contributors: Some(5),
                ..Override::default()
            },
            "min_contributors does not apply to roads",
        );
        bad(
            Override {
                code: "jobs".into(),
                dominance: Some(true),
                ..Override::default()
            },
            "dominance does not apply to jobs (a count",
        );
        let mut twice = Policy {
            overrides: vec![
                Override {
                    code: "jobs".into(),
                    ..Override::default()
                },
                Override {
                    code: "jobs".into(),
                    edition: Some("local".into()),
                    ..Override::default()
                },
            ],
            ..Policy::default()
        };
        let err = twice.check(&catalog).unwrap_err();
        assert!(
            err.starts_with("disclosure.indicator[1]") && err.contains("twice"),
            "{err}"
        );
        assert!(noise_settings("laplace", "0/1", 1).is_err());
        assert!(noise_settings("cauchy", "1", 1).is_err());
        assert!(parse_parameter("dominance.k").is_ok());
        assert!(parse_parameter("dominance.q").is_err());
    }
}
