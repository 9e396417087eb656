//! Privacy-budget ledger (pure in-memory value; persistence is the caller's job).

use std::collections::BTreeMap;

use super::error::SdcError;

/// Spent privacy budget (rho-zCDP) per indicator and period, with a limit per
/// indicator and period: the data of one indicator and period is the protected unit.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetLedger {
    limit: f64,
    spent: BTreeMap<(String, String), f64>,
}

impl BudgetLedger {
    /// A ledger with the given limit (rho) per indicator and period.
    pub fn new(limit: f64) -> Result<Self, SdcError> {
        if !(limit.is_finite() && limit >= 0.0) {
            return Err(SdcError::InvalidNoise(
                "budget limit must be finite and >= 0".into(),
            ));
        }
        Ok(BudgetLedger {
            limit,
            spent: BTreeMap::new(),
        })
    }

    /// Restores a ledger from persisted entries (each must be within the limit).
    pub fn from_entries(
        limit: f64,
        entries: impl IntoIterator<Item = (String, String, f64)>,
    ) -> Result<Self, SdcError> {
        let mut l = Self::new(limit)?;
        for (i, p, s) in entries {
            l.try_debit(&i, &p, s)?;
        }
        Ok(l)
    }

    /// The limit per indicator and period.
    pub fn limit(&self) -> f64 {
        self.limit
    }

    /// Budget spent on an indicator and period.
    pub fn spent(&self, indicator: &str, period: &str) -> f64 {
        self.spent
            .get(&(indicator.to_string(), period.to_string()))
            .copied()
            .unwrap_or(0.0)
    }

    /// Budget still available for an indicator and period.
    pub fn remaining(&self, indicator: &str, period: &str) -> f64 {
        (self.limit - self.spent(indicator, period)).max(0.0)
    }

    /// All entries `(indicator, period, spent)`, sorted, for persistence.
    pub fn entries(&self) -> Vec<(String, String, f64)> {
        self.spent
            .iter()
            .map(|((i, p), s)| (i.clone(), p.clone(), *s))
            .collect()
    }

    /// Debits `cost`; refuses (changing nothing) when the new total would exceed
    /// the limit or the cost is negative or not finite. Returns the remaining budget.
    pub fn try_debit(&mut self, indicator: &str, period: &str, cost: f64) -> Result<f64, SdcError> {
        let current = self.spent(indicator, period);
        let refuse = || SdcError::BudgetExceeded {
            indicator: indicator.to_string(),
            period: period.to_string(),
            requested: cost,
            remaining: (self.limit - current).max(0.0),
        };
        if !(cost.is_finite() && cost >= 0.0) {
            return Err(refuse());
        }
        let new = current + cost;
        if new > self.limit {
            return Err(refuse());
        }
        self.spent
            .insert((indicator.to_string(), period.to_string()), new);
        Ok(self.limit - new)
    }
}
