//! TLS and mutual TLS for every port and every client (rustls with ring; no OpenSSL).
//!
//! | piece | what it does |
//! | --- | --- |
//! | [`SecurityConfig`] / [`SecurityFlags`] | etcd's flag names (`--cert-file`, `--peer-*`, ...) and their config-file twins |
//! | [`ServerTls`] | a port's `rustls::ServerConfig`, rebuilt when its files change |
//! | [`ClientTls`] | a client's `rustls::ClientConfig`, rebuilt when its files change |
//! | [`incoming`] / [`TlsListener`] | accept TCP, handshake each connection in its own task, hand the TLS streams to tonic or axum |
//! | [`endpoint`], [`connect`], [`connect_lazy`] | the one way every gRPC channel is made: `http://` in plaintext, `https://` over TLS |
//! | [`members_only`] | refuse a request whose connection did not prove a cluster member's certificate |
//!
//! **Rotation**: every file is re-read at most once a second, when a new connection is
//! accepted or dialed; when the bytes changed the config is rebuilt. New connections use the
//! new certificates, open ones keep theirs, nothing restarts. New files that do not load (a key
//! that does not match its certificate, half-written PEM) are logged and the previous config
//! stays in use until the files are fixed.
//!
//! **Members**: stores talk to each other (raft, snapshots) on the port clients use, and to PD on
//! PD's client port. A connection whose client certificate verifies against the peer CA (and
//! whose common name is in `--peer-cert-allowed-cn`, when that list is given) is a *cluster
//! member* ([`PeerIdentity::cluster_member`]); the raft service and PD's store-only RPCs refuse
//! any other when TLS is on.

use crate::identity::PeerIdentity;
use parking_lot::{Mutex, RwLock};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tonic::transport::{Channel, Endpoint};

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress on one port at most; connections past it are closed at once.
const MAX_HANDSHAKES: usize = 1024;
/// Files are looked at no more often than this.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// The TLS settings of a server process, etcd's names. Client-facing: a store's port (Atoll's
/// API, etcd's API, the JSON gateway) and PD's client port. Internal (`peer-*`): store to store,
/// store to PD, PD to PD. Every `peer-*` file left empty falls back to its client-facing twin,
/// so one set of files turns on TLS everywhere.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct SecurityConfig {
    /// The certificate (PEM, leaf first) this server presents to clients.
    pub cert_file: String,
    pub key_file: String,
    /// CA certificates (PEM) that client certificates must chain to.
    pub trusted_ca_file: String,
    /// Refuse clients without a certificate from `trusted-ca-file` (or the peer CA).
    pub client_cert_auth: bool,
    /// The certificate this process presents on internal links (as client and, on PD's peer
    /// port, as server).
    pub peer_cert_file: String,
    pub peer_key_file: String,
    /// CA certificates that cluster members' certificates chain to.
    pub peer_trusted_ca_file: String,
    /// When not empty: only members whose certificate's common name is listed are members
    /// (TiKV's `cert-allowed-cn`).
    pub peer_cert_allowed_cn: Vec<String>,
}

/// The TLS flags shared by `pd-server` and `storage-node` (`--cert-file`, ...). Each can also
/// be given as an environment variable, as etcd's `ETCD_CERT_FILE`: `ATOLL_CERT_FILE`, ...
/// (a flag wins over its variable).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SecurityFlags {
    /// Certificate (PEM) served on the client port; turns TLS on.
    #[arg(long, env = "ATOLL_CERT_FILE")]
    pub cert_file: Option<String>,
    /// Private key (PEM) of --cert-file.
    #[arg(long, env = "ATOLL_KEY_FILE")]
    pub key_file: Option<String>,
    /// CA certificates (PEM) that client certificates must chain to.
    #[arg(long, env = "ATOLL_TRUSTED_CA_FILE")]
    pub trusted_ca_file: Option<String>,
    /// Refuse clients without a valid certificate (needs --trusted-ca-file).
    #[arg(long, env = "ATOLL_CLIENT_CERT_AUTH")]
    pub client_cert_auth: bool,
    /// Certificate (PEM) for internal links (store to store, store to PD, PD to PD); defaults
    /// to --cert-file.
    #[arg(long, env = "ATOLL_PEER_CERT_FILE")]
    pub peer_cert_file: Option<String>,
    /// Private key (PEM) of --peer-cert-file; defaults to --key-file.
    #[arg(long, env = "ATOLL_PEER_KEY_FILE")]
    pub peer_key_file: Option<String>,
    /// CA certificates (PEM) of the cluster members; defaults to --trusted-ca-file.
    #[arg(long, env = "ATOLL_PEER_TRUSTED_CA_FILE")]
    pub peer_trusted_ca_file: Option<String>,
    /// Common names that cluster members' certificates may carry (comma separated; empty: any).
    #[arg(long, env = "ATOLL_PEER_CERT_ALLOWED_CN", value_delimiter = ',')]
    pub peer_cert_allowed_cn: Vec<String>,
}

impl SecurityFlags {
    /// Flags win over the config file.
    pub fn apply(self, c: &mut SecurityConfig) {
        let set = |dst: &mut String, v: Option<String>| {
            if let Some(v) = v {
                *dst = v;
            }
        };
        set(&mut c.cert_file, self.cert_file);
        set(&mut c.key_file, self.key_file);
        set(&mut c.trusted_ca_file, self.trusted_ca_file);
        set(&mut c.peer_cert_file, self.peer_cert_file);
        set(&mut c.peer_key_file, self.peer_key_file);
        set(&mut c.peer_trusted_ca_file, self.peer_trusted_ca_file);
        if self.client_cert_auth {
            c.client_cert_auth = true;
        }
        if !self.peer_cert_allowed_cn.is_empty() {
            c.peer_cert_allowed_cn = self.peer_cert_allowed_cn;
        }
    }
}

fn or<'a>(a: &'a str, b: &'a str) -> &'a str {
    if a.is_empty() {
        b
    } else {
        a
    }
}

impl SecurityConfig {
    /// Whether this process speaks TLS (on every port and every link).
    pub fn enabled(&self) -> bool {
        !self.cert_file.is_empty() || !self.peer_cert_file.is_empty()
    }

    fn server_cert(&self) -> (&str, &str) {
        if self.cert_file.is_empty() {
            (&self.peer_cert_file, &self.peer_key_file)
        } else {
            (&self.cert_file, &self.key_file)
        }
    }

    fn peer_cert(&self) -> (&str, &str) {
        if self.peer_cert_file.is_empty() {
            (&self.cert_file, &self.key_file)
        } else {
            (&self.peer_cert_file, &self.peer_key_file)
        }
    }

    fn peer_ca(&self) -> &str {
        or(&self.peer_trusted_ca_file, &self.trusted_ca_file)
    }

    /// Every CA file named, each once.
    fn all_cas(&self) -> Vec<String> {
        let mut v = vec![];
        for f in [&self.trusted_ca_file, &self.peer_trusted_ca_file] {
            if !f.is_empty() && !v.contains(f) {
                v.push(f.clone());
            }
        }
        v
    }

    /// Flags that do not go together, with the flag names in the message.
    pub fn validate(&self) -> Result<(), String> {
        if self.cert_file.is_empty() != self.key_file.is_empty() {
            return Err("--cert-file and --key-file go together".into());
        }
        if self.peer_cert_file.is_empty() != self.peer_key_file.is_empty() {
            return Err("--peer-cert-file and --peer-key-file go together".into());
        }
        if self.client_cert_auth && self.trusted_ca_file.is_empty() {
            return Err("--client-cert-auth needs --trusted-ca-file".into());
        }
        let any = !self.trusted_ca_file.is_empty()
            || !self.peer_trusted_ca_file.is_empty()
            || self.client_cert_auth
            || !self.peer_cert_allowed_cn.is_empty();
        if any && !self.enabled() {
            return Err(
                "TLS flags need a certificate: --cert-file and --key-file (or --peer-cert-file and --peer-key-file)"
                    .into(),
            );
        }
        if self.enabled() && self.peer_ca().is_empty() {
            return Err("TLS needs a CA to verify cluster members: --peer-trusted-ca-file or --trusted-ca-file".into());
        }
        Ok(())
    }

    /// A port served with `(cert, key)`, or nothing when TLS is off; `tune` sets the rest.
    fn port(
        &self,
        (cert, key): (&str, &str),
        tune: impl FnOnce(&mut ServerSpec),
    ) -> Result<Option<ServerTls>, String> {
        if !self.enabled() {
            return Ok(None);
        }
        let mut spec = ServerSpec {
            cert_file: cert.into(),
            key_file: key.into(),
            client_ca_files: self.all_cas(),
            require_client_cert: self.client_cert_auth,
            member_ca_file: self.peer_ca().into(),
            allowed_cn: self.peer_cert_allowed_cn.clone(),
            members_only: false,
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        };
        tune(&mut spec);
        ServerTls::new(spec).map(Some)
    }

    /// The client-facing port: a store's (where members also connect) or PD's client port.
    pub fn client_port(&self) -> Result<Option<ServerTls>, String> {
        self.port(self.server_cert(), |_| {})
    }

    /// PD's peer port: members only.
    pub fn peer_port(&self) -> Result<Option<ServerTls>, String> {
        self.port(self.peer_cert(), |s| {
            s.client_ca_files = vec![s.member_ca_file.clone()];
            s.require_client_cert = true;
            s.members_only = true;
            s.alpn = vec![b"h2".to_vec()];
        })
    }

    /// The status port (`/metrics`, `/status`, `/fail`): HTTPS (HTTP/1.1), client certificates
    /// required with `--client-cert-auth`.
    pub fn status_port(&self) -> Result<Option<ServerTls>, String> {
        let auth = self.client_cert_auth;
        self.port(self.server_cert(), |s| {
            if !auth {
                s.client_ca_files.clear();
            }
            s.member_ca_file.clear();
            s.allowed_cn.clear();
            // No ALPN: HTTP/1.1 whatever the client offers (gRPC clients offer only h2).
            s.alpn.clear();
        })
    }

    /// What this process dials other members with: its peer certificate, and the CAs that
    /// their servers' certificates chain to (a store's port serves `--cert-file`, so the
    /// client-facing CA is trusted too).
    pub fn peer_client(&self) -> Result<Option<ClientTls>, String> {
        if !self.enabled() {
            return Ok(None);
        }
        let (cert, key) = self.peer_cert();
        ClientTls::new(self.all_cas(), Some((cert.into(), key.into()))).map(Some)
    }

    /// Whether requests on internal services must come from cluster members.
    pub fn members_only(&self) -> bool {
        self.enabled()
    }
}

fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Certificates of a PEM file's bytes (leaf first).
pub fn parse_certs(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what}: bad PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what}: no certificate in it"));
    }
    Ok(certs)
}

fn parse_key(what: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("{what}: no usable private key: {e}"))
}

fn roots(files: &[(String, Vec<u8>)]) -> Result<RootCertStore, String> {
    let mut r = RootCertStore::empty();
    for (name, pem) in files {
        for c in parse_certs(name, pem)? {
            r.add(c)
                .map_err(|e| format!("{name}: not a CA certificate: {e}"))?;
        }
    }
    Ok(r)
}

/// A certified key whose private key matches its certificate (checked, so that a key and a
/// certificate caught half-way through a rotation are refused instead of served).
fn certified_key(
    cert_name: &str,
    cert_pem: &[u8],
    key_name: &str,
    key_pem: &[u8],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let certs = parse_certs(cert_name, cert_pem)?;
    let key = parse_key(key_name, key_pem)?;
    // Parses the key and compares its public key with the certificate's.
    rustls::sign::CertifiedKey::from_der(certs.clone(), key.clone_key(), &provider())
        .map_err(|e| format!("{key_name} does not go with {cert_name}: {e}"))?;
    Ok((certs, key))
}

/// A value built from some files, rebuilt when their bytes change (looked at no more often
/// than once a second, when [`Reloading::get`] is called). A rebuild that fails is logged and
/// the previous value stays.
pub struct Reloading<T> {
    what: String,
    files: Vec<String>,
    #[allow(clippy::type_complexity)]
    build: Box<dyn Fn(&[(String, Vec<u8>)]) -> Result<T, String> + Send + Sync>,
    current: RwLock<Arc<T>>,
    /// The bytes last looked at (built or refused).
    seen: Mutex<Vec<Vec<u8>>>,
    base: Instant,
    last_check_ms: AtomicU64,
}

fn read_all(files: &[String]) -> Result<Vec<(String, Vec<u8>)>, String> {
    files
        .iter()
        .map(|f| {
            std::fs::read(f)
                .map(|b| (f.clone(), b))
                .map_err(|e| format!("read {f}: {e}"))
        })
        .collect()
}

impl<T> Reloading<T> {
    /// Reads the files and builds the first value (an error here is the caller's to report).
    pub fn new(
        what: impl Into<String>,
        files: Vec<String>,
        build: impl Fn(&[(String, Vec<u8>)]) -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<Self, String> {
        let what = what.into();
        let contents = read_all(&files)?;
        let first = build(&contents).map_err(|e| format!("{what}: {e}"))?;
        Ok(Reloading {
            what,
            files,
            build: Box::new(build),
            current: RwLock::new(Arc::new(first)),
            seen: Mutex::new(contents.into_iter().map(|(_, b)| b).collect()),
            base: Instant::now(),
            last_check_ms: AtomicU64::new(0),
        })
    }

    /// The current value, after a look at the files if a second has passed since the last.
    pub fn get(&self) -> Arc<T> {
        let now = self.base.elapsed().as_millis() as u64 + RELOAD_CHECK.as_millis() as u64;
        let last = self.last_check_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= RELOAD_CHECK.as_millis() as u64
            && self
                .last_check_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.check();
        }
        self.current.read().clone()
    }

    /// Rebuilds now if the files changed.
    pub fn check(&self) {
        let contents = match read_all(&self.files) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(what = %self.what, error = %e, "TLS files unreadable; keeping the previous ones");
                return;
            }
        };
        let bytes: Vec<Vec<u8>> = contents.iter().map(|(_, b)| b.clone()).collect();
        {
            let mut seen = self.seen.lock();
            if *seen == bytes {
                return;
            }
            *seen = bytes;
        }
        match (self.build)(&contents) {
            Ok(v) => {
                *self.current.write() = Arc::new(v);
                tracing::info!(what = %self.what, "TLS files changed: new connections use them");
            }
            Err(e) => {
                tracing::error!(what = %self.what, error = %e, "new TLS files refused; keeping the previous ones");
            }
        }
    }
}

/// What a server port asks of TLS.
#[derive(Clone, Debug)]
pub struct ServerSpec {
    pub cert_file: String,
    pub key_file: String,
    /// Client certificates must chain to one of these (empty: no client certificates asked).
    pub client_ca_files: Vec<String>,
    pub require_client_cert: bool,
    /// A client certificate that chains to this CA marks a cluster member (empty: none).
    pub member_ca_file: String,
    /// Cluster members' allowed common names (empty: any).
    pub allowed_cn: Vec<String>,
    /// Close connections that are not a cluster member's right after the handshake.
    pub members_only: bool,
    pub alpn: Vec<Vec<u8>>,
}

/// One build of a port's TLS.
pub struct ServerState {
    pub config: Arc<rustls::ServerConfig>,
    member: Option<Arc<dyn ClientCertVerifier>>,
    allowed_cn: Vec<String>,
    members_only: bool,
}

impl ServerState {
    /// The identity a finished handshake proved.
    pub fn identify(
        &self,
        certs: Option<&[CertificateDer<'static>]>,
        remote: SocketAddr,
    ) -> PeerIdentity {
        let leaf = certs.and_then(|c| c.first());
        let common_name = leaf.and_then(|c| cert_common_name(c));
        let cluster_member = match (&self.member, certs) {
            (Some(v), Some(c)) if !c.is_empty() => {
                v.verify_client_cert(&c[0], &c[1..], UnixTime::now())
                    .is_ok()
                    && (self.allowed_cn.is_empty()
                        || common_name
                            .as_ref()
                            .is_some_and(|cn| self.allowed_cn.contains(cn)))
            }
            _ => false,
        };
        PeerIdentity {
            common_name,
            remote_addr: Some(remote),
            cluster_member,
        }
    }
}

/// A port's TLS, rebuilt when its files change.
#[derive(Clone)]
pub struct ServerTls(Arc<Reloading<ServerState>>);

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerTls({})", self.0.what)
    }
}

fn build_server(spec: &ServerSpec, files: &[(String, Vec<u8>)]) -> Result<ServerState, String> {
    let (certs, key) = certified_key(&files[0].0, &files[0].1, &files[1].0, &files[1].1)?;
    let n_client = spec.client_ca_files.len();
    let client_cas = &files[2..2 + n_client];
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if client_cas.is_empty() {
        builder.with_no_client_auth()
    } else {
        let b =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(client_cas)?), provider());
        let b = if spec.require_client_cert {
            b
        } else {
            b.allow_unauthenticated()
        };
        builder.with_client_cert_verifier(b.build().map_err(|e| e.to_string())?)
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("{}: {e}", spec.cert_file))?;
    config.alpn_protocols = spec.alpn.clone();
    let member = if spec.member_ca_file.is_empty() {
        None
    } else {
        let m = &files[2 + n_client..];
        Some(
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(m)?), provider())
                .build()
                .map_err(|e| e.to_string())?,
        )
    };
    Ok(ServerState {
        config: Arc::new(config),
        member,
        allowed_cn: spec.allowed_cn.clone(),
        members_only: spec.members_only,
    })
}

impl ServerTls {
    pub fn new(spec: ServerSpec) -> Result<Self, String> {
        let mut files = vec![spec.cert_file.clone(), spec.key_file.clone()];
        files.extend(spec.client_ca_files.iter().cloned());
        if !spec.member_ca_file.is_empty() {
            files.push(spec.member_ca_file.clone());
        }
        let what = format!("TLS of {}", spec.cert_file);
        let s = spec.clone();
        Ok(ServerTls(Arc::new(Reloading::new(
            what,
            files,
            move |f| build_server(&s, f),
        )?)))
    }

    pub fn current(&self) -> Arc<ServerState> {
        self.0.get()
    }
}

/// A client's TLS (CAs to verify servers with, and an optional certificate), rebuilt when
/// its files change.
#[derive(Clone)]
pub struct ClientTls(Arc<Reloading<Arc<rustls::ClientConfig>>>);

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientTls({})", self.0.what)
    }
}

impl ClientTls {
    /// `ca_files`: servers' certificates must chain to one of these. `cert`: certificate and
    /// key files to present.
    pub fn new(ca_files: Vec<String>, cert: Option<(String, String)>) -> Result<Self, String> {
        if ca_files.is_empty() {
            return Err("TLS needs a CA certificate to verify servers with".into());
        }
        let n_ca = ca_files.len();
        let mut files = ca_files.clone();
        if let Some((c, k)) = &cert {
            files.push(c.clone());
            files.push(k.clone());
        }
        let what = format!("client TLS (CA {})", ca_files.join(", "));
        Ok(ClientTls(Arc::new(Reloading::new(
            what,
            files,
            move |f| {
                let b = rustls::ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .with_root_certificates(roots(&f[..n_ca])?);
                let mut config = if f.len() > n_ca {
                    let (certs, key) =
                        certified_key(&f[n_ca].0, &f[n_ca].1, &f[n_ca + 1].0, &f[n_ca + 1].1)?;
                    b.with_client_auth_cert(certs, key)
                        .map_err(|e| e.to_string())?
                } else {
                    b.with_no_client_auth()
                };
                config.alpn_protocols = vec![b"h2".to_vec()];
                Ok(Arc::new(config))
            },
        )?)))
    }

    pub fn current(&self) -> Arc<rustls::ClientConfig> {
        (*self.0.get()).clone()
    }

    /// TCP to `host:port`, then a TLS handshake verifying the server as `host`.
    pub async fn dial(
        &self,
        host: &str,
        port: u16,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        // An IPv6 address comes bracketed in a URI.
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        tokio_rustls::TlsConnector::from(self.current())
            .connect(name, tcp)
            .await
    }
}

// ---- Server side: accepting connections -------------------------------------------------------

/// One accepted TLS connection and who is on the other end.
pub struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    identity: PeerIdentity,
}

impl TlsConn {
    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerIdentity;

    fn connect_info(&self) -> PeerIdentity {
        self.identity.clone()
    }
}

/// Accepts on `listener` in a task of its own; each connection's handshake runs in its own
/// task (bounded in time and in number), so a slow or silent client blocks nobody. A client
/// that fails the handshake (plaintext, no or a bad certificate, a non-member on a members-only
/// port) is logged and closed. The stream ends when the receiver is dropped.
pub fn incoming(listener: TcpListener, tls: ServerTls) -> mpsc::Receiver<TlsConn> {
    let (tx, rx) = mpsc::channel::<TlsConn>(64);
    let local = listener.local_addr().ok();
    tokio::spawn(async move {
        let sem = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        loop {
            let (tcp, remote) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of descriptors and the like: wait, do not spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let Ok(permit) = sem.clone().try_acquire_owned() else {
                tracing::warn!(%remote, "too many TLS handshakes in progress; connection closed");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let state = tls.current();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let acceptor = tokio_rustls::TlsAcceptor::from(state.config.clone());
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::warn!(%remote, local = ?local, error = %e, "TLS handshake failed; connection closed");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%remote, local = ?local, "TLS handshake timed out; connection closed");
                        return;
                    }
                };
                let identity = state.identify(stream.get_ref().1.peer_certificates(), remote);
                if state.members_only && !identity.cluster_member {
                    tracing::warn!(%remote, cn = ?identity.common_name, "not a cluster member's certificate (CN not allowed); connection closed");
                    return;
                }
                let _ = tx.send(TlsConn { stream, identity }).await;
            });
        }
    });
    rx
}

/// [`incoming`] as the stream tonic's `serve_with_incoming*` takes.
pub fn incoming_stream(
    listener: TcpListener,
    tls: ServerTls,
) -> impl tokio_stream::Stream<Item = Result<TlsConn, io::Error>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::ReceiverStream::new(incoming(listener, tls)).map(Ok)
}

/// [`incoming`] as an axum listener (the status server).
pub struct TlsListener {
    rx: mpsc::Receiver<TlsConn>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(listener: TcpListener, tls: ServerTls) -> io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(TlsListener {
            rx: incoming(listener, tls),
            local,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TlsConn, SocketAddr) {
        match self.rx.recv().await {
            Some(c) => {
                let a = c.identity.remote_addr.unwrap_or(self.local);
                (c, a)
            }
            // The acceptor task ended (only when this listener is dropped).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Interceptor for internal services (raft): with `enforce`, a request must come over a
/// connection that proved a cluster member's certificate.
#[allow(clippy::result_large_err)]
pub fn members_only(
    enforce: bool,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |req: tonic::Request<()>| {
        check_member(enforce, req.extensions())?;
        Ok(req)
    }
}

/// The check of [`members_only`], for one method.
#[allow(clippy::result_large_err)]
pub fn check_member(enforce: bool, ext: &tonic::Extensions) -> Result<(), tonic::Status> {
    if !enforce {
        return Ok(());
    }
    match ext.get::<PeerIdentity>() {
        Some(p) if p.cluster_member => Ok(()),
        Some(p) => Err(tonic::Status::permission_denied(format!(
            "only cluster members may call this: the client certificate ({}) is not a member's",
            p.common_name.as_deref().unwrap_or("none")
        ))),
        None => Err(tonic::Status::permission_denied(
            "only cluster members may call this: no client certificate",
        )),
    }
}

// ---- Client side: channels --------------------------------------------------------------------

/// The endpoint for `addr` (`host:port`, a scheme is stripped): `https://` with TLS,
/// `http://` without. Callers add their options, then [`connect`] or [`connect_lazy`].
pub fn endpoint(addr: &str, tls: Option<&ClientTls>) -> Result<Endpoint, tonic::transport::Error> {
    let bare = addr
        .trim()
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let scheme = if tls.is_some() { "https" } else { "http" };
    Endpoint::from_shared(format!("{scheme}://{bare}"))
}

/// Dials TCP + TLS with the client's current config (rotated files apply to new connections).
#[derive(Clone)]
struct Connector {
    tls: ClientTls,
}

impl tower::Service<tonic::codegen::http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("no host in {uri}"))
                })?
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let s = tls.dial(&host, port).await?;
            Ok(hyper_util::rt::TokioIo::new(s))
        })
    }
}

/// Connects now.
pub async fn connect(
    ep: Endpoint,
    tls: Option<&ClientTls>,
) -> Result<Channel, tonic::transport::Error> {
    match tls {
        None => ep.connect().await,
        Some(t) => {
            ep.connect_with_connector(Connector { tls: t.clone() })
                .await
        }
    }
}

/// Connects on first use (and reconnects as needed).
pub fn connect_lazy(ep: Endpoint, tls: Option<&ClientTls>) -> Channel {
    match tls {
        None => ep.connect_lazy(),
        Some(t) => ep.connect_with_connector_lazy(Connector { tls: t.clone() }),
    }
}

// ---- Certificates: the few fields read from DER -----------------------------------------------

/// One DER element: tag, contents, what follows.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *input.first()?;
    let first = *input.get(1)? as usize;
    let (len, header) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for b in input.get(2..2 + n)? {
            len = (len << 8) | *b as usize;
        }
        (len, 2 + n)
    };
    let content = input.get(header..header.checked_add(len)?)?;
    Some((tag, content, &input[header + len..]))
}

/// The serial number and the subject of a certificate (DER).
fn serial_and_subject(cert: &[u8]) -> Option<(&[u8], &[u8])> {
    let (_, c, _) = der(cert)?; // Certificate
    let (_, mut tbs, _) = der(c)?; // TBSCertificate
    let (tag, _, rest) = der(tbs)?;
    if tag == 0xa0 {
        tbs = rest; // [0] version
    }
    let (_, serial, rest) = der(tbs)?;
    let (_, _, rest) = der(rest)?; // signature algorithm
    let (_, _, rest) = der(rest)?; // issuer
    let (_, _, rest) = der(rest)?; // validity
    let (_, subject, _) = der(rest)?;
    Some((serial, subject))
}

/// The subject common name (CN) of a DER certificate.
pub fn cert_common_name(cert: &[u8]) -> Option<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let (_, mut subject) = serial_and_subject(cert)?;
    while let Some((_, set, rest)) = der(subject) {
        subject = rest;
        let mut attrs = set;
        while let Some((_, attr, more)) = der(attrs) {
            attrs = more;
            let (_, oid, value) = der(attr)?;
            if oid == CN {
                let (_, v, _) = der(value)?;
                return Some(String::from_utf8_lossy(v).into_owned());
            }
        }
    }
    None
}

/// The serial number of a DER certificate, in hex.
pub fn cert_serial_hex(cert: &[u8]) -> Option<String> {
    let (serial, _) = serial_and_subject(cert)?;
    let s: String = serial.iter().map(|b| format!("{b:02x}")).collect();
    Some(s.trim_start_matches("00").to_string())
}

/// The certificate a TLS server presents at `host:port` (leaf, DER), verified with `tls`.
pub async fn served_certificate(tls: &ClientTls, host: &str, port: u16) -> io::Result<Vec<u8>> {
    let s = tls.dial(host, port).await?;
    s.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .ok_or_else(|| io::Error::other("the server presented no certificate"))
}

/// Serves `router` on `listener` until `shutdown`: over TLS when `tls` is given, else plain
/// TCP (no-delay on accepted sockets either way).
pub async fn serve(
    router: tonic::transport::server::Router,
    listener: TcpListener,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    match tls {
        None => {
            // tonic applies no-delay only to listeners it binds itself.
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
        Some(t) => {
            router
                .serve_with_incoming_shutdown(incoming_stream(listener, t), shutdown)
                .await
        }
    }
}
