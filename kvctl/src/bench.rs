//! `kvctl bench`: N concurrent closed-loop clients through the client library; one JSON line
//! out: {"workload","ops","seconds","ops_per_sec","p50_ms","p99_ms","p999_ms","errors",...}.

use atoll_client::{Client, Error, TxnOptions};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Put,
    Get,
    Scan,
    Txn,
    Mixed,
    Bank,
}

#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    #[arg(value_enum)]
    pub workload: Workload,
    /// Concurrent clients, each with one request in flight.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Seconds to run. Without it, `put` writes each key of the key space once; the other
    /// workloads run 10 s.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Seconds run first and not measured.
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    #[arg(long, default_value_t = 16)]
    pub key_size: usize,
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Key space (for txn: the number of counters).
    #[arg(long)]
    pub keys: Option<u64>,
    /// bank: number of accounts.
    #[arg(long, default_value_t = 100)]
    pub accounts: u64,
    /// scan: keys per scan.
    #[arg(long, default_value_t = 100)]
    pub scan_len: usize,
    /// mixed: fraction of reads.
    #[arg(long, default_value_t = 0.9)]
    pub read_ratio: f64,
    /// get/scan/mixed: do not load the key space first.
    #[arg(long)]
    pub no_preload: bool,
    /// Key prefix.
    #[arg(long, default_value = "bench/")]
    pub prefix: String,
    /// Random seed (printed in the output).
    #[arg(long)]
    pub seed: Option<u64>,
}

fn key_of(prefix: &str, size: usize, i: u64) -> Vec<u8> {
    let digits = size.saturating_sub(prefix.len()).max(6);
    format!("{prefix}{i:0digits$}").into_bytes()
}

fn value_of(size: usize, rng: &mut impl Rng) -> Vec<u8> {
    (0..size).map(|_| rng.gen_range(b'a'..=b'z')).collect()
}

struct Stats {
    hist: Mutex<Histogram<u64>>,
    ops: AtomicU64,
    errors: AtomicU64,
    conflicts: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Stats {
    fn new() -> Self {
        Stats {
            hist: Mutex::new(
                Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds"),
            ),
            ops: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            first_error: Mutex::new(None),
        }
    }
    fn ok(&self, d: Duration) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        let _ = self.hist.lock().record(d.as_micros().max(1) as u64);
    }
    fn err(&self, e: &Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut f = self.first_error.lock();
        if f.is_none() {
            *f = Some(e.to_string());
        }
    }
}

async fn preload(c: &Arc<Client>, a: &BenchArgs, n: u64) -> anyhow::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut batch = vec![];
    let mut futs = vec![];
    for i in 0..n {
        batch.push((
            key_of(&a.prefix, a.key_size, i),
            value_of(a.value_size, &mut rng),
        ));
        if batch.len() == 256 || i + 1 == n {
            let b = std::mem::take(&mut batch);
            let c = c.clone();
            futs.push(tokio::spawn(async move { c.batch_put(&b).await }));
            if futs.len() >= 8 {
                for f in futs.drain(..) {
                    f.await??;
                }
            }
        }
    }
    for f in futs {
        f.await??;
    }
    Ok(())
}

fn bank_key(i: u64) -> Vec<u8> {
    format!("bank/{i:06}").into_bytes()
}

const INITIAL_BALANCE: u64 = 1000;

async fn bank_total(c: &Arc<Client>) -> anyhow::Result<(u64, usize)> {
    let kvs = c.scan(b"bank/", b"bank0", 0, false, false).await?;
    let mut total = 0u64;
    for (k, v) in &kvs {
        let s = std::str::from_utf8(v).map_err(|_| {
            anyhow::anyhow!("balance of {} is not text", atoll_util::hex::display(k))
        })?;
        total += s.trim().parse::<u64>().map_err(|_| {
            anyhow::anyhow!(
                "balance of {} is not a number: {s:?}",
                atoll_util::hex::display(k)
            )
        })?;
    }
    Ok((total, kvs.len()))
}

async fn bank_setup(c: &Arc<Client>, n: u64) -> anyhow::Result<()> {
    // Create missing accounts, a few per transaction.
    let existing: std::collections::HashSet<Vec<u8>> = c
        .scan(b"bank/", b"bank0", 0, false, true)
        .await?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let missing: Vec<u64> = (0..n)
        .filter(|i| !existing.contains(&bank_key(*i)))
        .collect();
    for chunk in missing.chunks(64) {
        loop {
            let mut t = c.begin().await?;
            for i in chunk {
                if t.get(&bank_key(*i)).await?.is_none() {
                    t.put(bank_key(*i), INITIAL_BALANCE.to_string().into_bytes())?;
                }
            }
            match t.commit().await {
                Ok(_) => break,
                Err(e) if e.is_retryable() => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// One transfer. Ok(true) = committed, Ok(false) = lost a conflict (counted, retried by caller).
async fn transfer(c: &Arc<Client>, from: u64, to: u64, amount: u64) -> Result<bool, Error> {
    let mut t = c.begin_with(TxnOptions::default()).await?;
    let (kf, kt) = (bank_key(from), bank_key(to));
    let bf: u64 = t
        .get(&kf)
        .await?
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let bt: u64 = t
        .get(&kt)
        .await?
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if bf < amount {
        return Ok(true);
    }
    t.put(kf, (bf - amount).to_string().into_bytes())?;
    t.put(kt, (bt + amount).to_string().into_bytes())?;
    match t.commit().await {
        Ok(_) => Ok(true),
        Err(Error::WriteConflict { .. }) | Err(Error::TxnRolledBack(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

pub async fn run(c: Arc<Client>, a: BenchArgs) -> anyhow::Result<Value> {
    if a.clients == 0 {
        anyhow::bail!("--clients must be positive");
    }
    let seed = a.seed.unwrap_or_else(rand::random);
    let keys = a
        .keys
        .unwrap_or(if a.workload == Workload::Txn {
            1
        } else {
            10_000
        })
        .max(1);
    let mut extra = serde_json::Map::new();
    let mut bank_before = None;
    match a.workload {
        Workload::Get | Workload::Scan | Workload::Mixed if !a.no_preload => {
            preload(&c, &a, keys).await?
        }
        Workload::Txn => {
            let pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..keys)
                .map(|i| (key_of(&a.prefix, a.key_size, i), b"0".to_vec()))
                .collect();
            c.batch_put(&pairs).await?;
        }
        Workload::Bank => {
            bank_setup(&c, a.accounts).await?;
            let (t, n) = bank_total(&c).await?;
            bank_before = Some(t);
            extra.insert("accounts".into(), json!(n));
            extra.insert("total_before".into(), json!(t));
        }
        _ => {}
    }
    // Without --duration, `put` writes each key once (all clients share one counter).
    let sequential = a.workload == Workload::Put && a.duration.is_none();
    let duration = Duration::from_secs_f64(a.duration.unwrap_or(10.0).max(0.0));
    let warmup = Duration::from_secs_f64(a.warmup.max(0.0));
    let stats = Arc::new(Stats::new());
    let next = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(warmup.is_zero()));
    let start = Instant::now();
    let end = start + warmup + duration;
    let mut tasks = vec![];
    for ci in 0..a.clients {
        let c = c.clone();
        let a = a.clone();
        let stats = stats.clone();
        let next = next.clone();
        let measuring = measuring.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(ci as u64));
            loop {
                if !sequential && Instant::now() >= end {
                    return;
                }
                let t0 = Instant::now();
                let res: Result<bool, Error> = match a.workload {
                    Workload::Put => {
                        let i = if sequential {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= keys {
                                return;
                            }
                            i
                        } else {
                            rng.gen_range(0..keys)
                        };
                        let v = value_of(a.value_size, &mut rng);
                        c.put(&key_of(&a.prefix, a.key_size, i), &v)
                            .await
                            .map(|_| true)
                    }
                    Workload::Get => c
                        .get(&key_of(&a.prefix, a.key_size, rng.gen_range(0..keys)))
                        .await
                        .map(|_| true),
                    Workload::Scan => {
                        let s = rng.gen_range(0..keys);
                        c.scan(
                            &key_of(&a.prefix, a.key_size, s),
                            &[],
                            a.scan_len,
                            false,
                            false,
                        )
                        .await
                        .map(|_| true)
                    }
                    Workload::Mixed => {
                        let k = key_of(&a.prefix, a.key_size, rng.gen_range(0..keys));
                        if rng.gen_bool(a.read_ratio.clamp(0.0, 1.0)) {
                            c.get(&k).await.map(|_| true)
                        } else {
                            let v = value_of(a.value_size, &mut rng);
                            c.put(&k, &v).await.map(|_| true)
                        }
                    }
                    Workload::Txn => {
                        let k = key_of(&a.prefix, a.key_size, ci as u64 % keys);
                        async {
                            let mut t = c.begin().await?;
                            let v: u64 = t
                                .get(&k)
                                .await?
                                .and_then(|v| String::from_utf8(v).ok())
                                .and_then(|s| s.parse().ok())
                                .unwrap_or(0);
                            t.put(k.clone(), (v + 1).to_string().into_bytes())?;
                            match t.commit().await {
                                Ok(_) => Ok(true),
                                Err(Error::WriteConflict { .. }) | Err(Error::TxnRolledBack(_)) => {
                                    Ok(false)
                                }
                                Err(e) => Err(e),
                            }
                        }
                        .await
                    }
                    Workload::Bank => {
                        let from = rng.gen_range(0..a.accounts);
                        let mut to = rng.gen_range(0..a.accounts);
                        if to == from {
                            to = (to + 1) % a.accounts.max(2);
                        }
                        transfer(&c, from, to, rng.gen_range(1..=10)).await
                    }
                };
                if !measuring.load(Ordering::Relaxed) {
                    continue;
                }
                match res {
                    Ok(true) => stats.ok(t0.elapsed()),
                    Ok(false) => {
                        stats.conflicts.fetch_add(1, Ordering::Relaxed);
                        stats.ok(t0.elapsed());
                    }
                    Err(e) => stats.err(&e),
                }
            }
        }));
    }
    let mut measure_start = start;
    if !warmup.is_zero() {
        tokio::time::sleep(warmup).await;
        measure_start = Instant::now();
        measuring.store(true, Ordering::Relaxed);
    }
    for t in tasks {
        t.await?;
    }
    let seconds = measure_start.elapsed().as_secs_f64();
    let ops = stats.ops.load(Ordering::Relaxed);
    let (p50, p99, p999) = {
        let h = stats.hist.lock();
        let ms = |q: f64| {
            if ops == 0 {
                0.0
            } else {
                (h.value_at_quantile(q) as f64).round() / 1000.0
            }
        };
        (ms(0.50), ms(0.99), ms(0.999))
    };
    let mut out = json!({
        "workload": format!("{:?}", a.workload).to_lowercase(),
        "ops": ops,
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "ops_per_sec": ((ops as f64 / seconds.max(1e-9)) * 10.0).round() / 10.0,
        "p50_ms": p50,
        "p99_ms": p99,
        "p999_ms": p999,
        "errors": stats.errors.load(Ordering::Relaxed),
        "clients": a.clients,
        "key_size": a.key_size,
        "value_size": a.value_size,
        "keys": keys,
        "seed": seed,
    });
    if let Some(e) = stats.first_error.lock().clone() {
        eprintln!("kvctl bench: first error: {e}");
        extra.insert("first_error".into(), json!(e));
    }
    if matches!(a.workload, Workload::Txn | Workload::Bank) {
        let conflicts = stats.conflicts.load(Ordering::Relaxed);
        extra.insert("conflicts".into(), json!(conflicts));
        extra.insert("committed".into(), json!(ops - conflicts));
    }
    let mut consistent = true;
    if let Some(before) = bank_before {
        let (after, _) = bank_total(&c).await?;
        consistent = after == before;
        extra.insert("total_after".into(), json!(after));
        extra.insert("consistent".into(), json!(consistent));
    }
    if let Value::Object(m) = &mut out {
        m.extend(extra);
    }
    if !consistent {
        anyhow::bail!("bank total changed: {out}");
    }
    Ok(out)
}
