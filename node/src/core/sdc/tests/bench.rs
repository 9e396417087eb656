//! Benchmark: 100 districts x 100 categories with one level of margins, about 5 %
//! primary-sensitive cells. Run with
//! `cargo test --release -- --ignored --nocapture bench_`.

use std::time::{Duration, Instant};

use super::super::engine::{audit, protect};
use super::super::settings::{RoundingRule, Settings};
use super::super::table::{AggregationKind, Table};
use super::{counts, grid_table, Interior};

/// Small deterministic generator (xorshift64*), test-only.
pub(super) struct TestRng(pub(super) u64);

impl TestRng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// A 100 x 100 count table with margins; about `percent_small` % of the interior
/// cells have 1 or 2 contributors.
pub(super) fn bench_count_table(seed: u64, percent_small: u64) -> Table {
    let mut rng = TestRng(seed);
    let values: Vec<u64> = (0..100 * 100)
        .map(|_| {
            if rng.next() % 100 < percent_small {
                1 + rng.next() % 2
            } else {
                3 + rng.next() % 200
            }
        })
        .collect();
    grid_table(
        AggregationKind::Count,
        &[100, 100],
        &[true, true],
        &counts(&values),
    )
}

/// Timings of one benchmark run: (engine, full audit, suppressed, primary).
pub(super) fn run_bench(table: &Table, settings: &Settings) -> (Duration, Duration, usize, usize) {
    let t0 = Instant::now();
    let out = protect(table, settings).expect("protect");
    let engine = t0.elapsed();
    let statuses: Vec<_> = out.published.cells.iter().map(|c| c.status).collect();
    let t1 = Instant::now();
    let report = audit(table, settings, &statuses).expect("audit");
    let audit_time = t1.elapsed();
    assert!(report.failures.is_empty());
    let suppressed = statuses.iter().filter(|s| s.is_suppressed()).count();
    let primary = statuses.iter().filter(|s| s.is_primary()).count();
    (engine, audit_time, suppressed, primary)
}

#[test]
#[ignore = "benchmark; run in release mode with --ignored --nocapture"]
fn bench_100x100() {
    let table = bench_count_table(0x5EED, 5);
    for (name, settings) in [
        ("counts, exact", Settings::default()),
        (
            "counts, rounded to base 5",
            Settings {
                rounding: Some(RoundingRule { base: 5.0 }),
                ..Settings::default()
            },
        ),
    ] {
        let (e, a, s, p) = run_bench(&table, &settings);
        eprintln!(
            "100x100 {name}: {p} primary, {s} suppressed in total; engine {:.3} s, full audit {:.3} s",
            e.as_secs_f64(),
            a.as_secs_f64()
        );
    }
    // Magnitude table: sums with largest contributions.
    let mut rng = TestRng(0xC0FFEE);
    let cells: Vec<Interior> = (0..100 * 100)
        .map(|_| {
            let c = if rng.next() % 100 < 2 {
                1 + rng.next() % 2
            } else {
                3 + rng.next() % 10
            };
            let mut v: Vec<f64> = (0..c).map(|_| (1 + rng.next() % 1000) as f64).collect();
            if c >= 3 && rng.next() % 100 < 3 {
                v[0] *= 30.0;
            }
            v.sort_by(|a, b| b.total_cmp(a));
            Interior {
                value: v.iter().sum(),
                contributors: c,
                largest: v,
            }
        })
        .collect();
    let table = grid_table(AggregationKind::Sum, &[100, 100], &[true, true], &cells);
    let (e, a, s, p) = run_bench(&table, &Settings::default());
    eprintln!(
        "100x100 sums (threshold, dominance, p%): {p} primary, {s} suppressed; engine {:.3} s, full audit {:.3} s",
        e.as_secs_f64(),
        a.as_secs_f64()
    );
    // Three dimensions: 12 x 12 x 12 with margins, about 5 % small cells.
    let mut rng = TestRng(0xD1CE);
    let values: Vec<u64> = (0..12 * 12 * 12)
        .map(|_| {
            if rng.next() % 100 < 5 {
                1 + rng.next() % 2
            } else {
                3 + rng.next() % 60
            }
        })
        .collect();
    let table = grid_table(
        AggregationKind::Count,
        &[12, 12, 12],
        &[true, true, true],
        &counts(&values),
    );
    let (e, a, s, p) = run_bench(&table, &Settings::default());
    eprintln!(
        "12x12x12 counts: {p} primary, {s} suppressed; engine {:.3} s, full audit {:.3} s",
        e.as_secs_f64(),
        a.as_secs_f64()
    );
}
