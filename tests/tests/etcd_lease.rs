//! etcd leases on real processes (issue: leases, election and locks): etcdctl 3.4's lease
//! commands and `put --lease`, the gateway's `/v3/lease/*`, revocation at one revision, and a
//! registered service killed with `kill -9` disappearing within its TTL.

use atoll_proto::etcdserverpb::lease_client::LeaseClient;
use atoll_proto::etcdserverpb::watch_client::WatchClient;
use atoll_proto::etcdserverpb::watch_request::RequestUnion;
use atoll_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest, PutRequest, RangeRequest,
    WatchCreateRequest, WatchRequest,
};
use atoll_proto::mvccpb::event::EventType;
use atoll_tests::etcd_watch::{channel, kv_client};
use atoll_tests::procs::{etcdctl, http, regions_healthy, ClusterOpts, ProcCluster};
use atoll_tests::wait_until;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "etcdctl failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn three_stores() -> (ProcCluster, String) {
    let c = ProcCluster::start(ClusterOpts {
        pds: 1,
        stores: 3,
        ..Default::default()
    });
    c.wait_ready(Duration::from_secs(60));
    let ok = wait_until(Duration::from_secs(60), || {
        regions_healthy(&c.kvctl_json(&["regions"]), 3)
    });
    assert!(
        ok,
        "regions never reached 3 peers: {}",
        c.kvctl_json(&["regions"])
    );
    let endpoints = c
        .stores
        .iter()
        .map(|s| s.addr.clone())
        .collect::<Vec<_>>()
        .join(",");
    (c, endpoints)
}

/// The hex lease id etcdctl prints in `lease 694d7a3f1b2c granted with TTL(10s)`.
fn granted_id(out: &str) -> String {
    out.split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no lease id in {out:?}"))
        .to_string()
}

fn get_keys(endpoints: &str, prefix: &str) -> Vec<String> {
    let out = ok(&etcdctl(
        endpoints,
        &["get", prefix, "--prefix", "--keys-only"],
    ));
    out.lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

#[test]
fn etcdctl_lease_commands_and_gateway() {
    let (c, ep) = three_stores();

    // grant / put --lease / timetolive --keys / keep-alive --once / list.
    let out = ok(&etcdctl(&ep, &["lease", "grant", "60"]));
    assert!(out.contains("granted with TTL(60s)"), "{out}");
    let id = granted_id(&out);
    ok(&etcdctl(&ep, &["put", "/svc/a", "1", "--lease", &id]));
    ok(&etcdctl(&ep, &["put", "/svc/b", "2", "--lease", &id]));
    ok(&etcdctl(&ep, &["put", "/svc/c", "3"]));
    let ttl = ok(&etcdctl(&ep, &["lease", "timetolive", &id, "--keys"]));
    assert!(ttl.contains("granted with TTL(60s)"), "{ttl}");
    assert!(
        ttl.contains("/svc/a") && ttl.contains("/svc/b") && !ttl.contains("/svc/c"),
        "{ttl}"
    );
    let ka = ok(&etcdctl(&ep, &["lease", "keep-alive", "--once", &id]));
    assert!(
        ka.contains(&format!("lease {id} keepalived with TTL(60)")),
        "{ka}"
    );
    let list = ok(&etcdctl(&ep, &["lease", "list"]));
    assert!(list.contains(&id), "{list}");
    // A key put again without the lease leaves it.
    ok(&etcdctl(&ep, &["put", "/svc/b", "2b"]));
    let ttl = ok(&etcdctl(&ep, &["lease", "timetolive", &id, "--keys"]));
    assert!(ttl.contains("/svc/a") && !ttl.contains("/svc/b"), "{ttl}");

    // revoke: its keys go, the others stay; a second revoke is "not found".
    ok(&etcdctl(&ep, &["lease", "revoke", &id]));
    assert_eq!(get_keys(&ep, "/svc/"), vec!["/svc/b", "/svc/c"]);
    let o = etcdctl(&ep, &["lease", "revoke", &id]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("requested lease not found"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let ttl = ok(&etcdctl(&ep, &["lease", "timetolive", &id]));
    assert!(ttl.contains("already expired"), "{ttl}");
    // A put with a lease that does not exist is refused and writes nothing.
    let o = etcdctl(&ep, &["put", "/svc/d", "4", "--lease", &id]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("requested lease not found"));
    assert_eq!(get_keys(&ep, "/svc/"), vec!["/svc/b", "/svc/c"]);

    // The minimum TTL, and a client-chosen id (taken twice: "lease already exists").
    let out = ok(&etcdctl(&ep, &["lease", "grant", "1"]));
    assert!(out.contains("granted with TTL(2s)"), "{out}");
    let addr = &c.stores[1].addr;
    let (code, body) = http(
        addr,
        "POST",
        "/v3/lease/grant",
        r#"{"TTL":"30","ID":"4660"}"#,
    )
    .expect("gateway grant");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ID"], "4660", "{body}");
    assert_eq!(v["TTL"], "30", "{body}");
    let (code, body) =
        http(addr, "POST", "/v3/lease/grant", r#"{"TTL":30,"ID":4660}"#).expect("gateway grant");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("lease already exists"), "{body}");
    let (code, body) = http(addr, "POST", "/v3/lease/keepalive", r#"{"ID":"4660"}"#).unwrap();
    assert_eq!(code, 200, "{body}");
    // A streamed answer (chunked): its one JSON line.
    let line = body
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("a JSON line");
    let line: Value = serde_json::from_str(line).unwrap();
    assert_eq!(line["result"]["TTL"], "30", "{body}");
    let (code, body) = http(
        addr,
        "POST",
        "/v3/lease/timetolive",
        r#"{"ID":"4660","keys":true}"#,
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["grantedTTL"], "30", "{body}");
    let (code, body) = http(addr, "POST", "/v3/lease/leases", "{}").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"4660\""), "{body}");
    let (code, body) = http(addr, "POST", "/v3/lease/revoke", r#"{"ID":"4660"}"#).unwrap();
    assert_eq!(code, 200, "{body}");
    let (code, body) = http(addr, "POST", "/v3/lease/revoke", r#"{"ID":"4660"}"#).unwrap();
    assert_eq!(code, 404, "{body}");

    // The system key space is not the user's: not listed, not deleted by "every key".
    let id = granted_id(&ok(&etcdctl(&ep, &["lease", "grant", "60"])));
    ok(&etcdctl(&ep, &["put", "/svc/e", "5", "--lease", &id]));
    let all = ok(&etcdctl(&ep, &["get", "", "--from-key", "--keys-only"]));
    assert!(all.lines().all(|l| !l.contains("atoll/")), "{all}");
    ok(&etcdctl(&ep, &["del", "", "--from-key"]));
    assert!(get_keys(&ep, "").is_empty());
    let list = ok(&etcdctl(&ep, &["lease", "list"]));
    assert!(
        list.contains(&id),
        "the lease went with the user's keys: {list}"
    );
    let ka = ok(&etcdctl(&ep, &["lease", "keep-alive", "--once", &id]));
    assert!(ka.contains("TTL(60)"), "{ka}");
    drop(c);
}

/// Revoking a lease deletes all its keys at one revision, in whatever regions they are.
#[test]
fn revoke_deletes_every_key_at_one_revision() {
    let (c, _) = three_stores();
    // Keys in several regions.
    let o = c.kvctl(&["split", "/r/3", "/r/6"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let addr = c.stores[0].addr.clone();
    let rt = atoll_tests::runtime();
    rt.block_on(async {
        let mut lease = LeaseClient::new(channel(&addr));
        let mut kv = kv_client(&addr);
        let id = lease
            .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
            .await
            .unwrap()
            .into_inner()
            .id;
        for i in 0..9 {
            kv.put(PutRequest {
                key: format!("/r/{i}").into_bytes(),
                value: b"v".to_vec(),
                lease: id,
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let rev = kv
            .range(RangeRequest {
                key: b"/r/".to_vec(),
                range_end: b"/r0".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(rev.kvs.len(), 9);
        assert!(rev.kvs.iter().all(|kv| kv.lease == id));
        let from = rev.header.unwrap().revision + 1;
        let mut w = WatchClient::new(channel(&addr));
        let (tx, rx) = futures::channel::mpsc::unbounded::<WatchRequest>();
        tx.unbounded_send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: b"/r/".to_vec(),
                range_end: b"/r0".to_vec(),
                start_revision: from,
                ..Default::default()
            })),
        })
        .unwrap();
        let mut inbound = w.watch(rx).await.unwrap().into_inner();
        let revoked = lease
            .lease_revoke(LeaseRevokeRequest { id })
            .await
            .unwrap()
            .into_inner()
            .header
            .unwrap()
            .revision;
        let mut deletes = vec![];
        let deadline = Instant::now() + Duration::from_secs(20);
        while deletes.len() < 9 && Instant::now() < deadline {
            let Ok(Ok(Some(m))) =
                tokio::time::timeout(Duration::from_secs(20), inbound.message()).await
            else {
                break;
            };
            for e in m.events {
                assert_eq!(e.r#type(), EventType::Delete, "{e:?}");
                deletes.push(e.kv.unwrap().mod_revision);
            }
        }
        assert_eq!(deletes.len(), 9, "{deletes:?}");
        assert!(
            deletes.iter().all(|r| *r == revoked),
            "{deletes:?} vs {revoked}"
        );
        let ttl = lease
            .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: true })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ttl.ttl, -1);
        drop(tx);
    });
    drop(c);
}

/// Acceptance (b): a service registered with a lease and kept alive by its own process is
/// killed with `kill -9`; its key vanishes from a prefix read, and a watcher sees the delete,
/// within TTL + 1 s of the kill (no later than TTL + 1 s after its last keep-alive).
#[test]
fn killed_service_disappears_within_ttl() {
    let (c, ep) = three_stores();
    const TTL: u64 = 3;
    let id = granted_id(&ok(&etcdctl(&ep, &["lease", "grant", &TTL.to_string()])));
    ok(&etcdctl(
        &ep,
        &["put", "/services/web/1", "10.0.0.1:80", "--lease", &id],
    ));
    // The service's own keep-alive.
    let mut service = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={ep}"))
        .args(["lease", "keep-alive", &id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcdctl keep-alive");
    // A watcher of the prefix, timestamping what it sees.
    let mut watcher = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={ep}"))
        .args(["watch", "/services/", "--prefix"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcdctl watch");
    let seen: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let out = watcher.stdout.take().unwrap();
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            s2.lock().unwrap().push((Instant::now(), line));
        }
    });
    // Kept alive: the key outlives its TTL several times over.
    std::thread::sleep(Duration::from_secs(3 * TTL));
    assert_eq!(get_keys(&ep, "/services/"), vec!["/services/web/1"]);
    assert!(
        seen.lock().unwrap().is_empty(),
        "{:?}",
        seen.lock().unwrap()
    );

    unsafe { libc::kill(service.id() as i32, libc::SIGKILL) };
    let killed = Instant::now();
    let _ = service.wait();
    let limit = Duration::from_secs(TTL + 1);
    let mut gone_at = None;
    while killed.elapsed() < limit + Duration::from_secs(5) {
        if get_keys(&ep, "/services/").is_empty() {
            gone_at = Some(killed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let gone = gone_at.expect("the key never went");
    assert!(
        gone <= limit,
        "the key went {gone:?} after the kill (limit {limit:?})"
    );
    let ok_watch = wait_until(Duration::from_secs(5), || {
        seen.lock().unwrap().iter().any(|(_, l)| l == "DELETE")
    });
    assert!(
        ok_watch,
        "the watcher saw no delete: {:?}",
        seen.lock().unwrap()
    );
    let at = seen
        .lock()
        .unwrap()
        .iter()
        .find(|(_, l)| l == "DELETE")
        .map(|(t, _)| t.duration_since(killed))
        .unwrap();
    assert!(
        at <= limit,
        "the watcher saw the delete {at:?} after the kill"
    );
    eprintln!("killed service: key gone after {gone:?}, watcher saw the delete after {at:?}");
    let _ = watcher.kill();
    let _ = watcher.wait();
    drop(c);
}

/// The lease's owner killed, one store after another (so the owner of each lease is killed at
/// least once): a kept-alive lease never loses its key, and an idle long lease is not reset
/// to its full TTL by the failover (its remaining time was checkpointed; with
/// `--lease-checkpoint-interval 2s` here).
#[test]
fn failover_neither_expires_early_nor_resets_long_leases() {
    let c = ProcCluster::start(ClusterOpts {
        pds: 1,
        stores: 3,
        store_args: vec!["--lease-checkpoint-interval".into(), "2s".into()],
        ..Default::default()
    });
    c.wait_ready(Duration::from_secs(60));
    assert!(wait_until(Duration::from_secs(60), || {
        regions_healthy(&c.kvctl_json(&["regions"]), 3)
    }));
    let mut c = c;
    let ep = c
        .stores
        .iter()
        .map(|s| s.addr.clone())
        .collect::<Vec<_>>()
        .join(",");
    const LONG: i64 = 30;
    let long = granted_id(&ok(&etcdctl(&ep, &["lease", "grant", &LONG.to_string()])));
    ok(&etcdctl(&ep, &["put", "/fo/long", "x", "--lease", &long]));
    let kept = granted_id(&ok(&etcdctl(&ep, &["lease", "grant", "6"])));
    ok(&etcdctl(&ep, &["put", "/fo/kept", "y", "--lease", &kept]));
    let mut keeper = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={ep}"))
        .args(["lease", "keep-alive", &kept])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcdctl keep-alive");
    // The long lease goes idle long enough to be checkpointed (more than once).
    std::thread::sleep(Duration::from_secs(6));
    let remaining = |c: &ProcCluster| -> Option<i64> {
        let out = etcdctl(&ep_of(c), &["lease", "timetolive", &long]);
        let s = String::from_utf8_lossy(&out.stdout).to_string();
        let r = s
            .split("remaining(")
            .nth(1)?
            .split('s')
            .next()?
            .parse()
            .ok()?;
        Some(r)
    };
    let before = remaining(&c).expect("the long lease lives");
    assert!(before <= LONG - 5, "{before}");
    for i in 0..3 {
        c.stores[i].proc_.kill();
        // Whoever owns the lease now answers (a new owner once its timers are loaded).
        let mut r = None;
        assert!(
            wait_until(Duration::from_secs(30), || {
                r = remaining(&c);
                r.is_some()
            }),
            "no owner answered for the long lease after killing store {i}"
        );
        let r = r.unwrap();
        assert!(
            r <= LONG - 3,
            "killing store {i} reset the idle long lease to {r} s of its {LONG} s"
        );
        assert_eq!(
            get_keys(&ep_of(&c), "/fo/"),
            vec!["/fo/kept", "/fo/long"],
            "after killing store {i}"
        );
        c.stores[i].proc_.start();
        assert!(wait_until(Duration::from_secs(60), || {
            regions_healthy(&c.kvctl_json(&["regions"]), 3)
        }));
        assert_eq!(get_keys(&ep, "/fo/"), vec!["/fo/kept", "/fo/long"]);
    }
    let _ = keeper.kill();
    let _ = keeper.wait();
    drop(c);
}

/// The endpoints of the stores that run.
fn ep_of(c: &ProcCluster) -> String {
    c.stores
        .iter()
        .filter(|s| s.proc_.pid().is_some())
        .map(|s| s.addr.clone())
        .collect::<Vec<_>>()
        .join(",")
}
