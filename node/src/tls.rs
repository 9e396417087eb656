//! Mutual TLS 1.3 with the federation's certificates (rustls, ring).
//!
//! Both ends present a certificate issued by the federation CA. A server
//! accepts any valid member certificate and authorizes per call by the
//! identity it names ([`PeerInfo`]); a client checks that the server is the
//! origin it expects, whatever address it dialled. The CA, the node's
//! certificate and key, and the revocation list are files, re-read every
//! reload period: a changed revocation list applies to new handshakes and
//! closes live connections whose certificate it now revokes.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    task::{Context, Poll},
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{
        pem::PemObject, CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName,
        UnixTime,
    },
    server::WebPkiClientVerifier,
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use webpki::{CertRevocationList, OwnedCertRevocationList, RevocationOptionsBuilder};

use crate::{keys::read_secret_file, pki::Identity};

/// The files of a TLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The federation CA certificate (PEM).
    pub ca: PathBuf,
    /// This end's certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, mode 0600).
    pub key: PathBuf,
    /// The CA's revocation list (PEM), if any.
    pub crl: Option<PathBuf>,
}

impl TlsFiles {
    /// The files of an identity directory made by `civex ca issue`:
    /// `ca.pem`, `cert.pem`, `key.pem` and, if present, `ca.crl`.
    pub fn in_dir(dir: &Path) -> Self {
        let crl = dir.join("ca.crl");
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            crl: crl.exists().then_some(crl),
        }
    }
}

/// A TLS file problem, naming the file.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TlsError {
    /// The file at fault.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

fn file_error(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Who is at the other end of a server connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Its address.
    pub addr: SocketAddr,
    /// The identity its certificate names; `None` on a plain loopback
    /// connection (the explicit `insecure` mode, where every role is open).
    pub identity: Option<Identity>,
}

/// The one crypto provider.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What was loaded from the files.
struct Loaded {
    /// Hash of every file's contents, to notice changes.
    stamp: [u8; 32],
    own: Identity,
    /// Why this end's own certificate is not valid, if it is not.
    own_problem: Option<TlsError>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    crls: Arc<Vec<CertRevocationList<'static>>>,
    /// Where each revocation list stands in its issuer's sequence.
    crl_standings: Vec<CrlStanding>,
    server: Arc<ServerConfig>,
}

/// Where a revocation list stands among its issuer's: its CRL number
/// (`civex ca revoke` counts them up), else the time it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CrlStanding {
    /// The issuer's name, DER.
    issuer: Vec<u8>,
    number: Option<x509_parser::num_bigint::BigUint>,
    /// Its thisUpdate, seconds since the Unix epoch.
    made: i64,
}

impl CrlStanding {
    fn of(der: &[u8]) -> Result<Self, String> {
        let (_, crl) = x509_parser::parse_x509_crl(der).map_err(|err| err.to_string())?;
        Ok(Self {
            issuer: crl.issuer().as_raw().to_vec(),
            number: crl.crl_number().cloned(),
            made: crl.last_update().timestamp(),
        })
    }

    /// Whether this list is older than `other` of the same issuer.
    fn older_than(&self, other: &Self) -> bool {
        self.issuer == other.issuer
            && match (&self.number, &other.number) {
                (Some(mine), Some(theirs)) => mine < theirs,
                _ => self.made < other.made,
            }
    }

    fn describe(&self) -> String {
        match &self.number {
            Some(number) => format!("number {number}"),
            None => format!("made at {} (Unix time)", self.made),
        }
    }

    /// One line of the file [`Tls::remember_revocations`] keeps.
    fn line(&self) -> String {
        let number = self.number.as_ref().map_or("-".into(), ToString::to_string);
        format!(
            "{} {number} {}",
            crate::core::ids::hex(&self.issuer),
            self.made
        )
    }

    fn parse_line(line: &str) -> Option<Self> {
        let mut parts = line.split_whitespace();
        let issuer = crate::core::ids::unhex(parts.next()?).ok()?;
        let number = match parts.next()? {
            "-" => None,
            digits => Some(x509_parser::num_bigint::BigUint::parse_bytes(
                digits.as_bytes(),
                10,
            )?),
        };
        let made = parts.next()?.parse().ok()?;
        Some(Self {
            issuer,
            number,
            made,
        })
    }
}

/// The highest CRL number among the revocation lists in `pem` (`civex ca
/// revoke` numbers the next one above it); `None` if none has one.
pub fn highest_crl_number(pem: &[u8]) -> Option<u64> {
    CertificateRevocationListDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .filter_map(|der| CrlStanding::of(&der).ok()?.number)
        .filter_map(|number| u64::try_from(number).ok())
        .max()
}

/// The revocation lists remembered in `path` (none if it is missing).
fn remembered_in(path: &Path) -> Result<Vec<CrlStanding>, TlsError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.lines().filter_map(CrlStanding::parse_line).collect()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(err) => Err(file_error(path, format!("cannot read: {err}"))),
    }
}

/// Writes `newest` to `path`, with the entries of `earlier` for issuers
/// `newest` does not name (another CA's list, kept should it come back).
fn write_standings(
    path: &Path,
    earlier: &[CrlStanding],
    newest: &[CrlStanding],
) -> Result<(), TlsError> {
    let kept = earlier
        .iter()
        .filter(|old| newest.iter().all(|new| new.issuer != old.issuer));
    let text: String = newest
        .iter()
        .chain(kept)
        .map(|standing| standing.line() + "\n")
        .collect();
    crate::keys::replace_file(path, text.as_bytes())
        .map_err(|err| file_error(path, format!("cannot write: {err}")))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|err| file_error(path, format!("cannot read: {err}")))
}

impl Loaded {
    fn load(files: &TlsFiles, expect_own: Option<&Identity>) -> Result<Self, TlsError> {
        let ca_bytes = read(&files.ca)?;
        let cert_bytes = read(&files.cert)?;
        let key_text = read_secret_file(&files.key).map_err(|err| TlsError {
            path: files.key.display().to_string(),
            // The key error names the file too: say it once.
            message: match err {
                crate::keys::KeyError::File { message, .. } => message,
                other => other.to_string(),
            },
        })?;
        let crl_bytes = match &files.crl {
            Some(path) => Some(read(path)?),
            None => None,
        };
        let mut hasher = Sha256::new();
        for part in [&ca_bytes[..], &cert_bytes, key_text.as_bytes()] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        hasher.update(crl_bytes.as_deref().unwrap_or_default());
        let stamp = hasher.finalize().into();

        let mut roots = RootCertStore::empty();
        let cas = CertificateDer::pem_slice_iter(&ca_bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| file_error(&files.ca, format!("not a PEM certificate: {err}")))?;
        if cas.is_empty() {
            return Err(file_error(&files.ca, "holds no certificate"));
        }
        // The subjects of the CAs, as their lists name them as issuer.
        let ca_names = cas
            .iter()
            .map(|ca| {
                x509_parser::parse_x509_certificate(ca)
                    .map(|(_, ca)| ca.subject().as_raw().to_vec())
                    .map_err(|err| file_error(&files.ca, format!("does not parse: {err}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for ca in cas {
            roots
                .add(ca)
                .map_err(|err| file_error(&files.ca, format!("not a CA certificate: {err}")))?;
        }
        let roots = Arc::new(roots);
        let chain = CertificateDer::pem_slice_iter(&cert_bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| file_error(&files.cert, format!("not a PEM certificate: {err}")))?;
        let Some(leaf) = chain.first() else {
            return Err(file_error(&files.cert, "holds no certificate"));
        };
        let (own, _) = Identity::of_certificate(leaf).map_err(|m| file_error(&files.cert, m))?;
        if let Some(expected) = expect_own {
            if &own != expected {
                return Err(file_error(
                    &files.cert,
                    format!("names {own}, but this is {expected}"),
                ));
            }
        }
        let key = PrivateKeyDer::from_pem_slice(key_text.as_bytes())
            .map_err(|_| file_error(&files.key, "holds no PEM private key"))?;
        let (crl_ders, crls, crl_standings) = match (&files.crl, crl_bytes) {
            (Some(path), Some(bytes)) => {
                let ders = CertificateRevocationListDer::pem_slice_iter(&bytes)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|err| file_error(path, format!("not a PEM revocation list: {err}")))?;
                // An empty or cut copy would take every revocation back.
                if ders.is_empty() {
                    return Err(file_error(
                        path,
                        "holds no revocation list (no PEM \"X509 CRL\" block); copy the CA's \
                         newest ca.crl here",
                    ));
                }
                let parsed = ders
                    .iter()
                    .map(|der| {
                        OwnedCertRevocationList::from_der(der)
                            .map(CertRevocationList::from)
                            .map_err(|err| file_error(path, format!("does not parse: {err}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let standings = ders
                    .iter()
                    .map(|der| {
                        CrlStanding::of(der)
                            .map_err(|err| file_error(path, format!("does not parse: {err}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                // Another CA's list in its place (a copy from the wrong
                // folder) would take every revocation back too.
                if !standings
                    .iter()
                    .any(|s: &CrlStanding| ca_names.contains(&s.issuer))
                {
                    return Err(file_error(
                        path,
                        format!(
                            "holds no revocation list of the CA in {}; copy that CA's newest \
                             ca.crl here",
                            files.ca.display()
                        ),
                    ));
                }
                (ders, parsed, standings)
            }
            _ => (Vec::new(), Vec::new(), Vec::new()),
        };
        let crls = Arc::new(crls);
        // The own certificate must chain to the CA and not be revoked: a
        // misconfigured node fails at start, not at its peers. On a reload
        // the new files apply anyway (a revocation list that revokes this
        // node's own certificate still revokes the others).
        let own_problem = verify_chain(
            leaf,
            &chain[1..],
            &roots,
            &crls,
            webpki::KeyUsage::client_auth(),
        )
        .err()
        .map(|err| file_error(&files.cert, format!("is not valid for this CA: {err}")));

        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .with_crls(crl_ders)
                .only_check_end_entity_revocation()
                .build()
                .map_err(|err| file_error(&files.ca, format!("cannot verify clients: {err}")))?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|err| file_error(&files.cert, err.to_string()))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|err| {
                file_error(&files.key, format!("does not match the certificate: {err}"))
            })?;
        let mut server = server;
        server.alpn_protocols = vec![b"h2".to_vec()];
        // No resumption: a resumed session skips the certificate checks,
        // so a certificate that expired since (or a CA replaced since)
        // would go on being accepted through it.
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        Ok(Self {
            stamp,
            own,
            own_problem,
            chain,
            key,
            roots,
            crls,
            crl_standings,
            server: Arc::new(server),
        })
    }

    fn client_config(&self, expected: Option<Identity>) -> Result<ClientConfig, io::Error> {
        let verifier = PeerVerifier {
            roots: self.roots.clone(),
            crls: self.crls.clone(),
            expected,
            provider: provider(),
        };
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(io::Error::other)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(io::Error::other)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// Why the certificate of a live connection is no longer accepted
    /// (expired, revoked, or not of this CA any more); `None` while it is.
    fn refuses(&self, conn: &Live) -> Option<rustls::Error> {
        let usage = match conn.side {
            Side::Accepted => webpki::KeyUsage::client_auth(),
            Side::Dialled => webpki::KeyUsage::server_auth(),
        };
        let (leaf, intermediates) = conn.chain.split_first()?;
        verify_chain(leaf, intermediates, &self.roots, &self.crls, usage).err()
    }
}

/// Checks a certificate chain against the CA and the revocation lists.
fn verify_chain(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &RootCertStore,
    crls: &[CertRevocationList<'_>],
    usage: webpki::KeyUsage,
) -> Result<(), rustls::Error> {
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(|err| {
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
            err,
        ))))
    })?;
    let refs: Vec<&CertRevocationList<'_>> = crls.iter().collect();
    let revocation = RevocationOptionsBuilder::new(&refs).ok().map(|builder| {
        builder
            .with_depth(webpki::RevocationCheckDepth::EndEntity)
            .build()
    });
    cert.verify_for_usage(
        provider().signature_verification_algorithms.all,
        &roots.roots,
        intermediates,
        UnixTime::now(),
        usage,
        revocation,
        None,
    )
    .map(|_| ())
    .map_err(certificate_error)
}

fn certificate_error(err: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let kind = match err {
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::CertRevoked => CertificateError::Revoked,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(kind)
}

/// Verifies a server: chain, revocation, and the identity expected.
#[derive(Debug)]
struct PeerVerifier {
    roots: Arc<RootCertStore>,
    crls: Arc<Vec<CertRevocationList<'static>>>,
    expected: Option<Identity>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_chain(
            end_entity,
            intermediates,
            &self.roots,
            &self.crls,
            webpki::KeyUsage::server_auth(),
        )?;
        let (identity, _) = Identity::of_certificate(end_entity).map_err(rustls::Error::General)?;
        match &self.expected {
            Some(expected) if &identity != expected => Err(rustls::Error::General(format!(
                "the server's certificate names {identity}, expected {expected}"
            ))),
            None if !matches!(identity, Identity::Origin(_)) => Err(rustls::Error::General(
                format!("the server's certificate names {identity}, not a node"),
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A live connection, closable when its certificate is revoked.
struct Live {
    peer: SocketAddr,
    identity: Identity,
    /// The certificates the other end presented, leaf first.
    chain: Vec<CertificateDer<'static>>,
    side: Side,
    /// A second handle on the socket: shutting it down ends the
    /// connection wherever its other handle is.
    socket: std::net::TcpStream,
}

/// Which end of a live connection this node is.
#[derive(Debug, Clone, Copy)]
enum Side {
    /// It accepted the connection: the other end is a client.
    Accepted,
    /// It dialled: the other end is a node serving.
    Dialled,
}

/// A TLS identity with its CA and revocation list, reloadable.
pub struct Tls {
    files: TlsFiles,
    expect_own: Option<Identity>,
    loaded: RwLock<Arc<Loaded>>,
    live: Mutex<HashMap<u64, Live>>,
    next_id: AtomicU64,
    /// Where the newest revocation list of each issuer is remembered
    /// across restarts ([`Tls::remember_revocations`]).
    remembered: std::sync::OnceLock<PathBuf>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl Tls {
    /// Loads the files; `expect_own` is the identity this end's
    /// certificate must name (a node's origin), if fixed.
    pub fn load(files: TlsFiles, expect_own: Option<Identity>) -> Result<Arc<Self>, TlsError> {
        let loaded = Loaded::load(&files, expect_own.as_ref())?;
        if let Some(problem) = loaded.own_problem.clone() {
            return Err(problem);
        }
        Ok(Arc::new(Self {
            files,
            expect_own,
            loaded: RwLock::new(Arc::new(loaded)),
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            remembered: std::sync::OnceLock::new(),
        }))
    }

    /// Remembers in `path` the newest revocation list of each issuer this
    /// node has used, from now on at every reload, and refuses the one
    /// loaded if it is older than the one remembered: a file copied back
    /// while the node was stopped would take revocations back.
    pub fn remember_revocations(&self, path: &Path) -> Result<(), TlsError> {
        let remembered = remembered_in(path)?;
        let current = self.current();
        let since = format!("this node used before (recorded in {})", path.display());
        self.refuse_older(&current.crl_standings, &remembered, &since)?;
        write_standings(path, &remembered, &current.crl_standings)?;
        let _ = self.remembered.set(path.to_owned());
        Ok(())
    }

    /// Refuses revocation lists of `loaded` older than one of `newer` of
    /// the same issuer; `since` says where that one is.
    fn refuse_older(
        &self,
        loaded: &[CrlStanding],
        newer: &[CrlStanding],
        since: &str,
    ) -> Result<(), TlsError> {
        let crl = self.files.crl.as_deref().unwrap_or(&self.files.ca);
        for standing in loaded {
            if let Some(newer) = newer.iter().find(|newer| standing.older_than(newer)) {
                return Err(file_error(
                    crl,
                    format!(
                        "holds revocation list {} of its CA, older than {} {since}; copy the \
                         CA's newest ca.crl here",
                        standing.describe(),
                        newer.describe(),
                    ),
                ));
            }
        }
        Ok(())
    }

    fn current(&self) -> Arc<Loaded> {
        self.loaded
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The identity this end's certificate names.
    pub fn own(&self) -> Identity {
        self.current().own.clone()
    }

    /// Re-reads the files. When they changed, new handshakes use them and
    /// live connections whose certificate they no longer accept are
    /// closed. Returns whether anything changed; on error the old files
    /// stay.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let fresh = Loaded::load(&self.files, self.expect_own.as_ref())?;
        let current = self.current();
        if fresh.stamp == current.stamp {
            return Ok(false);
        }
        // An older list would take back revocations made since (a file
        // restored from a backup, a copy from the wrong folder).
        self.refuse_older(
            &fresh.crl_standings,
            &current.crl_standings,
            "in use, which stays in use",
        )?;
        if let Some(problem) = &fresh.own_problem {
            tracing::error!(error = %problem, "this node's own certificate is no longer valid; \
                peers will refuse it (the new files apply all the same)");
        }
        if let Some(path) = self.remembered.get() {
            let written = remembered_in(path)
                .and_then(|earlier| write_standings(path, &earlier, &fresh.crl_standings));
            if let Err(err) = written {
                tracing::warn!(error = %err, "the revocation list in use could not be remembered");
            }
        }
        *self
            .loaded
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(fresh);
        self.close_refused();
        Ok(true)
    }

    /// Closes the live connections whose certificate is no longer
    /// accepted: revoked, expired (a connection outlives the certificate it
    /// was opened with otherwise), or not of the CA now loaded.
    pub fn close_refused(&self) {
        let loaded = self.current();
        let live = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for conn in live.values() {
            if let Some(reason) = loaded.refuses(conn) {
                tracing::warn!(peer = %conn.peer, identity = %conn.identity, %reason,
                    "closing a live connection: its certificate is no longer accepted");
                let _ = conn.socket.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Reloads every `period` until `stop` resolves, logging failures, and
    /// each time closes the live connections whose certificate has expired.
    pub async fn reload_every(
        self: Arc<Self>,
        period: std::time::Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        // A problem is logged when it appears, not at every tick.
        let mut logged: Option<String> = None;
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = ticker.tick() => match self.reload() {
                    Ok(reloaded) => {
                        logged = None;
                        match reloaded {
                            true => tracing::info!("TLS files reloaded"),
                            false => self.close_refused(),
                        }
                    }
                    Err(err) => {
                        let message = err.to_string();
                        if logged.as_ref() != Some(&message) {
                            tracing::warn!(error = %message,
                                "TLS files could not be reloaded; the previous ones stay in use");
                            logged = Some(message);
                        }
                        self.close_refused();
                    }
                },
            }
        }
    }

    /// Runs the server side of a handshake on an accepted connection.
    pub async fn accept(self: &Arc<Self>, tcp: TcpStream, peer: SocketAddr) -> io::Result<Conn> {
        let (tcp, socket) = second_handle(tcp)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(self.current().server.clone());
        let stream = acceptor.accept(tcp).await?;
        self.established(stream.into(), peer, socket, Side::Accepted)
    }

    /// Runs the client side of a handshake, expecting `expected` (or any
    /// node when `None`) at the other end.
    pub async fn connect(
        self: &Arc<Self>,
        tcp: TcpStream,
        expected: Option<Identity>,
    ) -> io::Result<Conn> {
        let peer = tcp.peer_addr()?;
        let (tcp, socket) = second_handle(tcp)?;
        let config = self.current().client_config(expected)?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        // The name is not used: the verifier checks the identity instead.
        let name = ServerName::IpAddress(peer.ip().into());
        let stream = connector.connect(name, tcp).await?;
        self.established(stream.into(), peer, socket, Side::Dialled)
    }

    /// A connection whose handshake succeeded: the identity the other
    /// end's certificate names, tracked for revocation.
    fn established(
        self: &Arc<Self>,
        stream: tokio_rustls::TlsStream<TcpStream>,
        peer: SocketAddr,
        socket: std::net::TcpStream,
        side: Side,
    ) -> io::Result<Conn> {
        let chain: Vec<CertificateDer<'static>> = stream
            .get_ref()
            .1
            .peer_certificates()
            .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let leaf = chain
            .first()
            .ok_or_else(|| io::Error::other("the other end presented no certificate"))?;
        let (identity, _) = Identity::of_certificate(leaf).map_err(io::Error::other)?;
        let conn = Live {
            peer,
            identity: identity.clone(),
            chain,
            side,
            socket,
        };
        let registration = self.track(conn)?;
        Ok(Conn {
            io: ConnIo::Tls(Box::new(stream)),
            info: PeerInfo {
                addr: peer,
                identity: Some(identity),
            },
            _registration: Some(registration),
        })
    }

    fn track(self: &Arc<Self>, conn: Live) -> io::Result<Registration> {
        let mut live = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A reload between the handshake and here must not be missed.
        if let Some(reason) = self.current().refuses(&conn) {
            return Err(io::Error::other(format!(
                "the certificate is no longer accepted: {reason}"
            )));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        live.insert(id, conn);
        Ok(Registration {
            tls: self.clone(),
            id,
        })
    }
}

/// The stream and a second handle on its socket, taken while it is
/// still plain TCP.
fn second_handle(tcp: TcpStream) -> io::Result<(TcpStream, std::net::TcpStream)> {
    let std = tcp.into_std()?;
    let socket = std.try_clone()?;
    Ok((TcpStream::from_std(std)?, socket))
}

/// Removes a connection from the live set when it ends.
struct Registration {
    tls: Arc<Tls>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.tls
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.id);
    }
}

enum ConnIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

/// One connection, plain (loopback, insecure mode) or TLS, with what is
/// known of its peer.
pub struct Conn {
    io: ConnIo,
    info: PeerInfo,
    _registration: Option<Registration>,
}

impl Conn {
    /// A plain connection (insecure mode).
    pub fn plain(tcp: TcpStream, addr: SocketAddr) -> Self {
        Self {
            io: ConnIo::Plain(tcp),
            info: PeerInfo {
                addr,
                identity: None,
            },
            _registration: None,
        }
    }

    /// Who is at the other end.
    pub fn info(&self) -> &PeerInfo {
        &self.info
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(io) => Pin::new(io).poll_read(cx, buf),
            ConnIo::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(io) => Pin::new(io).poll_write(cx, buf),
            ConnIo::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            ConnIo::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            ConnIo::Plain(io) => io.is_write_vectored(),
            ConnIo::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(io) => Pin::new(io).poll_flush(cx),
            ConnIo::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(io) => Pin::new(io).poll_shutdown(cx),
            ConnIo::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }
}
