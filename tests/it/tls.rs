//! Mutual TLS: refused certificates, revocation of a live connection,
//! roles from the certificate, and the explicit insecure mode.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use civex_node::{
    pki::{write_identity_dir, Authority, Identity},
    transport::{self, Security},
};
use civex_proto::v1 as pb;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};
use tokio::io::AsyncReadExt;

use crate::support::{
    ca, civex_async, eventually, publish_row, revoke, serial_of, stderr, write_node_dir, ChildNode,
    Pair, Spec, TestNode,
};

/// Accepts any server certificate: these handshakes test what the server
/// refuses, so the client must not refuse first.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Handshakes with `address` presenting the certificate in `identity_dir`;
/// returns the local port used and whether the server went on to speak
/// HTTP/2 (accepted) or ended the connection (refused).
async fn present(address: &str, identity_dir: &Path) -> (u16, bool) {
    let (port, accepted, _) = present_with(address, client_config(identity_dir)).await;
    (port, accepted)
}

/// A client presenting the certificate in `identity_dir`, accepting any
/// server, with rustls's default session cache.
fn client_config(identity_dir: &Path) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_file_iter(identity_dir.join("cert.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(identity_dir.join("key.pem")).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(chain, key)
        .unwrap();
    Arc::new(config)
}

/// [`present`] with a client `config` (which may hold sessions from an
/// earlier handshake); also returns the kind of handshake made.
async fn present_with(
    address: &str,
    config: Arc<rustls::ClientConfig>,
) -> (u16, bool, Option<rustls::HandshakeKind>) {
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut kind = None;
    let accepted = match connector
        .connect(ServerName::try_from("node").unwrap(), tcp)
        .await
    {
        // In TLS 1.3 the server judges the client's certificate after the
        // client finished: a refusal shows on the first read.
        Ok(mut tls) => {
            kind = tls.get_ref().1.handshake_kind();
            let mut byte = [0u8; 1];
            matches!(
                tokio::time::timeout(Duration::from_secs(10), tls.read(&mut byte)).await,
                Ok(Ok(1))
            )
        }
        Err(_) => false,
    };
    (port, accepted, kind)
}

/// Whether `node` has an open subscription to its peer named `peer`.
async fn connected(node: &TestNode, peer: &str) -> bool {
    node.status()
        .await
        .peers
        .iter()
        .any(|p| p.name == peer && p.connected)
}

/// An identity directory trusting this federation's CA but holding a
/// certificate issued by `issuer` from `not_before` to `not_after`.
fn identity_from(
    dir: &Path,
    issuer: &Authority,
    identity: &Identity,
    not_before: SystemTime,
    not_after: SystemTime,
) {
    let issued = issuer
        .issue_between(identity, None, not_before, not_after)
        .unwrap();
    write_identity_dir(dir, ca().cert_pem(), &issued).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_certificates_are_logged_with_the_peer_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    write_node_dir(
        dir.path(),
        &Spec::new("city-a").allow_without_peers(),
        "127.0.0.1:0",
    );
    let mut node = ChildNode::start_async(dir.path()).await;
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let operator = Identity::Operator("ops".into());

    // A valid operator certificate is accepted.
    let good = dir.path().join("good");
    identity_from(&good, ca(), &operator, now - day, now + day);
    assert!(
        present(&node.address, &good).await.1,
        "a valid certificate was refused"
    );

    let (other, _) = Authority::create("another federation", 1).unwrap();
    let cases = [
        ("unknown-ca", &other, now - day, now + day, "UnknownIssuer"),
        (
            "expired",
            ca(),
            now - 3 * day,
            now - day,
            "certificate expired",
        ),
    ];
    for (name, issuer, from, until, reason) in cases {
        let identity_dir = dir.path().join(name);
        identity_from(&identity_dir, issuer, &operator, from, until);
        let (port, accepted) = present(&node.address, &identity_dir).await;
        assert!(!accepted, "{name}: the certificate was accepted");
        let line = format!("127.0.0.1:{port}");
        eventually(&format!("the node to log refusing {name}"), || async {
            node.log_text().lines().any(|l| {
                l.contains("TLS connection refused") && l.contains(&line) && l.contains(reason)
            })
        })
        .await;
    }

    // Revoked: the node re-reads its revocation list within 50 ms.
    let revoked = dir.path().join("revoked");
    identity_from(&revoked, ca(), &operator, now - day, now + day);
    let crl = dir.path().join("tls/ca.crl");
    let older = std::fs::read(&crl).unwrap();
    revoke(dir.path(), &[serial_of(&revoked)]);
    eventually(
        "the revoked certificate to be refused and logged",
        || async {
            let (port, accepted) = present(&node.address, &revoked).await;
            let line = format!("127.0.0.1:{port}");
            !accepted
                && node
                    .log_text()
                    .lines()
                    .any(|l| l.contains(&line) && l.contains("Revoked"))
        },
    )
    .await;
    assert!(
        present(&node.address, &good).await.1,
        "revocation hit another certificate"
    );
    // An older revocation list (a file restored from a backup, say) does
    // not take the revocation back: it is refused, naming the file.
    std::fs::write(crl.with_extension("tmp"), &older).unwrap();
    std::fs::rename(crl.with_extension("tmp"), &crl).unwrap();
    eventually("the node to refuse the older revocation list", || async {
        node.log_text().lines().any(|l| {
            l.contains("ca.crl: holds revocation list number") && l.contains("older than number")
        })
    })
    .await;
    assert!(
        !present(&node.address, &revoked).await.1,
        "the older revocation list took the revocation back"
    );
    // Logged when it appeared, not at every reload period since (a
    // negative over six periods, not a wait for something to happen).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = node
        .log_text()
        .lines()
        .filter(|l| l.contains("older than number"))
        .count();
    assert_eq!(lines, 1, "{}", node.log_text());
    // Nor does an empty file (a cut copy, a full disk) or another CA's
    // list in its place: either would take every revocation back.
    let (other_ca, _) = civex_node::pki::Authority::create("Other federation", 1).unwrap();
    let other_crl = other_ca.revocation_list(&[], 1, 1).unwrap();
    for (contents, says) in [
        (Vec::new(), "ca.crl: holds no revocation list (no PEM"),
        (
            other_crl.into_bytes(),
            "ca.crl: holds no revocation list of the CA in",
        ),
    ] {
        std::fs::write(crl.with_extension("tmp"), contents).unwrap();
        std::fs::rename(crl.with_extension("tmp"), &crl).unwrap();
        eventually(&format!("the node to refuse: {says}"), || async {
            node.log_text().lines().any(|l| l.contains(says))
        })
        .await;
        assert!(
            !present(&node.address, &revoked).await.1,
            "{says}: the revocation was taken back"
        );
    }
    std::fs::write(crl.with_extension("tmp"), &older).unwrap();
    std::fs::rename(crl.with_extension("tmp"), &crl).unwrap();
    // The log went to a file: plain lines, no terminal colour codes.
    let log = node.log_text();
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file: {log:?}"
    );
    // Nor does a restart with the older list in place: the node remembers
    // the newest one it used, and refuses to start.
    let status = tokio::task::spawn_blocking(move || node.sigterm())
        .await
        .unwrap();
    assert!(status.success(), "civex-node exited with {status}");
    /// Kills the node should it start after all (the test then fails).
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut restarted = Killed(
        std::process::Command::new(crate::support::bin("civex-node"))
            .arg("--config")
            .arg(dir.path().join("node.toml"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    eventually("the node to refuse to start", || {
        let ended = restarted.0.try_wait().unwrap().is_some();
        async move { ended }
    })
    .await;
    let mut errors = String::new();
    std::io::Read::read_to_string(restarted.0.stderr.as_mut().unwrap(), &mut errors).unwrap();
    assert!(
        errors.contains("ca.crl: holds revocation list number")
            && errors.contains("this node used before"),
        "{errors}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_expires_loses_its_live_connection_and_no_session_outlives_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), Spec::new("city-a")).await;
    let now = SystemTime::now();
    let short = dir.path().join("short");
    let operator = Identity::Operator("test".into());
    identity_from(
        &short,
        ca(),
        &operator,
        now - Duration::from_secs(3600),
        now + Duration::from_secs(3),
    );

    // The node keeps no sessions to resume (a resumed session skips the
    // certificate checks): a client that keeps them gets a full handshake
    // every time.
    let config = client_config(&short);
    for attempt in 0..2 {
        let (_, accepted, kind) = present_with(&node.address, config.clone()).await;
        assert!(accepted, "handshake {attempt} refused");
        assert_eq!(
            kind,
            Some(rustls::HandshakeKind::Full),
            "handshake {attempt}"
        );
    }

    // A connection opened while the certificate is valid is closed once
    // it has expired (the node checks within its reload period, 50 ms in
    // tests), and no new one opens.
    let live = crate::support::connect_as(&node.address, &short).await;
    let status = || async {
        pb::status_client::StatusClient::new(live.clone())
            .node_status(pb::NodeStatusRequest {})
            .await
    };
    status().await.expect("the certificate is still valid");
    eventually("the expired certificate's connection to close", || async {
        status().await.is_err()
    })
    .await;
    assert!(SystemTime::now() >= now + Duration::from_secs(3));
    assert!(!present(&node.address, &short).await.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_must_present_the_origin_expected_not_just_any_member() {
    let dir = tempfile::tempdir().unwrap();
    let a = TestNode::start(dir.path(), Spec::new("city-a").allow_without_peers()).await;
    let err = transport::connect(
        &a.address,
        &crate::support::operator(),
        Some(Identity::Origin("city-b".into())),
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    let text = transport::error_chain(&err);
    assert!(
        text.contains("names origin city-a, expected origin city-b"),
        "{text}"
    );
    // The CLI checks the node it talks to the same way.
    let out = a.cli(&["--expect-origin", "city-b", "status"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("expected origin city-b"),
        "{}",
        stderr(&out)
    );
    let out = a.cli(&["--expect-origin", "city-a", "status"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_come_from_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let member_dir = dir.path().join("member");
    // A knows city-m: it pins its key.
    let m_key = crate::support::make_key(&member_dir);
    let a = TestNode::start(
        &dir.path().join("a"),
        Spec::new("city-a")
            .trust("city-m", &m_key)
            .allow_without_peers(),
    )
    .await;
    a.wait_ready().await;
    // A member node's certificate may read the feed, and nothing else.
    crate::support::issue_identity(&member_dir, &Identity::Origin("city-m".into()));
    let channel = crate::support::connect_as(&a.address, &member_dir).await;
    let denied = pb::publish_client::PublishClient::new(channel.clone())
        .publish_indicators(pb::PublishIndicatorsRequest {
            idempotency_key: crate::support::key(),
            rows: vec![crate::support::row("x", "city-a", "2025", 1.0, 10)],
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert!(
        denied
            .message()
            .contains("publishing needs an operator certificate"),
        "{}",
        denied.message()
    );
    for code in [
        pb::status_client::StatusClient::new(channel.clone())
            .node_status(pb::NodeStatusRequest {})
            .await
            .unwrap_err()
            .code(),
        pb::query_client::QueryClient::new(channel.clone())
            .observations(pb::ObservationsRequest::default())
            .await
            .unwrap_err()
            .code(),
    ] {
        assert_eq!(code, tonic::Code::PermissionDenied);
    }
    assert_eq!(a.head("city-a").await.0, 0, "a member published");
    // An operator certificate from the same CA, for another city's
    // operator (not in this node's tls.operators), is refused too.
    let stranger_dir = dir.path().join("stranger");
    crate::support::issue_identity(&stranger_dir, &Identity::Operator("stranger".into()));
    let channel_s = crate::support::connect_as(&a.address, &stranger_dir).await;
    let denied = pb::publish_client::PublishClient::new(channel_s)
        .publish_indicators(pb::PublishIndicatorsRequest {
            idempotency_key: crate::support::key(),
            rows: vec![crate::support::row("x", "city-a", "2025", 1.0, 10)],
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert!(
        denied.message().contains("not an operator of this node"),
        "{}",
        denied.message()
    );
    assert_eq!(
        a.head("city-a").await.0,
        0,
        "another city's operator published"
    );
    // The operator publishes; the member then reads it from the feed.
    publish_row(&a, "x", 1.0).await;
    // A member certified by the same CA but unknown to A may not read it
    // (rule 6: unknown origins are refused).
    let unknown_dir = dir.path().join("unknown");
    crate::support::issue_identity(&unknown_dir, &Identity::Origin("city-u".into()));
    let channel_u = crate::support::connect_as(&a.address, &unknown_dir).await;
    let mut feed_u = pb::feed_client::FeedClient::new(channel_u);
    let denied = feed_u
        .subscribe(pb::SubscribeRequest {
            cursors: Vec::new(),
            all_origins: true,
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert!(
        denied.message().contains(
            "node city-a does not know origin city-u: on city-a, pin its feed key under [trusted_origins]"
        ),
        "{}",
        denied.message()
    );
    // Nor learn what it holds.
    let denied = feed_u.heads(pb::HeadsRequest::default()).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let mut stream = crate::support::subscribe_all_over(channel).await;
    let mut seen = 0;
    while seen == 0 {
        let message = stream.message().await.unwrap().unwrap();
        if let Some(pb::subscribe_response::Event::Entries(batch)) = message.event {
            seen = batch.entries.len();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_peer_is_cut_off_on_its_live_connection_and_back_once_reinstated() {
    let dir = tempfile::tempdir().unwrap();
    let Pair {
        a,
        b,
        proxy_a: _pa,
        proxy_b: _pb,
    } = Pair::start(dir.path()).await;
    eventually("both peers to connect", || async {
        connected(&a, "city-b").await && connected(&b, "city-a").await
    })
    .await;
    a.wait_ready().await;

    // A revokes B's node certificate: B's subscription to A is cut, and A
    // refuses B's certificate when dialling B.
    let b_serial = serial_of(&dir.path().join("b/tls"));
    revoke(&dir.path().join("a"), &[b_serial]);
    eventually("A and B to lose each other", || async {
        let a_peer = a
            .status()
            .await
            .peers
            .into_iter()
            .find(|p| p.name == "city-b");
        !connected(&b, "city-a").await
            && a_peer.is_some_and(|p| !p.connected && p.last_error.contains("Revoked"))
    })
    .await;
    publish_row(&a, "while-revoked", 1.0).await;

    // Reinstated: B reconnects and catches up on what A published meanwhile.
    revoke(&dir.path().join("a"), &[]);
    eventually("B to catch up on A", || async {
        b.head("city-a").await.0 >= a.head("city-a").await.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_mode_is_plain_grpc_on_loopback_and_tls_nodes_refuse_plain_clients() {
    let dir = tempfile::tempdir().unwrap();
    let node_dir = dir.path().join("plain");
    let out = civex_async(&[
        "init",
        node_dir.to_str().unwrap(),
        "--origin",
        "city-p",
        "--insecure-node",
        "--listen",
        "127.0.0.1:0",
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !node_dir.join("tls").exists(),
        "an insecure node got TLS files"
    );
    let plain = ChildNode::start_async(&node_dir).await;
    let out = civex_async(&["--node", &plain.address, "--insecure", "status"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    // Without a certificate, --expect-origin is checked against the
    // origin the node's status names. Found by review.
    let expecting = |origin: &'static str| {
        let address = plain.address.clone();
        async move {
            civex_async(&[
                "--node",
                &address,
                "--insecure",
                "--expect-origin",
                origin,
                "status",
            ])
            .await
        }
    };
    let out = expecting("city-q").await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--expect-origin city-q: the node at")
            && stderr(&out).contains("is city-p"),
        "{}",
        stderr(&out)
    );
    assert!(expecting("city-p").await.status.success());

    let secure = TestNode::start(&dir.path().join("tls"), Spec::new("city-a")).await;
    let refused = transport::connect(
        &secure.address,
        &Security::Insecure,
        None,
        Duration::from_secs(5),
    )
    .await;
    let plain_call = match refused {
        Err(_) => true,
        Ok(channel) => pb::status_client::StatusClient::new(channel)
            .node_status(pb::NodeStatusRequest {})
            .await
            .is_err(),
    };
    assert!(plain_call, "a TLS node answered plain gRPC");
}

/// Idle sockets from one address that never start a handshake hold at most
/// a few of the node's handshake slots: a member connecting meanwhile from
/// elsewhere is served at once, not after the idle ones time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_from_one_address_do_not_keep_members_out() {
    let dir = tempfile::tempdir().unwrap();
    // Handshakes time out only after a minute: long past the deadline below.
    let node = TestNode::start(
        dir.path(),
        Spec::new("city-a")
            .allow_without_peers()
            .handshake_timeout_ms(60_000),
    )
    .await;
    node.wait_ready().await;
    let target: std::net::SocketAddr = node.address.parse().unwrap();
    // More idle sockets than the node runs handshakes at once: without a
    // limit per source they would take every one.
    let mut idle = Vec::new();
    for _ in 0..300 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        // Past its pending limit the node closes them: some may fail.
        if let Ok(stream) = socket.connect(target).await {
            idle.push(stream);
        }
    }
    // Each idle socket is accepted (or closed) before the member's: the
    // node answers the member only after it went past all of them.
    let status = tokio::time::timeout(std::time::Duration::from_secs(20), node.status())
        .await
        .expect("a member waited behind idle sockets of another address");
    assert_eq!(status.origin, "city-a");
    drop(idle);
}
