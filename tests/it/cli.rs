//! Every `civex` subcommand, run as the built binary against real nodes.

use std::{os::unix::fs::PermissionsExt, time::Duration};

use crate::support::{
    civex_async, eventually, publish_row, stderr, stdout, Faults, Pair, Proxy, Spec, TestNode,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_makes_a_private_key_and_a_valid_config_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let node_dir = dir.path().join("node");
    let path = node_dir.to_str().unwrap();
    let out = civex_async(&[
        "init",
        path,
        "--origin",
        "br-ibge-3550308",
        "--name",
        "São Paulo",
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("\"br-ibge-3550308\" = \""));
    let mode = std::fs::metadata(node_dir.join("feed.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let config =
        civex_node::config::Config::load(&node_dir.join("node.toml"), std::iter::empty()).unwrap();
    assert_eq!(config.name, "São Paulo");
    let again = civex_async(&["init", path, "--origin", "br-ibge-3550308"]).await;
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
    let bad = civex_async(&[
        "init",
        dir.path().join("x").to_str().unwrap(),
        "--origin",
        "São Paulo",
    ])
    .await;
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("--origin: origin id \"São Paulo\""),
        "{}",
        stderr(&bad)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_indicators_from_csv_and_json_is_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(
        &dir.path().join("node"),
        Spec::new("city-a").districts(&["north"]),
    )
    .await;
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let header = "indicator,area,ref_area,period,value,unit,contributors\n";
    let bad_value = file(
        "bad-value.csv",
        &format!("{header}jobs,economy,city-a,2025,7.5,percent,100\nfirms,economy,city-a,2025-Q3,2,firms,40\nco2,4,city-a,2025,\"1,2.3\",t,9\n"),
    );
    let out = node.cli(&["publish", "indicators", &bad_value]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("{bad_value}:4: value: not a number")),
        "{}",
        stderr(&out)
    );
    let bad_area = file(
        "bad-area.csv",
        &format!("{header}jobs,economy,city-a,2025,7.5,percent,100\nfirms,economy,city-a/east,2025-Q3,2,firms,40\n"),
    );
    let out = node.cli(&["publish", "indicators", &bad_area]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "{bad_area}:3: ref_area: unknown reference area \"city-a/east\""
        )),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("nothing was published"));
    // A file saved in another encoding (Latin-1 'São', byte 0xe3) is named
    // at the line where it stops being UTF-8.
    let latin1 = dir.path().join("latin1.csv");
    let mut bytes = format!("{header}jobs,economy,city-a,2025,7.5,percent,100\n").into_bytes();
    bytes.extend_from_slice(b"firms,economy,city-a,2025-Q3,2,S\xe3o,40\n");
    std::fs::write(&latin1, bytes).unwrap();
    let latin1 = latin1.to_str().unwrap();
    let out = node.cli(&["publish", "indicators", latin1]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("{latin1}:3: not UTF-8 text")),
        "{}",
        stderr(&out)
    );
    // A file too large for one message names itself and the setting.
    let rows = "jobs,economy,city-a,2025,7.5,percent,100\n".repeat(120_000);
    let large = file("large.csv", &format!("{header}{rows}"));
    let out = node.cli(&["publish", "indicators", &large]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("{large}: 120000 rows make a request of"))
            && stderr(&out).contains("limits.max_message_bytes"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        node.head("city-a").await.0,
        0,
        "a failed file published something"
    );

    let good = file(
        "good.csv",
        &format!("{header}jobs,economy,city-a,2025,7.5,percent,100\nfirms,economy,city-a/north,2025-Q3,2,firms,2\n"),
    );
    // Without the node's origin named, the file's contributor counts could
    // go to whichever member node answers at --node: refused, and nothing
    // is sent.
    let identity = node.operator_dir();
    let out = civex_async(&[
        "--node",
        &node.address,
        "--identity",
        identity.to_str().unwrap(),
        "publish",
        "indicators",
        &good,
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("contributor counts")
            && stderr(&out).contains("--expect-origin ID (or set CIVEX_EXPECT_ORIGIN)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(node.head("city-a").await.0, 0);
    let out = node
        .cli(&["--output", "json", "publish", "indicators", &good])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let receipt: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            receipt["seq"].as_u64(),
            receipt["published"].as_u64(),
            receipt["suppressed"].as_u64()
        ),
        (Some(1), Some(1), Some(1))
    );
    let json = file(
        "rows.json",
        r#"[{"indicator": "co2", "area": "environment", "ref_area": "city-a", "period": "2025", "value": 2.4, "unit": "t", "contributors": 50}]"#,
    );
    let out = node.cli(&["publish", "indicators", &json]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("published"), "{}", stdout(&out));

    let out = node.cli(&["query", "observations"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(
        table.contains("confidential") && table.contains("co2") && table.contains("7.5"),
        "{table}"
    );
    let out = node
        .cli(&[
            "--output",
            "json",
            "query",
            "observations",
            "--area",
            "environment",
        ])
        .await;
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1);
    assert_eq!(rows[0]["indicator"], "co2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_responses_status_and_feed_tail_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let Pair {
        a,
        b,
        proxy_a: _pa,
        proxy_b: _pb,
    } = Pair::start(dir.path()).await;
    let a_dir = dir.path().join("a");
    let b_key = b.public_key.clone();

    let offer = [
        "offer",
        "publish",
        "--id",
        "waste",
        "--title",
        "Waste collection",
        "--area",
        "environment",
        "--category",
        "waste-collection",
        "--valid-from",
        "2020-01-01",
        "--valid-until",
        "2099-01-01",
        "--contact",
        "public works office",
    ];
    let out = a.cli(&offer).await;
    assert!(out.status.success(), "{}", stderr(&out));
    eventually("B to hold A's offer", || async {
        b.head("city-a").await.0 >= 1
    })
    .await;
    let out = b
        .cli(&[
            "offer",
            "respond",
            "--origin",
            "city-a",
            "--offer",
            "waste",
            "--kind",
            "interest",
            "--message",
            "from 2026",
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = b
        .cli(&[
            "offer", "respond", "--origin", "city-a", "--offer", "waste", "--kind", "maybe",
        ])
        .await;
    assert!(
        stderr(&out).contains("--kind: \"maybe\""),
        "{}",
        stderr(&out)
    );
    eventually("A to hold B's response", || async {
        a.head("city-b").await.0 >= 1
    })
    .await;
    let out = a.cli(&["query", "offers"]).await;
    assert!(stdout(&out).contains("city-b:interest"), "{}", stdout(&out));
    assert!(!stdout(&out).contains("more not shown"), "{}", stdout(&out));
    // Past 1,000 responses, the rest are said to be there, not listed.
    let respond = |address: String| async move {
        let mut client = civex_proto::v1::publish_client::PublishClient::new(
            crate::support::connect(&address).await,
        );
        for _ in 0..125 {
            client
                .respond_offer(civex_proto::v1::RespondOfferRequest {
                    idempotency_key: crate::support::key(),
                    offer_origin: "city-a".into(),
                    offer_id: "waste".into(),
                    kind: civex_proto::v1::ResponseKind::Interest as i32,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    };
    let tasks: Vec<_> = (0..8)
        .map(|_| tokio::spawn(respond(b.address.clone())))
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    eventually("A to hold B's 1,001 responses", || async {
        a.head("city-b").await.0 >= 1001
    })
    .await;
    let out = a.cli(&["query", "offers"]).await;
    assert!(
        stdout(&out).contains("(more not shown)"),
        "{}",
        stdout(&out)
    );
    let out = a.cli(&["--output", "json", "query", "offers"]).await;
    let offers: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(offers[0]["more_responses"], true);
    assert_eq!(offers[0]["responses"].as_array().unwrap().len(), 1000);

    let out = a.cli(&["--output", "json", "status"]).await;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["origin"], "city-a");
    assert_eq!(status["peers"][0]["name"], "city-b");
    assert_eq!(status["peers"][0]["connected"], true);
    let out = a.cli(&["status"]).await;
    assert!(stdout(&out).contains("publishing open"), "{}", stdout(&out));

    let out = a
        .cli(&["offer", "withdraw", "waste", "--reason", "contract signed"])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = a.cli(&["--output", "json", "query", "offers"]).await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
        serde_json::json!([])
    );
    // A withdrawn offer takes no responses, and a city does not answer its
    // own offers: both refused, nothing published. Found by review.
    eventually("B to hold A's withdrawal", || async {
        b.head("city-a").await.0 >= 2
    })
    .await;
    let accept = [
        "offer", "respond", "--origin", "city-a", "--offer", "waste", "--kind", "accept",
    ];
    let b_head = b.head("city-b").await;
    let out = b.cli(&accept).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("was withdrawn"), "{}", stderr(&out));
    assert_eq!(b.head("city-b").await, b_head);
    let out = a.cli(&accept).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("offer_origin: city-a is this node's own origin"),
        "{}",
        stderr(&out)
    );
    assert_eq!(a.head("city-a").await.0, 2);

    let out = a.cli(&["retract", "1", "--reason", "wrong terms"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    // A withdrawal, or a retraction, is final: neither is retracted.
    for (seq, what) in [("2", "an offer's withdrawal"), ("3", "a retraction")] {
        let out = a.cli(&["retract", seq, "--reason", "undo"]).await;
        assert!(!out.status.success());
        let expected = format!("seq: entry {seq} is {what}");
        assert!(stderr(&out).contains(&expected), "{}", stderr(&out));
    }
    assert_eq!(a.head("city-a").await.0, 3);

    let config = a_dir.join("node.toml");
    let out = a
        .cli(&[
            "feed",
            "tail",
            "--config",
            config.to_str().unwrap(),
            "--count",
            "4",
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = stdout(&out);
    assert_eq!(lines.lines().count(), 4, "{lines}");
    for expected in [
        "offer waste",
        "withdrawal of offer waste",
        "retraction of seq 1",
        "interest for offer city-a/waste",
    ] {
        assert!(lines.contains(expected), "{expected:?} missing: {lines}");
    }
    let wrong_key = format!("city-a={}", b_key);
    let out = a
        .cli(&["feed", "tail", "--key", &wrong_key, "--count", "1"])
        .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid signature"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_is_down_is_named() {
    let out = civex_async(&["--node", crate::support::NOWHERE, "--insecure", "status"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot reach the node at 127.0.0.1:9"),
        "{}",
        stderr(&out)
    );
    // With --output json, stdout holds the error as a document too.
    let args = [
        "--node",
        crate::support::NOWHERE,
        "--insecure",
        "--output",
        "json",
    ];
    let out = civex_async(&[&args[..], &["status"]].concat()).await;
    assert!(!out.status.success());
    let error: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot reach the node at 127.0.0.1:9")),
        "{error}"
    );
    // Without an identity (and not --insecure) the CLI says what to pass.
    let out = civex_async(&["--node", crate::support::NOWHERE, "status"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no TLS identity") && stderr(&out).contains("--identity DIR"),
        "{}",
        stderr(&out)
    );
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), Spec::new("city-a")).await;
    publish_row(&node, "x", 1.0).await;
    let out = node
        .cli(&["query", "observations", "--from", "2025-Q9"])
        .await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("period_from"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_prints_a_regional_table_from_replicas() {
    let out = civex_async(&["demo"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for expected in civex_node::core::ingest::AREA_SLUGS.iter().copied().chain([
        "vale-do-sol",
        "sao-bento",
        "rio-claro",
        "sao-bento:interest",
        "1 +1",
    ]) {
        assert!(
            text.contains(expected),
            "{expected:?} missing from the demo output:\n{text}"
        );
    }
    let out = civex_async(&["demo", "--output", "json"]).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["region"].as_array().unwrap().len(), 3);
    assert_eq!(json["region"][0]["areas"]["economy"]["suppressed"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_every_measurement() {
    let dir = tempfile::tempdir().unwrap();
    let out = civex_async(&[
        "bench",
        "--entries",
        "4000",
        "--publishes",
        "400",
        "--publishers",
        "8",
        "--rate",
        "200",
        "--latency-secs",
        "1",
        "--live-entries",
        "2000",
        "--in-flight",
        "16",
        "--sdc-size",
        "20",
        "--dir",
        dir.path().to_str().unwrap(),
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for expected in [
        "ed25519 strict verify",
        "verify: 4000 entries",
        "restore: a backup of 4000 entries",
        "catch-up: 4000 entries",
        "durable publish: 400 entries",
        "each on its own connection and publish stream, one publish at a time",
        "ack latency at 200/s",
        "live replication (a) through the publish API: 2000 entries",
        "over one publish stream with 16 publishes unanswered",
        "live replication (b)",
        "disclosure control, 20 x 20 counts with margins (441 cells, ",
        "disclosure control, 20 x 20 sums with margins (441 cells, ",
    ] {
        assert!(text.contains(expected), "{expected:?} missing:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_city_joins_a_federation_with_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let (ca, node, ops) = (path("ca"), path("node"), path("ops"));

    let out = civex_async(&["ca", "init", &ca, "--name", "Consórcio Teste"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let mode = std::fs::metadata(dir.path().join("ca/ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = civex_async(&["ca", "init", &ca, "--name", "x"]).await;
    assert!(
        stderr(&again).contains("already holds a CA"),
        "{}",
        stderr(&again)
    );

    // The city prepares its node with the federation's CA certificate; a
    // wrong flag is named, and nothing is written.
    let ca_pem = format!("{ca}/ca.pem");
    let out = civex_async(&["init", &node, "--origin", "city-j", "--listen", "nothing"]).await;
    assert!(
        stderr(&out).contains("--listen: listen: \"nothing\" is not an IP address"),
        "{}",
        stderr(&out)
    );
    assert!(!std::path::Path::new(&node).join("node.toml").exists());
    let out = civex_async(&[
        "init",
        &node,
        "--origin",
        "city-j",
        "--listen",
        "127.0.0.1:0",
        "--join",
        &ca_pem,
        "--operator",
        "ops",
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("certificate request"),
        "{}",
        stdout(&out)
    );
    let request = format!("{node}/tls/request.csr");
    // The admin issues its certificate from the request, not for another origin.
    let wrong = civex_async(&[
        "ca",
        "issue",
        "--ca",
        &ca,
        "--origin",
        "city-k",
        "--csr",
        &request,
        "--out",
        &path("k"),
    ])
    .await;
    assert!(!wrong.status.success());
    assert!(
        stderr(&wrong).contains("asks for civex:origin:city-j"),
        "{}",
        stderr(&wrong)
    );
    let tls_dir = format!("{node}/tls");
    let out = civex_async(&[
        "ca", "issue", "--ca", &ca, "--origin", "city-j", "--csr", &request, "--out", &tls_dir,
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = civex_async(&[
        "ca",
        "issue",
        "--ca",
        &ca,
        "--operator",
        "ops",
        "--out",
        &ops,
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    // The same name again would be a second holder of one identity (two
    // cities' operators called ops): refused, writing nothing, unless it
    // is a renewal for the same person.
    async fn issue_ops(ca: &str, out: &str, renew: bool) -> std::process::Output {
        let mut args = vec!["ca", "issue", "--ca", ca, "--operator", "ops", "--out", out];
        if renew {
            args.push("--renew");
        }
        civex_async(&args).await
    }
    let again = issue_ops(&ca, &path("ops-again"), false).await;
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("civex:operator:ops holds a valid certificate already (serial ")
            && stderr(&again).contains("pass --renew"),
        "{}",
        stderr(&again)
    );
    assert!(!std::path::Path::new(&path("ops-again")).exists());
    let renewed = issue_ops(&ca, &path("ops-renewed"), true).await;
    assert!(renewed.status.success(), "{}", stderr(&renewed));

    // The node starts on those files and its operator administers it.
    let child = crate::support::ChildNode::start_async(dir.path().join("node").as_path()).await;
    let out = civex_async(&["--node", &child.address, "--identity", &ops, "status"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("city-j"), "{}", stdout(&out));

    // The node's own certificate is no operator's: it may not administer.
    let out = civex_async(&["--node", &child.address, "--identity", &tls_dir, "status"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("needs an operator certificate"),
        "{}",
        stderr(&out)
    );

    let out = civex_async(&["ca", "revoke", "--ca", &ca, "--operator", "ops"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = civex_async(&["--output", "json", "ca", "list", "--ca", &ca]).await;
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let states: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["identity"].as_str().unwrap().to_owned(),
                r["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("civex:origin:city-j".to_owned(), "valid".to_owned()),
            ("civex:operator:ops".to_owned(), "revoked".to_owned()),
            ("civex:operator:ops".to_owned(), "revoked".to_owned()),
        ]
    );
    // Once its certificates are revoked, the name may be given out again.
    let out = issue_ops(&ca, &path("ops-new"), false).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let crl = std::fs::read_to_string(dir.path().join("ca/ca.crl")).unwrap();
    assert!(crl.contains("BEGIN X509 CRL"));
    // Each list is numbered above the last (nodes refuse an older one),
    // even after revoked.tsv was edited by hand.
    let number = || {
        let pem = std::fs::read(dir.path().join("ca/ca.crl")).unwrap();
        civex_node::tls::highest_crl_number(&pem).unwrap()
    };
    let before = number();
    std::fs::write(dir.path().join("ca/revoked.tsv"), "").unwrap();
    let out = civex_async(&["ca", "revoke", "--ca", &ca, "--operator", "ops"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(number() > before, "{} after {before}", number());
}

/// The CLI's own variables (`CIVEX_NODE`, `CIVEX_IDENTITY`, ...), set in
/// the shell as the README suggests, do not stop the commands that load a
/// `node.toml` (here `civex verify --config`) nor the node itself.
#[test]
fn the_clis_own_environment_does_not_break_loading_node_toml() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) =
        crate::support::write_node_dir(dir.path(), &Spec::new("city-a"), "127.0.0.1:7400");
    // The store a node makes at its first start (verify opens only one
    // that exists).
    drop(civex_node::store::SledStore::open(&dir.path().join("data"), 1 << 20).unwrap());
    let out = std::process::Command::new(crate::support::bin("civex"))
        .env("CIVEX_NODE", "127.0.0.1:7400")
        .env("CIVEX_IDENTITY", dir.path().join("operator"))
        .args(["verify", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "civex verify with CIVEX_NODE and CIVEX_IDENTITY set: {}",
        stderr(&out)
    );
    // A misspelt node setting is still refused, by name.
    let out = std::process::Command::new(crate::support::bin("civex"))
        .env("CIVEX_LISTN", "127.0.0.1:1")
        .args(["verify", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("CIVEX_LISTN: unknown setting"),
        "{}",
        stderr(&out)
    );
}

/// `civex feed tail | head -1`: once the reader is gone, the CLI ends
/// quietly, as a process killed by SIGPIPE does (status 141), instead of
/// panicking on its next line. Found by review.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_closes_the_pipe_ends_the_cli_quietly() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let a = TestNode::start(&dir.path().join("a"), Spec::new("city-a")).await;
    publish_row(&a, "jobs", 1.0).await;
    let identity = a.operator_dir();
    let config = a.dir.join("node.toml");
    let mut child = std::process::Command::new(crate::support::bin("civex"))
        .args([
            "--node",
            &a.address,
            "--identity",
            identity.to_str().unwrap(),
        ])
        .args(["--expect-origin", "city-a", "feed", "tail", "--config"])
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let first = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    assert!(first.contains("city-a"), "{first}");
    // The reader has gone; the next entry is printed into a closed pipe.
    publish_row(&a, "jobs", 2.0).await;
    eventually("the CLI to end", || {
        let ended = child.try_wait().unwrap().is_some();
        async move { ended }
    })
    .await;
    let status = child.wait().unwrap();
    let mut errors = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut errors).unwrap();
    assert_eq!(status.code(), Some(141), "{errors}");
    assert!(!errors.contains("panicked"), "{errors}");
}

/// A node that is up but refuses the connection (or that the CLI refuses)
/// is told apart from one that is down, and what to check is named.
/// Found by review.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_told_apart_from_a_node_that_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let a = TestNode::start(&dir.path().join("a"), Spec::new("city-a")).await;
    let out = a.cli(&["--expect-origin", "city-b", "status"]).await;
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(
        text.contains("names origin city-a, expected origin city-b")
            && text.contains("check --identity")
            && !text.contains("is civex-node running"),
        "{text}"
    );
    let rows = dir.path().join("rows.csv");
    std::fs::write(
        &rows,
        "indicator,area,ref_area,period,value,unit,contributors\njobs,economy,city-a,2025,1,percent,10\n",
    )
    .unwrap();
    let out = a
        .cli(&[
            "--expect-origin",
            "city-b",
            "publish",
            "indicators",
            rows.to_str().unwrap(),
        ])
        .await;
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(text.contains("expected origin city-b"), "{text}");
    assert_eq!(a.head("city-a").await.0, 0);
    // A TLS node asked in plain HTTP/2.
    let out = civex_async(&["--node", &a.address, "--insecure", "status"]).await;
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(
        text.contains("if the node uses TLS, --insecure cannot talk to it"),
        "{text}"
    );
}

/// A publish whose answer is lost (its connection cut once the node has
/// made it, the node then out of reach) says it may have been published
/// and names its idempotency key; run again with that key, it shows the
/// original receipt and publishes nothing more. The key given with another
/// request, or to a command that publishes nothing, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_whose_answer_was_lost_is_learned_again_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(&dir.path().join("node"), Spec::new("city-a")).await;
    node.wait_ready().await;
    let proxy = Proxy::start(&node.address).await;
    // Replies crawl, so the cut falls between the node's commit and its
    // answer reaching the CLI.
    proxy.set_faults(Faults {
        reply_delay: Duration::from_secs(2),
        ..Faults::default()
    });
    let file = |name: &str, value: f64| {
        let path = dir.path().join(name);
        let rows =
            format!("indicator,ref_area,period,value,contributors\njobs,city-a,2025,{value},100\n");
        std::fs::write(&path, rows).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let (rows, other_rows) = (file("rows.csv", 7.5), file("other.csv", 8.5));
    let identity = node.operator_dir().to_str().unwrap().to_owned();
    let through_proxy = {
        let (address, identity, rows) = (proxy.address.clone(), identity.clone(), rows.clone());
        tokio::spawn(async move {
            civex_async(&[
                "--node",
                &address,
                "--identity",
                &identity,
                "--expect-origin",
                "city-a",
                "publish",
                "indicators",
                &rows,
                "--wait-secs",
                "2",
            ])
            .await
        })
    };
    eventually("the node to make the publish", || async {
        node.head("city-a").await.0 == 1
    })
    .await;
    // Out of reach from now on: connections through the proxy are closed
    // as soon as they open.
    let closing = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    proxy.set_target(&closing.local_addr().unwrap().to_string());
    tokio::spawn(async move {
        while let Ok((connection, _)) = closing.accept().await {
            drop(connection);
        }
    });
    proxy.cut();
    let out = through_proxy.await.unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let message = stderr(&out);
    assert!(message.contains("may have been published"), "{message}");
    let key = message
        .split("--idempotency-key ")
        .nth(1)
        .and_then(|rest| rest.get(..32))
        .unwrap_or_else(|| panic!("no key named: {message}"))
        .to_owned();
    assert!(key.bytes().all(|b| b.is_ascii_hexdigit()), "{message}");

    let head = node.head("city-a").await;
    let out = node
        .cli(&[
            "--output",
            "json",
            "--idempotency-key",
            &key,
            "publish",
            "indicators",
            &rows,
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let receipt: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(receipt["seq"], 1);
    assert_eq!(receipt["entry_hash"], civex_node::core::ids::hex(&head.1));
    assert_eq!(node.head("city-a").await, head, "published twice");

    let out = node
        .cli(&[
            "--idempotency-key",
            &key,
            "publish",
            "indicators",
            &other_rows,
        ])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("already used for a different request"),
        "{}",
        stderr(&out)
    );
    assert_eq!(node.head("city-a").await, head);
    for (args, expected) in [
        (
            vec!["--idempotency-key", "abc", "publish", "indicators", &rows],
            "--idempotency-key: \"abc\" is not 32 hex digits",
        ),
        (
            vec!["--idempotency-key", &key, "status"],
            "--idempotency-key: only for a command that publishes",
        ),
    ] {
        let out = node.cli(&args).await;
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains(expected), "{}", stderr(&out));
    }
    assert_eq!(node.head("city-a").await, head);
}
