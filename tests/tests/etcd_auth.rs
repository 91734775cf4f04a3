//! Authentication and authorization on real processes (issue 16, acceptance b): etcdctl 3.4
//! with `--user` sets up root, a user, a role with a prefix permission; the user reads what it
//! may and is refused the rest (write, another prefix, a watch, a lease on a key it may not
//! write) through etcd's API and through Atoll's own API (kvctl); tokens work on another store
//! than the one that issued them; a revoked permission is enforced on another store within the
//! refresh bound; a password change ends old tokens; auth survives a restart of every store;
//! auth disable opens everything again.

use atoll_proto::etcdserverpb::kv_client::KvClient;
use atoll_proto::etcdserverpb::{AuthenticateRequest, RangeRequest};
use atoll_tests::etcd_watch::channel;
use atoll_tests::procs::{etcdctl, http, regions_healthy, ClusterOpts, ProcCluster};
use atoll_tests::wait_until;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const ROOT: &str = "root:rootpw";
const ALICE: &str = "alice:alicepw";

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "failed: {}", out(&o));
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// A command that must fail with `msg` in its output.
fn refused(o: Output, msg: &str) {
    assert!(!o.status.success(), "succeeded: {}", out(&o));
    assert!(out(&o).contains(msg), "expected {msg:?} in: {}", out(&o));
}

fn as_user(ep: &str, user: &str, args: &[&str]) -> Output {
    let u = format!("--user={user}");
    let mut a = vec![u.as_str()];
    a.extend_from_slice(args);
    etcdctl(ep, &a)
}

fn kvctl_as(c: &ProcCluster, user: Option<&str>, args: &[&str]) -> Output {
    let mut a = vec!["--timeout", "5"];
    if let Some(u) = user {
        a.extend_from_slice(&["--user", u]);
    }
    a.extend_from_slice(args);
    c.kvctl(&a)
}

/// A token from etcd's Authenticate on `addr`.
async fn token(addr: &str, name: &str, password: &str) -> String {
    atoll_proto::etcdserverpb::auth_client::AuthClient::new(channel(addr))
        .authenticate(AuthenticateRequest {
            name: name.into(),
            password: password.into(),
        })
        .await
        .expect("authenticate")
        .into_inner()
        .token
}

/// A Range of `key` on `addr` with `token`.
async fn range(addr: &str, token: &str, key: &str) -> Result<usize, tonic::Status> {
    let mut req = tonic::Request::new(RangeRequest {
        key: key.as_bytes().to_vec(),
        ..Default::default()
    });
    req.metadata_mut().insert("token", token.parse().unwrap());
    Ok(KvClient::new(channel(addr))
        .range(req)
        .await?
        .into_inner()
        .kvs
        .len())
}

/// A gateway POST with `token` as the `Authorization` header: status and body.
fn http_auth(addr: &str, token: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {token}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("answer");
    let code = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (code, body.to_string())
}

/// `etcdctl watch` for `user` on `prefix` for at most `secs`: its output.
fn watch_briefly(ep: &str, user: &str, prefix: &str, secs: u64, then: impl FnOnce()) -> String {
    let mut w = Command::new("timeout")
        .arg(secs.to_string())
        .arg("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={ep}"))
        .arg(format!("--user={user}"))
        .args(["watch", prefix, "--prefix"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("etcdctl watch");
    std::thread::sleep(Duration::from_millis(1500));
    then();
    let mut text = String::new();
    let stdout = w.stdout.take().unwrap();
    let stderr = w.stderr.take().unwrap();
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            s.push_str(&l);
            s.push('\n');
        }
        s
    });
    for l in BufReader::new(stdout).lines().map_while(Result::ok) {
        text.push_str(&l);
        text.push('\n');
        if text.contains("/y") {
            break;
        }
    }
    let _ = w.kill();
    let _ = w.wait();
    text + &e.join().unwrap_or_default()
}

#[test]
fn etcdctl_and_kvctl_users_roles_and_permissions() {
    let started = Instant::now();
    let mut c = ProcCluster::start(ClusterOpts {
        pds: 1,
        stores: 3,
        ..Default::default()
    });
    c.wait_ready(Duration::from_secs(60));
    assert!(
        wait_until(Duration::from_secs(60), || regions_healthy(
            &c.kvctl_json(&["regions"]),
            3
        )),
        "regions never reached 3 peers"
    );
    let s: Vec<String> = c.stores.iter().map(|s| s.addr.clone()).collect();
    let (s0, s1, s2) = (s[0].as_str(), s[1].as_str(), s[2].as_str());

    // Set-up as in etcd's docs: root, auth enable (etcdctl adds the root role), then as root
    // a user with a role reading the prefix /a/.
    refused(etcdctl(s0, &["auth", "enable"]), "root user does not exist");
    ok(etcdctl(s0, &["user", "add", ROOT]));
    assert!(ok(etcdctl(s0, &["auth", "enable"])).contains("Authentication Enabled"));
    ok(as_user(s1, ROOT, &["user", "add", ALICE]));
    ok(as_user(s1, ROOT, &["role", "add", "reader"]));
    ok(as_user(
        s1,
        ROOT,
        &[
            "role",
            "grant-permission",
            "reader",
            "read",
            "/a/",
            "--prefix=true",
        ],
    ));
    ok(as_user(
        s1,
        ROOT,
        &["user", "grant-role", "alice", "reader"],
    ));
    ok(as_user(s1, ROOT, &["put", "/a/x", "1"]));
    ok(as_user(s1, ROOT, &["put", "/b/x", "2"]));
    let role = ok(as_user(s0, ROOT, &["role", "get", "reader"]));
    assert!(role.contains("[/a/, /a0) (prefix /a/)"), "{role}");
    let users = ok(as_user(s0, ROOT, &["user", "list"]));
    assert_eq!(
        users.split_whitespace().collect::<Vec<_>>(),
        ["alice", "root"]
    );
    // etcd's rules: root cannot be deleted nor lose its role while auth is on.
    refused(
        as_user(s0, ROOT, &["user", "delete", "root"]),
        "invalid auth management",
    );
    refused(
        as_user(s0, ROOT, &["user", "revoke-role", "root", "root"]),
        "invalid auth management",
    );
    refused(
        as_user(s0, ALICE, &["user", "add", "eve:x"]),
        "permission denied",
    );
    refused(
        as_user(s0, "alice:wrong", &["get", "/a/x"]),
        "authentication failed",
    );

    // No user: refused (every store within the refresh bound).
    for ep in [s0, s1, s2] {
        assert!(
            wait_until(Duration::from_secs(3), || {
                let o = etcdctl(ep, &["get", "/a/x"]);
                !o.status.success() && out(&o).contains("user name is empty")
            }),
            "{ep} answered without a user"
        );
    }

    // Acceptance (b), through a store other than the one that set it up.
    assert_eq!(
        ok(as_user(s2, ALICE, &["get", "/a/x", "--print-value-only"])).trim(),
        "1"
    );
    refused(
        as_user(s2, ALICE, &["put", "/a/x", "9"]),
        "permission denied",
    );
    refused(as_user(s2, ALICE, &["get", "/b/x"]), "permission denied");
    refused(
        as_user(s2, ALICE, &["get", "/", "--prefix"]),
        "permission denied",
    );
    let w = watch_briefly(s2, ALICE, "/b/", 10, || {});
    assert!(w.contains("permission denied"), "alice's watch of /b/: {w}");
    let grant = ok(as_user(s2, ALICE, &["lease", "grant", "60"]));
    let lease = grant
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    refused(
        as_user(s2, ALICE, &["put", "/b/x", "3", "--lease", &lease]),
        "permission denied",
    );
    // Root can.
    ok(as_user(s2, ROOT, &["put", "/b/x", "3", "--lease", &lease]));
    assert_eq!(
        ok(as_user(s0, ROOT, &["get", "/b/x", "--print-value-only"])).trim(),
        "3"
    );
    // Alice may not revoke a lease holding a key she may not write (etcd's checkLeasePuts).
    refused(
        as_user(s1, ALICE, &["lease", "revoke", &lease]),
        "permission denied",
    );
    let w = watch_briefly(s2, ROOT, "/b/", 10, || {
        ok(as_user(s0, ROOT, &["put", "/b/y", "4"]));
    });
    assert!(w.contains("/b/y"), "root's watch of /b/: {w}");

    // Atoll's own API through kvctl, the same permissions.
    let v = ok(kvctl_as(&c, Some(ALICE), &["get", "/a/x"]));
    assert_eq!(v.trim(), "1");
    refused(
        kvctl_as(&c, Some(ALICE), &["put", "/a/x", "9"]),
        "permission denied",
    );
    refused(
        kvctl_as(&c, Some(ALICE), &["get", "/b/x"]),
        "permission denied",
    );
    refused(
        kvctl_as(
            &c,
            Some(ALICE),
            &["txn", "put", "/a/y", "1", "put", "/b/y", "1"],
        ),
        "permission denied",
    );
    refused(
        kvctl_as(&c, Some(ALICE), &["watch", "/b/", "--prefix"]),
        "permission denied",
    );
    let scan = ok(kvctl_as(&c, Some(ALICE), &["scan", "/a/", "/a0"]));
    assert!(scan.contains("/a/x"), "{scan}");
    refused(
        kvctl_as(&c, Some(ALICE), &["scan", "/", "/c"]),
        "permission denied",
    );
    refused(kvctl_as(&c, None, &["get", "/a/x"]), "user name is empty");
    refused(
        kvctl_as(&c, Some("alice:wrong"), &["get", "/a/x"]),
        "authentication failed",
    );
    ok(kvctl_as(&c, Some(ROOT), &["put", "/b/z", "5"]));
    ok(kvctl_as(
        &c,
        Some(ROOT),
        &["txn", "put", "/a/y", "1", "put", "/b/y", "1"],
    ));
    let status = ok(kvctl_as(&c, Some(ROOT), &["auth", "status"]));
    assert!(status.contains("Authentication Status: true"), "{status}");
    ok(kvctl_as(&c, Some(ROOT), &["role", "add", "writer"]));
    ok(kvctl_as(
        &c,
        Some(ROOT),
        &[
            "role",
            "grant-permission",
            "writer",
            "readwrite",
            "/w/",
            "--prefix",
        ],
    ));
    ok(kvctl_as(
        &c,
        Some(ROOT),
        &["user", "add", "bob", "--new-user-password", "bobpw"],
    ));
    ok(kvctl_as(
        &c,
        Some(ROOT),
        &["user", "grant-role", "bob", "writer"],
    ));
    ok(kvctl_as(&c, Some("bob:bobpw"), &["put", "/w/1", "x"]));
    refused(
        kvctl_as(&c, Some("bob:bobpw"), &["put", "/a/1", "x"]),
        "permission denied",
    );

    let rt = atoll_tests::runtime();
    rt.block_on(async {
        // A token issued by one store works on the others.
        let t = token(s0, "alice", "alicepw").await;
        for ep in [s0, s1, s2] {
            assert_eq!(range(ep, &t, "/a/x").await.unwrap(), 1, "{ep}");
            let e = range(ep, &t, "/b/x").await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        }
        let e = range(s1, "forged.token", "/a/x").await.unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (
                tonic::Code::Unauthenticated,
                "etcdserver: invalid auth token"
            )
        );

        // A permission revoked through s0 is enforced on s2 for calls starting 500 ms later.
        let out = etcdctl(
            s0,
            &[
                "--user",
                ROOT,
                "role",
                "revoke-permission",
                "reader",
                "/a/",
                "--prefix=true",
            ],
        );
        assert!(out.status.success(), "{out:?}");
        // A call to s2 starting more than 500 ms (REFRESH_INTERVAL) after the revoke was
        // acknowledged is refused: the first one, with no call in between to wake s2's cache.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let r = range(s2, &t, "/a/x").await;
        assert!(
            matches!(&r, Err(e) if e.code() == tonic::Code::PermissionDenied),
            "still allowed 600 ms after the revoke: {r:?}"
        );
        // Granted again: at once everywhere (a refusal is checked against a fresh read).
        let out = etcdctl(
            s0,
            &[
                "--user",
                ROOT,
                "role",
                "grant-permission",
                "reader",
                "read",
                "/a/",
                "--prefix=true",
            ],
        );
        assert!(out.status.success(), "{out:?}");
        assert_eq!(range(s1, &t, "/a/x").await.unwrap(), 1);

        // The gateway: Authenticate on one store, the Authorization header on another.
        let (code, body) = http(
            s1,
            "POST",
            "/v3/auth/authenticate",
            r#"{"name":"alice","password":"alicepw"}"#,
        )
        .unwrap();
        assert_eq!(code, 200, "{body}");
        let gw: Value = serde_json::from_str(&body).unwrap();
        let gw_token = gw["token"].as_str().unwrap().to_string();
        assert_eq!(range(s2, &gw_token, "/a/x").await.unwrap(), 1);
        // The gateway's own calls: the Authorization header is the token.
        let (code, body) = http(s0, "POST", "/v3/kv/range", r#"{"key":"L2EveA=="}"#).unwrap();
        assert_eq!(code, 400, "{body}");
        assert!(body.contains("etcdserver: user name is empty"), "{body}");
        let (code, body) = http_auth(s2, &gw_token, "/v3/kv/range", r#"{"key":"L2EveA=="}"#);
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("\"count\":\"1\""), "{body}");
        let (code, body) = http_auth(s2, &gw_token, "/v3/kv/range", r#"{"key":"L2IveA=="}"#);
        assert_eq!(code, 403, "{body}");
        assert!(body.contains("etcdserver: permission denied"), "{body}");
        let (code, body) = http_auth(s2, &gw_token, "/v3/auth/user/list", "{}");
        assert_eq!(code, 403, "{body}");
        let (code, body) = http_auth(s2, "nonsense", "/v3/kv/range", r#"{"key":"L2EveA=="}"#);
        assert_eq!(code, 401, "{body}");
        assert!(body.contains("etcdserver: invalid auth token"), "{body}");

        // A password change (through the API: etcdctl reads the new one from a terminal)
        // ends the tokens issued before it.
        let root = token(s1, "root", "rootpw").await;
        let mut req =
            tonic::Request::new(atoll_proto::etcdserverpb::AuthUserChangePasswordRequest {
                name: "alice".into(),
                password: "alicepw2".into(),
                hashed_password: String::new(),
            });
        req.metadata_mut().insert("token", root.parse().unwrap());
        atoll_proto::etcdserverpb::auth_client::AuthClient::new(channel(s1))
            .user_change_password(req)
            .await
            .expect("change alice's password");
        let changed = Instant::now();
        loop {
            match range(s2, &t, "/a/x").await {
                Err(e) if e.code() == tonic::Code::Unauthenticated => break,
                r => {
                    assert!(
                        changed.elapsed() < Duration::from_secs(2),
                        "old token still good 2 s after the password change: {r:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });

    // Every store restarts: users, roles and permissions are still there.
    for st in c.stores.iter_mut() {
        st.proc_.kill();
    }
    for st in c.stores.iter_mut() {
        st.proc_.start();
    }
    let alice2 = "alice:alicepw2";
    assert!(
        wait_until(Duration::from_secs(60), || {
            as_user(s0, ROOT, &["put", "__ready", "1"]).status.success()
        }),
        "no store took root's put after the restart"
    );
    assert_eq!(
        ok(as_user(s1, alice2, &["get", "/a/x", "--print-value-only"])).trim(),
        "1"
    );
    refused(as_user(s2, alice2, &["get", "/b/x"]), "permission denied");
    refused(etcdctl(s0, &["get", "/a/x"]), "user name is empty");
    refused(
        kvctl_as(&c, Some(alice2), &["put", "/a/x", "9"]),
        "permission denied",
    );

    // Auth disable: everything open again, on every store.
    ok(as_user(s0, ROOT, &["auth", "disable"]));
    for ep in [s0, s1, s2] {
        assert!(
            wait_until(Duration::from_secs(3), || etcdctl(ep, &["get", "/b/x"])
                .status
                .success()),
            "{ep} still refuses after auth disable"
        );
    }
    ok(kvctl_as(&c, None, &["put", "/a/x", "2"]));
    // (etcdctl 3.4 has no `auth status`: kvctl's, without a user now.)
    let status = ok(kvctl_as(&c, None, &["auth", "status"]));
    assert!(status.contains("Authentication Status: false"), "{status}");
    eprintln!("etcd_auth took {:?}", started.elapsed());
    drop(c);
}
