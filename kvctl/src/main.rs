//! `kvctl`: the Atoll command line — data, cluster, bench, playground.
//! Exit status 0 on success; otherwise a one-line error on stderr and a non-zero status.

mod auth;
mod bench;
mod cert;
mod elect;
mod etcd;
mod lease;
mod lease_bench;
mod playground;
mod probe;
mod watch;
mod watch_bench;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use atoll_client::{Client, ClientConfig};
use atoll_util::hex::display;
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "kvctl", version, about = "Atoll command line")]
struct Cli {
    /// PD addresses (comma separated).
    #[arg(long, global = true, default_value = "127.0.0.1:2379")]
    pd: String,
    #[arg(long, global = true, value_enum, default_value = "text")]
    output: Output,
    /// Give up on a request after this many seconds.
    #[arg(long, global = true, default_value_t = 20.0)]
    timeout: f64,
    /// HTTP/2 connections to each store (requests are spread over them).
    #[arg(long, global = true, default_value_t = 1)]
    conns: usize,
    /// Authenticate as NAME (etcdctl's `--user NAME[:PASSWORD]`; without a password, --password
    /// or a prompt). Every request then carries the user's token.
    #[arg(long, global = true)]
    user: Option<String>,
    /// The password of --user (etcdctl's `--password`).
    #[arg(long, global = true, requires = "user")]
    password: Option<String>,
    /// CA certificate (PEM) to verify PD and the stores with: turns TLS on (etcdctl's name).
    #[arg(long = "cacert", id = "tls_cacert", global = true)]
    cacert: Option<String>,
    /// Client certificate (PEM) for mutual TLS (needs --cacert and --key).
    #[arg(long = "cert", id = "tls_cert", global = true, requires = "tls_key")]
    cert: Option<String>,
    /// Private key (PEM) of --cert.
    // Own ids: subcommands have positional arguments named `key`.
    #[arg(long = "key", id = "tls_key", global = true, requires = "tls_cert")]
    key: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Set KEY to VALUE (or to the content of --value-file).
    Put {
        key: String,
        #[arg(required_unless_present = "value_file")]
        value: Option<String>,
        /// Read the value from this file (for large or binary values).
        #[arg(long, conflicts_with = "value")]
        value_file: Option<std::path::PathBuf>,
        /// Attach the key to this lease (hex id, as `lease grant` prints it): the put goes
        /// through the etcd KV API of a storage node.
        #[arg(long)]
        lease: Option<String>,
        /// etcd API endpoints for a put with --lease (default: every storage node PD knows).
        #[arg(long, requires = "lease")]
        endpoints: Option<String>,
    },
    /// Print KEY's value.
    Get { key: String },
    /// Delete KEY.
    Delete { key: String },
    /// Keys in [START, END) (END omitted: to the end).
    Scan {
        start: String,
        end: Option<String>,
        #[arg(long, default_value_t = 0)]
        limit: usize,
        #[arg(long)]
        reverse: bool,
        #[arg(long)]
        keys_only: bool,
        /// Also print (JSON: `"revision"`) the etcd revision the scan read at; a watch from
        /// the revision after it misses nothing the scan did not see. Off by default: the
        /// JSON answer stays `{"kvs":[...]}` as scripts expect.
        #[arg(long)]
        with_revision: bool,
    },
    /// Delete every key in [START, END).
    DeleteRange { start: String, end: String },
    /// Compare-and-swap: set KEY to NEW if it holds EXPECTED (use --absent for "no value").
    Cas {
        key: String,
        new: String,
        #[arg(long)]
        expected: Option<String>,
    },
    /// The stores of the cluster.
    Stores,
    /// The regions of the cluster.
    Regions,
    /// The PD members.
    Members,
    /// A timestamp from the PD leader.
    Tso,
    /// The GC safe point (versions below it are garbage); `--safe-point TS` raises it.
    Gc {
        #[arg(long)]
        safe_point: Option<u64>,
    },
    /// Split the regions holding these keys at them.
    Split { keys: Vec<String> },
    /// Store operations.
    Store {
        #[command(subcommand)]
        cmd: StoreCmd,
    },
    /// PD's running operators.
    Operators,
    /// One atomic transaction: OP... where OP is `put KEY VALUE` or `delete KEY`.
    Txn {
        #[arg(num_args = 1.., allow_hyphen_values = true)]
        ops: Vec<String>,
    },
    /// etcd's leases: grant, keep-alive, revoke, list, ttl (through etcd's Lease API).
    Lease(lease::LeaseArgs),
    /// Many leases kept alive through etcd's Lease API (Atoll's or an etcd cluster's); one JSON line.
    LeaseBench(lease_bench::LeaseBenchArgs),
    /// Follow changes of KEY (or, with --prefix, of every key under it): one line per event.
    Watch(watch::WatchArgs),
    /// Run CMD while holding lock NAME (etcd's Lock API, with a lease kept alive); without
    /// CMD, hold it until Ctrl-C.
    Lock(elect::LockArgs),
    /// Campaign in election NAME with PROPOSAL and stay leader until Ctrl-C; without
    /// PROPOSAL, print each leader value.
    Elect(elect::ElectArgs),
    /// Watchers and writers through etcd's API (Atoll's or an etcd cluster's); one JSON line.
    WatchBench(watch_bench::WatchBenchArgs),
    /// Load generator; prints one JSON line.
    Bench(bench::BenchArgs),
    /// A local PD and N storage nodes in this process, until Ctrl-C.
    Playground(playground::PlaygroundArgs),
    /// Authentication: enable, disable, status (etcd's Auth API, as etcdctl).
    Auth {
        #[command(subcommand)]
        cmd: auth::AuthCmd,
    },
    /// Users: add, delete, get, list, passwd, grant-role, revoke-role.
    User {
        #[command(subcommand)]
        cmd: auth::UserCmd,
    },
    /// Roles: add, delete, get, list, grant-permission, revoke-permission.
    Role {
        #[command(subcommand)]
        cmd: auth::RoleCmd,
    },
    /// Write a CA and the certificates of a local cluster (mutual TLS) into a folder.
    Cert(cert::CertArgs),
    /// Ask a status port for PATH (default /status) over HTTP, or HTTPS with --cacert; exits
    /// 0 on a 200 answer (a health check for servers running with TLS).
    Probe(probe::ProbeArgs),
}

#[derive(Subcommand, Debug)]
enum StoreCmd {
    /// Take a store out: PD moves its regions away, then it becomes tombstone.
    Delete { store_id: u64 },
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("kvctl: {msg}");
    std::process::exit(1);
}

fn kv_json(k: &[u8], v: Option<&[u8]>) -> Value {
    json!({"key": display(k), "value": v.map(display)})
}

async fn client(cli: &Cli) -> anyhow::Result<Arc<Client>> {
    let mut cfg = ClientConfig::new(atoll_pd_client::rpc::parse_endpoints(&cli.pd));
    if cfg.pd_endpoints.is_empty() {
        anyhow::bail!("--pd needs at least one address");
    }
    cfg.timeout = Duration::from_secs_f64(cli.timeout.max(0.1));
    cfg.rpc_timeout = cfg.timeout.min(Duration::from_secs(5));
    cfg.connections_per_store = cli.conns.max(1);
    cfg.tls = etcd::tls().cloned();
    let c = Client::connect(cfg).await?;
    c.set_token(etcd::token().map(str::to_string));
    Ok(c)
}

fn read_value(
    value: Option<String>,
    value_file: Option<std::path::PathBuf>,
) -> anyhow::Result<Vec<u8>> {
    match (value, value_file) {
        (Some(v), _) => Ok(v.into_bytes()),
        (None, Some(f)) => {
            std::fs::read(&f).map_err(|e| anyhow::anyhow!("read {}: {e}", f.display()))
        }
        (None, None) => anyhow::bail!("put needs a VALUE or --value-file"),
    }
}

fn print(out: Output, text: String, j: Value) {
    match out {
        Output::Text => {
            if !text.is_empty() {
                println!("{text}");
            }
        }
        Output::Json => println!("{j}"),
    }
}

fn role(r: i32) -> &'static str {
    if r == atoll_proto::metapb::PeerRole::Learner as i32 {
        "learner"
    } else {
        "voter"
    }
}

fn state_name(s: i32) -> &'static str {
    match atoll_proto::metapb::StoreState::try_from(s) {
        Ok(atoll_proto::metapb::StoreState::Up) => "up",
        Ok(atoll_proto::metapb::StoreState::Offline) => "offline",
        Ok(atoll_proto::metapb::StoreState::Tombstone) => "tombstone",
        Err(_) => "unknown",
    }
}

/// The etcd API endpoints: `--endpoints` if given, else the storage nodes PD knows.
async fn etcd_endpoints(cli: &Cli, explicit: Option<&str>) -> anyhow::Result<etcd::Etcd> {
    let timeout = Duration::from_secs_f64(cli.timeout.max(0.1));
    if let Some(list) = explicit {
        return etcd::Etcd::new(etcd::parse_endpoints(list), timeout);
    }
    let c = client(cli).await?;
    let stores = c.pd().get_all_stores(true).await?;
    let urls: Vec<String> = stores
        .iter()
        .filter_map(|s| s.store.as_ref())
        .filter(|s| s.state == atoll_proto::metapb::StoreState::Up as i32)
        .map(|s| s.address.clone())
        .collect();
    anyhow::ensure!(!urls.is_empty(), "no storage node is up");
    let urls = etcd::parse_endpoints(&urls.join(","));
    etcd::Etcd::new(urls, timeout)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let out = cli.output;
    if let (Some(user), false) = (&cli.user, matches!(cli.cmd, Cmd::Playground(_))) {
        let (name, password) = auth::credentials(user, cli.password.as_deref())?;
        let e = etcd_endpoints(&cli, None).await?;
        match auth::login(&e, &name, &password).await {
            Ok(t) => etcd::set_token(t),
            // As etcd's clients: with auth disabled there is no token to send.
            Err(err) if err.to_string() == "etcdserver: authentication is not enabled" => {}
            Err(err) => return Err(err),
        }
    }
    match &cli.cmd {
        Cmd::Playground(a) => return playground::run(a.clone()).await,
        Cmd::Auth { cmd } => {
            let e = etcd_endpoints(&cli, None).await?;
            return auth::auth(&e, cmd.clone(), out == Output::Json).await;
        }
        Cmd::User { cmd } => {
            let e = etcd_endpoints(&cli, None).await?;
            return auth::user(&e, cmd.clone(), out == Output::Json).await;
        }
        Cmd::Role { cmd } => {
            let e = etcd_endpoints(&cli, None).await?;
            return auth::role(&e, cmd.clone(), out == Output::Json).await;
        }
        Cmd::Probe(a) => {
            let v = probe::run(a, Duration::from_secs_f64(cli.timeout.max(0.1))).await?;
            print(out, format!("OK {}", v["code"]), v);
            return Ok(());
        }
        Cmd::Cert(a) => {
            let v = cert::run(a)?;
            let text = format!(
                "wrote {} into {}",
                v["files"]
                    .as_array()
                    .map(|f| f
                        .iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default(),
                a.dir.display()
            );
            print(out, text, v);
            return Ok(());
        }
        Cmd::Lease(a) => {
            let e = etcd_endpoints(&cli, a.endpoints.as_deref()).await?;
            let Cmd::Lease(a) = cli.cmd else {
                unreachable!()
            };
            return lease::run(&e, a.cmd, out == Output::Json).await;
        }
        Cmd::Put {
            key,
            value,
            value_file,
            lease: Some(lease),
            endpoints,
        } => {
            let id = lease::parse_id(lease)?;
            let value = read_value(value.clone(), value_file.clone())?;
            let e = etcd_endpoints(&cli, endpoints.as_deref()).await?;
            let key = key.as_bytes().to_vec();
            e.call(|ch| {
                let (key, value) = (key.clone(), value.clone());
                async move {
                    atoll_proto::etcdserverpb::kv_client::KvClient::new(ch)
                        .put(atoll_proto::etcdserverpb::PutRequest {
                            key,
                            value,
                            lease: id,
                            ..Default::default()
                        })
                        .await
                }
            })
            .await?;
            print(out, "OK".into(), json!({"ok": true}));
            return Ok(());
        }
        Cmd::LeaseBench(a) => {
            println!("{}", lease_bench::run(a.clone()).await?);
            return Ok(());
        }
        Cmd::WatchBench(a) => {
            println!("{}", watch_bench::run(a.clone()).await?);
            return Ok(());
        }
        Cmd::Bench(a) => {
            let c = client(&cli).await?;
            let line = bench::run(c, a.clone()).await?;
            println!("{line}");
            return Ok(());
        }
        _ => {}
    }
    let c = client(&cli).await?;
    match cli.cmd {
        Cmd::Put {
            key,
            value,
            value_file,
            ..
        } => {
            let value = read_value(value, value_file)?;
            c.put(key.as_bytes(), &value).await?;
            print(out, "OK".into(), json!({"ok": true}));
        }
        Cmd::Get { key } => {
            let v = c.get(key.as_bytes()).await?;
            let text = match &v {
                Some(v) => display(v),
                None => {
                    if out == Output::Text {
                        eprintln!("kvctl: key not found");
                        std::process::exit(1);
                    }
                    String::new()
                }
            };
            print(out, text, kv_json(key.as_bytes(), v.as_deref()));
        }
        Cmd::Delete { key } => {
            c.delete(key.as_bytes()).await?;
            print(out, "OK".into(), json!({"ok": true}));
        }
        Cmd::Scan {
            start,
            end,
            limit,
            reverse,
            keys_only,
            with_revision,
        } => {
            let end = end.unwrap_or_default();
            // One fresh timestamp: the etcd revision of this read (a watch from it + 1 misses
            // nothing the scan did not see).
            let revision = c.tso().await?;
            let kvs = c
                .scan_at(
                    start.as_bytes(),
                    end.as_bytes(),
                    limit,
                    reverse,
                    keys_only,
                    revision,
                )
                .await?;
            let text = kvs
                .iter()
                .map(|(k, v)| {
                    if keys_only {
                        display(k)
                    } else {
                        format!("{}\t{}", display(k), display(v))
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            let arr: Vec<Value> = kvs
                .iter()
                .map(|(k, v)| {
                    if keys_only {
                        json!({"key": display(k)})
                    } else {
                        kv_json(k, Some(v))
                    }
                })
                .collect();
            if with_revision {
                let text = format!("{text}\nrevision\t{revision}");
                print(out, text, json!({"kvs": arr, "revision": revision}));
            } else {
                print(out, text, json!({"kvs": arr}));
            }
        }
        Cmd::DeleteRange { start, end } => {
            let n = c.delete_range(start.as_bytes(), end.as_bytes()).await?;
            print(out, format!("deleted {n} keys"), json!({"deleted": n}));
        }
        Cmd::Cas { key, new, expected } => {
            let (ok, prev) = c
                .compare_and_swap(
                    key.as_bytes(),
                    expected.as_deref().map(str::as_bytes),
                    Some(new.as_bytes()),
                )
                .await?;
            print(
                out,
                if ok {
                    "OK".into()
                } else {
                    format!(
                        "not swapped; current value: {}",
                        prev.as_deref()
                            .map(display)
                            .unwrap_or_else(|| "(none)".into())
                    )
                },
                json!({"succeeded": ok, "previous": prev.as_deref().map(display)}),
            );
            if !ok && out == Output::Text {
                std::process::exit(1);
            }
        }
        Cmd::Watch(args) => watch::run(&c, args, out == Output::Json).await?,
        Cmd::Lock(args) => {
            let code = elect::lock(&c, args, out == Output::Json).await?;
            std::process::exit(code);
        }
        Cmd::Elect(args) => {
            let code = elect::elect(&c, args, out == Output::Json).await?;
            std::process::exit(code);
        }
        Cmd::Stores => {
            let infos = c.pd().get_all_stores(false).await?;
            let mut rows = vec![];
            let mut arr = vec![];
            for i in infos {
                let s = i.store.unwrap_or_default();
                rows.push(format!(
                    "{}\t{}\t{}\tregions={}\tleaders={}{}",
                    s.id,
                    s.address,
                    state_name(s.state),
                    i.region_count,
                    i.leader_count,
                    if i.is_down { "\tdisconnected" } else { "" }
                ));
                arr.push(json!({
                    "id": s.id, "address": s.address, "state": state_name(s.state),
                    "region_count": i.region_count, "leader_count": i.leader_count,
                    "status_address": s.status_address, "is_down": i.is_down,
                    "last_heartbeat_ms": s.last_heartbeat_ms,
                }));
            }
            print(out, rows.join("\n"), json!({"stores": arr}));
        }
        Cmd::Regions => {
            let regions = c.pd().scan_regions(&[], &[], 0).await?;
            let mut rows = vec![];
            let mut arr = vec![];
            for r in regions {
                let g = &r.region;
                let e = g.region_epoch.unwrap_or_default();
                let peers: Vec<Value> = g
                    .peers
                    .iter()
                    .map(|p| json!({"id": p.id, "store_id": p.store_id, "role": role(p.role)}))
                    .collect();
                let leader = r
                    .leader
                    .as_ref()
                    .map(|l| json!({"id": l.id, "store_id": l.store_id}));
                rows.push(format!(
                    "{}\t[{}, {})\tconf_ver={} version={}\tpeers={}\tleader={}",
                    g.id,
                    display(&g.start_key),
                    display(&g.end_key),
                    e.conf_ver,
                    e.version,
                    g.peers
                        .iter()
                        .map(|p| format!(
                            "{}@{}{}",
                            p.id,
                            p.store_id,
                            if p.role == 1 { "(learner)" } else { "" }
                        ))
                        .collect::<Vec<_>>()
                        .join(","),
                    r.leader
                        .as_ref()
                        .map(|l| format!("{}@{}", l.id, l.store_id))
                        .unwrap_or_else(|| "none".into())
                ));
                arr.push(json!({
                    "id": g.id, "start_key": display(&g.start_key), "end_key": display(&g.end_key),
                    "epoch": {"conf_ver": e.conf_ver, "version": e.version},
                    "peers": peers, "leader": leader,
                }));
            }
            print(out, rows.join("\n"), json!({"regions": arr}));
        }
        Cmd::Members => {
            let m = c.pd().get_members().await?;
            let leader = m.leader.as_ref().map(|l| l.member_id);
            let rows: Vec<String> = m
                .members
                .iter()
                .map(|x| {
                    format!(
                        "{}\t{}\t{}",
                        x.name,
                        x.client_addr,
                        if Some(x.member_id) == leader {
                            "leader"
                        } else {
                            ""
                        }
                    )
                })
                .collect();
            let arr: Vec<Value> = m.members.iter().map(|x| json!({"name": x.name, "client_addr": x.client_addr, "peer_addr": x.peer_addr, "is_leader": Some(x.member_id) == leader})).collect();
            print(out, rows.join("\n"), json!({"members": arr}));
        }
        Cmd::Tso => {
            let ts = c.tso().await?;
            let physical = atoll_pd_client::ts_physical_ms(ts);
            let logical = atoll_pd_client::ts_logical(ts);
            print(
                out,
                format!("{ts}\tphysical={physical} logical={logical}"),
                json!({"physical": physical, "logical": logical, "ts": ts}),
            );
        }
        Cmd::Gc { safe_point } => {
            let sp = match safe_point {
                Some(ts) => c.pd().update_gc_safe_point(ts).await?,
                None => c.pd().get_gc_safe_point().await?,
            };
            let physical = atoll_pd_client::ts_physical_ms(sp);
            print(
                out,
                format!("safe point {sp}\tphysical={physical}"),
                json!({"safe_point": sp, "physical": physical}),
            );
        }
        Cmd::Split { keys } => {
            if keys.is_empty() {
                anyhow::bail!("split needs at least one key");
            }
            let ks: Vec<Vec<u8>> = keys.iter().map(|k| k.as_bytes().to_vec()).collect();
            let regions = c.split(&ks).await?;
            let arr: Vec<Value> = regions.iter().map(|r| json!({"id": r.id, "start_key": display(&r.start_key), "end_key": display(&r.end_key)})).collect();
            print(
                out,
                format!("split into {} regions", regions.len()),
                json!({"regions": arr}),
            );
        }
        Cmd::Store {
            cmd: StoreCmd::Delete { store_id },
        } => {
            c.pd().delete_store(store_id).await?;
            print(
                out,
                format!("store {store_id} is offline; PD is moving its regions away"),
                json!({"ok": true, "store_id": store_id}),
            );
        }
        Cmd::Operators => {
            let ops = c.pd().get_operators().await?;
            let rows: Vec<String> = ops
                .iter()
                .map(|o| {
                    format!(
                        "region {}\t{}\t{}\t{}ms",
                        o.region_id, o.kind, o.desc, o.age_ms
                    )
                })
                .collect();
            let arr: Vec<Value> = ops.iter().map(|o| json!({"region_id": o.region_id, "kind": o.kind, "desc": o.desc, "age_ms": o.age_ms})).collect();
            print(out, rows.join("\n"), json!({"operators": arr}));
        }
        Cmd::Txn { ops } => {
            let mut txn = c.begin().await?;
            let mut i = 0;
            let mut n = 0;
            while i < ops.len() {
                match ops[i].as_str() {
                    "put" if i + 2 < ops.len() => {
                        txn.put(
                            ops[i + 1].as_bytes().to_vec(),
                            ops[i + 2].as_bytes().to_vec(),
                        )?;
                        i += 3;
                    }
                    "delete" if i + 1 < ops.len() => {
                        txn.delete(ops[i + 1].as_bytes().to_vec())?;
                        i += 2;
                    }
                    other => anyhow::bail!(
                        "bad transaction op at {other:?}: expected `put KEY VALUE` or `delete KEY`"
                    ),
                }
                n += 1;
            }
            let commit_ts = txn.commit().await?;
            print(
                out,
                format!("OK ({n} ops, commit ts {commit_ts})"),
                json!({"ok": true, "ops": n, "commit_ts": commit_ts}),
            );
        }
        Cmd::Bench(_)
        | Cmd::Playground(_)
        | Cmd::Cert(_)
        | Cmd::Probe(_)
        | Cmd::WatchBench(_)
        | Cmd::Lease(_)
        | Cmd::LeaseBench(_)
        | Cmd::Auth { .. }
        | Cmd::User { .. }
        | Cmd::Role { .. } => unreachable!("handled above"),
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let quiet = matches!(cli.cmd, Cmd::Playground(_));
    atoll_util::logging::init(if quiet { "info" } else { "warn" });
    // Client failpoints (e.g. `client::txn_after_prewrite=panic`: a client dying mid-commit).
    if let Err(e) = atoll_util::failpoints::setup_from_env() {
        eprintln!("kvctl: FAILPOINTS: {e}");
        std::process::exit(2);
    }
    match (&cli.cacert, &cli.cert, &cli.key) {
        (None, None, None) => etcd::set_tls(None),
        (None, _, _) => fail("--cert and --key need --cacert"),
        (Some(ca), cert, key) => {
            let pair = cert.clone().zip(key.clone());
            match atoll_util::tls::ClientTls::new(vec![ca.clone()], pair) {
                Ok(t) => etcd::set_tls(Some(t)),
                Err(e) => fail(format!("TLS: {e}")),
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => fail(format!("runtime: {e}")),
    };
    if let Err(e) = rt.block_on(run(cli)) {
        fail(format!("{e:#}"));
    }
}
