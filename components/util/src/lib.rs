//! Small shared pieces every Atoll crate uses.
//!
//! | module | owns |
//! | --- | --- |
//! | [`config`] | human units in TOML (`"96MiB"`, `"10s"`) and their parsers |
//! | [`backoff`] | exponential backoff with jitter inside a deadline |
//! | [`logging`] | tracing set-up, and the one bridge from raft-rs's slog into tracing |
//! | [`metrics`] | the process-wide Prometheus registry and text encoding |
//! | [`status`] | the HTTP status server: `/metrics`, `/status`, `/fail/<name>` |
//! | [`sys`] | process CPU time, disk capacity |
//! | [`failpoints`] | failpoint set-up from `FAILPOINTS` and at run time |
//! | [`hex`] | how keys and values that are not UTF-8 are printed (`0x…`) |
//! | [`identity`] | [`identity::PeerIdentity`]: the client certificate's name, as TLS proved it |
//! | [`tls`] | TLS and mutual TLS: flags, reloading configs, accepting and dialing |

pub mod backoff;
pub mod config;
pub mod failpoints;
pub mod hex;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod status;
pub mod sys;
pub mod tls;

/// Makes a panic on any thread end the process (after the usual panic message and an error
/// log line), as a server must: a storage node whose raft poller or worker thread died would
/// otherwise keep answering while part of it no longer runs. Crash failpoints (`panic`) rely
/// on this to model a crash.
pub fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        tracing::error!("{info}; aborting the process");
        std::process::abort();
    }));
}

/// Milliseconds since the unix epoch, from the wall clock.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
