//! `civex catalog ...`: the indicator catalog a node validates rows
//! against, and the disclosure control each indicator gets. Local: reads
//! files, talks to no node.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{anyhow, Context};
use civex_node::{
    config::Config,
    core::{
        catalog::{Catalog, Edition, Indicator},
        ingest::{area_slug, parse_area},
        policy::Policy,
    },
};
use clap::Subcommand;
use serde_json::json;

use crate::output::{self, Format};

/// `civex catalog ...`
#[derive(Subcommand)]
pub(crate) enum CatalogCommand {
    /// List the indicators: the editions shipped with civex, plus the
    /// city's own file when --config names a node.toml with catalog.file.
    List {
        #[command(flatten)]
        source: Source,
        /// Only this edition, e.g. iso37120:2014.
        #[arg(long)]
        edition: Option<String>,
        /// Only this functional area (1-7 or its name).
        #[arg(long)]
        area: Option<String>,
    },
    /// One indicator, with the disclosure control it gets on the node.
    Show {
        /// Indicator code, e.g. 5.1.
        code: String,
        /// Catalog edition, when several have the code.
        #[arg(long)]
        edition: Option<String>,
        #[command(flatten)]
        source: Source,
    },
    /// Check a city's own catalog file (the format of node/catalog/*.toml).
    Validate {
        /// The file.
        file: PathBuf,
    },
}

/// Where the catalog and policy come from.
#[derive(clap::Args)]
pub(crate) struct Source {
    /// A node's node.toml: its catalog.file and [disclosure] settings.
    #[arg(long)]
    config: Option<PathBuf>,
}

impl Source {
    fn load(&self) -> anyhow::Result<(Catalog, Policy)> {
        match &self.config {
            None => Ok((Catalog::builtin(), Policy::default())),
            Some(path) => {
                let config = Config::load(path, std::iter::empty())?;
                config
                    .indicator_rules()
                    .map_err(|m| anyhow!("{}: {m}", path.display()))
            }
        }
    }
}

fn row(indicator: &Indicator) -> Vec<String> {
    vec![
        indicator.edition.clone(),
        indicator.code.clone(),
        indicator.label.clone(),
        indicator.unit.clone(),
        area_slug(indicator.area as i32).to_owned(),
        indicator.kind.name().to_owned(),
        indicator.frequency.name().to_owned(),
        indicator.subjects.name().to_owned(),
    ]
}

fn describe(indicator: &Indicator) -> serde_json::Value {
    json!({
        "edition": indicator.edition, "code": indicator.code, "label": indicator.label,
        "unit": indicator.unit, "area": area_slug(indicator.area as i32),
        "kind": indicator.kind.name(), "frequency": indicator.frequency.name(),
        "subjects": indicator.subjects.name(),
    })
}

const HEADERS: [&str; 8] = [
    "edition",
    "code",
    "label",
    "unit",
    "area",
    "kind",
    "frequency",
    "subjects",
];

pub(crate) fn run(command: CatalogCommand, format: Format) -> anyhow::Result<ExitCode> {
    match command {
        CatalogCommand::List {
            source,
            edition,
            area,
        } => {
            let (catalog, _) = source.load()?;
            if let Some(edition) = &edition {
                if !catalog.editions().iter().any(|e| &e.id == edition) {
                    let known: Vec<&str> =
                        catalog.editions().iter().map(|e| e.id.as_str()).collect();
                    anyhow::bail!(
                        "--edition: unknown edition {edition:?} (known: {})",
                        known.join(", ")
                    );
                }
            }
            let area = area
                .map(|a| parse_area(&a).map_err(|m| anyhow!("--area: {m}")))
                .transpose()?;
            let chosen: Vec<&Indicator> = catalog
                .indicators()
                .filter(|i| edition.as_ref().is_none_or(|e| &i.edition == e))
                .filter(|i| area.is_none_or(|a| i.area == a))
                .collect();
            match format {
                Format::Json => output::json(&serde_json::Value::Array(
                    chosen.iter().map(|i| describe(i)).collect(),
                )),
                Format::Table => {
                    output::table(&HEADERS, &chosen.iter().map(|i| row(i)).collect::<Vec<_>>())
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CatalogCommand::Show {
            code,
            edition,
            source,
        } => {
            let (catalog, policy) = source.load()?;
            let indicator = catalog
                .find(&code, edition.as_deref())
                .map_err(|m| anyhow!("{m}"))?;
            let resolved = policy.resolve(indicator);
            let settings = &resolved.settings;
            let rules: Vec<(String, String)> = [
                (
                    "threshold".to_owned(),
                    settings.threshold.map_or("off".into(), |t| {
                        format!("fewer than {} contributors: suppressed", t.min_contributors)
                    }),
                ),
                (
                    "dominance".to_owned(),
                    settings.dominance.map_or("off".into(), |d| {
                        format!("the {} largest holding more than {}%: suppressed", d.n, d.k)
                    }),
                ),
                (
                    "p-percent".to_owned(),
                    settings
                        .p_percent
                        .map_or("off".into(), |p| format!("p = {}%", p.p)),
                ),
                (
                    "secondary".to_owned(),
                    if settings.secondary { "on" } else { "off" }.into(),
                ),
                (
                    "rounding".to_owned(),
                    settings
                        .rounding
                        .map_or("off".into(), |r| format!("to a multiple of {}", r.base)),
                ),
                (
                    "noise".to_owned(),
                    match (&settings.noise, resolved.budget_rho) {
                        (Some(n), Some(rho)) => {
                            format!(
                                "{:?}, clamp {}, budget rho {rho} per period",
                                n.mechanism, n.clamp_bound
                            )
                        }
                        _ => "off".into(),
                    },
                ),
            ]
            .into();
            match format {
                Format::Json => {
                    let mut value = describe(indicator);
                    value["disclosure"] = rules
                        .iter()
                        .map(|(k, v)| (k.clone(), json!(v)))
                        .collect::<serde_json::Map<_, _>>()
                        .into();
                    output::json(&value);
                }
                Format::Table => {
                    output::table(&HEADERS, &[row(indicator)]);
                    output::table(
                        &["rule", "setting"],
                        &rules
                            .into_iter()
                            .map(|(k, v)| vec![k, v])
                            .collect::<Vec<_>>(),
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CatalogCommand::Validate { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("{}: cannot read", file.display()))?;
            let source = file.display().to_string();
            let edition = Edition::parse(&text, &source)?;
            let count = edition.indicators.len();
            let id = edition.id.clone();
            Catalog::builtin().add(edition)?;
            match format {
                Format::Json => {
                    output::json(&json!({"file": source, "edition": id, "indicators": count}))
                }
                Format::Table => println!("{source}: edition {id:?}, {count} indicators, valid"),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
