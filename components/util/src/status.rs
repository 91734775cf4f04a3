//! The HTTP status server shared by `pd-server` and `storage-node`:
//! `GET /metrics` (Prometheus text), `GET /status` (JSON from the caller),
//! `GET /fail` (active failpoints), `PUT /fail/<name>` (body: action), `DELETE /fail/<name>`.

use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

pub type StatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

pub fn router(status: StatusFn) -> Router {
    Router::new()
        .route("/metrics", get(|| async { crate::metrics::encode_text() }))
        .route(
            "/status",
            get(move || {
                let status = status.clone();
                async move { (status)().to_string() }
            }),
        )
        .route(
            "/fail",
            get(|| async {
                crate::failpoints::list()
                    .into_iter()
                    .map(|(n, a)| format!("{n}={a}\n"))
                    .collect::<String>()
            }),
        )
        .route(
            "/fail/{name}",
            get(|Path(name): Path<String>| async move {
                crate::failpoints::list()
                    .into_iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, a)| (StatusCode::OK, a))
                    .unwrap_or((StatusCode::NOT_FOUND, String::new()))
            })
            .put(|Path(name): Path<String>, body: String| async move {
                match crate::failpoints::set(&name, body.trim()) {
                    Ok(()) => (StatusCode::OK, String::new()),
                    Err(e) => (StatusCode::BAD_REQUEST, e),
                }
            })
            .delete(|Path(name): Path<String>| async move {
                crate::failpoints::remove(&name);
                StatusCode::OK
            }),
        )
}

/// Binds `addr` and serves until `shutdown` completes.
pub async fn serve(
    addr: SocketAddr,
    status: StatusFn,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router(status))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Resolves `HOST:PORT` (a name or an address) to the first socket address.
pub async fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    tokio::net::lookup_host(addr).await?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr} resolves to nothing"),
        )
    })
}

/// Binds now (so the caller learns of a taken port at once) and serves in the background:
/// HTTPS when `tls` is given (see [`crate::tls::SecurityConfig::status_port`]).
pub async fn spawn(
    addr: SocketAddr,
    status: StatusFn,
    tls: Option<crate::tls::ServerTls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        let r = match tls {
            None => {
                axum::serve(listener, router(status))
                    .with_graceful_shutdown(shutdown)
                    .await
            }
            Some(tls) => match crate::tls::TlsListener::new(listener, tls) {
                Ok(l) => {
                    axum::serve(l, router(status))
                        .with_graceful_shutdown(shutdown)
                        .await
                }
                Err(e) => Err(e),
            },
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "status server stopped");
        }
    });
    Ok(local)
}
