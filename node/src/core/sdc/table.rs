//! Table model: cells with one coordinate per dimension, where a coordinate
//! may be the dimension's total code, and the additive constraints implied
//! by the margins.

use std::collections::HashMap;
use std::fmt;

use super::error::SdcError;

/// How the indicator aggregates its contributions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AggregationKind {
    /// Number of contributors (units); additive, margins allowed.
    Count,
    /// Sum of a magnitude over contributors; additive, margins allowed.
    Sum,
    /// Ratio of two magnitudes; not additive, primary rules only.
    Ratio,
    /// Mean of a magnitude; not additive, primary rules only.
    Mean,
}

impl AggregationKind {
    /// Whether total cells are sums of the cells they cover (count and sum).
    pub fn is_additive(self) -> bool {
        matches!(self, AggregationKind::Count | AggregationKind::Sum)
    }

    /// Whether the cell value is a magnitude to which the dominance and p% rules apply
    /// (sum, mean and ratio; for a ratio the contributions are those of the numerator).
    pub fn is_magnitude(self) -> bool {
        !matches!(self, AggregationKind::Count)
    }

    /// Stable lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            AggregationKind::Count => "count",
            AggregationKind::Sum => "sum",
            AggregationKind::Ratio => "ratio",
            AggregationKind::Mean => "mean",
        }
    }
}

/// One coordinate of a cell along one dimension.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Coord {
    /// The dimension's total ("all categories", or the whole city for the reference area).
    Total,
    /// A category code, e.g. a district code.
    Code(String),
}

impl Coord {
    /// Convenience constructor for a category code.
    pub fn code(code: impl Into<String>) -> Self {
        Coord::Code(code.into())
    }

    /// Whether this is the total code.
    pub fn is_total(&self) -> bool {
        matches!(self, Coord::Total)
    }
}

impl fmt::Display for Coord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Coord::Total => f.write_str("Total"),
            Coord::Code(c) => f.write_str(c),
        }
    }
}

/// The largest contributions to a magnitude cell, in any order (they are sorted internally).
#[derive(Debug, Clone, PartialEq)]
pub enum LargestContributions {
    /// Absolute values of the largest contributions, in the unit of the cell value.
    Values(Vec<f64>),
    /// Shares of the cell value, each in `[0, 1]`.
    Shares(Vec<f64>),
}

/// A cell as supplied by the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct CellInput {
    /// One coordinate per dimension, in the table's dimension order.
    pub coords: Vec<Coord>,
    /// The (true, unprotected) value of the cell.
    pub value: f64,
    /// Number of contributors (units) behind the cell.
    pub contributors: u64,
    /// The largest contributions, needed for magnitude cells when dominance or p% is enabled.
    pub largest: Option<LargestContributions>,
}

impl CellInput {
    /// A cell without largest-contribution data.
    pub fn new(coords: Vec<Coord>, value: f64, contributors: u64) -> Self {
        CellInput {
            coords,
            value,
            contributors,
            largest: None,
        }
    }

    /// Builder: attach largest contributions.
    pub fn with_largest(mut self, largest: LargestContributions) -> Self {
        self.largest = Some(largest);
        self
    }
}

/// An additive constraint `total = sum(parts)` derived from the margins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint {
    /// Index of the total cell.
    pub total: usize,
    /// Indices of the cells it covers.
    pub parts: Vec<usize>,
}

/// The cells of one indicator and period, arranged over dimensions.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    indicator: String,
    period: String,
    kind: AggregationKind,
    dimensions: Vec<String>,
    codes: Vec<Vec<String>>,
    has_total: Vec<bool>,
    cells: Vec<CellInput>,
    index: HashMap<Vec<Coord>, usize>,
    constraints: Vec<Constraint>,
}

/// Relative tolerance used when checking that totals equal the sum of their parts.
pub const ADDITIVITY_TOLERANCE: f64 = 1e-9;

impl Table {
    /// Builds and validates a table.
    ///
    /// The first dimension is conventionally the reference area (districts, with
    /// `Coord::Total` for the whole city). For additive kinds, a dimension that has
    /// `Coord::Total` in any cell has one level of margins; the table must then be the
    /// complete grid over (codes plus total) of every dimension, and every total must
    /// equal the sum of its parts. Ratio and mean tables get no constraints.
    pub fn new(
        indicator: impl Into<String>,
        period: impl Into<String>,
        kind: AggregationKind,
        dimensions: Vec<String>,
        cells: Vec<CellInput>,
    ) -> Result<Self, SdcError> {
        let nd = dimensions.len();
        if nd == 0 {
            return Err(SdcError::InvalidSettings(
                "a table needs at least one dimension".into(),
            ));
        }
        let mut codes: Vec<Vec<String>> = vec![Vec::new(); nd];
        let mut seen_codes: Vec<HashMap<String, ()>> = vec![HashMap::new(); nd];
        let mut has_total = vec![false; nd];
        let mut index = HashMap::with_capacity(cells.len());
        for (i, c) in cells.iter().enumerate() {
            if c.coords.len() != nd {
                return Err(SdcError::DimensionMismatch {
                    cell: label_of(&c.coords),
                    expected: nd,
                    got: c.coords.len(),
                });
            }
            if !c.value.is_finite() {
                return Err(SdcError::ValueOutOfBounds {
                    cell: label_of(&c.coords),
                    value: c.value,
                });
            }
            for (d, co) in c.coords.iter().enumerate() {
                match co {
                    Coord::Total => has_total[d] = true,
                    Coord::Code(s) => {
                        if seen_codes[d].insert(s.clone(), ()).is_none() {
                            codes[d].push(s.clone());
                        }
                    }
                }
            }
            if index.insert(c.coords.clone(), i).is_some() {
                return Err(SdcError::DuplicateCell(label_of(&c.coords)));
            }
        }
        let mut t = Table {
            indicator: indicator.into(),
            period: period.into(),
            kind,
            dimensions,
            codes,
            has_total,
            cells,
            index,
            constraints: Vec::new(),
        };
        if kind.is_additive() && t.has_total.iter().any(|&b| b) {
            t.check_grid()?;
            t.derive_constraints()?;
        }
        Ok(t)
    }

    fn check_grid(&self) -> Result<(), SdcError> {
        let expected: usize = (0..self.dimensions.len())
            .map(|d| self.codes[d].len() + usize::from(self.has_total[d]))
            .product();
        if expected == self.cells.len() {
            return Ok(());
        }
        // Find a missing coordinate for the error message.
        let mut missing = None;
        self.for_each_grid_coord(|coords| {
            if missing.is_none() && !self.index.contains_key(coords) {
                missing = Some(label_of(coords));
            }
        });
        Err(SdcError::MissingCell(
            missing.unwrap_or_else(|| "<unknown>".into()),
        ))
    }

    fn for_each_grid_coord(&self, mut f: impl FnMut(&[Coord])) {
        let nd = self.dimensions.len();
        let axes: Vec<Vec<Coord>> = (0..nd)
            .map(|d| {
                let mut v: Vec<Coord> = self.codes[d].iter().cloned().map(Coord::Code).collect();
                if self.has_total[d] {
                    v.push(Coord::Total);
                }
                v
            })
            .collect();
        if axes.iter().any(|a| a.is_empty()) {
            return;
        }
        let mut idx = vec![0usize; nd];
        let mut cur: Vec<Coord> = axes.iter().map(|a| a[0].clone()).collect();
        loop {
            f(&cur);
            let mut d = nd;
            loop {
                if d == 0 {
                    return;
                }
                d -= 1;
                idx[d] += 1;
                if idx[d] < axes[d].len() {
                    cur[d] = axes[d][idx[d]].clone();
                    break;
                }
                idx[d] = 0;
                cur[d] = axes[d][0].clone();
            }
        }
    }

    fn derive_constraints(&mut self) -> Result<(), SdcError> {
        let nd = self.dimensions.len();
        let mut constraints = Vec::new();
        for (ti, cell) in self.cells.iter().enumerate() {
            for d in 0..nd {
                if !cell.coords[d].is_total() {
                    continue;
                }
                let mut parts = Vec::with_capacity(self.codes[d].len());
                let mut key = cell.coords.clone();
                let mut sum = 0.0;
                for code in &self.codes[d] {
                    key[d] = Coord::Code(code.clone());
                    let pi = *self
                        .index
                        .get(&key)
                        .ok_or_else(|| SdcError::MissingCell(label_of(&key)))?;
                    sum += self.cells[pi].value;
                    parts.push(pi);
                }
                if parts.is_empty() {
                    continue;
                }
                let scale = cell.value.abs().max(sum.abs()).max(1.0);
                if (cell.value - sum).abs() > ADDITIVITY_TOLERANCE * scale * (parts.len() as f64) {
                    return Err(SdcError::TotalMismatch {
                        total: label_of(&cell.coords),
                        expected: sum,
                        actual: cell.value,
                    });
                }
                constraints.push(Constraint { total: ti, parts });
            }
        }
        self.constraints = constraints;
        Ok(())
    }

    /// Indicator identifier.
    pub fn indicator(&self) -> &str {
        &self.indicator
    }

    /// Period identifier.
    pub fn period(&self) -> &str {
        &self.period
    }

    /// Aggregation kind.
    pub fn kind(&self) -> AggregationKind {
        self.kind
    }

    /// Dimension names, in coordinate order.
    pub fn dimensions(&self) -> &[String] {
        &self.dimensions
    }

    /// Category codes of dimension `d`, in order of first appearance.
    pub fn codes(&self, d: usize) -> &[String] {
        &self.codes[d]
    }

    /// Whether dimension `d` has a total (margin).
    pub fn has_total(&self, d: usize) -> bool {
        self.has_total[d]
    }

    /// All cells, in input order (output keeps this order).
    pub fn cells(&self) -> &[CellInput] {
        &self.cells
    }

    /// Index of the cell at the given coordinates.
    pub fn find(&self, coords: &[Coord]) -> Option<usize> {
        self.index.get(coords).copied()
    }

    /// Additive constraints derived from the margins (empty for non-additive kinds).
    pub fn constraints(&self) -> &[Constraint] {
        &self.constraints
    }

    /// Human-readable label of cell `i`, e.g. `district-07/retail`.
    pub fn label(&self, i: usize) -> String {
        label_of(&self.cells[i].coords)
    }
}

/// The additive constraints of an additive table whose cells sit at
/// `coords` (indices into `coords`), without its values: what
/// [`Table::constraints`] derived when such a table was published, for a
/// table known only by its published cells (an earlier version of a
/// table). The codes of each dimension are those among `coords`; a total
/// whose line lacks a part yields no constraint (a published table with
/// margins is a complete grid, so none lacks one).
pub fn grid_constraints(coords: &[Vec<Coord>]) -> Vec<Constraint> {
    let nd = coords.first().map_or(0, Vec::len);
    let mut codes: Vec<Vec<&String>> = vec![Vec::new(); nd];
    for cell in coords {
        for (d, co) in cell.iter().enumerate().take(nd) {
            if let Coord::Code(code) = co {
                if !codes[d].contains(&code) {
                    codes[d].push(code);
                }
            }
        }
    }
    let index: HashMap<&[Coord], usize> = coords
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_slice(), i))
        .collect();
    let mut constraints = Vec::new();
    for (total, cell) in coords.iter().enumerate() {
        for d in 0..cell.len().min(nd) {
            if !cell[d].is_total() || codes[d].is_empty() {
                continue;
            }
            let mut key = cell.clone();
            let parts: Option<Vec<usize>> = codes[d]
                .iter()
                .map(|code| {
                    key[d] = Coord::Code((*code).clone());
                    index.get(key.as_slice()).copied()
                })
                .collect();
            if let Some(parts) = parts {
                constraints.push(Constraint { total, parts });
            }
        }
    }
    constraints
}

/// Label of a coordinate vector, e.g. `district-07/retail` or `Total/retail`.
pub fn label_of(coords: &[Coord]) -> String {
    let parts: Vec<String> = coords.iter().map(|c| c.to_string()).collect();
    parts.join("/")
}
