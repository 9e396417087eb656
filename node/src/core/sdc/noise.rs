//! Differential-privacy noise with exact sampling.
//!
//! Samplers follow Canonne, Kamath and Steinke, "The Discrete Gaussian for
//! Differential Privacy" (NeurIPS 2020): `Bernoulli(exp(-gamma))` for rational
//! `gamma` (their Algorithm 1), the discrete Laplace (Algorithm 2) and the discrete
//! Gaussian (Algorithm 3). All arithmetic is on integers and rationals; the only
//! randomness used is uniform integers obtained by rejection sampling from a
//! cryptographically secure bit stream, so there is no floating-point leakage.
//!
//! Randomness: [`SeededRng`] is SHA-256 in counter mode keyed by a caller-supplied
//! 32-byte seed (`block_i = SHA-256("civex-sdc-noise-v1" || seed || i_le64)`), so a
//! retry with the stored seed reproduces the noise exactly. [`NoiseSeed::generate`]
//! draws a fresh seed from the operating system (`getrandom`).
//!
//! Accounting: zero-concentrated DP (rho-zCDP, Bun & Steinke 2016). One cell with
//! sensitivity `D` (1 for counts, the clamp bound for clamped sums):
//! discrete Laplace with per-cell `epsilon` (scale `D / epsilon`) is `epsilon`-DP and
//! hence `epsilon^2 / 2`-zCDP; discrete Gaussian with variance parameter `sigma^2`
//! is `D^2 / (2 sigma^2)`-zCDP. A contributor appears in `m` cells of a table with
//! margins (`m = 2^(number of dimensions with a margin)`, each contributor being in
//! exactly one interior cell), so a publish costs `m * rho_cell` by composition.

use sha2::{Digest, Sha256};

use super::error::SdcError;

/// A positive rational number `num / den`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rational {
    /// Numerator (> 0).
    pub num: u64,
    /// Denominator (> 0).
    pub den: u64,
}

impl Rational {
    /// `num / den`.
    pub fn new(num: u64, den: u64) -> Self {
        Rational { num, den }
    }

    /// Approximate value (for accounting and display only).
    pub fn to_f64(self) -> f64 {
        self.num as f64 / self.den as f64
    }
}

/// Noise mechanism with its per-cell parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoiseMechanism {
    /// Discrete Laplace with per-cell privacy parameter `epsilon` (scale `D / epsilon`).
    Laplace {
        /// Per-cell epsilon.
        epsilon: Rational,
    },
    /// Discrete Gaussian with variance parameter `sigma^2` (in squared value units).
    Gaussian {
        /// Variance parameter sigma^2.
        sigma_squared: Rational,
    },
}

/// Noise settings of an indicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoiseSettings {
    /// Mechanism and its parameter.
    pub mechanism: NoiseMechanism,
    /// Per-contributor sensitivity `D` of one cell in integer value units: 1 for
    /// counts; for sums the clamp bound (the caller clamps every contribution to `[0, D]`).
    pub clamp_bound: u64,
    /// Number of cells one contributor can affect; `None` = `2^(dimensions with a margin)`.
    pub cells_per_contributor: Option<u32>,
}

impl NoiseSettings {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), SdcError> {
        let r = match self.mechanism {
            NoiseMechanism::Laplace { epsilon } => epsilon,
            NoiseMechanism::Gaussian { sigma_squared } => sigma_squared,
        };
        if r.num == 0 || r.den == 0 || self.clamp_bound == 0 {
            return Err(SdcError::InvalidNoise(
                "parameters and clamp bound must be positive".into(),
            ));
        }
        if r.num > 1 << 40 || r.den > 1 << 40 || self.clamp_bound > 1 << 40 {
            return Err(SdcError::InvalidNoise(
                "parameters too large (max 2^40)".into(),
            ));
        }
        if let NoiseMechanism::Gaussian { sigma_squared } = self.mechanism {
            if sigma_squared.den > 1 << 20 {
                return Err(SdcError::InvalidNoise(
                    "sigma^2 denominator too large (max 2^20)".into(),
                ));
            }
        }
        if self.cells_per_contributor == Some(0) {
            return Err(SdcError::InvalidNoise(
                "cells_per_contributor must be >= 1".into(),
            ));
        }
        Ok(())
    }

    /// zCDP cost (rho) of noising one cell.
    pub fn rho_per_cell(&self) -> f64 {
        match self.mechanism {
            NoiseMechanism::Laplace { epsilon } => epsilon.to_f64().powi(2) / 2.0,
            NoiseMechanism::Gaussian { sigma_squared } => {
                let d = self.clamp_bound as f64;
                d * d / (2.0 * sigma_squared.to_f64())
            }
        }
    }
}

/// A 32-byte seed from which all noise of one publish is derived.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct NoiseSeed(pub [u8; 32]);

impl std::fmt::Debug for NoiseSeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NoiseSeed(..)")
    }
}

impl NoiseSeed {
    /// Draws a fresh seed from the operating system's secure random source.
    pub fn generate() -> Result<Self, SdcError> {
        let mut b = [0u8; 32];
        getrandom::getrandom(&mut b).map_err(|e| SdcError::Randomness(e.to_string()))?;
        Ok(NoiseSeed(b))
    }
}

/// Deterministic cryptographically secure stream: SHA-256 in counter mode.
#[derive(Clone)]
pub struct SeededRng {
    seed: [u8; 32],
    counter: u64,
    buf: [u8; 32],
    pos: usize,
}

impl std::fmt::Debug for SeededRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SeededRng(..)")
    }
}

impl SeededRng {
    /// Stream derived from `seed`.
    pub fn new(seed: &NoiseSeed) -> Self {
        SeededRng {
            seed: seed.0,
            counter: 0,
            buf: [0; 32],
            pos: 32,
        }
    }

    /// Next 64 uniformly random bits.
    pub fn next_u64(&mut self) -> u64 {
        if self.pos + 8 > 32 {
            let mut h = Sha256::new();
            h.update(b"civex-sdc-noise-v1");
            h.update(self.seed);
            h.update(self.counter.to_le_bytes());
            self.buf.copy_from_slice(&h.finalize());
            self.counter += 1;
            self.pos = 0;
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.buf[self.pos..self.pos + 8]);
        self.pos += 8;
        u64::from_le_bytes(b)
    }

    /// Uniform integer in `[0, n)` by rejection sampling (exact). `n > 0`.
    pub fn uniform_below(&mut self, n: u128) -> u128 {
        assert!(n > 0, "empty range");
        if n == 1 {
            return 0;
        }
        let bits = 128 - (n - 1).leading_zeros();
        let mask = if bits == 128 {
            u128::MAX
        } else {
            (1u128 << bits) - 1
        };
        loop {
            let v = ((u128::from(self.next_u64()) << 64) | u128::from(self.next_u64())) & mask;
            if v < n {
                return v;
            }
        }
    }

    /// Bernoulli(num/den), exact. Requires `num <= den`, `den > 0`.
    pub fn bernoulli(&mut self, num: u128, den: u128) -> bool {
        self.uniform_below(den) < num
    }

    /// Bernoulli(exp(-num/den)), exact (CKS 2020, Algorithm 1). `den > 0`.
    pub fn bernoulli_exp(&mut self, num: u128, den: u128) -> bool {
        if num <= den {
            let mut k: u128 = 1;
            loop {
                // Bernoulli(gamma / k)
                if !self.bernoulli(num, den * k) {
                    break;
                }
                k += 1;
            }
            k % 2 == 1
        } else {
            let whole = num / den;
            for _ in 0..whole {
                if !self.bernoulli_exp(1, 1) {
                    return false;
                }
            }
            self.bernoulli_exp(num % den, den)
        }
    }

    /// Discrete Laplace with scale `t / s` (P(z) ∝ exp(-|z| s / t)), exact
    /// (CKS 2020, Algorithm 2). `s, t > 0`.
    pub fn discrete_laplace(&mut self, s: u128, t: u128) -> i128 {
        loop {
            let u = self.uniform_below(t);
            if !self.bernoulli_exp(u, t) {
                continue;
            }
            let mut v: u128 = 0;
            while self.bernoulli_exp(1, 1) {
                v += 1;
            }
            let x = u + t * v;
            let y = x / s;
            let negative = self.bernoulli(1, 2);
            if negative && y == 0 {
                continue;
            }
            let y = y as i128;
            return if negative { -y } else { y };
        }
    }

    /// Discrete Gaussian with variance parameter `sigma^2 = a / b`, exact
    /// (CKS 2020, Algorithm 3). `a, b > 0`.
    pub fn discrete_gaussian(&mut self, a: u128, b: u128) -> i128 {
        // t = floor(sigma) + 1, sigma = sqrt(a / b).
        let mut r = ((a as f64 / b as f64).sqrt()) as u128;
        while r * r * b > a {
            r -= 1;
        }
        while (r + 1) * (r + 1) * b <= a {
            r += 1;
        }
        let t = r + 1;
        loop {
            let y = self.discrete_laplace(1, t);
            // gamma = (|y| - sigma^2 / t)^2 / (2 sigma^2) = (|y| b t - a)^2 / (2 a b t^2)
            // An overflow means gamma > 2^30 or so: acceptance probability ~ 0, reject.
            let Some(yb) = y
                .unsigned_abs()
                .checked_mul(b)
                .and_then(|v| v.checked_mul(t))
            else {
                continue;
            };
            let diff = yb.abs_diff(a);
            let (Some(num), Some(den)) = (
                diff.checked_mul(diff),
                (2 * a * b).checked_mul(t).and_then(|v| v.checked_mul(t)),
            ) else {
                continue;
            };
            if self.bernoulli_exp(num, den) {
                return y;
            }
        }
    }
}

/// Samples the noise of one cell for the given settings.
pub fn sample_noise(rng: &mut SeededRng, settings: &NoiseSettings) -> i64 {
    let z = match settings.mechanism {
        NoiseMechanism::Laplace { epsilon } => {
            // scale D / epsilon = D * den / num
            rng.discrete_laplace(
                u128::from(epsilon.num),
                u128::from(settings.clamp_bound) * u128::from(epsilon.den),
            )
        }
        NoiseMechanism::Gaussian { sigma_squared } => {
            rng.discrete_gaussian(u128::from(sigma_squared.num), u128::from(sigma_squared.den))
        }
    };
    z.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// Privacy cost of one publish in rho-zCDP.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrivacyCost {
    /// Total rho of the publish (to debit from the ledger).
    pub rho: f64,
    /// Cost of one noised cell.
    pub rho_per_cell: f64,
    /// Number of cells a contributor affects.
    pub cells_per_contributor: u32,
}

/// Cost of publishing a table whose number of dimensions with a margin is `margin_dims`.
pub fn publish_cost(settings: &NoiseSettings, margin_dims: usize) -> PrivacyCost {
    let m = settings
        .cells_per_contributor
        .unwrap_or(1u32 << margin_dims.min(31));
    let per = settings.rho_per_cell();
    PrivacyCost {
        rho: per * f64::from(m),
        rho_per_cell: per,
        cells_per_contributor: m,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moments(xs: &[i128]) -> (f64, f64) {
        let n = xs.len() as f64;
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        (mean, var)
    }

    #[test]
    fn same_seed_same_noise_and_different_seed_differs() {
        let s = NoiseSettings {
            mechanism: NoiseMechanism::Gaussian {
                sigma_squared: Rational::new(25, 1),
            },
            clamp_bound: 1,
            cells_per_contributor: None,
        };
        let a: Vec<i64> = {
            let mut r = SeededRng::new(&NoiseSeed([7; 32]));
            (0..100).map(|_| sample_noise(&mut r, &s)).collect()
        };
        let b: Vec<i64> = {
            let mut r = SeededRng::new(&NoiseSeed([7; 32]));
            (0..100).map(|_| sample_noise(&mut r, &s)).collect()
        };
        let c: Vec<i64> = {
            let mut r = SeededRng::new(&NoiseSeed([8; 32]));
            (0..100).map(|_| sample_noise(&mut r, &s)).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn bernoulli_exp_frequency() {
        let mut r = SeededRng::new(&NoiseSeed([1; 32]));
        for (num, den) in [(1u128, 2u128), (1, 1), (5, 2)] {
            let n = 20_000;
            let hits = (0..n).filter(|_| r.bernoulli_exp(num, den)).count() as f64 / n as f64;
            let p = (-(num as f64) / den as f64).exp();
            assert!((hits - p).abs() < 0.02, "gamma={num}/{den}: {hits} vs {p}");
        }
    }

    #[test]
    fn discrete_laplace_moments() {
        // scale 3: variance of the discrete Laplace = 2 e^{-1/3} / (1 - e^{-1/3})^2
        let mut r = SeededRng::new(&NoiseSeed([2; 32]));
        let xs: Vec<i128> = (0..20_000).map(|_| r.discrete_laplace(1, 3)).collect();
        let (mean, var) = moments(&xs);
        let q = (-1.0f64 / 3.0).exp();
        let expected = 2.0 * q / (1.0 - q).powi(2);
        assert!(mean.abs() < 0.2, "mean {mean}");
        assert!(
            (var / expected - 1.0).abs() < 0.1,
            "var {var} vs {expected}"
        );
    }

    #[test]
    fn discrete_gaussian_moments() {
        let mut r = SeededRng::new(&NoiseSeed([3; 32]));
        let xs: Vec<i128> = (0..20_000).map(|_| r.discrete_gaussian(9, 1)).collect();
        let (mean, var) = moments(&xs);
        // For sigma^2 >= 1 the discrete Gaussian variance is within 1e-3 of sigma^2.
        assert!(mean.abs() < 0.1, "mean {mean}");
        assert!((var / 9.0 - 1.0).abs() < 0.06, "var {var}");
        let ys: Vec<i128> = (0..20_000).map(|_| r.discrete_gaussian(1, 4)).collect();
        let (m2, _) = moments(&ys);
        assert!(m2.abs() < 0.05);
    }

    #[test]
    fn costs() {
        let lap = NoiseSettings {
            mechanism: NoiseMechanism::Laplace {
                epsilon: Rational::new(1, 2),
            },
            clamp_bound: 1,
            cells_per_contributor: None,
        };
        let c = publish_cost(&lap, 2);
        assert_eq!(c.cells_per_contributor, 4);
        assert!((c.rho - 4.0 * 0.125).abs() < 1e-12);
        let g = NoiseSettings {
            mechanism: NoiseMechanism::Gaussian {
                sigma_squared: Rational::new(50, 1),
            },
            clamp_bound: 10,
            cells_per_contributor: Some(1),
        };
        assert!((publish_cost(&g, 2).rho - 1.0).abs() < 1e-12);
    }
}
