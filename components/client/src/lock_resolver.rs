//! What a reader (or writer) does when it meets another transaction's lock: ask the lock's
//! primary key for the transaction's status (rolling it back if its TTL expired, or pushing
//! its minimum commit timestamp past the reader's so the reader need not wait), then clean
//! the lock up (commit or roll back this key) when the outcome is known.

use crate::{Client, Error, Locate, Result};
use atoll_proto::kvrpcpb;
use atoll_util::backoff::Backoff;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Outcome of a transaction as its primary key tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnStatus {
    Committed(u64),
    RolledBack,
    /// Still running; `ttl` ms of lease; `pushed`: the reader may go ahead at its timestamp.
    Locked {
        ttl: u64,
        pushed: bool,
    },
}

fn physical_ms(ts: u64) -> u64 {
    atoll_pd_client::ts_physical_ms(ts)
}

pub async fn check_txn_status(
    client: &Client,
    primary: &[u8],
    lock_ts: u64,
    caller_ts: u64,
    lock_ttl: u64,
    deadline: Instant,
) -> Result<TxnStatus> {
    let current = client.tso().await?;
    // Once the lock's TTL has passed, a missing primary lock means the prewrite never landed:
    // roll it back so it never can.
    let expired = physical_ms(current) >= physical_ms(lock_ts) + lock_ttl;
    let (_, resp) = client
        .call(Locate::Key(primary), deadline, |mut c, ctx, _| {
            let req = kvrpcpb::CheckTxnStatusRequest {
                context: Some(ctx),
                primary_key: primary.to_vec(),
                lock_ts,
                caller_start_ts: caller_ts,
                current_ts: current,
                rollback_if_not_exist: expired,
            };
            async move { c.kv_check_txn_status(req).await }
        })
        .await?;
    if let Some(e) = resp.error {
        if e.txn_not_found.is_some() {
            // The primary's prewrite may still be on its way: wait for the TTL.
            return Ok(TxnStatus::Locked {
                ttl: lock_ttl.max(1),
                pushed: false,
            });
        }
        return Err(crate::errors::key_error(e));
    }
    if resp.commit_version > 0 {
        return Ok(TxnStatus::Committed(resp.commit_version));
    }
    if resp.lock_ttl == 0 {
        return Ok(TxnStatus::RolledBack);
    }
    let pushed = resp.action == kvrpcpb::Action::MinCommitTsPushed as i32
        || resp
            .lock_info
            .as_ref()
            .is_some_and(|l| l.min_commit_ts > caller_ts && caller_ts != 0);
    let elapsed = physical_ms(current).saturating_sub(physical_ms(lock_ts));
    Ok(TxnStatus::Locked {
        ttl: resp.lock_ttl.saturating_sub(elapsed).max(1),
        pushed,
    })
}

pub async fn resolve_lock_on_key(
    client: &Client,
    key: &[u8],
    start_ts: u64,
    commit_ts: u64,
    deadline: Instant,
) -> Result<()> {
    let (_, resp) = client
        .call(Locate::Key(key), deadline, |mut c, ctx, _| {
            let req = kvrpcpb::ResolveLockRequest {
                context: Some(ctx),
                start_version: start_ts,
                commit_version: commit_ts,
                keys: vec![key.to_vec()],
            };
            async move { c.kv_resolve_lock(req).await }
        })
        .await?;
    match resp.error {
        None => Ok(()),
        Some(e) => Err(crate::errors::key_error(e)),
    }
}

/// Resolves what can be resolved; returns how long (ms) the caller should wait before
/// retrying (0 = retry now). Transactions pushed past `caller_ts` are added to `bypass`:
/// the caller's reads may ignore their locks.
pub async fn resolve(
    client: &Client,
    locks: Vec<kvrpcpb::LockInfo>,
    caller_ts: u64,
    deadline: Instant,
    bypass: &mut Vec<u64>,
) -> Result<u64> {
    let mut statuses: HashMap<u64, TxnStatus> = HashMap::new();
    let mut wait = 0u64;
    for lock in locks {
        if lock.primary_lock.is_empty() {
            return Err(Error::Server("lock without a primary key".into()));
        }
        let status = match statuses.get(&lock.lock_version) {
            Some(s) => *s,
            None => {
                let s = check_txn_status(
                    client,
                    &lock.primary_lock,
                    lock.lock_version,
                    caller_ts,
                    lock.lock_ttl,
                    deadline,
                )
                .await?;
                statuses.insert(lock.lock_version, s);
                s
            }
        };
        match status {
            TxnStatus::Committed(c) => {
                resolve_lock_on_key(client, &lock.key, lock.lock_version, c, deadline).await?
            }
            TxnStatus::RolledBack => {
                resolve_lock_on_key(client, &lock.key, lock.lock_version, 0, deadline).await?
            }
            TxnStatus::Locked { pushed: true, .. } => {
                if !bypass.contains(&lock.lock_version) {
                    bypass.push(lock.lock_version);
                }
            }
            TxnStatus::Locked { ttl, pushed: false } => wait = wait.max(ttl),
        }
    }
    Ok(wait)
}

/// What a request does when it met `lock`: resolve it ([`resolve`]), then wait what that asks
/// (at most 200 ms at a time, within the request's backoff); the request then retries.
/// `Err(Timeout)` with `what` when the deadline passes first.
pub async fn resolve_and_wait(
    client: &Client,
    lock: kvrpcpb::LockInfo,
    caller_ts: u64,
    deadline: Instant,
    bypass: &mut Vec<u64>,
    backoff: &mut Backoff,
    what: &str,
) -> Result<()> {
    let wait = resolve(client, vec![lock], caller_ts, deadline, bypass).await?;
    if wait > 0
        && !backoff
            .wait_at_least(Duration::from_millis(wait.min(200)))
            .await
    {
        return Err(Error::Timeout(client.config().timeout, what.into()));
    }
    Ok(())
}

/// [`resolve_key_error`] for a plain write: it reads nothing, so it has no timestamp and no
/// locks to read past.
pub async fn resolve_write_key_error(
    client: &Client,
    e: kvrpcpb::KeyError,
    deadline: Instant,
    backoff: &mut Backoff,
) -> Result<()> {
    resolve_key_error(
        client,
        e,
        0,
        deadline,
        &mut vec![],
        backoff,
        "key stayed locked",
    )
    .await
}

/// A key error a request got back: a lock is resolved and waited for ([`resolve_and_wait`];
/// the request then retries), anything else is the request's error.
pub async fn resolve_key_error(
    client: &Client,
    e: kvrpcpb::KeyError,
    caller_ts: u64,
    deadline: Instant,
    bypass: &mut Vec<u64>,
    backoff: &mut Backoff,
    what: &str,
) -> Result<()> {
    match e.locked {
        Some(lock) => {
            resolve_and_wait(client, lock, caller_ts, deadline, bypass, backoff, what).await
        }
        None => Err(crate::errors::key_error(e)),
    }
}
