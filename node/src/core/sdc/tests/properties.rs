//! Property tests: rules respected, audit passes, determinism.

use proptest::prelude::*;

use super::super::audit::{feasible_ranges, Knowledge};
use super::super::engine::{audit, audit_knowing, protect};
use super::super::primary::evaluate;
use super::super::settings::{RoundingRule, Settings};
use super::super::table::AggregationKind;
use super::{counts, grid_table, Interior};

fn shape() -> impl Strategy<Value = (Vec<usize>, Vec<bool>)> {
    prop_oneof![
        (2usize..8, any::<bool>()).prop_map(|(a, t)| (vec![a], vec![t || a > 3])),
        (2usize..7, 2usize..7, any::<bool>(), any::<bool>())
            .prop_map(|(a, b, t1, t2)| (vec![a, b], vec![true, t1 || t2])),
        (2usize..4, 2usize..4, 2usize..4)
            .prop_map(|(a, b, c)| (vec![a, b, c], vec![true, true, true])),
    ]
}

fn count_table() -> impl Strategy<Value = (Vec<usize>, Vec<bool>, Vec<u64>)> {
    shape().prop_flat_map(|(s, t)| {
        let n: usize = s.iter().product();
        let cell = prop_oneof![3 => 0u64..3, 5 => 3u64..40, 1 => Just(0u64)];
        (Just(s), Just(t), proptest::collection::vec(cell, n))
    })
}

fn magnitude_cell() -> impl Strategy<Value = Interior> {
    (0u64..6, proptest::collection::vec(1u32..1000, 6)).prop_map(|(c, mut xs)| {
        xs.truncate(c as usize);
        let mut v: Vec<f64> = xs.iter().map(|&x| f64::from(x)).collect();
        v.sort_by(|a, b| b.total_cmp(a));
        Interior {
            value: v.iter().sum(),
            contributors: c,
            largest: v,
        }
    })
}

fn sum_table() -> impl Strategy<Value = (Vec<usize>, Vec<bool>, Vec<Interior>)> {
    shape().prop_flat_map(|(s, t)| {
        let n: usize = s.iter().product();
        (
            Just(s),
            Just(t),
            proptest::collection::vec(magnitude_cell(), n),
        )
    })
}

fn check_protected(table: &super::super::table::Table, settings: &Settings) {
    let out = protect(table, settings).expect("protect");
    let findings = evaluate(table, settings).expect("primary");
    for (i, c) in out.published.cells.iter().enumerate() {
        if let Some(f) = &findings[i] {
            assert_eq!(c.status, f.status, "primary cell {i} must keep its status");
            assert!(c.value.is_none(), "primary cell {i} published");
        } else {
            assert_eq!(c.value.is_none(), c.status.is_suppressed());
        }
    }
    let statuses: Vec<_> = out.published.cells.iter().map(|c| c.status).collect();
    let report = audit(table, settings, &statuses).expect("audit");
    assert!(
        report.failures.is_empty(),
        "audit failures: {:?}",
        report
            .failures
            .iter()
            .map(|&i| (table.label(i), report.ranges[i]))
            .collect::<Vec<_>>()
    );
    for (i, r) in report.ranges.iter().enumerate() {
        if let Some((lo, hi)) = r {
            let v = table.cells()[i].value;
            let tol = 1e-6 * v.abs().max(1.0);
            assert!(
                *lo <= v + tol && v - tol <= *hi,
                "true value outside the range of cell {i}"
            );
        }
    }
    // In a magnitude table the one contributor of a suppressed cell knows
    // its value: with it, no primary cell that neither holds that cell nor
    // lies within it is narrowed either.
    if table.kind().is_magnitude() {
        let within = |outer: usize, inner: usize| {
            let (o, i) = (&table.cells()[outer].coords, &table.cells()[inner].coords);
            o.iter().zip(i).all(|(a, b)| a == b || a.is_total())
        };
        for s in (0..statuses.len())
            .filter(|&s| statuses[s].is_suppressed() && table.cells()[s].contributors == 1)
        {
            let mut known = vec![None; statuses.len()];
            let v = table.cells()[s].value;
            known[s] = Some((v, v));
            let report = audit_knowing(table, settings, &statuses, &known).expect("audit");
            let narrowed: Vec<String> = report
                .failures
                .iter()
                .filter(|&&p| !within(p, s) && !within(s, p))
                .map(|&p| table.label(p))
                .collect();
            assert!(
                narrowed.is_empty(),
                "the contributor of {} narrows {narrowed:?}",
                table.label(s)
            );
        }
    }
    let again = protect(table, settings).expect("protect");
    assert_eq!(out, again, "engine must be deterministic");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn count_tables_are_protected(
        (sizes, totals, values) in count_table(),
        base in prop_oneof![Just(None), Just(Some(5.0)), Just(Some(3.0))],
        unbounded_below in proptest::bool::weighted(0.2),
    ) {
        let table = grid_table(AggregationKind::Count, &sizes, &totals, &counts(&values));
        let settings = Settings {
            rounding: base.map(|b| RoundingRule { base: b }),
            lower_bound: if unbounded_below { None } else { Some(0.0) },
            ..Settings::default()
        };
        check_protected(&table, &settings);
    }

    #[test]
    fn magnitude_tables_are_protected(
        (sizes, totals, cells) in sum_table(),
        base in prop_oneof![Just(None), Just(Some(100.0))],
    ) {
        let table = grid_table(AggregationKind::Sum, &sizes, &totals, &cells);
        let settings = Settings { rounding: base.map(|b| RoundingRule { base: b }), ..Settings::default() };
        check_protected(&table, &settings);
    }

    /// The audit is not vacuous: without secondary suppression, a primary cell that is
    /// the only suppressed cell of a constraint is exactly recomputable and reported.
    #[test]
    fn audit_reports_recomputable_cells((sizes, totals, values) in count_table()) {
        let table = grid_table(AggregationKind::Count, &sizes, &totals, &counts(&values));
        let settings = Settings { secondary: false, ..Settings::default() };
        let out = protect(&table, &settings).unwrap();
        let statuses: Vec<_> = out.published.cells.iter().map(|c| c.status).collect();
        let report = audit(&table, &settings, &statuses).unwrap();
        for c in table.constraints() {
            let sup: Vec<usize> = std::iter::once(c.total).chain(c.parts.iter().copied())
                .filter(|&i| statuses[i].is_suppressed()).collect();
            if let [only] = sup[..] {
                let v = table.cells()[only].value;
                let (lo, hi) = report.ranges[only].unwrap();
                prop_assert!((lo - v).abs() < 1e-6 && (hi - v).abs() < 1e-6);
                prop_assert!(report.failures.contains(&only));
            }
        }
    }

    /// Independent check of the LP on 1-D tables with a published total: a suppressed
    /// cell ranges over [0, T - published - 0] exactly.
    #[test]
    fn one_dimensional_ranges_match_closed_form(values in proptest::collection::vec(0u64..50, 2..9), mask in proptest::collection::vec(any::<bool>(), 9)) {
        let n = values.len();
        let table = grid_table(AggregationKind::Count, &[n], &[true], &counts(&values));
        let knowledge: Vec<Knowledge> = (0..=n).map(|i| {
            if i < n && mask[i] { Knowledge::Suppressed } else {
                let v = table.cells()[i].value; Knowledge::Interval(v, v)
            }
        }).collect();
        let ranges = feasible_ranges(table.constraints(), &knowledge, Some(0.0), None).unwrap();
        let total = table.cells()[n].value;
        let published: f64 = (0..n).filter(|&i| !mask[i]).map(|i| table.cells()[i].value).sum();
        for i in 0..n {
            if mask[i] {
                let (lo, hi) = ranges[i].unwrap();
                let k = (0..n).filter(|&j| mask[j]).count();
                let expected_lo = if k == 1 { total - published } else { 0.0 };
                prop_assert!((lo - expected_lo).abs() < 1e-6, "lo {} vs {}", lo, expected_lo);
                prop_assert!((hi - (total - published)).abs() < 1e-6);
            }
        }
    }
}

/// Integer ranges by exhaustive enumeration (independent of the LP).
fn brute_force_ranges(
    table: &super::super::table::Table,
    suppressed: &[usize],
    cap: i64,
) -> Vec<(i64, i64)> {
    let n = table.cells().len();
    let mut vals: Vec<i64> = table.cells().iter().map(|c| c.value as i64).collect();
    let mut ranges = vec![(i64::MAX, i64::MIN); suppressed.len()];
    let k = suppressed.len();
    let mut idx = vec![0i64; k];
    loop {
        for (j, &c) in suppressed.iter().enumerate() {
            vals[c] = idx[j];
        }
        let ok = table
            .constraints()
            .iter()
            .all(|c| vals[c.total] == c.parts.iter().map(|&p| vals[p]).sum::<i64>());
        if ok {
            for j in 0..k {
                ranges[j].0 = ranges[j].0.min(idx[j]);
                ranges[j].1 = ranges[j].1.max(idx[j]);
            }
        }
        let mut j = 0;
        loop {
            if j == k {
                let _ = n;
                return ranges;
            }
            idx[j] += 1;
            if idx[j] <= cap {
                break;
            }
            idx[j] = 0;
            j += 1;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The LP ranges of 2-D tables with margins equal the integer ranges found by
    /// brute force (the constraint matrix is totally unimodular).
    #[test]
    fn lp_ranges_match_brute_force(
        cols in 2usize..4,
        values in proptest::collection::vec(0u64..4, 6),
        picks in proptest::collection::vec(0usize..12, 1..5),
    ) {
        let sizes = [2usize, cols];
        let table = grid_table(AggregationKind::Count, &sizes, &[true, true], &counts(&values[..2 * cols]));
        let n = table.cells().len();
        let mut suppressed: Vec<usize> = picks.iter().map(|&p| p % n).collect();
        suppressed.sort_unstable();
        suppressed.dedup();
        let knowledge: Vec<Knowledge> = (0..n).map(|i| {
            if suppressed.contains(&i) { Knowledge::Suppressed } else {
                let v = table.cells()[i].value; Knowledge::Interval(v, v)
            }
        }).collect();
        let ranges = feasible_ranges(table.constraints(), &knowledge, Some(0.0), None).unwrap();
        let grand = table.cells()[n - 1].value as i64;
        let cap = 2 * grand + 3;
        let brute = brute_force_ranges(&table, &suppressed, cap);
        for (j, &c) in suppressed.iter().enumerate() {
            let (lo, hi) = ranges[c].unwrap();
            let (blo, bhi) = brute[j];
            prop_assert!((lo - blo as f64).abs() < 1e-6, "cell {} lo {} vs {}", c, lo, blo);
            if hi.is_infinite() {
                // Unbounded: brute force must reach close to its cap (other suppressed
                // cells may have to exceed it by at most the grand total).
                prop_assert!(bhi >= cap - grand - 2, "cell {} unbounded but brute max {}", c, bhi);
            } else {
                prop_assert!((hi - bhi as f64).abs() < 1e-6, "cell {} hi {} vs {}", c, hi, bhi);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Larger tables (more degeneracy in the LP, more interaction between patterns).
    #[test]
    fn larger_tables_are_protected(
        a in 6usize..16,
        b in 6usize..16,
        c in prop_oneof![Just(1usize), 3usize..6],
        seed in any::<u64>(),
        base in prop_oneof![Just(None), Just(Some(5.0))],
    ) {
        let mut rng = super::bench::TestRng(seed | 1);
        let (sizes, totals) = if c == 1 { (vec![a, b], vec![true, true]) } else { (vec![a.min(8), b.min(8), c], vec![true; 3]) };
        let n: usize = sizes.iter().product();
        let values: Vec<u64> = (0..n)
            .map(|_| match rng.next() % 100 { 0..=7 => 1 + rng.next() % 2, 8..=10 => 0, _ => 3 + rng.next() % 50 })
            .collect();
        let table = grid_table(AggregationKind::Count, &sizes, &totals, &counts(&values));
        let settings = Settings { rounding: base.map(|b| RoundingRule { base: b }), ..Settings::default() };
        check_protected(&table, &settings);
    }
}
