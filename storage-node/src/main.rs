//! `storage-node`: parse flags, build the configuration, run until SIGINT/SIGTERM.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use atoll_storage_node::NodeConfig;
use clap::Parser;

#[derive(Parser, Debug)]
// A flag given twice: the last one wins (scripts and tests append overrides).
#[command(
    name = "storage-node",
    version,
    about = "Atoll storage node",
    args_override_self = true
)]
struct Args {
    /// PD addresses, comma separated.
    #[arg(long)]
    pd: Option<String>,
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    /// gRPC for clients and other stores.
    #[arg(long)]
    addr: Option<String>,
    /// HTTP: /metrics, /status, /fail/<name>.
    #[arg(long)]
    status_addr: Option<String>,
    #[arg(long)]
    advertise_addr: Option<String>,
    #[arg(long)]
    advertise_status_addr: Option<String>,
    /// Split regions past this size (e.g. 96MiB, 256KiB).
    #[arg(long)]
    region_split_size: Option<String>,
    /// Split regions past this many keys.
    #[arg(long)]
    region_split_keys: Option<u64>,
    /// Largest key accepted (e.g. 8KiB).
    #[arg(long)]
    max_key_size: Option<String>,
    /// Largest value accepted (e.g. 8MiB).
    #[arg(long)]
    max_value_size: Option<String>,
    /// How often GC looks for a new safe point at PD (e.g. 60s).
    #[arg(long)]
    gc_interval: Option<String>,
    /// How long an etcd lease goes without keep-alives before its remaining time is
    /// checkpointed (e.g. 60s).
    #[arg(long)]
    lease_checkpoint_interval: Option<String>,
    #[arg(long)]
    log_level: Option<String>,
    /// Seconds an auth token stays valid (etcd's flag; default 300).
    #[arg(long)]
    auth_token_ttl: Option<u64>,
    /// Test-only: serve `unsafe_local_read` requests (reads on any peer without ReadIndex).
    #[arg(long, hide = true)]
    allow_unsafe_local_read: bool,
    /// TOML configuration; flags win over it.
    #[arg(long)]
    config: Option<String>,
    #[command(flatten)]
    security: atoll_util::tls::SecurityFlags,
}

fn build_config(a: Args) -> anyhow::Result<NodeConfig> {
    let mut c = match &a.config {
        Some(p) => NodeConfig::from_file(p)?,
        None => NodeConfig::default(),
    };
    if let Some(v) = a.pd {
        c.pd = v;
    }
    if let Some(v) = a.data_dir {
        c.data_dir = v;
    }
    if let Some(v) = a.addr {
        c.addr = v;
    }
    if let Some(v) = a.status_addr {
        c.status_addr = v;
    }
    if let Some(v) = a.advertise_addr {
        c.advertise_addr = v;
    }
    if let Some(v) = a.advertise_status_addr {
        c.advertise_status_addr = v;
    }
    if let Some(v) = a.region_split_size {
        c.raftstore.region_split_size = v
            .parse()
            .map_err(|e| anyhow::anyhow!("--region-split-size: {e}"))?;
    }
    if let Some(v) = a.region_split_keys {
        c.raftstore.region_split_keys = v;
    }
    if let Some(v) = a.max_key_size {
        c.storage.max_key_size = v
            .parse()
            .map_err(|e| anyhow::anyhow!("--max-key-size: {e}"))?;
    }
    if let Some(v) = a.max_value_size {
        c.storage.max_value_size = v
            .parse()
            .map_err(|e| anyhow::anyhow!("--max-value-size: {e}"))?;
    }
    if let Some(v) = a.gc_interval {
        c.storage.gc_interval = v
            .parse()
            .map_err(|e| anyhow::anyhow!("--gc-interval: {e}"))?;
    }
    if let Some(v) = a.lease_checkpoint_interval {
        c.storage.lease_checkpoint_interval = v
            .parse()
            .map_err(|e| anyhow::anyhow!("--lease-checkpoint-interval: {e}"))?;
    }
    if let Some(v) = a.log_level {
        c.log_level = v;
    }
    if let Some(v) = a.auth_token_ttl {
        c.auth_token_ttl = v;
    }
    if a.allow_unsafe_local_read {
        c.storage.allow_unsafe_local_read = true;
    }
    a.security.apply(&mut c.security);
    c.validate()?;
    Ok(c)
}

fn main() {
    let cfg = match build_config(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("storage-node: {e}");
            std::process::exit(2);
        }
    };
    atoll_util::logging::init(&cfg.log_level);
    atoll_util::abort_on_panic();
    if let Err(e) = atoll_util::failpoints::setup_from_env() {
        eprintln!("storage-node: FAILPOINTS: {e}");
        std::process::exit(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("store")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("storage-node: runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(atoll_storage_node::run(cfg, atoll_util::shutdown_signal())) {
        eprintln!("storage-node: {e:#}");
        std::process::exit(1);
    }
}
