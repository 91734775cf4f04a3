//! `kvctl lock` and `kvctl elect`: etcd's Lock and Election services of the storage nodes,
//! with a lease granted through etcd's Lease API and kept alive while the lock or the
//! leadership is held (etcd's session). Stores are found through PD, as `kvctl watch` finds
//! them; a call that fails on one store is made again on the next.
//!
//! - `lock NAME [--ttl S] [-- CMD ARGS...]`: acquires the lock, prints its key, runs CMD with
//!   `ATOLL_LOCK_KEY` (the lock key) and `ATOLL_LOCK_REV` (the fencing revision: the
//!   `header.revision` of the Lock answer), then unlocks, revokes the lease and exits with
//!   CMD's status. Without CMD it holds the lock until Ctrl-C / SIGTERM. If the lease is lost
//!   while CMD runs (no keep-alive got through for a whole TTL), CMD gets SIGTERM and kvctl
//!   exits 1: the lock is no longer held.
//! - `elect NAME PROPOSAL [--ttl S]`: campaigns, prints PROPOSAL once elected, stays leader
//!   until Ctrl-C / SIGTERM, then resigns. Exits 1 if the lease is lost meanwhile.
//! - `elect NAME`: observes the election, one line per leader value (each leader, each value
//!   it proclaims), until Ctrl-C / SIGTERM.

use crate::etcd::EtcdChannel;
use atoll_client::Client;
use atoll_proto::etcdserverpb::lease_client::LeaseClient;
use atoll_proto::etcdserverpb::{LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest};
use atoll_proto::v3electionpb::election_client::ElectionClient;
use atoll_proto::v3electionpb::{CampaignRequest, LeaderKey, LeaderRequest, ResignRequest};
use atoll_proto::v3lockpb::lock_client::LockClient;
use atoll_proto::v3lockpb::{LockRequest, UnlockRequest};
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tonic::Code;

#[derive(clap::Args, Debug)]
pub struct LockArgs {
    /// The lock's name (its keys are NAME/<lease id in hex>).
    pub name: String,
    /// The lease's TTL in seconds: how long the lock outlives a kvctl that stopped.
    #[arg(long, default_value_t = 60)]
    pub ttl: i64,
    /// The command to run while holding the lock (after `--`).
    #[arg(last = true)]
    pub cmd: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct ElectArgs {
    /// The election's name (its keys are NAME/<lease id in hex>).
    pub name: String,
    /// Campaign with this value; without it, observe the election.
    pub proposal: Option<String>,
    /// The lease's TTL in seconds: how long the leadership outlives a kvctl that stopped.
    #[arg(long, default_value_t = 60)]
    pub ttl: i64,
}

fn channel(addr: &str) -> anyhow::Result<EtcdChannel> {
    crate::etcd::channel_with(addr, |ep| {
        ep.connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true)
    })
}

/// The client addresses of the stores that are up.
async fn stores(c: &Client) -> anyhow::Result<Vec<String>> {
    let stores = c.pd().get_all_stores(true).await?;
    let addrs: Vec<String> = stores
        .iter()
        .filter_map(|s| s.store.as_ref())
        .map(|s| s.address.clone())
        .collect();
    anyhow::ensure!(!addrs.is_empty(), "no storage node is up");
    Ok(addrs)
}

/// Whether a failed call is worth making again on another store: the store or the way to it
/// failed, not the request. (The Election and Lock services answer every error `Unknown`,
/// as etcd's do, so their messages tell.)
fn retryable(s: &tonic::Status) -> bool {
    const PASSING: &[&str] = &[
        "transport",
        "timed out",
        "etcdserver: no leader",
        "etcdserver: leader changed",
        "etcdserver: server stopped",
        "lost watcher waiting for delete",
    ];
    matches!(
        s.code(),
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded
    ) || PASSING.iter().any(|m| s.message().contains(m))
}

/// A lease kept alive in the background until dropped.
struct Session {
    id: i64,
    /// Becomes true once the lease is known lost (expired, revoked, or no keep-alive got
    /// through for a whole TTL).
    lost: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
    addrs: Vec<String>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Session {
    async fn grant(addrs: Vec<String>, ttl: i64) -> anyhow::Result<Session> {
        anyhow::ensure!(ttl > 0, "--ttl must be at least 1 second");
        let mut last = None;
        for addr in &addrs {
            let mut lc = LeaseClient::new(channel(addr)?);
            match lc.lease_grant(LeaseGrantRequest { ttl, id: 0 }).await {
                Ok(r) => {
                    let r = r.into_inner();
                    if !r.error.is_empty() {
                        anyhow::bail!("lease grant: {}", r.error);
                    }
                    let (tx, rx) = watch::channel(false);
                    let task = tokio::spawn(keep_alive(addrs.clone(), r.id, r.ttl.max(1), tx));
                    return Ok(Session {
                        id: r.id,
                        lost: rx,
                        task,
                        addrs,
                    });
                }
                Err(s) if retryable(&s) => last = Some(s),
                Err(s) => anyhow::bail!("lease grant: {}", s.message()),
            }
        }
        anyhow::bail!(
            "lease grant: no store answered: {}",
            last.map(|s| s.message().to_string()).unwrap_or_default()
        )
    }

    fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    async fn wait_lost(&mut self) {
        let _ = self.lost.wait_for(|l| *l).await;
    }

    /// Revokes the lease (best effort: it expires anyway).
    async fn revoke(&self) {
        self.task.abort();
        for addr in &self.addrs {
            let Ok(ch) = channel(addr) else { continue };
            let req = LeaseRevokeRequest { id: self.id };
            match LeaseClient::new(ch).lease_revoke(req).await {
                Ok(_) => return,
                Err(s) if retryable(&s) => continue,
                Err(_) => return,
            }
        }
    }
}

/// Keeps lease `id` alive through the stores in turn: a keep-alive every TTL/3; sets `lost`
/// when a store says the lease is gone or none got through for a whole TTL.
async fn keep_alive(addrs: Vec<String>, id: i64, ttl: i64, lost: watch::Sender<bool>) {
    let every = Duration::from_millis((ttl as u64 * 1000 / 3).max(100));
    let mut expires = Instant::now() + Duration::from_secs(ttl as u64);
    let mut attempt = 0usize;
    loop {
        let addr = &addrs[attempt % addrs.len()];
        attempt += 1;
        let Ok(ch) = channel(addr) else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
        let stream = tokio::time::timeout(
            expires.saturating_duration_since(Instant::now()),
            LeaseClient::new(ch).lease_keep_alive(outbound),
        )
        .await;
        if let Ok(Ok(stream)) = stream {
            let mut inbound = stream.into_inner();
            loop {
                if tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
                    break;
                }
                let answer = tokio::time::timeout(
                    expires.saturating_duration_since(Instant::now()),
                    inbound.message(),
                )
                .await;
                match answer {
                    Ok(Ok(Some(r))) if r.ttl > 0 => {
                        expires = Instant::now() + Duration::from_secs(r.ttl as u64);
                    }
                    Ok(Ok(Some(_))) => {
                        // TTL 0: the lease does not exist any more.
                        let _ = lost.send(true);
                        return;
                    }
                    _ => break,
                }
                tokio::time::sleep(every).await;
            }
        }
        if Instant::now() >= expires {
            let _ = lost.send(true);
            return;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Ctrl-C or SIGTERM.
async fn signalled() {
    atoll_util::shutdown_signal().await;
}

/// `kvctl lock`: the exit status to leave with.
pub async fn lock(c: &Client, a: LockArgs, json_out: bool) -> anyhow::Result<i32> {
    let addrs = stores(c).await?;
    let mut session = Session::grant(addrs.clone(), a.ttl).await?;
    let name = a.name.as_bytes().to_vec();
    let mut attempt = 0usize;
    let resp = loop {
        if session.is_lost() {
            session.revoke().await;
            anyhow::bail!("lost the lease before acquiring the lock");
        }
        let addr = &addrs[attempt % addrs.len()];
        attempt += 1;
        let mut lc = LockClient::new(channel(addr)?);
        let call = lc.lock(LockRequest {
            name: name.clone(),
            lease: session.id,
        });
        let r = tokio::select! {
            r = call => r,
            _ = signalled() => {
                // Dropping the call makes the store delete the waiting key.
                session.revoke().await;
                return Ok(130);
            }
        };
        match r {
            Ok(r) => break r.into_inner(),
            Err(s) if retryable(&s) || s.message() == "mutex: session is expired" => {
                eprintln!("kvctl: lock through {addr}: {}; trying again", s.message());
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(s) => {
                session.revoke().await;
                anyhow::bail!("lock: {}", s.message());
            }
        }
    };
    let key = String::from_utf8_lossy(&resp.key).into_owned();
    let rev = resp.header.as_ref().map_or(0, |h| h.revision);
    if json_out {
        println!("{}", json!({"key": key, "rev": rev, "lease": session.id}));
    } else {
        println!("{key}");
    }
    let code = if a.cmd.is_empty() {
        tokio::select! {
            _ = signalled() => 0,
            _ = session.wait_lost() => {
                eprintln!("kvctl: lost the lock: its lease expired");
                1
            }
        }
    } else {
        let mut child = tokio::process::Command::new(&a.cmd[0])
            .args(&a.cmd[1..])
            .env("ATOLL_LOCK_KEY", &key)
            .env("ATOLL_LOCK_REV", rev.to_string())
            .spawn()
            .map_err(|e| anyhow::anyhow!("run {}: {e}", a.cmd[0]))?;
        let mut lost = false;
        let mut stopping = false;
        let mut signal = std::pin::pin!(signalled());
        let status = loop {
            tokio::select! {
                s = child.wait() => break s?,
                _ = &mut signal, if !stopping => {
                    // CMD got Ctrl-C too if it came from the terminal; SIGTERM is for the rest.
                    stopping = true;
                    terminate(&child);
                }
                _ = session.wait_lost(), if !lost => {
                    eprintln!("kvctl: lost the lock (its lease expired): stopping {}", a.cmd[0]);
                    lost = true;
                    terminate(&child);
                }
            }
        };
        if lost {
            1
        } else {
            exit_code(status)
        }
    };
    unlock(&addrs, &resp.key).await;
    session.revoke().await;
    Ok(code)
}

fn terminate(child: &tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
}

fn exit_code(s: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
}

async fn unlock(addrs: &[String], key: &[u8]) {
    for addr in addrs {
        let Ok(ch) = channel(addr) else { continue };
        let r = LockClient::new(ch)
            .unlock(UnlockRequest { key: key.to_vec() })
            .await;
        match r {
            Ok(_) => return,
            Err(s) if retryable(&s) => continue,
            Err(s) => {
                eprintln!("kvctl: unlock: {}", s.message());
                return;
            }
        }
    }
}

/// `kvctl elect`: the exit status to leave with.
pub async fn elect(c: &Client, a: ElectArgs, json_out: bool) -> anyhow::Result<i32> {
    let addrs = stores(c).await?;
    match &a.proposal {
        Some(p) => campaign(addrs, &a, p.as_bytes(), json_out).await,
        None => observe(addrs, a.name.as_bytes(), json_out).await,
    }
}

async fn campaign(
    addrs: Vec<String>,
    a: &ElectArgs,
    value: &[u8],
    json_out: bool,
) -> anyhow::Result<i32> {
    let mut session = Session::grant(addrs.clone(), a.ttl).await?;
    let mut attempt = 0usize;
    let leader: LeaderKey = loop {
        if session.is_lost() {
            session.revoke().await;
            anyhow::bail!("lost the lease before being elected");
        }
        let addr = &addrs[attempt % addrs.len()];
        attempt += 1;
        let mut ec = ElectionClient::new(channel(addr)?);
        let call = ec.campaign(CampaignRequest {
            name: a.name.as_bytes().to_vec(),
            lease: session.id,
            value: value.to_vec(),
        });
        let r = tokio::select! {
            r = call => r,
            _ = signalled() => {
                session.revoke().await;
                return Ok(130);
            }
        };
        match r {
            Ok(r) => match r.into_inner().leader {
                Some(l) => break l,
                None => anyhow::bail!("campaign answered no leader key"),
            },
            Err(s) if retryable(&s) || s.message() == "election: not leader" => {
                eprintln!(
                    "kvctl: campaign through {addr}: {}; trying again",
                    s.message()
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(s) => {
                session.revoke().await;
                anyhow::bail!("campaign: {}", s.message());
            }
        }
    };
    let shown = String::from_utf8_lossy(value).into_owned();
    if json_out {
        println!(
            "{}",
            json!({"name": a.name, "key": String::from_utf8_lossy(&leader.key),
                   "rev": leader.rev, "lease": leader.lease, "value": shown})
        );
    } else {
        println!("{shown}");
    }
    let code = tokio::select! {
        _ = signalled() => 0,
        _ = session.wait_lost() => {
            eprintln!("kvctl: lost the leadership: its lease expired");
            1
        }
    };
    for addr in &addrs {
        let Ok(ch) = channel(addr) else { continue };
        let r = ElectionClient::new(ch)
            .resign(ResignRequest {
                leader: Some(leader.clone()),
            })
            .await;
        match r {
            Ok(_) => break,
            Err(s) if retryable(&s) => continue,
            Err(s) => {
                eprintln!("kvctl: resign: {}", s.message());
                break;
            }
        }
    }
    session.revoke().await;
    Ok(code)
}

async fn observe(addrs: Vec<String>, name: &[u8], json_out: bool) -> anyhow::Result<i32> {
    let mut last: Option<(Vec<u8>, i64)> = None;
    let mut attempt = 0usize;
    let watching = async {
        loop {
            let addr = &addrs[attempt % addrs.len()];
            attempt += 1;
            let mut ec = ElectionClient::new(channel(addr)?);
            let err = match ec
                .observe(LeaderRequest {
                    name: name.to_vec(),
                })
                .await
            {
                Ok(stream) => {
                    let mut inbound = stream.into_inner();
                    loop {
                        match inbound.message().await {
                            Ok(Some(r)) => {
                                let Some(kv) = r.kv else { continue };
                                let seen = (kv.key.clone(), kv.mod_revision);
                                if last.as_ref() == Some(&seen) {
                                    // Printed already, before a store change.
                                    continue;
                                }
                                last = Some(seen);
                                let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                                if json_out {
                                    println!(
                                        "{}",
                                        json!({"key": s(&kv.key), "value": s(&kv.value),
                                               "create_revision": kv.create_revision,
                                               "mod_revision": kv.mod_revision})
                                    );
                                } else {
                                    println!("{}", s(&kv.value));
                                }
                            }
                            Ok(None) => break "the store ended the stream".to_string(),
                            Err(s) if retryable(&s) => break s.message().to_string(),
                            Err(s) => anyhow::bail!("observe: {}", s.message()),
                        }
                    }
                }
                Err(s) if retryable(&s) => s.message().to_string(),
                Err(s) => anyhow::bail!("observe: {}", s.message()),
            };
            eprintln!("kvctl: observe through {addr}: {err}; going on through the next store");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    tokio::select! {
        r = watching => r,
        _ = signalled() => Ok(0),
    }
}
