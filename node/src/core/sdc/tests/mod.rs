//! Test-only helpers and test suites.

mod bench;
mod engine_tests;
mod properties;
mod worked_examples;

use super::table::{AggregationKind, CellInput, Coord, LargestContributions, Table};

/// Interior cell data: value, contributors, largest contributions (descending).
#[derive(Debug, Clone)]
pub(super) struct Interior {
    pub(super) value: f64,
    pub(super) contributors: u64,
    pub(super) largest: Vec<f64>,
}

/// Builds a complete grid table over `sizes` (codes `d{dim}c{i}`), adding margins
/// for the dimensions with `totals[d]`; totals get summed values and contributors and
/// the largest contributions of the union.
pub(super) fn grid_table(
    kind: AggregationKind,
    sizes: &[usize],
    totals: &[bool],
    interior: &[Interior],
) -> Table {
    let nd = sizes.len();
    let ext: Vec<usize> = (0..nd).map(|d| sizes[d] + usize::from(totals[d])).collect();
    let count: usize = ext.iter().product();
    let mut cells = Vec::with_capacity(count);
    let mut pos = vec![0usize; nd];
    for _ in 0..count {
        // Collect the interior cells covered by this (possibly total) cell.
        let mut value = 0.0;
        let mut contributors = 0;
        let mut largest: Vec<f64> = Vec::new();
        let mut cover = vec![0usize; nd];
        'cover: loop {
            let mut full = Vec::with_capacity(nd);
            for d in 0..nd {
                full.push(if pos[d] == sizes[d] { cover[d] } else { pos[d] });
            }
            let mut flat = 0;
            for d in 0..nd {
                flat = flat * sizes[d] + full[d];
            }
            let it = &interior[flat];
            value += it.value;
            contributors += it.contributors;
            largest.extend_from_slice(&it.largest);
            let mut d = nd;
            loop {
                if d == 0 {
                    break 'cover;
                }
                d -= 1;
                if pos[d] == sizes[d] {
                    cover[d] += 1;
                    if cover[d] < sizes[d] {
                        break;
                    }
                    cover[d] = 0;
                }
            }
        }
        largest.sort_by(|a, b| b.total_cmp(a));
        largest.truncate(4);
        let coords: Vec<Coord> = (0..nd)
            .map(|d| {
                if pos[d] == sizes[d] {
                    Coord::Total
                } else {
                    Coord::code(format!("d{d}c{:02}", pos[d]))
                }
            })
            .collect();
        let mut cell = CellInput::new(coords, value, contributors);
        if kind.is_magnitude() {
            cell = cell.with_largest(LargestContributions::Values(largest));
        }
        cells.push(cell);
        let mut d = nd;
        while d > 0 {
            d -= 1;
            pos[d] += 1;
            if pos[d] < ext[d] {
                break;
            }
            pos[d] = 0;
        }
    }
    let dims = (0..nd).map(|d| format!("dim{d}")).collect();
    Table::new("ind", "2024", kind, dims, cells).expect("valid generated table")
}

/// Interior count cells: value = contributors.
pub(super) fn counts(values: &[u64]) -> Vec<Interior> {
    values
        .iter()
        .map(|&v| Interior {
            value: v as f64,
            contributors: v,
            largest: Vec::new(),
        })
        .collect()
}
