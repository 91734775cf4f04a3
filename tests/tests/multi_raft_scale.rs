//! The batched Multi-Raft store at scale: 1,000 regions on 3 in-process stores.
//! (Acceptance: writes cost poll rounds, not regions; idle regions cost little CPU.)
//! These tests run one at a time: they measure CPU.

use atoll_test_cluster::{test_config, wait_until, Cluster};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

/// Production tick (100ms): 1,000 awake regions on a 2-core test machine need it.
fn cluster() -> Cluster {
    let mut cfg = test_config();
    cfg.raft_base_tick_interval = atoll_util::config::ReadableDuration::millis(100);
    let mut c = Cluster::with_config(3, cfg);
    c.run();
    c
}

/// Splits the single region into `n` regions at once.
fn make_regions(c: &Cluster, n: usize) -> Vec<Vec<u8>> {
    let points: Vec<Vec<u8>> = (1..n).map(|i| format!("r{i:05}").into_bytes()).collect();
    let refs: Vec<&[u8]> = points.iter().map(|p| p.as_slice()).collect();
    c.must_split(&refs);
    assert!(
        wait_until(Duration::from_secs(120), || c.regions_with_leaders() >= n),
        "only {} of {n} regions have leaders",
        c.regions_with_leaders()
    );
    let mut keys = vec![b"r".to_vec()];
    keys.extend(points.into_iter().map(|mut p| {
        p.push(b'x');
        p
    }));
    keys
}

#[test]
fn one_write_per_region_costs_rounds_not_regions() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = cluster();
    let keys = make_regions(&c, 1000);
    // Let elections and their writes settle: every region has a leader (under load that
    // takes longer than the pause alone), then a pause for their first writes.
    let all_led = wait_until(Duration::from_secs(60), || {
        keys.iter()
            .all(|k| c.leader_store(c.get_region(k).id).is_some())
    });
    assert!(
        all_led,
        "regions without a leader a minute after the splits"
    );
    std::thread::sleep(Duration::from_millis(500));
    let before: Vec<u64> = c
        .store_ids
        .iter()
        .map(|s| c.router(*s).metrics().synced_write_batches())
        .collect();
    // One concurrent write to every region, each through its leader.
    let mut waits = vec![];
    for k in &keys {
        let region = c.get_region(k);
        let leader = c.leader_store(region.id).expect("leader");
        let cmd = atoll_proto::raft_cmdpb::RaftCmdRequest {
            header: Some(atoll_proto::raft_cmdpb::RaftRequestHeader {
                region_id: region.id,
                peer: None,
                region_epoch: region.region_epoch,
                keys: vec![],
            }),
            requests: vec![atoll_proto::raft_cmdpb::Request {
                cmd_type: atoll_proto::raft_cmdpb::CmdType::Put as i32,
                put: Some(atoll_proto::raft_cmdpb::PutRequest {
                    cf: "default".into(),
                    key: atoll_keys::data_key(k),
                    value: b"v".to_vec(),
                }),
                ..Default::default()
            }],
            admin_request: None,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        c.router(leader).propose(
            cmd,
            Box::new(move |r| {
                let _ = tx.send(r.is_ok());
            }),
        );
        waits.push(rx);
    }
    for w in waits {
        assert!(
            w.recv_timeout(Duration::from_secs(30)).unwrap(),
            "a write failed"
        );
    }
    // Followers persist what they received too.
    for k in keys.iter().step_by(97) {
        c.must_replicated(k, b"v", Duration::from_secs(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    for (i, s) in c.store_ids.iter().enumerate() {
        let after = c.router(*s).metrics().synced_write_batches();
        let used = after - before[i];
        eprintln!("store {s}: {used} synced write batches for 1000 writes in 1000 regions");
        assert!(used <= 50, "store {s} used {used} synced write batches");
    }
}

#[test]
fn a_thousand_idle_regions_cost_little_cpu() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = cluster();
    make_regions(&c, 1000);
    // Idle regions hibernate.
    assert!(
        wait_until(Duration::from_secs(60), || c
            .store_ids
            .iter()
            .all(|s| c.router(*s).awake_count() == 0)),
        "regions still awake: {:?}",
        c.store_ids
            .iter()
            .map(|s| c.router(*s).awake_count())
            .collect::<Vec<_>>()
    );
    let cpu0 = atoll_util::sys::process_cpu_time();
    let hb0 = c.pd.heartbeats.load(std::sync::atomic::Ordering::Relaxed);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    let cpu = atoll_util::sys::process_cpu_time() - cpu0;
    let frac = cpu.as_secs_f64() / t0.elapsed().as_secs_f64();
    let heartbeats = c.pd.heartbeats.load(std::sync::atomic::Ordering::Relaxed) - hb0;
    eprintln!(
        "1000 idle regions on 3 stores: {:.2}% of one core, {heartbeats} region heartbeats \
         over {:?}",
        frac * 100.0,
        t0.elapsed()
    );
    assert!(frac < 0.15, "idle cost {:.1}% of a core", frac * 100.0);
    // Unchanged regions do not report (five pd-heartbeat-intervals of 2 s passed: reporting
    // on a clock would be 5,000).
    assert!(
        heartbeats < 100,
        "{heartbeats} heartbeats from idle regions in 10 s"
    );
    // And they wake for work.
    c.must_put(b"r00500x", b"awake");
    c.must_get_equal(b"r00500x", b"awake");
}
