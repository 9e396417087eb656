//! Ingest: indicator rows from CSV or JSON files, their validation, and the
//! threshold rule that decides which cells are published with a value.
//!
//! Contributor counts exist only here: they decide suppression and are
//! dropped before anything is signed. No error message repeats them.

use std::collections::{HashMap, HashSet};

use civex_proto::v1::{
    ConfidentialityStatus, DisclosureRules, FunctionalArea, IndicatorBatch, Observation,
    ObservationStatus, PublishGroup,
};
use prost::Message;

use super::period::Period;

/// Name of the rule set applied by this ingest.
pub const RULE_SET_NAME: &str = "civex-threshold";
/// Version of that rule set.
pub const RULE_SET_VERSION: &str = "1";
/// Default threshold: cells with fewer contributors are suppressed.
pub const DEFAULT_MIN_CONTRIBUTORS: u32 = 3;
/// Catalog edition used when a row names none.
pub const LOCAL_EDITION: &str = "local";

/// Columns a row must have.
pub const REQUIRED_COLUMNS: [&str; 7] = [
    "indicator",
    "area",
    "ref_area",
    "period",
    "value",
    "unit",
    "contributors",
];
/// Columns a row may have.
pub const OPTIONAL_COLUMNS: [&str; 3] = ["catalog_edition", "obs_status", "method_notes"];

/// One input row: an aggregate with its contributor count.
#[derive(Debug, Clone, PartialEq)]
pub struct InputRow {
    /// Line in the source file (0 when it did not come from a file).
    pub line: u64,
    /// Indicator code.
    pub indicator: String,
    /// Catalog edition; empty means [`LOCAL_EDITION`].
    pub catalog_edition: String,
    /// Functional area.
    pub area: FunctionalArea,
    /// Reference area.
    pub ref_area: String,
    /// ISO 8601 period.
    pub period: String,
    /// The value.
    pub value: f64,
    /// Unit.
    pub unit: String,
    /// Observation status.
    pub obs_status: ObservationStatus,
    /// Method notes.
    pub method_notes: String,
    /// Contributors behind the value (ingest-only).
    pub contributors: u64,
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
        .map_err(|_| err("value", format!("not a number: {value_text:?}")))?;
    let contributors: u64 = text("contributors").trim().parse().map_err(|_| {
        err(
            "contributors",
            "not a whole number of contributors".to_owned(),
        )
    })?;
    Ok(InputRow {
        line,
        indicator: text("indicator").trim().to_owned(),
        catalog_edition: text("catalog_edition").trim().to_owned(),
        area: parse_area(&text("area")).map_err(|m| err("area", m))?,
        ref_area: text("ref_area").trim().to_owned(),
        period: text("period").trim().to_owned(),
        value,
        unit: text("unit").trim().to_owned(),
        obs_status: parse_obs_status(&text("obs_status")).map_err(|m| err("obs_status", m))?,
        method_notes: text("method_notes"),
        contributors,
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
    for (index, record) in reader.records().enumerate() {
        let record = record.map_err(|err| {
            let line = err.position().map_or(0, |p| p.line());
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
        let line = record.position().map_or(0, |p| p.line());
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
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|err| RowError::new(0, err.line() as u64, "json", err.to_string()))?;
    let serde_json::Value::Array(items) = value else {
        return Err(RowError::new(
            0,
            1,
            "json",
            "expected an array of row objects",
        ));
    };
    let lines = element_lines(text);
    let mut rows = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let line = lines.get(index).copied().unwrap_or(0);
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
                other => {
                    return Err(RowError::new(
                        index + 1,
                        line,
                        key,
                        format!("expected a string or number, found {other}"),
                    ))
                }
            };
            fields.insert(key.as_str(), text);
        }
        rows.push(row_from_fields(index + 1, line, &fields)?);
    }
    Ok(rows)
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

/// Where a cell sits: the city as a whole or one of its districts. A feed
/// never holds both for one indicator and period (no total with components
/// until secondary suppression exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level {
    /// The city as a whole.
    City,
    /// A district.
    District,
}

/// What an ingest needs to know about the node.
#[derive(Debug, Clone)]
pub struct IngestContext<'a> {
    /// This node's origin id.
    pub origin: &'a str,
    /// Configured district names.
    pub districts: &'a [String],
    /// Threshold rule.
    pub min_contributors: u32,
}

/// A validated batch ready to sign.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedBatch {
    /// The payload.
    pub batch: IndicatorBatch,
    /// Cells published with a value.
    pub published: u32,
    /// Cells suppressed.
    pub suppressed: u32,
}

fn check_code(text: &str, what: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if text.len() > 128 {
        return Err(format!("{what} is longer than 128 bytes"));
    }
    if let Some(bad) = text
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._:/-".contains(*c)))
    {
        return Err(format!(
            "{what} {text:?} may hold only A-Z, a-z, 0-9 and . _ : / -, found {bad:?}"
        ));
    }
    Ok(())
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

/// Validates rows and applies the threshold rule. `existing_level` says at
/// which levels the feed already holds cells for (indicator, edition, period).
pub fn prepare_batch(
    context: &IngestContext<'_>,
    rows: &[InputRow],
    mut existing_level: impl FnMut(&str, &str, &str) -> HashSet<Level>,
) -> Result<PreparedBatch, RowError> {
    if rows.is_empty() {
        return Err(RowError::new(0, 0, "rows", "no rows to publish"));
    }
    let mut seen_keys = HashSet::new();
    let mut levels: HashMap<(String, String, String), HashSet<Level>> = HashMap::new();
    let mut observations = Vec::with_capacity(rows.len());
    let (mut published, mut suppressed) = (0, 0);
    for (index, row) in rows.iter().enumerate() {
        let err =
            |column: &str, message: String| RowError::new(index + 1, row.line, column, message);
        check_code(&row.indicator, "indicator code").map_err(|m| err("indicator", m))?;
        let edition = if row.catalog_edition.is_empty() {
            LOCAL_EDITION.to_owned()
        } else {
            row.catalog_edition.clone()
        };
        check_code(&edition, "catalog edition").map_err(|m| err("catalog_edition", m))?;
        if row.area == FunctionalArea::Unspecified {
            return Err(err("area", "functional area is missing".into()));
        }
        let level = if row.ref_area == context.origin {
            Level::City
        } else {
            match row.ref_area.split_once('/') {
                Some((origin, district))
                    if origin == context.origin
                        && context.districts.iter().any(|d| d == district) =>
                {
                    Level::District
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
        if !row.value.is_finite() {
            return Err(err("value", format!("value {} is not finite", row.value)));
        }
        if row.unit.is_empty() {
            return Err(err("unit", "unit is empty".into()));
        }
        check_text(&row.unit, 64, "unit").map_err(|m| err("unit", m))?;
        check_text(&row.method_notes, 1024, "method notes").map_err(|m| err("method_notes", m))?;
        let key = (
            row.indicator.clone(),
            edition.clone(),
            row.ref_area.clone(),
            row.period.clone(),
        );
        if !seen_keys.insert(key) {
            return Err(err(
                "indicator",
                format!(
                    "{} for {} in {} appears twice in this batch",
                    row.indicator, row.ref_area, row.period
                ),
            ));
        }
        let cell = (row.indicator.clone(), edition.clone(), row.period.clone());
        let cell_levels = levels
            .entry(cell)
            .or_insert_with(|| existing_level(&row.indicator, &edition, &row.period));
        cell_levels.insert(level);
        if cell_levels.len() > 1 {
            return Err(err(
                "ref_area",
                format!(
                    "{} in {} would be published both for the city as a whole and for districts; \
                     a total with its components is refused until secondary suppression exists",
                    row.indicator, row.period
                ),
            ));
        }
        let free = row.contributors >= u64::from(context.min_contributors);
        if free {
            published += 1;
        } else {
            suppressed += 1;
        }
        observations.push(Observation {
            indicator: row.indicator.clone(),
            catalog_edition: edition,
            area: row.area as i32,
            ref_area: row.ref_area.clone(),
            period: row.period.clone(),
            value: free.then_some(row.value),
            unit: row.unit.clone(),
            obs_status: row.obs_status as i32,
            conf_status: if free {
                ConfidentialityStatus::Free
            } else {
                ConfidentialityStatus::SuppressedPrimary
            } as i32,
            method_notes: row.method_notes.clone(),
            breakdown: String::new(),
        });
    }
    Ok(PreparedBatch {
        batch: IndicatorBatch {
            observations,
            rules: Some(DisclosureRules {
                name: RULE_SET_NAME.into(),
                version: RULE_SET_VERSION.into(),
                min_contributors: context.min_contributors,
            }),
            group: None,
        },
        published,
        suppressed,
    })
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
    let overhead = batch.rules.as_ref().map_or(0, |r| r.encoded_len() + 3) + 40;
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
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_batches_split_into_a_group_and_small_ones_stay_whole() {
        let rows: Vec<InputRow> = (0..3000)
            .map(|i| InputRow {
                line: 0,
                indicator: format!("indicator-{i}"),
                catalog_edition: String::new(),
                area: FunctionalArea::Economy,
                ref_area: "city-a".into(),
                period: "2025".into(),
                value: i as f64,
                unit: "count".into(),
                obs_status: ObservationStatus::Normal,
                method_notes: String::new(),
                contributors: 10,
            })
            .collect();
        let ctx = IngestContext {
            origin: "city-a",
            districts: &[],
            min_contributors: 3,
        };
        let batch = prepare_batch(&ctx, &rows, |_, _, _| HashSet::new())
            .unwrap()
            .batch;
        let small = prepare_batch(&ctx, &rows[..10], |_, _, _| HashSet::new())
            .unwrap()
            .batch;
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
            joined.extend(part.observations.clone());
        }
        assert_eq!(joined, batch.observations);
    }

    const CSV: &str = "indicator,area,ref_area,period,value,unit,contributors\n\
        37120:2018/5.1,economy,city-a,2025,7.5,percent,4321\n\
        37120:2018/8.1,public-services,city-a/north,2025-Q3,2,per 100000,2\n";

    fn context() -> (String, Vec<String>) {
        ("city-a".into(), vec!["north".into(), "south".into()])
    }

    fn prepare(rows: &[InputRow]) -> Result<PreparedBatch, RowError> {
        let (origin, districts) = context();
        let ctx = IngestContext {
            origin: &origin,
            districts: &districts,
            min_contributors: 3,
        };
        prepare_batch(&ctx, rows, |_, _, _| HashSet::new())
    }

    #[test]
    fn csv_rows_parse_with_their_lines() {
        let rows = parse_csv(CSV).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].line, 3);
        assert_eq!(rows[1].area, FunctionalArea::PublicServices);
        assert_eq!(rows[1].contributors, 2);
    }

    #[test]
    fn threshold_suppresses_small_cells_and_drops_counts() {
        let prepared = prepare(&parse_csv(CSV).unwrap()).unwrap();
        assert_eq!((prepared.published, prepared.suppressed), (1, 1));
        let cells = &prepared.batch.observations;
        assert_eq!(cells[0].value, Some(7.5));
        assert_eq!(cells[1].value, None);
        assert_eq!(
            cells[1].conf_status,
            ConfidentialityStatus::SuppressedPrimary as i32
        );
        let encoded = format!("{:?}", prepared.batch);
        assert!(
            !encoded.contains("4321"),
            "a contributor count leaked: {encoded}"
        );
    }

    #[test]
    fn file_errors_name_line_and_column() {
        let cases = [
            ("indicator,area\nx,1\n", "1: ref_area: required column is missing"),
            (
                "indicator,area,ref_area,period,value,unit,contributors,name\n",
                "1: name: unknown column",
            ),
            (
                "indicator,area,ref_area,period,value,unit,contributors\nx,1,city-a,2025,\"1,2.3\",u,5\n",
                "2: value: not a number: \"1,2.3\"",
            ),
            (
                "indicator,area,ref_area,period,value,unit,contributors\nx,9,city-a,2025,1,u,5\n",
                "2: area: unknown functional area \"9\"",
            ),
            (
                "indicator,area,ref_area,period,value,unit,contributors\nx,1,city-a,2025,1,u\n",
                "2: row: row has 6 fields, the header has 7",
            ),
        ];
        for (input, expected) in cases {
            let err = parse_csv(input).unwrap_err().to_string();
            assert!(
                err.starts_with(expected),
                "{err:?} does not start with {expected:?}"
            );
        }
        let err = parse_csv(
            "indicator,area,ref_area,period,value,unit,contributors\nx,1,city-a,2025,1,u,x17\n",
        )
        .unwrap_err()
        .to_string();
        assert!(!err.contains("x17"), "contributors echoed: {err}");
    }

    #[test]
    fn validation_errors_name_row_and_column() {
        let base = parse_csv(CSV).unwrap();
        let with = |change: &dyn Fn(&mut InputRow)| {
            let mut rows = base.clone();
            change(&mut rows[1]);
            prepare(&rows).unwrap_err().to_string()
        };
        assert!(with(&|r| r.ref_area = "city-b".into())
            .starts_with("3: ref_area: unknown reference area \"city-b\""));
        assert!(with(&|r| r.ref_area = "city-a/east".into())
            .contains("known: city-a, city-a/north, city-a/south"));
        assert!(with(&|r| r.period = "2025-Q9".into()).starts_with("3: period:"));
        assert!(with(&|r| r.value = f64::NAN).starts_with("3: value: value NaN is not finite"));
        assert!(with(&|r| r.indicator = "a b".into()).starts_with("3: indicator:"));
        assert!(with(&|r| {
            r.indicator = "37120:2018/5.1".into();
            r.ref_area = "city-a".into();
            r.period = "2025".into();
            r.area = FunctionalArea::Economy;
        })
        .contains("appears twice"));
        assert!(with(&|r| {
            r.indicator = "37120:2018/5.1".into();
            r.period = "2025".into();
        })
        .contains("a total with its components is refused"));
    }

    #[test]
    fn totals_against_the_existing_feed_are_refused() {
        let (origin, districts) = context();
        let ctx = IngestContext {
            origin: &origin,
            districts: &districts,
            min_contributors: 3,
        };
        let rows = parse_csv(CSV).unwrap();
        let err = prepare_batch(&ctx, &rows[..1], |_, _, _| HashSet::from([Level::District]))
            .unwrap_err();
        assert_eq!(err.column, "ref_area");
    }

    #[test]
    fn json_rows_parse_with_their_lines() {
        let text = r#"[
  {"indicator": "x", "area": 4, "ref_area": "city-a", "period": "2025",
   "value": 1.5, "unit": "t", "contributors": 10},
  {"indicator": "y", "area": "governance", "ref_area": "city-a", "period": "2025",
   "value": "oops", "unit": "t", "contributors": 10}
]"#;
        let err = parse_json(text).unwrap_err();
        assert_eq!((err.line, err.column.as_str()), (4, "value"));
        let ok = parse_json(&text.replace("\"oops\"", "2")).unwrap();
        assert_eq!(ok[1].area, FunctionalArea::Governance);
        assert!(parse_json(r#"[{"indicator": "x", "secret": 1}]"#)
            .unwrap_err()
            .to_string()
            .contains("secret: unknown column"));
        assert!(parse_json("{").is_err());
    }
}
