//! A small bounded-variable revised primal simplex for the interval audit.
//!
//! Problem form: variables `x_j` with bounds `lo_j <= x_j <= hi_j` (infinite bounds
//! allowed) and rows `blo_r <= sum_j a_rj x_j <= bhi_r`. Each row gets a slack
//! `s_r = sum_j a_rj x_j` with the row bounds, so the all-slack basis is always a
//! valid starting basis. Phase 1 minimises the sum of bound violations of the basic
//! variables (composite phase 1 that never passes a breakpoint, so the infeasibility
//! never increases); phase 2 minimises or maximises a single variable. The optimal
//! basis of one objective is the warm start of the next. Dantzig pricing is used,
//! switching to Bland's rule (smallest index entering and leaving) after a run of
//! degenerate pivots, which prevents cycling. The basis inverse is kept densely,
//! updated by elementary row operations and refactorised by Gauss–Jordan elimination
//! with partial pivoting every [`REFACTOR_EVERY`] pivots.

#![allow(clippy::needless_range_loop)] // index loops mirror the textbook algorithms

/// Feasibility / optimality tolerance (the audit scales values to order 1).
pub const TOL: f64 = 1e-9;
const PIVOT_TOL: f64 = 1e-9;
/// Number of pivots between refactorisations of the basis inverse.
pub const REFACTOR_EVERY: usize = 64;
const DEGENERATE_BEFORE_BLAND: usize = 30;
const PARTIAL_PRICING_MIN: usize = 1024;

/// Errors of the simplex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LpError {
    /// The constraints have no solution.
    Infeasible,
    /// Numerical failure (singular basis, iteration limit).
    Numerical(String),
}

/// A linear program in the form described in the module documentation.
#[derive(Debug, Clone, Default)]
pub struct LinearProgram {
    cols: Vec<Vec<(usize, f64)>>,
    lo: Vec<f64>,
    hi: Vec<f64>,
    row_lo: Vec<f64>,
    row_hi: Vec<f64>,
}

impl LinearProgram {
    /// An empty program.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a variable with bounds and returns its index.
    pub fn add_var(&mut self, lo: f64, hi: f64) -> usize {
        self.cols.push(Vec::new());
        self.lo.push(lo);
        self.hi.push(hi);
        self.cols.len() - 1
    }

    /// Adds a row `lo <= sum coef * x_var <= hi` and returns its index.
    pub fn add_row(&mut self, terms: &[(usize, f64)], lo: f64, hi: f64) -> usize {
        let r = self.row_lo.len();
        for &(v, a) in terms {
            if a != 0.0 {
                self.cols[v].push((r, a));
            }
        }
        self.row_lo.push(lo);
        self.row_hi.push(hi);
        r
    }

    /// Number of variables.
    pub fn num_vars(&self) -> usize {
        self.cols.len()
    }

    /// Number of rows.
    pub fn num_rows(&self) -> usize {
        self.row_lo.len()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Basic,
    Lower,
    Upper,
    Free,
}

/// Simplex solver state; holds a primal feasible basis after construction.
#[derive(Debug, Clone)]
pub struct Simplex {
    n: usize,
    m: usize,
    /// Compressed sparse columns: entries of column j are `start[j]..start[j + 1]`.
    start: Vec<usize>,
    rows: Vec<usize>,
    vals: Vec<f64>,
    lo: Vec<f64>,
    hi: Vec<f64>,
    x: Vec<f64>,
    state: Vec<State>,
    basis: Vec<usize>,
    binv: Vec<f64>,
    since_refactor: usize,
    price_cursor: usize,
    /// Total pivots performed (statistics).
    pub pivots: usize,
    /// Total iterations (statistics).
    pub iterations: usize,
    /// Iterations under Bland's rule (statistics).
    pub bland_iterations: usize,
    /// Degenerate iterations (statistics).
    pub degenerate_iterations: usize,
}

enum Step {
    Done,
    Unbounded,
    Continue,
}

impl Simplex {
    /// Builds the solver and runs phase 1.
    pub fn new(lp: &LinearProgram) -> Result<Self, LpError> {
        let n = lp.cols.len();
        let m = lp.row_lo.len();
        let mut start = Vec::with_capacity(n + m + 1);
        let mut rows = Vec::new();
        let mut vals = Vec::new();
        for col in &lp.cols {
            start.push(rows.len());
            for &(r, a) in col {
                rows.push(r);
                vals.push(a);
            }
        }
        let mut lo = lp.lo.clone();
        let mut hi = lp.hi.clone();
        for r in 0..m {
            start.push(rows.len());
            rows.push(r);
            vals.push(-1.0);
            lo.push(lp.row_lo[r]);
            hi.push(lp.row_hi[r]);
        }
        start.push(rows.len());
        let mut x = vec![0.0; n + m];
        let mut state = vec![State::Basic; n + m];
        for j in 0..n {
            if lo[j] > hi[j] + TOL {
                return Err(LpError::Infeasible);
            }
            let (s, v) = nonbasic_start(lo[j], hi[j]);
            state[j] = s;
            x[j] = v;
        }
        let basis: Vec<usize> = (n..n + m).collect();
        let mut binv = vec![0.0; m * m];
        for r in 0..m {
            binv[r * m + r] = -1.0;
        }
        let mut s = Simplex {
            n,
            m,
            start,
            rows,
            vals,
            lo,
            hi,
            x,
            state,
            basis,
            binv,
            since_refactor: 0,
            price_cursor: 0,
            pivots: 0,
            iterations: 0,
            bland_iterations: 0,
            degenerate_iterations: 0,
        };
        s.recompute_basics();
        s.run(None)?;
        Ok(s)
    }

    /// Current value of structural variable `j`.
    pub fn value(&self, j: usize) -> f64 {
        self.x[j]
    }

    /// Maximises variable `j`. With `target`, stops as soon as a feasible point with
    /// `x_j >= target` is found (the returned value is then a lower bound of the maximum).
    /// Returns `f64::INFINITY` when unbounded.
    pub fn maximize(&mut self, j: usize, target: Option<f64>) -> Result<f64, LpError> {
        self.optimize(j, -1.0, target)
    }

    /// Minimises variable `j` (see [`Simplex::maximize`] for `target`).
    /// Returns `f64::NEG_INFINITY` when unbounded.
    pub fn minimize(&mut self, j: usize, target: Option<f64>) -> Result<f64, LpError> {
        self.optimize(j, 1.0, target)
    }

    fn optimize(&mut self, j: usize, sign: f64, target: Option<f64>) -> Result<f64, LpError> {
        assert!(j < self.n, "variable index out of range");
        match self.run(Some((j, sign, target)))? {
            true => Ok(self.x[j]),
            false => Ok(if sign < 0.0 {
                f64::INFINITY
            } else {
                f64::NEG_INFINITY
            }),
        }
    }

    /// Runs phase 1 (`obj == None`) or phase 2. Returns false when unbounded.
    fn run(&mut self, obj: Option<(usize, f64, Option<f64>)>) -> Result<bool, LpError> {
        let limit = 200 * (self.n + self.m) + 10_000;
        let mut degenerate = 0usize;
        let mut cb = vec![0.0; self.m];
        let mut y = vec![0.0; self.m];
        let mut alpha = vec![0.0; self.m];
        for _ in 0..limit {
            let bland = degenerate >= DEGENERATE_BEFORE_BLAND;
            self.iterations += 1;
            if bland {
                self.bland_iterations += 1;
            }
            let step = self.iterate(obj, bland, &mut cb, &mut y, &mut alpha, &mut degenerate)?;
            match step {
                Step::Done => return Ok(true),
                Step::Unbounded => return Ok(false),
                Step::Continue => {}
            }
        }
        Err(LpError::Numerical("iteration limit reached".into()))
    }

    fn iterate(
        &mut self,
        obj: Option<(usize, f64, Option<f64>)>,
        bland: bool,
        cb: &mut [f64],
        y: &mut [f64],
        alpha: &mut [f64],
        degenerate: &mut usize,
    ) -> Result<Step, LpError> {
        let m = self.m;
        let phase1 = obj.is_none();
        // Basic costs.
        let mut any = false;
        for r in 0..m {
            let j = self.basis[r];
            cb[r] = match obj {
                None => {
                    if self.x[j] < self.lo[j] - TOL {
                        -1.0
                    } else if self.x[j] > self.hi[j] + TOL {
                        1.0
                    } else {
                        0.0
                    }
                }
                Some((k, sign, _)) => {
                    if j == k {
                        sign
                    } else {
                        0.0
                    }
                }
            };
            any |= cb[r] != 0.0;
        }
        if phase1 && !any {
            return Ok(Step::Done);
        }
        if let Some((k, sign, Some(t))) = obj {
            if (sign < 0.0 && self.x[k] >= t - TOL) || (sign > 0.0 && self.x[k] <= t + TOL) {
                return Ok(Step::Done);
            }
        }
        // y = cb^T B^-1
        y.iter_mut().for_each(|v| *v = 0.0);
        for r in 0..m {
            if cb[r] != 0.0 {
                let row = &self.binv[r * m..(r + 1) * m];
                for (yk, b) in y.iter_mut().zip(row) {
                    *yk += cb[r] * b;
                }
            }
        }
        // Pricing.
        // Partial pricing: scan segments of the columns, starting where the last scan
        // stopped, and take the best candidate of the first segment that has one.
        // Under Bland's rule, scan from index 0 and take the first candidate.
        let mut best: Option<(usize, f64)> = None;
        let mut best_score = 0.0;
        let total = self.n + self.m;
        let seg = if bland || total <= PARTIAL_PRICING_MIN {
            total
        } else {
            (total / 8).max(PARTIAL_PRICING_MIN)
        };
        let begin = if bland {
            0
        } else {
            self.price_cursor % total.max(1)
        };
        let mut scanned = 0;
        while scanned < total {
            if scanned > 0 && scanned % seg == 0 && best.is_some() {
                break;
            }
            let j = if begin + scanned < total {
                begin + scanned
            } else {
                begin + scanned - total
            };
            scanned += 1;
            let st = self.state[j];
            if st == State::Basic || (self.hi[j] - self.lo[j]) <= TOL && st != State::Free {
                continue;
            }
            let cj = match obj {
                Some((k, sign, _)) if k == j => sign,
                _ => 0.0,
            };
            let mut ya = 0.0;
            for e in self.start[j]..self.start[j + 1] {
                ya += y[self.rows[e]] * self.vals[e];
            }
            let d = cj - ya;
            let dir = match st {
                State::Lower if d < -TOL => 1.0,
                State::Upper if d > TOL => -1.0,
                State::Free if d.abs() > TOL => -d.signum(),
                _ => continue,
            };
            if bland {
                best = Some((j, dir));
                break;
            }
            if d.abs() > best_score {
                best_score = d.abs();
                best = Some((j, dir));
            }
        }
        self.price_cursor = begin + scanned;
        let Some((q, dir)) = best else {
            return if phase1 {
                Err(LpError::Infeasible)
            } else {
                Ok(Step::Done)
            };
        };
        // alpha = B^-1 a_q
        alpha.iter_mut().for_each(|v| *v = 0.0);
        for e in self.start[q]..self.start[q + 1] {
            let (r, a) = (self.rows[e], self.vals[e]);
            for (i, al) in alpha.iter_mut().enumerate() {
                *al += self.binv[i * m + r] * a;
            }
        }
        // Ratio test. Basic r changes at rate -dir * alpha[r].
        let mut t_best = self.hi[q] - self.lo[q];
        let mut leave: Option<(usize, f64)> = None; // (row, bound hit)
        let mut leave_pivot = 0.0;
        for r in 0..m {
            let rate = -dir * alpha[r];
            if rate.abs() < PIVOT_TOL {
                continue;
            }
            let j = self.basis[r];
            let xj = self.x[j];
            let bound = if rate < 0.0 {
                if phase1 && xj > self.hi[j] + TOL {
                    self.hi[j]
                } else if xj >= self.lo[j] - TOL || !phase1 {
                    self.lo[j]
                } else {
                    continue;
                }
            } else if phase1 && xj < self.lo[j] - TOL {
                self.lo[j]
            } else if xj <= self.hi[j] + TOL || !phase1 {
                self.hi[j]
            } else {
                continue;
            };
            if !bound.is_finite() {
                continue;
            }
            let t = ((bound - xj) / rate).max(0.0);
            let better = match leave {
                None => t < t_best || (t <= t_best && t_best.is_infinite()),
                Some((lr, _)) => {
                    if bland {
                        t < t_best - TOL || (t <= t_best + TOL && self.basis[r] < self.basis[lr])
                    } else {
                        t < t_best - TOL || (t <= t_best + TOL && alpha[r].abs() > leave_pivot)
                    }
                }
            };
            if better {
                t_best = t;
                leave = Some((r, bound));
                leave_pivot = alpha[r].abs();
            }
        }
        if !t_best.is_finite() {
            return if phase1 {
                Err(LpError::Numerical("unbounded phase 1".into()))
            } else {
                Ok(Step::Unbounded)
            };
        }
        let t = t_best;
        if t > TOL {
            *degenerate = 0;
        } else {
            *degenerate += 1;
            self.degenerate_iterations += 1;
        }
        self.x[q] += dir * t;
        for r in 0..m {
            if alpha[r] != 0.0 {
                let j = self.basis[r];
                self.x[j] -= dir * t * alpha[r];
            }
        }
        match leave {
            None => {
                // Bound flip of the entering variable.
                if dir > 0.0 {
                    self.x[q] = self.hi[q];
                    self.state[q] = State::Upper;
                } else {
                    self.x[q] = self.lo[q];
                    self.state[q] = State::Lower;
                }
            }
            Some((r, bound)) => {
                let l = self.basis[r];
                self.x[l] = bound;
                self.state[l] = if bound == self.lo[l] {
                    State::Lower
                } else {
                    State::Upper
                };
                self.basis[r] = q;
                self.state[q] = State::Basic;
                self.pivot(r, alpha);
                self.pivots += 1;
                self.since_refactor += 1;
                if self.since_refactor >= REFACTOR_EVERY {
                    self.refactor()?;
                }
            }
        }
        Ok(Step::Continue)
    }

    fn pivot(&mut self, r: usize, alpha: &[f64]) {
        let m = self.m;
        let inv = 1.0 / alpha[r];
        for k in 0..m {
            self.binv[r * m + k] *= inv;
        }
        let (before, rest) = self.binv.split_at_mut(r * m);
        let (prow, after) = rest.split_at_mut(m);
        for (i, chunk) in before.chunks_mut(m).enumerate() {
            let f = alpha[i];
            if f != 0.0 {
                for (b, p) in chunk.iter_mut().zip(prow.iter()) {
                    *b -= f * p;
                }
            }
        }
        for (i, chunk) in after.chunks_mut(m).enumerate() {
            let f = alpha[r + 1 + i];
            if f != 0.0 {
                for (b, p) in chunk.iter_mut().zip(prow.iter()) {
                    *b -= f * p;
                }
            }
        }
    }

    /// Recomputes the basis inverse from scratch and the basic values from the
    /// nonbasic ones.
    fn refactor(&mut self) -> Result<(), LpError> {
        let m = self.m;
        self.since_refactor = 0;
        let mut b = vec![0.0; m * m];
        for (c, &j) in self.basis.iter().enumerate() {
            for e in self.start[j]..self.start[j + 1] {
                b[self.rows[e] * m + c] = self.vals[e];
            }
        }
        let mut inv = vec![0.0; m * m];
        for i in 0..m {
            inv[i * m + i] = 1.0;
        }
        for col in 0..m {
            let mut p = col;
            let mut best = b[col * m + col].abs();
            for r in col + 1..m {
                let v = b[r * m + col].abs();
                if v > best {
                    best = v;
                    p = r;
                }
            }
            if best < 1e-12 {
                return Err(LpError::Numerical("singular basis".into()));
            }
            if p != col {
                for k in 0..m {
                    b.swap(p * m + k, col * m + k);
                    inv.swap(p * m + k, col * m + k);
                }
            }
            let d = 1.0 / b[col * m + col];
            for k in 0..m {
                b[col * m + k] *= d;
                inv[col * m + k] *= d;
            }
            for r in 0..m {
                if r != col {
                    let f = b[r * m + col];
                    if f != 0.0 {
                        for k in 0..m {
                            b[r * m + k] -= f * b[col * m + k];
                            inv[r * m + k] -= f * inv[col * m + k];
                        }
                    }
                }
            }
        }
        // B^-1 maps row space to basis positions: (B^-1)[pos][row].
        self.binv = inv;
        self.recompute_basics();
        Ok(())
    }

    fn recompute_basics(&mut self) {
        let m = self.m;
        let mut rhs = vec![0.0; m];
        for j in 0..self.n + self.m {
            if self.state[j] != State::Basic && self.x[j] != 0.0 {
                for e in self.start[j]..self.start[j + 1] {
                    rhs[self.rows[e]] -= self.vals[e] * self.x[j];
                }
            }
        }
        for (pos, &j) in self.basis.iter().enumerate() {
            let row = &self.binv[pos * m..(pos + 1) * m];
            self.x[j] = row.iter().zip(&rhs).map(|(b, v)| b * v).sum();
        }
    }
}

fn nonbasic_start(lo: f64, hi: f64) -> (State, f64) {
    if lo.is_finite() {
        (State::Lower, lo)
    } else if hi.is_finite() {
        (State::Upper, hi)
    } else {
        (State::Free, 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_ranges() {
        // x + y = 10, x,y >= 0, x <= 7
        let mut lp = LinearProgram::new();
        let x = lp.add_var(0.0, 7.0);
        let y = lp.add_var(0.0, f64::INFINITY);
        lp.add_row(&[(x, 1.0), (y, 1.0)], 10.0, 10.0);
        let mut s = Simplex::new(&lp).unwrap();
        assert!((s.maximize(x, None).unwrap() - 7.0).abs() < 1e-9);
        assert!((s.minimize(x, None).unwrap()).abs() < 1e-9);
        assert!((s.maximize(y, None).unwrap() - 10.0).abs() < 1e-9);
        assert!((s.minimize(y, None).unwrap() - 3.0).abs() < 1e-9);
    }

    #[test]
    fn infeasible_and_unbounded() {
        let mut lp = LinearProgram::new();
        let x = lp.add_var(0.0, 1.0);
        lp.add_row(&[(x, 1.0)], 2.0, 3.0);
        assert_eq!(Simplex::new(&lp).unwrap_err(), LpError::Infeasible);
        let mut lp = LinearProgram::new();
        let x = lp.add_var(0.0, f64::INFINITY);
        let y = lp.add_var(0.0, f64::INFINITY);
        lp.add_row(&[(x, 1.0), (y, -1.0)], 1.0, 1.0);
        let mut s = Simplex::new(&lp).unwrap();
        assert_eq!(s.maximize(x, None).unwrap(), f64::INFINITY);
        assert!((s.minimize(x, None).unwrap() - 1.0).abs() < 1e-9);
    }
}
