//! Publishing and querying through a real gRPC client.

use civex_proto::v1::{self as pb, ConfidentialityStatus, FunctionalArea};
use prost::Message;
use tonic::Code;

use crate::support::{key, publish_stream, row, Spec, TestNode};

async fn all_observations(
    node: &TestNode,
    mut request: pb::ObservationsRequest,
) -> (Vec<pb::ObservationRecord>, usize) {
    let mut query = node.query().await;
    let mut records = Vec::new();
    let mut pages = 0;
    loop {
        let page = query
            .observations(request.clone())
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        records.extend(page.observations);
        if page.next_page_token.is_empty() {
            return (records, pages);
        }
        request.page_token = page.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_then_query_current_values_with_filters_and_paging() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), Spec::new("city-a").districts(&["north"])).await;
    let mut rows = vec![
        row("jobs", "city-a", "2025", 7.5, 100),
        row("jobs", "city-a", "2024", 8.0, 100),
        row("firms", "city-a", "2025-Q3", 2.0, 2),
        row("outages", "city-a/north", "2025-07", 3.0, 50),
        row("co2", "city-a", "2025", 2.4, 1000),
    ];
    rows[4].area = FunctionalArea::Environment as i32;
    let receipt = node
        .publisher()
        .await
        .publish_indicators(pb::PublishIndicatorsRequest {
            idempotency_key: key(),
            rows,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (receipt.seq, receipt.published, receipt.suppressed),
        (1, 4, 1)
    );
    assert_eq!(node.head("city-a").await, (1, receipt.entry_hash.clone()));

    let (all, _) = all_observations(&node, pb::ObservationsRequest::default()).await;
    assert_eq!(all.len(), 5);
    let firms = all
        .iter()
        .find(|r| r.observation.as_ref().unwrap().indicator == "firms")
        .unwrap();
    let firms = firms.observation.as_ref().unwrap();
    assert_eq!(firms.value, None);
    assert_eq!(
        firms.conf_status,
        ConfidentialityStatus::SuppressedSmallCounts as i32
    );

    let only = |request: pb::ObservationsRequest| async {
        let (records, _) = all_observations(&node, request).await;
        let mut names: Vec<String> = records
            .into_iter()
            .map(|r| {
                let o = r.observation.unwrap();
                format!("{}@{}", o.indicator, o.period)
            })
            .collect();
        names.sort();
        names
    };
    assert_eq!(
        only(pb::ObservationsRequest {
            areas: vec![FunctionalArea::Environment as i32],
            ..Default::default()
        })
        .await,
        ["co2@2025"]
    );
    assert_eq!(
        only(pb::ObservationsRequest {
            period_from: "2025-Q3".into(),
            period_to: "2025".into(),
            ..Default::default()
        })
        .await,
        ["firms@2025-Q3", "outages@2025-07"]
    );
    assert_eq!(
        only(pb::ObservationsRequest {
            indicators: vec!["jobs".into()],
            origins: vec!["city-a".into()],
            ..Default::default()
        })
        .await,
        ["jobs@2024", "jobs@2025"]
    );
    assert!(only(pb::ObservationsRequest {
        origins: vec!["city-z".into()],
        ..Default::default()
    })
    .await
    .is_empty());
    let (paged, pages) = all_observations(
        &node,
        pb::ObservationsRequest {
            page_size: 2,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(pages, 3);
    assert_eq!(paged, all);

    // A newer value replaces the old one; retracting it brings the old one back.
    let update = node
        .publisher()
        .await
        .publish_indicators(pb::PublishIndicatorsRequest {
            idempotency_key: key(),
            rows: vec![row("jobs", "city-a", "2025", 6.9, 100)],
        })
        .await
        .unwrap()
        .into_inner();
    let jobs_2025 = || async {
        let (records, _) = all_observations(
            &node,
            pb::ObservationsRequest {
                indicators: vec!["jobs".into()],
                period_from: "2025".into(),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(records.len(), 1, "one current value per key");
        records[0].observation.as_ref().unwrap().value
    };
    assert_eq!(jobs_2025().await, Some(6.9));
    node.publisher()
        .await
        .retract(pb::RetractRequest {
            idempotency_key: key(),
            seq: update.seq,
            reason: "typo".into(),
        })
        .await
        .unwrap();
    assert_eq!(jobs_2025().await, Some(7.5));

    let bad_token = node
        .query()
        .await
        .observations(pb::ObservationsRequest {
            page_token: "zz".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_token.code(), Code::InvalidArgument);
    assert!(bad_token.message().contains("page_token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_is_idempotent_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), Spec::new("city-a")).await;
    let request = pb::PublishIndicatorsRequest {
        idempotency_key: key(),
        rows: vec![row("jobs", "city-a", "2025", 7.5, 100)],
    };
    let mut publisher = node.publisher().await;
    let first = publisher
        .publish_indicators(request.clone())
        .await
        .unwrap()
        .into_inner();
    let again = publisher
        .publish_indicators(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, again);
    assert_eq!(node.head("city-a").await.0, 1, "a retry published twice");
    let mut different = request.clone();
    different.rows[0].value = 9.0;
    let err = publisher.publish_indicators(different).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(node.head("city-a").await.0, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_the_field_and_publish_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), Spec::new("city-a").districts(&["north"])).await;
    let mut publisher = node.publisher().await;
    let good = || row("jobs", "city-a", "2025", 1.0, 100);
    let cases: Vec<(Vec<pb::IndicatorRow>, Vec<u8>, &str)> = vec![
        (
            vec![
                good(),
                row("firms", "city-a", "2025-Q1", 9.0, 9),
                row("x", "city-a/east", "2025", 1.0, 9),
            ],
            key(),
            "row 3: ref_area: unknown reference area \"city-a/east\"",
        ),
        (
            vec![row("x", "city-a", "2025", f64::NAN, 9)],
            key(),
            "row 1: value: value NaN is not finite",
        ),
        (
            vec![row("x", "city-a", "2025-13", 1.0, 9)],
            key(),
            "row 1: period",
        ),
        // Once made the publisher fail for good (a byte slice inside 'é'):
        // the cases after it show it goes on.
        (
            vec![row("x", "city-a", "2025-é1", 1.0, 9)],
            key(),
            "row 1: period: \"2025-é1\" is not an ISO 8601 period",
        ),
        (vec![good(), good()], key(), "appears twice"),
        (
            vec![
                row("households", "city-a/north", "2025", 3.0, 3),
                row("households", "city-a", "2025", 10.0, 10),
            ],
            key(),
            // Placed at the total's row.
            "row 2: rows: households (test) for 2025: total cell Total is not the sum of the cells it covers",
        ),
        (
            vec![row("nope", "city-a", "2025", 1.0, 9)],
            key(),
            "row 1: catalog_edition: indicator \"nope\" is not in catalog edition \"test\"",
        ),
        (
            vec![pb::IndicatorRow {
                unit: "tonnes".into(),
                ..row("co2", "city-a", "2025", 1.0, 9)
            }],
            key(),
            "row 1: unit: unit \"tonnes\" does not match the catalog's \"t\"",
        ),
        (
            vec![row("firms", "city-a", "2025", 1.0, 9)],
            key(),
            "row 1: period: period \"2025\" is not a quarter",
        ),
        (vec![], key(), "no rows"),
        (
            vec![good()],
            vec![1, 2, 3],
            "idempotency_key: must be 16 bytes, got 3",
        ),
    ];
    for (rows, idempotency_key, expected) in cases {
        let err = publisher
            .publish_indicators(pb::PublishIndicatorsRequest {
                idempotency_key,
                rows,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(
            err.message().contains(expected),
            "{:?} lacks {expected:?}",
            err.message()
        );
    }
    let mut bad_area = good();
    bad_area.area = 42;
    let err = publisher
        .publish_indicators(pb::PublishIndicatorsRequest {
            idempotency_key: key(),
            rows: vec![bad_area],
        })
        .await
        .unwrap_err();
    assert!(
        err.message()
            .contains("row 1: area: 42 is not a functional area"),
        "{}",
        err.message()
    );
    assert_eq!(
        node.head("city-a").await.0,
        0,
        "a refused request changed the feed"
    );
    assert!(node.status().await.heads.is_empty());
    let receipt = publisher
        .publish_indicators(pb::PublishIndicatorsRequest {
            idempotency_key: key(),
            rows: vec![good()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.seq, 1, "publishing does not go on after refusals");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_messages_are_refused_and_large_files_become_publish_groups() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), Spec::new("city-a")).await;
    let mut big = row("jobs", "city-a", "2025", 1.0, 100);
    big.method_notes = "x".repeat(5 << 20);
    let mut publisher = node.publisher().await.max_encoding_message_size(64 << 20);
    let err = publisher
        .publish_indicators(pb::PublishIndicatorsRequest {
            idempotency_key: key(),
            rows: vec![big],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );
    // Too large for one entry, though the message fits: one atomic publish
    // group of consecutive entries, all queryable.
    let rows: Vec<_> = (0..3000)
        .map(|i| pb::IndicatorRow {
            breakdown: format!("item=i{i}"),
            ..row("jobs", "city-a", "2025", 1.0, 100)
        })
        .collect();
    let receipt = publisher
        .publish_indicators(pb::PublishIndicatorsRequest {
            idempotency_key: key(),
            rows,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.first_seq, 1);
    assert!(receipt.seq >= 2, "3000 rows fit one entry?");
    assert_eq!(receipt.published, 3000);
    assert_eq!(
        node.head("city-a").await,
        (receipt.seq, receipt.entry_hash.clone())
    );
    let (all, _) = all_observations(&node, pb::ObservationsRequest::default()).await;
    assert_eq!(all.len(), 3000);
    // Retracting one part retracts the whole group.
    let retraction = publisher
        .retract(pb::RetractRequest {
            idempotency_key: key(),
            seq: receipt.first_seq,
            reason: "wrong file".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        retraction.seq - retraction.first_seq + 1,
        receipt.seq - receipt.first_seq + 1
    );
    let (all, _) = all_observations(&node, pb::ObservationsRequest::default()).await;
    assert!(
        all.is_empty(),
        "{} cells of a retracted group remain",
        all.len()
    );
    let mut big_text = row("jobs", "city-a", "2025", 1.0, 100);
    big_text.method_notes = "x".repeat(70_000);
    let err = publisher
        .publish_indicators(pb::PublishIndicatorsRequest {
            idempotency_key: key(),
            rows: vec![big_text],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("method_notes"), "{}", err.message());
    let before = node.head("city-a").await.0;
    crate::support::publish_row(&node, "x", 1.0).await;
    assert_eq!(node.head("city-a").await.0, before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_threshold_suppresses_small_cells_and_counts_never_leave_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), Spec::new("city-a")).await;
    let rows = vec![
        row("a", "city-a", "2025", 11.0, 0),
        row("b", "city-a", "2025", 12.0, 2),
        row("c", "city-a", "2025", 13.0, 3),
        row("d", "city-a", "2025", 14.0, 987_654_321),
    ];
    let receipt = node
        .publisher()
        .await
        .publish_indicators(pb::PublishIndicatorsRequest {
            idempotency_key: key(),
            rows,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((receipt.published, receipt.suppressed), (2, 2));
    // The signed entry, as any subscriber receives it.
    let mut stream = node
        .feed()
        .await
        .subscribe(pb::SubscribeRequest {
            cursors: vec![pb::Cursor {
                origin: "city-a".into(),
                ..Default::default()
            }],
            all_origins: false,
        })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::subscribe_response::Event::Entries(batch)) =
        stream.message().await.unwrap().unwrap().event
    else {
        panic!("expected entries first");
    };
    let body_bytes = batch.entries[0].body.clone();
    let body = pb::EntryBody::decode(body_bytes.as_ref()).unwrap();
    let Some(pb::entry_body::Payload::Indicators(published)) = body.payload else {
        panic!("not an indicator batch");
    };
    let values: Vec<Option<f64>> = published.observations.iter().map(|o| o.value).collect();
    assert_eq!(values, [None, None, Some(13.0), Some(14.0)]);
    let rules = &published.rules[published.observations[0].rules as usize];
    assert_eq!(rules.name, "civex-sdc");
    assert!(
        rules.parameters.iter().any(
            |p| (p.rule.as_str(), p.name.as_str(), p.value.as_str()) == ("threshold", "n", "3")
        ),
        "{rules:?}"
    );
    let text = format!("{published:?}");
    assert!(!text.contains("987654321"));
    let mut varint = Vec::new();
    prost::encoding::encode_varint(987_654_321, &mut varint);
    assert!(
        !body_bytes.windows(varint.len()).any(|w| w == varint),
        "the count is in the signed bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_can_be_withdrawn_for_good_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), Spec::new("city-a")).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let offer = |id: &str, from: i64, until: i64| pb::PublishOfferRequest {
        idempotency_key: key(),
        offer: Some(pb::ServiceOffer {
            offer_id: id.into(),
            title: "Shared data centre".into(),
            area: FunctionalArea::Infrastructure as i32,
            category: "data-centre".into(),
            valid_from_unix: from,
            valid_until_unix: until,
            contact_role: "IT office".into(),
            ..Default::default()
        }),
    };
    let mut publisher = node.publisher().await;
    publisher
        .publish_offer(offer("dc", now - 10, now + 1000))
        .await
        .unwrap();
    let receipt = publisher
        .publish_offer(offer("old", now - 1000, now - 10))
        .await
        .unwrap()
        .into_inner();
    // Heads names the entry the last receipt named.
    let heads = node
        .feed()
        .await
        .heads(pb::HeadsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .heads;
    let named: Vec<_> = heads
        .iter()
        .map(|h| (h.origin.as_str(), h.seq, &h.entry_hash, &h.feed_id))
        .collect();
    assert_eq!(
        named,
        [("city-a", 2, &receipt.entry_hash, &receipt.feed_id)]
    );
    assert!(heads[0].received_unix_micros > 0 && heads[0].time_unix_micros > 0);
    let node = &node;
    let offers = |all: bool| async move {
        node.query()
            .await
            .offers(pb::OffersRequest {
                include_inactive: all,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .offers
            .into_iter()
            .map(|o| (o.offer.unwrap().offer_id, o.active))
            .collect::<Vec<_>>()
    };
    assert_eq!(offers(false).await, [("dc".to_string(), true)]);
    // An id with a NUL names no offer, not a prefix of one.
    let err = publisher
        .withdraw_offer(pb::WithdrawOfferRequest {
            idempotency_key: key(),
            offer_id: "dc\0".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("offer_id:"), "{}", err.message());
    assert_eq!(offers(false).await, [("dc".to_string(), true)]);
    publisher
        .withdraw_offer(pb::WithdrawOfferRequest {
            idempotency_key: key(),
            offer_id: "dc".into(),
            reason: "full".into(),
        })
        .await
        .unwrap();
    assert!(offers(false).await.is_empty());
    assert_eq!(offers(true).await.len(), 2);
    // One offer a page: "dc", then "old" with no token after it.
    let mut query = node.query().await;
    let mut request = pb::OffersRequest {
        include_inactive: true,
        page_size: 1,
        ..Default::default()
    };
    let mut pages = Vec::new();
    loop {
        let page = query.offers(request.clone()).await.unwrap().into_inner();
        pages.push(
            page.offers
                .iter()
                .map(|o| o.offer.clone().unwrap().offer_id)
                .collect::<Vec<_>>(),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        assert!(pages.len() < 5, "paging does not end: {pages:?}");
        request.page_token = page.next_page_token;
    }
    assert_eq!(pages, [["dc"], ["old"]]);
    request.page_token = "not-a-token".into();
    let err = query.offers(request).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("page_token:"),
        "{}",
        err.message()
    );
    let err = publisher
        .publish_offer(offer("dc", now, now + 10))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("withdrawal is final"),
        "{}",
        err.message()
    );
    let err = publisher
        .publish_offer(offer("Bad Id", now, now + 10))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("offer_id:"), "{}", err.message());
    let err = publisher
        .publish_offer(offer("later", now + 10, now))
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with("valid_until:"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_must_restate_its_table_even_concurrently() {
    // Two publishes of one table (city, district) race: the second to be
    // signed sees the first, still pending, and must restate its cell.
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), Spec::new("city-a").districts(&["north"])).await;
    for i in 0..20 {
        let indicator = format!("cell-{i}");
        let publish = |ref_area: &'static str| {
            let (address, indicator) = (node.address.clone(), indicator.clone());
            tokio::spawn(async move {
                let mut client =
                    pb::publish_client::PublishClient::new(crate::support::connect(&address).await);
                client
                    .publish_indicators(pb::PublishIndicatorsRequest {
                        idempotency_key: key(),
                        rows: vec![row(&indicator, ref_area, "2025", 1.0, 10)],
                    })
                    .await
            })
        };
        let (city, district) = (publish("city-a"), publish("city-a/north"));
        let outcomes = [city.await.unwrap(), district.await.unwrap()];
        let published = outcomes.iter().filter(|o| o.is_ok()).count();
        assert_eq!(published, 1, "{indicator}: {outcomes:?}");
        let refused = outcomes.iter().find_map(|o| o.as_ref().err()).unwrap();
        assert!(
            refused
                .message()
                .contains("a revision must restate every cell of it"),
            "{}",
            refused.message()
        );
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_stream_signs_in_request_order_and_answers_each_request() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), Spec::new("city-a")).await;
    // Each request restates one table with its own value: signed out of
    // order, a request's seq would not be its place in the stream, and the
    // current value would not be the last one sent.
    let requests: Vec<pb::PublishIndicatorsRequest> = (0..300)
        .map(|n| pb::PublishIndicatorsRequest {
            idempotency_key: key(),
            rows: vec![row("jobs", "city-a", "2025", f64::from(n), 100)],
        })
        .collect();
    let (receipts, failure) = publish_stream(&node, requests.clone()).await;
    assert!(failure.is_none(), "{failure:?}");
    let seqs: Vec<u64> = receipts.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=300).collect::<Vec<u64>>());
    assert_eq!(
        node.head("city-a").await,
        (300, receipts[299].entry_hash.clone())
    );
    let (current, _) = all_observations(&node, pb::ObservationsRequest::default()).await;
    let values: Vec<Option<f64>> = current
        .iter()
        .map(|r| r.observation.as_ref().unwrap().value)
        .collect();
    assert_eq!(values, [Some(299.0)]);

    // Sent again (a client that lost its receipts), the requests get their
    // original receipts and publish nothing.
    let (again, failure) = publish_stream(&node, requests[..10].to_vec()).await;
    assert!(failure.is_none(), "{failure:?}");
    assert_eq!(again, receipts[..10]);
    assert_eq!(node.head("city-a").await.0, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_stream_holds_no_more_unanswered_bytes_than_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    // A budget smaller than any request: each waits until the one before it
    // is answered, alone.
    let node = TestNode::start(dir.path(), Spec::new("city-a").publish_stream_bytes(1)).await;
    let first = pb::PublishIndicatorsRequest {
        idempotency_key: key(),
        rows: vec![row("jobs", "city-a", "2025", 1.0, 100)],
    };
    let second = pb::PublishIndicatorsRequest {
        idempotency_key: key(),
        rows: vec![row("jobs", "city-a", "2025", 2.0, 100)],
    };
    // The same publish twice in a row: read while the first were still in
    // flight, the repeat would be refused as in progress; read after the
    // first is answered, it gets the first's receipt.
    let (receipts, failure) = publish_stream(&node, vec![first.clone(), first, second]).await;
    assert!(failure.is_none(), "{failure:?}");
    assert_eq!(receipts.len(), 3);
    assert_eq!(receipts[1], receipts[0]);
    assert_eq!((receipts[0].seq, receipts[2].seq), (1, 2));
    assert_eq!(node.head("city-a").await.0, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_stream_budget_is_the_nodes_over_all_streams() {
    let dir = tempfile::tempdir().unwrap();
    // A budget smaller than any request: each request waits until it is
    // alone in the node, whatever stream it came on.
    let node = TestNode::start(dir.path(), Spec::new("city-a").publish_stream_bytes(1)).await;
    let requests: Vec<_> = (0..20)
        .map(|i| pb::PublishIndicatorsRequest {
            idempotency_key: key(),
            rows: vec![row("jobs", "city-a", "2025", f64::from(i), 100)],
        })
        .collect();
    // The same requests on two streams at once: read while its twin from
    // the other stream were in flight, a request would be refused as in
    // progress; read after it is durable, it gets its twin's receipt.
    let (one, two) = tokio::join!(
        publish_stream(&node, requests.clone()),
        publish_stream(&node, requests)
    );
    for (receipts, failure) in [&one, &two] {
        assert!(failure.is_none(), "{failure:?}");
        assert_eq!(receipts.len(), 20);
    }
    assert_eq!(one.0, two.0);
    assert_eq!(node.head("city-a").await.0, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_stream_of_small_requests_that_outruns_the_node_keeps_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    // One request at a time in the node, so the caller runs far ahead.
    let node = TestNode::start(dir.path(), Spec::new("city-a").publish_stream_bytes(1)).await;
    // Sent one at a time, each small request is a DATA frame of its own.
    // Before the node set its HTTP/2 windows, some 2,700 of them waiting
    // to be read made h2 close the connection (GOAWAY ENHANCE_YOUR_CALM,
    // "too_many_data_frames"): flow control must hold the caller back
    // first.
    const REQUESTS: u32 = 4_000;
    let (requests, stream) = tokio::sync::mpsc::channel(1);
    let mut client = node.publisher().await;
    let mut receipts = client
        .publish_indicators_stream(tokio_stream::wrappers::ReceiverStream::new(stream))
        .await
        .unwrap()
        .into_inner();
    tokio::spawn(async move {
        for i in 0..REQUESTS {
            let request = pb::PublishIndicatorsRequest {
                idempotency_key: key(),
                rows: vec![row("jobs", "city-a", "2025", f64::from(i), 100)],
            };
            if requests.send(request).await.is_err() {
                return;
            }
        }
    });
    for seq in 1..=u64::from(REQUESTS) {
        match receipts.message().await {
            Ok(Some(receipt)) => assert_eq!(receipt.seq, seq),
            other => panic!("receipt {seq} of {REQUESTS}: {other:?}"),
        }
    }
    assert_eq!(node.head("city-a").await.0, u64::from(REQUESTS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_stream_ends_at_its_first_bad_request_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), Spec::new("city-a")).await;
    let good = |value: f64| pb::PublishIndicatorsRequest {
        idempotency_key: key(),
        rows: vec![row("jobs", "city-a", "2025", value, 100)],
    };
    // Refused when signed: the requests before it are published.
    let unknown = pb::PublishIndicatorsRequest {
        idempotency_key: key(),
        rows: vec![row("nope", "city-a", "2025", 1.0, 9)],
    };
    let unknown_key = hex(&unknown.idempotency_key);
    let (requests, stream) = tokio::sync::mpsc::channel(8);
    let mut receipts = node
        .publisher()
        .await
        .publish_indicators_stream(tokio_stream::wrappers::ReceiverStream::new(stream))
        .await
        .unwrap()
        .into_inner();
    for request in [good(1.0), good(2.0), unknown] {
        requests.send(request).await.unwrap();
    }
    for seq in [1, 2] {
        assert_eq!(receipts.message().await.unwrap().unwrap().seq, seq);
    }
    let err = receipts.message().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    for expected in [
        format!("request 2 of the stream (idempotency key {unknown_key})"),
        "indicator \"nope\" is not in catalog edition \"test\"".to_owned(),
    ] {
        assert!(
            err.message().contains(&expected),
            "{:?} lacks {expected:?}",
            err.message()
        );
    }
    // Nothing is read after it: a request sent once the stream failed is
    // not published, so the next publish gets seq 3.
    let _ = requests.send(good(3.0)).await;
    drop(requests);
    assert!(matches!(receipts.message().await, Ok(None) | Err(_)));
    let next = node
        .publisher()
        .await
        .publish_indicators(good(3.5))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        next.seq, 3,
        "a request sent after the failure was published"
    );

    // Refused when read (a malformed key): named by its index alone when
    // it has no usable key, and nothing after it is published either.
    let mut short_key = good(4.0);
    short_key.idempotency_key = vec![1, 2, 3];
    let (published, failure) = publish_stream(&node, vec![good(5.0), short_key, good(6.0)]).await;
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].seq, 4);
    let err = failure.expect("the stream did not fail");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("request 1 of the stream: idempotency_key: must be 16 bytes, got 3"),
        "{}",
        err.message()
    );
    assert_eq!(node.head("city-a").await.0, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_queued_when_a_stream_fails_keep_their_keys_until_durable() {
    // A slow first request holds up the answers while the node reads and
    // queues the next thousand; the second fails. Requests queued then are
    // published, and a client that sends them all again at once (as the
    // contract tells it to) must get each published exactly once. (A
    // publish the reader was still handing over when the stream failed
    // once lost its key's busy mark: a retry racing it signed it twice;
    // the race is narrow, so this catches it only now and then.)
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), Spec::new("city-a")).await;
    let slow = pb::PublishIndicatorsRequest {
        idempotency_key: key(),
        rows: (0..2400)
            .map(|n| {
                let month = format!("{}-{:02}", 1900 + n / 12, n % 12 + 1);
                row("outages", "city-a", &month, 1.0, 100)
            })
            .collect(),
    };
    let bad = pb::PublishIndicatorsRequest {
        idempotency_key: key(),
        rows: vec![row("nope", "city-a", "2025", 1.0, 9)],
    };
    let goods: Vec<pb::PublishIndicatorsRequest> = (0..1500)
        .map(|n| pb::PublishIndicatorsRequest {
            idempotency_key: key(),
            rows: vec![row("jobs", "city-a", "2025", f64::from(n), 100)],
        })
        .collect();
    let requests = [vec![slow, bad], goods.clone()].concat();
    let (receipts, failure) = publish_stream(&node, requests).await;
    let failure = failure.expect("the stream did not fail");
    assert_eq!(
        failure.code(),
        Code::InvalidArgument,
        "{}",
        failure.message()
    );
    let first = receipts
        .first()
        .unwrap_or_else(|| panic!("the slow request was not answered: {failure:?}"));
    let client = node.publisher().await;
    let mut retries = Vec::new();
    for request in goods {
        let mut client = client.clone();
        retries.push(tokio::spawn(async move {
            loop {
                match client.publish_indicators(request.clone()).await {
                    Ok(receipt) => return receipt.into_inner().seq,
                    // Its first publish is still on its way: retry.
                    Err(status) if status.code() == Code::Unavailable => {
                        tokio::task::yield_now().await
                    }
                    Err(status) => panic!("retry refused: {status:?}"),
                }
            }
        }));
    }
    let mut seqs = std::collections::BTreeSet::new();
    for retry in retries {
        assert!(
            seqs.insert(retry.await.unwrap()),
            "two requests got one seq"
        );
    }
    let groups = first.seq - first.first_seq + 1;
    assert_eq!(
        node.head("city-a").await.0,
        groups + 1500,
        "a request was published twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_publish_stream_ends_when_the_node_stops() {
    let dir = tempfile::tempdir().unwrap();
    // A grace period far longer than the waits below: the stream has to
    // end by itself for the node to stop in time.
    let mut node =
        TestNode::start(dir.path(), Spec::new("city-a").shutdown_grace_ms(600_000)).await;
    let (requests, stream) = tokio::sync::mpsc::channel(8);
    let mut receipts = node
        .publisher()
        .await
        .publish_indicators_stream(tokio_stream::wrappers::ReceiverStream::new(stream))
        .await
        .unwrap()
        .into_inner();
    requests
        .send(pb::PublishIndicatorsRequest {
            idempotency_key: key(),
            rows: vec![row("jobs", "city-a", "2025", 1.0, 100)],
        })
        .await
        .unwrap();
    assert_eq!(receipts.message().await.unwrap().unwrap().seq, 1);
    let stopping = tokio::spawn(async move { node.stop().await });
    let limit = std::time::Duration::from_secs(60);
    let err = tokio::time::timeout(limit, receipts.message())
        .await
        .expect("the publish stream did not end at shutdown")
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message()
            .contains("request 1 of the stream: the node is shutting down"),
        "{}",
        err.message()
    );
    tokio::time::timeout(limit, stopping)
        .await
        .expect("the node did not stop while a publish stream was open")
        .unwrap();
    drop(requests);
}
