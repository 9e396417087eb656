//! The federation's certificates: identities, the CA, certificate requests,
//! issued certificates and revocation lists.
//!
//! A certificate carries exactly one URI name, `civex:origin:<id>` for a
//! node or `civex:operator:<name>` for a person or script administering
//! one; that name alone decides the role. TLS keys are ECDSA P-256, made
//! here and never the feed key.

use std::{fmt, time::SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams,
    CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

use crate::core::ids::{check_origin_id, check_slug, hex};

/// What a certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    /// A node publishing the feed of this origin id.
    Origin(String),
    /// An operator: publishes and administers a node.
    Operator(String),
}

const ORIGIN_PREFIX: &str = "civex:origin:";
const OPERATOR_PREFIX: &str = "civex:operator:";

impl Identity {
    /// The certificate's URI name.
    pub fn uri(&self) -> String {
        match self {
            Self::Origin(id) => format!("{ORIGIN_PREFIX}{id}"),
            Self::Operator(name) => format!("{OPERATOR_PREFIX}{name}"),
        }
    }

    /// Parses a URI name, checking the id or name.
    pub fn parse_uri(uri: &str) -> Result<Self, String> {
        if let Some(id) = uri.strip_prefix(ORIGIN_PREFIX) {
            check_origin_id(id)?;
            Ok(Self::Origin(id.to_owned()))
        } else if let Some(name) = uri.strip_prefix(OPERATOR_PREFIX) {
            check_slug(name).map_err(|m| format!("operator name {m}"))?;
            Ok(Self::Operator(name.to_owned()))
        } else {
            Err(format!(
                "{uri:?} is not a civex identity ({ORIGIN_PREFIX}<id> or {OPERATOR_PREFIX}<name>)"
            ))
        }
    }

    /// The identity (its one civex URI name) and the serial number of a
    /// certificate. The certificate's chain is not checked here.
    pub fn of_certificate(der: &CertificateDer<'_>) -> Result<(Self, Vec<u8>), String> {
        let cert = webpki::EndEntityCert::try_from(der)
            .map_err(|err| format!("certificate does not parse: {err}"))?;
        let uris: Vec<&str> = cert.valid_uri_names().collect();
        let identity = match uris.as_slice() {
            [uri] => Self::parse_uri(uri)?,
            [] => return Err("certificate has no civex URI name".into()),
            _ => return Err(format!("certificate has {} URI names, not one", uris.len())),
        };
        Ok((identity, cert.serial().to_vec()))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Origin(id) => write!(f, "origin {id}"),
            Self::Operator(name) => write!(f, "operator {name}"),
        }
    }
}

/// A certificate operation failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PkiError(pub String);

fn pki_error(what: &str) -> impl Fn(rcgen::Error) -> PkiError + '_ {
    move |err| PkiError(format!("{what}: {err}"))
}

/// A certificate and, when made here, its private key (PEM).
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// The private key, when it was made together with the certificate.
    pub key_pem: Option<String>,
    /// Serial number, hex.
    pub serial: String,
    /// Last day of validity, as `YYYY-MM-DD`.
    pub not_after: String,
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).map_err(|err| PkiError(format!("no randomness: {err}")))?;
    // Positive and 16 bytes long once DER-encoded.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// From an hour ago (clocks slightly behind are tolerated) to `days` from now.
fn validity(days: u32) -> Result<(SystemTime, SystemTime), PkiError> {
    if days == 0 {
        return Err(PkiError("validity must be at least 1 day".into()));
    }
    let now = SystemTime::now();
    Ok((
        now - std::time::Duration::from_secs(3600),
        now + std::time::Duration::from_secs(u64::from(days) * 86_400),
    ))
}

/// Today (UTC) as `YYYY-MM-DD`, the form of [`Issued::not_after`].
pub fn today() -> String {
    day(OffsetDateTime::now_utc())
}

fn day(at: OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02}",
        at.year(),
        u8::from(at.month()),
        at.day()
    )
}

/// The federation's certificate authority: its certificate and key.
pub struct Authority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    /// Makes a new CA named `name`, valid for `days`.
    pub fn create(name: &str, days: u32) -> Result<(Self, String), PkiError> {
        let key = KeyPair::generate().map_err(pki_error("cannot make the CA key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "civex federation");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.key_identifier_method = KeyIdMethod::Sha256;
        params.serial_number = Some(random_serial()?);
        let (from, until) = validity(days)?;
        params.not_before = from.into();
        params.not_after = until.into();
        let cert = params
            .self_signed(&key)
            .map_err(pki_error("cannot sign the CA certificate"))?;
        let key_pem = key.serialize_pem();
        Ok((
            Self {
                cert_pem: cert.pem(),
                issuer: Issuer::new(params, key),
            },
            key_pem,
        ))
    }

    /// Loads a CA from its certificate and key (PEM).
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(pki_error("the CA key does not parse"))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(pki_error("the CA certificate does not parse"))?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            issuer,
        })
    }

    /// The CA certificate (PEM), which every member trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for `identity`, valid for `days`: for the key
    /// of a certificate request (PEM), or for a new key returned with it.
    /// A request naming another identity is refused.
    pub fn issue(
        &self,
        identity: &Identity,
        request_pem: Option<&str>,
        days: u32,
    ) -> Result<Issued, PkiError> {
        let (from, until) = validity(days)?;
        self.issue_between(identity, request_pem, from, until)
    }

    /// [`Authority::issue`] with an explicit validity period.
    pub fn issue_between(
        &self,
        identity: &Identity,
        request_pem: Option<&str>,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Issued, PkiError> {
        if not_after <= not_before {
            return Err(PkiError("validity ends before it starts".into()));
        }
        let mut params = identity_params(identity)?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match identity {
            // Nodes both serve and dial their peers.
            Identity::Origin(_) => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Identity::Operator(_) => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::Sha256;
        let serial = random_serial()?;
        params.serial_number = Some(serial.clone());
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let not_after = day(params.not_after);
        let (cert, key_pem) = match request_pem {
            Some(pem) => {
                let request = CertificateSigningRequestParams::from_pem(pem).map_err(pki_error(
                    "the certificate request does not parse or verify",
                ))?;
                let asked: Vec<String> = request
                    .params
                    .subject_alt_names
                    .iter()
                    .filter_map(|name| match name {
                        SanType::URI(uri) => Some(uri.as_str().to_owned()),
                        _ => None,
                    })
                    .collect();
                if !asked.is_empty() && asked != [identity.uri()] {
                    return Err(PkiError(format!(
                        "the request asks for {}, not {}",
                        asked.join(", "),
                        identity.uri()
                    )));
                }
                let cert = params
                    .signed_by(&request.public_key, &self.issuer)
                    .map_err(pki_error("cannot sign the certificate"))?;
                (cert, None)
            }
            None => {
                let key = KeyPair::generate().map_err(pki_error("cannot make a key"))?;
                let cert = params
                    .signed_by(&key, &self.issuer)
                    .map_err(pki_error("cannot sign the certificate"))?;
                (cert, Some(key.serialize_pem()))
            }
        };
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem,
            serial: hex(&serial.to_bytes()),
            not_after,
        })
    }

    /// A revocation list naming `revoked` serials (hex), numbered `number`
    /// (each new list gets a higher number), valid for `days`.
    pub fn revocation_list(
        &self,
        revoked: &[String],
        number: u64,
        days: u32,
    ) -> Result<String, PkiError> {
        let now = OffsetDateTime::now_utc();
        let revoked_certs = revoked
            .iter()
            .map(|serial| {
                let bytes = crate::core::ids::unhex(serial)
                    .map_err(|_| PkiError(format!("serial {serial:?} is not hex")))?;
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&bytes),
                    revocation_time: now,
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, PkiError>>()?;
        let params = CertificateRevocationListParams {
            this_update: now - Duration::hours(1),
            next_update: now + Duration::days(i64::from(days.max(1))),
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.issuer)
            .and_then(|crl| crl.pem())
            .map_err(pki_error("cannot sign the revocation list"))
    }
}

/// Writes an identity directory: `ca.pem`, `cert.pem` and `key.pem`
/// (mode 0600), the layout [`crate::tls::TlsFiles::in_dir`] reads and a
/// node's `tls/` directory uses. An existing key is never overwritten.
pub fn write_identity_dir(
    dir: &std::path::Path,
    ca_pem: &str,
    issued: &Issued,
) -> Result<(), PkiError> {
    let io = |what: &str, err: &dyn fmt::Display| PkiError(format!("{what}: {err}"));
    std::fs::create_dir_all(dir).map_err(|e| io(&dir.display().to_string(), &e))?;
    if let Some(key) = &issued.key_pem {
        let path = dir.join("key.pem");
        crate::keys::write_secret_file(&path, key.as_bytes())
            .map_err(|e| io(&path.display().to_string(), &e))?;
    }
    for (name, text) in [("ca.pem", ca_pem), ("cert.pem", &issued.cert_pem)] {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| io(&path.display().to_string(), &e))?;
    }
    Ok(())
}

/// Certificate parameters naming `identity`: its URI as the one subject
/// alternative name, and as the common name.
fn identity_params(identity: &Identity) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity.uri());
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(
        identity
            .uri()
            .try_into()
            .map_err(pki_error("identity is not ASCII"))?,
    )];
    Ok(params)
}

/// A new key and a certificate request for `identity` (both PEM): what a
/// joining node or operator sends to the federation admin.
pub fn request(identity: &Identity) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(pki_error("cannot make a key"))?;
    let request = identity_params(identity)?
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(pki_error("cannot make the certificate request"))?;
    Ok((request, key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn identities_round_trip_and_bad_ones_are_refused() {
        for identity in [
            Identity::Origin("br-ibge-3550308".into()),
            Identity::Operator("alice".into()),
        ] {
            assert_eq!(Identity::parse_uri(&identity.uri()).unwrap(), identity);
        }
        for bad in [
            "civex:origin:",
            "civex:origin:Upper",
            "civex:admin:x",
            "https://x",
        ] {
            assert!(Identity::parse_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn issued_certificates_name_their_identity_and_requests_are_honoured() {
        let (ca, _key) = Authority::create("Test federation", 30).unwrap();
        let node = Identity::Origin("city-a".into());
        let issued = ca.issue(&node, None, 10).unwrap();
        assert!(issued.key_pem.is_some());
        let (identity, serial) = Identity::of_certificate(&der(&issued.cert_pem)).unwrap();
        assert_eq!(
            (identity, hex(&serial)),
            (node.clone(), issued.serial.clone())
        );

        let (request, _key) = request(&node).unwrap();
        let from_request = ca.issue(&node, Some(&request), 10).unwrap();
        assert!(from_request.key_pem.is_none());
        assert_eq!(
            Identity::of_certificate(&der(&from_request.cert_pem))
                .unwrap()
                .0,
            node
        );
        let other = ca
            .issue(&Identity::Origin("city-b".into()), Some(&request), 10)
            .unwrap_err();
        assert!(other.to_string().contains("asks for civex:origin:city-a"));

        // A reloaded CA issues certificates the same way.
        let (ca, key) = Authority::create("Reloaded", 30).unwrap();
        let again = Authority::load(ca.cert_pem(), &key).unwrap();
        let op = again
            .issue(&Identity::Operator("ops".into()), None, 1)
            .unwrap();
        assert_eq!(
            Identity::of_certificate(&der(&op.cert_pem)).unwrap().0,
            Identity::Operator("ops".into())
        );
        let crl = again.revocation_list(&[op.serial], 1, 7).unwrap();
        assert!(crl.contains("BEGIN X509 CRL"));
    }
}
