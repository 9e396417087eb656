//! `civex ca`: the federation's certificate authority, kept in one
//! directory: `ca.pem` (give it to every member), `ca.key` (mode 0600,
//! keep it offline), `ca.crl` (the revocation list nodes load),
//! `issued.tsv` and `revoked.tsv` (what was issued and revoked).

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{anyhow, bail, Context};
use civex_node::{
    keys::{read_secret_file, replace_file, write_secret_file},
    pki::{write_identity_dir, Authority, Identity},
};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::output::{self, Format};

/// The CA subcommands.
#[derive(Subcommand)]
pub(crate) enum CaCommand {
    /// Create a federation CA in a new directory.
    Init {
        /// Directory to create.
        dir: PathBuf,
        /// Name of the federation, e.g. "Consórcio Intermunicipal X".
        #[arg(long)]
        name: String,
        /// Validity of the CA certificate, in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a certificate for a node (--origin) or an operator
    /// (--operator), for a request from `civex init` (--csr) or with a
    /// new key made here.
    Issue {
        #[command(flatten)]
        ca: CaDir,
        #[command(flatten)]
        who: Who,
        /// A certificate request (tls/request.csr of a node made by `civex
        /// init`); without it a key is made here and written with the
        /// certificate.
        #[arg(long)]
        csr: Option<PathBuf>,
        /// Directory to write ca.pem, cert.pem (and key.pem) into: an
        /// operator's --identity, or a node's tls/ directory.
        #[arg(long)]
        out: PathBuf,
        /// Validity, in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Issue although the identity holds a valid certificate already:
        /// a new certificate for the same node or person (a renewal, a
        /// new key). Without it that is refused, since one identity names
        /// one holder on every node that lists it.
        #[arg(long)]
        renew: bool,
    },
    /// Revoke certificates: by serial, or every one issued to an identity.
    /// Writes a new ca.crl: copy it to the members' tls.crl_file.
    Revoke {
        #[command(flatten)]
        ca: CaDir,
        /// Serial number (hex) of one certificate.
        #[arg(long, conflicts_with_all = ["origin", "operator"])]
        serial: Option<String>,
        #[command(flatten)]
        who: OptionalWho,
    },
    /// Certificates issued, and whether they are revoked.
    List {
        #[command(flatten)]
        ca: CaDir,
    },
}

/// Where the CA lives.
#[derive(Args)]
pub(crate) struct CaDir {
    /// The CA directory (made by `civex ca init`).
    #[arg(long = "ca", env = "CIVEX_CA_DIR")]
    dir: PathBuf,
}

/// Whom a certificate is for.
#[derive(Args)]
#[group(required = true, multiple = false)]
pub(crate) struct Who {
    /// A node: the origin id its certificate names.
    #[arg(long)]
    origin: Option<String>,
    /// An operator: a name, [a-z0-9][a-z0-9-]{0,63}.
    #[arg(long)]
    operator: Option<String>,
}

/// Whom certificates were issued to, if named.
#[derive(Args)]
#[group(required = false, multiple = false)]
pub(crate) struct OptionalWho {
    /// Every certificate issued to this origin.
    #[arg(long)]
    origin: Option<String>,
    /// Every certificate issued to this operator.
    #[arg(long)]
    operator: Option<String>,
}

fn identity(origin: Option<String>, operator: Option<String>) -> anyhow::Result<Identity> {
    let uri = match (origin, operator) {
        (Some(origin), None) => format!("civex:origin:{origin}"),
        (None, Some(operator)) => format!("civex:operator:{operator}"),
        _ => bail!("name one of --origin or --operator"),
    };
    Identity::parse_uri(&uri).map_err(|m| anyhow!("{m}"))
}

/// One issued certificate, a line of issued.tsv.
struct Record {
    serial: String,
    identity: String,
    not_after: String,
}

fn read_table(path: &Path) -> anyhow::Result<Vec<Vec<String>>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text
            .lines()
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| line.split('\t').map(str::to_owned).collect())
            .collect()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(err) => Err(anyhow!("{}: cannot read: {err}", path.display())),
    }
}

fn append_line(path: &Path, line: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("{}: cannot open", path.display()))?;
    writeln!(file, "{line}")
        .and_then(|()| file.sync_all())
        .with_context(|| format!("{}: cannot write", path.display()))
}

/// Refuses to issue for `identity` while it holds a certificate that is
/// neither revoked nor expired: whoever holds one acts as it on every node
/// that lists it, so a second person given the same name (two cities'
/// operators called maria) would administer the first one's node.
fn refuse_a_second_holder(dir: &Path, identity: &Identity) -> anyhow::Result<()> {
    let uri = identity.uri();
    let revoked = revoked(dir)?;
    let today = civex_node::pki::today();
    let held = issued(dir)?.into_iter().find(|r| {
        r.identity == uri && !revoked.contains(&r.serial) && r.not_after.as_str() >= today.as_str()
    });
    if let Some(held) = held {
        bail!(
            "{uri} holds a valid certificate already (serial {}, valid until {}): whoever holds \
             one acts as {uri} on every node that lists it. For another node or person, choose \
             another name (an operator of one city, say: maria-sao-carlos); for the same one (a \
             renewal, a new key), pass --renew, and revoke the old certificate once it is \
             replaced (civex ca revoke --serial {})",
            held.serial,
            held.not_after,
            held.serial
        );
    }
    Ok(())
}

fn issued(dir: &Path) -> anyhow::Result<Vec<Record>> {
    let path = dir.join("issued.tsv");
    read_table(&path)?
        .into_iter()
        .enumerate()
        .map(|(i, fields)| match fields.as_slice() {
            [serial, identity, not_after] => Ok(Record {
                serial: serial.clone(),
                identity: identity.clone(),
                not_after: not_after.clone(),
            }),
            _ => bail!(
                "{}: record {} does not have 3 tab-separated fields",
                path.display(),
                i + 1
            ),
        })
        .collect()
}

fn revoked(dir: &Path) -> anyhow::Result<Vec<String>> {
    Ok(read_table(&dir.join("revoked.tsv"))?
        .into_iter()
        .filter_map(|fields| fields.into_iter().next())
        .collect())
}

fn load(dir: &Path) -> anyhow::Result<Authority> {
    let cert = dir.join("ca.pem");
    let cert = std::fs::read_to_string(&cert)
        .with_context(|| format!("{}: cannot read (is --ca a CA directory?)", cert.display()))?;
    let key = read_secret_file(&dir.join("ca.key"))?;
    Authority::load(&cert, &key).map_err(|err| anyhow!("{}: {err}", dir.display()))
}

/// Writes the revocation list for every serial in revoked.tsv.
fn write_crl(dir: &Path, authority: &Authority) -> anyhow::Result<PathBuf> {
    let serials = revoked(dir)?;
    let path = dir.join("ca.crl");
    // Nodes refuse a list numbered below one they used: each list is
    // numbered above the last, whatever was done to revoked.tsv.
    let last = std::fs::read(&path)
        .ok()
        .and_then(|pem| civex_node::tls::highest_crl_number(&pem))
        .unwrap_or(0);
    let number = (serials.len() as u64 + 1).max(last + 1);
    let crl = authority.revocation_list(&serials, number, 3650)?;
    replace_file(&path, crl.as_bytes())
        .with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(path)
}

pub(crate) fn run(command: CaCommand, format: Format) -> anyhow::Result<ExitCode> {
    match command {
        CaCommand::Init { dir, name, days } => {
            if dir.join("ca.key").exists() {
                bail!("{}: already holds a CA; not overwriting it", dir.display());
            }
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("{}: cannot create", dir.display()))?;
            let (authority, key) = Authority::create(&name, days)?;
            write_secret_file(&dir.join("ca.key"), key.as_bytes())?;
            std::fs::write(dir.join("ca.pem"), authority.cert_pem())
                .with_context(|| format!("{}: cannot write ca.pem", dir.display()))?;
            append_line(&dir.join("issued.tsv"), "# serial\tidentity\tnot after")?;
            let crl = write_crl(&dir, &authority)?;
            match format {
                Format::Json => output::json(&json!({
                    "ca": dir.join("ca.pem"), "key": dir.join("ca.key"), "crl": crl,
                })),
                Format::Table => {
                    println!("created the federation CA in {}", dir.display());
                    println!("  ca.pem  give it to every member (tls/ca.pem)");
                    println!("  ca.key  mode 0600: keep it offline and backed up");
                    println!("  ca.crl  the revocation list members load (tls.crl_file)");
                }
            }
        }
        CaCommand::Issue {
            ca,
            who,
            csr,
            out,
            days,
            renew,
        } => {
            let identity = identity(who.origin, who.operator)?;
            let authority = load(&ca.dir)?;
            if !renew {
                refuse_a_second_holder(&ca.dir, &identity)?;
            }
            let request = match &csr {
                Some(path) => Some(
                    std::fs::read_to_string(path)
                        .with_context(|| format!("--csr {}: cannot read", path.display()))?,
                ),
                None => None,
            };
            let issued = authority
                .issue(&identity, request.as_deref(), days)
                .map_err(|err| match &csr {
                    Some(path) => anyhow!("--csr {}: {err}", path.display()),
                    None => anyhow!("{err}"),
                })?;
            // Recorded before it is handed out, so it can always be revoked.
            append_line(
                &ca.dir.join("issued.tsv"),
                &format!(
                    "{}\t{}\t{}",
                    issued.serial,
                    identity.uri(),
                    issued.not_after
                ),
            )?;
            write_identity_dir(&out, authority.cert_pem(), &issued)?;
            match format {
                Format::Json => output::json(&json!({
                    "identity": identity.uri(), "serial": issued.serial,
                    "not_after": issued.not_after, "out": out,
                })),
                Format::Table => {
                    println!(
                        "issued {} (serial {}, valid until {})",
                        identity.uri(),
                        issued.serial,
                        issued.not_after
                    );
                    println!(
                        "wrote {}: ca.pem, cert.pem{}",
                        out.display(),
                        if issued.key_pem.is_some() {
                            ", key.pem (mode 0600)"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
        CaCommand::Revoke { ca, serial, who } => {
            let authority = load(&ca.dir)?;
            let records = issued(&ca.dir)?;
            let serials: Vec<String> = match (serial, who.origin, who.operator) {
                (Some(serial), None, None) => {
                    let serial = serial.to_ascii_lowercase();
                    if !records.iter().any(|r| r.serial == serial) {
                        bail!("--serial {serial}: this CA issued no such certificate (see `civex ca list`)");
                    }
                    vec![serial]
                }
                (None, origin, operator) if origin.is_some() || operator.is_some() => {
                    let uri = identity(origin, operator)?.uri();
                    let found: Vec<String> = records
                        .iter()
                        .filter(|r| r.identity == uri)
                        .map(|r| r.serial.clone())
                        .collect();
                    if found.is_empty() {
                        bail!("{uri}: this CA issued it no certificate (see `civex ca list`)");
                    }
                    found
                }
                _ => bail!("name what to revoke: --serial, --origin or --operator"),
            };
            let already = revoked(&ca.dir)?;
            let new: Vec<&String> = serials.iter().filter(|s| !already.contains(s)).collect();
            for serial in &new {
                append_line(&ca.dir.join("revoked.tsv"), serial)?;
            }
            let crl = write_crl(&ca.dir, &authority)?;
            match format {
                Format::Json => output::json(&json!({ "revoked": new, "crl": crl })),
                Format::Table => {
                    println!("revoked {} certificate(s)", new.len());
                    println!(
                        "copy {} to every member's tls.crl_file; nodes apply it within their tls.reload_ms",
                        crl.display()
                    );
                }
            }
        }
        CaCommand::List { ca } => {
            let records = issued(&ca.dir)?;
            let revoked = revoked(&ca.dir)?;
            let rows: Vec<Vec<String>> = records
                .iter()
                .map(|r| {
                    let state = if revoked.contains(&r.serial) {
                        "revoked"
                    } else {
                        "valid"
                    };
                    vec![
                        r.serial.clone(),
                        r.identity.clone(),
                        r.not_after.clone(),
                        state.into(),
                    ]
                })
                .collect();
            match format {
                Format::Json => output::json(&json!(rows
                    .iter()
                    .map(|r| json!({
                        "serial": r[0], "identity": r[1], "not_after": r[2], "state": r[3],
                    }))
                    .collect::<Vec<_>>())),
                Format::Table => {
                    output::table(&["serial", "identity", "not after", "state"], &rows)
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
