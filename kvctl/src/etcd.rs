//! kvctl's connections to etcd's v3 API: a list of endpoints (Atoll's storage nodes or etcd
//! members) and calls that move on to the next endpoint when one cannot be reached or answers
//! Unavailable, as etcd's client does. Only etcd's standard gRPC services are used, so what is
//! built on this works against an etcd cluster too.

use atoll_util::tls::ClientTls;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// kvctl's TLS (`--cacert`, `--cert`, `--key`), set once at start.
static TLS: OnceLock<Option<ClientTls>> = OnceLock::new();

pub fn set_tls(tls: Option<ClientTls>) {
    let _ = TLS.set(tls);
}

/// The TLS every connection of this kvctl uses (`None`: plaintext).
pub fn tls() -> Option<&'static ClientTls> {
    TLS.get().and_then(|t| t.as_ref())
}

/// `host:port` or a URL, comma separated, to gRPC URLs (`https://` with TLS).
pub fn parse_endpoints(list: &str) -> Vec<String> {
    let scheme = if tls().is_some() { "https" } else { "http" };
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| {
            if e.starts_with("http://") || e.starts_with("https://") {
                e.to_string()
            } else {
                format!("{scheme}://{e}")
            }
        })
        .collect()
}

/// The token of `--user` (etcd's `Authenticate`), sent with every call once set.
static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sends `token` (gRPC metadata `token`, etcd's key) with every call of this process.
pub fn set_token(token: String) {
    let _ = TOKEN.set(token);
}

/// The token set by [`set_token`].
pub fn token() -> Option<&'static str> {
    TOKEN.get().map(String::as_str)
}

fn add_token(mut r: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
    if let Some(t) = token() {
        let v = t
            .parse()
            .map_err(|_| Status::invalid_argument("the auth token is not ASCII"))?;
        r.metadata_mut().insert("token", v);
    }
    Ok(r)
}

/// A channel that carries the token of `--user`, if any.
pub type EtcdChannel = tonic::codegen::InterceptedService<
    Channel,
    fn(tonic::Request<()>) -> Result<tonic::Request<()>, Status>,
>;

/// `ch` with the token of `--user`.
pub fn with_token(ch: Channel) -> EtcdChannel {
    tonic::codegen::InterceptedService::new(ch, add_token as fn(_) -> _)
}

/// A lazily connected channel to one endpoint (no request timeout: streams stay open), over
/// TLS when kvctl has it, carrying the token of `--user`.
pub fn channel(url: &str) -> anyhow::Result<EtcdChannel> {
    channel_with(url, |ep| {
        ep.connect_timeout(Duration::from_secs(3)).tcp_nodelay(true)
    })
}

/// [`channel`] with the caller's endpoint options.
pub fn channel_with(
    addr: &str,
    opts: impl FnOnce(tonic::transport::Endpoint) -> tonic::transport::Endpoint,
) -> anyhow::Result<EtcdChannel> {
    let ep = opts(atoll_util::tls::endpoint(addr, tls())?);
    Ok(with_token(atoll_util::tls::connect_lazy(ep, tls())))
}

/// The endpoints of one command, and which one it is talking to now.
pub struct Etcd {
    urls: Vec<String>,
    channels: Vec<EtcdChannel>,
    current: AtomicUsize,
    /// Limit of one unary call on one endpoint.
    pub timeout: Duration,
}

/// Errors worth trying on another endpoint: the endpoint is down, unreachable, or has no leader.
fn is_retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
    ) || (s.code() == Code::Unknown && s.message().contains("transport"))
}

/// A one-line error from a gRPC status: etcd's message (`etcdserver: requested lease not found`).
pub fn status_error(s: Status) -> anyhow::Error {
    if s.message().is_empty() {
        anyhow::anyhow!("{:?}", s.code())
    } else {
        anyhow::anyhow!("{}", s.message())
    }
}

impl Etcd {
    pub fn new(urls: Vec<String>, timeout: Duration) -> anyhow::Result<Self> {
        anyhow::ensure!(!urls.is_empty(), "no etcd API endpoint");
        let channels = urls.iter().map(|u| channel(u)).collect::<Result<_, _>>()?;
        Ok(Etcd {
            urls,
            channels,
            current: AtomicUsize::new(0),
            timeout,
        })
    }

    /// The endpoint in use and its channel.
    pub fn current(&self) -> (&str, EtcdChannel) {
        let i = self.current.load(Ordering::Relaxed) % self.urls.len();
        (&self.urls[i], self.channels[i].clone())
    }

    /// Moves on to the next endpoint.
    pub fn advance(&self) {
        self.current.fetch_add(1, Ordering::Relaxed);
    }

    /// Calls `f` on the current endpoint; an unreachable or unavailable endpoint (or one that
    /// does not answer within the timeout) is left for the next, each tried once.
    pub async fn call<T, F, Fut>(&self, mut f: F) -> anyhow::Result<T>
    where
        F: FnMut(EtcdChannel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut last = None;
        for _ in 0..self.urls.len() {
            let (url, ch) = self.current();
            match tokio::time::timeout(self.timeout, f(ch)).await {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(s)) if !is_retryable(&s) => return Err(status_error(s)),
                Ok(Err(s)) => last = Some(format!("{url}: {}", s.message())),
                Err(_) => last = Some(format!("{url}: no answer within {:?}", self.timeout)),
            }
            self.advance();
        }
        anyhow::bail!("no endpoint answered (last: {})", last.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_become_urls() {
        assert_eq!(
            parse_endpoints("127.0.0.1:2379, http://a:1,,https://b:2"),
            vec!["http://127.0.0.1:2379", "http://a:1", "https://b:2"]
        );
    }
}
