//! `pd-server`: parse flags, build the configuration, run until SIGINT/SIGTERM.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use atoll_pd::PdConfig;
use clap::Parser;

#[derive(Parser, Debug)]
// A flag given twice: the last one wins (scripts and tests append overrides).
#[command(
    name = "pd-server",
    version,
    about = "Atoll placement driver",
    args_override_self = true
)]
struct Args {
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    /// gRPC for stores and clients.
    #[arg(long)]
    client_addr: Option<String>,
    /// PD-to-PD raft.
    #[arg(long)]
    peer_addr: Option<String>,
    /// NAME=PEER_ADDR[,NAME=PEER_ADDR...]
    #[arg(long)]
    initial_cluster: Option<String>,
    #[arg(long)]
    advertise_client_addr: Option<String>,
    #[arg(long)]
    advertise_peer_addr: Option<String>,
    /// HTTP: /metrics, /status, /fail/<name>.
    #[arg(long)]
    status_addr: Option<String>,
    /// Peers PD keeps for each region.
    #[arg(long)]
    max_replicas: Option<usize>,
    /// A store silent this long has its peers replaced (e.g. 30m, 20s).
    #[arg(long)]
    max_store_down_time: Option<String>,
    /// Versions older than this are garbage collected (e.g. 10m; 0s: off).
    #[arg(long)]
    gc_life_time: Option<String>,
    #[arg(long)]
    log_level: Option<String>,
    /// TOML configuration; flags win over it.
    #[arg(long)]
    config: Option<String>,
    #[command(flatten)]
    security: atoll_util::tls::SecurityFlags,
}

fn build_config(a: Args) -> anyhow::Result<PdConfig> {
    let mut c = match &a.config {
        Some(p) => PdConfig::from_file(p)?,
        None => PdConfig::default(),
    };
    if let Some(v) = a.name {
        c.name = v;
    }
    if let Some(v) = a.data_dir {
        c.data_dir = v;
    }
    if let Some(v) = a.client_addr {
        c.client_addr = v;
    }
    if let Some(v) = a.peer_addr {
        c.peer_addr = v;
    }
    if let Some(v) = a.initial_cluster {
        c.initial_cluster = v;
    }
    if let Some(v) = a.advertise_client_addr {
        c.advertise_client_addr = v;
    }
    if let Some(v) = a.advertise_peer_addr {
        c.advertise_peer_addr = v;
    }
    if let Some(v) = a.status_addr {
        c.status_addr = v;
    }
    if let Some(v) = a.max_replicas {
        c.schedule.max_replicas = v;
    }
    if let Some(v) = a.max_store_down_time {
        c.schedule.max_store_down_time = v
            .parse()
            .map_err(|e| anyhow::anyhow!("--max-store-down-time: {e}"))?;
    }
    if let Some(v) = a.gc_life_time {
        c.gc.life_time = v
            .parse()
            .map_err(|e| anyhow::anyhow!("--gc-life-time: {e}"))?;
    }
    if let Some(v) = a.log_level {
        c.log_level = v;
    }
    a.security.apply(&mut c.security);
    c.validate()?;
    Ok(c)
}

fn main() {
    let cfg = match build_config(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pd-server: {e}");
            std::process::exit(2);
        }
    };
    atoll_util::logging::init(&cfg.log_level);
    atoll_util::abort_on_panic();
    if let Err(e) = atoll_util::failpoints::setup_from_env() {
        eprintln!("pd-server: FAILPOINTS: {e}");
        std::process::exit(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("pd")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pd-server: runtime: {e}");
            std::process::exit(1);
        }
    };
    let res = rt.block_on(atoll_pd::run(cfg, atoll_util::shutdown_signal()));
    if let Err(e) = res {
        eprintln!("pd-server: {e}");
        std::process::exit(1);
    }
}
