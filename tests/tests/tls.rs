//! Mutual TLS on every link, on real processes (issue 16): one PD and three storage nodes with
//! certificates from `kvctl cert`; kvctl (put, get, scan, txn) and etcdctl 3.4 (`--cacert
//! --cert --key`) work; clients without a certificate, with one from another CA or an expired
//! one are refused, and so is plaintext; a storage node with another CA's certificate cannot
//! join and the cluster keeps serving; a client certificate of the cluster's CA is no cluster
//! member (raft, PD's store RPCs, PD's peer port); certificates rotated on disk are served to
//! new connections with no restart and no failed request.

use atoll_proto::pdpb;
use atoll_proto::raft_serverpb;
use atoll_tests::procs::{
    bin, etcdctl, tls_client_flags, tls_server_flags, ClusterOpts, ProcCluster,
};
use atoll_tests::wait_until;
use atoll_util::tls::{cert_serial_hex, ClientTls};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn kvctl_cert(dir: &Path, extra: &[&str]) {
    let o = Command::new(bin("kvctl"))
        .args(["cert", "--dir"])
        .arg(dir)
        .args(extra)
        .output()
        .expect("run kvctl cert");
    assert!(
        o.status.success(),
        "kvctl cert {extra:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}, stdout {:?}, stderr {:?}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).trim(),
        String::from_utf8_lossy(&o.stderr).trim()
    )
}

/// kvctl with explicit TLS flags (not the cluster's).
fn kvctl_with(c: &ProcCluster, tls: &[String], args: &[&str]) -> Output {
    let mut a: Vec<&str> = tls.iter().map(String::as_str).collect();
    a.extend_from_slice(args);
    atoll_tests::procs::kvctl(&c.pd_endpoints(), &a)
}

/// A refused kvctl run: non-zero exit, one line on stderr, no panic.
fn assert_refused(o: &Output, what: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{what} was served: {}", text(o));
    assert!(
        err.starts_with("kvctl: ") && !err.contains("panicked"),
        "{what}: not a clean error: {}",
        text(o)
    );
}

fn host_port(addr: &str) -> (String, u16) {
    let (h, p) = addr.rsplit_once(':').expect("host:port");
    (h.to_string(), p.parse().expect("port"))
}

async fn served_serial(tls: &ClientTls, addr: &str) -> String {
    let (h, p) = host_port(addr);
    let der = atoll_util::tls::served_certificate(tls, &h, p)
        .await
        .unwrap_or_else(|e| panic!("TLS to {addr}: {e}"));
    cert_serial_hex(&der).expect("serial")
}

fn serial_of_file(path: &Path) -> String {
    let pem = std::fs::read(path).expect("read cert");
    let der = atoll_util::tls::parse_certs("cert", &pem).expect("cert");
    cert_serial_hex(&der[0]).expect("serial")
}

/// Plaintext bytes to a TLS port: the server answers with a TLS alert or closes, never with
/// HTTP, and the connection ends within the handshake timeout.
fn plaintext_is_refused(addr: &str) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = s.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut got = vec![];
    let _ = s.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got);
    assert!(
        !text.contains("HTTP/1.1 200") && !text.contains("etcdserver"),
        "plaintext got an answer from {addr}: {text:?}"
    );
}

fn client_tls(certs: &Path, ca: &str, name: &str) -> ClientTls {
    let f = |n: &str| certs.join(n).display().to_string();
    ClientTls::new(
        vec![f(ca)],
        Some((f(&format!("{name}.pem")), f(&format!("{name}-key.pem")))),
    )
    .expect("client TLS")
}

async fn raft_call(tls: &ClientTls, addr: &str) -> Result<(), tonic::Status> {
    let ep = atoll_util::tls::endpoint(addr, Some(tls))
        .unwrap()
        .connect_timeout(Duration::from_secs(5));
    let ch = atoll_util::tls::connect(ep, Some(tls))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut c = raft_serverpb::raft_client::RaftClient::new(ch);
    let empty = tokio_stream_iter(vec![]);
    tokio::time::timeout(Duration::from_secs(10), c.raft(empty))
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no answer"))?
        .map(|_| ())
}

fn tokio_stream_iter(
    v: Vec<raft_serverpb::BatchRaftMessage>,
) -> impl futures::Stream<Item = raft_serverpb::BatchRaftMessage> {
    futures::stream::iter(v)
}

async fn put_store_call(tls: &ClientTls, addr: &str) -> Result<pdpb::PutStoreResponse, String> {
    let ep = atoll_util::tls::endpoint(addr, Some(tls))
        .unwrap()
        .connect_timeout(Duration::from_secs(5));
    let ch = atoll_util::tls::connect(ep, Some(tls))
        .await
        .map_err(|e| e.to_string())?;
    pdpb::pd_client::PdClient::new(ch)
        .put_store(pdpb::PutStoreRequest {
            header: None,
            store: Some(atoll_proto::metapb::Store {
                id: 999_999,
                address: "127.0.0.1:1".into(),
                ..Default::default()
            }),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

#[test]
fn mutual_tls_on_every_link() {
    let started = Instant::now();
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = certs_dir.path();
    kvctl_cert(certs, &["--other-ca", "--expired"]);
    // Stores are added one by one below: the first with the cluster's certificates.
    let mut c = ProcCluster::start(
        ClusterOpts {
            pds: 1,
            stores: 0,
            ..Default::default()
        }
        .mutual_tls(certs),
    );
    for _ in 0..3 {
        c.add_store();
    }
    c.wait_ready(Duration::from_secs(60));
    let rt = atoll_tests::runtime();

    // --- kvctl: put, get, scan, txn over mutual TLS.
    let o = c.kvctl(&["put", "tls/a", "1"]);
    assert!(o.status.success(), "put: {}", text(&o));
    let o = c.kvctl(&["txn", "put", "tls/b", "2", "put", "tls/c", "3"]);
    assert!(o.status.success(), "txn: {}", text(&o));
    let o = c.kvctl(&["get", "tls/b"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "2",
        "{}",
        text(&o)
    );
    let v = c.kvctl_json(&["scan", "tls/", "tls0"]);
    assert_eq!(v["kvs"].as_array().map(Vec::len), Some(3), "{v}");
    // Every store registers with PD over mutual TLS.
    let three = wait_until(Duration::from_secs(30), || {
        c.kvctl_json(&["stores"])["stores"].as_array().map(Vec::len) == Some(3)
    });
    assert!(three, "{}", c.kvctl_json(&["stores"]));

    // --- etcdctl 3.4 with --cacert --cert --key on the stores' ports (etcd's API).
    let endpoints = c
        .stores
        .iter()
        .map(|s| format!("https://{}", s.addr))
        .collect::<Vec<_>>()
        .join(",");
    let good = tls_client_flags(certs, "client");
    let flags = |v: &[String]| -> Vec<String> {
        v.chunks(2).map(|p| format!("{}={}", p[0], p[1])).collect()
    };
    let etcd_good = flags(&good);
    let mut a: Vec<&str> = etcd_good.iter().map(String::as_str).collect();
    a.extend(["put", "tls/etcd", "hello"]);
    let o = etcdctl(&endpoints, &a);
    assert!(o.status.success(), "etcdctl put: {}", text(&o));
    let mut a: Vec<&str> = etcd_good.iter().map(String::as_str).collect();
    a.extend(["get", "tls/etcd", "--print-value-only"]);
    let o = etcdctl(&endpoints, &a);
    assert!(o.status.success(), "etcdctl get: {}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "hello");
    let o = c.kvctl(&["get", "tls/etcd"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "hello",
        "{}",
        text(&o)
    );
    eprintln!(
        "kvctl and etcdctl over mutual TLS: ok ({:?})",
        started.elapsed()
    );

    // --- etcd's auth through etcdctl with --cacert --cert --key *and* --user: a user with
    // read on /a/ reads /a/x, cannot write it, read /b/x, watch /b/ or attach a lease to
    // /b/x; root can. Then auth is turned off again for the rest of the test.
    let e = |args: &[&str]| -> Output {
        let mut a: Vec<&str> = etcd_good.iter().map(String::as_str).collect();
        a.extend(args);
        etcdctl(&endpoints, &a)
    };
    let must = |args: &[&str]| -> String {
        let o = e(args);
        assert!(o.status.success(), "etcdctl {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let denied = |args: &[&str]| {
        let o = e(args);
        assert!(
            !o.status.success() && text(&o).contains("permission denied"),
            "etcdctl {args:?} was not refused: {}",
            text(&o)
        );
    };
    // Members advertise https URLs (clients that sync their endpoints dial them).
    let members = must(&["member", "list"]);
    assert!(
        members.contains("https://") && !members.contains("http://"),
        "{members}"
    );
    const ROOT: &str = "--user=root:rootpw";
    const ALICE: &str = "--user=alice:alicepw";
    must(&["user", "add", "root:rootpw"]);
    must(&["auth", "enable"]);
    must(&[ROOT, "user", "add", "alice:alicepw"]);
    must(&[ROOT, "role", "add", "reader"]);
    must(&[
        ROOT,
        "role",
        "grant-permission",
        "reader",
        "read",
        "/a/",
        "--prefix=true",
    ]);
    must(&[ROOT, "user", "grant-role", "alice", "reader"]);
    must(&[ROOT, "put", "/a/x", "1"]);
    must(&[ROOT, "put", "/b/x", "2"]);
    assert_eq!(must(&[ALICE, "get", "/a/x", "--print-value-only"]), "1");
    denied(&[ALICE, "put", "/a/x", "9"]);
    denied(&[ALICE, "get", "/b/x"]);
    let o = {
        let mut a: Vec<&str> = etcd_good.iter().map(String::as_str).collect();
        a.extend([ALICE, "watch", "/b/", "--prefix"]);
        let mut cmd = std::process::Command::new("timeout");
        cmd.arg("10")
            .arg("etcdctl")
            .args(&a)
            .env("ETCDCTL_API", "3");
        cmd.env("ETCDCTL_ENDPOINTS", &endpoints);
        cmd.output().expect("etcdctl watch")
    };
    assert!(
        text(&o).contains("permission denied"),
        "alice's watch of /b/: {}",
        text(&o)
    );
    let lease = must(&[ALICE, "lease", "grant", "60"]);
    let lease = lease
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    denied(&[ALICE, "put", "/b/x", "3", "--lease", &lease]);
    must(&[ROOT, "put", "/b/x", "3", "--lease", &lease]);
    assert_eq!(must(&[ROOT, "get", "/b/x", "--print-value-only"]), "3");
    must(&[ROOT, "auth", "disable"]);
    eprintln!(
        "etcd auth over mutual TLS with --user: ok ({:?})",
        started.elapsed()
    );

    // --- Refused: no certificate, another CA's, an expired one, plaintext.
    let ca = certs.join("ca.pem").display().to_string();
    let quick = ["--timeout", "3", "get", "tls/a"];
    assert_refused(
        &kvctl_with(&c, &["--cacert".into(), ca.clone()], &quick),
        "a client without a certificate",
    );
    let mut other = tls_client_flags(certs, "other-client");
    other[1] = certs.join("other-ca.pem").display().to_string();
    assert_refused(&kvctl_with(&c, &other, &quick), "another CA's client");
    // Another CA's certificate, trusting the cluster's CA: refused by the server, not the client.
    let mut other_trusting = tls_client_flags(certs, "other-client");
    other_trusting[1] = ca.clone();
    assert_refused(
        &kvctl_with(&c, &other_trusting, &quick),
        "another CA's client trusting the cluster CA",
    );
    assert_refused(
        &kvctl_with(&c, &tls_client_flags(certs, "expired-client"), &quick),
        "an expired client certificate",
    );
    assert_refused(&kvctl_with(&c, &[], &quick), "a plaintext kvctl");
    for (what, tls) in [
        ("no certificate", vec![format!("--cacert={ca}")]),
        ("another CA", flags(&other_trusting)),
        ("expired", flags(&tls_client_flags(certs, "expired-client"))),
    ] {
        let mut a: Vec<&str> = tls.iter().map(String::as_str).collect();
        a.extend(["--command-timeout=3s", "get", "tls/etcd"]);
        let o = etcdctl(&endpoints, &a);
        assert!(
            !o.status.success() || o.stdout.is_empty(),
            "etcdctl with {what} was served: {}",
            text(&o)
        );
    }
    for s in &c.stores {
        plaintext_is_refused(&s.addr);
        plaintext_is_refused(&s.status_addr);
    }
    plaintext_is_refused(&c.pds[0].client_addr);
    plaintext_is_refused(&c.pds[0].peer_addr);
    // The status port serves HTTPS with the node certificate.
    let good_tls = client_tls(certs, "ca.pem", "client");
    rt.block_on(served_serial(&good_tls, &c.stores[0].status_addr));
    // Everyone still serves.
    let o = c.kvctl(&["get", "tls/a"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "1",
        "{}",
        text(&o)
    );
    eprintln!("refusals: ok ({:?})", started.elapsed());

    // --- Cluster membership: a client certificate of the cluster's CA (CN root) is no member.
    let r = rt.block_on(raft_call(&good_tls, &c.stores[0].addr));
    let e = r.expect_err("raft from a client certificate was accepted");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let r = rt.block_on(put_store_call(&good_tls, &c.pds[0].client_addr));
    assert!(
        r.as_ref().is_err_and(|e| e.starts_with("PermissionDenied")),
        "PutStore from a client certificate: {r:?}"
    );
    // Another CA's node certificate (the member's name, wrong CA) is refused at the handshake.
    let other_node = client_tls(certs, "ca.pem", "other-node");
    let r = rt.block_on(raft_call(&other_node, &c.stores[0].addr));
    assert!(
        r.is_err(),
        "raft from another CA's node certificate was accepted"
    );
    let r = rt.block_on(put_store_call(&other_node, &c.pds[0].client_addr));
    assert!(r.is_err(), "PutStore from another CA's node: {r:?}");
    // PD's peer port takes members only: a client certificate's connection is closed.
    let peer = c.pds[0].peer_addr.clone();
    let r = rt.block_on(async {
        let ep = atoll_util::tls::endpoint(&peer, Some(&good_tls))
            .unwrap()
            .connect_timeout(Duration::from_secs(5));
        let ch = atoll_util::tls::connect(ep, Some(&good_tls)).await;
        match ch {
            Err(e) => Err(e.to_string()),
            Ok(ch) => {
                let mut p = pdpb::pd_peer_client::PdPeerClient::new(ch);
                tokio::time::timeout(
                    Duration::from_secs(10),
                    p.raft(futures::stream::iter(vec![pdpb::PdRaftBatch::default()])),
                )
                .await
                .map_err(|_| "no answer".to_string())?
                .map(|_| ())
                .map_err(|s| s.to_string())
            }
        }
    });
    assert!(r.is_err(), "PD's peer port served a client certificate");

    // --- A storage node with another CA's certificates cannot join; the cluster carries on.
    let other_flags = tls_server_flags(certs, "other-");
    let bad = c.add_store_with(&other_flags);
    std::thread::sleep(Duration::from_secs(6));
    let v = c.kvctl_json(&["stores"]);
    assert_eq!(
        v["stores"].as_array().map(Vec::len),
        Some(3),
        "a store with another CA's certificate joined: {v}"
    );
    let o = c.kvctl(&["put", "tls/after-bad", "ok"]);
    assert!(o.status.success(), "put after the bad store: {}", text(&o));
    // PD refused its handshakes (the store itself retries for a while before it logs).
    let pd_log = std::fs::read_to_string(&c.pds[0].proc_.log).unwrap_or_default();
    assert!(
        pd_log.contains("TLS handshake failed"),
        "PD's log shows no refused handshake: {}",
        c.pds[0].proc_.log_tail(10)
    );
    assert!(
        c.stores[bad].proc_.is_running() || {
            let log = std::fs::read_to_string(&c.stores[bad].proc_.log).unwrap_or_default();
            log.contains("cannot reach PD")
        },
        "the bad store: {}",
        c.stores[bad].proc_.log_tail(10)
    );
    c.stores[bad].proc_.kill();
    eprintln!("membership: ok ({:?})", started.elapsed());

    // --- Rotation: new certificates from the same CA replace the files on the running
    // cluster, while a client loop (a new kvctl, so new connections, each time) runs.
    let loop_certs = tempfile::tempdir().unwrap();
    for f in ["ca.pem", "client.pem", "client-key.pem"] {
        std::fs::copy(certs.join(f), loop_certs.path().join(f)).unwrap();
    }
    let loop_flags = tls_client_flags(loop_certs.path(), "client");
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let pd = c.pd_endpoints();
    let looper = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            let mut errors = vec![];
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let key = format!("rot/{i}");
                let mut a: Vec<&str> = loop_flags.iter().map(String::as_str).collect();
                a.extend(["--timeout", "10", "put", &key, "v"]);
                let o = atoll_tests::procs::kvctl(&pd, &a);
                if o.status.success() {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    errors.push(String::from_utf8_lossy(&o.stderr).to_string());
                }
            }
            errors
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let store_addr = c.stores[0].addr.clone();
    let status_addr = c.stores[0].status_addr.clone();
    let pd_addr = c.pds[0].client_addr.clone();
    let pd_peer = c.pds[0].peer_addr.clone();
    let before = serial_of_file(&certs.join("node.pem"));
    assert_eq!(rt.block_on(served_serial(&good_tls, &store_addr)), before);
    assert_eq!(rt.block_on(served_serial(&good_tls, &pd_addr)), before);
    kvctl_cert(certs, &["--reuse-ca"]);
    let after = serial_of_file(&certs.join("node.pem"));
    assert_ne!(
        before, after,
        "kvctl cert --reuse-ca made no new certificate"
    );
    // The new client certificate works (and the files are read anew by each kvctl).
    let new_client = client_tls(certs, "ca.pem", "client");
    for addr in [&store_addr, &status_addr, &pd_addr] {
        let ok = wait_until(Duration::from_secs(10), || {
            rt.block_on(served_serial(&new_client, addr)) == after
        });
        assert!(ok, "{addr} still serves the old certificate");
    }
    // PD's peer port serves the new peer certificate to a member (node.pem is the member's).
    let member = client_tls(certs, "ca.pem", "node");
    assert_eq!(rt.block_on(served_serial(&member, &pd_peer)), after);
    // Files that do not load (another CA's certificate with this key) are refused; the port
    // keeps serving the certificate it had.
    let good_cert = std::fs::read(certs.join("node.pem")).unwrap();
    let tmp = certs.join(".swap");
    std::fs::write(&tmp, std::fs::read(certs.join("other-node.pem")).unwrap()).unwrap();
    std::fs::rename(&tmp, certs.join("node.pem")).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(rt.block_on(served_serial(&new_client, &store_addr)), after);
    std::fs::write(&tmp, &good_cert).unwrap();
    std::fs::rename(&tmp, certs.join("node.pem")).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let errors = looper.join().unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "rotation: {ok} requests during it, {failed} failed ({:?})",
        started.elapsed()
    );
    assert!(ok >= 5, "too few requests during the rotation: {ok}");
    assert_eq!(failed, 0, "requests failed during the rotation: {errors:?}");
    // The rotated cluster still serves kvctl with the new client certificate and etcdctl.
    let o = c.kvctl(&["get", "tls/a"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "1",
        "{}",
        text(&o)
    );
    let mut a: Vec<&str> = etcd_good.iter().map(String::as_str).collect();
    a.extend(["get", "tls/etcd", "--print-value-only"]);
    let o = etcdctl(&endpoints, &a);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "hello",
        "{}",
        text(&o)
    );
    for s in &mut c.stores[..3] {
        assert!(s.proc_.is_running(), "{} exited", s.proc_.name);
    }
    assert!(c.pds[0].proc_.is_running(), "PD exited");
    eprintln!("done in {:?}", started.elapsed());
}

/// Flags that do not go together are refused at start with the flags' names.
#[test]
fn tls_flags_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(bin("storage-node"))
            .args(["--data-dir"])
            .arg(dir.path().join("s"))
            .args(args)
            .output()
            .expect("run storage-node")
    };
    let o = run(&["--cert-file", "x.pem"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--cert-file and --key-file go together"),
        "{}",
        text(&o)
    );
    let o = run(&["--cert-file", "x.pem", "--key-file", "y.pem"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("TLS needs a CA"),
        "{}",
        text(&o)
    );
    let o = Command::new(bin("kvctl"))
        .args(["--cert", "c.pem", "--key", "k.pem", "get", "x"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--cacert"),
        "{}",
        text(&o)
    );
}
