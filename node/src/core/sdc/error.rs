//! Error type of the disclosure-control engine.

use thiserror::Error;

/// Everything that can go wrong when building a table, protecting it,
/// or sampling noise.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SdcError {
    /// A cell has a different number of coordinates than the table has dimensions.
    #[error("cell {cell} has {got} coordinates but the table has {expected} dimensions")]
    DimensionMismatch {
        /// Human-readable cell label.
        cell: String,
        /// Number of dimensions of the table.
        expected: usize,
        /// Number of coordinates of the cell.
        got: usize,
    },
    /// Two cells have the same coordinates.
    #[error("duplicate cell {0}")]
    DuplicateCell(String),
    /// An additive table with margins lacks a cell of its grid.
    #[error("additive table with margins is missing cell {0} (supply empty cells with value 0 and 0 contributors)")]
    MissingCell(String),
    /// A total cell does not equal the sum of the cells it covers.
    #[error("total cell {total} is {actual} but its parts sum to {expected}")]
    TotalMismatch {
        /// Label of the total cell.
        total: String,
        /// Sum of the parts.
        expected: f64,
        /// Value of the total cell.
        actual: f64,
    },
    /// A cell value is not finite or lies outside the configured value bounds.
    #[error("cell {cell} has value {value} outside the allowed range")]
    ValueOutOfBounds {
        /// Label of the cell.
        cell: String,
        /// The offending value.
        value: f64,
    },
    /// A magnitude cell lacks the largest-contribution data needed by an enabled rule.
    #[error("magnitude cell {cell} has no largest-contribution data, but the {rule} rule is enabled; refusing to treat it as safe")]
    MissingLargestContributions {
        /// Label of the cell.
        cell: String,
        /// Name of the rule that needs the data.
        rule: &'static str,
    },
    /// The largest-contribution data of a cell is inconsistent.
    #[error("cell {cell} has invalid largest-contribution data: {reason}")]
    InvalidContributions {
        /// Label of the cell.
        cell: String,
        /// What is wrong.
        reason: String,
    },
    /// A setting is out of its valid range.
    #[error("invalid settings: {0}")]
    InvalidSettings(String),
    /// The linear-programming audit failed numerically or found the published table infeasible.
    #[error("interval audit failed: {0}")]
    Audit(String),
    /// Secondary suppression could not reach a table that passes the audit.
    #[error("secondary suppression did not converge: {0}")]
    SecondaryFailed(String),
    /// A revision cannot be audited against the earlier versions of its
    /// table (too much work, or a version that does not add up); it must
    /// not be published unaudited.
    #[error("{0}")]
    RevisionUnaudited(String),
    /// Noise parameters are invalid.
    #[error("invalid noise parameters: {0}")]
    InvalidNoise(String),
    /// The operating-system random source failed.
    #[error("random source failed: {0}")]
    Randomness(String),
}
