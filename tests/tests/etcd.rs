//! etcd's API on real processes: `etcdctl` (3.4, Debian's etcd-client; `scripts/ensure-deps.sh`
//! installs it) over gRPC, and the HTTP/JSON gateway on the same ports (issue: the etcd API).

use atoll_tests::procs::{etcdctl, http, regions_healthy, ClusterOpts, ProcCluster};
use atoll_tests::wait_until;
use serde_json::Value;
use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

/// `etcdctl ARGS -w json`, parsed; the error output if it fails.
fn etcdctl_json(endpoints: &str, args: &[&str]) -> Result<Value, String> {
    let mut a = args.to_vec();
    a.extend(["-w", "json"]);
    let o = etcdctl(endpoints, &a);
    if !o.status.success() {
        return Err(format!(
            "etcdctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    serde_json::from_slice(&o.stdout).map_err(|e| {
        format!(
            "etcdctl {args:?}: bad json {e}: {}",
            String::from_utf8_lossy(&o.stdout)
        )
    })
}

/// An int64/uint64 the gateway writes: a decimal string.
fn int_str(v: &Value) -> u64 {
    v.as_str()
        .unwrap_or_else(|| panic!("not an int64 string: {v}"))
        .parse()
        .unwrap_or_else(|e| panic!("{v}: {e}"))
}

fn must_http_json(addr: &str, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (code, text) = http(addr, method, path, body).unwrap_or_else(|e| panic!("{path}: {e}"));
    let v =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: bad json {e}: {text:?}"));
    (code, v)
}

fn three_stores() -> (ProcCluster, String, Vec<u64>) {
    let c = ProcCluster::start(ClusterOpts {
        pds: 1,
        stores: 3,
        ..Default::default()
    });
    c.wait_ready(Duration::from_secs(60));
    let endpoints = c
        .stores
        .iter()
        .map(|s| s.addr.clone())
        .collect::<Vec<_>>()
        .join(",");
    let mut ids = vec![];
    let ok = wait_until(Duration::from_secs(60), || {
        ids = (0..3).filter_map(|i| c.store_id_of(i)).collect();
        ids.len() == 3
    });
    assert!(
        ok,
        "stores never all registered: {}",
        c.kvctl_json(&["stores"])
    );
    // Every store hosts a peer (so has raft figures to report).
    let ok = wait_until(Duration::from_secs(60), || {
        regions_healthy(&c.kvctl_json(&["regions"]), 3)
    });
    assert!(
        ok,
        "regions never reached 3 peers: {}",
        c.kvctl_json(&["regions"])
    );
    (c, endpoints, ids)
}

#[test]
fn etcdctl_and_gateway_see_stores_as_members() {
    let (c, endpoints, ids) = three_stores();
    let want: BTreeSet<u64> = ids.iter().copied().collect();

    // etcdctl member list (gRPC Cluster.MemberList).
    let mut list = Value::Null;
    let ok = wait_until(Duration::from_secs(30), || {
        list = etcdctl_json(&endpoints, &["member", "list"]).unwrap_or_else(Value::from);
        list["members"].as_array().map_or(0, |m| m.len()) == 3
    });
    assert!(ok, "member list never showed 3 members: {list}");
    let cluster_id = list["header"]["cluster_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cluster id: {list}"));
    assert_ne!(cluster_id, 0, "{list}");
    assert!(want.contains(&list["header"]["member_id"].as_u64().unwrap()));
    let mut seen = BTreeSet::new();
    for m in list["members"].as_array().unwrap() {
        let id = m["ID"].as_u64().unwrap();
        seen.insert(id);
        assert_eq!(m["name"], format!("store-{id}"));
        let addr = &c.stores[c.store_index_of(id).unwrap()].addr;
        let url = format!("http://{addr}");
        assert_eq!(m["clientURLs"], serde_json::json!([url]), "{m}");
        assert_eq!(m["peerURLs"], serde_json::json!([url]), "{m}");
    }
    assert_eq!(seen, want);
    let o = etcdctl(&endpoints, &["member", "list"]);
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 3);

    // etcdctl endpoint status (Maintenance.Status on every endpoint): one leader for all.
    let mut status = Value::Null;
    let ok = wait_until(Duration::from_secs(30), || {
        status = etcdctl_json(&endpoints, &["endpoint", "status"]).unwrap_or_else(Value::from);
        let Some(eps) = status.as_array() else {
            return false;
        };
        let leaders: BTreeSet<u64> = eps
            .iter()
            .map(|e| e["Status"]["leader"].as_u64().unwrap_or(0))
            .collect();
        // A store whose peers were just created has applied nothing yet: wait for it too.
        let applied = eps
            .iter()
            .all(|e| e["Status"]["raftAppliedIndex"].as_u64().unwrap_or(0) > 0);
        leaders.len() == 1 && leaders.iter().all(|l| want.contains(l)) && applied
    });
    assert!(ok, "endpoint status never agreed on a leader: {status}");
    let eps = status.as_array().unwrap();
    assert_eq!(eps.len(), 3);
    for e in eps {
        let addr = e["Endpoint"].as_str().unwrap();
        let s = &e["Status"];
        let id = c.store_id_of(c.stores.iter().position(|x| x.addr == addr).unwrap());
        assert_eq!(s["header"]["member_id"].as_u64(), id, "{e}");
        assert_eq!(s["header"]["cluster_id"].as_u64(), Some(cluster_id), "{e}");
        assert!(s["header"]["revision"].as_u64().unwrap() > 0, "{e}");
        assert!(s["header"]["raft_term"].as_u64().unwrap() >= 1, "{e}");
        assert_eq!(s["version"], "3.5.17");
        assert!(s["dbSize"].as_u64().unwrap() > 0, "{e}");
        assert!(s["dbSizeInUse"].as_u64().unwrap() <= s["dbSize"].as_u64().unwrap());
        assert!(
            s["raftIndex"].as_u64() >= s["raftAppliedIndex"].as_u64(),
            "{e}"
        );
        assert!(s["raftTerm"].as_u64().unwrap() >= 1, "{e}");
        assert!(s["raftAppliedIndex"].as_u64().unwrap() > 0, "{e}");
        assert!(s.get("errors").is_none(), "{e}");
    }

    // Alarms, defragmentation, and membership changes refused as documented.
    let o = etcdctl(&endpoints, &["alarm", "list"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = etcdctl(&endpoints, &["defrag"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        out.matches("Finished defragmenting etcd member").count(),
        3,
        "{out}"
    );
    let o = etcdctl(
        &endpoints,
        &["member", "add", "x", "--peer-urls=http://127.0.0.1:1"],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("atoll: members are storage nodes"), "{err}");
    let o = etcdctl(&endpoints, &["member", "remove", "abcdef"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("etcdserver: member not found"), "{err}");

    // The gateway on the same ports.
    let addr = c.stores[0].addr.as_str();
    let (code, v) = must_http_json(addr, "GET", "/version", "");
    assert_eq!(code, 200);
    assert_eq!(
        v,
        serde_json::json!({"etcdserver": "3.5.17", "etcdcluster": "3.5.0"})
    );
    let (code, _) = http(addr, "POST", "/version", "").unwrap();
    assert_eq!(code, 405);

    let (code, v) = must_http_json(addr, "POST", "/v3/cluster/member/list", "{}");
    assert_eq!(code, 200, "{v}");
    assert_eq!(int_str(&v["header"]["cluster_id"]), cluster_id, "{v}");
    assert_eq!(Some(int_str(&v["header"]["member_id"])), c.store_id_of(0));
    assert!(
        v["header"].get("revision").is_none(),
        "member calls carry no revision: {v}"
    );
    let members = v["members"].as_array().unwrap();
    assert_eq!(
        members
            .iter()
            .map(|m| int_str(&m["ID"]))
            .collect::<BTreeSet<_>>(),
        want
    );
    for m in members {
        assert_eq!(m["name"], format!("store-{}", int_str(&m["ID"])));
        assert!(m["clientURLs"][0]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:"));
        assert!(m.get("isLearner").is_none(), "false is omitted: {m}");
    }
    // lowerCamel and snake_case both read.
    let (code, v) = must_http_json(
        addr,
        "POST",
        "/v3/cluster/member/list",
        r#"{"linearizable":true}"#,
    );
    assert_eq!((code, v["members"].as_array().unwrap().len()), (200, 3));

    let (code, v) = must_http_json(addr, "POST", "/v3/maintenance/status", "");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["version"], "3.5.17");
    assert!(int_str(&v["dbSize"]) > 0, "{v}");
    assert!(want.contains(&int_str(&v["leader"])), "{v}");
    assert!(int_str(&v["raftTerm"]) >= 1, "{v}");
    assert!(int_str(&v["raftIndex"]) > 0, "{v}");
    assert!(int_str(&v["header"]["revision"]) > 0, "{v}");
    assert_eq!(Some(int_str(&v["header"]["member_id"])), c.store_id_of(0));

    let (code, v) = must_http_json(addr, "POST", "/v3/maintenance/alarm", r#"{"action":"GET"}"#);
    assert_eq!(code, 200, "{v}");
    assert!(v.get("alarms").is_none(), "{v}");
    let (code, v) = must_http_json(addr, "POST", "/v3/maintenance/defragment", "{}");
    assert_eq!((code, v), (200, serde_json::json!({})));

    // Errors as grpc-gateway writes them.
    let id = ids[0].to_string();
    let (code, v) = must_http_json(
        addr,
        "POST",
        "/v3/cluster/member/promote",
        &format!(r#"{{"ID":"{id}"}}"#),
    );
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["code"], 9);
    assert_eq!(v["error"], "etcdserver: can only promote a learner member");
    assert_eq!(v["message"], v["error"]);
    let (code, v) = must_http_json(
        addr,
        "POST",
        "/v3/cluster/member/remove",
        r#"{"ID":"1234567"}"#,
    );
    assert_eq!((code, v["code"].as_i64()), (404, Some(5)), "{v}");
    assert_eq!(v["error"], "etcdserver: member not found");
    let (code, v) = must_http_json(addr, "POST", "/v3/maintenance/hash", "{}");
    assert_eq!((code, v["code"].as_i64()), (501, Some(12)), "{v}");
    let (code, v) = must_http_json(addr, "POST", "/v3/kv/range", "{");
    assert_eq!((code, v["code"].as_i64()), (400, Some(3)), "{v}");
    let (code, _) = http(addr, "GET", "/v3/kv/range", "").unwrap();
    assert_eq!(code, 405);
    let (code, _) = http(addr, "POST", "/v3/no/such/call", "{}").unwrap();
    assert_eq!(code, 404);
}

/// Needs the KV service: `etcdctl endpoint health` reads the key `health`; `/health` ranges it.
#[test]
fn endpoint_health_through_etcdctl_and_http() {
    let (c, endpoints, _) = three_stores();
    let mut health = Value::Null;
    let ok = wait_until(Duration::from_secs(30), || {
        health = etcdctl_json(&endpoints, &["endpoint", "health"]).unwrap_or_else(Value::from);
        health
            .as_array()
            .is_some_and(|a| a.len() == 3 && a.iter().all(|e| e["health"] == true))
    });
    assert!(ok, "endpoint health: {health}");
    for s in &c.stores {
        let (code, v) = must_http_json(&s.addr, "GET", "/health", "");
        assert_eq!(code, 200, "{v}");
        assert_eq!(v, serde_json::json!({"health": "true", "reason": ""}));
        let (code, v) = must_http_json(&s.addr, "GET", "/health?serializable=true", "");
        assert_eq!((code, &v["health"]), (200, &Value::from("true")), "{v}");
    }
}

/// `etcdctl watch ARGS -w json` in the background: its responses, one parsed JSON per line,
/// arrive on the returned channel. Killed on drop.
struct WatchProc {
    child: std::process::Child,
    rx: std::sync::mpsc::Receiver<Value>,
}

impl Drop for WatchProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn etcdctl_watch(endpoint: &str, args: &[&str]) -> WatchProc {
    use std::io::BufRead;
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .arg("--dial-timeout=5s")
        .arg("watch")
        .args(args)
        .args(["-w", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run etcdctl watch");
    let out = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if tx.send(v).is_err() {
                    return;
                }
            }
        }
    });
    WatchProc { child, rx }
}

/// (type, key, value, mod_revision, prev value) of an etcdctl JSON event.
type Ev = (String, String, String, u64, Option<String>);

fn b64(v: &Value) -> String {
    use base64::Engine;
    let s = v.as_str().unwrap_or("");
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(s).unwrap()).unwrap()
}

impl WatchProc {
    /// Events until `n` have arrived (or the timeout).
    fn events(&self, n: usize, timeout: Duration) -> Vec<Ev> {
        let deadline = std::time::Instant::now() + timeout;
        let mut out = vec![];
        while out.len() < n {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Ok(resp) = self.rx.recv_timeout(left) else {
                break;
            };
            for e in resp["Events"].as_array().into_iter().flatten() {
                let kv = &e["kv"];
                let ty = if e["type"].as_i64().unwrap_or(0) == 1 {
                    "DELETE"
                } else {
                    "PUT"
                };
                out.push((
                    ty.to_string(),
                    b64(&kv["key"]),
                    b64(&kv["value"]),
                    kv["mod_revision"].as_u64().unwrap_or(0),
                    e.get("prev_kv").map(|p| b64(&p["value"])),
                ));
            }
        }
        out
    }
}

#[test]
fn etcdctl_watch_sees_every_change_across_regions_in_order_and_replays_history() {
    let (c, endpoints, _) = three_stores();
    let o = c.kvctl(&["split", "w/3", "w/6"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let eps: Vec<&str> = endpoints.split(',').collect();
    let live = etcdctl_watch(eps[0], &["--prefix", "w/", "--prev-kv"]);
    // Give the watch time to be created before the first write (etcdctl prints nothing
    // for the created response).
    std::thread::sleep(Duration::from_secs(2));
    let ops: Vec<(&str, &str, Option<&str>)> = vec![
        ("put", "w/1", Some("a")),
        ("put", "w/5", Some("b")),
        ("put", "w/9", Some("c")),
        ("put", "w/1", Some("a2")),
        ("del", "w/5", None),
        ("put", "x/outside", Some("no")),
        ("put", "w/8", Some("d")),
    ];
    let mut want: Vec<Ev> = vec![];
    let mut values: std::collections::HashMap<String, String> = Default::default();
    for (i, (op, k, v)) in ops.iter().enumerate() {
        let ep = eps[i % eps.len()];
        let mut args = vec![*op, *k];
        if let Some(v) = v {
            args.push(v);
        }
        let r = etcdctl_json(ep, &args).unwrap();
        let rev = r["header"]["revision"].as_u64().unwrap();
        if !k.starts_with("w/") {
            continue;
        }
        let prev = values.get(*k).cloned();
        match v {
            Some(v) => {
                want.push(("PUT".into(), k.to_string(), v.to_string(), rev, prev));
                values.insert(k.to_string(), v.to_string());
            }
            None => {
                want.push(("DELETE".into(), k.to_string(), String::new(), rev, prev));
                values.remove(*k);
            }
        }
    }
    let got = live.events(want.len(), Duration::from_secs(30));
    assert_eq!(got, want, "the live watch (prefix over 3 regions, prev-kv)");
    // Revisions strictly increase.
    assert!(got.windows(2).all(|w| w[0].3 < w[1].3), "{got:?}");

    // Replay from the third change's revision, through another store, without prev-kv.
    let from = want[2].3.to_string();
    let replay = etcdctl_watch(eps[2], &["--prefix", "w/", "--rev", &from]);
    let got = replay.events(want.len() - 2, Duration::from_secs(30));
    let want_tail: Vec<Ev> = want[2..]
        .iter()
        .map(|(t, k, v, r, _)| (t.clone(), k.clone(), v.clone(), *r, None))
        .collect();
    assert_eq!(got, want_tail, "the replay from --rev {from}");

    // A single key.
    let one = etcdctl_watch(eps[1], &["w/9"]);
    std::thread::sleep(Duration::from_secs(2));
    let r = etcdctl_json(eps[0], &["put", "w/9", "c2"]).unwrap();
    let rev = r["header"]["revision"].as_u64().unwrap();
    etcdctl_json(eps[0], &["put", "w/8", "not watched"]).unwrap();
    let got = one.events(1, Duration::from_secs(30));
    assert_eq!(
        got,
        vec![("PUT".into(), "w/9".into(), "c2".into(), rev, None)]
    );
    drop((live, replay, one));
    gateway_watch_ends_with_its_client(&c);
}

/// Open watch streams on a store, from its `/metrics`.
fn watch_streams(status_addr: &str) -> Option<i64> {
    let (_, body) = http(status_addr, "GET", "/metrics", "").ok()?;
    // Absent until the store's first watch stream: none open.
    Some(
        body.lines()
            .find_map(|l| l.strip_prefix("atoll_etcd_watch_streams "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0),
    )
}

/// A `/v3/watch` whose HTTP client goes away ends on the store: its stream and watchers are
/// dropped (it used to live on, waiting for more requests from a body that had ended).
fn gateway_watch_ends_with_its_client(c: &ProcCluster) {
    use std::io::{BufRead, BufReader, Write};
    let s = &c.stores[1];
    let none_open = wait_until(Duration::from_secs(10), || {
        watch_streams(&s.status_addr) == Some(0)
    });
    assert!(
        none_open,
        "watch streams before: {:?}",
        watch_streams(&s.status_addr)
    );
    let body = r#"{"create_request":{"key":"dy8=","range_end":"dzA="}}"#; // w/ .. w0
    let mut sock = std::net::TcpStream::connect(&s.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        sock,
        "POST /v3/watch HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n{body}",
        s.addr,
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(sock.try_clone().unwrap());
    let mut seen = String::new();
    while !seen.contains("\"created\":true") {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "closed: {seen}");
        seen.push_str(&line);
    }
    assert_eq!(watch_streams(&s.status_addr), Some(1));
    drop(reader);
    sock.shutdown(std::net::Shutdown::Both).unwrap();
    drop(sock);
    // A write into the watched range, so a stream still open would try to send.
    let o = c.kvctl(&["put", "w/2", "after the client left"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let closed = wait_until(Duration::from_secs(10), || {
        watch_streams(&s.status_addr) == Some(0)
    });
    assert!(
        closed,
        "the gateway watch stream outlived its client: {:?} open",
        watch_streams(&s.status_addr)
    );
}
