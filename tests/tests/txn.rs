//! Transactions (issue: distributed transactions): snapshot isolation's guarantees and its
//! honest limit, across regions, with real processes.

use atoll_client::{Client, ClientConfig, Error, TxnOptions};
use atoll_tests::procs::{ClusterOpts, ProcCluster};
use std::sync::Arc;
use std::time::Duration;

struct Env {
    c: ProcCluster,
    rt: tokio::runtime::Runtime,
    cl: Arc<Client>,
}

fn env() -> Env {
    let e = env_one_region();
    // x and y live in different regions.
    split(&e.c, "t/m");
    e
}

fn split(c: &ProcCluster, at: &str) {
    let o = c.kvctl(&["split", at]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn env_one_region() -> Env {
    let c = ProcCluster::start(ClusterOpts {
        pds: 1,
        stores: 3,
        ..Default::default()
    });
    c.wait_ready(Duration::from_secs(60));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut cfg = ClientConfig::new(atoll_pd_client::rpc::parse_endpoints(&c.pd_endpoints()));
    cfg.timeout = Duration::from_secs(20);
    let cl = rt.block_on(Client::connect(cfg)).unwrap();
    Env { c, rt, cl }
}

const X: &[u8] = b"t/a-x";
const Y: &[u8] = b"t/z-y";

fn num(v: Option<Vec<u8>>) -> i64 {
    v.map(|v| String::from_utf8(v).unwrap().parse().unwrap())
        .unwrap_or(0)
}

#[test]
fn snapshot_isolation_anomalies() {
    let e = env();
    let (rt, cl) = (&e.rt, &e.cl);
    rt.block_on(async {
        let mut t = cl.begin().await.unwrap();
        t.put(X.to_vec(), b"50".to_vec()).unwrap();
        t.put(Y.to_vec(), b"50".to_vec()).unwrap();
        t.commit().await.unwrap();
        assert_ne!(cl.region_cache().cached().len(), 0);

        // Dirty read: a transaction's prewritten (uncommitted) write is invisible, and stays
        // invisible to that snapshot after it commits.
        let mut w = cl.begin().await.unwrap();
        w.put(X.to_vec(), b"999".to_vec()).unwrap();
        w.put(Y.to_vec(), b"999".to_vec()).unwrap();
        assert_eq!(w.prewrite().await.unwrap(), None, "two regions: two phases");
        let r = cl.begin().await.unwrap();
        assert_eq!(num(r.get(X).await.unwrap()), 50, "dirty read");
        let committed_at = w.commit_prewritten().await.unwrap();
        assert!(committed_at > r.start_ts());
        assert_eq!(
            num(r.get(Y).await.unwrap()),
            50,
            "the snapshot changed under a reader"
        );
        let r2 = cl.begin().await.unwrap();
        assert_eq!(num(r2.get(X).await.unwrap()), 999);
        assert_eq!(num(r2.get(Y).await.unwrap()), 999);

        // Lost update: two read-modify-writes of one key; the second committer loses.
        let mut a = cl.begin().await.unwrap();
        let mut b = cl.begin().await.unwrap();
        let va = num(a.get(X).await.unwrap());
        let vb = num(b.get(X).await.unwrap());
        a.put(X.to_vec(), (va + 1).to_string().into_bytes())
            .unwrap();
        b.put(X.to_vec(), (vb + 1).to_string().into_bytes())
            .unwrap();
        a.commit().await.unwrap();
        match b.commit().await {
            Err(Error::WriteConflict { .. }) => {}
            other => panic!("lost update: second commit gave {other:?}"),
        }
        assert_eq!(num(cl.get(X).await.unwrap()), 1000);

        // Read skew: a snapshot sees all of a committed transaction or none of it.
        let mut t = cl.begin().await.unwrap();
        t.put(X.to_vec(), b"50".to_vec()).unwrap();
        t.put(Y.to_vec(), b"50".to_vec()).unwrap();
        t.commit().await.unwrap();
        let reader = cl.begin().await.unwrap();
        let x0 = num(reader.get(X).await.unwrap());
        let mut tr = cl.begin().await.unwrap();
        let (x, y) = (num(tr.get(X).await.unwrap()), num(tr.get(Y).await.unwrap()));
        tr.put(X.to_vec(), (x - 10).to_string().into_bytes())
            .unwrap();
        tr.put(Y.to_vec(), (y + 10).to_string().into_bytes())
            .unwrap();
        tr.commit().await.unwrap();
        let y0 = num(reader.get(Y).await.unwrap());
        assert_eq!(x0 + y0, 100, "read skew: {x0} + {y0}");
        assert_eq!((x0, y0), (50, 50));
        let snap = cl.scan(b"t/", b"t0", 0, false, false).await.unwrap();
        let total: i64 = snap.iter().map(|(_, v)| num(Some(v.clone()))).sum();
        assert_eq!(total, 100, "a scan saw part of a transaction");
    });
}

#[test]
fn write_skew_is_possible_under_snapshot_isolation() {
    let e = env();
    let (rt, cl) = (&e.rt, &e.cl);
    rt.block_on(async {
        // Invariant the application wants: x + y >= 1. Each transaction checks it on its
        // snapshot and writes a different key: snapshot isolation lets both commit.
        let mut t = cl.begin().await.unwrap();
        t.put(X.to_vec(), b"1".to_vec()).unwrap();
        t.put(Y.to_vec(), b"1".to_vec()).unwrap();
        t.commit().await.unwrap();
        let mut t1 = cl.begin().await.unwrap();
        let mut t2 = cl.begin().await.unwrap();
        for t in [&t1, &t2] {
            let (x, y) = (t.get(X).await.unwrap(), t.get(Y).await.unwrap());
            assert!(
                num(x.clone()) + num(y.clone()) >= 2,
                "a snapshot after the commit misses it: x {x:?}, y {y:?} (start_ts {})",
                t.start_ts()
            );
        }
        t1.put(X.to_vec(), b"0".to_vec()).unwrap();
        t2.put(Y.to_vec(), b"0".to_vec()).unwrap();
        t1.commit().await.unwrap();
        t2.commit().await.unwrap();
        assert_eq!(
            num(cl.get(X).await.unwrap()) + num(cl.get(Y).await.unwrap()),
            0,
            "write skew happened, as documented"
        );

        // Pessimistic mode, locking what is read, prevents it.
        let mut t = cl.begin().await.unwrap();
        t.put(X.to_vec(), b"1".to_vec()).unwrap();
        t.put(Y.to_vec(), b"1".to_vec()).unwrap();
        t.commit().await.unwrap();
        let opts = TxnOptions {
            pessimistic: true,
            ..Default::default()
        };
        let mut p1 = cl.begin_with(opts.clone()).await.unwrap();
        let mut p2 = cl.begin_with(opts).await.unwrap();
        let s1 =
            num(p1.get_for_update(X).await.unwrap()) + num(p1.get_for_update(Y).await.unwrap());
        assert_eq!(s1, 2);
        p1.put(X.to_vec(), b"0".to_vec()).unwrap();
        // p2 must wait for p1's locks; run it concurrently and let p1 commit first.
        let cl2 = cl.clone();
        let h = tokio::spawn(async move {
            let s2 =
                num(p2.get_for_update(X).await.unwrap()) + num(p2.get_for_update(Y).await.unwrap());
            if s2 >= 2 {
                p2.put(Y.to_vec(), b"0".to_vec()).unwrap();
            }
            let r = p2.commit().await;
            let _ = cl2;
            (s2, r.is_ok())
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        p1.commit().await.unwrap();
        let (s2, _) = h.await.unwrap();
        assert_eq!(s2, 1, "the second transaction saw the first one's write");
        assert!(num(cl.get(X).await.unwrap()) + num(cl.get(Y).await.unwrap()) >= 1);
    });
    drop(e.c);
}

#[test]
fn single_region_transactions_commit_in_one_phase_and_cas_is_atomic() {
    let e = env();
    let (rt, cl) = (&e.rt, &e.cl);
    rt.block_on(async {
        let mut t = cl.begin().await.unwrap();
        t.put(b"t/a1".to_vec(), b"1".to_vec()).unwrap();
        t.put(b"t/a2".to_vec(), b"2".to_vec()).unwrap();
        let ts = t.prewrite().await.unwrap();
        assert!(
            ts.is_some(),
            "keys in one region should commit in one phase"
        );
        assert_eq!(cl.get(b"t/a2").await.unwrap().as_deref(), Some(&b"2"[..]));
        // CAS from many tasks: exactly one wins each round.
        cl.put(b"t/c", b"0").await.unwrap();
        let mut handles = vec![];
        for _ in 0..8 {
            let cl = cl.clone();
            handles.push(tokio::spawn(async move {
                let mut wins = 0;
                for _ in 0..20 {
                    let cur = cl.get(b"t/c").await.unwrap().unwrap();
                    let n: u64 = String::from_utf8(cur.clone()).unwrap().parse().unwrap();
                    let (ok, _) = cl
                        .compare_and_swap(b"t/c", Some(&cur), Some((n + 1).to_string().as_bytes()))
                        .await
                        .unwrap();
                    if ok {
                        wins += 1;
                    }
                }
                wins
            }));
        }
        let mut total = 0;
        for h in handles {
            total += h.await.unwrap();
        }
        let final_v: u64 = String::from_utf8(cl.get(b"t/c").await.unwrap().unwrap())
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(final_v, total, "every successful CAS counted exactly once");
    });
}

/// 32 clients transfer between 100 accounts in ≥4 regions for 40 s while a store is killed
/// and restarted; a plain `kvctl scan bank/ bank0` never sees the total change.
#[test]
fn bank_transfers_survive_a_store_crash() {
    let secs: u64 = std::env::var("ATOLL_BANK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let mut e = env();
    let o =
        e.c.kvctl(&["split", "bank/000025", "bank/000050", "bank/000075"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Create the accounts first so that the checker sees the full total from the start.
    let o = e.c.kvctl(&[
        "bench",
        "bank",
        "--accounts",
        "100",
        "--clients",
        "1",
        "--duration",
        "0",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pd = e.c.pd_endpoints();
    let bench = std::process::Command::new(atoll_tests::procs::bin("kvctl"))
        .args([
            "--pd",
            &pd,
            "bench",
            "bank",
            "--accounts",
            "100",
            "--clients",
            "32",
            "--duration",
            &secs.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let mut checks = 0;
    let mut killed = false;
    let mut restarted = false;
    let victim = 1;
    while start.elapsed() < Duration::from_secs(secs) {
        let out = e.c.kvctl(&[
            "--output",
            "json",
            "--timeout",
            "10",
            "scan",
            "bank/",
            "bank0",
        ]);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let kvs = v["kvs"].as_array().unwrap();
            let total: u64 = kvs
                .iter()
                .map(|kv| kv["value"].as_str().unwrap().parse::<u64>().unwrap())
                .sum();
            assert_eq!(kvs.len(), 100);
            assert_eq!(total, 100 * 1000, "the total changed mid-run");
            checks += 1;
        }
        if !killed && start.elapsed() > Duration::from_secs(secs / 4) {
            e.c.stores[victim].proc_.kill();
            killed = true;
        }
        if killed && !restarted && start.elapsed() > Duration::from_secs(secs / 2) {
            e.c.stores[victim].proc_.start();
            restarted = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = bench.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "bench bank failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("bank: {report}; {checks} consistent scans");
    assert_eq!(report["consistent"], true);
    assert_eq!(report["total_before"], report["total_after"]);
    assert!(
        report["committed"].as_u64().unwrap() > 500,
        "only {} transfers",
        report["committed"]
    );
    assert!(checks > 10);
    let _ = &mut e;
}

/// Sum of one counter over every store's `/metrics` (absent = 0).
fn store_counter(c: &ProcCluster, name: &str) -> u64 {
    let mut total = 0;
    for s in &c.stores {
        let Ok((_, body)) = atoll_tests::procs::http(&s.status_addr, "GET", "/metrics", "") else {
            continue;
        };
        total += body
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
    }
    total
}

/// PD advances the GC safe point to `now - gc-life-time` by itself; stores drop the versions
/// below it (in bounded batches), reads below it fail with "snapshot too old", and the
/// newest versions stay. `kvctl gc --safe-point` only ever raises it.
#[test]
fn gc_drops_versions_below_the_safe_point() {
    let c = ProcCluster::start(ClusterOpts {
        pds: 1,
        stores: 3,
        pd_args: vec!["--gc-life-time".into(), "2s".into()],
        store_args: vec!["--gc-interval".into(), "1s".into()],
        ..Default::default()
    });
    c.wait_ready(Duration::from_secs(60));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cfg = ClientConfig::new(atoll_pd_client::rpc::parse_endpoints(&c.pd_endpoints()));
    let cl = rt.block_on(Client::connect(cfg)).unwrap();
    let keys: Vec<Vec<u8>> = (0..200)
        .map(|i| format!("gc/{i:04}").into_bytes())
        .collect();
    let old = rt.block_on(async {
        let mut old = 0;
        for v in 0..5 {
            let pairs: Vec<(Vec<u8>, Vec<u8>)> = keys
                .iter()
                .map(|k| (k.clone(), format!("v{v}").into_bytes()))
                .collect();
            cl.batch_put(&pairs).await.unwrap();
            if v == 0 {
                old = cl.tso().await.unwrap();
                assert_eq!(
                    cl.get_at(&keys[7], old).await.unwrap().as_deref(),
                    Some(&b"v0"[..])
                );
            }
        }
        old
    });
    // 4 old versions of 200 keys: at least 800 deletes once the safe point passes them.
    let ok = atoll_tests::wait_until(Duration::from_secs(60), || {
        store_counter(&c, "atoll_gc_deletes_total") >= 800
    });
    let deletes = store_counter(&c, "atoll_gc_deletes_total");
    assert!(ok, "GC removed only {deletes} versions");
    let sp = c.kvctl_json(&["gc"])["safe_point"].as_u64().unwrap();
    assert!(sp > old, "safe point {sp} not past {old}");
    rt.block_on(async {
        match cl.get_at(&keys[7], old).await {
            Err(e) => assert!(e.to_string().contains("snapshot too old"), "{e}"),
            Ok(v) => panic!("read below the safe point answered {v:?}"),
        }
        let all = cl.scan(b"gc/", b"gc0", 0, false, false).await.unwrap();
        assert_eq!(all.len(), 200);
        assert!(all.iter().all(|(_, v)| v == b"v4"), "newest versions lost");
    });
    // Lowering is refused (the answer is the current safe point).
    let low = c.kvctl_json(&["gc", "--safe-point", "1"])["safe_point"]
        .as_u64()
        .unwrap();
    assert!(low >= sp);
    eprintln!("gc: {deletes} deletes, safe point {sp}");
}

#[test]
fn one_phase_commit_on_a_stale_region_cache_stays_atomic() {
    let e = env_one_region();
    let (rt, cl) = (&e.rt, &e.cl);
    rt.block_on(async {
        // The client caches one region holding both keys...
        assert_eq!(cl.get(X).await.unwrap(), None);
        assert_eq!(cl.get(Y).await.unwrap(), None);
    });
    // ...which another process splits between them.
    split(&e.c, "t/m");
    rt.block_on(async {
        // The client tries one phase on its stale view; the store refuses, and the keys end up
        // in two regions: the transaction must commit in two phases, both keys or neither.
        let mut t = cl.begin().await.unwrap();
        t.put(X.to_vec(), b"1".to_vec()).unwrap();
        t.put(Y.to_vec(), b"1".to_vec()).unwrap();
        t.commit().await.unwrap();
        let r = cl.begin().await.unwrap();
        let (x, y) = (r.get(X).await.unwrap(), r.get(Y).await.unwrap());
        assert_eq!(
            (x.as_deref(), y.as_deref()),
            (Some(&b"1"[..]), Some(&b"1"[..])),
            "a committed transaction is half there"
        );
    });
}
