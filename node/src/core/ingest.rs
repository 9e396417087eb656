//! Ingest: indicator rows from CSV or JSON files, their validation against
//! the catalog, and disclosure control: rows become tables (one indicator
//! and period, cells over the reference area and the indicator's
//! breakdown), each protected by the disclosure-control engine before
//! anything is signed.
//!
//! Contributor counts and largest contributions exist only here: they
//! decide suppression and are dropped before anything is signed. No error
//! message repeats them.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use civex_proto::v1::{
    ConfidentialityStatus, DisclosureRules, FunctionalArea, IndicatorBatch, Observation,
    ObservationStatus, PrivacyDebit, PublishGroup, RuleParameter,
};
use prost::Message;

use super::catalog::{check_token, Catalog, Indicator, Subjects};
use super::period::Period;
use super::policy::Policy;
use super::sdc::{
    self, noise::publish_cost, table::label_of, AggregationKind, AppliedParameters, CellInput,
    CellStatus, Coord, LargestContributions, NoiseSeed, Table,
};

/// Name of the rule set applied by this ingest.
pub const RULE_SET_NAME: &str = "civex-sdc";
/// Version of that rule set.
pub const RULE_SET_VERSION: &str = "2";
/// Default threshold: cells with fewer contributors are suppressed.
pub const DEFAULT_MIN_CONTRIBUTORS: u32 = 3;

/// Columns a row must have.
pub const REQUIRED_COLUMNS: [&str; 4] = ["indicator", "ref_area", "period", "value"];
/// Columns a row may have.
pub const OPTIONAL_COLUMNS: [&str; 9] = [
    "catalog_edition",
    "area",
    "unit",
    "contributors",
    "breakdown",
    "largest_values",
    "largest_shares",
    "obs_status",
    "method_notes",
];

/// One input row: a cell of a table, with its disclosure-control inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct InputRow {
    /// Line in the source file (0 when it did not come from a file).
    pub line: u64,
    /// Indicator code.
    pub indicator: String,
    /// Catalog edition; empty means the one edition that has the code.
    pub catalog_edition: String,
    /// Functional area; unspecified means the catalog's.
    pub area: FunctionalArea,
    /// Reference area.
    pub ref_area: String,
    /// ISO 8601 period.
    pub period: String,
    /// The value.
    pub value: f64,
    /// Unit; empty means the catalog's.
    pub unit: String,
    /// Observation status.
    pub obs_status: ObservationStatus,
    /// Method notes.
    pub method_notes: String,
    /// Contributors behind the value (ingest-only).
    pub contributors: Option<u64>,
    /// Breakdown category as `dimension=code`; empty for the total.
    pub breakdown: String,
    /// Largest contributions (ingest-only).
    pub largest: Option<LargestContributions>,
}

impl InputRow {
    /// A row with the catalog's area and unit, no breakdown and no largest
    /// contributions.
    pub fn new(indicator: &str, ref_area: &str, period: &str, value: f64) -> Self {
        Self {
            line: 0,
            indicator: indicator.to_owned(),
            catalog_edition: String::new(),
            area: FunctionalArea::Unspecified,
            ref_area: ref_area.to_owned(),
            period: period.to_owned(),
            value,
            unit: String::new(),
            obs_status: ObservationStatus::Normal,
            method_notes: String::new(),
            contributors: None,
            breakdown: String::new(),
            largest: None,
        }
    }
}

/// What is wrong with a row, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{column}: {message}", location(*.row, *.line))]
pub struct RowError {
    /// 1-based row number (0 for the file as a whole).
    pub row: usize,
    /// Source line, when known.
    pub line: u64,
    /// Column at fault.
    pub column: String,
    /// What is wrong.
    pub message: String,
}

fn location(row: usize, line: u64) -> String {
    match (row, line) {
        (_, line) if line > 0 => format!("{line}: "),
        (0, _) => String::new(),
        (row, _) => format!("row {row}: "),
    }
}

impl RowError {
    fn new(row: usize, line: u64, column: &str, message: impl Into<String>) -> Self {
        Self {
            row,
            line,
            column: column.to_owned(),
            message: message.into(),
        }
    }
}

/// Parses a functional area by number (1-7) or slug.
pub fn parse_area(text: &str) -> Result<FunctionalArea, String> {
    let area = match text.trim().to_ascii_lowercase().as_str() {
        "1" | "public-services" => FunctionalArea::PublicServices,
        "2" | "economy" => FunctionalArea::Economy,
        "3" | "governance" => FunctionalArea::Governance,
        "4" | "environment" => FunctionalArea::Environment,
        "5" | "government-effectiveness" => FunctionalArea::GovernmentEffectiveness,
        "6" | "infrastructure" => FunctionalArea::Infrastructure,
        "7" | "development-guarantee" => FunctionalArea::DevelopmentGuarantee,
        _ => {
            return Err(format!(
                "unknown functional area {text:?} (1-7 or one of: {})",
                AREA_SLUGS.join(", ")
            ))
        }
    };
    Ok(area)
}

/// Slugs of the seven areas, in order.
pub const AREA_SLUGS: [&str; 7] = [
    "public-services",
    "economy",
    "governance",
    "environment",
    "government-effectiveness",
    "infrastructure",
    "development-guarantee",
];

/// The slug of an area, "unspecified" for none.
pub fn area_slug(area: i32) -> &'static str {
    match area {
        1..=7 => AREA_SLUGS[(area - 1) as usize],
        _ => "unspecified",
    }
}

/// Parses an observation status word.
pub fn parse_obs_status(text: &str) -> Result<ObservationStatus, String> {
    Ok(match text.trim().to_ascii_lowercase().as_str() {
        "" | "normal" | "a" => ObservationStatus::Normal,
        "estimated" | "e" => ObservationStatus::Estimated,
        "provisional" | "p" => ObservationStatus::Provisional,
        "break" | "b" => ObservationStatus::Break,
        _ => {
            return Err(format!(
                "unknown observation status {text:?} (normal, estimated, provisional, break)"
            ))
        }
    })
}

/// Parses a list of numbers separated by `;` (largest contributions).
fn parse_numbers(text: &str) -> Result<Vec<f64>, String> {
    text.split(';')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| "not a list of numbers separated by \";\"".to_owned())
        })
        .collect()
}

fn row_from_fields(
    row: usize,
    line: u64,
    fields: &HashMap<&str, String>,
) -> Result<InputRow, RowError> {
    let err = |column: &str, message: String| RowError::new(row, line, column, message);
    let text = |column: &str| fields.get(column).cloned().unwrap_or_default();
    let value_text = text("value");
    let value: f64 = value_text
        .trim()
        .parse()
        .map_err(|_| err("value", "not a number".to_owned()))?;
    let contributors = match text("contributors").trim() {
        "" => None,
        count => Some(count.parse::<u64>().map_err(|_| {
            err(
                "contributors",
                format!("not a whole number of contributors from 0 to {}", u64::MAX),
            )
        })?),
    };
    let area = match text("area").trim() {
        "" => FunctionalArea::Unspecified,
        area => parse_area(area).map_err(|m| err("area", m))?,
    };
    // Never echo these columns: they are disclosure-control inputs.
    let values = parse_numbers(&text("largest_values")).map_err(|m| err("largest_values", m))?;
    let shares = parse_numbers(&text("largest_shares")).map_err(|m| err("largest_shares", m))?;
    let largest = match (values.is_empty(), shares.is_empty()) {
        (true, true) => None,
        (false, true) => Some(LargestContributions::Values(values)),
        (true, false) => Some(LargestContributions::Shares(shares)),
        (false, false) => {
            return Err(err(
                "largest_shares",
                "give largest_values or largest_shares, not both".into(),
            ))
        }
    };
    Ok(InputRow {
        line,
        indicator: text("indicator").trim().to_owned(),
        catalog_edition: text("catalog_edition").trim().to_owned(),
        area,
        ref_area: text("ref_area").trim().to_owned(),
        period: text("period").trim().to_owned(),
        value,
        unit: text("unit").trim().to_owned(),
        obs_status: parse_obs_status(&text("obs_status")).map_err(|m| err("obs_status", m))?,
        method_notes: text("method_notes"),
        contributors,
        breakdown: text("breakdown").trim().to_owned(),
        largest,
    })
}

fn check_columns<'a>(
    columns: impl IntoIterator<Item = &'a str>,
    line: u64,
) -> Result<(), RowError> {
    let mut seen = HashSet::new();
    for column in columns {
        if !REQUIRED_COLUMNS.contains(&column) && !OPTIONAL_COLUMNS.contains(&column) {
            return Err(RowError::new(
                0,
                line,
                column,
                format!(
                    "unknown column (allowed: {}, {}); no column may carry anything else",
                    REQUIRED_COLUMNS.join(", "),
                    OPTIONAL_COLUMNS.join(", ")
                ),
            ));
        }
        if !seen.insert(column) {
            return Err(RowError::new(0, line, column, "column appears twice"));
        }
    }
    if let Some(missing) = REQUIRED_COLUMNS.iter().find(|c| !seen.contains(**c)) {
        return Err(RowError::new(
            0,
            line,
            missing,
            "required column is missing",
        ));
    }
    Ok(())
}

/// The line (1-based) a CSV record starts on, from its byte offset: csv's
/// own line count stops before a CRLF's `\n` and before skipped blank
/// lines. Records come in order, so the count goes on from the last one.
struct LineOf<'a> {
    text: &'a [u8],
    at: usize,
    line: u64,
}

impl<'a> LineOf<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            text: text.as_bytes(),
            at: 0,
            line: 1,
        }
    }

    fn line_of(&mut self, byte: u64) -> u64 {
        let mut start = usize::try_from(byte).map_or(self.text.len(), |b| b.min(self.text.len()));
        while start < self.text.len() && matches!(self.text[start], b'\r' | b'\n') {
            start += 1;
        }
        if start < self.at {
            (self.at, self.line) = (0, 1);
        }
        self.line += self.text[self.at..start]
            .iter()
            .filter(|b| **b == b'\n')
            .count() as u64;
        self.at = start;
        self.line
    }
}

/// Parses CSV with a header row.
pub fn parse_csv(text: &str) -> Result<Vec<InputRow>, RowError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|err| RowError::new(0, 1, "header", err.to_string()))?
        .clone();
    let header_names: Vec<&str> = headers.iter().map(str::trim).collect();
    check_columns(header_names.iter().copied(), 1)?;
    let mut rows = Vec::new();
    let mut lines = LineOf::new(text);
    for (index, record) in reader.records().enumerate() {
        let record = record.map_err(|err| {
            let line = err.position().map_or(0, |p| lines.line_of(p.byte()));
            let message = match err.kind() {
                csv::ErrorKind::UnequalLengths {
                    expected_len, len, ..
                } => {
                    format!("row has {len} fields, the header has {expected_len}")
                }
                _ => err.to_string(),
            };
            RowError::new(index + 1, line, "row", message)
        })?;
        let line = record.position().map_or(0, |p| lines.line_of(p.byte()));
        let fields: HashMap<&str, String> = header_names
            .iter()
            .copied()
            .zip(record.iter().map(str::to_owned))
            .collect();
        rows.push(row_from_fields(index + 1, line, &fields)?);
    }
    Ok(rows)
}

/// Parses a JSON array of row objects. Each object's line is found by a
/// scan for the top-level array elements, so errors name the line.
pub fn parse_json(text: &str) -> Result<Vec<InputRow>, RowError> {
    // A byte order mark, as some editors write, is not JSON.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let value: serde_json::Value = serde_json::from_str(text).map_err(|err| {
        let line = err.line() as u64;
        // serde_json's message ends with its position: the line is named
        // already, the column (in characters) is said here, so a file of
        // one long line is no riddle.
        let message = err.to_string();
        let message = message
            .rsplit_once(" at line ")
            .map_or(message.as_str(), |(m, _)| m)
            .to_owned();
        RowError::new(
            0,
            line,
            "json",
            format!("{message} (at character {})", err.column()),
        )
    })?;
    let serde_json::Value::Array(items) = value else {
        return Err(RowError::new(
            0,
            1,
            "json",
            "expected an array of row objects",
        ));
    };
    let lines = element_lines(text);
    let repeated: Vec<RepeatedKey> = serde_json::from_str(text).unwrap_or_default();
    let mut rows = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let line = lines.get(index).copied().unwrap_or(0);
        if let Some(RepeatedKey(Some(key))) = repeated.get(index) {
            return Err(RowError::new(index + 1, line, key, "column appears twice"));
        }
        let serde_json::Value::Object(object) = item else {
            return Err(RowError::new(
                index + 1,
                line,
                "json",
                "row is not an object",
            ));
        };
        check_columns(object.keys().map(String::as_str), line).map_err(|err| RowError {
            row: index + 1,
            ..err
        })?;
        let mut fields = HashMap::new();
        for (key, value) in &object {
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Null => String::new(),
                serde_json::Value::Array(items)
                    if key.starts_with("largest_") && items.iter().all(|i| i.is_number()) =>
                {
                    items
                        .iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(";")
                }
                _ if key == "contributors" || key.starts_with("largest_") => {
                    return Err(RowError::new(
                        index + 1,
                        line,
                        key,
                        format!(
                            "expected {}, found another JSON type",
                            if key == "contributors" {
                                "a whole number"
                            } else {
                                "a list of numbers"
                            }
                        ),
                    ))
                }
                // Named by type only: a value may be a count of contributors.
                other => {
                    return Err(RowError::new(
                        index + 1,
                        line,
                        key,
                        format!("expected a string or number, found {}", json_type(other)),
                    ))
                }
            };
            fields.insert(key.as_str(), text);
        }
        rows.push(row_from_fields(index + 1, line, &fields)?);
    }
    Ok(rows)
}

/// The JSON type of `value`, for messages that must not repeat it.
fn json_type(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The first key an element of a JSON array repeats, if it is an object
/// that does: `serde_json::Value` keeps only the last of repeated keys.
struct RepeatedKey(Option<String>);

impl<'de> serde::Deserialize<'de> for RepeatedKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = RepeatedKey;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RepeatedKey, A::Error> {
                let mut seen = HashSet::new();
                let mut repeated = None;
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    if !seen.insert(key.clone()) && repeated.is_none() {
                        repeated = Some(key);
                    }
                }
                Ok(RepeatedKey(repeated))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RepeatedKey, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(RepeatedKey(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<RepeatedKey, E> {
                Ok(RepeatedKey(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<RepeatedKey, E> {
                Ok(RepeatedKey(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<RepeatedKey, E> {
                Ok(RepeatedKey(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<RepeatedKey, E> {
                Ok(RepeatedKey(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<RepeatedKey, E> {
                Ok(RepeatedKey(None))
            }
            fn visit_unit<E>(self) -> Result<RepeatedKey, E> {
                Ok(RepeatedKey(None))
            }
        }
        deserializer.deserialize_any(Keys)
    }
}

/// Line (1-based) where each element of the top-level JSON array starts.
fn element_lines(text: &str) -> Vec<u64> {
    let mut lines = Vec::new();
    let (mut line, mut depth, mut in_string, mut escaped, mut expect_element) =
        (1u64, 0u32, false, false, false);
    for ch in text.chars() {
        if ch == '\n' {
            line += 1;
        }
        if in_string {
            match (escaped, ch) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if ch.is_whitespace() {
            continue;
        }
        if expect_element && depth == 1 && ch != ']' {
            lines.push(line);
            expect_element = false;
        }
        match ch {
            '"' => in_string = true,
            '[' | '{' => {
                depth += 1;
                if depth == 1 {
                    expect_element = true;
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            ',' if depth == 1 => expect_element = true,
            _ => {}
        }
    }
    lines
}

/// What an ingest needs to know about the node.
#[derive(Debug, Clone, Copy)]
pub struct IngestContext<'a> {
    /// This node's origin id.
    pub origin: &'a str,
    /// Configured district names.
    pub districts: &'a [String],
    /// The catalog rows are checked against.
    pub catalog: &'a Catalog,
    /// Disclosure-control settings per indicator.
    pub policy: &'a Policy,
}

/// A cell of a table already in the own feed (current, superseded or
/// retracted: an attacker knows them all).
#[derive(Debug, Clone, PartialEq)]
pub struct EarlierCell {
    /// Reference area.
    pub ref_area: String,
    /// Breakdown.
    pub breakdown: String,
    /// Whether its latest version was suppressed.
    pub suppressed: bool,
    /// The intervals its published versions tell an attacker, oldest
    /// first: superseded and retracted versions too (none for a version
    /// suppressed or noised).
    pub known: Vec<(f64, f64)>,
}

impl EarlierCell {
    /// `newer`, a later version of this cell, becomes its latest; what the
    /// earlier versions told stays known.
    pub fn supersede(&mut self, newer: EarlierCell) {
        let mut known = std::mem::take(&mut self.known);
        known.extend(newer.known.iter().copied());
        *self = EarlierCell { known, ..newer };
    }
}

/// One cell of one earlier version of a table.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionCell {
    /// Reference area.
    pub ref_area: String,
    /// Breakdown.
    pub breakdown: String,
    /// Whether that version suppressed it.
    pub suppressed: bool,
    /// The interval that version told an attacker (exact value, rounding
    /// interval); `None` when suppressed or noised.
    pub known: Option<(f64, f64)>,
}

/// One publish of a table already in the own feed (current, superseded or
/// retracted): a revision restates every cell, so a version is the whole
/// table of its time, possibly with fewer cells than now.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EarlierVersion {
    /// Its cells, in any order.
    pub cells: Vec<VersionCell>,
}

/// A table's versions in the own feed, oldest first, and its cells, each
/// with what all its versions told and the status of its latest: kept up
/// to date as versions come, so a publish costs the same however often
/// the table was revised before.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableHistory {
    versions: Vec<EarlierVersion>,
    cells: Vec<EarlierCell>,
    /// Where each cell (reference area, breakdown) is in `cells`.
    at: HashMap<(String, String), usize>,
}

impl TableHistory {
    /// The history of `versions`, oldest first.
    pub fn of(versions: Vec<EarlierVersion>) -> Self {
        let mut history = Self::default();
        for version in versions {
            history.push(version);
        }
        history
    }

    /// The versions, oldest first.
    pub fn versions(&self) -> &[EarlierVersion] {
        &self.versions
    }

    /// The cells of all versions, in the order they first came.
    pub fn cells(&self) -> &[EarlierCell] {
        &self.cells
    }

    /// Adds a later version.
    pub fn push(&mut self, version: EarlierVersion) {
        self.merge(&version.cells);
        self.versions.push(version);
    }

    /// Adds `cells` to the latest version (the next part of its publish
    /// group), or as a version of its own if there is none.
    pub fn extend_latest(&mut self, cells: Vec<VersionCell>) {
        self.merge(&cells);
        match self.versions.last_mut() {
            Some(latest) => latest.cells.extend(cells),
            None => self.versions.push(EarlierVersion { cells }),
        }
    }

    fn merge(&mut self, cells: &[VersionCell]) {
        for cell in cells {
            let version = EarlierCell {
                ref_area: cell.ref_area.clone(),
                breakdown: cell.breakdown.clone(),
                suppressed: cell.suppressed,
                known: cell.known.into_iter().collect(),
            };
            let key = (cell.ref_area.clone(), cell.breakdown.clone());
            match self.at.get(&key) {
                Some(&i) => self.cells[i].supersede(version),
                None => {
                    self.at.insert(key, self.cells.len());
                    self.cells.push(version);
                }
            }
        }
    }
}

/// What the own feed already holds, as the sequencer sees it (durable
/// entries and entries signed but not yet durable).
pub trait FeedView {
    /// Every version of (indicator, edition, period) published so far,
    /// oldest first.
    fn earlier_versions(
        &mut self,
        indicator: &str,
        edition: &str,
        period: &str,
    ) -> Result<Arc<TableHistory>, String>;
    /// Privacy budget spent on (indicator, edition, period), in 1e-9 rho.
    fn spent_nanos(&mut self, indicator: &str, edition: &str, period: &str) -> Result<u64, String>;
}

/// Where the noise of a publish comes from.
pub enum Noise<'a> {
    /// Publish: the seed of each table (indicator, edition, period);
    /// `None` when the node has no noise key.
    Seeded(&'a dyn Fn(&str, &str, &str) -> Option<NoiseSeed>),
    /// Preview: no noise is drawn; values are shown before noise.
    Preview,
}

/// One cell as it would be published, with the local reason for its status.
#[derive(Debug, Clone, PartialEq)]
pub struct CellReport {
    /// Indicator code.
    pub indicator: String,
    /// Catalog edition.
    pub edition: String,
    /// Reference area.
    pub ref_area: String,
    /// Period.
    pub period: String,
    /// Breakdown.
    pub breakdown: String,
    /// Status.
    pub status: CellStatus,
    /// Published value (before noise in a preview); `None` when suppressed.
    pub value: Option<f64>,
    /// Why it is suppressed (local only: may repeat contributor counts).
    pub reason: String,
}

/// The privacy budget of one noised table.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetLine {
    /// Indicator code.
    pub indicator: String,
    /// Catalog edition.
    pub edition: String,
    /// Period.
    pub period: String,
    /// rho this publish spends.
    pub needed: f64,
    /// rho spent before.
    pub spent: f64,
    /// The budget.
    pub limit: f64,
}

/// A protected batch ready to sign, and what the operator may see of it.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedBatch {
    /// The payload.
    pub batch: IndicatorBatch,
    /// Cells published with a value.
    pub published: u32,
    /// Cells suppressed.
    pub suppressed: u32,
    /// Every cell with its reason, in payload order (local only).
    pub report: Vec<CellReport>,
    /// Each rule set of `batch.rules` with its secret parameters too (local only).
    pub full_rules: Vec<DisclosureRules>,
    /// Budget per noised table.
    pub budget: Vec<BudgetLine>,
    /// Why the publish must be refused although every row is valid
    /// (budget exhausted, an earlier version of a table would reveal a
    /// suppressed cell); nothing may be published then.
    pub refusal: Option<String>,
}

/// Why rows could not be prepared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// A row (or the rows as a whole) is wrong.
    #[error(transparent)]
    Row(#[from] RowError),
    /// The own feed could not be read.
    #[error("reading the own feed: {0}")]
    Feed(String),
}

fn check_text(text: &str, max: usize, what: &str) -> Result<(), String> {
    if text.len() > max {
        return Err(format!("{what} is longer than {max} bytes"));
    }
    if text.chars().any(char::is_control) {
        return Err(format!("{what} holds a control character"));
    }
    Ok(())
}

/// Splits a breakdown `dimension=code[;dimension=code...]` (slugs, the
/// dimensions in alphabetical order, so that one cell has one key); a
/// dimension not named is its total, and empty is the total of all.
fn parse_breakdown(text: &str) -> Result<Vec<(&str, &str)>, String> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for part in text.split(';') {
        let (dimension, code) = part.split_once('=').ok_or_else(|| {
            format!("breakdown {text:?} is not dimension=code[;dimension=code], e.g. sector=retail")
        })?;
        for name in [dimension, code] {
            super::ids::check_slug(name)
                .map_err(|m| format!("breakdown {text:?}: {name:?} {m}"))?;
        }
        if pairs.last().is_some_and(|(last, _)| *last >= dimension) {
            return Err(format!(
                "breakdown {text:?}: name each dimension once, in alphabetical order"
            ));
        }
        pairs.push((dimension, code));
    }
    Ok(pairs)
}

/// A validated row and where it sits in its table.
struct Cell<'r> {
    row: &'r InputRow,
    /// 1-based position of the row in the input.
    index: usize,
    area: FunctionalArea,
    unit: String,
    /// District (`None`: the city as a whole).
    district: Option<&'r str>,
    /// Breakdown categories by dimension.
    breakdown: Vec<(&'r str, &'r str)>,
    /// Coordinates: reference area, then each breakdown dimension.
    coords: Vec<Coord>,
}

/// The rows of one indicator and period.
struct TableRows<'r> {
    indicator: &'r Indicator,
    period: String,
    /// Breakdown dimensions named by any row, in alphabetical order.
    dimensions: Vec<&'r str>,
    cells: Vec<Cell<'r>>,
}

fn validate<'r>(
    context: &IngestContext<'r>,
    rows: &'r [InputRow],
) -> Result<Vec<TableRows<'r>>, RowError> {
    if rows.is_empty() {
        return Err(RowError::new(0, 0, "rows", "no rows to publish"));
    }
    let mut tables: Vec<TableRows<'r>> = Vec::new();
    let mut seen_keys = HashSet::new();
    for (index, row) in rows.iter().enumerate() {
        let err =
            |column: &str, message: String| RowError::new(index + 1, row.line, column, message);
        check_token(&row.indicator, "indicator code").map_err(|m| err("indicator", m))?;
        let edition = (!row.catalog_edition.is_empty()).then_some(row.catalog_edition.as_str());
        let indicator = context.catalog.find(&row.indicator, edition).map_err(|m| {
            err(
                if edition.is_some() {
                    "catalog_edition"
                } else {
                    "indicator"
                },
                m,
            )
        })?;
        let area = match row.area {
            FunctionalArea::Unspecified => indicator.area,
            area if area == indicator.area => area,
            area => {
                return Err(err(
                    "area",
                    format!(
                        "{} is in area {} in the catalog, not {}",
                        row.indicator,
                        area_slug(indicator.area as i32),
                        area_slug(area as i32)
                    ),
                ))
            }
        };
        let district = if row.ref_area == context.origin {
            None
        } else {
            match row.ref_area.split_once('/') {
                Some((origin, district))
                    if origin == context.origin
                        && context.districts.iter().any(|d| d == district) =>
                {
                    Some(district)
                }
                _ => {
                    let known = std::iter::once(context.origin.to_owned())
                        .chain(
                            context
                                .districts
                                .iter()
                                .map(|d| format!("{}/{d}", context.origin)),
                        )
                        .collect::<Vec<_>>()
                        .join(", ");
                    return Err(err(
                        "ref_area",
                        format!("unknown reference area {:?} (known: {known})", row.ref_area),
                    ));
                }
            }
        };
        Period::parse(&row.period).map_err(|m| err("period", m))?;
        indicator
            .frequency
            .check(&row.period)
            .map_err(|m| err("period", m))?;
        if !row.value.is_finite() {
            return Err(err("value", format!("value {} is not finite", row.value)));
        }
        // No value is repeated: for a count it is a number of contributors.
        if indicator.kind.is_additive() && row.value < 0.0 {
            return Err(err(
                "value",
                format!(
                    "value is negative; {} is a {} (0 or more)",
                    row.indicator,
                    indicator.kind.name()
                ),
            ));
        }
        if indicator.kind == AggregationKind::Count && row.value.fract() != 0.0 {
            return Err(err(
                "value",
                format!("value is not a whole number; {} is a count", row.indicator),
            ));
        }
        let unit = if row.unit.is_empty() {
            indicator.unit.clone()
        } else if row.unit == indicator.unit {
            row.unit.clone()
        } else {
            return Err(err(
                "unit",
                format!(
                    "unit {:?} does not match the catalog's {:?} for {}",
                    row.unit, indicator.unit, row.indicator
                ),
            ));
        };
        if row.contributors.is_none() && indicator.subjects != Subjects::Public {
            return Err(err(
                "contributors",
                format!(
                    "missing; {} is computed from records about {}, so disclosure control needs the number of contributors",
                    row.indicator,
                    indicator.subjects.name()
                ),
            ));
        }
        if indicator.kind == AggregationKind::Count
            && row.contributors.is_some_and(|c| c as f64 > row.value)
        {
            return Err(err(
                "contributors",
                format!(
                    "more contributors than the count itself; for a count such as {} the contributors are what is counted",
                    row.indicator
                ),
            ));
        }
        // Noise on a count holds only if no contributor adds more than the
        // clamp bound (1 by default: each is counted once).
        let count_noise = (indicator.kind == AggregationKind::Count)
            .then(|| context.policy.resolve(indicator).settings.noise)
            .flatten();
        if let (Some(noise), Some(contributors)) = (count_noise, row.contributors) {
            if row.value > contributors as f64 * noise.clamp_bound as f64 {
                return Err(err(
                    "contributors",
                    format!(
                        "{}'s noise assumes no contributor adds more than its clamp bound to the count (disclosure.indicator clamp_bound), and this count is larger than that allows: raise clamp_bound, or count each contributor at most that often",
                        row.indicator
                    ),
                ));
            }
        }
        let noise = (indicator.kind == AggregationKind::Sum)
            .then(|| context.policy.resolve(indicator).settings.noise)
            .flatten();
        if let Some(noise) = noise {
            // The noise protects a sum only if no contribution is above the
            // clamp bound: check it, without repeating any contribution.
            let largest = match &row.largest {
                Some(LargestContributions::Values(values)) => {
                    if values.iter().any(|v| !v.is_finite() || *v < 0.0) {
                        return Err(err(
                            "largest_values",
                            "contributions must be finite and not negative".into(),
                        ));
                    }
                    values.iter().copied().fold(0.0, f64::max)
                }
                Some(LargestContributions::Shares(shares)) => {
                    if shares.iter().any(|s| !(0.0..=1.0).contains(s)) {
                        return Err(err("largest_shares", "shares must lie in [0, 1]".into()));
                    }
                    shares.iter().copied().fold(0.0, f64::max) * row.value.abs()
                }
                None => {
                    return Err(err(
                        "largest_values",
                        format!(
                            "missing; {} has noise, which protects it only if no contribution is above its clamp bound: give the largest contributions",
                            row.indicator
                        ),
                    ))
                }
            };
            if largest > noise.clamp_bound as f64 {
                return Err(err(
                    "largest_values",
                    format!(
                        "a contribution is above the clamp bound of {}'s noise (disclosure.indicator clamp_bound): clamp each contribution before summing",
                        row.indicator
                    ),
                ));
            }
        }
        check_text(&row.method_notes, 1024, "method notes").map_err(|m| err("method_notes", m))?;
        let breakdown = parse_breakdown(&row.breakdown).map_err(|m| err("breakdown", m))?;
        let key = (
            indicator.code.clone(),
            indicator.edition.clone(),
            row.ref_area.clone(),
            row.period.clone(),
            row.breakdown.clone(),
        );
        if !seen_keys.insert(key) {
            return Err(err(
                "indicator",
                format!(
                    "{} for {} in {}{} appears twice in this batch",
                    row.indicator,
                    row.ref_area,
                    row.period,
                    if row.breakdown.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", row.breakdown)
                    }
                ),
            ));
        }
        let position = tables
            .iter()
            .position(|t| std::ptr::eq(t.indicator, indicator) && t.period == row.period);
        let table = match position {
            Some(p) => &mut tables[p],
            None => {
                tables.push(TableRows {
                    indicator,
                    period: row.period.clone(),
                    dimensions: Vec::new(),
                    cells: Vec::new(),
                });
                tables.last_mut().expect("just pushed")
            }
        };
        for (dimension, _) in &breakdown {
            if let Err(at) = table.dimensions.binary_search(dimension) {
                table.dimensions.insert(at, dimension);
            }
        }
        table.cells.push(Cell {
            row,
            index: index + 1,
            area,
            unit,
            district,
            breakdown,
            coords: Vec::new(),
        });
    }
    for table in &mut tables {
        for cell in &mut table.cells {
            cell.coords = std::iter::once(cell.district.map_or(Coord::Total, Coord::code))
                .chain(table.dimensions.iter().map(|dimension| {
                    cell.breakdown
                        .iter()
                        .find(|(d, _)| d == dimension)
                        .map_or(Coord::Total, |(_, code)| Coord::code(*code))
                }))
                .collect();
        }
    }
    Ok(tables)
}

/// An engine error as the operator and the log see it: values of cells may
/// be counts (for a count indicator the count is the value), so none is
/// repeated.
/// The label of the cell an engine error names, if it names one the input
/// holds (a missing cell is in no row).
fn cell_named(err: &sdc::SdcError) -> Option<&str> {
    use sdc::SdcError as E;
    match err {
        E::TotalMismatch { total: cell, .. }
        | E::ValueOutOfBounds { cell, .. }
        | E::DuplicateCell(cell)
        | E::DimensionMismatch { cell, .. }
        | E::MissingLargestContributions { cell, .. }
        | E::InvalidContributions { cell, .. } => Some(cell),
        _ => None,
    }
}

fn engine_error(err: sdc::SdcError) -> String {
    match err {
        sdc::SdcError::TotalMismatch { total, .. } => format!(
            "total cell {total} is not the sum of the cells it covers (a table with totals needs every cell, and totals that add up)"
        ),
        sdc::SdcError::MissingCell(cell) => format!(
            "the table has totals, so it needs every cell of its grid: {cell} is missing (a cell with no contributors is 0 with contributors 0; breakdowns not crossed with each other or with the districts cannot be published as one table)"
        ),
        sdc::SdcError::ValueOutOfBounds { cell, .. } => {
            format!("cell {cell} has a value outside the allowed range")
        }
        other => other.to_string(),
    }
}

/// The status carried in the signed observation.
pub fn conf_status(status: CellStatus) -> ConfidentialityStatus {
    match status {
        CellStatus::Free => ConfidentialityStatus::Free,
        CellStatus::SmallCounts => ConfidentialityStatus::SuppressedSmallCounts,
        CellStatus::Dominance => ConfidentialityStatus::SuppressedDominance,
        CellStatus::Secondary => ConfidentialityStatus::SuppressedSecondary,
    }
}

fn rule_set(parameters: &AppliedParameters, kind: AggregationKind, all: bool) -> DisclosureRules {
    DisclosureRules {
        name: RULE_SET_NAME.into(),
        version: RULE_SET_VERSION.into(),
        min_contributors: 0,
        parameters: parameters
            .entries
            .iter()
            .filter(|p| all || !p.secret)
            .map(|p| RuleParameter {
                rule: p.rule.into(),
                name: p.name.into(),
                value: p.value.clone(),
            })
            .collect(),
        withheld: parameters
            .entries
            .iter()
            .filter(|p| p.secret)
            .map(|p| format!("{}.{}", p.rule, p.name))
            .collect(),
        aggregation: kind.name().into(),
    }
}

/// For ratios and means a total is a weighted mean of its parts, and the
/// weights (populations, say) are often public: no line of a table may
/// hold exactly one suppressed cell. Suppresses the total, or else the
/// smallest free part, until none does.
fn protect_weighted_lines(table: &Table, statuses: &mut [CellStatus], reasons: &mut [String]) {
    let dims = table.dimensions().len();
    loop {
        let mut changed = false;
        for d in (0..dims).filter(|&d| table.has_total(d)) {
            let mut lines: HashMap<Vec<Coord>, Vec<usize>> = HashMap::new();
            for (i, cell) in table.cells().iter().enumerate() {
                let mut rest = cell.coords.clone();
                rest.remove(d);
                lines.entry(rest).or_default().push(i);
            }
            for (_, line) in lines {
                let suppressed: Vec<usize> = line
                    .iter()
                    .copied()
                    .filter(|&i| statuses[i].is_suppressed())
                    .collect();
                if suppressed.len() != 1 || line.len() < 2 {
                    continue;
                }
                let total = line
                    .iter()
                    .copied()
                    .find(|&i| table.cells()[i].coords[d].is_total());
                let pick = match total.filter(|&t| !statuses[t].is_suppressed()) {
                    Some(t) => Some(t),
                    None => line
                        .iter()
                        .copied()
                        .filter(|&i| !statuses[i].is_suppressed())
                        .min_by(|&a, &b| {
                            table.cells()[a]
                                .value
                                .abs()
                                .total_cmp(&table.cells()[b].value.abs())
                        }),
                };
                if let Some(p) = pick {
                    statuses[p] = CellStatus::Secondary;
                    reasons[p] = format!(
                        "suppressed so that {} cannot be recomputed from a weighted mean",
                        table.label(suppressed[0])
                    );
                    changed = true;
                }
            }
        }
        if !changed {
            return;
        }
    }
}

/// Validates rows against the catalog, applies disclosure control table by
/// table, and builds the batch to sign.
pub fn prepare_batch(
    context: &IngestContext<'_>,
    rows: &[InputRow],
    feed: &mut dyn FeedView,
    noise: Noise<'_>,
) -> Result<PreparedBatch, IngestError> {
    let tables = validate(context, rows)?;
    let mut prepared = PreparedBatch {
        batch: IndicatorBatch {
            observations: Vec::with_capacity(rows.len()),
            rules: Vec::new(),
            group: None,
            privacy: Vec::new(),
        },
        published: 0,
        suppressed: 0,
        report: Vec::with_capacity(rows.len()),
        full_rules: Vec::new(),
        budget: Vec::new(),
        refusal: None,
    };
    for rows in &tables {
        protect_table(context, rows, feed, &noise, &mut prepared)?;
    }
    Ok(prepared)
}

fn protect_table(
    context: &IngestContext<'_>,
    rows: &TableRows<'_>,
    feed: &mut dyn FeedView,
    noise: &Noise<'_>,
    out: &mut PreparedBatch,
) -> Result<(), IngestError> {
    let indicator = rows.indicator;
    let (code, edition, period) = (&indicator.code, &indicator.edition, &rows.period);
    let name = format!("{code} ({edition}) for {period}");
    // A table's error is placed at the row of the cell it names, or else at
    // the table's first row.
    let first = &rows.cells[0];
    let table_error_at = |cell: &Cell<'_>, message: String| {
        IngestError::Row(RowError::new(
            cell.index,
            cell.row.line,
            "rows",
            format!("{name}: {message}"),
        ))
    };
    let table_error = |message: String| table_error_at(first, message);
    let engine_failure = |err: sdc::SdcError| {
        let named = cell_named(&err)
            .and_then(|label| rows.cells.iter().find(|c| label_of(&c.coords) == label));
        table_error_at(named.unwrap_or(first), engine_error(err))
    };
    let resolved = context.policy.resolve(indicator);
    let mut settings = resolved.settings.clone();
    let cost_settings = settings.noise;
    if matches!(noise, Noise::Preview) {
        settings.noise = None;
    }
    let versions = feed
        .earlier_versions(code, edition, period)
        .map_err(IngestError::Feed)?;
    let earlier = versions.cells();
    let key_of = |c: &Cell<'_>| (c.row.ref_area.clone(), c.row.breakdown.clone());
    let keys: HashSet<(String, String)> = rows.cells.iter().map(key_of).collect();
    if let Some(missing) = earlier
        .iter()
        .find(|e| !keys.contains(&(e.ref_area.clone(), e.breakdown.clone())))
    {
        return Err(table_error(format!(
            "the feed already holds this table, so a revision must restate every cell of it; {}{} is missing",
            missing.ref_area,
            if missing.breakdown.is_empty() {
                String::new()
            } else {
                format!(" ({})", missing.breakdown)
            }
        )));
    }
    let mut dimensions = vec!["ref_area".to_owned()];
    dimensions.extend(rows.dimensions.iter().map(|d| (*d).to_owned()));
    let cells: Vec<CellInput> = rows
        .cells
        .iter()
        .map(|c| CellInput {
            coords: c.coords.clone(),
            value: c.row.value,
            contributors: c.row.contributors.unwrap_or(0),
            largest: c.row.largest.clone(),
        })
        .collect();
    let table = Table::new(
        code.clone(),
        period.clone(),
        indicator.kind,
        dimensions,
        cells,
    )
    .map_err(engine_failure)?;
    // Totals with their components are additive constraints of the table.
    if resolved.settings.threshold.is_some()
        && !resolved.settings.secondary
        && !table.constraints().is_empty()
    {
        return Err(table_error(
            "secondary suppression is off for this indicator (disclosure.indicator secondary = false), so a total and its components may not be published together: a suppressed cell could be recomputed".into(),
        ));
    }
    let outcome = match (&settings.noise, noise) {
        (Some(_), Noise::Seeded(seed)) => {
            let seed = seed(code, edition, period).ok_or_else(|| {
                IngestError::Feed("no noise key is loaded: restart the node to make one".into())
            })?;
            sdc::protect_with_seed(&table, &settings, &seed)
        }
        _ => sdc::protect(&table, &settings),
    }
    .map_err(engine_failure)?;
    let n = rows.cells.len();
    let mut statuses: Vec<CellStatus> = outcome.published.cells.iter().map(|c| c.status).collect();
    let mut values: Vec<Option<f64>> = outcome.published.cells.iter().map(|c| c.value).collect();
    let mut reasons = vec![String::new(); n];
    for note in &outcome.local.notes {
        reasons[note.cell] = note.reason.clone();
    }
    if resolved.settings.threshold.is_some() && !indicator.kind.is_additive() {
        protect_weighted_lines(&table, &mut statuses, &mut reasons);
    }
    // Suppressions stay across revisions: a cell suppressed in an earlier
    // version, published now, could be combined with that version.
    let by_key: HashMap<(&str, &str), &EarlierCell> = earlier
        .iter()
        .map(|e| ((e.ref_area.as_str(), e.breakdown.as_str()), e))
        .collect();
    let earlier_of = |c: &Cell<'_>| {
        by_key
            .get(&(c.row.ref_area.as_str(), c.row.breakdown.as_str()))
            .copied()
    };
    for (i, cell) in rows.cells.iter().enumerate() {
        if earlier_of(cell).is_some_and(|e| e.suppressed) && !statuses[i].is_suppressed() {
            statuses[i] = CellStatus::Secondary;
            reasons[i] = "suppressed in an earlier version of this table; suppressions stay across revisions".into();
        }
    }
    for (i, status) in statuses.iter().enumerate() {
        if status.is_suppressed() {
            values[i] = None;
        }
    }
    // Cells published earlier are known to an attacker: where one is
    // suppressed now but its earlier value still holds, or published now
    // less precisely (rounded, noised) than then, audit the table with
    // that knowledge, whatever its shape (without totals too: an earlier
    // value alone can reveal a cell suppressed now).
    let published_loosely =
        resolved.settings.rounding.is_some() || resolved.settings.noise.is_some();
    let known: Vec<Option<(f64, f64)>> = rows
        .cells
        .iter()
        .zip(&statuses)
        .map(|(cell, status)| {
            let value = cell.row.value;
            // Every earlier interval that still holds the value narrows it.
            earlier_of(cell)
                .filter(|_| status.is_suppressed() || published_loosely)
                .and_then(|e| {
                    e.known
                        .iter()
                        .filter(|(lo, hi)| *lo <= value && value <= *hi)
                        .copied()
                        .reduce(|(a, b), (c, d)| (a.max(c), b.min(d)))
                })
        })
        .collect();
    // The totals of earlier versions tell equations between their cells,
    // which an attacker combines with this version's by taking cells that
    // did not visibly change as unchanged (`sdc::revision`).
    let equations = indicator.kind.is_additive()
        && !versions.versions().is_empty()
        && statuses.iter().any(|s| s.is_suppressed());
    if equations || known.iter().any(Option::is_some) {
        let index_of: HashMap<(&str, &str), usize> = rows
            .cells
            .iter()
            .enumerate()
            .map(|(i, c)| ((c.row.ref_area.as_str(), c.row.breakdown.as_str()), i))
            .collect();
        // Every earlier cell is restated (checked above).
        let versions: Vec<sdc::revision::Version> = versions
            .versions()
            .iter()
            .map(|v| sdc::revision::Version {
                cells: v
                    .cells
                    .iter()
                    .filter_map(|c| {
                        let i = index_of.get(&(c.ref_area.as_str(), c.breakdown.as_str()))?;
                        Some(sdc::revision::VersionCell {
                            coords: rows.cells[*i].coords.clone(),
                            told: c.known,
                        })
                    })
                    .collect(),
            })
            .collect();
        match sdc::revision::audit_revision(
            &table,
            &resolved.settings,
            &statuses,
            &known,
            &versions,
        ) {
            Ok(unmet) => {
                if let Some(&cell) = unmet.first() {
                    out.refusal.get_or_insert_with(|| {
                        format!(
                            "{name}: with the values an earlier version of this table published, {} could be narrowed to within its protection interval; nothing was published",
                            table.label(cell)
                        )
                    });
                }
            }
            Err(sdc::SdcError::RevisionUnaudited(why)) => {
                out.refusal
                    .get_or_insert_with(|| format!("{name}: {why}; nothing was published"));
            }
            Err(err) => return Err(engine_failure(err)),
        }
    }
    // The rule set, shared by tables with the same settings (a preview
    // names the noise it did not draw).
    let rho = cost_settings.map(|ns| publish_cost(&ns, sdc::engine::margin_dimensions(&table)).rho);
    let parameters = &AppliedParameters::from_settings(&resolved.settings, rho);
    let full = rule_set(parameters, indicator.kind, true);
    let rules_index = match out.full_rules.iter().position(|r| *r == full) {
        Some(i) => i,
        None => {
            out.batch
                .rules
                .push(rule_set(parameters, indicator.kind, false));
            out.full_rules.push(full);
            out.batch.rules.len() - 1
        }
    } as u32;
    // Privacy budget.
    if let (Some(rho), Some(limit)) = (rho, resolved.budget_rho) {
        let nanos = (rho * 1e9).ceil() as u64;
        let spent = feed
            .spent_nanos(code, edition, period)
            .map_err(IngestError::Feed)?;
        let limit_nanos = (limit * 1e9).round() as u64;
        if spent.saturating_add(nanos) > limit_nanos {
            out.refusal.get_or_insert_with(|| {
                format!(
                    "{name}: the privacy budget is exhausted: this publish needs rho {}, {} of {} is spent; nothing was published",
                    nanos as f64 / 1e9,
                    spent as f64 / 1e9,
                    limit
                )
            });
        }
        out.budget.push(BudgetLine {
            indicator: code.clone(),
            edition: edition.clone(),
            period: period.clone(),
            needed: nanos as f64 / 1e9,
            spent: spent as f64 / 1e9,
            limit,
        });
        out.batch.privacy.push(PrivacyDebit {
            indicator: code.clone(),
            catalog_edition: edition.clone(),
            period: period.clone(),
            rho_nanos: nanos,
        });
    }
    for (i, cell) in rows.cells.iter().enumerate() {
        let status = statuses[i];
        if status.is_suppressed() {
            out.suppressed += 1;
        } else {
            out.published += 1;
        }
        out.batch.observations.push(Observation {
            indicator: code.clone(),
            catalog_edition: edition.clone(),
            area: cell.area as i32,
            ref_area: cell.row.ref_area.clone(),
            period: period.clone(),
            value: values[i],
            unit: cell.unit.clone(),
            obs_status: cell.row.obs_status as i32,
            conf_status: conf_status(status) as i32,
            method_notes: cell.row.method_notes.clone(),
            breakdown: cell.row.breakdown.clone(),
            rules: rules_index,
        });
        out.report.push(CellReport {
            indicator: code.clone(),
            edition: edition.clone(),
            ref_area: cell.row.ref_area.clone(),
            period: period.clone(),
            breakdown: cell.row.breakdown.clone(),
            status,
            value: values[i],
            reason: std::mem::take(&mut reasons[i]),
        });
    }
    Ok(())
}

/// Splits a batch whose encoding exceeds `max_bytes` into consecutive
/// parts of a publish group (each at most `max_bytes` unless a single cell
/// is larger), named by `group_id`. A batch that fits stays whole, ungrouped.
pub fn split_batch(
    batch: IndicatorBatch,
    group_id: [u8; 16],
    max_bytes: usize,
) -> Vec<IndicatorBatch> {
    if batch.encoded_len() <= max_bytes {
        return vec![batch];
    }
    // Room for the rules and the group of every part.
    let overhead = batch
        .rules
        .iter()
        .map(|r| r.encoded_len() + 3)
        .sum::<usize>()
        + batch
            .privacy
            .iter()
            .map(|d| d.encoded_len() + 3)
            .sum::<usize>()
        + 40;
    let mut parts: Vec<Vec<Observation>> = vec![Vec::new()];
    let mut size = overhead;
    for observation in batch.observations {
        let cell = observation.encoded_len() + 4;
        let current = parts.last().map_or(0, Vec::len);
        if current > 0 && size + cell > max_bytes {
            parts.push(Vec::new());
            size = overhead;
        }
        size += cell;
        if let Some(part) = parts.last_mut() {
            part.push(observation);
        }
    }
    let count = parts.len() as u32;
    parts
        .into_iter()
        .zip(0u32..)
        .map(|(observations, part)| IndicatorBatch {
            observations,
            rules: batch.rules.clone(),
            group: Some(PublishGroup {
                id: group_id.to_vec(),
                part,
                count,
            }),
            privacy: if part == 0 {
                batch.privacy.clone()
            } else {
                Vec::new()
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::policy::{noise_settings, Override};

    use crate::core::catalog::tests::TEST_CATALOG as CATALOG;

    /// An own feed held in memory.
    #[derive(Default)]
    struct Feed {
        versions: Vec<EarlierVersion>,
        spent: u64,
    }

    impl FeedView for Feed {
        fn earlier_versions(
            &mut self,
            _: &str,
            _: &str,
            _: &str,
        ) -> Result<Arc<TableHistory>, String> {
            Ok(Arc::new(TableHistory::of(self.versions.clone())))
        }
        fn spent_nanos(&mut self, _: &str, _: &str, _: &str) -> Result<u64, String> {
            Ok(self.spent)
        }
    }

    struct Setup {
        catalog: Catalog,
        policy: Policy,
        districts: Vec<String>,
    }

    impl Setup {
        fn new() -> Self {
            let catalog = Catalog::with_city_file(CATALOG, "test.toml").unwrap();
            Self {
                catalog,
                policy: Policy::default(),
                districts: vec!["north".into(), "south".into(), "east".into()],
            }
        }

        fn prepare_in(
            &self,
            rows: &[InputRow],
            feed: &mut Feed,
        ) -> Result<PreparedBatch, IngestError> {
            let context = IngestContext {
                origin: "city-a",
                districts: &self.districts,
                catalog: &self.catalog,
                policy: &self.policy,
            };
            let seed = |_: &str, _: &str, _: &str| Some(NoiseSeed([9; 32]));
            prepare_batch(&context, rows, feed, Noise::Seeded(&seed))
        }

        fn prepare(&self, rows: &[InputRow]) -> Result<PreparedBatch, IngestError> {
            self.prepare_in(rows, &mut Feed::default())
        }
    }

    fn row(
        indicator: &str,
        ref_area: &str,
        period: &str,
        value: f64,
        contributors: u64,
    ) -> InputRow {
        InputRow {
            contributors: Some(contributors),
            ..InputRow::new(indicator, ref_area, period, value)
        }
    }

    fn statuses(prepared: &PreparedBatch) -> Vec<(String, i32)> {
        prepared
            .batch
            .observations
            .iter()
            .map(|o| (format!("{}{}", o.ref_area, o.breakdown), o.conf_status))
            .collect()
    }

    #[test]
    fn large_batches_split_into_a_group_and_small_ones_stay_whole() {
        let setup = Setup::new();
        let rows: Vec<InputRow> = (0..3000)
            .map(|i| InputRow {
                breakdown: format!("item=i{i}"),
                ..row("rate", "city-a", "2025", 5.0, 10)
            })
            .collect();
        let batch = setup.prepare(&rows).unwrap().batch;
        let small = setup.prepare(&rows[..10]).unwrap().batch;
        assert_eq!(split_batch(small.clone(), [1; 16], 60_000), vec![small]);
        let parts = split_batch(batch.clone(), [1; 16], 60_000);
        assert!(parts.len() >= 2);
        let mut joined = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            assert!(
                part.encoded_len() <= 60_000,
                "part {i} is {} bytes",
                part.encoded_len()
            );
            let group = part.group.as_ref().unwrap();
            assert_eq!(
                (group.part as usize, group.count as usize),
                (i, parts.len())
            );
            assert_eq!(part.rules, batch.rules);
            joined.extend(part.observations.clone());
        }
        assert_eq!(joined, batch.observations);
    }

    const CSV: &str = "indicator,area,ref_area,period,value,unit,contributors\n\
        rate,economy,city-a,2025,7.5,percent,4321\n\
        jobs,,city-a/north,2025,2,,2\n";

    #[test]
    fn csv_rows_parse_with_their_lines() {
        let rows = parse_csv(CSV).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].line, 3);
        assert_eq!(rows[0].area, FunctionalArea::Economy);
        assert_eq!(rows[1].area, FunctionalArea::Unspecified);
        assert_eq!(rows[1].contributors, Some(2));
    }

    #[test]
    fn threshold_suppresses_small_cells_and_drops_counts() {
        let prepared = Setup::new().prepare(&parse_csv(CSV).unwrap()).unwrap();
        assert_eq!((prepared.published, prepared.suppressed), (1, 1));
        let cells = &prepared.batch.observations;
        assert_eq!(cells[0].value, Some(7.5));
        assert_eq!(cells[1].value, None);
        assert_eq!(cells[1].unit, "count", "the catalog's unit");
        assert_eq!(
            cells[1].area,
            FunctionalArea::Economy as i32,
            "the catalog's area"
        );
        assert_eq!(
            cells[1].conf_status,
            ConfidentialityStatus::SuppressedSmallCounts as i32
        );
        let rules = &prepared.batch.rules[cells[1].rules as usize];
        assert_eq!(
            (rules.name.as_str(), rules.version.as_str()),
            (RULE_SET_NAME, "2")
        );
        assert!(rules
            .parameters
            .iter()
            .any(|p| p.rule == "threshold" && p.value == "3"));
        let encoded = format!("{:?}", prepared.batch);
        assert!(
            !encoded.contains("4321"),
            "a contributor count leaked: {encoded}"
        );
    }

    #[test]
    fn margins_get_secondary_suppression() {
        // Three districts and the city total: one small district would be
        // recomputed from the total and the others.
        let rows = vec![
            row("jobs", "city-a", "2025", 60.0, 60),
            row("jobs", "city-a/north", "2025", 2.0, 2),
            row("jobs", "city-a/south", "2025", 30.0, 30),
            row("jobs", "city-a/east", "2025", 28.0, 28),
        ];
        let prepared = Setup::new().prepare(&rows).unwrap();
        let s = statuses(&prepared);
        assert_eq!(s[1].1, ConfidentialityStatus::SuppressedSmallCounts as i32);
        let secondary = s
            .iter()
            .filter(|(_, c)| *c == ConfidentialityStatus::SuppressedSecondary as i32)
            .count();
        assert!(secondary >= 1, "{s:?}");
        assert!(prepared
            .report
            .iter()
            .any(|r| r.reason.contains("suppressed to protect")));
    }

    #[test]
    fn several_breakdowns_make_a_table_of_more_dimensions() {
        // City households by building type and tenure, with every margin:
        // a dimension a row does not name is its total.
        let mut rows = Vec::new();
        let interior = [
            ("house", "owned", 40.0),
            ("house", "rented", 2.0),
            ("flat", "owned", 25.0),
            ("flat", "rented", 30.0),
        ];
        let cell = |breakdown: String, value: f64| InputRow {
            breakdown,
            ..row("jobs", "city-a", "2025", value, value as u64)
        };
        for (building, tenure, value) in interior {
            rows.push(cell(format!("building={building};tenure={tenure}"), value));
        }
        for building in ["house", "flat"] {
            let sum = interior
                .iter()
                .filter(|c| c.0 == building)
                .map(|c| c.2)
                .sum();
            rows.push(cell(format!("building={building}"), sum));
        }
        for tenure in ["owned", "rented"] {
            let sum = interior.iter().filter(|c| c.1 == tenure).map(|c| c.2).sum();
            rows.push(cell(format!("tenure={tenure}"), sum));
        }
        rows.push(cell(String::new(), 97.0));
        let prepared = Setup::new().prepare(&rows).unwrap();
        let s = statuses(&prepared);
        assert_eq!(
            s[1].1,
            ConfidentialityStatus::SuppressedSmallCounts as i32,
            "{s:?}"
        );
        let suppressed = s.iter().filter(|(_, c)| *c != 0).count();
        assert!(suppressed >= 4, "a 2 x 2 interior needs a rectangle: {s:?}");
        let err = Setup::new()
            .prepare(&[cell("tenure=owned;building=house".into(), 1.0)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("in alphabetical order"), "{err}");
    }

    #[test]
    fn a_small_cell_beside_large_ones_is_not_recoverable_from_the_total() {
        // City rows only, by sector: one small cell beside two large ones
        // and the total. Suppressing it alone would give it away as the
        // total minus the others, however large the table.
        let cell = |breakdown: &str, value: f64| InputRow {
            breakdown: breakdown.into(),
            ..row("jobs", "city-a", "2025", value, value as u64)
        };
        for scale in [1e3, 1e9, 1e12, 1e15] {
            let rows = vec![
                cell("sector=retail", 2.0),
                cell("sector=industry", 5.0 * scale),
                cell("sector=services", 4.0 * scale),
                cell("", 9.0 * scale + 2.0),
            ];
            let prepared = Setup::new().prepare(&rows).unwrap();
            let s = statuses(&prepared);
            assert_eq!(
                s[0].1,
                ConfidentialityStatus::SuppressedSmallCounts as i32,
                "{s:?}"
            );
            let suppressed = s.iter().filter(|(_, c)| *c != 0).count();
            assert!(
                suppressed >= 2,
                "at scale {scale}, the small cell is the total minus the others: {s:?}"
            );
            // One other sector suffices: the total stays published.
            assert_eq!(s[3].1, 0, "at scale {scale}, the whole line went: {s:?}");
        }
    }

    #[test]
    fn settings_that_would_leak_are_refused() {
        // Without secondary suppression, a total with its components would
        // give away the small district.
        let mut setup = Setup::new();
        setup.policy.overrides.push(Override {
            code: "jobs".into(),
            secondary: Some(false),
            ..Override::default()
        });
        setup.policy.check(&setup.catalog).unwrap();
        let rows = vec![
            row("jobs", "city-a", "2025", 60.0, 60),
            row("jobs", "city-a/north", "2025", 2.0, 2),
            row("jobs", "city-a/south", "2025", 58.0, 58),
        ];
        let err = setup.prepare(&rows).unwrap_err().to_string();
        assert!(err.contains("secondary suppression is off"), "{err}");
        assert!(setup.prepare(&rows[1..]).is_ok(), "components alone");
        // A count has no more contributors than it counts.
        let err = Setup::new()
            .prepare(&[row("jobs", "city-a", "2025", 1.0, 40)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("contributors: more contributors than the count"),
            "{err}"
        );
        // A noised count: one contributor adds at most the clamp bound.
        let mut noised = Setup::new();
        noised.policy.overrides.push(Override {
            code: "jobs".into(),
            noise: Some(noise_settings("laplace", "1/2", 1).unwrap()),
            budget_rho: Some(1.0),
            ..Override::default()
        });
        noised.policy.check(&noised.catalog).unwrap();
        let err = noised
            .prepare(&[row("jobs", "city-a", "2025", 10.0, 3)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("contributors: jobs's noise assumes") && !err.contains('3'),
            "{err}"
        );
        assert!(noised
            .prepare(&[row("jobs", "city-a", "2025", 10.0, 10)])
            .is_ok());
        // Noise on a sum holds only for contributions within the clamp bound.
        let mut setup = Setup::new();
        setup.policy.overrides.push(Override {
            code: "turnover".into(),
            noise: Some(noise_settings("laplace", "1/2", 1000).unwrap()),
            budget_rho: Some(1.0),
            clamp_given: true,
            ..Override::default()
        });
        setup.policy.check(&setup.catalog).unwrap();
        let sum = |largest: Option<LargestContributions>| InputRow {
            largest,
            ..row("turnover", "city-a", "2025-Q1", 5000.0, 12)
        };
        let err = setup.prepare(&[sum(None)]).unwrap_err().to_string();
        assert!(err.contains("largest_values: missing"), "{err}");
        let err = setup
            .prepare(&[sum(Some(LargestContributions::Values(vec![1500.0, 900.0])))])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("above the clamp bound") && !err.contains("1500"),
            "{err}"
        );
        assert!(setup
            .prepare(&[sum(Some(LargestContributions::Values(vec![900.0, 800.0])))])
            .is_ok());
        // Contributions the bound cannot hold are refused, not ignored.
        for (largest, column) in [
            (
                LargestContributions::Values(vec![f64::NAN]),
                "largest_values",
            ),
            (
                LargestContributions::Values(vec![-5000.0]),
                "largest_values",
            ),
            (LargestContributions::Shares(vec![-1.0]), "largest_shares"),
            (LargestContributions::Shares(vec![1.5]), "largest_shares"),
        ] {
            let err = setup
                .prepare(&[sum(Some(largest))])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("{column}: ")) && !err.contains("5000"),
                "{err}"
            );
        }
    }

    #[test]
    fn weighted_lines_never_hold_a_single_suppression() {
        let rows = vec![
            row("rate", "city-a", "2025", 6.0, 600),
            row("rate", "city-a/north", "2025", 9.0, 2),
            row("rate", "city-a/south", "2025", 5.0, 300),
            row("rate", "city-a/east", "2025", 5.5, 298),
        ];
        let prepared = Setup::new().prepare(&rows).unwrap();
        let s = statuses(&prepared);
        assert_eq!(
            s[0].1,
            ConfidentialityStatus::SuppressedSecondary as i32,
            "{s:?}"
        );
    }

    #[test]
    fn dominance_needs_largest_contributions_and_suppresses() {
        let setup = Setup::new();
        let big = InputRow {
            largest: Some(LargestContributions::Values(vec![900.0, 50.0])),
            ..row("turnover", "city-a", "2025-Q1", 1000.0, 12)
        };
        let prepared = setup.prepare(std::slice::from_ref(&big)).unwrap();
        assert_eq!(
            prepared.batch.observations[0].conf_status,
            ConfidentialityStatus::SuppressedDominance as i32
        );
        let rules = &prepared.batch.rules[0];
        assert!(
            rules.withheld.contains(&"dominance.k".to_owned()),
            "{rules:?}"
        );
        assert!(!rules
            .parameters
            .iter()
            .any(|p| p.rule == "dominance" && p.name == "k"));
        assert!(prepared.full_rules[0]
            .parameters
            .iter()
            .any(|p| p.rule == "dominance" && p.name == "k"));
        let err = setup
            .prepare(&[InputRow {
                largest: None,
                ..big
            }])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("turnover (local) for 2025-Q1") && err.contains("largest-contribution"),
            "{err}"
        );
    }

    #[test]
    fn public_indicators_need_no_counts() {
        let prepared = Setup::new()
            .prepare(&[InputRow::new("roads", "city-a", "2025", 120.5)])
            .unwrap();
        assert_eq!(prepared.batch.observations[0].value, Some(120.5));
    }

    #[test]
    fn validation_errors_name_row_and_column() {
        let setup = Setup::new();
        let base = parse_csv(CSV).unwrap();
        let with = |change: &dyn Fn(&mut InputRow)| {
            let mut rows = base.clone();
            change(&mut rows[1]);
            setup.prepare(&rows).unwrap_err().to_string()
        };
        type Change = Box<dyn Fn(&mut InputRow)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|r| r.ref_area = "city-b".into()),
                "3: ref_area: unknown reference area \"city-b\"",
            ),
            (
                Box::new(|r| r.ref_area = "city-a/west".into()),
                "known: city-a, city-a/north",
            ),
            (Box::new(|r| r.period = "2025-Q9".into()), "3: period:"),
            (
                Box::new(|r| r.period = "2025-Q3".into()),
                "3: period: period \"2025-Q3\" is not a year",
            ),
            (
                Box::new(|r| r.value = f64::NAN),
                "3: value: value NaN is not finite",
            ),
            (
                Box::new(|r| r.value = 2.5),
                "3: value: value is not a whole number",
            ),
            (Box::new(|r| r.value = -1.0), "3: value: value is negative"),
            (Box::new(|r| r.indicator = "a b".into()), "3: indicator:"),
            (
                Box::new(|r| r.indicator = "nope".into()),
                "3: indicator: unknown indicator \"nope\"",
            ),
            (
                Box::new(|r| r.catalog_edition = "iso37120:1999".into()),
                "3: catalog_edition: unknown catalog edition",
            ),
            (
                Box::new(|r| r.unit = "people".into()),
                "3: unit: unit \"people\" does not match the catalog's \"count\"",
            ),
            (
                Box::new(|r| r.area = FunctionalArea::Governance),
                "3: area: jobs is in area economy",
            ),
            (
                Box::new(|r| r.contributors = None),
                "3: contributors: missing",
            ),
            (
                Box::new(|r| r.breakdown = "sex".into()),
                "3: breakdown: breakdown \"sex\" is not dimension=code",
            ),
            (
                Box::new(|r| {
                    r.indicator = "rate".into();
                    r.ref_area = "city-a".into();
                }),
                "appears twice",
            ),
        ];
        for (change, expected) in cases {
            let err = with(&*change);
            assert!(err.contains(expected), "{err:?} lacks {expected:?}");
        }
    }

    #[test]
    fn a_revision_restates_the_table_and_keeps_its_suppressions() {
        let setup = Setup::new();
        let rows = vec![
            row("rate", "city-a/north", "2025", 9.0, 20),
            row("rate", "city-a/south", "2025", 5.0, 300),
        ];
        let mut feed = Feed {
            versions: vec![EarlierVersion {
                cells: vec![
                    version_cell("city-a/north", None),
                    version_cell("city-a/east", Some((5.5, 5.5))),
                ],
            }],
            spent: 0,
        };
        let err = setup.prepare_in(&rows, &mut feed).unwrap_err().to_string();
        assert!(
            err.contains("must restate every cell") && err.contains("city-a/east is missing"),
            "{err}"
        );
        feed.versions[0].cells.pop();
        let prepared = setup.prepare_in(&rows, &mut feed).unwrap();
        assert_eq!(
            prepared.batch.observations[0].value, None,
            "stays suppressed"
        );
        assert!(prepared.report[0].reason.contains("earlier version"));
    }

    #[test]
    fn an_earlier_value_that_would_reveal_a_cell_refuses_the_revision() {
        // Earlier: south published as 30. Now south is a complement of the
        // small north cell, but its value is unchanged: the attacker has it.
        // So too beside very large districts (scale 1e8), where the check's
        // slack once exceeded the protection asked.
        for scale in [1.0, 1e8] {
            let setup = Setup::new();
            let (south, east) = (30.0 * scale, 28.0 * scale);
            let total = 2.0 + south + east;
            let rows = vec![
                row("jobs", "city-a", "2025", total, total as u64),
                row("jobs", "city-a/north", "2025", 2.0, 2),
                row("jobs", "city-a/south", "2025", south, south as u64),
                row("jobs", "city-a/east", "2025", east, east as u64),
            ];
            // Every district was free earlier (north had more
            // contributors), and the city was not published.
            // North was 5 then: its new value 2 is found only through south.
            // South was first published rounded (within 50), then exactly;
            // its latest version said otherwise (a correction since
            // retracted, say). The exact one still tells its value.
            let version = |north: f64, south: (f64, f64)| EarlierVersion {
                cells: vec![
                    version_cell("city-a/north", Some((north, north))),
                    version_cell("city-a/south", Some(south)),
                    version_cell("city-a/east", Some((east, east))),
                ],
            };
            let mut feed = Feed {
                versions: vec![
                    version(5.0, (south - 50.0, south + 50.0)),
                    version(5.0, (south, south)),
                    version(5.0, (south + 7.0, south + 7.0)),
                ],
                spent: 0,
            };
            let prepared = setup.prepare_in(&rows, &mut feed).unwrap();
            let refusal = prepared
                .refusal
                .unwrap_or_else(|| panic!("not refused at scale {scale}"));
            assert!(refusal.contains("nothing was published"), "{refusal}");
        }
    }

    #[test]
    fn noise_spends_the_budget_and_a_full_budget_refuses() {
        let mut setup = Setup::new();
        setup.policy.overrides.push(Override {
            code: "jobs".into(),
            noise: Some(noise_settings("laplace", "1/2", 1).unwrap()),
            budget_rho: Some(0.25),
            ..Override::default()
        });
        setup.policy.check(&setup.catalog).unwrap();
        let rows = vec![row("jobs", "city-a", "2025", 600.0, 600)];
        let prepared = setup.prepare(&rows).unwrap();
        assert!(prepared.refusal.is_none());
        let debit = &prepared.batch.privacy[0];
        assert_eq!(
            (debit.indicator.as_str(), debit.rho_nanos),
            ("jobs", 125_000_000)
        );
        let again = setup.prepare(&rows).unwrap();
        assert_eq!(prepared.batch, again.batch, "same seed, same noise");
        let context = IngestContext {
            origin: "city-a",
            districts: &setup.districts,
            catalog: &setup.catalog,
            policy: &setup.policy,
        };
        let preview = prepare_batch(&context, &rows, &mut Feed::default(), Noise::Preview).unwrap();
        assert_eq!(
            preview.batch.rules, prepared.batch.rules,
            "a preview names the noise"
        );
        assert_eq!(preview.report[0].value, Some(600.0), "before noise");
        let mut feed = Feed {
            spent: 200_000_000,
            ..Feed::default()
        };
        let refused = setup.prepare_in(&rows, &mut feed).unwrap();
        assert!(refused
            .refusal
            .unwrap()
            .contains("privacy budget is exhausted"));
    }

    proptest::proptest! {
        /// Whatever the budget and the sequence of publishes (a city cell,
        /// or districts with their total, which costs twice as much), the
        /// debits accepted never sum above the budget, and a publish is
        /// refused only when its debit would not fit.
        #[test]
        fn the_budget_is_never_exceeded(
            budget_eighths in 0u32..20,
            epsilon_den in 1u64..4,
            publishes in proptest::collection::vec(proptest::bool::ANY, 1..30),
        ) {
            let mut setup = Setup::new();
            let budget = f64::from(budget_eighths) / 8.0;
            setup.policy.overrides.push(Override {
                code: "jobs".into(),
                noise: Some(noise_settings("laplace", &format!("1/{epsilon_den}"), 1).unwrap()),
                budget_rho: Some(budget.max(0.001)),
                ..Override::default()
            });
            setup.policy.check(&setup.catalog).unwrap();
            let limit = (budget.max(0.001) * 1e9).round() as u64;
            let mut feed = Feed::default();
            for with_districts in publishes {
                let mut rows = vec![row("jobs", "city-a", "2025", 90.0, 90)];
                if with_districts {
                    rows.extend([
                        row("jobs", "city-a/north", "2025", 30.0, 30),
                        row("jobs", "city-a/south", "2025", 30.0, 30),
                        row("jobs", "city-a/east", "2025", 30.0, 30),
                    ]);
                }
                feed.versions.clear();
                let prepared = setup.prepare_in(&rows, &mut feed).unwrap();
                let needed: u64 = prepared.batch.privacy.iter().map(|d| d.rho_nanos).sum();
                proptest::prop_assert!(needed > 0);
                match prepared.refusal {
                    None => {
                        proptest::prop_assert!(feed.spent + needed <= limit);
                        feed.spent += needed;
                    }
                    Some(_) => proptest::prop_assert!(feed.spent + needed > limit),
                }
            }
            proptest::prop_assert!(feed.spent <= limit);
        }
    }

    #[test]
    fn file_errors_name_line_and_column() {
        let header = "indicator,area,ref_area,period,value,unit,contributors\n";
        let cases = [
            (
                "indicator,area\nx,1\n".to_owned(),
                "1: ref_area: required column is missing",
            ),
            (
                "indicator,area,ref_area,period,value,unit,contributors,name\n".to_owned(),
                "1: name: unknown column",
            ),
            (
                format!("{header}x,1,city-a,2025,\"1,2.3\",u,5\n"),
                "2: value: not a number",
            ),
            (
                format!("{header}x,9,city-a,2025,1,u,5\n"),
                "2: area: unknown functional area \"9\"",
            ),
            (
                format!("{header}x,1,city-a,2025,1,u\n"),
                "2: row: row has 6 fields, the header has 7",
            ),
            (
                "indicator,ref_area,period,value,largest_values\nx,city-a,2025,1,9;oops\n"
                    .to_owned(),
                "2: largest_values: not a list of numbers",
            ),
        ];
        for (input, expected) in cases {
            let err = parse_csv(&input).unwrap_err().to_string();
            assert!(
                err.starts_with(expected),
                "{err:?} does not start with {expected:?}"
            );
        }
        // Windows line ends and blank lines do not shift the line named.
        let crlf = format!("{header}x,1,city-a,2025,1,u,5\n").replace('\n', "\r\n")
            + "x,1,city-a,2026,oops,u,5\r\n";
        let err = parse_csv(&crlf).unwrap_err().to_string();
        assert!(err.starts_with("3: value: not a number"), "{err}");
        let blank = format!("{header}x,1,city-a,2025,1,u,5\n\n\nx,1,city-a,2026,oops,u,5\n");
        let err = parse_csv(&blank).unwrap_err().to_string();
        assert!(err.starts_with("5: value: not a number"), "{err}");
        let short = format!("{header}\r\nx,1,city-a,2025,1,u\r\n")
            .replace(",contributors\n", ",contributors\r\n");
        let err = parse_csv(&short).unwrap_err().to_string();
        assert!(err.starts_with("3: row: row has 6 fields"), "{err}");
        let rows = parse_csv(&crlf.replace("oops", "2")).unwrap();
        assert_eq!((rows[0].line, rows[1].line), (2, 3));
        let err = parse_csv(&format!("{header}x,1,city-a,2025,1,u,x17\n"))
            .unwrap_err()
            .to_string();
        assert!(!err.contains("x17"), "contributors echoed: {err}");
        // A count too large says what is allowed, without echoing it.
        let err = parse_csv(&format!(
            "{header}x,1,city-a,2025,1,u,99999999999999999999\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.ends_with(
                "contributors: not a whole number of contributors from 0 to 18446744073709551615"
            ),
            "{err}"
        );
        let err =
            parse_csv("indicator,ref_area,period,value,largest_values\nx,city-a,2025,1,9;x17\n")
                .unwrap_err()
                .to_string();
        assert!(!err.contains("x17"), "contributions echoed: {err}");
    }

    #[test]
    fn json_rows_parse_with_their_lines() {
        let text = r#"[
  {"indicator": "x", "area": 4, "ref_area": "city-a", "period": "2025",
   "value": 1.5, "unit": "t", "contributors": 10, "largest_values": [1, 0.5]},
  {"indicator": "y", "area": "governance", "ref_area": "city-a", "period": "2025",
   "value": "oops", "unit": "t", "contributors": 10}
]"#;
        let err = parse_json(text).unwrap_err();
        assert_eq!((err.line, err.column.as_str()), (4, "value"));
        let ok = parse_json(&text.replace("\"oops\"", "2")).unwrap();
        assert_eq!(ok[1].area, FunctionalArea::Governance);
        assert_eq!(
            ok[0].largest,
            Some(LargestContributions::Values(vec![1.0, 0.5]))
        );
        assert!(parse_json(r#"[{"indicator": "x", "secret": 1}]"#)
            .unwrap_err()
            .to_string()
            .contains("secret: unknown column"));
        assert!(parse_json("{").is_err());
        // A repeated key is refused, as a repeated CSV column is: JSON
        // parsers keep the last one silently.
        let repeated = r#"[
  {"indicator": "x", "area": 4, "ref_area": "city-a", "period": "2025",
   "value": 1.5, "unit": "t", "contributors": 2, "contributors": 50}
]"#;
        let err = parse_json(repeated).unwrap_err();
        assert_eq!((err.line, err.column.as_str()), (2, "contributors"));
        assert!(err.to_string().contains("appears twice") && !err.to_string().contains("50"));
        // A wrong type is named without the value (a value may be a count).
        let err = parse_json(&text.replace("\"oops\"", "[12]"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("value: expected a string or number, found an array"),
            "{err}"
        );
        assert!(!err.contains("12"), "{err}");
        // A byte order mark is skipped; a syntax error names its line once.
        let with_bom = format!("\u{feff}{}", text.replace("\"oops\"", "2"));
        assert_eq!(parse_json(&with_bom).unwrap().len(), 2);
        let err = parse_json("[\n{\"indicator\": }]").unwrap_err();
        assert_eq!(err.line, 2);
        assert!(!err.to_string().contains("at line"), "{err}");
        assert!(err.to_string().ends_with("(at character 15)"), "{err}");
    }

    /// A cell of an earlier version: suppressed when it told nothing.
    fn version_cell(ref_area: &str, known: Option<(f64, f64)>) -> VersionCell {
        VersionCell {
            ref_area: ref_area.into(),
            breakdown: String::new(),
            suppressed: known.is_none(),
            known,
        }
    }

    /// The version an attacker holds after `prepared` was published: each
    /// cell's published interval (exact, or rounded to `base`).
    fn version_after(prepared: &PreparedBatch, base: Option<f64>) -> EarlierVersion {
        let cells = prepared
            .batch
            .observations
            .iter()
            .map(|o| VersionCell {
                ref_area: o.ref_area.clone(),
                breakdown: o.breakdown.clone(),
                suppressed: o.value.is_none(),
                known: o.value.map(|v| match base {
                    Some(b) => crate::core::sdc::rounding::rounding_interval(v, b, true),
                    None => (v, v),
                }),
            })
            .collect();
        EarlierVersion { cells }
    }

    /// The feed an attacker holds after `prepared` was published.
    fn feed_after(prepared: &PreparedBatch, base: Option<f64>) -> Feed {
        Feed {
            versions: vec![version_after(prepared, base)],
            spent: 0,
        }
    }

    /// Values published exactly once, and rounded in a revision, are still
    /// known exactly: the audit of the revision uses them, so a corrected
    /// cell is not narrowed within its protection. (Found by review.)
    #[test]
    fn an_earlier_exact_value_of_a_cell_published_rounded_now_counts() {
        let mut setup = Setup::new();
        let v1 = setup
            .prepare(&[
                row("jobs", "city-a", "2025", 30.0, 30),
                row("jobs", "city-a/north", "2025", 10.0, 10),
                row("jobs", "city-a/south", "2025", 10.0, 10),
                row("jobs", "city-a/east", "2025", 10.0, 10),
            ])
            .unwrap();
        assert!(v1.refusal.is_none());
        let mut feed = feed_after(&v1, None);
        setup.policy.overrides.push(Override {
            code: "jobs".into(),
            rounding_base: Some(10.0),
            ..Override::default()
        });
        setup.policy.check(&setup.catalog).unwrap();
        let v2 = setup
            .prepare_in(
                &[
                    row("jobs", "city-a", "2025", 22.0, 22),
                    row("jobs", "city-a/north", "2025", 10.0, 10),
                    row("jobs", "city-a/south", "2025", 10.0, 10),
                    row("jobs", "city-a/east", "2025", 2.0, 2),
                ],
                &mut feed,
            )
            .unwrap();
        if v2.refusal.is_some() {
            return;
        }
        // Else the city's rounded value, less north and south as
        // published before, must leave east its protection [0, 5].
        let city = v2.batch.observations[0].value.expect("city published");
        let (lo, hi) = crate::core::sdc::rounding::rounding_interval(city, 10.0, true);
        let (east_lo, east_hi) = ((lo - 20.0).max(0.0), hi - 20.0);
        assert!(
            east_lo <= 0.0 && east_hi >= 5.0,
            "east narrowed to [{east_lo}, {east_hi}] and the revision was published"
        );
    }

    /// A table without totals is checked against earlier values too: a
    /// cell suppressed now whose value an earlier version published is
    /// refused, not signed as confidential. (Found by review.)
    #[test]
    fn an_earlier_value_revealing_a_cell_of_a_table_without_totals_refuses() {
        let setup = Setup::new();
        let v1 = setup
            .prepare(&[
                row("jobs", "city-a/north", "2025", 9.0, 9),
                row("jobs", "city-a/south", "2025", 30.0, 30),
            ])
            .unwrap();
        let mut feed = feed_after(&v1, None);
        let v2 = setup
            .prepare_in(
                &[
                    row("jobs", "city-a/north", "2025", 9.0, 2),
                    row("jobs", "city-a/south", "2025", 30.0, 30),
                ],
                &mut feed,
            )
            .unwrap();
        assert_eq!(v2.batch.observations[0].value, None);
        let refusal = v2
            .refusal
            .expect("north's value 9 is in the feed, and it was not refused");
        assert!(refusal.contains("earlier version"), "{refusal}");
    }

    /// The rows of a count table `jobs` for 2025: the city, then each
    /// district with its value (as many contributors as its count).
    fn jobs_table(city: f64, districts: &[(&str, f64)]) -> Vec<InputRow> {
        let mut rows = vec![row("jobs", "city-a", "2025", city, city as u64)];
        for &(district, value) in districts {
            let area = format!("city-a/{district}");
            rows.push(row("jobs", &area, "2025", value, value as u64));
        }
        rows
    }

    /// The version of the review's example: city 91, the sum of north 1,
    /// south 30, east 30 and west 30, published as city 91, east 30 and
    /// west 30 (north primary, south its complement).
    fn version_one() -> EarlierVersion {
        EarlierVersion {
            cells: vec![
                version_cell("city-a", Some((91.0, 91.0))),
                version_cell("city-a/north", None),
                version_cell("city-a/south", None),
                version_cell("city-a/east", Some((30.0, 30.0))),
                version_cell("city-a/west", Some((30.0, 30.0))),
            ],
        }
    }

    fn with_west() -> Setup {
        let mut setup = Setup::new();
        setup.districts.push("west".into());
        setup
    }

    /// A revision is audited with the equations of the earlier version:
    /// taking the cells that did not visibly change as unchanged, north +
    /// south = 91 - 30 - 30 = 31 from version 1, and the corrected west =
    /// 63 - 31 - 30 = 2 exactly, whatever version 2 suppresses. (Found by
    /// review.)
    #[test]
    fn a_revision_is_refused_when_an_earlier_versions_totals_reveal_a_cell() {
        let setup = with_west();
        let mut feed = Feed {
            versions: vec![version_one()],
            spent: 0,
        };
        let v2 = setup
            .prepare_in(
                &jobs_table(
                    63.0,
                    &[
                        ("north", 1.0),
                        ("south", 30.0),
                        ("east", 30.0),
                        ("west", 2.0),
                    ],
                ),
                &mut feed,
            )
            .unwrap();
        assert_eq!(
            v2.batch.observations[0].value,
            Some(63.0),
            "the city is published"
        );
        let refusal = v2
            .refusal
            .expect("west = 2 is derivable, and v2 was not refused");
        assert!(
            refusal.starts_with("jobs (local) for 2025: with the values an earlier version")
                && refusal.contains(" west could be narrowed")
                && refusal.ends_with("nothing was published"),
            "{refusal}"
        );
    }

    /// A district added in a revision leaks the same way: version 1 tells
    /// north + south = 61 - 30 = 31, so the new west = 63 - 31 - 30.
    #[test]
    fn a_district_added_in_a_revision_is_audited_with_the_earlier_totals() {
        let setup = with_west();
        let mut feed = Feed {
            versions: vec![EarlierVersion {
                cells: vec![
                    version_cell("city-a", Some((61.0, 61.0))),
                    version_cell("city-a/north", None),
                    version_cell("city-a/south", None),
                    version_cell("city-a/east", Some((30.0, 30.0))),
                ],
            }],
            spent: 0,
        };
        let v2 = setup
            .prepare_in(
                &jobs_table(
                    63.0,
                    &[
                        ("north", 1.0),
                        ("south", 30.0),
                        ("east", 30.0),
                        ("west", 2.0),
                    ],
                ),
                &mut feed,
            )
            .unwrap();
        let refusal = v2
            .refusal
            .expect("the added west is derivable, and it was not refused");
        assert!(refusal.contains(" west could be narrowed"), "{refusal}");
    }

    /// A correction of a suppressed cell makes the earlier version's
    /// equation false with every cell taken as unchanged (91 is not
    /// 1 + 40 + 30 + 30): the attacker learns only that north or
    /// south changed, the audit drops the tie of south, and the revision,
    /// which narrows nothing within its protection, is published.
    #[test]
    fn a_correction_of_a_suppressed_cell_that_reveals_nothing_is_published() {
        let setup = with_west();
        let mut feed = Feed {
            versions: vec![version_one()],
            spent: 0,
        };
        let v2 = setup
            .prepare_in(
                &jobs_table(
                    101.0,
                    &[
                        ("north", 1.0),
                        ("south", 40.0),
                        ("east", 30.0),
                        ("west", 30.0),
                    ],
                ),
                &mut feed,
            )
            .unwrap();
        assert_eq!(v2.refusal, None);
        assert_eq!(
            v2.batch.observations[1].value, None,
            "north stays suppressed"
        );
        assert_eq!(
            v2.batch.observations[2].value, None,
            "south stays suppressed"
        );
        // Two revisions, the second restating the first: both versions'
        // equations count, and still nothing is narrowed.
        feed.versions.push(version_after(&v2, None));
        let v3 = setup
            .prepare_in(
                &jobs_table(
                    101.0,
                    &[
                        ("north", 1.0),
                        ("south", 40.0),
                        ("east", 30.0),
                        ("west", 30.0),
                    ],
                ),
                &mut feed,
            )
            .unwrap();
        assert_eq!(v3.refusal, None);
    }

    /// A version that does not add up with what it published cannot be
    /// audited against: the revision is refused, not signed unaudited.
    #[test]
    fn a_revision_that_cannot_be_audited_is_refused() {
        let setup = with_west();
        let mut odd = version_one();
        odd.cells[0].known = Some((50.0, 50.0));
        let mut feed = Feed {
            versions: vec![odd],
            spent: 0,
        };
        let v2 = setup
            .prepare_in(
                &jobs_table(
                    101.0,
                    &[
                        ("north", 1.0),
                        ("south", 40.0),
                        ("east", 30.0),
                        ("west", 30.0),
                    ],
                ),
                &mut feed,
            )
            .unwrap();
        let refusal = v2.refusal.expect("published unaudited");
        assert!(
            refusal.starts_with(
                "jobs (local) for 2025: an earlier version of this table does not add up"
            ) && refusal.ends_with("; nothing was published"),
            "{refusal}"
        );
    }
}
