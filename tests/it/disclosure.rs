//! Disclosure control end to end: the dry run, the catalog commands, what an
//! attacker can learn from a published table, and the privacy budget under
//! concurrent publishes and a crash.

use civex_node::core::sdc::{self, AggregationKind, CellInput, CellStatus, Coord, Settings, Table};
use civex_proto::v1::{self as pb, entry_body::Payload, ConfidentialityStatus};
use prost::Message;
use tonic::Code;

use crate::support::{
    civex_async, key, row, stderr, stdout, whole_feed, write_node_dir, ChildNode, Spec, TestNode,
};

/// Households without water by district (north, south, east) and by
/// building type (house, flat), with totals both ways: (district, type,
/// households). North's flats are few; so are east's houses.
const TABLE: [(&str, &str, u64); 12] = [
    ("north", "house", 40),
    ("north", "flat", 2),
    ("north", "", 42),
    ("south", "house", 25),
    ("south", "flat", 30),
    ("south", "", 55),
    ("east", "house", 1),
    ("east", "flat", 19),
    ("east", "", 20),
    ("", "house", 66),
    ("", "flat", 51),
    ("", "", 117),
];

fn table_rows() -> Vec<pb::IndicatorRow> {
    TABLE
        .iter()
        .map(|&(district, kind, households)| {
            let ref_area = if district.is_empty() {
                "city-a".to_owned()
            } else {
                format!("city-a/{district}")
            };
            pb::IndicatorRow {
                breakdown: if kind.is_empty() {
                    String::new()
                } else {
                    format!("building={kind}")
                },
                ..row(
                    "households",
                    &ref_area,
                    "2025",
                    households as f64,
                    households,
                )
            }
        })
        .collect()
}

fn districts() -> Spec {
    Spec::new("city-a").districts(&["north", "south", "east"])
}

fn observations(entry: &pb::SignedEntry) -> Vec<pb::Observation> {
    let body = pb::EntryBody::decode(entry.body.as_ref()).unwrap();
    match body.payload {
        Some(Payload::Indicators(batch)) => batch.observations,
        other => panic!("not an indicator batch: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attacker_with_every_published_cell_cannot_narrow_a_suppressed_one() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), districts()).await;
    let receipt = node
        .publisher()
        .await
        .publish_indicators(pb::PublishIndicatorsRequest {
            idempotency_key: key(),
            rows: table_rows(),
        })
        .await
        .unwrap()
        .into_inner();
    let feed = whole_feed(&node.address, "city-a").await;
    assert_eq!(feed.len(), 1);
    let published = observations(&feed[0]);
    assert_eq!(published.len(), TABLE.len());
    let status_of = |o: &pb::Observation| match ConfidentialityStatus::try_from(o.conf_status) {
        Ok(ConfidentialityStatus::Free) => CellStatus::Free,
        Ok(ConfidentialityStatus::SuppressedSmallCounts) => CellStatus::SmallCounts,
        Ok(ConfidentialityStatus::SuppressedDominance) => CellStatus::Dominance,
        Ok(ConfidentialityStatus::SuppressedSecondary) => CellStatus::Secondary,
        Err(_) => panic!("unknown status {}", o.conf_status),
    };
    let statuses: Vec<CellStatus> = published.iter().map(status_of).collect();
    // No published cell breaks the threshold rule, and suppressed cells
    // carry no value.
    for ((&(district, kind, households), o), status) in TABLE.iter().zip(&published).zip(&statuses)
    {
        assert_eq!(
            o.value.is_none(),
            status.is_suppressed(),
            "{district}/{kind}"
        );
        if households < 3 {
            assert_eq!(*status, CellStatus::SmallCounts, "{district}/{kind}");
        }
    }
    let secondary = statuses
        .iter()
        .filter(|s| **s == CellStatus::Secondary)
        .count();
    assert!(
        secondary >= 2,
        "two small cells need complements: {statuses:?}"
    );
    assert_eq!(
        receipt.suppressed as usize,
        statuses.iter().filter(|s| s.is_suppressed()).count()
    );
    // The attacker's exact feasible range of every suppressed cell, from
    // every published cell and total, covers its protection interval.
    let cells: Vec<CellInput> = TABLE
        .iter()
        .map(|&(district, kind, households)| {
            let coord = |c: &str| {
                if c.is_empty() {
                    Coord::Total
                } else {
                    Coord::code(c)
                }
            };
            CellInput::new(
                vec![coord(district), coord(kind)],
                households as f64,
                households,
            )
        })
        .collect();
    let table = Table::new(
        "households",
        "2025",
        AggregationKind::Count,
        vec!["ref_area".into(), "building".into()],
        cells,
    )
    .unwrap();
    let report = sdc::audit(&table, &Settings::default(), &statuses).unwrap();
    assert!(
        report.failures.is_empty(),
        "narrowed: {:?}",
        report.failures
    );
    // The counts never leave the node: the published values are the free
    // cells' values, and no field holds anything else.
    let rules = pb::EntryBody::decode(feed[0].body.as_ref()).unwrap();
    let Some(Payload::Indicators(batch)) = rules.payload else {
        unreachable!()
    };
    assert!(batch.rules[0]
        .parameters
        .iter()
        .any(|p| p.rule == "secondary"));
    assert_eq!(batch.rules[0].aggregation, "count");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dry_run_explains_each_suppression_and_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), districts()).await;
    let mut csv = String::from("indicator,ref_area,period,value,contributors,breakdown\n");
    for &(district, kind, households) in &TABLE {
        let ref_area = if district.is_empty() {
            "city-a".to_owned()
        } else {
            format!("city-a/{district}")
        };
        let breakdown = if kind.is_empty() {
            String::new()
        } else {
            format!("building={kind}")
        };
        csv.push_str(&format!(
            "households,{ref_area},2025,{households},{households},{breakdown}\n"
        ));
    }
    let file = dir.path().join("households.csv");
    std::fs::write(&file, csv).unwrap();
    let file = file.to_str().unwrap();

    let out = node
        .cli(&["publish", "indicators", file, "--dry-run"])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for expected in [
        "small-counts",
        "below threshold 3",
        "secondary",
        "suppressed to protect",
        "threshold.n=3",
        "dry run: nothing was published",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
    assert_eq!(node.head("city-a").await.0, 0, "a dry run published");

    let out = node
        .cli(&[
            "--output",
            "json",
            "publish",
            "indicators",
            file,
            "--dry-run",
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let preview: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cells = preview["cells"].as_array().unwrap();
    let suppressed = cells.iter().filter(|c| c["value"].is_null()).count();
    assert_eq!(cells.len(), TABLE.len());

    // The real publish does what the dry run showed.
    let out = node
        .cli(&["--output", "json", "publish", "indicators", file])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let receipt: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(receipt["suppressed"].as_u64(), Some(suppressed as u64));

    // A revision missing a cell is refused, and the dry run says so too.
    let partial = dir.path().join("partial.csv");
    std::fs::write(
        &partial,
        "indicator,ref_area,period,value,contributors\nhouseholds,city-a,2025,117,117\n",
    )
    .unwrap();
    let out = node
        .cli(&[
            "publish",
            "indicators",
            partial.to_str().unwrap(),
            "--dry-run",
        ])
        .await;
    assert_eq!(out.status.code(), Some(1));
    // Placed at the table's first row, as the CLI maps it to the file.
    assert!(
        stderr(&out).contains(&format!(
            "{}:2: rows: households (test) for 2025: the feed already holds this table, so a \
             revision must restate every cell",
            partial.display()
        )),
        "{}",
        stderr(&out)
    );
    assert_eq!(node.head("city-a").await.0, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_commands_list_show_and_validate() {
    let out = civex_async(&[
        "--output",
        "json",
        "catalog",
        "list",
        "--edition",
        "u4ssc:2017",
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let codes: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["code"].as_str().unwrap())
        .collect();
    assert!(codes.contains(&"EC:ICT:ICT:1C"), "{codes:?}");

    let out = civex_async(&["catalog", "show", "5.1", "--edition", "iso37120:2014"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("fewer than 3 contributors"),
        "{}",
        stdout(&out)
    );

    // With a node's config: its own catalog file and its settings.
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write_node_dir(
        dir.path(),
        &Spec::new("city-a").extra(
            "\n[[disclosure.indicator]]\ncode = \"households\"\nmin_contributors = 5\nrounding_base = 5\n",
        ),
        "127.0.0.1:0",
    );
    let config = config.to_str().unwrap();
    let out = civex_async(&["catalog", "show", "households", "--config", config]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("fewer than 5 contributors") && text.contains("to a multiple of 5"),
        "{text}"
    );
    let out = civex_async(&[
        "catalog",
        "list",
        "--config",
        config,
        "--area",
        "infrastructure",
    ])
    .await;
    assert!(stdout(&out).contains("households"), "{}", stdout(&out));
    assert!(!stdout(&out).contains("jobs"), "{}", stdout(&out));

    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "edition = \"local\"\nname = \"ours\"\n\n[[indicator]]\ncode = \"bus-km\"\nlabel = \"Bus kilometres\"\nunit = \"km\"\narea = \"infrastructure\"\nkind = \"sum\"\nfrequency = \"monthly\"\nsubjects = \"public\"\n",
    )
    .unwrap();
    let out = civex_async(&["catalog", "validate", good.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("1 indicators, valid"),
        "{}",
        stdout(&out)
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&good)
            .unwrap()
            .replace("\"sum\"", "\"total\""),
    )
    .unwrap();
    let out = civex_async(&["catalog", "validate", bad.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out)
            .contains("bad.toml: line 4: indicator 1 (bus-km): kind: unknown kind \"total\""),
        "{}",
        stderr(&out)
    );
    let clash = dir.path().join("clash.toml");
    std::fs::write(
        &clash,
        std::fs::read_to_string(&good)
            .unwrap()
            .replace("\"local\"", "\"iso37120:2014\""),
    )
    .unwrap();
    let out = civex_async(&["catalog", "validate", clash.to_str().unwrap()]).await;
    assert!(
        stderr(&out).contains("is already defined"),
        "{}",
        stderr(&out)
    );
    let out = civex_async(&["catalog", "list", "--edition", "iso37120:1999"]).await;
    assert!(
        stderr(&out).contains("--edition: unknown edition"),
        "{}",
        stderr(&out)
    );
}

/// Laplace noise with epsilon 1/2 on a city-level count costs rho 1/8: a
/// budget of 1 allows exactly 8 publishes of one table.
const NOISE: &str = "\n[[disclosure.indicator]]\ncode = \"households\"\nnoise = \"laplace\"\nepsilon = \"1/2\"\nbudget_rho = 1.0\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_privacy_budget_holds_under_concurrent_publishes_and_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    write_node_dir(dir.path(), &Spec::new("city-a").extra(NOISE), "127.0.0.1:0");
    let mut node = ChildNode::start_async(dir.path()).await;
    let request = || pb::PublishIndicatorsRequest {
        idempotency_key: key(),
        rows: vec![row("households", "city-a", "2025", 500.0, 500)],
    };
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let (address, request) = (node.address.clone(), request());
        tasks.push(tokio::spawn(async move {
            let mut client =
                pb::publish_client::PublishClient::new(crate::support::connect(&address).await);
            let outcome = client.publish_indicators(request.clone()).await;
            (request, outcome)
        }));
    }
    let mut accepted = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            (request, Ok(receipt)) => accepted.push((request, receipt.into_inner())),
            (_, Err(status)) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                assert!(
                    status.message().contains("privacy budget is exhausted"),
                    "{status:?}"
                );
            }
        }
    }
    assert_eq!(accepted.len(), 8, "rho 1/8 each within a budget of 1");
    // Made at the node's start, since an indicator has noise.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("noise.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the noise key is private");

    // A crash and a restart: the ledger is rebuilt from what is stored.
    tokio::task::spawn_blocking(move || node.sigkill())
        .await
        .unwrap();
    let mut node = ChildNode::start_async(dir.path()).await;
    let address = node.address.clone();
    let mut client =
        pb::publish_client::PublishClient::new(crate::support::connect(&address).await);
    let status = client.publish_indicators(request()).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    // The CLI says so too, and a dry run shows the budget.
    let file = dir.path().join("households.csv");
    std::fs::write(
        &file,
        "indicator,ref_area,period,value,contributors\nhouseholds,city-a,2025,500,500\n",
    )
    .unwrap();
    let operator = dir.path().join("operator");
    let cli = |extra: &'static [&'static str]| {
        let (address, operator, file) = (address.clone(), operator.clone(), file.clone());
        async move {
            let mut args = vec![
                "--node".to_owned(),
                address,
                "--identity".to_owned(),
                operator.to_str().unwrap().to_owned(),
                "--expect-origin".to_owned(),
                "city-a".to_owned(),
                "publish".to_owned(),
                "indicators".to_owned(),
                file.to_str().unwrap().to_owned(),
            ];
            args.extend(extra.iter().map(|a| a.to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            civex_async(&args).await
        }
    };
    let out = cli(&["--dry-run"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(
        text.contains(
            "privacy budget households 2025: this publish spends rho 0.125, 1 of 1 spent before"
        ) && text.contains("would be refused"),
        "{text}"
    );
    let out = cli(&[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("privacy budget is exhausted"),
        "{}",
        stderr(&out)
    );
    // A retry of an acknowledged publish gets its receipt, spending nothing.
    let (first, receipt) = &accepted[0];
    let again = client
        .publish_indicators(first.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.entry_hash, receipt.entry_hash);

    // The feed carries the debits: exactly the budget, never more.
    let feed = whole_feed(&address, "city-a").await;
    assert_eq!(feed.len(), 8);
    let spent: u64 = feed
        .iter()
        .map(
            |e| match pb::EntryBody::decode(e.body.as_ref()).unwrap().payload {
                Some(Payload::Indicators(batch)) => batch.privacy.iter().map(|d| d.rho_nanos).sum(),
                _ => 0,
            },
        )
        .sum();
    assert_eq!(spent, 1_000_000_000);
    for entry in &feed {
        let rules = match pb::EntryBody::decode(entry.body.as_ref()).unwrap().payload {
            Some(Payload::Indicators(batch)) => batch.rules,
            _ => unreachable!(),
        };
        assert!(rules[0]
            .parameters
            .iter()
            .any(|p| p.rule == "noise" && p.value.contains("laplace")));
    }
    tokio::task::spawn_blocking(move || node.sigkill())
        .await
        .unwrap();
}

/// A file near the message limit may be published (as a group), but its
/// preview, larger than the file, does not fit one answer: the dry run
/// says so, naming the setting, instead of failing to encode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_too_large_for_one_answer_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(&dir.path().join("node"), Spec::new("city-a")).await;
    node.wait_ready().await;
    let rows = (0..80_000)
        .map(|i| pb::IndicatorRow {
            breakdown: format!("item=i{i}"),
            ..row("jobs", "city-a", "2025", 1.0, 1)
        })
        .collect();
    let refused = node
        .publisher()
        .await
        .preview_indicators(pb::PublishIndicatorsRequest {
            idempotency_key: key(),
            rows,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert!(
        refused.message().starts_with("rows: the preview of these")
            && refused.message().contains("limits.max_message_bytes"),
        "{}",
        refused.message()
    );
}

/// A revision is audited with the equations an earlier version's totals
/// told: version 1 publishes the city (91), east (30) and west (31), so
/// north + south = 30; the correction of west to 2 publishes the city
/// (62), and taking north, south and east as unchanged gives west = 62 -
/// 30 - 30 = 2. The node refuses it and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_revealing_a_cell_through_an_earlier_versions_totals_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec::new("city-a").districts(&["north", "south", "east", "west"]);
    let node = TestNode::start(dir.path(), spec).await;
    let rows = |city: f64, west: f64| {
        let mut rows = vec![row("households", "city-a", "2025", city, city as u64)];
        for (district, value) in [
            ("north", 1.0),
            ("south", 29.0),
            ("east", 30.0),
            ("west", west),
        ] {
            let area = format!("city-a/{district}");
            rows.push(row("households", &area, "2025", value, value as u64));
        }
        rows
    };
    let mut publisher = node.publisher().await;
    publisher
        .publish_indicators(pb::PublishIndicatorsRequest {
            idempotency_key: key(),
            rows: rows(91.0, 31.0),
        })
        .await
        .unwrap();
    let before = whole_feed(&node.address, "city-a").await;
    assert_eq!(before.len(), 1);
    let values: Vec<Option<f64>> = observations(&before[0]).iter().map(|o| o.value).collect();
    assert_eq!(
        values,
        [Some(91.0), None, None, Some(30.0), Some(31.0)],
        "version 1 is not the pattern this test is about"
    );
    let status = publisher
        .publish_indicators(pb::PublishIndicatorsRequest {
            idempotency_key: key(),
            rows: rows(62.0, 2.0),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status
            .message()
            .contains("an earlier version of this table")
            && status.message().contains("west could be narrowed")
            && status.message().contains("nothing was published"),
        "{status:?}"
    );
    let after = whole_feed(&node.address, "city-a").await;
    assert_eq!(after, before, "the refused revision changed the feed");
}
