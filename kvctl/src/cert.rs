//! `kvctl cert`: a CA and the certificates of a local cluster (rcgen), for mutual TLS on every
//! link. The node certificate serves both as server and as client (stores dial each other and
//! PD with it); the client certificate is for kvctl, etcdctl and applications.

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SerialNumber,
};
use std::path::{Path, PathBuf};

/// The CA's subject; `--reuse-ca` rebuilds the issuer from it and the CA's key.
const CA_CN: &str = "Atoll CA";
const OTHER_CA_CN: &str = "Another CA";
/// The common name of node certificates (use it with `--peer-cert-allowed-cn`).
pub const NODE_CN: &str = "atoll-node";

#[derive(clap::Args, Debug, Clone)]
pub struct CertArgs {
    /// Where the files go (created if missing).
    #[arg(long, default_value = "atoll-certs")]
    pub dir: PathBuf,
    /// More names for the node certificate besides 127.0.0.1, ::1 and localhost (DNS names
    /// or IP addresses, comma separated).
    #[arg(long, value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// Common name of the client certificate (with etcd auth and --client-cert-auth, the user).
    #[arg(long, default_value = "root")]
    pub client_cn: String,
    /// Days the certificates stay valid.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// Sign with the CA already in DIR (ca.pem, ca-key.pem): new node and client
    /// certificates for a rotation, trusted by the running cluster.
    #[arg(long)]
    pub reuse_ca: bool,
    /// Also write certificates from another CA (other-ca.pem, other-node*.pem,
    /// other-client*.pem): a cluster must refuse them.
    #[arg(long)]
    pub other_ca: bool,
    /// Also write an expired client certificate from the CA (expired-client*.pem).
    #[arg(long)]
    pub expired: bool,
    /// Write nothing when DIR already holds ca.pem, node.pem and client.pem (for a setup step
    /// that runs at every start, as the compose TLS profile's).
    #[arg(long, conflicts_with = "reuse_ca")]
    pub if_missing: bool,
}

fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // a positive INTEGER
    b[0] |= 0x01; // and no leading zero byte
    SerialNumber::from_slice(&b)
}

fn ca_params(cn: &str, days: u32) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(days as i64 * 2);
    p.serial_number = Some(random_serial());
    p
}

struct Ca {
    cert: Certificate,
    key: KeyPair,
}

enum Kind {
    /// Server and client (a node dials its peers with it).
    Node,
    Client,
}

fn leaf(
    ca: &Ca,
    kind: Kind,
    cn: &str,
    sans: Vec<String>,
    validity: (time::OffsetDateTime, time::OffsetDateTime),
) -> anyhow::Result<(String, String)> {
    let mut p = CertificateParams::new(sans)?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = match kind {
        Kind::Node => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Kind::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(random_serial());
    (p.not_before, p.not_after) = validity;
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &ca.cert, &ca.key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write(dir: &Path, name: &str, content: &str, secret: bool) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    // Written beside and renamed over: a server watching the file never reads half of it.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content).map_err(|e| anyhow::anyhow!("write {}: {e}", tmp.display()))?;
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::rename(&tmp, &path)
        .map_err(|e| anyhow::anyhow!("rename to {}: {e}", path.display()))?;
    Ok(path)
}

fn new_ca(cn: &str, days: u32) -> anyhow::Result<Ca> {
    let key = KeyPair::generate()?;
    let cert = ca_params(cn, days).self_signed(&key)?;
    Ok(Ca { cert, key })
}

/// The CA in `dir` as an issuer: its key, and its subject rebuilt (certificates it signs
/// verify against the ca.pem on disk: same name, same key).
fn load_ca(dir: &Path, days: u32) -> anyhow::Result<Ca> {
    let key_path = dir.join("ca-key.pem");
    let pem = std::fs::read_to_string(&key_path)
        .map_err(|e| anyhow::anyhow!("--reuse-ca: read {}: {e}", key_path.display()))?;
    let key = KeyPair::from_pem(&pem)
        .map_err(|e| anyhow::anyhow!("--reuse-ca: {}: {e}", key_path.display()))?;
    let ca_pem = std::fs::read(dir.join("ca.pem"))
        .map_err(|e| anyhow::anyhow!("--reuse-ca: read ca.pem: {e}"))?;
    let ca_der = atoll_util::tls::parse_certs("ca.pem", &ca_pem).map_err(anyhow::Error::msg)?;
    let cn = atoll_util::tls::cert_common_name(&ca_der[0]);
    anyhow::ensure!(
        cn.as_deref() == Some(CA_CN),
        "--reuse-ca: ca.pem is not a CA made by kvctl cert (its name is {cn:?})"
    );
    let cert = ca_params(CA_CN, days).self_signed(&key)?;
    Ok(Ca { cert, key })
}

/// Writes NAME.pem and NAME-key.pem: the key first, so that a server re-reading mid-way sees
/// a new key with the old certificate, refuses the pair and keeps serving the old one until
/// the certificate follows.
fn put(
    dir: &Path,
    files: &mut Vec<String>,
    name: &str,
    (cert, key): (String, String),
) -> anyhow::Result<()> {
    write(dir, &format!("{name}-key.pem"), &key, true)?;
    write(dir, &format!("{name}.pem"), &cert, false)?;
    files.push(format!("{name}.pem"));
    files.push(format!("{name}-key.pem"));
    Ok(())
}

/// Writes the files; returns what was written, as JSON.
pub fn run(a: &CertArgs) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(a.days > 0, "--days must be positive");
    std::fs::create_dir_all(&a.dir)
        .map_err(|e| anyhow::anyhow!("create {}: {e}", a.dir.display()))?;
    let dir = a.dir.as_path();
    if a.if_missing
        && [
            "ca.pem",
            "node.pem",
            "node-key.pem",
            "client.pem",
            "client-key.pem",
        ]
        .iter()
        .all(|f| dir.join(f).exists())
    {
        return Ok(serde_json::json!({
            "dir": dir.display().to_string(),
            "files": [],
            "kept": true,
        }));
    }
    let now = time::OffsetDateTime::now_utc();
    let valid = (
        now - time::Duration::days(1),
        now + time::Duration::days(a.days as i64),
    );
    let mut sans: Vec<String> = vec!["127.0.0.1".into(), "::1".into(), "localhost".into()];
    for h in &a.hosts {
        let h = h.trim();
        if !h.is_empty() && !sans.iter().any(|s| s == h) {
            sans.push(h.to_string());
        }
    }
    let ca = if a.reuse_ca {
        load_ca(dir, a.days)?
    } else {
        let ca = new_ca(CA_CN, a.days)?;
        write(dir, "ca.pem", &ca.cert.pem(), false)?;
        write(dir, "ca-key.pem", &ca.key.serialize_pem(), true)?;
        ca
    };
    let mut files = vec!["ca.pem".to_string(), "ca-key.pem".to_string()];
    let f = &mut files;
    put(
        dir,
        f,
        "node",
        leaf(&ca, Kind::Node, NODE_CN, sans.clone(), valid)?,
    )?;
    put(
        dir,
        f,
        "client",
        leaf(&ca, Kind::Client, &a.client_cn, vec![], valid)?,
    )?;
    if a.expired {
        let past = (
            now - time::Duration::days(30),
            now - time::Duration::days(1),
        );
        let pair = leaf(&ca, Kind::Client, &a.client_cn, vec![], past)?;
        put(dir, f, "expired-client", pair)?;
    }
    if a.other_ca {
        let other = new_ca(OTHER_CA_CN, a.days)?;
        write(dir, "other-ca.pem", &other.cert.pem(), false)?;
        f.push("other-ca.pem".into());
        let pair = leaf(&other, Kind::Node, NODE_CN, sans.clone(), valid)?;
        put(dir, f, "other-node", pair)?;
        let pair = leaf(&other, Kind::Client, &a.client_cn, vec![], valid)?;
        put(dir, f, "other-client", pair)?;
    }
    Ok(serde_json::json!({
        "dir": dir.display().to_string(),
        "files": files,
        "node_cn": NODE_CN,
        "client_cn": a.client_cn,
        "hosts": sans,
    }))
}

/// Mutual TLS on every link with the files of [`run`] in `dir` (what the flags
/// `--cert-file node.pem --key-file node-key.pem --trusted-ca-file ca.pem --client-cert-auth
/// --peer-cert-allowed-cn atoll-node` set).
pub fn security_config(dir: &Path) -> atoll_util::tls::SecurityConfig {
    let f = |n: &str| dir.join(n).display().to_string();
    atoll_util::tls::SecurityConfig {
        cert_file: f("node.pem"),
        key_file: f("node-key.pem"),
        trusted_ca_file: f("ca.pem"),
        client_cert_auth: true,
        peer_cert_allowed_cn: vec![NODE_CN.into()],
        ..Default::default()
    }
}
