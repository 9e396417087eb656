//! `civex demo`: three city nodes on loopback, each publishing indicators in
//! all seven areas and an offer; one answers another's offer; they replicate
//! each other; the regional table is read from one node's replicas.

use std::{collections::BTreeMap, process::ExitCode, time::Duration};

use anyhow::{anyhow, Context};
use civex_node::core::ingest::{area_slug, InputRow, AREA_SLUGS};
use civex_proto::v1::{self as pb, FunctionalArea};

use crate::{
    client::{self, describe, with_retry},
    commands::{all_observations, all_offers, print_offers, row_message},
    output::{self, Format},
    region::{held_seq, node_status, start_region, wait_until, CitySpec},
};

const WAIT: Duration = Duration::from_secs(30);

/// (ISO 37120:2014 indicator, base value): one per functional area.
const INDICATORS: [(&str, f64); 7] = [
    ("12.3", 180.0), // physicians per 100 000 population
    ("5.1", 8.5),    // unemployment rate
    ("11.1", 71.0),  // voter turnout
    ("8.3", 2.4),    // greenhouse gas emissions per capita
    ("9.1", 7.0),    // debt service share of own-source revenue
    ("7.2", 96.0),   // population with electricity service
    ("5.3", 12.0),   // population living in poverty
];

fn sample_rows(origin: &str, districts: &[&str], city_index: usize) -> Vec<InputRow> {
    let factor = 1.0 + 0.07 * city_index as f64;
    let row =
        |indicator: &str, ref_area: String, period: &str, value: f64, contributors| InputRow {
            catalog_edition: if indicator.contains('.') {
                "iso37120:2014".into()
            } else {
                String::new()
            },
            contributors: Some(contributors),
            ..InputRow::new(indicator, &ref_area, period, value)
        };
    let mut rows: Vec<InputRow> = INDICATORS
        .iter()
        .map(|(code, base)| {
            let value = (base * factor * 100.0).round() / 100.0;
            row(code, origin.into(), "2025", value, 500)
        })
        .collect();
    // A quarterly count with too few businesses behind it: suppressed.
    rows.push(row("new-large-firms", origin.into(), "2025-Q3", 2.0, 2));
    // Households without water, by district and for the city: a small
    // district is suppressed, and another cell so that it cannot be
    // recomputed from the total.
    let mut total = 0.0;
    for (i, district) in districts.iter().enumerate() {
        let households = if i == 1 { 2.0 } else { 40.0 + 5.0 * i as f64 };
        total += households;
        rows.push(row(
            "households-without-water",
            format!("{origin}/{district}"),
            "2025",
            households,
            households as u64,
        ));
        rows.push(row(
            "21.6",
            format!("{origin}/{district}"),
            "2025",
            3.0 + i as f64,
            120,
        ));
    }
    if !districts.is_empty() {
        rows.push(row(
            "households-without-water",
            origin.into(),
            "2025",
            total,
            total as u64,
        ));
    }
    rows
}

pub(crate) async fn run(keep_running: bool, format: Format) -> anyhow::Result<ExitCode> {
    let root = tempfile::Builder::new().prefix("civex-demo-").tempdir()?;
    let cities = [
        ("vale-do-sol", "Vale do Sol", &["centro", "norte"][..]),
        ("sao-bento", "São Bento", &[][..]),
        ("rio-claro", "Rio Claro", &[][..]),
    ];
    let specs: Vec<CitySpec<'_>> = cities
        .iter()
        .enumerate()
        .map(|(i, (origin, name, districts))| CitySpec {
            origin,
            name,
            districts,
            peers: (0..cities.len()).filter(|p| *p != i).collect(),
        })
        .collect();
    eprintln!(
        "starting {} city nodes under {}",
        cities.len(),
        root.path().display()
    );
    let mut nodes = start_region(root.path(), &specs, false).await?;
    for node in &nodes {
        wait_until(
            &format!("{} to open publishing", node.origin),
            WAIT,
            || async {
                node_status(&node.client)
                    .await
                    .is_some_and(|s| s.publish_ready)
            },
        )
        .await?;
    }

    for (i, node) in nodes.iter().enumerate() {
        let rows = sample_rows(&node.origin, cities[i].2, i);
        let publisher = client::publish(&node.client)?;
        let request = pb::PublishIndicatorsRequest {
            idempotency_key: client::idempotency_key()?,
            rows: rows.iter().map(row_message).collect(),
        };
        let receipt = with_retry(WAIT, || {
            let (mut p, r) = (publisher.clone(), request.clone());
            async move { p.publish_indicators(r).await }
        })
        .await
        .map_err(|s| anyhow!("{}: publish failed: {}", node.origin, describe(&s)))?
        .into_inner();
        eprintln!(
            "{}: published {} cells ({} suppressed) as seq {}",
            node.origin,
            receipt.published + receipt.suppressed,
            receipt.suppressed,
            receipt.seq
        );
        let offers = [
            (
                "shared-data-centre",
                "Shared data centre capacity",
                FunctionalArea::Infrastructure,
                "data-centre",
            ),
            (
                "school-transport",
                "Rural school transport routes",
                FunctionalArea::PublicServices,
                "school-transport",
            ),
            (
                "joint-procurement",
                "Joint procurement of street lighting",
                FunctionalArea::Environment,
                "joint-procurement",
            ),
        ];
        let (offer_id, title, area, category) = offers[i % offers.len()];
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs() as i64;
        let request = pb::PublishOfferRequest {
            idempotency_key: client::idempotency_key()?,
            offer: Some(pb::ServiceOffer {
                offer_id: offer_id.into(),
                title: title.into(),
                description: format!("{} offers this to its neighbours.", cities[i].1),
                area: area as i32,
                category: category.into(),
                capacity: "3 municipalities".into(),
                terms: "cost shared by population".into(),
                region: "demo region".into(),
                valid_from_unix: now - 86_400,
                valid_until_unix: now + 365 * 86_400,
                contact_role: "inter-municipal office".into(),
            }),
        };
        with_retry(WAIT, || {
            let (mut p, r) = (publisher.clone(), request.clone());
            async move { p.publish_offer(r).await }
        })
        .await
        .map_err(|s| anyhow!("{}: offer failed: {}", node.origin, describe(&s)))?;
    }

    // São Bento answers Vale do Sol's offer once it holds it.
    let (offering, answering) = (&nodes[0], &nodes[1]);
    wait_until("the offer to replicate", WAIT, || async {
        held_seq(&answering.client, &offering.origin).await >= 2
    })
    .await?;
    let publisher = client::publish(&answering.client)?;
    let request = pb::RespondOfferRequest {
        idempotency_key: client::idempotency_key()?,
        offer_origin: offering.origin.clone(),
        offer_id: "shared-data-centre".into(),
        offer_version_hash: Vec::new(),
        kind: pb::ResponseKind::Interest as i32,
        message: "We would like 2 racks from 2026.".into(),
    };
    with_retry(WAIT, || {
        let (mut p, r) = (publisher.clone(), request.clone());
        async move { p.respond_offer(r).await }
    })
    .await
    .map_err(|s| anyhow!("{}: response failed: {}", answering.origin, describe(&s)))?;
    eprintln!(
        "{} answered {}'s offer: interest",
        answering.origin, offering.origin
    );

    // Every node must hold every origin's head.
    let mut heads = BTreeMap::new();
    for node in &nodes {
        heads.insert(
            node.origin.clone(),
            held_seq(&node.client, &node.origin).await,
        );
    }
    for node in &nodes {
        for (origin, seq) in &heads {
            wait_until(
                &format!("{} to replicate {origin}", node.origin),
                WAIT,
                || async { held_seq(&node.client, origin).await >= *seq },
            )
            .await?;
        }
    }

    let reader = &nodes[2];
    let records = all_observations(&reader.client, pb::ObservationsRequest::default()).await?;
    let offers = all_offers(&reader.client, pb::OffersRequest::default()).await?;
    print_region(format, &reader.origin, &records, &offers);

    if keep_running {
        println!();
        println!("nodes are running (ctrl-c stops them):");
        for node in &nodes {
            println!(
                "  {}  {}  config {}",
                node.origin,
                node.address,
                node.dir.join("node.toml").display()
            );
        }
        println!(
            "try: civex --identity {} --node {} status",
            root.path().join("operator").display(),
            nodes[0].address
        );
        tokio::signal::ctrl_c()
            .await
            .context("waiting for ctrl-c")?;
    }
    for node in &mut nodes {
        node.stop().await?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_region(
    format: Format,
    reader: &str,
    records: &[pb::ObservationRecord],
    offers: &[pb::OfferRecord],
) {
    // (city, area) -> (published, suppressed)
    let mut cells: BTreeMap<(String, i32), (u32, u32)> = BTreeMap::new();
    for record in records {
        let Some(o) = &record.observation else {
            continue;
        };
        let cell = cells.entry((record.origin.clone(), o.area)).or_default();
        if o.value.is_some() {
            cell.0 += 1;
        } else {
            cell.1 += 1;
        }
    }
    let cities: Vec<String> = {
        let mut c: Vec<String> = cells.keys().map(|(city, _)| city.clone()).collect();
        c.dedup();
        c
    };
    match format {
        Format::Json => {
            let table: Vec<_> = cities
                .iter()
                .map(|city| {
                    let areas: serde_json::Map<String, serde_json::Value> = (1..=7)
                        .map(|area| {
                            let (p, s) = cells
                                .get(&(city.clone(), area))
                                .copied()
                                .unwrap_or_default();
                            (
                                area_slug(area).to_owned(),
                                serde_json::json!({"published": p, "suppressed": s}),
                            )
                        })
                        .collect();
                    serde_json::json!({"city": city, "areas": areas})
                })
                .collect();
            output::json(&serde_json::json!({"read_from": reader, "region": table}));
        }
        Format::Table => {
            println!();
            println!("Regional table, read from {reader}'s verified replicas");
            println!("(cells published per functional area; +N = N suppressed as confidential)");
            println!();
            let mut headers = vec!["city"];
            headers.extend(AREA_SLUGS);
            let rows: Vec<Vec<String>> = cities
                .iter()
                .map(|city| {
                    let mut row = vec![city.clone()];
                    for area in 1..=7 {
                        let (p, s) = cells
                            .get(&(city.clone(), area))
                            .copied()
                            .unwrap_or_default();
                        row.push(if s > 0 {
                            format!("{p} +{s}")
                        } else {
                            p.to_string()
                        });
                    }
                    row
                })
                .collect();
            output::table(&headers, &rows);
            println!();
            println!("Shared-service offers held by {reader}");
            println!();
            print_offers(format, offers);
        }
    }
}
