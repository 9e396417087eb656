//! Statistical disclosure control (SDC) engine for civex.
//!
//! Cities publish indicators as tables (one indicator and period, cells over the
//! reference area and optional breakdown dimensions, with one level of margins).
//! [`engine::protect`] applies the primary rules ([`primary`]: threshold, (n, k)
//! dominance, p%), secondary suppression for tables with margins ([`secondary`]:
//! hypercubes verified by the exact LP interval [`audit`]), optional
//! differential-privacy noise ([`noise`]; the budget is kept by the store) and
//! rounding ([`rounding`]); a revision of a published table is audited with
//! the equations of its earlier versions ([`revision`]). Published data
//! ([`engine::PublishedTable`]) and local explanations
//! ([`engine::LocalReport`]) are kept in separate types.
//!
//! Pure library: no IO, no global state, no printing.

pub mod audit;
pub mod engine;
pub mod error;
pub mod lp;
pub mod noise;
pub mod params;
pub mod primary;
pub mod revision;
pub mod rounding;
pub mod secondary;
pub mod settings;
pub mod table;

#[cfg(test)]
mod tests;

pub use engine::{
    audit, protect, protect_with_fresh_seed, protect_with_seed, LocalNote, LocalReport, Outcome,
    PublishedCell, PublishedTable,
};
pub use error::SdcError;
pub use noise::{NoiseMechanism, NoiseSeed, NoiseSettings, PrivacyCost, Rational};
pub use params::{AppliedParameter, AppliedParameters};
pub use primary::CellStatus;
pub use settings::{
    DominanceRule, PPercentRule, ParameterId, ProtectionLevel, RoundingRule, Settings,
    ThresholdRule,
};
pub use table::{AggregationKind, CellInput, Coord, LargestContributions, Table};
