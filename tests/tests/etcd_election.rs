//! etcd's Election and Lock services on real processes, and etcd's own client recipes
//! (`etcdctl lock`, `etcdctl elect`: `concurrency.Mutex` / `concurrency.Election` over KV,
//! Watch and Lease) on the same keys: etcdctl 3.4 (`scripts/ensure-deps.sh` installs it),
//! `kvctl lock` / `kvctl elect`, the gRPC calls and the gateway's paths.

use atoll_proto::etcdserverpb::kv_client::KvClient;
use atoll_proto::etcdserverpb::lease_client::LeaseClient;
use atoll_proto::etcdserverpb::{
    DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest, PutRequest, RangeRequest,
};
use atoll_proto::v3electionpb::election_client::ElectionClient;
use atoll_proto::v3electionpb::{
    CampaignRequest, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest, ResignRequest,
};
use atoll_proto::v3lockpb::lock_client::LockClient;
use atoll_proto::v3lockpb::{LockRequest, UnlockRequest};
use atoll_tests::etcd_watch::channel;
use atoll_tests::procs::{bin, http, regions_healthy, ClusterOpts, ProcCluster};
use atoll_tests::wait_until;
use base64::Engine;
use parking_lot::Mutex;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::Code;

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn unb64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap_or_else(|| panic!("not base64: {v}")))
        .unwrap()
}

/// An int64 the gateway writes: a decimal string.
fn int_str(v: &Value) -> i64 {
    v.as_str()
        .unwrap_or_else(|| panic!("not an int64 string: {v}"))
        .parse()
        .unwrap_or_else(|e| panic!("{v}: {e}"))
}

fn three_stores() -> (ProcCluster, Vec<String>) {
    let c = ProcCluster::start(ClusterOpts {
        pds: 1,
        stores: 3,
        ..Default::default()
    });
    c.wait_ready(Duration::from_secs(60));
    let ok = wait_until(Duration::from_secs(60), || {
        (0..3).filter_map(|i| c.store_id_of(i)).count() == 3
            && regions_healthy(&c.kvctl_json(&["regions"]), 3)
    });
    assert!(
        ok,
        "cluster never got healthy: {}",
        c.kvctl_json(&["regions"])
    );
    let addrs = c.stores.iter().map(|s| s.addr.clone()).collect();
    (c, addrs)
}

fn etcdctl_cmd(endpoints: &str) -> Command {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .arg("--dial-timeout=5s")
        .arg("--command-timeout=15s");
    cmd
}

/// A running process whose stdout lines are collected.
struct Running {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    name: String,
}

impl Running {
    fn spawn(mut cmd: Command, name: &str) -> Running {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let lines = Arc::new(Mutex::new(vec![]));
        let out = child.stdout.take().unwrap();
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                l.lock().push(line);
            }
        });
        let err = child.stderr.take().unwrap();
        let tag = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{tag}] {line}");
            }
        });
        Running {
            child,
            lines,
            name: name.to_string(),
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().clone()
    }

    fn wait_line(&self, want: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.lines().iter().any(|l| l == want))
    }

    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit; output {:?}",
                self.name,
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a child of this process.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lines `<who> start|end ...` of a shared log must come in pairs, never interleaved.
fn check_exclusive(log: &[String]) -> Vec<(String, Vec<String>)> {
    let mut holders = vec![];
    let mut it = log.iter();
    while let Some(start) = it.next() {
        let s: Vec<&str> = start.split_whitespace().collect();
        assert_eq!(
            s.get(1),
            Some(&"start"),
            "a holder ended without starting: {log:?}"
        );
        let end = it
            .next()
            .unwrap_or_else(|| panic!("{} never ended: {log:?}", s[0]));
        let e: Vec<&str> = end.split_whitespace().collect();
        assert_eq!((e[0], e[1]), (s[0], "end"), "two holders at once: {log:?}");
        holders.push((
            s[0].to_string(),
            s[2..].iter().map(|x| x.to_string()).collect(),
        ));
    }
    holders
}

/// `etcdctl lock` (etcd's client recipe over KV, Watch and Lease) and `kvctl lock` (the Lock
/// service) queue on the same keys: three contenders, each holding the lock for 3 s, never
/// overlap, are served in the order they came, and their fencing revisions grow.
#[test]
fn etcdctl_and_kvctl_locks_exclude_each_other() {
    let (c, addrs) = three_stores();
    let endpoints = addrs.join(",");
    let log = c.path().join("lock.log");
    let hold = |who: &str, key_var: &str, rev_var: &str| {
        format!(
            "echo \"{who} start ${key_var} ${rev_var}\" >> {log}; /bin/sleep 3; echo \"{who} end\" >> {log}",
            log = log.display()
        )
    };
    let mut a = etcdctl_cmd(&endpoints);
    a.args(["lock", "--ttl=5", "shared-lock", "--", "/bin/sh", "-c"])
        .arg(hold("A", "ETCD_LOCK_KEY", "ETCD_LOCK_REV"));
    let mut a = Running::spawn(a, "etcdctl-lock-A");
    assert!(
        wait_until(Duration::from_secs(20), || std::fs::read_to_string(&log)
            .is_ok_and(|s| s.contains("A start"))),
        "A never got the lock"
    );
    let mut b = Command::new(bin("kvctl"));
    b.args([
        "--pd",
        &c.pd_endpoints(),
        "lock",
        "shared-lock",
        "--ttl",
        "5",
        "--",
    ])
    .args(["/bin/sh", "-c"])
    .arg(hold("B", "ATOLL_LOCK_KEY", "ATOLL_LOCK_REV"))
    .env("RUST_LOG", "error");
    let mut b = Running::spawn(b, "kvctl-lock-B");
    // B queues (its key is the second under the lock's prefix) before C comes.
    let queued = wait_until(Duration::from_secs(20), || {
        c.kvctl_json(&["scan", "shared-lock/", "shared-lock0"])["kvs"]
            .as_array()
            .is_some_and(|k| k.len() == 2)
    });
    assert!(queued, "B never queued: {:?}", b.lines());
    let mut cc = etcdctl_cmd(&endpoints);
    cc.args(["lock", "--ttl=5", "shared-lock", "--", "/bin/sh", "-c"])
        .arg(hold("C", "ETCD_LOCK_KEY", "ETCD_LOCK_REV"));
    let mut cc = Running::spawn(cc, "etcdctl-lock-C");
    for p in [&mut a, &mut b, &mut cc] {
        let s = p.wait_exit(Duration::from_secs(60));
        assert!(s.success(), "{} failed: {s}", p.name);
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<String> = text.lines().map(String::from).collect();
    let holders = check_exclusive(&lines);
    let order: Vec<&str> = holders.iter().map(|(w, _)| w.as_str()).collect();
    assert_eq!(order, ["A", "B", "C"], "{lines:?}");
    let mut last_rev = 0i64;
    for (who, rest) in &holders {
        let key = &rest[0];
        assert!(key.starts_with("shared-lock/"), "{who}: {key}");
        let rev: i64 = rest[1]
            .parse()
            .unwrap_or_else(|e| panic!("{who}: {rest:?}: {e}"));
        assert!(rev > last_rev, "fencing revisions must grow: {lines:?}");
        last_rev = rev;
    }
    // kvctl printed its key, the one its command saw.
    assert_eq!(b.lines().first(), Some(&holders[1].1[0]), "{:?}", b.lines());
    // Every key is gone: unlocked (kvctl, etcdctl's Unlock) with the leases revoked.
    let left = c.kvctl_json(&["scan", "shared-lock/", "shared-lock0"]);
    assert_eq!(left["kvs"], serde_json::json!([]), "{left}");
}

/// `etcdctl elect`: two candidates and an observer; the leader is killed (SIGKILL, its lease
/// left to expire) and the second candidate becomes leader, which the observer sees.
#[test]
fn etcdctl_elect_fails_over_when_the_leader_dies() {
    let (_c, addrs) = three_stores();
    let endpoints = addrs.join(",");
    let mut obs = etcdctl_cmd(&endpoints);
    obs.args(["elect", "-l", "pilot"]);
    let obs = Running::spawn(obs, "etcdctl-observe");
    let mut first = etcdctl_cmd(&endpoints);
    first.args(["elect", "pilot", "alice"]);
    let first = Running::spawn(first, "etcdctl-elect-alice");
    assert!(
        first.wait_line("alice", Duration::from_secs(20)),
        "alice never elected: {:?}",
        first.lines()
    );
    assert!(
        obs.wait_line("alice", Duration::from_secs(20)),
        "the observer never saw alice: {:?}",
        obs.lines()
    );
    let mut second = etcdctl_cmd(&endpoints);
    second.args(["elect", "pilot", "bob"]);
    let second = Running::spawn(second, "etcdctl-elect-bob");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !second.lines().iter().any(|l| l == "bob"),
        "bob elected while alice leads: {:?}",
        second.lines()
    );
    // The Election service agrees: alice leads.
    let rt = atoll_tests::runtime();
    let leader = rt.block_on(async {
        let mut ec = ElectionClient::new(channel(&addrs[1]));
        ec.leader(LeaderRequest {
            name: b"pilot".to_vec(),
        })
        .await
    });
    let kv = leader.expect("leader").into_inner().kv.unwrap();
    assert_eq!(kv.value, b"alice");
    let killed = Instant::now();
    first.signal(libc::SIGKILL);
    // etcdctl's session lease (60 s) expires, alice's key with it.
    assert!(
        second.wait_line("bob", Duration::from_secs(120)),
        "bob never elected after alice died: {:?}",
        second.lines()
    );
    assert!(
        obs.wait_line("bob", Duration::from_secs(20)),
        "the observer never saw bob: {:?}",
        obs.lines()
    );
    eprintln!("bob elected {:?} after alice was killed", killed.elapsed());
    let seen: Vec<String> = obs
        .lines()
        .into_iter()
        .filter(|l| l == "alice" || l == "bob")
        .collect();
    assert_eq!(seen, ["alice", "bob"], "{:?}", obs.lines());
}

async fn grant(addr: &str, ttl: i64) -> i64 {
    let mut lc = LeaseClient::new(channel(addr));
    let r = lc
        .lease_grant(LeaseGrantRequest { ttl, id: 0 })
        .await
        .expect("lease grant")
        .into_inner();
    assert!(r.error.is_empty(), "{}", r.error);
    r.id
}

async fn leader_value(addr: &str, name: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    let mut ec = ElectionClient::new(channel(addr));
    let r = ec
        .leader(LeaderRequest {
            name: name.to_vec(),
        })
        .await?
        .into_inner();
    Ok(r.kv.unwrap().value)
}

async fn key_exists(addr: &str, key: &[u8]) -> bool {
    let mut kv = KvClient::new(channel(addr));
    let r = kv
        .range(RangeRequest {
            key: key.to_vec(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    !r.kvs.is_empty()
}

fn expect_err<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, msg: &str) {
    match r {
        Err(s) => assert_eq!(
            (s.code(), s.message()),
            (code, msg),
            "wanted {code:?} {msg:?}, got {s:?}"
        ),
        Ok(v) => panic!("wanted {code:?} {msg:?}, got {v:?}"),
    }
}

/// The Election and Lock gRPC calls on three stores: etcd's semantics and errors, waiting
/// candidates served in order across stores, Observe, re-campaigns, abandoned campaigns and
/// lock waits cleaned up, leases that expire handing leadership on.
#[test]
fn election_and_lock_grpc_calls() {
    let (_c, addrs) = three_stores();
    let rt = atoll_tests::runtime();
    rt.block_on(async {
        let (a0, a1, a2) = (&addrs[0], &addrs[1], &addrs[2]);
        let mut e0 = ElectionClient::new(channel(a0));
        let mut e1 = ElectionClient::new(channel(a1));

        // No candidate yet.
        expect_err(
            leader_value(a0, b"job").await,
            Code::Unknown,
            "election: no leader",
        );

        // An observer from the start, on another store.
        let mut observed = e1
            .observe(LeaderRequest {
                name: b"job".to_vec(),
            })
            .await
            .expect("observe")
            .into_inner();

        let l1 = grant(a0, 30).await;
        let l2 = grant(a1, 30).await;
        let c1 = e0
            .campaign(CampaignRequest {
                name: b"job".to_vec(),
                lease: l1,
                value: b"abc".to_vec(),
            })
            .await
            .expect("campaign 1")
            .into_inner();
        let k1: LeaderKey = c1.leader.clone().unwrap();
        assert_eq!(k1.name, b"job");
        assert_eq!(k1.key, format!("job/{l1:x}").into_bytes());
        assert_eq!(k1.lease, l1);
        let h1 = c1.header.unwrap().revision;
        assert_eq!(
            k1.rev, h1,
            "a key created by the campaign: its txn's revision"
        );
        assert_eq!(leader_value(a2, b"job").await.unwrap(), b"abc");

        // A second candidate waits on another store.
        let mut e2 = ElectionClient::new(channel(a2));
        let second = tokio::spawn(async move {
            e2.campaign(CampaignRequest {
                name: b"job".to_vec(),
                lease: l2,
                value: b"def".to_vec(),
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            !second.is_finished(),
            "second candidate elected while the first leads"
        );

        // Proclaim, and its errors.
        e0.proclaim(ProclaimRequest {
            leader: Some(k1.clone()),
            value: b"abc2".to_vec(),
        })
        .await
        .expect("proclaim");
        assert_eq!(leader_value(a1, b"job").await.unwrap(), b"abc2");
        let mut wrong = k1.clone();
        wrong.rev += 1;
        expect_err(
            e0.proclaim(ProclaimRequest {
                leader: Some(wrong),
                value: b"no".to_vec(),
            })
            .await,
            Code::Unknown,
            "election: not leader",
        );
        expect_err(
            e0.proclaim(ProclaimRequest {
                leader: None,
                value: b"no".to_vec(),
            })
            .await,
            Code::Unknown,
            "\"leader\" field must be provided",
        );
        expect_err(
            e0.resign(ResignRequest { leader: None }).await,
            Code::Unknown,
            "\"leader\" field must be provided",
        );
        assert_eq!(leader_value(a0, b"job").await.unwrap(), b"abc2");
        assert!(!second.is_finished());

        // Resign: the second candidate is elected.
        e0.resign(ResignRequest {
            leader: Some(k1.clone()),
        })
        .await
        .expect("resign");
        let c2 = tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .expect("second candidate elected after the resign")
            .unwrap()
            .expect("campaign 2")
            .into_inner();
        let k2 = c2.leader.clone().unwrap();
        assert_eq!(k2.key, format!("job/{l2:x}").into_bytes());
        assert!(k2.rev > k1.rev);
        assert!(c2.header.unwrap().revision > h1);
        assert_eq!(leader_value(a0, b"job").await.unwrap(), b"def");
        // The resigned leader is no leader.
        expect_err(
            e0.proclaim(ProclaimRequest {
                leader: Some(k1.clone()),
                value: b"late".to_vec(),
            })
            .await,
            Code::Unknown,
            "election: not leader",
        );
        // Resigning again (a key no longer its) answers success, as etcd, and deletes nothing.
        e0.resign(ResignRequest {
            leader: Some(k1.clone()),
        })
        .await
        .expect("resign again");
        assert_eq!(leader_value(a0, b"job").await.unwrap(), b"def");

        // Re-campaign with the same lease: the same key, its new value proclaimed at once.
        let again = tokio::time::timeout(
            Duration::from_secs(10),
            e0.campaign(CampaignRequest {
                name: b"job".to_vec(),
                lease: l2,
                value: b"ghi".to_vec(),
            }),
        )
        .await
        .expect("a re-campaign of the leader does not wait")
        .expect("re-campaign")
        .into_inner();
        assert_eq!(again.leader.as_ref().unwrap().key, k2.key);
        assert_eq!(again.leader.as_ref().unwrap().rev, k2.rev);
        assert_eq!(leader_value(a1, b"job").await.unwrap(), b"ghi");

        // The observer saw every leader and value, in order.
        let mut values = vec![];
        while values.last().map(Vec::as_slice) != Some(b"ghi".as_slice()) {
            let r: LeaderResponse =
                tokio::time::timeout(Duration::from_secs(10), observed.message())
                    .await
                    .unwrap_or_else(|_| panic!("observer stalled after {values:?}"))
                    .expect("observe stream")
                    .expect("observe stream ended");
            values.push(r.kv.unwrap().value);
        }
        assert_eq!(
            values,
            [
                b"abc".to_vec(),
                b"abc2".to_vec(),
                b"def".to_vec(),
                b"ghi".to_vec()
            ]
        );

        // A candidate that gives up (its call dropped while it waits) leaves no key behind.
        let l3 = grant(a0, 30).await;
        let k3 = format!("job/{l3:x}").into_bytes();
        let mut e1b = e1.clone();
        let quitter = tokio::spawn(async move {
            e1b.campaign(CampaignRequest {
                name: b"job".to_vec(),
                lease: l3,
                value: b"quitter".to_vec(),
            })
            .await
        });
        let created =
            atoll_tests::wait_until_async(Duration::from_secs(10), || key_exists(a2, &k3)).await;
        assert!(created, "the waiting candidate's key never appeared");
        assert!(!quitter.is_finished());
        quitter.abort();
        let gone = atoll_tests::wait_until_async(Duration::from_secs(10), || async {
            !key_exists(a2, &k3).await
        })
        .await;
        assert!(gone, "an abandoned campaign left its key");
        assert_eq!(leader_value(a0, b"job").await.unwrap(), b"ghi");

        // A lease that expires hands leadership on: the leader's lease (2 s) is not kept
        // alive; the waiting candidate is elected once it expires.
        let short = grant(a0, 2).await;
        let l4 = grant(a0, 30).await;
        let cs = e0
            .campaign(CampaignRequest {
                name: b"expiry".to_vec(),
                lease: short,
                value: b"short".to_vec(),
            })
            .await
            .expect("campaign short")
            .into_inner();
        let started = Instant::now();
        let c4 = tokio::time::timeout(
            Duration::from_secs(30),
            e1.campaign(CampaignRequest {
                name: b"expiry".to_vec(),
                lease: l4,
                value: b"next".to_vec(),
            }),
        )
        .await
        .expect("elected once the leader's lease expired")
        .expect("campaign after expiry")
        .into_inner();
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert!(c4.leader.unwrap().rev > cs.leader.unwrap().rev);
        assert_eq!(leader_value(a2, b"expiry").await.unwrap(), b"next");

        // A lease that does not exist: etcd's KV error.
        expect_err(
            e0.campaign(CampaignRequest {
                name: b"job".to_vec(),
                lease: 0x7777_0000_1234,
                value: b"x".to_vec(),
            })
            .await,
            // etcd's servers answer every error as Unknown, with etcd's message.
            Code::Unknown,
            "etcdserver: requested lease not found",
        );
        // Lease 0: etcd's server campaigns with a fresh session lease of 60 s.
        let c0 = e0
            .campaign(CampaignRequest {
                name: b"zero".to_vec(),
                lease: 0,
                value: b"z".to_vec(),
            })
            .await
            .expect("campaign with lease 0")
            .into_inner();
        let k0 = c0.leader.unwrap();
        assert_ne!(k0.lease, 0);
        assert_eq!(k0.key, format!("zero/{:x}", k0.lease).into_bytes());

        // Lock: the second waits until the first unlocks, on other stores.
        let mut lk0 = LockClient::new(channel(a0));
        let first = lk0
            .lock(LockRequest {
                name: b"mutex".to_vec(),
                lease: l1,
            })
            .await
            .expect("lock 1")
            .into_inner();
        assert_eq!(first.key, format!("mutex/{l1:x}").into_bytes());
        let r1 = first.header.unwrap().revision;
        let mut lk2 = LockClient::new(channel(a2));
        let waiting = tokio::spawn(async move {
            lk2.lock(LockRequest {
                name: b"mutex".to_vec(),
                lease: l2,
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!waiting.is_finished(), "two lock holders");
        // A third waiter that gives up leaves no key.
        let l5 = grant(a0, 30).await;
        let mut req = tonic::Request::new(LockRequest {
            name: b"mutex".to_vec(),
            lease: l5,
        });
        req.set_timeout(Duration::from_millis(1000));
        let mut lk1 = LockClient::new(channel(a1));
        let r = tokio::time::timeout(Duration::from_millis(1500), lk1.lock(req)).await;
        assert!(!matches!(r, Ok(Ok(_))), "a third lock holder: {r:?}");
        let k5 = format!("mutex/{l5:x}").into_bytes();
        let gone = atoll_tests::wait_until_async(Duration::from_secs(10), || async {
            !key_exists(a0, &k5).await
        })
        .await;
        assert!(gone, "an abandoned lock wait left its key");
        let un = lk0
            .unlock(UnlockRequest {
                key: first.key.clone(),
            })
            .await
            .expect("unlock")
            .into_inner();
        let un_rev = un.header.unwrap().revision;
        let second = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the waiter got the lock after the unlock")
            .unwrap()
            .expect("lock 2")
            .into_inner();
        assert_eq!(second.key, format!("mutex/{l2:x}").into_bytes());
        let r2 = second.header.unwrap().revision;
        assert!(
            r2 > un_rev && un_rev > r1,
            "fencing revisions: {r1} {un_rev} {r2}"
        );
        expect_err(
            lk0.lock(LockRequest {
                name: b"mutex".to_vec(),
                lease: 0x7777_0000_1234,
            })
            .await,
            // etcd's servers answer every error as Unknown, with etcd's message.
            Code::Unknown,
            "etcdserver: requested lease not found",
        );
        expect_err(
            lk0.unlock(UnlockRequest { key: vec![] }).await,
            Code::Unknown,
            "etcdserver: key is not provided",
        );
        // Revoking the holder's lease releases the lock.
        LeaseClient::new(channel(a0))
            .lease_revoke(LeaseRevokeRequest { id: l2 })
            .await
            .expect("revoke");
        assert!(!key_exists(a1, &second.key).await);
    });
}

/// One streaming HTTP request: the lines of its body as they come, until `stop` says so.
fn http_stream_lines(
    addr: &str,
    path: &str,
    body: &str,
    timeout: Duration,
    mut stop: impl FnMut(&[Value]) -> bool,
) -> Vec<Value> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let deadline = Instant::now() + timeout;
    let mut raw = Vec::new();
    let mut values = vec![];
    while Instant::now() < deadline {
        let mut buf = [0u8; 4096];
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        let text = String::from_utf8_lossy(&raw).to_string();
        let Some((_, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        // Chunked: the JSON lines are the lines that parse.
        values = body
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
            .filter(Value::is_object)
            .collect();
        if stop(&values) {
            break;
        }
    }
    values
}

fn post(addr: &str, path: &str, body: &str) -> (u16, Value) {
    let (code, text) = http(addr, "POST", path, body).unwrap_or_else(|e| panic!("{path}: {e}"));
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text:?}"));
    (code, v)
}

/// The gateway's Election and Lock paths, JSON as grpc-gateway writes it.
#[test]
fn gateway_election_and_lock_paths() {
    let (_c, addrs) = three_stores();
    let (a0, a1) = (addrs[0].clone(), addrs[1].clone());
    let name = b64(b"gw");
    // No leader: etcd's error, Unknown (HTTP 500).
    let (code, v) = post(
        &a0,
        "/v3/election/leader",
        &format!(r#"{{"name":"{name}"}}"#),
    );
    assert_eq!(code, 500, "{v}");
    assert_eq!(v["error"], "election: no leader");
    assert_eq!(v["message"], "election: no leader");
    assert_eq!(v["code"], 2);

    // An observer through the gateway, from the start.
    let obs_addr = a1.clone();
    let obs_body = format!(r#"{{"name":"{name}"}}"#);
    let observer = std::thread::spawn(move || {
        http_stream_lines(
            &obs_addr,
            "/v3/election/observe",
            &obs_body,
            Duration::from_secs(60),
            |vals| {
                vals.iter()
                    .any(|v| v["result"]["kv"]["value"] == b64(b"second"))
            },
        )
    });

    let rt = atoll_tests::runtime();
    // Lease 0: the call's own session lease (etcd grants one; without a Lease service, none).
    let (code, v) = post(
        &a0,
        "/v3/election/campaign",
        &format!(r#"{{"name":"{name}","value":"{}"}}"#, b64(b"first")),
    );
    assert_eq!(code, 200, "{v}");
    let leader = v["leader"].clone();
    assert_eq!(unb64(&leader["name"]), b"gw");
    let lease = if leader["lease"].is_null() {
        0
    } else {
        int_str(&leader["lease"])
    };
    assert_eq!(unb64(&leader["key"]), format!("gw/{lease:x}").into_bytes());
    let rev = int_str(&leader["rev"]);
    assert_eq!(int_str(&v["header"]["revision"]), rev);
    assert!(v["header"]["member_id"].is_string(), "{v}");

    let (code, v) = post(
        &a1,
        "/v3/election/leader",
        &format!(r#"{{"name":"{name}"}}"#),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(unb64(&v["kv"]["value"]), b"first");
    assert_eq!(int_str(&v["kv"]["create_revision"]), rev);

    let (code, v) = post(
        &a1,
        "/v3/election/proclaim",
        &format!(r#"{{"leader":{leader},"value":"{}"}}"#, b64(b"second")),
    );
    assert_eq!(code, 200, "{v}");
    assert!(int_str(&v["header"]["revision"]) > rev);
    let values = observer.join().unwrap();
    let seen: Vec<Vec<u8>> = values
        .iter()
        .map(|v| unb64(&v["result"]["kv"]["value"]))
        .collect();
    assert_eq!(seen, [b"first".to_vec(), b"second".to_vec()], "{values:?}");

    // Proclaim as a leader that is not one (another revision): 500, etcd's message.
    let mut wrong = leader.clone();
    wrong["rev"] = Value::from((rev + 1).to_string());
    let (code, v) = post(
        &a0,
        "/v3/election/proclaim",
        &format!(r#"{{"leader":{wrong},"value":"{}"}}"#, b64(b"x")),
    );
    assert_eq!(
        (code, v["error"].as_str()),
        (500, Some("election: not leader")),
        "{v}"
    );

    let (code, v) = post(
        &a0,
        "/v3/election/resign",
        &format!(r#"{{"leader":{leader}}}"#),
    );
    assert_eq!(code, 200, "{v}");
    let (code, _) = post(
        &a0,
        "/v3/election/leader",
        &format!(r#"{{"name":"{name}"}}"#),
    );
    assert_eq!(code, 500);

    // Lock and unlock.
    let (code, v) = post(
        &a0,
        "/v3/lock/lock",
        &format!(r#"{{"name":"{}","lease":"{lease}"}}"#, b64(b"gwlock")),
    );
    assert_eq!(code, 200, "{v}");
    let key = unb64(&v["key"]);
    assert_eq!(key, format!("gwlock/{lease:x}").into_bytes());
    assert!(int_str(&v["header"]["revision"]) > rev);
    let (code, v) = post(
        &a1,
        "/v3/lock/unlock",
        &format!(r#"{{"key":"{}"}}"#, b64(&key)),
    );
    assert_eq!(code, 200, "{v}");
    assert!(!rt.block_on(key_exists(&a0, &key)));

    // Not POST: 405; a lease that does not exist: 500 (Unknown, as etcd) with etcd's message.
    let (code, _) = http(&a0, "GET", "/v3/lock/lock", "").unwrap();
    assert_eq!(code, 405);
    let (code, v) = post(
        &a0,
        "/v3/lock/lock",
        &format!(r#"{{"name":"{}","lease":"123456789"}}"#, b64(b"gwlock")),
    );
    assert_eq!(
        (code, v["error"].as_str()),
        (500, Some("etcdserver: requested lease not found"))
    );
}

/// Waiting without leases: keys put under an election's prefix by hand are candidates like
/// any other (the recipes' layout), so a campaign and a lock with lease 0 wait for them;
/// Observe, Proclaim, Resign and the errors; a waiter whose call is dropped deletes its key.
#[test]
fn campaigns_and_locks_wait_for_older_keys() {
    let (_c, addrs) = three_stores();
    let rt = atoll_tests::runtime();
    rt.block_on(async {
        let (a0, a1, a2) = (&addrs[0], &addrs[1], &addrs[2]);
        let mut kv = KvClient::new(channel(a0));
        let put = |k: &str, v: &str| PutRequest {
            key: k.as_bytes().to_vec(),
            value: v.as_bytes().to_vec(),
            ..Default::default()
        };
        expect_err(
            leader_value(a1, b"w").await,
            Code::Unknown,
            "election: no leader",
        );
        kv.put(put("w/older", "p")).await.expect("put");
        let mut observed = ElectionClient::new(channel(a2))
            .observe(LeaderRequest {
                name: b"w".to_vec(),
            })
            .await
            .expect("observe")
            .into_inner();
        let mut e1 = ElectionClient::new(channel(a1));
        let campaign = tokio::spawn(async move {
            e1.campaign(CampaignRequest {
                name: b"w".to_vec(),
                lease: 0,
                value: b"me".to_vec(),
            })
            .await
        });
        // The candidate's key appears (second under the prefix), and it waits.
        let prefix_keys = |addr: String, p: &'static [u8], end: &'static [u8]| async move {
            let mut kv = KvClient::new(channel(&addr));
            kv.range(RangeRequest {
                key: p.to_vec(),
                range_end: end.to_vec(),
                keys_only: true,
                ..Default::default()
            })
            .await
            .expect("range")
            .into_inner()
            .kvs
            .len()
        };
        let queued = atoll_tests::wait_until_async(Duration::from_secs(20), || async {
            prefix_keys(a2.clone(), b"w/", b"w0").await == 2
        })
        .await;
        assert!(queued, "the candidate's key never appeared");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(!campaign.is_finished(), "elected while an older key exists");
        assert_eq!(leader_value(a0, b"w").await.unwrap(), b"p");
        let deleted = kv
            .delete_range(DeleteRangeRequest {
                key: b"w/older".to_vec(),
                ..Default::default()
            })
            .await
            .expect("delete")
            .into_inner();
        let del_rev = deleted.header.unwrap().revision;
        let c = tokio::time::timeout(Duration::from_secs(10), campaign)
            .await
            .expect("elected once the older key was deleted")
            .unwrap()
            .expect("campaign")
            .into_inner();
        let me = c.leader.unwrap();
        assert_eq!(me.key, format!("w/{:x}", me.lease).into_bytes());
        assert!(
            me.rev < del_rev,
            "its key was made before the delete, and waited"
        );
        assert_eq!(leader_value(a2, b"w").await.unwrap(), b"me");
        let mut e0 = ElectionClient::new(channel(a0));
        e0.proclaim(ProclaimRequest {
            leader: Some(me.clone()),
            value: b"me2".to_vec(),
        })
        .await
        .expect("proclaim");
        let mut values = vec![];
        while values.len() < 3 {
            let r = tokio::time::timeout(Duration::from_secs(10), observed.message())
                .await
                .unwrap_or_else(|_| panic!("observer stalled after {values:?}"))
                .expect("observe")
                .expect("observe ended");
            let kv = r.kv.unwrap();
            values.push((String::from_utf8(kv.key).unwrap(), kv.value));
        }
        let me_key = String::from_utf8(me.key.clone()).unwrap();
        assert_eq!(
            values,
            [
                ("w/older".to_string(), b"p".to_vec()),
                (me_key.clone(), b"me".to_vec()),
                (me_key, b"me2".to_vec()),
            ]
        );
        let mut wrong = me.clone();
        wrong.rev -= 1;
        expect_err(
            e0.proclaim(ProclaimRequest {
                leader: Some(wrong),
                value: b"x".to_vec(),
            })
            .await,
            Code::Unknown,
            "election: not leader",
        );
        e0.resign(ResignRequest {
            leader: Some(me.clone()),
        })
        .await
        .expect("resign");
        expect_err(
            leader_value(a1, b"w").await,
            Code::Unknown,
            "election: no leader",
        );

        // A lock waits for an older key; its call dropped, its key goes.
        kv.put(put("l/older", "")).await.expect("put");
        let mut lk = LockClient::new(channel(a1));
        let waiter = tokio::spawn(async move {
            lk.lock(LockRequest {
                name: b"l".to_vec(),
                lease: 0,
            })
            .await
        });
        let keys = |addr: String| async move {
            let mut kv = KvClient::new(channel(&addr));
            kv.range(RangeRequest {
                key: b"l/".to_vec(),
                range_end: b"l0".to_vec(),
                keys_only: true,
                ..Default::default()
            })
            .await
            .expect("range")
            .into_inner()
            .kvs
            .len()
        };
        let queued = atoll_tests::wait_until_async(Duration::from_secs(10), || async {
            keys(a2.clone()).await == 2
        })
        .await;
        assert!(queued, "the lock waiter's key never appeared");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiter.is_finished(), "locked while an older key exists");
        waiter.abort();
        let gone = atoll_tests::wait_until_async(Duration::from_secs(10), || async {
            keys(a2.clone()).await == 1
        })
        .await;
        assert!(gone, "an abandoned lock wait left its key");
        // Once the older key goes, a lock is taken at once; its fencing revision is above
        // the delete's.
        let d = kv
            .delete_range(DeleteRangeRequest {
                key: b"l/older".to_vec(),
                ..Default::default()
            })
            .await
            .expect("delete")
            .into_inner();
        let mut lk = LockClient::new(channel(a0));
        let got = tokio::time::timeout(
            Duration::from_secs(10),
            lk.lock(LockRequest {
                name: b"l".to_vec(),
                lease: 0,
            }),
        )
        .await
        .expect("lock without contention")
        .expect("lock")
        .into_inner();
        assert!(got.header.unwrap().revision > d.header.unwrap().revision);
        lk.unlock(UnlockRequest {
            key: got.key.clone(),
        })
        .await
        .expect("unlock");
        assert_eq!(keys(a1.clone()).await, 0);
    });
}

/// `kvctl elect`: a candidate, a second one waiting, an observer; Ctrl-C on the leader
/// resigns and the second is elected at once (no lease expiry needed).
#[test]
fn kvctl_elect_campaigns_observes_and_resigns() {
    let (c, _addrs) = three_stores();
    let pd = c.pd_endpoints();
    let kvctl = |args: &[&str]| {
        let mut cmd = Command::new(bin("kvctl"));
        cmd.args(["--pd", &pd]).args(args).env("RUST_LOG", "error");
        cmd
    };
    let obs = Running::spawn(kvctl(&["elect", "crew"]), "kvctl-observe");
    let first = Running::spawn(kvctl(&["elect", "crew", "one", "--ttl", "30"]), "kvctl-one");
    assert!(
        first.wait_line("one", Duration::from_secs(20)),
        "{:?}",
        first.lines()
    );
    let mut second = Running::spawn(kvctl(&["elect", "crew", "two", "--ttl", "30"]), "kvctl-two");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        second.lines().is_empty(),
        "two elected while one leads: {:?}",
        second.lines()
    );
    let mut first = first;
    let t = Instant::now();
    first.signal(libc::SIGINT);
    assert!(first.wait_exit(Duration::from_secs(20)).success());
    assert!(
        second.wait_line("two", Duration::from_secs(10)),
        "{:?}",
        second.lines()
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "resigned, not expired"
    );
    assert!(
        obs.wait_line("two", Duration::from_secs(10)),
        "{:?}",
        obs.lines()
    );
    assert_eq!(obs.lines(), ["one", "two"]);
    second.signal(libc::SIGTERM);
    assert!(second.wait_exit(Duration::from_secs(20)).success());
    let left = c.kvctl_json(&["scan", "crew/", "crew0"]);
    assert_eq!(left["kvs"], serde_json::json!([]), "{left}");
}
