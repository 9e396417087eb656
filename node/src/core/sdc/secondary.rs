//! Secondary (complementary) suppression for additive tables with margins.
//!
//! Method: a hypercube heuristic verified by the exact interval audit.
//!
//! 1. For every primary cell `p`, choose the cheapest *hypercube*: for each dimension
//!    with a margin pick an alternative coordinate `a_k != c_k` (another category or
//!    the total); the `2^d` corners form a pattern along which the table can be
//!    changed without breaking any additive constraint (corner sign is the product,
//!    over switched dimensions, of -1 when both `c_k` and `a_k` are categories and +1
//!    when one of them is the total). A hypercube is admissible when every corner can
//!    move by the required protection in the needed direction without leaving the
//!    value bounds. Cost = sum over corners not yet suppressed of
//!    `1 + |value| / mean |interior value|`, so few and small cells are preferred and
//!    already-suppressed cells are reused for free.
//! 2. Run the LP audit ([`super::audit`]) for all primary cells. For every cell that
//!    fails (e.g. two primary cells protecting each other insufficiently, a line with
//!    a single suppression, a suppressed total), add the next cheapest admissible
//!    hypercube that adds a new cell. After [`MAX_HYPERCUBES`] attempts for one cell,
//!    suppress all cells of the constraints through it; after that, the whole table.
//!    Suppressing more cells only enlarges the attacker's feasible set, so cells that
//!    passed stay protected and the loop terminates.
//! 3. Single contributors: the one contributor of a cell knows its value exactly.
//!    First a heuristic: a constraint whose only suppressed cells are a primary cell
//!    and a cell with a single contributor gets one more suppression. Then, once the
//!    pattern passes the audit, the audit is run again for each suppressed cell of a
//!    magnitude table with one contributor, with that cell's value known exactly
//!    (`Ctx::single_contributor_failures`); a primary cell other than it that is
//!    narrowed within its protection gets the next cheapest hypercube (one not
//!    through that cell), and the rounds go on. At most [`MAX_SINGLETON_AUDITS`]
//!    such audits per table; past them the table is refused, never published. (In
//!    a count table a unit alone in its cell knows it is counted there, not that no
//!    one else is: its cell is not known to it exactly.)

#![allow(clippy::needless_range_loop)] // index loops mirror the textbook algorithms

use std::collections::HashMap;

use super::audit::{AuditModel, Check, Knowledge, Requirement};
use super::error::SdcError;
use super::primary::PrimaryFinding;
use super::table::{Coord, Table};

/// Hypercubes tried per primary cell before falling back to wider suppression.
pub const MAX_HYPERCUBES: usize = 8;

/// Audits with a single contributor's value known, per table.
pub const MAX_SINGLETON_AUDITS: usize = 4096;

/// Primary cells an audit found narrowed, with their findings and checks.
type Failing<'f> = Vec<(usize, &'f PrimaryFinding, Check)>;

/// Why a cell was secondarily suppressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecondaryChoice {
    /// The primary cell whose protection required this suppression.
    pub protects: usize,
    /// Whether it was chosen by a fallback (whole constraint or whole table).
    pub fallback: bool,
}

/// Inputs of the secondary suppression.
#[derive(Debug, Clone, Copy)]
pub struct SecondaryInput<'a> {
    /// The table.
    pub table: &'a Table,
    /// Primary findings per cell.
    pub primary: &'a [Option<PrimaryFinding>],
    /// Attacker's interval of each cell's true value if it is published.
    pub published_interval: &'a [(f64, f64)],
    /// Value lower bound known to the attacker.
    pub lower: Option<f64>,
    /// Value upper bound known to the attacker.
    pub upper: Option<f64>,
    /// Apply the singleton heuristic.
    pub singletons: bool,
}

struct Grid {
    /// Size per dimension (codes plus one for the total, if any).
    sizes: Vec<usize>,
    has_total: Vec<bool>,
    strides: Vec<usize>,
    coords: Vec<Vec<usize>>,
    flat: Vec<usize>,
}

impl Grid {
    fn new(table: &Table) -> Self {
        let nd = table.dimensions().len();
        let sizes: Vec<usize> = (0..nd)
            .map(|d| table.codes(d).len() + usize::from(table.has_total(d)))
            .collect();
        let has_total: Vec<bool> = (0..nd).map(|d| table.has_total(d)).collect();
        let mut strides = vec![1; nd];
        for d in (0..nd.saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * sizes[d + 1];
        }
        let maps: Vec<HashMap<&str, usize>> = (0..nd)
            .map(|d| {
                table
                    .codes(d)
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.as_str(), i))
                    .collect()
            })
            .collect();
        let total: usize = sizes.iter().product();
        let mut flat = vec![usize::MAX; total];
        let mut coords = Vec::with_capacity(table.cells().len());
        for (i, cell) in table.cells().iter().enumerate() {
            let c: Vec<usize> = cell
                .coords
                .iter()
                .enumerate()
                .map(|(d, co)| match co {
                    Coord::Total => sizes[d] - 1,
                    Coord::Code(s) => maps[d][s.as_str()],
                })
                .collect();
            let f: usize = c.iter().zip(&strides).map(|(a, b)| a * b).sum();
            flat[f] = i;
            coords.push(c);
        }
        Grid {
            sizes,
            has_total,
            strides,
            coords,
            flat,
        }
    }

    fn is_total(&self, d: usize, pos: usize) -> bool {
        self.has_total[d] && pos == self.sizes[d] - 1
    }
}

struct Ctx<'a> {
    input: SecondaryInput<'a>,
    grid: Grid,
    mean_abs: f64,
    suppressed: Vec<bool>,
    choice: Vec<Option<SecondaryChoice>>,
}

impl Ctx<'_> {
    fn value(&self, i: usize) -> f64 {
        self.input.table.cells()[i].value
    }

    fn cost(&self, i: usize) -> f64 {
        if self.suppressed[i] {
            0.0
        } else {
            1.0 + self.value(i).abs() / self.mean_abs
        }
    }

    /// Whether cell `i` can move by `delta` (signed) within the value bounds.
    fn can_move(&self, i: usize, delta: f64) -> bool {
        let v = self.value(i);
        let ok_lo = self
            .input
            .lower
            .is_none_or(|l| v + delta >= l - 1e-9 * v.abs().max(1.0));
        let ok_hi = self
            .input
            .upper
            .is_none_or(|u| v + delta <= u + 1e-9 * v.abs().max(1.0));
        ok_lo && ok_hi
    }

    /// Cheapest admissible hypercube around `p` that adds at least one new cell and
    /// is not in `used`. Returns (alternatives, corner cells).
    fn best_hypercube(
        &self,
        p: usize,
        up: f64,
        down: f64,
        used: &[Vec<usize>],
        fixed: Option<usize>,
    ) -> Option<(Vec<usize>, Vec<usize>)> {
        let g = &self.grid;
        let nd = g.sizes.len();
        // A dimension holding only its total (a table of city rows alone,
        // say) offers no other cell to pair with: leave it out.
        let dims: Vec<usize> = (0..nd)
            .filter(|&d| g.has_total[d] && g.sizes[d] > 1)
            .collect();
        if dims.is_empty() {
            return None;
        }
        let base = &g.coords[p];
        let alts: Vec<Vec<usize>> = dims
            .iter()
            .map(|&d| (0..g.sizes[d]).filter(|&x| x != base[d]).collect())
            .collect();
        if alts.iter().any(|a| a.is_empty()) {
            return None;
        }
        let nc = 1usize << dims.len();
        let mut best: Option<(f64, Vec<usize>, Vec<usize>)> = None;
        let mut idx = vec![0usize; dims.len()];
        let mut corners = Vec::with_capacity(nc);
        'outer: loop {
            let choice: Vec<usize> = idx.iter().zip(&alts).map(|(&i, a)| a[i]).collect();
            corners.clear();
            let mut cost = 0.0;
            let mut admissible = true;
            let mut new_cell = false;
            for mask in 1..nc {
                let mut flat = 0;
                let mut sign = 1.0;
                for (k, &d) in dims.iter().enumerate() {
                    let pos = if mask & (1 << k) != 0 {
                        if !g.is_total(d, base[d]) && !g.is_total(d, choice[k]) {
                            sign = -sign;
                        }
                        choice[k]
                    } else {
                        base[d]
                    };
                    flat += pos * g.strides[d];
                }
                for d in 0..nd {
                    if !g.has_total[d] {
                        flat += base[d] * g.strides[d];
                    }
                }
                let cell = g.flat[flat];
                cost += self.cost(cell);
                new_cell |= !self.suppressed[cell];
                if fixed == Some(cell)
                    || (up > 0.0 && !self.can_move(cell, sign * up))
                    || (down > 0.0 && !self.can_move(cell, -sign * down))
                {
                    admissible = false;
                }
                corners.push(cell);
                if best.as_ref().is_some_and(|b| cost >= b.0) {
                    admissible = false;
                    break;
                }
            }
            if admissible && new_cell && !used.contains(&choice) {
                best = Some((cost, choice, corners.clone()));
            }
            // Next combination.
            let mut k = dims.len();
            loop {
                if k == 0 {
                    break 'outer;
                }
                k -= 1;
                idx[k] += 1;
                if idx[k] < alts[k].len() {
                    break;
                }
                idx[k] = 0;
            }
        }
        best.map(|(_, c, cells)| (c, cells))
    }

    fn suppress(&mut self, cell: usize, protects: usize, fallback: bool) {
        if !self.suppressed[cell] {
            self.suppressed[cell] = true;
            self.choice[cell] = Some(SecondaryChoice { protects, fallback });
        }
    }

    fn knowledge(&self) -> Vec<Knowledge> {
        self.suppressed
            .iter()
            .zip(self.input.published_interval)
            .map(|(&s, &(a, b))| {
                if s {
                    Knowledge::Suppressed
                } else {
                    Knowledge::Interval(a, b)
                }
            })
            .collect()
    }

    /// The first suppressed cell of a magnitude table with one contributor
    /// whose value, known exactly (its contributor knows it), lets the audit
    /// narrow another primary cell within its protection, with those cells'
    /// checks; `None` when there is none. A cell that passed is marked in
    /// `passed` and not audited again (suppressing more only widens what
    /// its contributor can infer). Counts the audits in `audits` and
    /// refuses past [`MAX_SINGLETON_AUDITS`].
    fn single_contributor_failures<'f>(
        &self,
        primaries: &[(usize, &'f PrimaryFinding)],
        passed: &mut [bool],
        audits: &mut usize,
    ) -> Result<Option<(usize, Failing<'f>)>, SdcError> {
        let table = self.input.table;
        if !table.kind().is_magnitude() {
            return Ok(None);
        }
        let base = self.knowledge();
        for single in 0..table.cells().len() {
            if passed[single] || !self.suppressed[single] || table.cells()[single].contributors != 1
            {
                continue;
            }
            *audits += 1;
            if *audits > MAX_SINGLETON_AUDITS {
                return Err(SdcError::SecondaryFailed(format!(
                    "the cells with a single contributor need more than {MAX_SINGLETON_AUDITS} audits to protect the others from them; the table is too large for this check: publish it in smaller tables"
                )));
            }
            let value = self.value(single);
            let mut knowledge = base.clone();
            knowledge[single] = Knowledge::Interval(value, value);
            let mut model = AuditModel::new(
                table.constraints(),
                &knowledge,
                self.input.lower,
                self.input.upper,
            )?;
            let mut narrowed = Vec::new();
            for &(p, f) in primaries.iter().filter(|&&(p, _)| p != single) {
                // A cell within the single contributor's, or a total of it
                // with no other contributor, holds only its own data.
                if self.covers(single, p)
                    || (self.covers(p, single) && table.cells()[p].contributors <= 1)
                {
                    continue;
                }
                let x = self.value(p);
                // A cell that covers the single contributor's (a total of
                // it) is at least its value to that contributor before
                // anything is published, when values are never negative:
                // knowing as much tells nothing of the others in it.
                let known_floor = self
                    .input
                    .lower
                    .filter(|&l| l >= 0.0 && self.covers(p, single))
                    .map_or(f64::NEG_INFINITY, |_| value);
                let check = model.check(&Requirement {
                    cell: p,
                    at_most_lower: (x - f.lower).max(known_floor),
                    at_least_upper: x + f.upper,
                })?;
                if !check.ok() {
                    narrowed.push((p, f, check));
                }
            }
            if !narrowed.is_empty() {
                return Ok(Some((single, narrowed)));
            }
            passed[single] = true;
        }
        Ok(None)
    }

    /// Whether cell `outer` covers cell `inner`: along every dimension, the
    /// same coordinate or the total.
    fn covers(&self, outer: usize, inner: usize) -> bool {
        let g = &self.grid;
        (0..g.sizes.len())
            .all(|d| g.coords[outer][d] == g.coords[inner][d] || g.is_total(d, g.coords[outer][d]))
    }

    fn singleton_step(&mut self) -> bool {
        let table = self.input.table;
        let mut added = false;
        for c in table.constraints() {
            let members: Vec<usize> = std::iter::once(c.total)
                .chain(c.parts.iter().copied())
                .collect();
            let sup: Vec<usize> = members
                .iter()
                .copied()
                .filter(|&i| self.suppressed[i])
                .collect();
            if sup.len() != 2 {
                continue;
            }
            let single = |i: usize| table.cells()[i].contributors == 1;
            let prim = |i: usize| self.input.primary[i].is_some();
            let target = if single(sup[0]) && prim(sup[1]) {
                sup[1]
            } else if single(sup[1]) && prim(sup[0]) {
                sup[0]
            } else {
                continue;
            };
            let f = self.input.primary[target]
                .as_ref()
                .map_or(0.0, |f| f.upper.max(f.lower));
            // Cheapest published part (the total last) that can move by the protection.
            let pick = members
                .iter()
                .copied()
                .filter(|&i| !self.suppressed[i] && self.can_move(i, -f))
                .min_by(|&a, &b| self.cost(a).total_cmp(&self.cost(b)).then(a.cmp(&b)));
            if let Some(i) = pick {
                self.suppress(i, target, false);
                added = true;
            }
        }
        added
    }
}

/// Chooses secondary suppressions; returns, per cell, why it was secondarily
/// suppressed (`None` for cells that are primary or published). The final pattern
/// passes the interval audit for every primary cell.
pub fn suppress(input: SecondaryInput<'_>) -> Result<Vec<Option<SecondaryChoice>>, SdcError> {
    let table = input.table;
    let n = table.cells().len();
    let mut none = vec![None; n];
    if table.constraints().is_empty() || input.primary.iter().all(Option::is_none) {
        return Ok(none);
    }
    let grid = Grid::new(table);
    let interior: Vec<f64> = table
        .cells()
        .iter()
        .filter(|c| !c.coords.iter().any(Coord::is_total) && c.value != 0.0)
        .map(|c| c.value.abs())
        .collect();
    let mean_abs = if interior.is_empty() {
        1.0
    } else {
        (interior.iter().sum::<f64>() / interior.len() as f64).max(f64::MIN_POSITIVE)
    };
    let mut ctx = Ctx {
        input,
        grid,
        mean_abs,
        suppressed: input.primary.iter().map(Option::is_some).collect(),
        choice: vec![None; n],
    };
    let primaries: Vec<(usize, &PrimaryFinding)> = input
        .primary
        .iter()
        .enumerate()
        .filter_map(|(i, f)| f.as_ref().map(|f| (i, f)))
        .collect();
    let mut used: HashMap<usize, Vec<Vec<usize>>> = HashMap::new();
    let mut attempts: HashMap<usize, usize> = HashMap::new();
    let mut singleton_audits = 0;
    let mut singles_passed = vec![false; n];

    // Initial pass: one hypercube per primary cell.
    for &(p, f) in &primaries {
        if let Some((alt, cells)) = ctx.best_hypercube(p, f.upper, f.lower, &[], None) {
            for c in cells {
                ctx.suppress(c, p, false);
            }
            used.entry(p).or_default().push(alt);
        }
    }
    if input.singletons {
        ctx.singleton_step();
    }

    let mut pending = primaries.clone();
    // Every failing round suppresses at least one more cell, so n + 10 rounds suffice.
    let max_rounds = n + 10;
    for _ in 0..max_rounds {
        let knowledge = ctx.knowledge();
        let mut model = AuditModel::new(table.constraints(), &knowledge, input.lower, input.upper)?;
        let mut failing = Vec::new();
        for &(p, f) in &pending {
            let x = ctx.value(p);
            let check = model.check(&Requirement {
                cell: p,
                at_most_lower: x - f.lower,
                at_least_upper: x + f.upper,
            })?;
            if !check.ok() {
                failing.push((p, f, check));
            }
        }
        // The single contributor whose knowledge the failures are with.
        let mut fixed = None;
        if failing.is_empty() && input.singletons {
            if ctx.singleton_step() {
                pending = primaries.clone();
                continue;
            }
            if let Some((single, narrowed)) = ctx.single_contributor_failures(
                &primaries,
                &mut singles_passed,
                &mut singleton_audits,
            )? {
                fixed = Some(single);
                failing = narrowed;
            }
        }
        if failing.is_empty() {
            none = ctx.choice;
            return Ok(none);
        }
        for &(p, f, check) in &failing {
            let a = attempts.entry(p).or_insert(0);
            *a += 1;
            let attempt = *a;
            let up = if check.upper_ok { 0.0 } else { f.upper };
            let down = if check.lower_ok { 0.0 } else { f.lower };
            let cube = if attempt <= MAX_HYPERCUBES {
                ctx.best_hypercube(p, up, down, used.get(&p).map_or(&[][..], |v| &v[..]), fixed)
            } else {
                None
            };
            match cube {
                Some((alt, cells)) => {
                    for c in cells {
                        ctx.suppress(c, p, false);
                    }
                    used.entry(p).or_default().push(alt);
                }
                None => {
                    // Fallback 1: every cell of every constraint through p.
                    let mut added = false;
                    for c in table.constraints() {
                        if c.total == p || c.parts.contains(&p) {
                            for i in std::iter::once(c.total).chain(c.parts.iter().copied()) {
                                added |= !ctx.suppressed[i];
                                ctx.suppress(i, p, true);
                            }
                        }
                    }
                    if !added {
                        // Fallback 2: the whole table.
                        let mut any = false;
                        for i in 0..n {
                            any |= !ctx.suppressed[i];
                            ctx.suppress(i, p, true);
                        }
                        if !any {
                            return Err(SdcError::SecondaryFailed(format!(
                                "cell {} cannot be protected even with the whole table suppressed \
                                 (check the value bounds and protection levels)",
                                table.label(p)
                            )));
                        }
                    }
                }
            }
        }
        pending = failing.iter().map(|&(p, f, _)| (p, f)).collect();
    }
    Err(SdcError::SecondaryFailed("round limit reached".into()))
}
