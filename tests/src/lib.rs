//! Shared helpers for the integration tests: running the real binaries on free local ports,
//! waiting on conditions, and the checkers of the chaos suite (linearizability, watches,
//! leases, elections and locks).
//!
//! | module | owns |
//! | --- | --- |
//! | [`procs`] | multi-process clusters of `pd-server` and `storage-node`, and `kvctl` runs |
//! | [`linearizability`] | the per-key register checker (Wing & Gong with memoisation) |
//! | [`etcd_watch`] | etcd writes and watch streams over gRPC, recorded for [`watch_check`] |
//! | [`watch_check`] | the etcd watch checker: recorded watch streams against the writes made |
//! | [`etcd_lease`] | etcd leases, elections and locks over gRPC, recorded for the two below |
//! | [`lease_check`] | the lease checker: early and missed expiries, revokes, atomic deletes |
//! | [`fence_check`] | the election and lock checkers: fencing revisions, lost updates |

pub mod etcd_lease;
pub mod etcd_watch;
pub mod fence_check;
pub mod lease_check;
pub mod linearizability;
pub mod procs;
pub mod watch_check;

use std::time::{Duration, Instant};

/// Polls `f` until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Async version of [`wait_until`].
pub async fn wait_until_async<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A small multi-threaded runtime for a test's async clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A random seed from the environment (`ATOLL_SEED`) or fresh; always printed.
pub fn seed() -> u64 {
    let s = std::env::var("ATOLL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed: {s} (rerun with ATOLL_SEED={s})");
    s
}
