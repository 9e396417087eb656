//! Unit tests of the engine's contract: errors, statuses, parameters, noise.

use super::super::engine::{
    audit, audit_knowing, protect, protect_with_fresh_seed, protect_with_seed,
};
use super::super::error::SdcError;
use super::super::noise::{NoiseMechanism, NoiseSeed, NoiseSettings, Rational};
use super::super::primary::CellStatus;
use super::super::settings::{ParameterId, Settings};
use super::super::table::{AggregationKind, CellInput, Coord, LargestContributions, Table};
use super::{counts, grid_table, Interior};

fn one_dim(kind: AggregationKind, cells: Vec<CellInput>) -> Table {
    Table::new("ind", "2024", kind, vec!["district".into()], cells).unwrap()
}

#[test]
fn magnitude_cells_without_largest_contributions_are_refused() {
    let t = one_dim(
        AggregationKind::Sum,
        vec![CellInput::new(vec![Coord::code("a")], 100.0, 5)],
    );
    let err = protect(&t, &Settings::default()).unwrap_err();
    assert!(
        matches!(err, SdcError::MissingLargestContributions { .. }),
        "{err}"
    );
    // Fine once the rules are off.
    let s = Settings {
        dominance: None,
        p_percent: None,
        ..Settings::default()
    };
    assert!(protect(&t, &s).is_ok());
}

#[test]
fn dominance_needs_n_largest() {
    let t = one_dim(
        AggregationKind::Sum,
        vec![CellInput::new(vec![Coord::code("a")], 100.0, 5)
            .with_largest(LargestContributions::Values(vec![50.0]))],
    );
    assert!(matches!(
        protect(&t, &Settings::default()),
        Err(SdcError::InvalidContributions { .. })
    ));
}

#[test]
fn shares_are_accepted_and_counts_ignore_dominance() {
    let t = one_dim(
        AggregationKind::Sum,
        vec![CellInput::new(vec![Coord::code("a")], 1000.0, 5)
            .with_largest(LargestContributions::Shares(vec![0.91, 0.02]))],
    );
    let out = protect(&t, &Settings::default()).unwrap();
    assert_eq!(out.published.cells[0].status, CellStatus::Dominance);
    assert!(out.local.notes[0].reason.contains("93% > k=85%"));
    // A count cell has no dominance rule and needs no contributions.
    let t = one_dim(
        AggregationKind::Count,
        vec![CellInput::new(vec![Coord::code("a")], 5.0, 5)],
    );
    assert_eq!(
        protect(&t, &Settings::default()).unwrap().published.cells[0].status,
        CellStatus::Free
    );
}

#[test]
fn table_validation() {
    let c = |code: Coord, v: f64| CellInput::new(vec![code], v, v as u64);
    let bad_total = Table::new(
        "i",
        "p",
        AggregationKind::Count,
        vec!["d".into()],
        vec![
            c(Coord::code("a"), 3.0),
            c(Coord::code("b"), 4.0),
            c(Coord::Total, 8.0),
        ],
    );
    assert!(matches!(bad_total, Err(SdcError::TotalMismatch { .. })));
    let dup = Table::new(
        "i",
        "p",
        AggregationKind::Count,
        vec!["d".into()],
        vec![c(Coord::code("a"), 3.0), c(Coord::code("a"), 4.0)],
    );
    assert!(matches!(dup, Err(SdcError::DuplicateCell(_))));
    let missing = Table::new(
        "i",
        "p",
        AggregationKind::Count,
        vec!["d".into(), "e".into()],
        vec![
            CellInput::new(vec![Coord::code("a"), Coord::code("x")], 3.0, 3),
            CellInput::new(vec![Coord::Total, Coord::code("x")], 3.0, 3),
            CellInput::new(vec![Coord::code("a"), Coord::code("y")], 3.0, 3),
        ],
    );
    assert!(matches!(missing, Err(SdcError::MissingCell(_))));
    // Ratio tables get no constraints, so no secondary suppression.
    let ratio = Table::new(
        "i",
        "p",
        AggregationKind::Ratio,
        vec!["d".into()],
        vec![
            CellInput::new(vec![Coord::code("a")], 0.5, 2)
                .with_largest(LargestContributions::Shares(vec![0.6, 0.4])),
            CellInput::new(vec![Coord::code("b")], 0.7, 9)
                .with_largest(LargestContributions::Shares(vec![0.2, 0.1])),
            CellInput::new(vec![Coord::Total], 0.65, 11)
                .with_largest(LargestContributions::Shares(vec![0.2, 0.1])),
        ],
    )
    .unwrap();
    assert!(ratio.constraints().is_empty());
    let out = protect(&ratio, &Settings::default()).unwrap();
    let st: Vec<_> = out.published.cells.iter().map(|c| c.status).collect();
    assert_eq!(
        st,
        [CellStatus::SmallCounts, CellStatus::Free, CellStatus::Free]
    );
}

#[test]
fn audit_detects_unprotected_cells_when_secondary_is_off() {
    // 2 x 2 with margins, one small cell: without secondary suppression it is
    // recomputable from its row; with it, the audit passes.
    let t = grid_table(
        AggregationKind::Count,
        &[2, 2],
        &[true, true],
        &counts(&[1, 10, 12, 14]),
    );
    let off = Settings {
        secondary: false,
        ..Settings::default()
    };
    let out = protect(&t, &off).unwrap();
    let st: Vec<_> = out.published.cells.iter().map(|c| c.status).collect();
    let report = audit(&t, &off, &st).unwrap();
    assert_eq!(report.failures, vec![0]);
    assert_eq!(report.ranges[0], Some((1.0, 1.0)));
    let out = protect(&t, &Settings::default()).unwrap();
    let st: Vec<_> = out.published.cells.iter().map(|c| c.status).collect();
    // The whole interior must go: 4 cells.
    assert_eq!(st.iter().filter(|s| s.is_suppressed()).count(), 4);
    let report = audit(&t, &Settings::default(), &st).unwrap();
    assert!(report.failures.is_empty());
    let (lo, hi) = report.ranges[0].unwrap();
    assert!(lo <= 0.0 && hi >= 11.0, "{lo} {hi}");
}

#[test]
fn two_primary_cells_that_protect_each_other_insufficiently() {
    // Row a: 1 and 2 are both small; suppressing just the pair would let the attacker
    // know 1 + 2 = 3 exactly from the row and the columns -> more cells are needed.
    let t = grid_table(
        AggregationKind::Count,
        &[3, 3],
        &[true, true],
        &counts(&[1, 2, 30, 25, 40, 35, 20, 22, 24]),
    );
    let s = Settings::default();
    let out = protect(&t, &s).unwrap();
    let st: Vec<_> = out.published.cells.iter().map(|c| c.status).collect();
    assert!(audit(&t, &s, &st).unwrap().failures.is_empty());
    assert!(st.iter().filter(|x| **x == CellStatus::Secondary).count() >= 2);
}

#[test]
fn applied_parameters_flag_secrets() {
    let t = one_dim(
        AggregationKind::Count,
        vec![CellInput::new(vec![Coord::code("a")], 5.0, 5)],
    );
    let out = protect(&t, &Settings::default()).unwrap();
    let p = &out.parameters;
    let k = p
        .entries
        .iter()
        .find(|e| e.id == ParameterId::DominanceK)
        .unwrap();
    assert!(k.secret);
    assert_eq!(k.value, "85");
    assert!(p.public().iter().all(|e| !e.secret));
    assert!(p
        .public()
        .iter()
        .any(|e| e.id == ParameterId::ThresholdMinContributors && e.value == "3"));
}

#[test]
fn noise_is_reproducible_and_costed() {
    let t = grid_table(
        AggregationKind::Count,
        &[4, 3],
        &[true, true],
        &counts(&[5, 9, 14, 3, 40, 2, 7, 8, 9, 10, 11, 12]),
    );
    let s = Settings {
        noise: Some(NoiseSettings {
            mechanism: NoiseMechanism::Gaussian {
                sigma_squared: Rational::new(4, 1),
            },
            clamp_bound: 1,
            cells_per_contributor: None,
        }),
        ..Settings::default()
    };
    assert!(matches!(protect(&t, &s), Err(SdcError::InvalidNoise(_))));
    let seed = NoiseSeed([42; 32]);
    let a = protect_with_seed(&t, &s, &seed).unwrap();
    let b = protect_with_seed(&t, &s, &seed).unwrap();
    assert_eq!(a, b);
    let (c, seed2) = protect_with_fresh_seed(&t, &s).unwrap();
    assert_eq!(protect_with_seed(&t, &s, &seed2).unwrap(), c);
    let cost = a.privacy_cost.unwrap();
    assert_eq!(cost.cells_per_contributor, 4);
    assert!((cost.rho - 4.0 / 8.0).abs() < 1e-12);
    // Suppression pattern is the same as without noise; values are non-negative.
    let plain = protect(
        &t,
        &Settings {
            noise: None,
            ..s.clone()
        },
    )
    .unwrap();
    for (x, y) in a.published.cells.iter().zip(&plain.published.cells) {
        assert_eq!(x.status, y.status);
        assert!(x.value.is_none_or(|v| v >= 0.0));
    }
}

#[test]
fn singleton_heuristic_adds_a_third_suppression() {
    // Row a: a single-contributor cell (1) and a small cell (2) would be the only
    // suppressions of the row; the singleton knows its own value, so a third is needed.
    let cell = |v: &[f64]| Interior {
        value: v.iter().sum(),
        contributors: v.len() as u64,
        largest: v.to_vec(),
    };
    let t = grid_table(
        AggregationKind::Sum,
        &[3, 4],
        &[true, true],
        &[
            cell(&[500.0]),
            cell(&[800.0, 10.0, 5.0]),
            cell(&[300.0, 280.0, 250.0, 240.0]),
            cell(&[310.0, 290.0, 260.0, 200.0]),
            cell(&[200.0, 190.0, 180.0, 170.0]),
            cell(&[220.0, 210.0, 190.0, 150.0]),
            cell(&[230.0, 220.0, 210.0, 200.0]),
            cell(&[240.0, 230.0, 220.0, 210.0]),
            cell(&[250.0, 240.0, 230.0, 220.0]),
            cell(&[260.0, 250.0, 240.0, 230.0]),
            cell(&[270.0, 260.0, 250.0, 240.0]),
            cell(&[280.0, 270.0, 260.0, 250.0]),
        ],
    );
    let out = protect(&t, &Settings::default()).unwrap();
    for c in t.constraints() {
        let sup: Vec<usize> = std::iter::once(c.total)
            .chain(c.parts.iter().copied())
            .filter(|&i| out.published.cells[i].status.is_suppressed())
            .collect();
        if let [a, b] = sup[..] {
            let single = |i: usize| t.cells()[i].contributors == 1;
            let primary = |i: usize| out.published.cells[i].status.is_primary();
            let exposed = (single(a) && primary(b)) || (single(b) && primary(a));
            assert!(
                !exposed,
                "singleton next to a primary cell alone in a constraint: {sup:?}"
            );
        }
    }
}

/// The review's counter-example to the singleton heuristic: a 2x4 sum
/// table with all margins, rows d0c00: 59, 38 (one contributor), 77, 85
/// and d0c01: 100, 41 (two), 75, 1 (two). Whatever else is suppressed,
/// the contributor of 38 knows its value exactly; with it, no other
/// primary cell may be narrowed within its protection interval.
#[test]
fn a_single_contributor_knowing_its_value_cannot_narrow_another_cell() {
    let cell = |v: &[f64]| Interior {
        value: v.iter().sum(),
        contributors: v.len() as u64,
        largest: v.to_vec(),
    };
    let t = grid_table(
        AggregationKind::Sum,
        &[2, 4],
        &[true, true],
        &[
            cell(&[15.0, 15.0, 15.0, 14.0]),
            cell(&[38.0]),
            cell(&[20.0, 20.0, 20.0, 17.0]),
            cell(&[22.0, 21.0, 21.0, 21.0]),
            cell(&[25.0, 25.0, 25.0, 25.0]),
            cell(&[21.0, 20.0]),
            cell(&[19.0, 19.0, 19.0, 18.0]),
            cell(&[0.5, 0.5]),
        ],
    );
    let settings = Settings::default();
    let out = protect(&t, &settings).unwrap();
    let statuses: Vec<CellStatus> = out.published.cells.iter().map(|c| c.status).collect();
    let singletons: Vec<usize> = (0..t.cells().len())
        .filter(|&i| t.cells()[i].contributors == 1)
        .collect();
    assert_eq!(singletons.len(), 1);
    for s in singletons {
        assert!(
            statuses[s].is_suppressed(),
            "one contributor is a primary cell"
        );
        let mut known = vec![None; t.cells().len()];
        let value = t.cells()[s].value;
        known[s] = Some((value, value));
        let report = audit_knowing(&t, &settings, &statuses, &known).unwrap();
        let narrowed: Vec<String> = report
            .failures
            .iter()
            .filter(|&&i| i != s)
            .map(|&i| format!("{} in {:?}", t.label(i), report.ranges[i]))
            .collect();
        assert!(
            narrowed.is_empty(),
            "the contributor of {} narrows {narrowed:?} (statuses {statuses:?})",
            t.label(s)
        );
    }
}
