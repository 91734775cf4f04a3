//! Answers from a leader that was deposed without knowing it yet.
//!
//! A leader cut off from its peers believes it leads until its quorum check fails (up to two
//! election timeouts; for ever, if it was asleep and nothing wakes it). Meanwhile the others
//! elect a new leader, which commits writes. Every answer the old one gives must still be
//! linearizable — reads, and also writes that turn out to write nothing (a compare-and-swap
//! whose expected value does not match, a delete of a key it thinks absent): it must refuse
//! (not leader) or answer with the new state, never with its own stale one.
//!
//! - `deposed_leader_does_not_answer_from_stale_state`: regions awake; the old leader is
//!   frozen (SIGSTOP) and cut off (transport failpoints) while the others elect and write,
//!   then thawed and asked at once, inside the window where it still believes it leads.
//! - `sleeping_deposed_leader_does_not_answer_from_stale_state`: the region is hibernating
//!   when its leader's store is cut off; the followers notice the silent store, wake and
//!   elect; the old leader, still asleep and still "leader", wakes to the requests (waking
//!   is not hearing from a quorum: no lease, no answer without a ReadIndex round).
//! - `abandoned_write_keeps_its_keys_latched_until_applied`: a write whose client gave up is
//!   still in the log; until it applies, a later command on its keys must not decide on the
//!   state from before it.

use atoll_proto::kvrpcpb::kv_client::KvClient;
use atoll_proto::kvrpcpb::{CompareAndSwapRequest, Context, DeleteRequest, GetRequest};
use atoll_proto::metapb;
use atoll_raftstore::failpoints as rfp;
use atoll_tests::procs::{remove_failpoint, set_failpoint, status_json, ClusterOpts, ProcCluster};
use atoll_tests::{runtime, wait_until};
use serde_json::Value;
use std::time::{Duration, Instant};

fn start(hibernate: bool, dir: &tempfile::TempDir) -> ProcCluster {
    let cfg = dir.path().join("store.toml");
    std::fs::write(
        &cfg,
        // auth-cache-ttl: the only region also holds the auth records, and a store confirming
        // its auth cache after the isolation would read them through the deposed leader first
        // (its region cache still names it), waking it before the test asks it anything.
        format!(
            "auth-cache-ttl = \"10m\"\n[raftstore]\nhibernate-regions = {hibernate}\nhibernate-after-ticks = 10\n"
        ),
    )
    .unwrap();
    let c = ProcCluster::start(ClusterOpts {
        pds: 1,
        stores: 3,
        store_args: vec!["--config".into(), cfg.display().to_string()],
        ..Default::default()
    });
    c.wait_ready(Duration::from_secs(60));
    assert!(
        wait_until(Duration::from_secs(60), || region(&c).is_some_and(|r| r
            ["peers"]
            .as_array()
            .is_some_and(|p| p.len() == 3)
            && r["leader"].is_object())),
        "the region never got 3 peers and a leader"
    );
    c
}

/// The only region, as PD reports it.
fn region(c: &ProcCluster) -> Option<Value> {
    let o = c.kvctl(&["--output", "json", "regions"]);
    if !o.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&o.stdout).ok()?;
    v["regions"].as_array()?.first().cloned()
}

fn leader_store(r: &Value) -> Option<u64> {
    r["leader"]["store_id"].as_u64()
}

/// The request context for the region's peer on `store_id`.
fn context(r: &Value, store_id: u64) -> Context {
    let peer = r["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["store_id"].as_u64() == Some(store_id))
        .expect("a peer on that store");
    Context {
        region_id: r["id"].as_u64().unwrap(),
        region_epoch: Some(metapb::RegionEpoch {
            conf_ver: r["epoch"]["conf_ver"].as_u64().unwrap(),
            version: r["epoch"]["version"].as_u64().unwrap(),
        }),
        peer: Some(metapb::Peer {
            id: peer["id"].as_u64().unwrap(),
            store_id,
            role: 0,
        }),
        ..Default::default()
    }
}

fn tso(c: &ProcCluster) -> u64 {
    c.kvctl_json(&["tso"])["ts"].as_u64().expect("a timestamp")
}

fn must_put(c: &ProcCluster, key: &str, value: &str) {
    let o = c.kvctl(&["--timeout", "20", "put", key, value]);
    assert!(
        o.status.success(),
        "put {key}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn get(c: &ProcCluster, key: &str) -> Option<String> {
    c.kvctl_json(&["--timeout", "20", "get", key])["value"]
        .as_str()
        .map(str::to_string)
}

/// What the old leader answered to the three requests.
struct Answers {
    cas: atoll_proto::kvrpcpb::CompareAndSwapResponse,
    del: atoll_proto::kvrpcpb::DeleteResponse,
    get: atoll_proto::kvrpcpb::GetResponse,
}

/// Sends a compare-and-swap that cannot match, a delete of a key the new leader wrote, and a
/// read, straight to the old leader's store, concurrently.
fn ask_old_leader(c: &ProcCluster, old: usize, ctx: &Context, ts: [u64; 2]) -> Answers {
    let rt = runtime();
    let addr = format!("http://{}", c.stores[old].addr);
    rt.block_on(async move {
        let mut k1 = KvClient::connect(addr)
            .await
            .expect("connect to the old leader");
        let mut k2 = k1.clone();
        let mut k3 = k1.clone();
        let cas = k1.kv_compare_and_swap(CompareAndSwapRequest {
            context: Some(ctx.clone()),
            key: b"cas".to_vec(),
            expected: b"no such value".to_vec(),
            expect_absent: false,
            value: b"C".to_vec(),
            delete: false,
            start_version: ts[0],
        });
        let del = k2.kv_delete(DeleteRequest {
            context: Some(ctx.clone()),
            key: b"del".to_vec(),
            start_version: ts[1],
        });
        let get = k3.kv_get(GetRequest {
            context: Some(ctx.clone()),
            key: b"cas".to_vec(),
            version: 0,
        });
        let limit = Duration::from_secs(20);
        let (cas, del, get) = tokio::join!(
            tokio::time::timeout(limit, cas),
            tokio::time::timeout(limit, del),
            tokio::time::timeout(limit, get)
        );
        Answers {
            cas: cas.expect("cas answered").expect("cas rpc").into_inner(),
            del: del
                .expect("delete answered")
                .expect("delete rpc")
                .into_inner(),
            get: get.expect("get answered").expect("get rpc").into_inner(),
        }
    })
}

fn report(a: &Answers) {
    eprintln!(
        "the old leader's answers: cas region_error={:?} succeeded={} previous={:?}; delete region_error={:?} commit_version={}; get region_error={:?} value={:?}",
        a.cas.region_error.as_ref().map(|e| &e.message),
        a.cas.succeeded,
        String::from_utf8_lossy(&a.cas.previous_value),
        a.del.region_error.as_ref().map(|e| &e.message),
        a.del.commit_version,
        a.get.region_error.as_ref().map(|e| &e.message),
        String::from_utf8_lossy(&a.get.value),
    );
}

fn check_answers(a: &Answers) {
    // The compare-and-swap: refused, or failed against the new value.
    let cas_ok = a.cas.region_error.is_some()
        || a.cas.error.is_some()
        || (!a.cas.succeeded && a.cas.previous_value == b"B");
    assert!(
        cas_ok,
        "the deposed leader answered a compare-and-swap from stale state: succeeded={} previous={:?} (the new leader had written \"B\")",
        a.cas.succeeded,
        String::from_utf8_lossy(&a.cas.previous_value)
    );
    // The delete of a key the new leader wrote: the old one cannot delete it (its proposal
    // cannot commit), so only a refusal is correct.
    assert!(
        a.del.region_error.is_some() || a.del.error.is_some(),
        "the deposed leader answered \"deleted\" (commit_version {}) for a key the new leader had written",
        a.del.commit_version
    );
    let get_ok = a.get.region_error.is_some() || a.get.error.is_some() || a.get.value == b"B";
    assert!(
        get_ok,
        "the deposed leader served a stale read: {:?}",
        String::from_utf8_lossy(&a.get.value)
    );
}

/// Cuts store `i` off from every other store (both directions, keep-alives included), while
/// clients and PD still reach it.
fn isolate(c: &ProcCluster, i: usize) {
    set_failpoint(&c.stores[i].status_addr, "transport::send_drop", "return");
    set_failpoint(&c.stores[i].status_addr, "transport::recv_drop", "return");
}

fn heal(c: &ProcCluster, i: usize) {
    remove_failpoint(&c.stores[i].status_addr, "transport::send_drop");
    remove_failpoint(&c.stores[i].status_addr, "transport::recv_drop");
}

/// PD names a leader on another store than `old`.
fn wait_new_leader(c: &ProcCluster, old_id: u64, timeout: Duration) -> Value {
    let mut last = None;
    let ok = wait_until(timeout, || {
        last = region(c);
        last.as_ref()
            .and_then(leader_store)
            .is_some_and(|s| s != old_id)
    });
    if !ok {
        c.dump_logs();
    }
    assert!(ok, "no new leader elected: {last:?}");
    last.unwrap()
}

fn finish(c: &ProcCluster, old: usize) {
    heal(c, old);
    // Healed: the old leader follows again, and the new values stand.
    assert_eq!(get(c, "cas").as_deref(), Some("B"));
    assert_eq!(get(c, "del").as_deref(), Some("X"));
    must_put(c, "after", "1");
    assert_eq!(get(c, "after").as_deref(), Some("1"));
}

/// A 3-store cluster with "cas" = "A", its leader's store (id, index), a request context
/// for the leader's peer, and two start timestamps for the requests to come.
struct Setup {
    _dir: tempfile::TempDir,
    c: ProcCluster,
    old_id: u64,
    old: usize,
    ctx: Context,
    ts: [u64; 2],
}

fn setup(hibernate: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let c = start(hibernate, &dir);
    must_put(&c, "cas", "A");
    let r = region(&c).unwrap();
    let old_id = leader_store(&r).unwrap();
    let old = c.store_index_of(old_id).expect("leader's store");
    let ctx = context(&r, old_id);
    let ts = [tso(&c), tso(&c)];
    Setup {
        _dir: dir,
        c,
        old_id,
        old,
        ctx,
        ts,
    }
}

#[test]
fn deposed_leader_does_not_answer_from_stale_state() {
    let s = setup(false);
    let (c, old_id, old) = (&s.c, s.old_id, s.old);
    // Cut the leader off, then freeze it: when it thaws it still believes it leads for up to
    // two election timeouts (its ticker does not catch up in a burst), and hears nothing
    // that would tell it otherwise (what the new leader sent meanwhile is dropped).
    isolate(c, old);
    c.stores[old].proc_.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    let new = wait_new_leader(c, old_id, Duration::from_secs(30));
    must_put(c, "cas", "B");
    must_put(c, "del", "X");
    c.stores[old].proc_.signal(libc::SIGCONT);
    let a = ask_old_leader(c, old, &s.ctx, s.ts);
    eprintln!(
        "frozen {:?}; new leader on store {:?}",
        frozen.elapsed(),
        leader_store(&new)
    );
    report(&a);
    check_answers(&a);
    finish(c, old);
}

#[test]
fn sleeping_deposed_leader_does_not_answer_from_stale_state() {
    let s = setup(true);
    let (c, old_id, old) = (&s.c, s.old_id, s.old);
    // Everything asleep.
    let asleep = wait_until(Duration::from_secs(30), || {
        c.stores.iter().all(|s| {
            status_json(&s.status_addr).is_some_and(|v| v["awake_regions"].as_u64() == Some(0))
        })
    });
    assert!(asleep, "the region never hibernated");
    isolate(c, old);
    // The followers' stores stop hearing from the old leader's store, wake and elect.
    let new = wait_new_leader(c, old_id, Duration::from_secs(40));
    must_put(c, "cas", "B");
    must_put(c, "del", "X");
    let old_status = status_json(&c.stores[old].status_addr).unwrap();
    assert_eq!(
        old_status["leaders"].as_u64(),
        Some(1),
        "the old leader should still be asleep and believe it leads: {old_status}"
    );
    let a = ask_old_leader(c, old, &s.ctx, s.ts);
    eprintln!("new leader on store {:?}", leader_store(&new));
    report(&a);
    check_answers(&a);
    finish(c, old);
}

/// A compare-and-swap A→B whose client gives up (deadline; the server drops the handler)
/// while apply is paused on the leader (`raftstore::before_apply`) is still committed and
/// will apply. A second compare-and-swap A→C sent meanwhile must wait for it (the keys stay
/// latched until the first applies) and then fail against B. Before the fix the latch went
/// with the dropped handler: the second decided on the snapshot from before B, and both
/// answered "swapped from A" (the final value C).
#[test]
fn abandoned_write_keeps_its_keys_latched_until_applied() {
    let s = setup(false);
    let c = &s.c;
    let leader = &c.stores[s.old];
    let addr = format!("http://{}", leader.addr);
    let status = leader.status_addr.clone();
    let cas = |value: &[u8], ts: u64| CompareAndSwapRequest {
        context: Some(s.ctx.clone()),
        key: b"cas".to_vec(),
        expected: b"A".to_vec(),
        expect_absent: false,
        value: value.to_vec(),
        delete: false,
        start_version: ts,
    };
    let (first, second) = (cas(b"B", s.ts[0]), cas(b"C", s.ts[1]));
    set_failpoint(&status, rfp::BEFORE_APPLY, "pause");
    let rt = runtime();
    let second = rt.block_on(async move {
        let k = KvClient::connect(addr)
            .await
            .expect("connect to the leader");
        let mut req = tonic::Request::new(first);
        req.set_timeout(Duration::from_secs(1));
        let abandoned =
            tokio::time::timeout(Duration::from_secs(2), k.clone().kv_compare_and_swap(req)).await;
        assert!(
            !matches!(abandoned, Ok(Ok(_))),
            "the first compare-and-swap answered with apply paused: {abandoned:?}"
        );
        let mut k2 = k.clone();
        let second = tokio::spawn(async move { k2.kv_compare_and_swap(second).await });
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::task::spawn_blocking(move || remove_failpoint(&status, rfp::BEFORE_APPLY))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(20), second)
            .await
            .expect("the second compare-and-swap answered")
            .unwrap()
    });
    match second {
        Ok(r) => {
            let r = r.into_inner();
            eprintln!(
                "second compare-and-swap: region_error={:?} error={:?} succeeded={} previous={:?}",
                r.region_error.as_ref().map(|e| &e.message),
                r.error,
                r.succeeded,
                String::from_utf8_lossy(&r.previous_value)
            );
            assert!(
                r.region_error.is_some()
                    || r.error.is_some()
                    || (!r.succeeded && r.previous_value == b"B"),
                "the second compare-and-swap decided on the state from before the abandoned one: succeeded={} previous={:?}",
                r.succeeded,
                String::from_utf8_lossy(&r.previous_value)
            );
        }
        Err(e) => eprintln!("second compare-and-swap refused: {e}"),
    }
    // The abandoned write applied; nothing overwrote it.
    assert_eq!(get(c, "cas").as_deref(), Some("B"));
}
