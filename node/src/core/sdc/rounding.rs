//! Rounding of published values to a base, and the interval an attacker can infer
//! from a rounded value.
//!
//! Conventional rounding to the nearest multiple of the base, halves away from zero
//! (`round(x / b) * b`). Rounding is applied after suppression to the published
//! (free) cells only; margins are rounded independently, so rounded tables need not
//! add up. The audit treats a rounded value `r` as the interval of true values that
//! round to `r`.

/// Rounds `x` to the nearest multiple of `base` (halves away from zero).
pub fn round_to_base(x: f64, base: f64) -> f64 {
    let steps = x / base;
    // Past 2^53 steps (or an overflow to infinity, with a tiny base), every
    // float is a multiple of the base already: rounding changes nothing, and
    // must not publish infinity (values are finite, spec rule 3).
    if !steps.is_finite() || steps.abs() >= 9_007_199_254_740_992.0 {
        return x;
    }
    let r = steps.round() * base;
    // Avoid "-0" in published output.
    if r == 0.0 {
        0.0
    } else {
        r
    }
}

/// The interval of true values an attacker infers from the published rounded value
/// `r`. With `integer` set (integer-valued cells and an integral base), the interval
/// is the exact integer range; otherwise the closure of the real range, which yields
/// the same LP bounds.
pub fn rounding_interval(r: f64, base: f64, integer: bool) -> (f64, f64) {
    let h = base / 2.0;
    if !integer {
        return (r - h, r + h);
    }
    if r > 0.0 {
        ((r - h).ceil(), (r + h).ceil() - 1.0)
    } else if r < 0.0 {
        ((r - h).floor() + 1.0, (r + h).floor())
    } else {
        ((-h).floor() + 1.0, h.ceil() - 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_and_intervals_are_consistent() {
        for base in [1.0, 2.0, 3.0, 5.0, 10.0] {
            for x in -60..=60 {
                let r = round_to_base(x as f64, base);
                let (lo, hi) = rounding_interval(r, base, true);
                assert!(lo <= x as f64 && x as f64 <= hi, "x={x} base={base}");
                // Exactness: the ends round to r, the points just outside do not.
                assert_eq!(round_to_base(lo, base), r);
                assert_eq!(round_to_base(hi, base), r);
                assert_ne!(round_to_base(lo - 1.0, base), r);
                assert_ne!(round_to_base(hi + 1.0, base), r);
            }
        }
        assert_eq!(round_to_base(7.5, 5.0), 10.0);
        // A base too small for the value leaves it as it is, finite.
        assert_eq!(round_to_base(1e10, 1e-300), 1e10);
        assert_eq!(round_to_base(-3e300, 1e-10), -3e300);
        assert_eq!(round_to_base(12.0, 5.0), 10.0);
        let (lo, hi) = rounding_interval(10.0, 5.0, false);
        assert_eq!((lo, hi), (7.5, 12.5));
    }
}
