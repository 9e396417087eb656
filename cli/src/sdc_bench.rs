//! `civex bench --parts sdc`: disclosure control of a 100 x 100 table of
//! counts (`--sdc-size`) with one level of margins (10,201 cells with the totals), about 5%
//! of the interior cells below the threshold; then the full interval audit
//! of the published pattern. Then the same for a table of sums (the
//! threshold rule only), where half the cells below the threshold have a
//! single contributor, who knows its value: each such cell suppressed is
//! audited again with that value known.

use std::time::Instant;

use civex_node::core::sdc::{self, AggregationKind, CellInput, Coord, Settings, Table};

/// Deterministic xorshift64*, so every run protects the same table.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Districts x categories, with row, column and grand totals: counts, or
/// sums of `kind` (each contributor adding 10 to 999).
fn table(size: usize, seed: u64, kind: AggregationKind) -> anyhow::Result<Table> {
    let mut rng = Rng(seed);
    // (value, contributors) per interior cell.
    let interior: Vec<Vec<(u64, u64)>> = (0..size)
        .map(|_| {
            (0..size)
                .map(|_| {
                    let contributors = if rng.next() % 100 < 5 {
                        1 + rng.next() % 2
                    } else {
                        3 + rng.next() % 200
                    };
                    let value = match kind {
                        AggregationKind::Count => contributors,
                        _ => (0..contributors).map(|_| 10 + rng.next() % 990).sum(),
                    };
                    (value, contributors)
                })
                .collect()
        })
        .collect();
    let code = |prefix: &str, i: usize| Coord::code(format!("{prefix}{i:03}"));
    let cell = |d: Coord, c: Coord, (value, contributors): (u64, u64)| {
        CellInput::new(vec![d, c], value as f64, contributors)
    };
    let sum = |cells: &mut dyn Iterator<Item = &(u64, u64)>| {
        cells.fold((0, 0), |(v, n), &(value, count)| (v + value, n + count))
    };
    let mut cells = Vec::with_capacity((size + 1) * (size + 1));
    for (d, row) in interior.iter().enumerate() {
        for (c, &inner) in row.iter().enumerate() {
            cells.push(cell(code("d", d), code("c", c), inner));
        }
        cells.push(cell(code("d", d), Coord::Total, sum(&mut row.iter())));
    }
    for c in 0..size {
        let column = sum(&mut interior.iter().map(|row| &row[c]));
        cells.push(cell(Coord::Total, code("c", c), column));
    }
    let all = sum(&mut interior.iter().flatten());
    cells.push(cell(Coord::Total, Coord::Total, all));
    Ok(Table::new(
        "bench",
        "2025",
        kind,
        vec!["district".into(), "category".into()],
        cells,
    )?)
}

pub(crate) fn run(size: usize) -> anyhow::Result<()> {
    protect_and_audit(size, AggregationKind::Count, Settings::default())?;
    let threshold_only = Settings {
        dominance: None,
        p_percent: None,
        ..Settings::default()
    };
    protect_and_audit(size, AggregationKind::Sum, threshold_only)
}

/// Protects a table of `kind` with `settings` and audits the pattern,
/// printing both times.
fn protect_and_audit(size: usize, kind: AggregationKind, settings: Settings) -> anyhow::Result<()> {
    let table = table(size, 0x5EED, kind)?;
    let start = Instant::now();
    let outcome = sdc::protect(&table, &settings)?;
    let engine = start.elapsed();
    let statuses: Vec<_> = outcome.published.cells.iter().map(|c| c.status).collect();
    let start = Instant::now();
    let report = sdc::audit(&table, &settings, &statuses)?;
    let audit = start.elapsed();
    let primary = statuses.iter().filter(|s| s.is_primary()).count();
    let suppressed = statuses.iter().filter(|s| s.is_suppressed()).count();
    let singles = table.cells().iter().filter(|c| c.contributors == 1).count();
    println!(
        "disclosure control, {size} x {size} {} with margins ({} cells, {singles} with a single contributor): {primary} primary, {suppressed} suppressed in all; engine {:.3} s (target for 100 x 100: under 1 s), full audit {:.3} s (under 10 s), {} cells narrowed",
        match kind {
            AggregationKind::Count => "counts",
            _ => "sums",
        },
        table.cells().len(),
        engine.as_secs_f64(),
        audit.as_secs_f64(),
        report.failures.len()
    );
    anyhow::ensure!(
        report.failures.is_empty(),
        "the audit narrowed protected cells: {:?}",
        report.failures
    );
    Ok(())
}
