//! `civex bench --parts sdc`: disclosure control of a 100 x 100 table of
//! counts (`--sdc-size`) with one level of margins (10,201 cells with the totals), about 5%
//! of the interior cells below the threshold; then the full interval audit
//! of the published pattern.

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

/// Districts x categories, with row, column and grand totals.
fn table(size: usize, seed: u64) -> anyhow::Result<Table> {
    let mut rng = Rng(seed);
    let interior: Vec<Vec<u64>> = (0..size)
        .map(|_| {
            (0..size)
                .map(|_| {
                    if rng.next() % 100 < 5 {
                        1 + rng.next() % 2
                    } else {
                        3 + rng.next() % 200
                    }
                })
                .collect()
        })
        .collect();
    let code = |prefix: &str, i: usize| Coord::code(format!("{prefix}{i:03}"));
    let cell = |d: Coord, c: Coord, count: u64| CellInput::new(vec![d, c], count as f64, count);
    let mut cells = Vec::with_capacity((size + 1) * (size + 1));
    for (d, row) in interior.iter().enumerate() {
        for (c, &count) in row.iter().enumerate() {
            cells.push(cell(code("d", d), code("c", c), count));
        }
        cells.push(cell(code("d", d), Coord::Total, row.iter().sum()));
    }
    for c in 0..size {
        let column = interior.iter().map(|row| row[c]).sum();
        cells.push(cell(Coord::Total, code("c", c), column));
    }
    let all = interior.iter().flatten().sum();
    cells.push(cell(Coord::Total, Coord::Total, all));
    Ok(Table::new(
        "bench",
        "2025",
        AggregationKind::Count,
        vec!["district".into(), "category".into()],
        cells,
    )?)
}

pub(crate) fn run(size: usize) -> anyhow::Result<()> {
    let table = table(size, 0x5EED)?;
    let settings = Settings::default();
    let start = Instant::now();
    let outcome = sdc::protect(&table, &settings)?;
    let engine = start.elapsed();
    let statuses: Vec<_> = outcome.published.cells.iter().map(|c| c.status).collect();
    let start = Instant::now();
    let report = sdc::audit(&table, &settings, &statuses)?;
    let audit = start.elapsed();
    let primary = statuses.iter().filter(|s| s.is_primary()).count();
    let suppressed = statuses.iter().filter(|s| s.is_suppressed()).count();
    println!(
        "disclosure control, {size} x {size} counts with margins ({} cells): {primary} primary, {suppressed} suppressed in all; engine {:.3} s (target for 100 x 100: under 1 s), full audit {:.3} s (under 10 s), {} cells narrowed",
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
