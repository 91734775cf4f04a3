//! etcd's KV API on Atoll, through etcd's own client (etcdctl 3.4, Debian's `etcd-client`,
//! installed by `scripts/ensure-deps.sh`) and through etcd's gRPC API directly.
//!
//! - `etcdctl_kv_gives_etcds_answers`: put/get with every option, del, txn (every compare
//!   kind), compaction, each output compared with what etcd gives; bad input answered with
//!   etcd's errors and writing nothing.
//! - `serializable_txns_under_contention`: 16 clients increment 4 counters in 4 regions with
//!   etcd-style compare-and-swap txns while read-only txns read two counters at once: the
//!   final counts equal the acknowledged increments, no two increments produced the same value,
//!   and every two-counter read is a consistent snapshot at its revision.
//! - `txns_spanning_regions_are_serializable`: txns writing keys of two regions cannot write
//!   skew; a delete-range over two regions deletes both keys at once.
//! - `revisions_follow_real_time_across_regions`: a write that begins after an answer gets a
//!   larger revision, a read that begins after a write reads at or above it, across regions
//!   led by different stores.

use atoll_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use atoll_proto::etcdserverpb::kv_client::KvClient;
use atoll_proto::etcdserverpb::{
    request_op, response_op, Compare, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use atoll_tests::procs::{metric_sum, ClusterOpts, ProcCluster};
use atoll_tests::runtime;
use parking_lot::Mutex;
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI64, Ordering::SeqCst};
use std::time::{Duration, Instant};

/// One cluster at a time: each wants the machine's cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn start() -> ProcCluster {
    let c = ProcCluster::start(ClusterOpts {
        pds: 1,
        stores: 3,
        ..Default::default()
    });
    c.wait_ready(Duration::from_secs(60));
    // Every store serves the etcd API: wait until each one listens.
    for s in &c.stores {
        let up = atoll_tests::wait_until(Duration::from_secs(30), || {
            std::net::TcpStream::connect(&s.addr).is_ok()
        });
        assert!(up, "store at {} never listened", s.addr);
    }
    c
}

fn must_split(c: &ProcCluster, keys: &[&str]) {
    let mut args = vec!["split"];
    args.extend_from_slice(keys);
    let split = c.kvctl(&args);
    assert!(
        split.status.success(),
        "{}",
        String::from_utf8_lossy(&split.stderr)
    );
}

fn endpoints(c: &ProcCluster) -> String {
    c.stores
        .iter()
        .map(|s| s.addr.clone())
        .collect::<Vec<_>>()
        .join(",")
}

struct Etcdctl {
    endpoints: String,
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Etcdctl {
    fn run_with(&self, args: &[&str], stdin: Option<&str>) -> Out {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints))
            .arg("--command-timeout=20s")
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .expect("etcdctl (scripts/ensure-deps.sh installs it)");
        if let Some(input) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        let o = child.wait_with_output().unwrap();
        Out {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).to_string(),
            stderr: String::from_utf8_lossy(&o.stderr).to_string(),
        }
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run_with(args, None);
        assert!(o.ok, "etcdctl {args:?}: {}", o.stderr);
        o.stdout
    }

    #[track_caller]
    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-w", "json"]);
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("etcdctl {a:?}: {e}: {out}"))
    }

    #[track_caller]
    fn fails(&self, args: &[&str], message: &str) {
        let o = self.run_with(args, None);
        assert!(!o.ok, "etcdctl {args:?} should fail, printed {}", o.stdout);
        assert!(
            o.stderr.contains(message),
            "etcdctl {args:?}: expected {message:?}, got {}",
            o.stderr
        );
    }

    #[track_caller]
    fn txn(&self, input: &str) -> String {
        let o = self.run_with(&["txn"], Some(input));
        assert!(o.ok, "etcdctl txn {input:?}: {}", o.stderr);
        o.stdout
    }
}

fn b64(s: &str) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn rev(v: &Value) -> i64 {
    v["header"]["revision"].as_i64().expect("header.revision")
}

#[test]
fn etcdctl_kv_gives_etcds_answers() {
    let _g = SERIAL.lock();
    let c = start();
    let e = Etcdctl {
        endpoints: endpoints(&c),
    };
    // Put and get, with the metadata etcd keeps.
    assert_eq!(e.ok(&["put", "foo", "bar"]).trim(), "OK");
    let p1 = e.json(&["put", "foo", "bar"]);
    let r1 = rev(&p1);
    let p2 = e.json(&["put", "foo", "baz"]);
    let r2 = rev(&p2);
    assert!(r2 > r1, "revisions grow: {r1} then {r2}");
    assert_eq!(e.ok(&["get", "foo"]), "foo\nbaz\n");
    let g = e.json(&["get", "foo"]);
    let kv = &g["kvs"][0];
    assert_eq!(kv["key"], b64("foo"));
    assert_eq!(kv["value"], b64("baz"));
    assert_eq!(kv["mod_revision"].as_i64(), Some(r2));
    assert_eq!(kv["version"].as_i64(), Some(3));
    assert!(kv["create_revision"].as_i64().unwrap() < r1);
    assert_eq!(g["count"].as_i64(), Some(1));
    assert!(
        rev(&g) >= r2,
        "a read's revision is at least every earlier write's"
    );
    for f in ["cluster_id", "member_id", "raft_term"] {
        assert!(g["header"][f].as_u64().unwrap_or(0) > 0, "header.{f}: {g}");
    }
    // A read at a past revision.
    assert_eq!(e.ok(&["get", "foo", &format!("--rev={r1}")]), "foo\nbar\n");
    // Prefix, keys only, limit, sort.
    for (k, v) in [("dir/a", "3"), ("dir/b", "1"), ("dir/c", "2"), ("dis", "x")] {
        e.ok(&["put", k, v]);
    }
    assert_eq!(
        e.ok(&["get", "dir/", "--prefix", "--keys-only"]),
        "dir/a\n\ndir/b\n\ndir/c\n\n"
    );
    let l = e.json(&["get", "dir/", "--prefix", "--limit=2"]);
    assert_eq!(l["kvs"].as_array().unwrap().len(), 2);
    assert_eq!(l["more"], true);
    assert_eq!(l["count"].as_i64(), Some(3));
    assert_eq!(
        e.ok(&[
            "get",
            "dir/",
            "--prefix",
            "--sort-by=VALUE",
            "--order=ASCEND"
        ]),
        "dir/b\n1\ndir/c\n2\ndir/a\n3\n"
    );
    assert_eq!(
        e.ok(&[
            "get",
            "dir/",
            "--prefix",
            "--sort-by=MODIFY",
            "--order=DESCEND",
            "--limit=1"
        ]),
        "dir/c\n2\n"
    );
    assert_eq!(
        e.ok(&["get", "dir/", "--prefix", "--order=DESCEND", "--keys-only"]),
        "dir/c\n\ndir/b\n\ndir/a\n\n"
    );
    // A range: [dir/b, dis) ; from-key.
    assert_eq!(
        e.ok(&["get", "dir/b", "dis", "--keys-only"]),
        "dir/b\n\ndir/c\n\n"
    );
    assert_eq!(
        e.ok(&["get", "dir/c", "--from-key", "--keys-only"]),
        "dir/c\n\ndis\n\nfoo\n\n"
    );
    // Delete with the previous values.
    assert_eq!(
        e.ok(&["del", "dir/", "--prefix", "--prev-kv"]),
        "3\ndir/a\n3\ndir/b\n1\ndir/c\n2\n"
    );
    assert_eq!(e.ok(&["del", "dir/", "--prefix"]), "0\n");
    assert_eq!(e.ok(&["get", "dir/", "--prefix"]), "");
    // Txn, interactive, with every compare kind etcdctl 3.4 can parse (its `lease(...)`
    // compare panics in clientv3; lease compares are checked over gRPC below).
    e.ok(&["put", "t1", "a"]);
    e.ok(&["put", "t2", "b"]);
    let t1 = e.json(&["get", "t1"])["kvs"][0].clone();
    let (c1, m1) = (
        t1["create_revision"].as_i64().unwrap(),
        t1["mod_revision"].as_i64().unwrap(),
    );
    let cases: Vec<(String, bool)> = vec![
        (r#"value("t1") = "a""#.into(), true),
        (r#"value("t1") != "a""#.into(), false),
        (r#"value("t1") > "0""#.into(), true),
        (r#"value("t1") < "0""#.into(), false),
        (r#"value("absent") = """#.into(), false),
        (r#"version("t1") = "1""#.into(), true),
        (r#"version("absent") = "0""#.into(), true),
        (format!(r#"create("t1") = "{c1}""#), true),
        (format!(r#"create("t1") > "{c1}""#), false),
        (r#"create("absent") = "0""#.into(), true),
        (format!(r#"mod("t1") = "{m1}""#), true),
        (format!(r#"mod("t1") < "{m1}""#), false),
    ];
    for (cmp, want) in &cases {
        let out = e.txn(&format!("{cmp}\n\nget t1\n\nget t2\n\n"));
        let expect = if *want {
            "SUCCESS\n\nt1\na\n"
        } else {
            "FAILURE\n\nt2\nb\n"
        };
        assert_eq!(out, expect, "txn with {cmp}");
    }
    let out =
        e.txn("value(\"t1\") = \"a\"\nmod(\"t2\") > \"0\"\n\nput t3 yes\ndel t2\n\nput t3 no\n\n");
    assert_eq!(out, "SUCCESS\n\nOK\n\n1\n");
    assert_eq!(e.ok(&["get", "t3"]), "t3\nyes\n");
    assert_eq!(e.ok(&["get", "t2"]), "");
    // Compaction, then reads below it and in the future.
    let now = rev(&e.json(&["put", "foo", "qux"]));
    assert_eq!(
        e.ok(&["compaction", &now.to_string()]).trim(),
        format!("compacted revision {now}")
    );
    e.fails(
        &["get", "foo", &format!("--rev={r1}")],
        "required revision has been compacted",
    );
    assert_eq!(e.ok(&["get", "foo", &format!("--rev={now}")]), "foo\nqux\n");
    e.fails(
        &["get", "foo", &format!("--rev={}", now * 2)],
        "required revision is a future revision",
    );
    e.fails(
        &["compaction", &now.to_string()],
        "required revision has been compacted",
    );
    // A physical compaction answers once the stores dropped what it compacted: foo's two
    // versions below the new revision are gone by then (GC runs every 60 s otherwise).
    e.ok(&["put", "foo", "quux"]);
    let now = rev(&e.json(&["put", "foo", "corge"]));
    let gc_deletes = || -> f64 {
        c.stores
            .iter()
            .map(|s| metric_sum(&s.status_addr, "atoll_gc_deletes_total").unwrap_or(0.0))
            .sum()
    };
    let before = gc_deletes();
    assert_eq!(
        e.ok(&["compaction", "--physical", &now.to_string()]).trim(),
        format!("compacted revision {now}")
    );
    let removed = gc_deletes() - before;
    assert!(
        removed >= 2.0,
        "a physical compaction answered before GC removed foo's old versions ({removed} deletes)"
    );
    assert_eq!(e.ok(&["get", "foo"]), "foo\ncorge\n");

    bad_input_gets_etcds_errors(&c);
    gateway_kv(&c);
}

/// The HTTP/JSON gateway, as curl uses it (docs/etcd.md): base64 keys and values, 64-bit
/// integers as strings.
fn gateway_kv(c: &ProcCluster) {
    let addr = &c.stores[1].addr;
    let post = |path: &str, body: &str| -> Value {
        let (code, text) = atoll_tests::procs::http(addr, "POST", path, body).unwrap();
        assert_eq!(code, 200, "POST {path} {body}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {path}: {e}: {text}"))
    };
    // key "gw" = Z3c=, "1" = MQ==, "2" = Mg==
    let put = post("/v3/kv/put", r#"{"key":"Z3c=","value":"MQ=="}"#);
    let rev: i64 = put["header"]["revision"].as_str().unwrap().parse().unwrap();
    let got = post("/v3/kv/range", r#"{"key":"Z3c="}"#);
    assert_eq!(got["count"], "1");
    assert_eq!(got["kvs"][0]["key"], "Z3c=");
    assert_eq!(got["kvs"][0]["value"], "MQ==");
    assert_eq!(got["kvs"][0]["mod_revision"], rev.to_string());
    assert_eq!(got["kvs"][0]["version"], "1");
    let txn = post(
        "/v3/kv/txn",
        r#"{"compare":[{"key":"Z3c=","target":"VALUE","result":"EQUAL","value":"MQ=="}],
            "success":[{"request_put":{"key":"Z3c=","value":"Mg=="}}],
            "failure":[{"request_range":{"key":"Z3c="}}]}"#,
    );
    assert_eq!(txn["succeeded"], true, "{txn}");
    let del = post("/v3/kv/deleterange", r#"{"key":"Z3c=","prev_kv":true}"#);
    assert_eq!(del["deleted"], "1", "{del}");
    assert_eq!(del["prev_kvs"][0]["value"], "Mg==");
    assert_eq!(del["prev_kvs"][0]["version"], "2");
    let (code, text) =
        atoll_tests::procs::http(addr, "POST", "/v3/kv/put", r#"{"value":"MQ=="}"#).unwrap();
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("etcdserver: key is not provided"), "{text}");
}

/// Bad requests through etcd's gRPC API: etcd's error, and nothing written.
fn bad_input_gets_etcds_errors(c: &ProcCluster) {
    let rt = runtime();
    let addr = format!("http://{}", c.stores[0].addr);
    rt.block_on(async move {
        let mut kv = KvClient::connect(addr).await.unwrap();
        let put = |k: &[u8], v: Vec<u8>| PutRequest {
            key: k.to_vec(),
            value: v,
            ..Default::default()
        };
        let op = |p: PutRequest| RequestOp {
            request: Some(request_op::Request::RequestPut(p)),
        };
        let code_msg = |r: Result<_, tonic::Status>| {
            let s = r.expect_err("an error");
            (s.code(), s.message().to_string())
        };
        let (code, msg) = code_msg(kv.put(put(b"", b"v".to_vec())).await.map(|_| ()));
        assert_eq!(
            (code, msg.as_str()),
            (
                tonic::Code::InvalidArgument,
                "etcdserver: key is not provided"
            )
        );
        let (code, msg) = code_msg(kv.put(put(b"big", vec![b'x'; 2 << 20])).await.map(|_| ()));
        assert_eq!(
            (code, msg.as_str()),
            (
                tonic::Code::InvalidArgument,
                "etcdserver: request is too large"
            )
        );
        let (code, msg) = code_msg(
            kv.put(put(&vec![b'k'; (8 << 10) + 1], b"v".to_vec()))
                .await
                .map(|_| ()),
        );
        assert_eq!(code, tonic::Code::InvalidArgument, "{msg}");
        let dup = TxnRequest {
            compare: vec![],
            success: vec![
                op(put(b"dup", b"1".to_vec())),
                op(put(b"dup", b"2".to_vec())),
            ],
            failure: vec![],
        };
        let (code, msg) = code_msg(kv.txn(dup).await.map(|_| ()));
        assert_eq!(
            (code, msg.as_str()),
            (
                tonic::Code::InvalidArgument,
                "etcdserver: duplicate key given in txn request"
            )
        );
        let many = TxnRequest {
            compare: vec![],
            success: (0..129)
                .map(|i| op(put(format!("many/{i}").as_bytes(), b"1".to_vec())))
                .collect(),
            failure: vec![],
        };
        let (code, msg) = code_msg(kv.txn(many).await.map(|_| ()));
        assert_eq!(
            (code, msg.as_str()),
            (
                tonic::Code::InvalidArgument,
                "etcdserver: too many operations in txn request"
            )
        );
        // An inverted range: nothing, as etcd answers.
        let inverted = kv
            .range(RangeRequest {
                key: b"z".to_vec(),
                range_end: b"a".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((inverted.kvs.len(), inverted.count), (0, 0));
        // A lease compare (etcdctl 3.4 cannot send one): no lease on t1.
        let lease_cmp = |result: CompareResult, lease: i64| TxnRequest {
            compare: vec![Compare {
                result: result as i32,
                target: CompareTarget::Lease as i32,
                key: b"t1".to_vec(),
                range_end: vec![],
                target_union: Some(TargetUnion::Lease(lease)),
            }],
            success: vec![],
            failure: vec![],
        };
        assert!(
            kv.txn(lease_cmp(CompareResult::Equal, 0))
                .await
                .unwrap()
                .into_inner()
                .succeeded
        );
        assert!(
            !kv.txn(lease_cmp(CompareResult::Greater, 0))
                .await
                .unwrap()
                .into_inner()
                .succeeded
        );
        assert!(
            kv.txn(lease_cmp(CompareResult::Less, 5))
                .await
                .unwrap()
                .into_inner()
                .succeeded
        );
        // A put with a lease that was never granted.
        let (code, msg) = code_msg(
            kv.put(PutRequest {
                key: b"leased".to_vec(),
                value: b"v".to_vec(),
                lease: 42,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        );
        assert_eq!(
            (code, msg.as_str()),
            (
                tonic::Code::NotFound,
                "etcdserver: requested lease not found"
            )
        );
        // count_only (etcdctl 3.4 has no flag for it).
        let counted = kv
            .range(RangeRequest {
                key: b"t".to_vec(),
                range_end: b"u".to_vec(),
                count_only: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (counted.kvs.len(), counted.count, counted.more),
            (0, 2, false)
        );
        // Nothing of the refused requests was written.
        for k in [&b"big"[..], b"dup", b"many/0", b"leased"] {
            let r = kv
                .range(RangeRequest {
                    key: k.to_vec(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.count, 0, "{:?} was written", String::from_utf8_lossy(k));
        }
    });
}

// ---------------- contention ----------------

/// What a read saw of one counter: (counter, value, mod_revision).
type Seen = (usize, i64, i64);

#[derive(Default)]
struct Log {
    /// counter -> (value it produced -> commit revision) of acknowledged increments.
    acked: BTreeMap<usize, BTreeMap<i64, i64>>,
    /// counter -> increments whose outcome is unknown.
    unknown: BTreeMap<usize, u64>,
    /// Two-counter reads: (revision, [(counter, value, mod_revision)]).
    reads: Vec<(i64, Vec<Seen>)>,
    duplicate_values: Vec<(usize, i64)>,
    conflicts: u64,
}

fn counter(i: usize) -> Vec<u8> {
    format!("cnt/{i}").into_bytes()
}

fn range_of(resp: &Option<response_op::Response>) -> (i64, i64) {
    match resp {
        Some(response_op::Response::ResponseRange(r)) => {
            let kv = &r.kvs[0];
            (
                String::from_utf8_lossy(&kv.value).parse().unwrap(),
                kv.mod_revision,
            )
        }
        other => panic!("expected a range answer: {other:?}"),
    }
}

#[test]
fn serializable_txns_under_contention() {
    let _g = SERIAL.lock();
    let c = start();
    must_split(&c, &["cnt/1", "cnt/2", "cnt/3"]);
    let secs: u64 = std::env::var("ATOLL_ETCD_CONTENTION_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let addrs: Vec<String> = c
        .stores
        .iter()
        .map(|s| format!("http://{}", s.addr))
        .collect();
    let rt = runtime();
    let log = std::sync::Arc::new(Mutex::new(Log::default()));
    let attempts = rt.block_on(async {
        let mut kv = KvClient::connect(addrs[0].clone()).await.unwrap();
        for i in 0..4 {
            kv.put(PutRequest {
                key: counter(i),
                value: b"0".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut tasks = vec![];
        for client in 0..16usize {
            let addr = addrs[client % addrs.len()].clone();
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let mut kv = KvClient::connect(addr).await.unwrap();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    n += 1;
                    let i = (client + n as usize) % 4;
                    if n.is_multiple_of(4) {
                        // A read-only txn over two counters in two regions.
                        let j = (i + 1 + client % 3) % 4;
                        let get = |k: usize| RequestOp {
                            request: Some(request_op::Request::RequestRange(RangeRequest {
                                key: counter(k),
                                ..Default::default()
                            })),
                        };
                        let t = TxnRequest {
                            compare: vec![Compare {
                                result: CompareResult::Greater as i32,
                                target: CompareTarget::Version as i32,
                                key: counter(i),
                                range_end: vec![],
                                target_union: Some(TargetUnion::Version(0)),
                            }],
                            success: vec![get(i), get(j)],
                            failure: vec![],
                        };
                        if let Ok(r) = kv.txn(t).await {
                            let r = r.into_inner();
                            assert!(r.succeeded);
                            let (vi, mi) = range_of(&r.responses[0].response);
                            let (vj, mj) = range_of(&r.responses[1].response);
                            let rev = r.header.unwrap().revision;
                            log.lock().reads.push((rev, vec![(i, vi, mi), (j, vj, mj)]));
                        }
                        continue;
                    }
                    // An etcd-style increment: read, then swap if unchanged since.
                    let Ok(cur) = kv
                        .range(RangeRequest {
                            key: counter(i),
                            ..Default::default()
                        })
                        .await
                    else {
                        continue;
                    };
                    let cur = cur.into_inner();
                    let kv0 = &cur.kvs[0];
                    let v: i64 = String::from_utf8_lossy(&kv0.value).parse().unwrap();
                    let t = TxnRequest {
                        compare: vec![Compare {
                            result: CompareResult::Equal as i32,
                            target: CompareTarget::Mod as i32,
                            key: counter(i),
                            range_end: vec![],
                            target_union: Some(TargetUnion::ModRevision(kv0.mod_revision)),
                        }],
                        success: vec![RequestOp {
                            request: Some(request_op::Request::RequestPut(PutRequest {
                                key: counter(i),
                                value: (v + 1).to_string().into_bytes(),
                                ..Default::default()
                            })),
                        }],
                        failure: vec![],
                    };
                    match kv.txn(t).await {
                        Ok(r) => {
                            let r = r.into_inner();
                            let mut l = log.lock();
                            if r.succeeded {
                                let rev = r.header.unwrap().revision;
                                if l.acked.entry(i).or_default().insert(v + 1, rev).is_some() {
                                    l.duplicate_values.push((i, v + 1));
                                }
                            } else {
                                l.conflicts += 1;
                            }
                        }
                        Err(_) => *log.lock().unknown.entry(i).or_default() += 1,
                    }
                }
                n
            }));
        }
        let mut attempts = 0;
        for t in tasks {
            attempts += t.await.unwrap();
        }
        attempts
    });
    let finals: Vec<i64> = rt.block_on(async {
        let mut kv = KvClient::connect(addrs[1].clone()).await.unwrap();
        let mut out = vec![];
        for i in 0..4 {
            let r = kv
                .range(RangeRequest {
                    key: counter(i),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            out.push(String::from_utf8_lossy(&r.kvs[0].value).parse().unwrap());
        }
        out
    });
    let l = log.lock();
    let acked: Vec<usize> = (0..4)
        .map(|i| l.acked.get(&i).map_or(0, |m| m.len()))
        .collect();
    eprintln!(
        "contention: {attempts} attempts, acknowledged increments {acked:?}, {} conflicts, unknown {:?}, {} two-counter reads, finals {finals:?}",
        l.conflicts,
        l.unknown,
        l.reads.len()
    );
    assert!(
        l.duplicate_values.is_empty(),
        "two increments produced the same value: {:?}",
        l.duplicate_values
    );
    for i in 0..4 {
        let unknown = l.unknown.get(&i).copied().unwrap_or(0) as i64;
        let a = acked[i] as i64;
        assert!(
            finals[i] >= a && finals[i] <= a + unknown,
            "counter {i}: final {} but {a} acknowledged increments ({unknown} unknown)",
            finals[i]
        );
    }
    assert!(
        acked.iter().all(|a| *a > 10),
        "too little progress: {acked:?}"
    );
    assert!(
        l.reads.len() > 20,
        "too few two-counter reads: {}",
        l.reads.len()
    );
    // Every two-counter read is the state at its revision: the value it saw was written at
    // the mod revision it reports, and the next increment was not yet committed at R.
    for (r, seen) in &l.reads {
        for &(i, v, m) in seen {
            let incs = l.acked.get(&i).cloned().unwrap_or_default();
            if let Some(&at) = incs.get(&v) {
                assert_eq!(
                    at, m,
                    "counter {i} = {v} seen with mod_revision {m}, written at {at}"
                );
            }
            if let Some(&next) = incs.get(&(v + 1)) {
                assert!(
                    next > *r,
                    "read at {r} saw counter {i} = {v}, but {} was committed at {next}",
                    v + 1
                );
            }
            assert!(m <= *r, "read at {r} saw a version from {m}");
        }
    }
}

/// A txn that writes keys in two regions (the Percolator path, made serializable): write skew
/// is impossible. `x` and `y` (in two regions) start at 1; two txns race, each "if x = 1 and
/// y = 1 then set mine to 0": under snapshot isolation both could commit (x = y = 0), under
/// etcd's serializability at most one does. Then a delete-range over both regions.
#[test]
fn txns_spanning_regions_are_serializable() {
    let _g = SERIAL.lock();
    let c = start();
    must_split(&c, &["skew/y"]);
    let addrs: Vec<String> = c
        .stores
        .iter()
        .map(|s| format!("http://{}", s.addr))
        .collect();
    let rt = runtime();
    rt.block_on(async {
        let mut kv = KvClient::connect(addrs[0].clone()).await.unwrap();
        let put = |k: &str, v: &str| RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: k.as_bytes().to_vec(),
                value: v.as_bytes().to_vec(),
                ..Default::default()
            })),
        };
        let is_one = |k: &str| Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Value as i32,
            key: k.as_bytes().to_vec(),
            range_end: vec![],
            target_union: Some(TargetUnion::Value(b"1".to_vec())),
        };
        let (mut both, mut one) = (0, 0);
        for round in 0..30 {
            // Both keys set to 1 in one txn spanning the two regions.
            let reset = TxnRequest {
                compare: vec![],
                success: vec![put("skew/x", "1"), put("skew/y", "1")],
                failure: vec![],
            };
            let r = kv
                .txn(reset)
                .await
                .expect("a txn writing two regions")
                .into_inner();
            assert!(r.succeeded);
            let mine = |k: &'static str| TxnRequest {
                compare: vec![is_one("skew/x"), is_one("skew/y")],
                success: vec![put(k, "0")],
                failure: vec![],
            };
            let mut a = KvClient::connect(addrs[round % 3].clone()).await.unwrap();
            let mut b = KvClient::connect(addrs[(round + 1) % 3].clone())
                .await
                .unwrap();
            let (ra, rb) = tokio::join!(a.txn(mine("skew/x")), b.txn(mine("skew/y")));
            let ok = |r: Result<
                tonic::Response<atoll_proto::etcdserverpb::TxnResponse>,
                tonic::Status,
            >| { r.map(|r| r.into_inner().succeeded).unwrap_or(false) };
            let (sa, sb) = (ok(ra), ok(rb));
            let get = |k: &str| RangeRequest {
                key: k.as_bytes().to_vec(),
                ..Default::default()
            };
            let x = kv.range(get("skew/x")).await.unwrap().into_inner().kvs[0]
                .value
                .clone();
            let y = kv.range(get("skew/y")).await.unwrap().into_inner().kvs[0]
                .value
                .clone();
            assert!(
                !(x == b"0" && y == b"0"),
                "round {round}: write skew, both set to 0"
            );
            assert_eq!(x == b"0", sa, "round {round}: x answer and state disagree");
            assert_eq!(y == b"0", sb, "round {round}: y answer and state disagree");
            if sa && sb {
                both += 1;
            } else if sa || sb {
                one += 1;
            }
        }
        eprintln!("write skew: 30 rounds, {one} with one winner, {both} with two");
        assert_eq!(both, 0);
        assert!(one >= 25, "too few rounds with a winner: {one}");
        // A delete-range over both regions, with the previous values.
        let d = kv
            .delete_range(atoll_proto::etcdserverpb::DeleteRangeRequest {
                key: b"skew/".to_vec(),
                range_end: b"skew0".to_vec(),
                prev_kv: true,
            })
            .await
            .expect("a delete-range over two regions")
            .into_inner();
        assert_eq!((d.deleted, d.prev_kvs.len()), (2, 2));
        let left = kv
            .range(RangeRequest {
                key: b"skew/".to_vec(),
                range_end: b"skew0".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(left.count, 0);
    });
}

/// Revisions follow real time, as etcd's single log does, across regions: a write that
/// starts after another write or a read finished gets a larger revision, and a read that
/// starts after a write finished reads at or above its revision and sees it. (A client that
/// reads at R and then watches from R + 1 relies on the first; read-your-writes through any
/// store on the second.) 8 clients, each with a key in each of two regions, put their key of
/// region A, read it back through another store, then put their key of region B, which
/// nothing reads (so only its writes move region B's clock); every answer is checked against
/// the largest revision any client had been answered when the operation started.
#[test]
fn revisions_follow_real_time_across_regions() {
    let _g = SERIAL.lock();
    let c = start();
    must_split(&c, &["rt/m"]);
    // The two regions' leaders on two stores (PD balances them): each store keeps one clock
    // (max_ts) for all its regions, so a read of A must not move B's.
    let leader_stores = |c: &ProcCluster| -> Option<(u64, u64)> {
        let v = c.kvctl_json(&["regions"]);
        let leader_of = |key: &str| {
            v["regions"].as_array()?.iter().find_map(|r| {
                let (s, e) = (r["start_key"].as_str()?, r["end_key"].as_str()?);
                let inside = s <= key && (e.is_empty() || key < e);
                inside.then(|| r["leader"]["store_id"].as_u64()).flatten()
            })
        };
        Some((leader_of("rt/a")?, leader_of("rt/z")?))
    };
    let apart = atoll_tests::wait_until(
        Duration::from_secs(60),
        || matches!(leader_stores(&c), Some((a, b)) if a != b),
    );
    assert!(
        apart,
        "PD never moved the leaders apart: {:?}",
        leader_stores(&c)
    );
    let addrs: Vec<String> = c
        .stores
        .iter()
        .map(|s| format!("http://{}", s.addr))
        .collect();
    let secs: u64 = std::env::var("ATOLL_ETCD_REALTIME_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let rt = runtime();
    let (ops, violations) = rt.block_on(async {
        // The largest revision any client has been answered (the header of a read, the
        // revision of a put), published once the answer is in.
        let seen = std::sync::Arc::new(AtomicI64::new(0));
        let violations = std::sync::Arc::new(Mutex::new(Vec::<String>::new()));
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut tasks = vec![];
        for client in 0..8usize {
            let addrs = addrs.clone();
            let (seen, violations) = (seen.clone(), violations.clone());
            tasks.push(tokio::spawn(async move {
                let mut kvs = vec![];
                for a in &addrs {
                    kvs.push(KvClient::connect(a.clone()).await.unwrap());
                }
                let (a, b) = (format!("rt/a{client}"), format!("rt/z{client}"));
                let mut n = 0u64;
                while Instant::now() < deadline {
                    n += 1;
                    let value = format!("{n}").into_bytes();
                    let kv = &mut kvs[(client + n as usize) % 3];
                    let Some(p) = put_after(kv, &seen, &violations, &a, &value).await else {
                        continue;
                    };
                    // Read it back through another store.
                    let kv = &mut kvs[(client + n as usize + 1) % 3];
                    let before = seen.load(SeqCst);
                    let Ok(got) = kv
                        .range(RangeRequest {
                            key: a.as_bytes().to_vec(),
                            ..Default::default()
                        })
                        .await
                    else {
                        continue;
                    };
                    let got = got.into_inner();
                    let r = got.header.as_ref().unwrap().revision;
                    let kv0 = got.kvs.first();
                    let fresh =
                        kv0.map(|k| (k.value.as_slice(), k.mod_revision)) == Some((&value[..], p));
                    if r < before || !fresh {
                        violations.lock().push(format!(
                            "read of {a} at revision {r} (started after {before} was \
                             answered) gave {:?}, not the put of {n} at {p}",
                            kv0.map(|k| (
                                String::from_utf8_lossy(&k.value).to_string(),
                                k.mod_revision
                            ))
                        ));
                    }
                    seen.fetch_max(r, SeqCst);
                    let kv = &mut kvs[(client + n as usize + 2) % 3];
                    put_after(kv, &seen, &violations, &b, &value).await;
                }
                n
            }));
        }
        let mut ops = 0;
        for t in tasks {
            ops += t.await.unwrap();
        }
        let v = violations.lock().clone();
        (ops, v)
    });
    println!(
        "{ops} rounds of put, read, put; {} violations",
        violations.len()
    );
    assert!(ops > 100, "too few operations to tell: {ops}");
    assert!(
        violations.is_empty(),
        "{} answers broke real-time order, e.g.:\n{}",
        violations.len(),
        violations
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Puts `key`; records a violation if its revision is not above `seen` as it was before the
/// put; raises `seen` to it. None if the put failed.
async fn put_after(
    kv: &mut KvClient<tonic::transport::Channel>,
    seen: &AtomicI64,
    violations: &Mutex<Vec<String>>,
    key: &str,
    value: &[u8],
) -> Option<i64> {
    let before = seen.load(SeqCst);
    let put = kv
        .put(PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.to_vec(),
            ..Default::default()
        })
        .await
        .ok()?;
    let p = put.into_inner().header.unwrap().revision;
    if p <= before {
        violations.lock().push(format!(
            "put of {key} answered revision {p}, but {before} had been answered before it \
             started"
        ));
    }
    seen.fetch_max(p, SeqCst);
    Some(p)
}
