//! Interval audit: what can an attacker who knows every published value, the
//! additive constraints of the margins and the value bounds infer about the
//! suppressed cells?
//!
//! Every suppressed cell, and every published cell whose true value is only known
//! up to an interval (because it was rounded), is a variable of a linear program;
//! exactly published cells are constants. The feasible range `[min, max]` of each
//! suppressed cell is computed exactly (up to floating-point tolerance) by
//! minimising and maximising it with the simplex of [`super::lp`]. Cells are split
//! into independent components (variables connected through shared constraints);
//! each component is solved with one phase 1 and warm-started phase-2 solves.
//!
//! Limitation: the LP relaxation ignores integrality. For two-dimensional tables
//! the constraint matrix is totally unimodular, so with integral bounds the ranges
//! are integral and equal to the integer ranges; for three-dimensional tables an
//! attacker using integer programming may narrow a range slightly further.

use std::collections::HashMap;

use super::error::SdcError;
use super::lp::{LinearProgram, LpError, Simplex};
use super::table::Constraint;

/// What the attacker knows about the true value of one cell.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Knowledge {
    /// Suppressed: only the value bounds are known.
    Suppressed,
    /// Published: the true value lies in `[lo, hi]` (equal for exact publication).
    Interval(f64, f64),
}

/// A cell whose feasible range must reach `at_most_lower` below and `at_least_upper`
/// above (the protection interval of a primary cell).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Requirement {
    /// Cell index.
    pub cell: usize,
    /// The attacker's minimum must be `<=` this value (`x - lower protection`).
    pub at_most_lower: f64,
    /// The attacker's maximum must be `>=` this value (`x + upper protection`).
    pub at_least_upper: f64,
}

/// Outcome of checking one requirement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    /// Whether the lower side is protected.
    pub lower_ok: bool,
    /// Whether the upper side is protected.
    pub upper_ok: bool,
}

impl Check {
    /// Both sides protected.
    pub fn ok(self) -> bool {
        self.lower_ok && self.upper_ok
    }
}

/// The attacker's model of a published table, decomposed into independent components.
#[derive(Debug)]
pub struct AuditModel {
    lower: f64,
    upper: f64,
    scale: f64,
    /// For each cell: (component, variable) when the cell is a variable.
    var_of: Vec<Option<(usize, usize)>>,
    components: Vec<Simplex>,
}

/// Tolerance of the protection checks, relative to the table scale.
pub const CHECK_TOL: f64 = 1e-7;

/// The slack a check of `req` allows: the LP's numerical error, relative to
/// the table's `scale`, but never more than a hundredth of the protection
/// asked. A small cell beside very large ones would otherwise pass with a
/// feasible range of width zero (found exactly as total minus the others):
/// failing such a check only suppresses more.
fn tolerance(req: &Requirement, scale: f64) -> f64 {
    let asked = (req.at_least_upper - req.at_most_lower).abs();
    (CHECK_TOL * scale).min(0.01 * asked)
}

impl AuditModel {
    /// Builds the attacker's model. `lower`/`upper` are the value bounds known to
    /// the attacker (`None` = unbounded).
    pub fn new(
        constraints: &[Constraint],
        knowledge: &[Knowledge],
        lower: Option<f64>,
        upper: Option<f64>,
    ) -> Result<Self, SdcError> {
        let lower = lower.unwrap_or(f64::NEG_INFINITY);
        let upper = upper.unwrap_or(f64::INFINITY);
        let n = knowledge.len();
        let mut scale: f64 = 1.0;
        for k in knowledge {
            if let Knowledge::Interval(a, b) = k {
                scale = scale.max(a.abs()).max(b.abs());
            }
        }
        let is_var = |i: usize| match knowledge[i] {
            Knowledge::Suppressed => true,
            Knowledge::Interval(a, b) => b - a > 0.0,
        };
        // Union-find over variable cells joined by constraints.
        let mut parent: Vec<usize> = (0..n).collect();
        fn find(p: &mut [usize], mut i: usize) -> usize {
            while p[i] != i {
                p[i] = p[p[i]];
                i = p[i];
            }
            i
        }
        for c in constraints {
            let mut first = None;
            for i in std::iter::once(c.total).chain(c.parts.iter().copied()) {
                if is_var(i) {
                    match first {
                        None => first = Some(i),
                        Some(f) => {
                            let (a, b) = (find(&mut parent, f), find(&mut parent, i));
                            if a != b {
                                parent[a.max(b)] = a.min(b);
                            }
                        }
                    }
                }
            }
        }
        // Components that contain at least one suppressed cell.
        let mut comp_of_root: HashMap<usize, usize> = HashMap::new();
        let mut var_of = vec![None; n];
        let mut lps: Vec<LinearProgram> = Vec::new();
        let mut has_suppressed: Vec<bool> = Vec::new();
        for i in 0..n {
            if !is_var(i) {
                continue;
            }
            let root = find(&mut parent, i);
            let comp = *comp_of_root.entry(root).or_insert_with(|| {
                lps.push(LinearProgram::new());
                has_suppressed.push(false);
                lps.len() - 1
            });
            let (lo, hi) = match knowledge[i] {
                Knowledge::Suppressed => {
                    has_suppressed[comp] = true;
                    (lower, upper)
                }
                Knowledge::Interval(a, b) => (a.max(lower), b.min(upper)),
            };
            let v = lps[comp].add_var(lo / scale, hi / scale);
            var_of[i] = Some((comp, v));
        }
        for c in constraints {
            let mut terms = Vec::with_capacity(c.parts.len() + 1);
            let mut constant = 0.0;
            let mut comp = None;
            for (i, a) in std::iter::once((c.total, -1.0)).chain(c.parts.iter().map(|&p| (p, 1.0)))
            {
                match var_of[i] {
                    Some((k, v)) => {
                        comp = Some(k);
                        terms.push((v, a));
                    }
                    None => {
                        if let Knowledge::Interval(x, _) = knowledge[i] {
                            constant += a * x / scale;
                        }
                    }
                }
            }
            if let Some(k) = comp {
                lps[k].add_row(&terms, -constant, -constant);
            }
        }
        let mut components = Vec::with_capacity(lps.len());
        for (k, lp) in lps.iter().enumerate() {
            if !has_suppressed[k] {
                // Keep indices aligned; an unused component gets an empty solver.
                components.push(Simplex::new(&LinearProgram::new()).map_err(lp_err)?);
                continue;
            }
            components.push(Simplex::new(lp).map_err(lp_err)?);
        }
        Ok(AuditModel {
            lower,
            upper,
            scale,
            var_of,
            components,
        })
    }

    /// Exact feasible range `[min, max]` of cell `i` (bounds only, when the cell is in no constraint).
    pub fn range(&mut self, i: usize) -> Result<(f64, f64), SdcError> {
        match self.var_of[i] {
            None => Ok((self.lower, self.upper)),
            Some((k, v)) => {
                let s = &mut self.components[k];
                let hi = s.maximize(v, None).map_err(lp_err)?;
                let lo = s.minimize(v, None).map_err(lp_err)?;
                Ok((lo * self.scale, hi * self.scale))
            }
        }
    }

    /// Checks one protection requirement, stopping each solve as soon as the
    /// required point is shown to be feasible.
    pub fn check(&mut self, req: &Requirement) -> Result<Check, SdcError> {
        let tol = tolerance(req, self.scale);
        match self.var_of[req.cell] {
            None => Ok(Check {
                lower_ok: self.lower <= req.at_most_lower + tol,
                upper_ok: self.upper >= req.at_least_upper - tol,
            }),
            Some((k, v)) => {
                let s = &mut self.components[k];
                // The LP stops within its tolerance of a target: aim past
                // the point by that much, so that an early stop never falls
                // short of what the check below asks.
                let up_target = req.at_least_upper / self.scale + super::lp::TOL;
                let lo_target = req.at_most_lower / self.scale - super::lp::TOL;
                let hi = s.maximize(v, Some(up_target)).map_err(lp_err)?;
                let lo = s.minimize(v, Some(lo_target)).map_err(lp_err)?;
                Ok(Check {
                    lower_ok: lo * self.scale <= req.at_most_lower + tol,
                    upper_ok: hi * self.scale >= req.at_least_upper - tol,
                })
            }
        }
    }
}

fn lp_err(e: LpError) -> SdcError {
    match e {
        LpError::Infeasible => {
            SdcError::Audit("published values are inconsistent with the table constraints".into())
        }
        LpError::Numerical(m) => SdcError::Audit(m),
    }
}

/// Computes the exact feasible range of every suppressed cell (`None` for published cells).
pub fn feasible_ranges(
    constraints: &[Constraint],
    knowledge: &[Knowledge],
    lower: Option<f64>,
    upper: Option<f64>,
) -> Result<Vec<Option<(f64, f64)>>, SdcError> {
    let model = AuditModel::new(constraints, knowledge, lower, upper)?;
    let mut ranges: Vec<Option<(f64, f64)>> = vec![None; knowledge.len()];
    // Variables to range, per component.
    let mut per_comp: Vec<Vec<(usize, usize)>> = vec![Vec::new(); model.components.len()];
    for (i, k) in knowledge.iter().enumerate() {
        if *k != Knowledge::Suppressed {
            continue;
        }
        match model.var_of[i] {
            Some((c, v)) => per_comp[c].push((i, v)),
            None => ranges[i] = Some((model.lower, model.upper)),
        }
    }
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_AUDIT_THREADS);
    for (c, vars) in per_comp.iter().enumerate() {
        if vars.is_empty() {
            continue;
        }
        let solver = &model.components[c];
        let chunks: Vec<&[(usize, usize)]> = if workers > 1 && vars.len() >= PARALLEL_MIN_VARS {
            vars.chunks(vars.len().div_ceil(workers)).collect()
        } else {
            vec![&vars[..]]
        };
        let results: Vec<ChunkResult> = if chunks.len() == 1 {
            vec![range_chunk(solver.clone(), chunks[0], model.scale)]
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = chunks
                    .iter()
                    .map(|&ch| scope.spawn(move || range_chunk(solver.clone(), ch, model.scale)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(SdcError::Audit("audit worker panicked".into()))
                        })
                    })
                    .collect()
            })
        };
        for r in results {
            for (i, lo, hi) in r? {
                ranges[i] = Some((lo, hi));
            }
        }
    }
    Ok(ranges)
}

/// Ranges `(cell, min, max)` computed by one worker.
type ChunkResult = Result<Vec<(usize, f64, f64)>, SdcError>;

/// Maximum number of threads used by [`feasible_ranges`].
pub const MAX_AUDIT_THREADS: usize = 2;
const PARALLEL_MIN_VARS: usize = 200;

/// Ranges of a chunk of variables of one component: all maxima first, then all
/// minima, so consecutive objectives are similar and warm starts stay short.
fn range_chunk(mut solver: Simplex, vars: &[(usize, usize)], scale: f64) -> ChunkResult {
    let mut his = Vec::with_capacity(vars.len());
    for &(_, v) in vars {
        his.push(solver.maximize(v, None).map_err(lp_err)? * scale);
    }
    let mut out = Vec::with_capacity(vars.len());
    for (&(i, v), hi) in vars.iter().zip(his) {
        let lo = solver.minimize(v, None).map_err(lp_err)? * scale;
        out.push((i, lo, hi));
    }
    Ok(out)
}

/// Checks all requirements; returns the check of each, in order.
pub fn check_requirements(
    constraints: &[Constraint],
    knowledge: &[Knowledge],
    lower: Option<f64>,
    upper: Option<f64>,
    requirements: &[Requirement],
) -> Result<Vec<Check>, SdcError> {
    let mut model = AuditModel::new(constraints, knowledge, lower, upper)?;
    requirements.iter().map(|r| model.check(r)).collect()
}

/// Result of a full audit of a protected table.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditReport {
    /// Feasible range of each suppressed cell (`None` for published cells).
    pub ranges: Vec<Option<(f64, f64)>>,
    /// Indices of primary cells whose range does not cover their protection interval.
    pub failures: Vec<usize>,
}

/// Full audit: exact ranges of every suppressed cell and the list of requirements
/// not met (using the exact ranges).
pub fn full_audit(
    constraints: &[Constraint],
    knowledge: &[Knowledge],
    lower: Option<f64>,
    upper: Option<f64>,
    requirements: &[Requirement],
) -> Result<AuditReport, SdcError> {
    let ranges = feasible_ranges(constraints, knowledge, lower, upper)?;
    let scale = knowledge
        .iter()
        .map(|k| match k {
            Knowledge::Interval(a, b) => a.abs().max(b.abs()),
            Knowledge::Suppressed => 0.0,
        })
        .fold(1.0, f64::max);
    let failures = requirements
        .iter()
        .filter(|r| match ranges[r.cell] {
            Some((lo, hi)) => {
                let tol = tolerance(r, scale);
                lo > r.at_most_lower + tol || hi < r.at_least_upper - tol
            }
            None => true,
        })
        .map(|r| r.cell)
        .collect();
    Ok(AuditReport { ranges, failures })
}

/// The requirements (their cells) an attacker's model does not meet: one
/// whose cell the attacker knows to an interval fails, as in
/// [`full_audit`]; the others are checked with [`AuditModel::check`],
/// which stops each solve once the protection is shown (no exact ranges).
pub fn unmet_requirements(
    constraints: &[Constraint],
    knowledge: &[Knowledge],
    lower: Option<f64>,
    upper: Option<f64>,
    requirements: &[Requirement],
) -> Result<Vec<usize>, SdcError> {
    let mut model = AuditModel::new(constraints, knowledge, lower, upper)?;
    let mut unmet = Vec::new();
    for req in requirements {
        let met = match knowledge.get(req.cell) {
            Some(Knowledge::Suppressed) => model.check(req)?.ok(),
            _ => false,
        };
        if !met {
            unmet.push(req.cell);
        }
    }
    Ok(unmet)
}

/// Whether some values satisfy every constraint with each cell in what is
/// known of it (its interval, or the value bounds when suppressed), up to
/// the slack a table's totals are allowed ([`super::table::ADDITIVITY_TOLERANCE`]
/// per term, relative to the largest value known). One phase 1 of the
/// simplex, whatever the size.
pub fn feasible(
    constraints: &[Constraint],
    knowledge: &[Knowledge],
    lower: Option<f64>,
    upper: Option<f64>,
) -> Result<bool, SdcError> {
    let lower = lower.unwrap_or(f64::NEG_INFINITY);
    let upper = upper.unwrap_or(f64::INFINITY);
    let mut scale: f64 = 1.0;
    for k in knowledge {
        if let Knowledge::Interval(a, b) = k {
            scale = scale.max(a.abs()).max(b.abs());
        }
    }
    let mut lp = LinearProgram::new();
    let mut var_of: Vec<Option<usize>> = Vec::with_capacity(knowledge.len());
    for k in knowledge {
        let (lo, hi) = match *k {
            Knowledge::Suppressed => (lower, upper),
            Knowledge::Interval(a, b) => (a.max(lower), b.min(upper)),
        };
        if lo > hi {
            return Ok(false);
        }
        var_of.push(if hi > lo {
            Some(lp.add_var(lo / scale, hi / scale))
        } else {
            None
        });
    }
    for c in constraints {
        let mut terms = Vec::with_capacity(c.parts.len() + 1);
        let mut constant = 0.0;
        for (i, a) in std::iter::once((c.total, -1.0)).chain(c.parts.iter().map(|&p| (p, 1.0))) {
            match (var_of[i], knowledge[i]) {
                (Some(v), _) => terms.push((v, a)),
                (None, Knowledge::Interval(x, _)) => constant += a * x / scale,
                (None, Knowledge::Suppressed) => {}
            }
        }
        let slack = super::table::ADDITIVITY_TOLERANCE * (c.parts.len() + 1) as f64;
        if terms.is_empty() {
            if constant.abs() > slack {
                return Ok(false);
            }
            continue;
        }
        lp.add_row(&terms, -constant - slack, -constant + slack);
    }
    match Simplex::new(&lp) {
        Ok(_) => Ok(true),
        Err(LpError::Infeasible) => Ok(false),
        Err(e) => Err(lp_err(e)),
    }
}
