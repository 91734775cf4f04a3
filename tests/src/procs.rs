//! Multi-process clusters: the real `pd-server` and `storage-node` binaries on free
//! 127.0.0.1 ports, each with its own data directory and log file; everything started is
//! stopped (SIGKILL) when the cluster is dropped.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Where the binaries are: `ATOLL_BIN_DIR`, else next to the test executable's folder
/// (`target/<profile>/deps/..`).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("ATOLL_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --release --workspace --all-targets` first ({})",
        name,
        p.display()
    );
    p
}

/// A free local port for a server to listen on. Taken below the kernel's ephemeral range
/// (32768 and up), where outgoing connections pick their local ports: a port found free there
/// could be taken by some client socket before the server binds it. Each test process starts
/// at its own offset and checks that the port can be bound.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN)
}

pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    program: PathBuf,
}

impl Proc {
    fn spawn(
        program: PathBuf,
        name: &str,
        args: Vec<String>,
        env: Vec<(String, String)>,
        log: PathBuf,
    ) -> Proc {
        let mut p = Proc {
            name: name.into(),
            child: None,
            log,
            args,
            env,
            program,
        };
        p.start();
        p
    }

    pub fn start(&mut self) {
        // A process that exited by itself (a crash) may be started again.
        if let Some(c) = self.child.as_mut() {
            if matches!(c.try_wait(), Ok(Some(_))) {
                self.child = None;
            }
        }
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let err = log.try_clone().expect("log file");
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .env(
                "RUST_LOG",
                std::env::var("ATOLL_PROC_LOG").unwrap_or_else(|_| "info".into()),
            );
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        // Processes that crash on purpose (failpoints, abort on panic) leave no core files.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &lim);
                Ok(())
            });
        }
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", self.name)),
        );
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait (SIGKILL after `grace`).
    pub fn terminate(&mut self, grace: Duration) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }

    /// Waits up to `timeout` for the process to exit by itself; its exit status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Some(st);
                }
            } else {
                return None;
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sets (or, with `None`, removes) an environment variable for the next starts.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.into(), v.into()));
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let v: Vec<&str> = s.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct PdProc {
    pub proc_: Proc,
    pub client_addr: String,
    pub peer_addr: String,
    /// HTTP: /metrics, /status, /fail/<name>.
    pub status_addr: String,
    pub name: String,
}

pub struct StoreProc {
    pub proc_: Proc,
    pub addr: String,
    pub status_addr: String,
}

#[derive(Clone, Debug, Default)]
pub struct ClusterOpts {
    pub pds: usize,
    pub stores: usize,
    /// Extra flags for every storage node.
    pub store_args: Vec<String>,
    /// Extra flags for every PD member.
    pub pd_args: Vec<String>,
    /// FAILPOINTS for the storage nodes.
    pub store_failpoints: Option<String>,
    /// FAILPOINTS for the PD members.
    pub pd_failpoints: Option<String>,
    /// Flags for every kvctl run through the cluster (e.g. `--cacert ... --cert ... --key ...`).
    pub kvctl_args: Vec<String>,
}

impl ClusterOpts {
    /// Mutual TLS on every link with the files `kvctl cert` wrote into `certs`: every PD member
    /// and storage node serves and dials with node.pem, requires client certificates from
    /// ca.pem, and takes only `atoll-node` as a cluster member; kvctl uses client.pem.
    pub fn mutual_tls(mut self, certs: &Path) -> Self {
        let flags = tls_server_flags(certs, "");
        self.pd_args.extend(flags.iter().cloned());
        self.store_args.extend(flags);
        self.kvctl_args.extend(tls_client_flags(certs, "client"));
        self
    }
}

/// Server TLS flags for the files of `kvctl cert` in `certs`: `prefix` "" for the cluster's CA,
/// "other-" for the other CA's node certificate and CA.
pub fn tls_server_flags(certs: &Path, prefix: &str) -> Vec<String> {
    let f = |n: &str| certs.join(n).display().to_string();
    vec![
        "--cert-file".into(),
        f(&format!("{prefix}node.pem")),
        "--key-file".into(),
        f(&format!("{prefix}node-key.pem")),
        "--trusted-ca-file".into(),
        f(&format!("{prefix}ca.pem")),
        "--client-cert-auth".into(),
        "--peer-cert-allowed-cn".into(),
        "atoll-node".into(),
    ]
}

/// kvctl's (and etcdctl's) TLS flags: the cluster's CA and the certificate `NAME.pem`.
pub fn tls_client_flags(certs: &Path, name: &str) -> Vec<String> {
    let f = |n: &str| certs.join(n).display().to_string();
    vec![
        "--cacert".into(),
        f("ca.pem"),
        "--cert".into(),
        f(&format!("{name}.pem")),
        "--key".into(),
        f(&format!("{name}-key.pem")),
    ]
}

pub struct ProcCluster {
    pub dir: tempfile::TempDir,
    pub pds: Vec<PdProc>,
    pub stores: Vec<StoreProc>,
    opts: ClusterOpts,
}

/// A failing test (panicking while its cluster is dropped) prints the tail of every process's
/// log; with `ATOLL_KEEP_FAILED=<dir>` it also copies the cluster's directory (logs and data)
/// under `<dir>`, to read in full.
impl Drop for ProcCluster {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        self.dump_logs();
        if let Ok(dest) = std::env::var("ATOLL_KEEP_FAILED") {
            let _ = std::fs::create_dir_all(&dest);
            let r = Command::new("cp")
                .arg("-a")
                .arg(self.dir.path())
                .arg(&dest)
                .status();
            eprintln!("kept {} under {dest}: {r:?}", self.dir.path().display());
        }
    }
}

impl ProcCluster {
    pub fn start(opts: ClusterOpts) -> ProcCluster {
        let dir = tempfile::Builder::new()
            .prefix("atoll-procs-")
            .tempdir()
            .expect("tempdir");
        let mut c = ProcCluster {
            dir,
            pds: vec![],
            stores: vec![],
            opts: opts.clone(),
        };
        let members: Vec<(String, String, String)> = (0..opts.pds.max(1))
            .map(|i| {
                (
                    format!("pd{}", i + 1),
                    format!("127.0.0.1:{}", free_port()),
                    format!("127.0.0.1:{}", free_port()),
                )
            })
            .collect();
        let initial = members
            .iter()
            .map(|(n, _, p)| format!("{n}={p}"))
            .collect::<Vec<_>>()
            .join(",");
        for (name, client, peer) in &members {
            let status = format!("127.0.0.1:{}", free_port());
            let mut args = vec![
                "--name".into(),
                name.clone(),
                "--data-dir".into(),
                c.dir.path().join(name).display().to_string(),
                "--client-addr".into(),
                client.clone(),
                "--peer-addr".into(),
                peer.clone(),
                "--initial-cluster".into(),
                initial.clone(),
                "--status-addr".into(),
                status.clone(),
            ];
            args.extend(opts.pd_args.iter().cloned());
            let mut env = vec![];
            if let Some(fp) = &opts.pd_failpoints {
                env.push(("FAILPOINTS".into(), fp.clone()));
            }
            let log = c.dir.path().join(format!("{name}.log"));
            let p = Proc::spawn(bin("pd-server"), name, args, env, log);
            c.pds.push(PdProc {
                proc_: p,
                client_addr: client.clone(),
                peer_addr: peer.clone(),
                status_addr: status,
                name: name.clone(),
            });
        }
        for _ in 0..opts.stores {
            c.add_store();
        }
        c
    }

    pub fn pd_endpoints(&self) -> String {
        self.pds
            .iter()
            .map(|p| p.client_addr.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts one more storage node; returns its index.
    pub fn add_store(&mut self) -> usize {
        self.add_store_with(&[])
    }

    pub fn add_store_with(&mut self, extra: &[String]) -> usize {
        self.add_store_with_env(extra, &[])
    }

    /// Starts one more storage node with extra flags and environment (e.g. its own
    /// `FAILPOINTS`, which replaces [`ClusterOpts::store_failpoints`]); returns its index.
    pub fn add_store_with_env(&mut self, extra: &[String], extra_env: &[(&str, &str)]) -> usize {
        let i = self.stores.len();
        let addr = format!("127.0.0.1:{}", free_port());
        let status = format!("127.0.0.1:{}", free_port());
        let name = format!("store{}", i + 1);
        let mut args = vec![
            "--pd".into(),
            self.pd_endpoints(),
            "--data-dir".into(),
            self.dir.path().join(&name).display().to_string(),
            "--addr".into(),
            addr.clone(),
            "--status-addr".into(),
            status.clone(),
        ];
        args.extend(self.opts.store_args.iter().cloned());
        args.extend(extra.iter().cloned());
        let mut env: Vec<(String, String)> = vec![];
        if let Some(fp) = &self.opts.store_failpoints {
            env.push(("FAILPOINTS".into(), fp.clone()));
        }
        for (k, v) in extra_env {
            env.retain(|(x, _)| x != k);
            env.push((k.to_string(), v.to_string()));
        }
        let log = self.dir.path().join(format!("{name}.log"));
        let p = Proc::spawn(bin("storage-node"), &name, args, env, log);
        self.stores.push(StoreProc {
            proc_: p,
            addr,
            status_addr: status,
        });
        i
    }

    /// Runs kvctl against this cluster (with [`ClusterOpts::kvctl_args`]).
    pub fn kvctl(&self, args: &[&str]) -> Output {
        let mut a: Vec<&str> = self.opts.kvctl_args.iter().map(String::as_str).collect();
        a.extend_from_slice(args);
        kvctl(&self.pd_endpoints(), &a)
    }

    /// Runs kvctl with `--output json` and parses the answer (panics on failure).
    pub fn kvctl_json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--output", "json"];
        a.extend_from_slice(args);
        let out = self.kvctl(&a);
        assert!(
            out.status.success(),
            "kvctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "kvctl {args:?}: bad json {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Waits until kvctl can write and read.
    pub fn wait_ready(&self, timeout: Duration) {
        let ok = crate::wait_until(timeout, || {
            let o = self.kvctl(&["--timeout", "3", "put", "__ready", "1"]);
            o.status.success()
        });
        if !ok {
            self.dump_logs();
        }
        assert!(ok, "cluster never became ready");
    }

    /// Stores' ids as PD reports them, by store index (address order).
    pub fn store_id_of(&self, index: usize) -> Option<u64> {
        let v = self.kvctl_json(&["stores"]);
        v["stores"]
            .as_array()?
            .iter()
            .find(|s| s["address"] == self.stores[index].addr.as_str())
            .and_then(|s| s["id"].as_u64())
    }

    pub fn store_index_of(&self, id: u64) -> Option<usize> {
        let v = self.kvctl_json(&["stores"]);
        let addr = v["stores"]
            .as_array()?
            .iter()
            .find(|s| s["id"].as_u64() == Some(id))?["address"]
            .as_str()?
            .to_string();
        self.stores.iter().position(|s| s.addr == addr)
    }

    pub fn dump_logs(&self) {
        for p in &self.pds {
            eprintln!("===== {} =====\n{}", p.name, p.proc_.log_tail(40));
        }
        for s in &self.stores {
            eprintln!("===== {} =====\n{}", s.proc_.name, s.proc_.log_tail(40));
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

pub fn kvctl(pd: &str, args: &[&str]) -> Output {
    let mut a: Vec<&str> = vec!["--pd", pd];
    a.extend_from_slice(args);
    Command::new(bin("kvctl"))
        .args(&a)
        .env("RUST_LOG", "error")
        .output()
        .expect("run kvctl")
}

/// One HTTP/1.1 request with a std `TcpStream` (the status servers speak plain HTTP);
/// returns the status code and body.
pub fn http(addr: &str, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let sa = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{addr} resolves to nothing")))?;
    let mut s = TcpStream::connect_timeout(&sa, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP answer: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// Sets failpoint `name` to `action` at run time through a status address
/// (`PUT /fail/<name>`); panics if the server refuses.
pub fn set_failpoint(status_addr: &str, name: &str, action: &str) {
    match http(status_addr, "PUT", &format!("/fail/{name}"), action) {
        Ok((200, _)) => {}
        other => panic!("PUT /fail/{name} = {action:?} on {status_addr}: {other:?}"),
    }
}

/// Removes failpoint `name` at run time (`DELETE /fail/<name>`); panics if that fails.
pub fn remove_failpoint(status_addr: &str, name: &str) {
    match http(status_addr, "DELETE", &format!("/fail/{name}"), "") {
        Ok((200, _)) => {}
        other => panic!("DELETE /fail/{name} on {status_addr}: {other:?}"),
    }
}

/// The active failpoints of a process (`GET /fail`): name and action.
pub fn list_failpoints(status_addr: &str) -> Vec<(String, String)> {
    match http(status_addr, "GET", "/fail", "") {
        Ok((200, body)) => body
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(n, a)| (n.to_string(), a.to_string()))
            .collect(),
        other => panic!("GET /fail on {status_addr}: {other:?}"),
    }
}

/// A status server's `/status` JSON.
pub fn status_json(status_addr: &str) -> Option<Value> {
    match http(status_addr, "GET", "/status", "") {
        Ok((200, body)) => serde_json::from_str(&body).ok(),
        _ => None,
    }
}

/// Runs kvctl with extra environment variables (e.g. `FAILPOINTS`).
pub fn kvctl_env(pd: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut a: Vec<&str> = vec!["--pd", pd];
    a.extend_from_slice(args);
    let mut cmd = Command::new(bin("kvctl"));
    cmd.args(&a)
        .env("RUST_LOG", "error")
        .env_remove("FAILPOINTS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run kvctl")
}

/// Every region in a `kvctl --output json regions` answer has `replicas` voters on distinct
/// stores and a leader.
pub fn regions_healthy(v: &Value, replicas: usize) -> bool {
    let Some(rs) = v["regions"].as_array() else {
        return false;
    };
    !rs.is_empty()
        && rs.iter().all(|r| {
            let peers = r["peers"].as_array().cloned().unwrap_or_default();
            let stores: std::collections::HashSet<u64> = peers
                .iter()
                .filter_map(|p| p["store_id"].as_u64())
                .collect();
            let voters = peers.iter().filter(|p| p["role"] == "voter").count();
            voters == replicas
                && peers.len() == replicas
                && stores.len() == replicas
                && r["leader"].is_object()
        })
}

/// CPU time (user + system) a process has used so far, from `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: fields after it start past the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line (11 and 12 after the name).
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_millis(ticks * 1000 / hz))
}

/// The fraction of one core each process used over `window` (measured from now).
pub fn cpu_fractions(pids: &[u32], window: Duration) -> Vec<f64> {
    let before: Vec<Option<Duration>> = pids.iter().map(|p| cpu_time(*p)).collect();
    let t0 = Instant::now();
    std::thread::sleep(window);
    let elapsed = t0.elapsed().as_secs_f64();
    pids.iter()
        .zip(before)
        .map(|(p, b)| match (b, cpu_time(*p)) {
            (Some(b), Some(a)) => (a.saturating_sub(b)).as_secs_f64() / elapsed,
            _ => f64::NAN,
        })
        .collect()
}

/// The value of a Prometheus counter or gauge (summed over its label sets) on a status page.
pub fn metric_sum(status_addr: &str, name: &str) -> Option<f64> {
    let (code, body) = http(status_addr, "GET", "/metrics", "").ok()?;
    if code != 200 {
        return None;
    }
    let mut sum = 0.0;
    for line in body.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (metric, value) = line.rsplit_once(' ')?;
        let base = metric.split('{').next().unwrap_or(metric);
        if base == name {
            sum += value.parse::<f64>().ok()?;
        }
    }
    Some(sum)
}

/// `etcdctl` 3.4 (Debian's etcd-client; `scripts/ensure-deps.sh` installs it) against
/// `endpoints`, with the v3 API and bounded timeouts.
pub fn etcdctl(endpoints: &str, args: &[&str]) -> Output {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .arg("--dial-timeout=5s")
        .arg("--command-timeout=15s")
        .args(args)
        .output()
        .expect("run etcdctl (Debian package etcd-client: scripts/ensure-deps.sh installs it)")
}
