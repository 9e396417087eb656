//! Audit of a revision of a table with the equations of its earlier
//! versions.
//!
//! Each earlier publish of a table (a version: the whole table of its
//! time, possibly with fewer cells than now) told an attacker its
//! published values and, through its totals, linear equations between its
//! cells. An attacker who assumes that a cell kept its value across
//! versions combines those equations with the revision's. So the revision
//! is audited as one linear program over every version: the current
//! cells, plus for each earlier version a variable for each of its cells
//! that is not *tied* to the current cell at the same coordinates, each
//! version's constraints over its own variables, and the protection
//! intervals of the current primary cells as requirements.
//!
//! An earlier cell is tied (the same variable as the current cell) when
//! the attacker would take it as unchanged: its published interval holds
//! the current true value (a change, if any, cannot be seen), or it was
//! suppressed or noised then (its change cannot be seen at all). Ties of
//! the second kind are only a hypothesis: when the current true values
//! with every tie make a version's system infeasible, some cell did
//! change, and an attacker can tell as much. Ties are then chosen
//! greedily, in table order: the published ones first, then the
//! suppressed ones, each kept while the version's system stays feasible
//! with the true values (a published one is dropped only when every
//! published tie together is infeasible); blocks of them are tried whole
//! and split only when they fail, which keeps the same ties in fewer
//! solves (`keep_greedily`). The work is bounded by
//! [`MAX_TIE_SOLVES`] feasibility solves per audit (a version that told
//! exactly what an earlier one did is audited once); past it, or when a
//! version does not add up even with no tie (its published values are
//! not what this model says they told), the revision is refused rather
//! than published unaudited.

use std::collections::HashSet;

use super::audit::{self, Knowledge};
use super::engine::{knowledge_of, requirements};
use super::error::SdcError;
use super::primary::{self, CellStatus};
use super::settings::Settings;
use super::table::{grid_constraints, Constraint, Coord, Table};

/// Feasibility solves one revision audit may spend choosing ties.
pub const MAX_TIE_SOLVES: usize = 512;

/// One cell of an earlier version of a table.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionCell {
    /// Coordinates, as in the current table.
    pub coords: Vec<Coord>,
    /// The interval that version published for the cell's true value
    /// (exact, or its rounding interval); `None` when it was suppressed
    /// or noised.
    pub told: Option<(f64, f64)>,
}

/// One earlier version of a table: every cell one publish of it stated.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Version {
    /// Its cells, in any order.
    pub cells: Vec<VersionCell>,
}

/// What a version told of one cell, comparable exactly: its coordinates
/// and the bits of its interval.
type Told<'a> = (&'a [Coord], Option<(u64, u64)>);

/// How an earlier cell relates to the current one at its coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tie {
    /// Its published interval holds the current true value.
    Published,
    /// Suppressed or noised then: unchanged as far as anyone can see.
    Hidden,
    /// Published with a value the current one is not: a cell of its own.
    Changed,
}

/// The current primary cells (indices into `table`) an attacker who knows
/// `known` per cell (see [`super::engine::audit_knowing`]) and every
/// earlier version in `versions` could narrow within their protection
/// interval. An earlier cell at coordinates the table lacks is an error.
pub fn audit_revision(
    table: &Table,
    settings: &Settings,
    statuses: &[CellStatus],
    known: &[Option<(f64, f64)>],
    versions: &[Version],
) -> Result<Vec<usize>, SdcError> {
    let mut knowledge = knowledge_of(table, settings, statuses, known)?;
    let findings = primary::evaluate(table, settings)?;
    let mut constraints: Vec<Constraint> = table.constraints().to_vec();
    let (lower, upper) = (settings.lower_bound, settings.upper_bound);
    let mut solves = 0;
    // A version that tells exactly what an earlier one told (the table
    // published again unchanged) adds nothing an attacker did not know.
    let mut seen: HashSet<Vec<Told<'_>>> = HashSet::new();
    for version in versions {
        let told = version.cells.iter().map(|c| {
            let bits = c.told.map(|(lo, hi)| (lo.to_bits(), hi.to_bits()));
            (c.coords.as_slice(), bits)
        });
        if !seen.insert(told.collect()) {
            continue;
        }
        let at: Vec<usize> = version
            .cells
            .iter()
            .map(|c| {
                table
                    .find(&c.coords)
                    .ok_or_else(|| SdcError::MissingCell(super::table::label_of(&c.coords)))
            })
            .collect::<Result<_, _>>()?;
        let coords: Vec<Vec<Coord>> = version.cells.iter().map(|c| c.coords.clone()).collect();
        let structure = if table.kind().is_additive() {
            grid_constraints(&coords)
        } else {
            Vec::new()
        };
        if structure.is_empty() {
            // Without equations a version tells only each cell's own
            // interval, which `known` holds.
            continue;
        }
        let truth: Vec<f64> = at.iter().map(|&i| table.cells()[i].value).collect();
        let ties: Vec<Tie> = version
            .cells
            .iter()
            .zip(&truth)
            .map(|(c, &value)| match c.told {
                Some((lo, hi)) if lo <= value && value <= hi => Tie::Published,
                Some(_) => Tie::Changed,
                None => Tie::Hidden,
            })
            .collect();
        let tied = choose_ties(
            &structure,
            version,
            &truth,
            &ties,
            &at,
            settings,
            &mut solves,
        )?;
        let var: Vec<usize> = version
            .cells
            .iter()
            .enumerate()
            .map(|(j, c)| {
                if tied[j] {
                    at[j]
                } else {
                    knowledge.push(
                        c.told
                            .map_or(Knowledge::Suppressed, |(a, b)| Knowledge::Interval(a, b)),
                    );
                    knowledge.len() - 1
                }
            })
            .collect();
        constraints.extend(structure.iter().map(|c| Constraint {
            total: var[c.total],
            parts: c.parts.iter().map(|&p| var[p]).collect(),
        }));
    }
    audit::unmet_requirements(
        &constraints,
        &knowledge,
        lower,
        upper,
        &requirements(table, &findings),
    )
}

/// The ties of one version (indexed like its cells) that the current true
/// values `truth` leave its system feasible with, chosen as the module
/// documentation says.
fn choose_ties(
    structure: &[Constraint],
    version: &Version,
    truth: &[f64],
    ties: &[Tie],
    at: &[usize],
    settings: &Settings,
    solves: &mut usize,
) -> Result<Vec<bool>, SdcError> {
    let mut feasible_with = |tied: &[bool]| -> Result<bool, SdcError> {
        *solves += 1;
        if *solves > MAX_TIE_SOLVES {
            return Err(SdcError::RevisionUnaudited(format!(
                "the earlier versions of this table leave more ways its suppressed cells could have changed than the audit checks ({MAX_TIE_SOLVES} solves); publish the revision as a new period or indicator edition, or restate the changed cells in fewer revisions"
            )));
        }
        let knowledge: Vec<Knowledge> = version
            .cells
            .iter()
            .enumerate()
            .map(|(j, c)| match (tied[j], c.told) {
                (true, _) => Knowledge::Interval(truth[j], truth[j]),
                (false, Some((a, b))) => Knowledge::Interval(a, b),
                (false, None) => Knowledge::Suppressed,
            })
            .collect();
        audit::feasible(
            structure,
            &knowledge,
            settings.lower_bound,
            settings.upper_bound,
        )
    };
    let every: Vec<bool> = ties.iter().map(|&t| t != Tie::Changed).collect();
    if feasible_with(&every)? {
        return Ok(every);
    }
    // Candidates in table order.
    let mut order: Vec<usize> = (0..ties.len()).collect();
    order.sort_by_key(|&j| at[j]);
    let published: Vec<bool> = ties.iter().map(|&t| t == Tie::Published).collect();
    let mut tied = if feasible_with(&published)? {
        published
    } else {
        let none = vec![false; ties.len()];
        if !feasible_with(&none)? {
            return Err(SdcError::RevisionUnaudited(
                "an earlier version of this table does not add up with the values it published (was it rounded to another base than the one configured now?), so the revision cannot be audited against it".into(),
            ));
        }
        let mut tied = none;
        let published: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&j| ties[j] == Tie::Published)
            .collect();
        keep_greedily(&published, &mut tied, &mut feasible_with)?;
        tied
    };
    let hidden: Vec<usize> = order
        .iter()
        .copied()
        .filter(|&j| ties[j] == Tie::Hidden)
        .collect();
    keep_greedily(&hidden, &mut tied, &mut feasible_with)?;
    Ok(tied)
}

/// Ties each of `candidates` in turn, keeping it while `feasible_with`
/// holds. A block of candidates is tried whole first and split in halves
/// only when it fails, which keeps the same ties as trying them one at a
/// time (a block that is feasible whole is feasible at each step) in far
/// fewer solves when few cells changed.
fn keep_greedily(
    candidates: &[usize],
    tied: &mut [bool],
    feasible_with: &mut impl FnMut(&[bool]) -> Result<bool, SdcError>,
) -> Result<(), SdcError> {
    if candidates.is_empty() {
        return Ok(());
    }
    for &j in candidates {
        tied[j] = true;
    }
    if feasible_with(tied)? {
        return Ok(());
    }
    for &j in candidates {
        tied[j] = false;
    }
    if candidates.len() == 1 {
        return Ok(());
    }
    let (first, second) = candidates.split_at(candidates.len() / 2);
    keep_greedily(first, tied, feasible_with)?;
    keep_greedily(second, tied, feasible_with)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::sdc::table::{AggregationKind, CellInput};

    /// The city (total) and its districts north, south, east, west.
    fn table(values: [f64; 5]) -> Table {
        let coords = [
            Coord::Total,
            Coord::code("north"),
            Coord::code("south"),
            Coord::code("east"),
            Coord::code("west"),
        ];
        let cells = coords
            .into_iter()
            .zip(values)
            .map(|(c, v)| CellInput::new(vec![c], v, v as u64))
            .collect();
        Table::new(
            "jobs",
            "2025",
            AggregationKind::Count,
            vec!["ref_area".into()],
            cells,
        )
        .unwrap()
    }

    /// A version publishing `told` per cell, in the order of [`table`].
    fn version(told: [Option<f64>; 5]) -> Version {
        let t = table([0.0; 5]);
        Version {
            cells: t
                .cells()
                .iter()
                .zip(told)
                .map(|(c, v)| VersionCell {
                    coords: c.coords.clone(),
                    told: v.map(|v| (v, v)),
                })
                .collect(),
        }
    }

    /// City 91 = 1 + 30 + 30 + 30 published without north and south.
    fn first() -> Version {
        version([Some(91.0), None, None, Some(30.0), Some(30.0)])
    }

    fn audit(values: [f64; 5], versions: &[Version]) -> Result<Vec<usize>, SdcError> {
        let t = table(values);
        let statuses = [
            CellStatus::Free,
            CellStatus::SmallCounts,
            CellStatus::Secondary,
            CellStatus::Free,
            CellStatus::Free,
        ];
        audit_revision(&t, &Settings::default(), &statuses, &[], versions)
    }

    #[test]
    fn a_changed_suppressed_cell_drops_its_tie_and_the_rest_still_count() {
        // South corrected to 40: with every tie version 1 says 91 = 101.
        // The tie of south goes; north's stays (north + south then = 31,
        // north within [0, 31]: protected).
        assert_eq!(
            audit([101.0, 1.0, 40.0, 30.0, 30.0], &[first()]),
            Ok(vec![])
        );
        // Unchanged, north + south = 31 in both: still protected.
        assert_eq!(audit([91.0, 1.0, 30.0, 30.0, 30.0], &[first()]), Ok(vec![]));
    }

    #[test]
    fn too_many_ways_to_have_changed_refuse_rather_than_go_unaudited() {
        // Each version costs five feasibility solves (every tie, the
        // published ties, both suppressed cells, then each alone). They
        // differ (east told within a hair of 30), so each counts.
        let versions: Vec<Version> = (0..MAX_TIE_SOLVES / 5 + 1)
            .map(|k| {
                let mut v = first();
                let hair = k as f64 * 1e-9;
                v.cells[3].told = Some((30.0 - hair, 30.0 + hair));
                v
            })
            .collect();
        let err = audit([101.0, 1.0, 40.0, 30.0, 30.0], &versions).unwrap_err();
        assert!(
            matches!(&err, SdcError::RevisionUnaudited(m) if m.contains("solves")),
            "{err:?}"
        );
        assert_eq!(
            audit(
                [101.0, 1.0, 40.0, 30.0, 30.0],
                &versions[..MAX_TIE_SOLVES / 5]
            ),
            Ok(vec![])
        );
    }

    #[test]
    fn a_version_published_again_unchanged_costs_no_more_solves() {
        let again = vec![first(); 10 * MAX_TIE_SOLVES];
        let values = [101.0, 1.0, 40.0, 30.0, 30.0];
        assert_eq!(audit(values, &again), audit(values, &[first()]));
        assert_eq!(audit(values, &again), Ok(vec![]));
    }

    #[test]
    fn a_version_that_does_not_add_up_refuses() {
        // 50 cannot be 30 + 30 plus two counts: what this version told is
        // not what the model says (another rounding base, say).
        let odd = version([Some(50.0), None, None, Some(30.0), Some(30.0)]);
        let err = audit([101.0, 1.0, 40.0, 30.0, 30.0], &[odd]).unwrap_err();
        assert!(
            matches!(&err, SdcError::RevisionUnaudited(m) if m.contains("does not add up")),
            "{err:?}"
        );
    }

    #[test]
    fn blocks_keep_the_ties_one_at_a_time_would() {
        // Feasible unless a forbidden cell or both of a conflicting pair
        // are tied (a subset of a feasible set is feasible, as for an LP).
        let forbidden = [3usize, 11];
        let conflicts = [(0usize, 5usize), (6, 7), (2, 12), (9, 10)];
        let mut feasible = |tied: &[bool]| -> Result<bool, SdcError> {
            Ok(!forbidden.iter().any(|&j| tied[j])
                && !conflicts.iter().any(|&(a, b)| tied[a] && tied[b]))
        };
        let candidates: Vec<usize> = (0..13).collect();
        let mut blocks = vec![false; 13];
        keep_greedily(&candidates, &mut blocks, &mut feasible).unwrap();
        let mut one_by_one = vec![false; 13];
        for &j in &candidates {
            one_by_one[j] = true;
            if !feasible(&one_by_one).unwrap() {
                one_by_one[j] = false;
            }
        }
        assert_eq!(blocks, one_by_one);
    }
}
