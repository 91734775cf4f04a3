//! `kvctl lease-bench`: many leases kept alive through etcd's own Lease API (gRPC), so the same
//! run measures Atoll's storage nodes and an etcd cluster alike. One JSON line out.
//!
//! Phases:
//! 1. **grant** `--leases` leases, `--concurrency` grants in flight, spread over the endpoints.
//!    Each lease joins a KeepAlive stream the moment it is granted: keep-alives run during the
//!    grant phase already, so no lease expires while the others are being granted.
//! 2. **keep-alive** for `--duration` seconds (the measured phase): `--streams` bidirectional
//!    KeepAlive streams (default one per 1000 leases, spread over the endpoints and over
//!    `--conns` HTTP/2 connections to each); each stream renews each of its leases once per
//!    `--interval`, its renewals paced evenly over the interval. Round trip = request handed to
//!    the stream until its answer arrives.
//! 3. **revoke** every lease (unless `--no-revoke`), the renewals going on meanwhile (so that
//!    no lease expires before it is revoked); then the streams close.
//!
//! A lease is *lost* when an answer said TTL <= 0 (the lease is gone: `lost_expired`) or when
//! no renewal of it was answered for longer than its TTL (it may have expired on the server:
//! `lost_late`), at any time from its grant to the end of phase 2. After each TTL <= 0 answer,
//! TimeToLive is asked at once on another connection: `lost_expired_alive` counts the leases it
//! still reported alive (a keep-alive answer that contradicts the lease's state). With `--cpu-pids`, the CPU time of those processes
//! (utime + stime from `/proc/PID/stat`) is measured over phase 2, in % of one core.

use crate::etcd::{channel, parse_endpoints};
use atoll_proto::etcdserverpb::lease_client::LeaseClient;
use atoll_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest,
};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::json;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_stream::wrappers::ReceiverStream;

#[derive(clap::Args, Clone, Debug)]
pub struct LeaseBenchArgs {
    /// etcd API endpoints (Atoll's storage nodes or etcd members), comma separated.
    #[arg(long)]
    pub endpoints: String,
    /// Leases to grant and keep alive.
    #[arg(long, default_value_t = 100_000)]
    pub leases: usize,
    /// TTL of each lease, seconds.
    #[arg(long, default_value_t = 10)]
    pub ttl: i64,
    /// Seconds of the measured keep-alive phase.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// KeepAlive streams (0: one per 1000 leases, at least 1).
    #[arg(long, default_value_t = 0)]
    pub streams: usize,
    /// Seconds between two renewals of one lease.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// Grants (and revokes) in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// HTTP/2 connections to each endpoint (streams and grants are spread over them).
    #[arg(long, default_value_t = 1)]
    pub conns: usize,
    /// Leave the leases behind (they expire after their TTL).
    #[arg(long)]
    pub no_revoke: bool,
    /// Processes whose CPU use over the keep-alive phase is reported (comma separated pids).
    #[arg(long, value_delimiter = ',')]
    pub cpu_pids: Vec<u32>,
}

/// One lease of a stream.
struct Slot {
    id: i64,
    /// When its unanswered renewals were handed to the stream (µs since the bench began), oldest
    /// first: a stream's answers come in the order of its requests.
    sent_us: VecDeque<u64>,
    /// When it was last renewed (or granted), µs since the bench began.
    ok_us: u64,
    /// Counted as lost (answered TTL <= 0, or unrenewed for longer than the TTL).
    lost: bool,
    /// The server said it is gone: not renewed again.
    gone: bool,
}

/// Unanswered renewals kept per lease for round trips (older ones are forgotten).
const MAX_PENDING: usize = 16;

/// The leases of one KeepAlive stream; they are added as they are granted.
#[derive(Default)]
struct StreamLeases {
    slots: Vec<Slot>,
    index: HashMap<i64, usize>,
}

struct Shared {
    base: Instant,
    ttl_us: u64,
    stop: AtomicBool,
    /// Whether round trips are recorded (the measured phase).
    measuring: AtomicBool,
    /// Whether lost leases are counted (from the first grant to the end of the measured phase;
    /// renewals go on during the revoke phase, where TTL 0 is the expected answer).
    counting: AtomicBool,
    sent: AtomicU64,
    ok: AtomicU64,
    /// Answers with TTL <= 0.
    expired: AtomicU64,
    /// Of those, leases that TimeToLive, asked right after, still reported alive (TTL > 0).
    expired_alive: AtomicU64,
    /// When the first answers with TTL <= 0 came (µs since the bench began).
    expired_at: Mutex<Vec<u64>>,
    /// Leases with no answered renewal for longer than the TTL.
    late: AtomicU64,
    stream_errors: AtomicU64,
    rtt: Mutex<Histogram<u64>>,
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }

    /// Marks a slot lost because it went unrenewed for longer than the TTL.
    fn check_late(&self, s: &mut Slot, now: u64) {
        if self.counting.load(Ordering::Relaxed)
            && !s.lost
            && now.saturating_sub(s.ok_us) > self.ttl_us
        {
            s.lost = true;
            self.late.fetch_add(1, Ordering::Relaxed);
        }
    }
}

pub async fn run(a: LeaseBenchArgs) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(a.ttl > 0, "--ttl must be positive");
    anyhow::ensure!(a.interval > 0.0, "--interval must be positive");
    let urls = parse_endpoints(&a.endpoints);
    anyhow::ensure!(!urls.is_empty(), "--endpoints needs an address");
    let mut channels = vec![];
    for _ in 0..a.conns.max(1) {
        for u in &urls {
            channels.push(channel(u)?);
        }
    }
    let n_streams = if a.streams > 0 {
        a.streams
    } else {
        (a.leases / 1000).max(1)
    };
    let shared = Arc::new(Shared {
        base: Instant::now(),
        ttl_us: a.ttl as u64 * 1_000_000,
        stop: AtomicBool::new(false),
        measuring: AtomicBool::new(false),
        counting: AtomicBool::new(true),
        sent: AtomicU64::new(0),
        ok: AtomicU64::new(0),
        expired: AtomicU64::new(0),
        expired_alive: AtomicU64::new(0),
        expired_at: Mutex::new(vec![]),
        late: AtomicU64::new(0),
        stream_errors: AtomicU64::new(0),
        rtt: Mutex::new(Histogram::new(3)?),
    });
    let streams: Vec<Arc<Mutex<StreamLeases>>> =
        (0..n_streams).map(|_| Default::default()).collect();
    let interval = Duration::from_secs_f64(a.interval);
    let mut stream_tasks = vec![];
    for (j, leases) in streams.iter().enumerate() {
        let (shared, leases, channels) = (shared.clone(), leases.clone(), channels.clone());
        stream_tasks.push(tokio::spawn(keep_stream(
            j, channels, leases, shared, interval,
        )));
    }

    // Phase 1: grants.
    let grant_hist = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let grant_errors = Arc::new(AtomicU64::new(0));
    let granted_ids = Arc::new(Mutex::new(Vec::with_capacity(a.leases)));
    let next = Arc::new(AtomicUsize::new(0));
    let t_grant = Instant::now();
    let mut workers = vec![];
    for w in 0..a.concurrency.max(1) {
        let (next, grant_hist, grant_errors, granted_ids, streams, shared) = (
            next.clone(),
            grant_hist.clone(),
            grant_errors.clone(),
            granted_ids.clone(),
            streams.clone(),
            shared.clone(),
        );
        let mut lc = LeaseClient::new(channels[w % channels.len()].clone());
        let (total, ttl) = (a.leases, a.ttl);
        workers.push(tokio::spawn(async move {
            let mut failures_in_row = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return;
                }
                let t = Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    lc.lease_grant(LeaseGrantRequest { ttl, id: 0 }),
                )
                .await;
                match r {
                    Ok(Ok(r)) if r.get_ref().error.is_empty() => {
                        failures_in_row = 0;
                        let _ = grant_hist
                            .lock()
                            .record(t.elapsed().as_micros().max(1) as u64);
                        let id = r.into_inner().id;
                        granted_ids.lock().push(id);
                        let mut s = streams[i % streams.len()].lock();
                        let k = s.slots.len();
                        s.slots.push(Slot {
                            id,
                            sent_us: VecDeque::new(),
                            ok_us: shared.now_us(),
                            lost: false,
                            gone: false,
                        });
                        s.index.insert(id, k);
                    }
                    _ => {
                        grant_errors.fetch_add(1, Ordering::Relaxed);
                        failures_in_row += 1;
                        if failures_in_row > 100 {
                            return;
                        }
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let grant_secs = t_grant.elapsed().as_secs_f64();
    let grant_end_s = shared.base.elapsed().as_secs_f64();
    let granted = granted_ids.lock().len();

    // Phase 2: the measured keep-alive phase, after one interval in which every lease has
    // joined the renewal rounds.
    tokio::time::sleep(interval).await;
    let cpu_before: Vec<Option<u64>> = a
        .cpu_pids
        .iter()
        .map(|p| cpu_ticks(&p.to_string()))
        .collect();
    let self_before = cpu_ticks("self");
    let (sent0, ok0) = (
        shared.sent.load(Ordering::Relaxed),
        shared.ok.load(Ordering::Relaxed),
    );
    shared.rtt.lock().reset();
    shared.measuring.store(true, Ordering::Relaxed);
    let t_keep = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(a.duration)).await;
    shared.measuring.store(false, Ordering::Relaxed);
    let keep_secs = t_keep.elapsed().as_secs_f64();
    let (sent1, ok1) = (
        shared.sent.load(Ordering::Relaxed),
        shared.ok.load(Ordering::Relaxed),
    );
    let cpu_after: Vec<Option<u64>> = a
        .cpu_pids
        .iter()
        .map(|p| cpu_ticks(&p.to_string()))
        .collect();
    let self_after = cpu_ticks("self");
    let rss: Vec<Option<u64>> = a.cpu_pids.iter().map(|p| rss_kb(*p)).collect();
    // A last look: leases whose last renewal is older than the TTL now.
    let now = shared.now_us();
    for s in &streams {
        for slot in s.lock().slots.iter_mut() {
            shared.check_late(slot, now);
        }
    }
    shared.counting.store(false, Ordering::Relaxed);
    let measured_end_s = now as f64 / 1e6;

    // Phase 3: revoke.
    let ids = std::mem::take(&mut *granted_ids.lock());
    let revoke_errors = Arc::new(AtomicU64::new(0));
    let revoke_not_found = Arc::new(AtomicU64::new(0));
    let mut revoke_secs = 0.0;
    let mut revoked = 0u64;
    if !a.no_revoke {
        let ids = Arc::new(ids);
        let next = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let t = Instant::now();
        let mut workers = vec![];
        for w in 0..a.concurrency.max(1) {
            let (ids, next, done, errs, nf) = (
                ids.clone(),
                next.clone(),
                done.clone(),
                revoke_errors.clone(),
                revoke_not_found.clone(),
            );
            let mut lc = LeaseClient::new(channels[w % channels.len()].clone());
            workers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&id) = ids.get(i) else { return };
                    let r = tokio::time::timeout(
                        Duration::from_secs(10),
                        lc.lease_revoke(LeaseRevokeRequest { id }),
                    )
                    .await;
                    match r {
                        Ok(Ok(_)) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(s)) if s.code() == tonic::Code::NotFound => {
                            nf.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            errs.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        for w in workers {
            w.await?;
        }
        revoke_secs = t.elapsed().as_secs_f64();
        revoked = done.load(Ordering::Relaxed);
    }

    // The renewals went on until every lease was revoked (or, with --no-revoke, until now).
    shared.stop.store(true, Ordering::Relaxed);
    for t in stream_tasks {
        let _ = t.await;
    }

    let rtt = shared.rtt.lock();
    let g = grant_hist.lock();
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let expired = shared.expired.load(Ordering::Relaxed);
    let late = shared.late.load(Ordering::Relaxed);
    let (grant_errors, stream_errors, revoke_errors) = (
        grant_errors.load(Ordering::Relaxed),
        shared.stream_errors.load(Ordering::Relaxed),
        revoke_errors.load(Ordering::Relaxed),
    );
    let pct = |b: Option<u64>, e: Option<u64>| match (b, e) {
        // Clock ticks are 1/100 s (USER_HZ) on Linux.
        (Some(b), Some(e)) => {
            json!(((e.saturating_sub(b)) as f64 / 100.0 / keep_secs * 1000.0).round() / 10.0)
        }
        _ => json!(null),
    };
    let mut cpu = serde_json::Map::new();
    let mut rss_map = serde_json::Map::new();
    for (i, p) in a.cpu_pids.iter().enumerate() {
        cpu.insert(p.to_string(), pct(cpu_before[i], cpu_after[i]));
        rss_map.insert(p.to_string(), json!(rss[i]));
    }
    Ok(json!({
        "workload": "lease",
        "leases": granted,
        "requested": a.leases,
        "ttl": a.ttl,
        "streams": n_streams,
        "interval": a.interval,
        "grant_secs": grant_secs,
        "grant_per_sec": granted as f64 / grant_secs,
        "grant_p50_ms": ms(&g, 0.5),
        "grant_p99_ms": ms(&g, 0.99),
        "grant_errors": grant_errors,
        "seconds": keep_secs,
        "keepalives_sent": sent1 - sent0,
        "keepalives_ok": ok1 - ok0,
        "keepalive_per_sec": (ok1 - ok0) as f64 / keep_secs,
        "keepalive_target_per_sec": granted as f64 / a.interval,
        "lost": expired + late,
        "lost_expired": expired,
        "lost_late": late,
        "lost_expired_alive": shared.expired_alive.load(Ordering::Relaxed),
        "lost_expired_first_at_s": shared.expired_at.lock().iter().map(|us| (*us as f64 / 1e5).round() / 10.0).collect::<Vec<_>>(),
        "grant_end_s": grant_end_s,
        "measured_end_s": measured_end_s,
        "p50_ms": ms(&rtt, 0.5),
        "p99_ms": ms(&rtt, 0.99),
        "max_ms": rtt.max() as f64 / 1000.0,
        "stream_errors": stream_errors,
        "revoked": revoked,
        "revoke_not_found": revoke_not_found.load(Ordering::Relaxed),
        "revoke_secs": revoke_secs,
        "revoke_per_sec": if revoke_secs > 0.0 { revoked as f64 / revoke_secs } else { 0.0 },
        "revoke_errors": revoke_errors,
        "errors": grant_errors + stream_errors + revoke_errors,
        "cpu_pct": cpu,
        "rss_kb": rss_map,
        "client_cpu_pct": pct(self_before, self_after),
    }))
}

/// Renewals go out in batches at most this often per stream (fewer timer wake-ups).
const TICK: Duration = Duration::from_millis(20);

/// One KeepAlive stream: renews each of its leases once per `interval`, evenly spread, and
/// reopens itself on the next connection when it breaks, until the bench stops.
async fn keep_stream(
    j: usize,
    channels: Vec<crate::etcd::EtcdChannel>,
    leases: Arc<Mutex<StreamLeases>>,
    sh: Arc<Shared>,
    interval: Duration,
) {
    // A round starts when the stream's first lease arrives (see below).
    let mut round_start = tokio::time::Instant::now();
    let mut attempt = 0usize;
    while !sh.stop.load(Ordering::Relaxed) {
        let ch = channels[(j + attempt) % channels.len()].clone();
        attempt += 1;
        let (tx, rx) = tokio::sync::mpsc::channel::<LeaseKeepAliveRequest>(1024);
        // Renewals sent on a broken stream are never answered.
        for s in leases.lock().slots.iter_mut() {
            s.sent_us.clear();
        }
        // Answers. (The stream opens once the server answers: etcd answers nothing before the
        // first request, so the renewals below start at once.)
        let (sh2, leases2) = (sh.clone(), leases.clone());
        let ttl_channel = channels[(j + attempt) % channels.len()].clone();
        let receiver = tokio::spawn(async move {
            let mut lc = LeaseClient::new(ch);
            let Ok(inbound) = lc.lease_keep_alive(ReceiverStream::new(rx)).await else {
                return;
            };
            let mut inbound = inbound.into_inner();
            while let Ok(Some(r)) = inbound.message().await {
                let now = sh2.now_us();
                let mut l = leases2.lock();
                let Some(&k) = l.index.get(&r.id) else {
                    continue;
                };
                let s = &mut l.slots[k];
                let sent = s.sent_us.pop_front();
                if r.ttl <= 0 {
                    s.gone = true;
                    if !s.lost && sh2.counting.load(Ordering::Relaxed) {
                        s.lost = true;
                        sh2.expired.fetch_add(1, Ordering::Relaxed);
                        {
                            let mut at = sh2.expired_at.lock();
                            if at.len() < 10 {
                                at.push(now);
                            }
                        }
                        // Is it really gone? Ask TimeToLive at once, on another connection.
                        let (sh3, ch, id) = (sh2.clone(), ttl_channel.clone(), r.id);
                        tokio::spawn(async move {
                            let req = LeaseTimeToLiveRequest { id, keys: false };
                            if let Ok(t) = LeaseClient::new(ch).lease_time_to_live(req).await {
                                if t.get_ref().ttl > 0 {
                                    sh3.expired_alive.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        });
                    }
                    continue;
                }
                sh2.ok.fetch_add(1, Ordering::Relaxed);
                if let Some(sent) = sent {
                    if sh2.measuring.load(Ordering::Relaxed) {
                        let _ = sh2.rtt.lock().record(now.saturating_sub(sent).max(1));
                    }
                }
                s.ok_us = now;
            }
        });
        // Renewals, paced: lease i of m goes out at round_start + interval * i / m.
        'rounds: loop {
            let m = leases.lock().slots.len();
            let mut i = 0;
            while i < m {
                let due = round_start + interval.mul_f64(i as f64 / m as f64);
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = stopped(&sh) => break 'rounds,
                }
                if receiver.is_finished() {
                    break 'rounds;
                }
                let now = tokio::time::Instant::now();
                let mut batch = vec![];
                {
                    let now_us = sh.now_us();
                    let mut l = leases.lock();
                    while i < m && round_start + interval.mul_f64(i as f64 / m as f64) <= now {
                        let s = &mut l.slots[i];
                        sh.check_late(s, now_us);
                        // A lease the server said is gone is not renewed again.
                        if !s.gone {
                            if s.sent_us.len() == MAX_PENDING {
                                s.sent_us.pop_front();
                            }
                            s.sent_us.push_back(now_us);
                            batch.push(s.id);
                        }
                        i += 1;
                    }
                }
                for id in batch {
                    if tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
                        break 'rounds;
                    }
                    sh.sent.fetch_add(1, Ordering::Relaxed);
                }
                // Batch the next renewals if they are due within a tick.
                let next_due = now + TICK;
                if i < m && round_start + interval.mul_f64(i as f64 / m as f64) < next_due {
                    tokio::time::sleep_until(next_due).await;
                }
            }
            round_start += interval;
            if m == 0 {
                // No lease yet: look again in a moment.
                tokio::select! {
                    _ = tokio::time::sleep(TICK) => {}
                    _ = stopped(&sh) => break 'rounds,
                }
                round_start = tokio::time::Instant::now();
                continue;
            }
            // Behind by more than a round: start the next one now rather than burst.
            let now = tokio::time::Instant::now();
            if round_start + interval < now {
                round_start = now;
            }
        }
        drop(tx);
        let broken = receiver.is_finished();
        receiver.abort();
        if !broken || sh.stop.load(Ordering::Relaxed) {
            return;
        }
        sh.stream_errors.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn stopped(sh: &Shared) {
    while !sh.stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// utime + stime of a process (`self` or a pid), in clock ticks.
fn cpu_ticks(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Resident set size of a process, KiB.
fn rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_cpu_and_rss() {
        assert!(cpu_ticks("self").is_some());
        assert!(rss_kb(std::process::id()).unwrap() > 0);
    }
}
