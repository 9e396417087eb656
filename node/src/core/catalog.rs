//! The indicator catalog: which indicator codes a node publishes, with their
//! unit, functional area, aggregation kind, frequency and whose records they
//! are computed from (which decides the default disclosure control).
//!
//! The node ships the editions in `node/catalog/*.toml` (codes and short
//! labels only, never the standards' text); a city adds its own codes in a
//! file of the same format. Ingest validates every row against it.

use std::collections::BTreeMap;

use civex_proto::v1::FunctionalArea;
use serde::Deserialize;

use super::ingest::{parse_area, AREA_SLUGS};
use super::period::Period;
use super::sdc::AggregationKind;

/// The editions shipped with the node: (file name, text).
const BUILTIN: &[(&str, &str)] = &[
    (
        "iso37120-2014.toml",
        include_str!("../../catalog/iso37120-2014.toml"),
    ),
    (
        "iso37123-2019.toml",
        include_str!("../../catalog/iso37123-2019.toml"),
    ),
    (
        "u4ssc-2017.toml",
        include_str!("../../catalog/u4ssc-2017.toml"),
    ),
];

/// How often an indicator is reported; a row's period must have that length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frequency {
    /// `YYYY`.
    Annual,
    /// `YYYY-Sn`.
    Semiannual,
    /// `YYYY-Qn`.
    Quarterly,
    /// `YYYY-MM`.
    Monthly,
}

impl Frequency {
    fn parse(text: &str) -> Result<Self, String> {
        Ok(match text {
            "annual" => Frequency::Annual,
            "semiannual" => Frequency::Semiannual,
            "quarterly" => Frequency::Quarterly,
            "monthly" => Frequency::Monthly,
            other => {
                return Err(format!(
                    "unknown frequency {other:?} (annual, semiannual, quarterly, monthly)"
                ))
            }
        })
    }

    /// Stable name.
    pub fn name(self) -> &'static str {
        match self {
            Frequency::Annual => "annual",
            Frequency::Semiannual => "semiannual",
            Frequency::Quarterly => "quarterly",
            Frequency::Monthly => "monthly",
        }
    }

    fn months(self) -> u32 {
        match self {
            Frequency::Annual => 12,
            Frequency::Semiannual => 6,
            Frequency::Quarterly => 3,
            Frequency::Monthly => 1,
        }
    }

    /// Checks that `period` is one period of this frequency.
    pub fn check(self, period: &str) -> Result<(), String> {
        let parsed = Period::parse(period)?;
        if parsed.last_month + 1 - parsed.first_month != self.months() {
            return Err(format!(
                "period {period:?} is not {} (the indicator is reported {}: {})",
                match self {
                    Frequency::Annual => "a year",
                    Frequency::Semiannual => "a half-year",
                    Frequency::Quarterly => "a quarter",
                    Frequency::Monthly => "a month",
                },
                self.name(),
                match self {
                    Frequency::Annual => "YYYY",
                    Frequency::Semiannual => "YYYY-S1 or YYYY-S2",
                    Frequency::Quarterly => "YYYY-Q1 to YYYY-Q4",
                    Frequency::Monthly => "YYYY-MM",
                }
            ));
        }
        Ok(())
    }
}

/// Whose records an indicator is computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subjects {
    /// Residents: threshold rule and secondary suppression by default.
    Persons,
    /// Enterprises or establishments: threshold, dominance and p% rules
    /// and secondary suppression by default.
    Businesses,
    /// No individual behind the figure (the city's own accounts, physical
    /// measurements): no suppression; contributor counts are not needed.
    Public,
}

impl Subjects {
    fn parse(text: &str) -> Result<Self, String> {
        Ok(match text {
            "persons" => Subjects::Persons,
            "businesses" => Subjects::Businesses,
            "public" => Subjects::Public,
            other => {
                return Err(format!(
                    "unknown subjects {other:?} (persons, businesses, public)"
                ))
            }
        })
    }

    /// Stable name.
    pub fn name(self) -> &'static str {
        match self {
            Subjects::Persons => "persons",
            Subjects::Businesses => "businesses",
            Subjects::Public => "public",
        }
    }
}

/// One indicator of the catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct Indicator {
    /// Edition id, for example `iso37120:2018`.
    pub edition: String,
    /// Code within the edition, for example `5.1`.
    pub code: String,
    /// Short label.
    pub label: String,
    /// Unit of measure.
    pub unit: String,
    /// The one primary functional area.
    pub area: FunctionalArea,
    /// How cells aggregate.
    pub kind: AggregationKind,
    /// Reporting frequency.
    pub frequency: Frequency,
    /// Whose records it is computed from.
    pub subjects: Subjects,
}

/// One edition as read from a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Edition {
    /// Edition id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Where it came from: a built-in file name or a path.
    pub source: String,
    /// Its indicators, in file order.
    pub indicators: Vec<Indicator>,
}

/// What is wrong with a catalog file, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {location}{message}")]
pub struct CatalogError {
    /// The file.
    pub file: String,
    /// `indicator N (code): field: ` or empty.
    pub location: String,
    /// What is wrong.
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRaw {
    edition: String,
    name: String,
    #[serde(default)]
    indicator: Vec<toml::Spanned<IndicatorRaw>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IndicatorRaw {
    code: String,
    label: String,
    unit: String,
    area: String,
    kind: String,
    frequency: String,
    subjects: String,
}

/// Edition ids and codes: what a row may name.
pub(crate) fn check_token(text: &str, what: &str) -> Result<(), String> {
    if text.is_empty() || text.len() > 64 {
        return Err(format!("{what} must be 1 to 64 bytes"));
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

fn parse_kind(text: &str) -> Result<AggregationKind, String> {
    Ok(match text {
        "count" => AggregationKind::Count,
        "sum" => AggregationKind::Sum,
        "ratio" => AggregationKind::Ratio,
        "mean" => AggregationKind::Mean,
        other => return Err(format!("unknown kind {other:?} (count, sum, ratio, mean)")),
    })
}

impl Edition {
    /// Parses one catalog file; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self, CatalogError> {
        let error = |location: String, message: String| CatalogError {
            file: source.to_owned(),
            location,
            message,
        };
        let raw: FileRaw =
            toml::from_str(text).map_err(|err| error(String::new(), err.to_string()))?;
        check_token(&raw.edition, "edition").map_err(|m| error(String::new(), m))?;
        let mut indicators: Vec<Indicator> = Vec::with_capacity(raw.indicator.len());
        // Errors name the line where the indicator's table starts, counted
        // on from the table before (tables come in file order).
        let (mut counted_to, mut line) = (0, 1);
        for (index, item) in raw.indicator.into_iter().enumerate() {
            let start = item.span().start.clamp(counted_to, text.len());
            line += text.as_bytes()[counted_to..start]
                .iter()
                .filter(|b| **b == b'\n')
                .count();
            counted_to = start;
            let item = item.into_inner();
            let at = |field: &str| {
                format!(
                    "line {line}: indicator {} ({}): {field}: ",
                    index + 1,
                    item.code
                )
            };
            check_token(&item.code, "code").map_err(|m| error(at("code"), m))?;
            if indicators.iter().any(|i| i.code == item.code) {
                return Err(error(at("code"), "appears twice".into()));
            }
            if item.label.trim().is_empty() || item.label.chars().count() > 80 {
                return Err(error(at("label"), "must be 1 to 80 characters".into()));
            }
            if item.unit.trim().is_empty() || item.unit.len() > 64 {
                return Err(error(at("unit"), "must be 1 to 64 bytes".into()));
            }
            let area = parse_area(&item.area).map_err(|m| error(at("area"), m))?;
            if !AREA_SLUGS.contains(&item.area.as_str()) {
                return Err(error(
                    at("area"),
                    format!("use the area's slug ({})", AREA_SLUGS.join(", ")),
                ));
            }
            let kind = parse_kind(&item.kind).map_err(|m| error(at("kind"), m))?;
            let frequency =
                Frequency::parse(&item.frequency).map_err(|m| error(at("frequency"), m))?;
            let subjects = Subjects::parse(&item.subjects).map_err(|m| error(at("subjects"), m))?;
            indicators.push(Indicator {
                edition: raw.edition.clone(),
                code: item.code,
                label: item.label,
                unit: item.unit,
                area,
                kind,
                frequency,
                subjects,
            });
        }
        Ok(Edition {
            id: raw.edition,
            name: raw.name,
            source: source.to_owned(),
            indicators,
        })
    }
}

/// The catalog a node validates rows against.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Catalog {
    editions: Vec<Edition>,
    by_code: BTreeMap<String, Vec<(usize, usize)>>,
}

impl Catalog {
    /// The editions shipped with the node.
    pub fn builtin() -> Self {
        let mut catalog = Catalog::default();
        for (name, text) in BUILTIN {
            let edition =
                Edition::parse(text, name).expect("built-in catalog files are checked by tests");
            catalog
                .add(edition)
                .expect("built-in editions are distinct");
        }
        catalog
    }

    /// The built-in editions plus a city's own file.
    pub fn with_city_file(text: &str, source: &str) -> Result<Self, CatalogError> {
        let mut catalog = Self::builtin();
        catalog.add(Edition::parse(text, source)?)?;
        Ok(catalog)
    }

    /// Adds an edition; its id must be new.
    pub fn add(&mut self, edition: Edition) -> Result<(), CatalogError> {
        if let Some(known) = self.editions.iter().find(|e| e.id == edition.id) {
            return Err(CatalogError {
                file: edition.source.clone(),
                location: String::new(),
                message: format!(
                    "edition {:?} is already defined by {}; a city's own file needs an edition id of its own (for example \"local\")",
                    edition.id, known.source
                ),
            });
        }
        let e = self.editions.len();
        for (i, indicator) in edition.indicators.iter().enumerate() {
            self.by_code
                .entry(indicator.code.clone())
                .or_default()
                .push((e, i));
        }
        self.editions.push(edition);
        Ok(())
    }

    /// The editions, in load order.
    pub fn editions(&self) -> &[Edition] {
        &self.editions
    }

    /// Every indicator, edition by edition.
    pub fn indicators(&self) -> impl Iterator<Item = &Indicator> {
        self.editions.iter().flat_map(|e| e.indicators.iter())
    }

    /// The indicator `code` of `edition`; with no edition, of the one edition
    /// that has the code. The error says what is known instead.
    pub fn find(&self, code: &str, edition: Option<&str>) -> Result<&Indicator, String> {
        let found: Vec<&Indicator> = self
            .by_code
            .get(code)
            .into_iter()
            .flatten()
            .map(|&(e, i)| &self.editions[e].indicators[i])
            .collect();
        match edition {
            Some(edition) => {
                if !self.editions.iter().any(|e| e.id == edition) {
                    let ids: Vec<&str> = self.editions.iter().map(|e| e.id.as_str()).collect();
                    return Err(format!(
                        "unknown catalog edition {edition:?} (known: {})",
                        ids.join(", ")
                    ));
                }
                found.into_iter().find(|i| i.edition == edition).ok_or_else(|| {
                    format!("indicator {code:?} is not in catalog edition {edition:?} (`civex catalog list` shows the codes)")
                })
            }
            None => match found.as_slice() {
                [one] => Ok(one),
                [] => Err(format!(
                    "unknown indicator {code:?}: not in the node's catalog (`civex catalog list` shows the codes; a city adds its own in catalog.file)"
                )),
                many => Err(format!(
                    "indicator {code:?} is in several catalog editions ({}): name the edition",
                    many.iter().map(|i| i.edition.as_str()).collect::<Vec<_>>().join(", ")
                )),
            },
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A city file of the unit tests: a count and a ratio of persons, a
    /// quarterly sum of businesses, a public sum.
    pub(crate) const TEST_CATALOG: &str = r#"
edition = "local"
name = "test"
[[indicator]]
code = "jobs"
label = "Jobs"
unit = "count"
area = "economy"
kind = "count"
frequency = "annual"
subjects = "persons"
[[indicator]]
code = "rate"
label = "Unemployment"
unit = "percent"
area = "economy"
kind = "ratio"
frequency = "annual"
subjects = "persons"
[[indicator]]
code = "turnover"
label = "Turnover"
unit = "currency"
area = "economy"
kind = "sum"
frequency = "quarterly"
subjects = "businesses"
[[indicator]]
code = "roads"
label = "Roads"
unit = "km"
area = "infrastructure"
kind = "sum"
frequency = "annual"
subjects = "public"
"#;

    const CITY: &str = r#"
edition = "local"
name = "Our own"

[[indicator]]
code = "water-outage-hours"
label = "Hours without water per household"
unit = "hours"
area = "infrastructure"
kind = "mean"
frequency = "annual"
subjects = "persons"
"#;

    #[test]
    fn builtin_editions_parse_and_are_distinct() {
        let catalog = Catalog::builtin();
        assert_eq!(catalog.editions().len(), BUILTIN.len());
        for edition in catalog.editions() {
            for indicator in &edition.indicators {
                assert!(catalog.find(&indicator.code, Some(&edition.id)).is_ok());
            }
        }
    }

    #[test]
    fn a_city_file_adds_codes_found_with_or_without_edition() {
        let catalog = Catalog::with_city_file(CITY, "city.toml").unwrap();
        let found = catalog.find("water-outage-hours", None).unwrap();
        assert_eq!(found.edition, "local");
        assert_eq!(found.kind, AggregationKind::Mean);
        assert_eq!(found.area, FunctionalArea::Infrastructure);
        assert!(catalog.find("water-outage-hours", Some("local")).is_ok());
        let err = catalog.find("nope", None).unwrap_err();
        assert!(err.contains("unknown indicator \"nope\""), "{err}");
        let err = catalog
            .find("water-outage-hours", Some("other"))
            .unwrap_err();
        assert!(err.contains("unknown catalog edition"), "{err}");
    }

    #[test]
    fn file_errors_name_file_indicator_and_field() {
        let cases = [
            (
                CITY.replace("\"mean\"", "\"median\""),
                "line 5: indicator 1 (water-outage-hours): kind: unknown kind \"median\"",
            ),
            (
                CITY.replace("\"annual\"", "\"weekly\""),
                "frequency: unknown frequency",
            ),
            (
                CITY.replace("\"infrastructure\"", "\"roads\""),
                "area: unknown functional area",
            ),
            (
                CITY.replace("\"persons\"", "\"people\""),
                "subjects: unknown subjects",
            ),
            (
                CITY.replace(
                    "subjects = \"persons\"",
                    "subjects = \"persons\"\nsecret = 1",
                ),
                "unknown field `secret`",
            ),
            (
                format!("{CITY}\n{}", &CITY[CITY.find("[[indicator]]").unwrap()..]),
                "code: appears twice",
            ),
            (
                CITY.replace("\"water-outage-hours\"", "\"water outage\""),
                "code: code \"water outage\" may hold only",
            ),
        ];
        for (text, expected) in cases {
            let err = Catalog::with_city_file(&text, "city.toml")
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("city.toml: "), "{err}");
            assert!(err.contains(expected), "{err} lacks {expected}");
        }
    }

    #[test]
    fn periods_must_match_the_frequency() {
        assert!(Frequency::Annual.check("2025").is_ok());
        assert!(Frequency::Quarterly.check("2025-Q3").is_ok());
        assert!(Frequency::Monthly.check("2025-07").is_ok());
        assert!(Frequency::Semiannual.check("2025-S2").is_ok());
        let err = Frequency::Annual.check("2025-Q3").unwrap_err();
        assert!(err.contains("is not a year"), "{err}");
        assert!(Frequency::Quarterly.check("2025").is_err());
    }
}
