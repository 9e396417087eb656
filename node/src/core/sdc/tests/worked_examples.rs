//! Data-driven worked examples from `testdata/*.txt`.
//!
//! Format (one file per example; `#` starts a comment line):
//!
//! ```text
//! indicator: <id>
//! period: <id>
//! kind: count | sum | ratio | mean
//! dimensions: <name>[, <name>...]
//! settings: threshold=3 dominance=2,85 p=10 protection=20,3 rounding=5 secondary=on
//!           (each optional, `off` disables; defaults as in Settings::default())
//! [input]
//! <coords> | <value> | <contributors> [| <largest contributions, comma separated>]
//! [expected]
//! <coords> | <published value or -> | <status>
//! [reasons]
//! <coords> | <local reason>
//! ```
//!
//! Coordinates are joined with `/`; `Total` is the total code. The test renders the
//! engine's output in the same format and compares it exactly with `[expected]` and
//! `[reasons]`; it also runs the full interval audit on the result.

use super::super::engine::{audit, protect};
use super::super::settings::{
    DominanceRule, PPercentRule, ProtectionLevel, RoundingRule, Settings, ThresholdRule,
};
use super::super::table::{AggregationKind, CellInput, Coord, LargestContributions, Table};

/// Loads a worked example; the only place that knows where `testdata/` lives
/// relative to this file (adjust this one path when moving the module).
macro_rules! example {
    ($file:literal) => {
        include_str!(concat!("../testdata/", $file))
    };
}

struct Example {
    table: Table,
    settings: Settings,
    expected: Vec<String>,
    reasons: Vec<String>,
}

fn norm(line: &str) -> String {
    line.split('|')
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" | ")
}

fn parse_settings(spec: &str) -> Settings {
    let mut s = Settings::default();
    for kv in spec.split_whitespace() {
        let (k, v) = kv.split_once('=').expect("key=value");
        let nums = || -> Vec<f64> { v.split(',').map(|x| x.parse().expect("number")).collect() };
        match (k, v) {
            ("threshold", "off") => s.threshold = None,
            ("threshold", _) => {
                s.threshold = Some(ThresholdRule {
                    min_contributors: v.parse().expect("n"),
                })
            }
            ("dominance", "off") => s.dominance = None,
            ("dominance", _) => {
                let n = nums();
                s.dominance = Some(DominanceRule {
                    n: n[0] as usize,
                    k: n[1],
                });
            }
            ("p", "off") => s.p_percent = None,
            ("p", _) => s.p_percent = Some(PPercentRule { p: nums()[0] }),
            ("protection", _) => {
                let n = nums();
                s.threshold_protection = ProtectionLevel {
                    relative_percent: n[0],
                    minimum: n[1],
                };
            }
            ("rounding", "off") => s.rounding = None,
            ("rounding", _) => s.rounding = Some(RoundingRule { base: nums()[0] }),
            ("secondary", v) => s.secondary = v == "on",
            _ => panic!("unknown setting {kv}"),
        }
    }
    s
}

fn parse(text: &str) -> Example {
    let mut header = std::collections::HashMap::new();
    let mut section = "";
    let mut input = Vec::new();
    let mut expected = Vec::new();
    let mut reasons = Vec::new();
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            section = line;
            continue;
        }
        match section {
            "" => {
                let (k, v) = line.split_once(':').expect("header key: value");
                header.insert(k.trim().to_string(), v.trim().to_string());
            }
            "[input]" => input.push(line.to_string()),
            "[expected]" => expected.push(norm(line)),
            "[reasons]" => reasons.push(norm(line)),
            _ => panic!("unknown section {section}"),
        }
    }
    let kind = match header["kind"].as_str() {
        "count" => AggregationKind::Count,
        "sum" => AggregationKind::Sum,
        "ratio" => AggregationKind::Ratio,
        "mean" => AggregationKind::Mean,
        k => panic!("unknown kind {k}"),
    };
    let dims: Vec<String> = header["dimensions"]
        .split(',')
        .map(|d| d.trim().to_string())
        .collect();
    let cells = input
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split('|').map(str::trim).collect();
            let coords = f[0]
                .split('/')
                .map(|c| {
                    if c == "Total" {
                        Coord::Total
                    } else {
                        Coord::code(c)
                    }
                })
                .collect();
            let mut cell = CellInput::new(
                coords,
                f[1].parse().expect("value"),
                f[2].parse().expect("contributors"),
            );
            if let Some(l) = f.get(3) {
                let v = l
                    .split(',')
                    .map(|x| x.trim().parse().expect("contribution"))
                    .collect();
                cell = cell.with_largest(LargestContributions::Values(v));
            }
            cell
        })
        .collect();
    let table =
        Table::new(&header["indicator"], &header["period"], kind, dims, cells).expect("table");
    let settings = parse_settings(header.get("settings").map_or("", String::as_str));
    Example {
        table,
        settings,
        expected,
        reasons,
    }
}

fn run(text: &str) {
    let ex = parse(text);
    let out = protect(&ex.table, &ex.settings).expect("protect");
    let rendered: Vec<String> = out
        .published
        .cells
        .iter()
        .map(|c| {
            let coords: Vec<String> = c.coords.iter().map(ToString::to_string).collect();
            let v = c.value.map_or("-".to_string(), |v| v.to_string());
            norm(&format!(
                "{} | {} | {}",
                coords.join("/"),
                v,
                c.status.name()
            ))
        })
        .collect();
    assert_eq!(rendered, ex.expected, "published table differs");
    let reasons: Vec<String> = out
        .local
        .notes
        .iter()
        .map(|n| norm(&format!("{} | {}", n.label, n.reason)))
        .collect();
    assert_eq!(reasons, ex.reasons, "local reasons differ");
    let statuses: Vec<_> = out.published.cells.iter().map(|c| c.status).collect();
    let report = audit(&ex.table, &ex.settings, &statuses).expect("audit");
    assert!(
        report.failures.is_empty(),
        "audit failures {:?}",
        report.failures
    );
}

#[test]
fn threshold_rule() {
    run(example!("threshold.txt"));
}

#[test]
fn dominance_rule() {
    run(example!("dominance.txt"));
}

#[test]
fn p_percent_rule() {
    run(example!("p_percent.txt"));
}

#[test]
fn secondary_suppression_2d() {
    run(example!("secondary_2d.txt"));
}

#[test]
fn secondary_suppression_of_a_total() {
    run(example!("secondary_total.txt"));
}

#[test]
fn rounding() {
    run(example!("rounding.txt"));
}
