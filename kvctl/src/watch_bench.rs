//! `kvctl watch-bench`: watchers and writers through etcd's own API (KV and Watch over gRPC),
//! so the same run measures Atoll's storage nodes and an etcd cluster alike. One JSON line
//! out: puts done and their latency, events expected and delivered, delivery latency (from
//! the moment the put was sent to the moment a watcher received its event: the put's commit
//! plus the watch's delivery), and the watchers that missed, repeated or reordered an event.
//!
//! Every put writes a fresh key under the prefix, so every watcher must receive every put
//! exactly once; the value carries the put's send time.

use atoll_proto::etcdserverpb::kv_client::KvClient;
use atoll_proto::etcdserverpb::watch_client::WatchClient;
use atoll_proto::etcdserverpb::watch_request::RequestUnion;
use atoll_proto::etcdserverpb::{PutRequest, WatchCreateRequest, WatchRequest};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

#[derive(clap::Args, Clone, Debug)]
pub struct WatchBenchArgs {
    /// etcd API endpoints (Atoll's storage nodes or etcd members), comma separated.
    #[arg(long)]
    pub endpoints: String,
    /// Watchers on the prefix, spread over the endpoints, one gRPC stream each.
    #[arg(long, default_value_t = 1000)]
    pub watchers: usize,
    /// Writers, each with one put in flight.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Puts per second over all writers (0: as fast as they go).
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 15.0)]
    pub duration: f64,
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// The watched prefix; keys are PREFIX + a counter.
    #[arg(long, default_value = "wb/")]
    pub prefix: String,
    /// Also open one watcher that reads nothing for this many seconds, then drains.
    #[arg(long, default_value_t = 0.0)]
    pub stall: f64,
    /// Seconds to wait after the writers stop for the last events.
    #[arg(long, default_value_t = 10.0)]
    pub drain: f64,
}

fn prefix_end(p: &[u8]) -> Vec<u8> {
    crate::watch::prefix_end(p)
}

struct Stats {
    delivery: Mutex<Histogram<u64>>,
    delivered: AtomicU64,
    duplicates: AtomicU64,
    /// Events that came with a lower revision than one the same watcher already had.
    out_of_order: AtomicU64,
}

pub async fn run(a: WatchBenchArgs) -> anyhow::Result<serde_json::Value> {
    let endpoints = crate::etcd::parse_endpoints(&a.endpoints);
    anyhow::ensure!(!endpoints.is_empty(), "--endpoints needs an address");
    let mut channels = vec![];
    for e in &endpoints {
        let ep = atoll_util::tls::endpoint(e, crate::etcd::tls())?;
        channels.push(atoll_util::tls::connect(ep, crate::etcd::tls()).await?);
    }
    let base = Instant::now();
    let stats = Arc::new(Stats {
        delivery: Mutex::new(Histogram::new(3)?),
        delivered: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
        out_of_order: AtomicU64::new(0),
    });
    let key = a.prefix.as_bytes().to_vec();
    let end = prefix_end(&key);
    // Watchers: each counts what it gets and checks it gets no key twice.
    let created = Arc::new(AtomicU64::new(0));
    let mut per_watcher = vec![];
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = vec![];
    let total = a.watchers + usize::from(a.stall > 0.0);
    for i in 0..total {
        let stalled = i == a.watchers;
        let mut wc = WatchClient::new(channels[i % channels.len()].clone())
            .max_decoding_message_size(64 << 20);
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: key.clone(),
                range_end: end.clone(),
                ..Default::default()
            })),
        };
        let outbound = tokio_stream::iter(vec![create]).chain(tokio_stream::pending());
        let mut inbound = wc.watch(outbound).await?.into_inner();
        let count = Arc::new(AtomicU64::new(0));
        per_watcher.push(count.clone());
        let (stats, created, stop) = (stats.clone(), created.clone(), stop.clone());
        let stall = Duration::from_secs_f64(a.stall);
        tasks.push(tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            let mut last_rev = 0i64;
            let mut first = true;
            loop {
                if stalled && !first {
                    tokio::time::sleep(stall).await;
                    first = true;
                }
                let msg = tokio::select! {
                    m = inbound.message() => m,
                    _ = async { while !stop.load(Ordering::Relaxed) { tokio::time::sleep(Duration::from_millis(100)).await } } => return,
                };
                let Ok(Some(resp)) = msg else { return };
                if resp.created {
                    created.fetch_add(1, Ordering::Relaxed);
                    first = false;
                    continue;
                }
                let now = base.elapsed().as_micros() as u64;
                for e in resp.events {
                    let kv = e.kv.unwrap_or_default();
                    if kv.mod_revision < last_rev {
                        stats.out_of_order.fetch_add(1, Ordering::Relaxed);
                    }
                    last_rev = last_rev.max(kv.mod_revision);
                    if !seen.insert(kv.key.clone()) {
                        stats.duplicates.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                    stats.delivered.fetch_add(1, Ordering::Relaxed);
                    if !stalled {
                        let sent: u64 = std::str::from_utf8(&kv.value[..20.min(kv.value.len())])
                            .ok()
                            .and_then(|s| s.trim().parse().ok())
                            .unwrap_or(now);
                        let _ = stats.delivery.lock().record(now.saturating_sub(sent).max(1));
                    }
                }
            }
        }));
    }
    let t0 = Instant::now();
    while created.load(Ordering::Relaxed) < total as u64 {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(120),
            "only {} of {total} watches were created",
            created.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let setup_secs = t0.elapsed().as_secs_f64();
    // Writers.
    let next = Arc::new(AtomicU64::new(0));
    let puts_hist = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(a.duration);
    let interval = (a.rate > 0.0).then(|| Duration::from_secs_f64(a.clients as f64 / a.rate));
    let mut writers = vec![];
    for c in 0..a.clients {
        let mut kv = KvClient::new(channels[c % channels.len()].clone());
        let (next, puts_hist, errors, prefix) = (
            next.clone(),
            puts_hist.clone(),
            errors.clone(),
            a.prefix.clone(),
        );
        let value_size = a.value_size.max(24);
        writers.push(tokio::spawn(async move {
            let mut tick = interval.map(|i| {
                let mut t = tokio::time::interval_at(
                    tokio::time::Instant::now() + i.mul_f64(c as f64 / 16.0),
                    i,
                );
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            while Instant::now() < deadline {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                let n = next.fetch_add(1, Ordering::Relaxed);
                let sent = base.elapsed().as_micros() as u64;
                let mut value = format!("{sent:<20}").into_bytes();
                value.resize(value_size, b'v');
                let req = PutRequest {
                    key: format!("{prefix}{n:010}").into_bytes(),
                    value,
                    ..Default::default()
                };
                let t = Instant::now();
                match kv.put(req).await {
                    Ok(_) => {
                        let _ = puts_hist
                            .lock()
                            .record(t.elapsed().as_micros().max(1) as u64);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for w in writers {
        let _ = w.await;
    }
    let secs = started.elapsed().as_secs_f64();
    let puts = puts_hist.lock().len();
    let attempted = next.load(Ordering::Relaxed);
    // Every watcher should get every acknowledged put (and maybe the failed ones).
    let drain_until = Instant::now() + Duration::from_secs_f64(a.drain + a.stall);
    while Instant::now() < drain_until {
        if per_watcher
            .iter()
            .all(|c| c.load(Ordering::Relaxed) >= puts)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let short = per_watcher
        .iter()
        .filter(|c| c.load(Ordering::Relaxed) < puts)
        .count();
    let d = stats.delivery.lock();
    let p = puts_hist.lock();
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok(json!({
        "workload": "watch",
        "watchers": a.watchers,
        "stalled_watcher_secs": a.stall,
        "clients": a.clients,
        "rate": a.rate,
        "setup_secs": setup_secs,
        "seconds": secs,
        "puts": puts,
        "put_errors": errors.load(Ordering::Relaxed),
        "attempted": attempted,
        "puts_per_sec": puts as f64 / secs,
        "put_p50_ms": ms(&p, 0.5),
        "put_p99_ms": ms(&p, 0.99),
        "events_expected": puts * total as u64,
        "events_delivered": stats.delivered.load(Ordering::Relaxed),
        "duplicates": stats.duplicates.load(Ordering::Relaxed),
        "out_of_order": stats.out_of_order.load(Ordering::Relaxed),
        "watchers_short": short,
        "delivery_p50_ms": ms(&d, 0.5),
        "delivery_p99_ms": ms(&d, 0.99),
        "delivery_max_ms": d.max() as f64 / 1000.0,
    }))
}
