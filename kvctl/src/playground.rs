//! `kvctl playground`: a PD member and N storage nodes in this process, on the conventional
//! local ports, with data under one folder, until Ctrl-C.

use atoll_pd::{PdConfig, PdServer};
use atoll_storage_node::{Node, NodeConfig};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct PlaygroundArgs {
    /// Storage nodes to start.
    #[arg(long, default_value_t = 3)]
    pub stores: usize,
    /// Where the data goes (kept across runs).
    #[arg(long, default_value = "atoll-data/playground")]
    pub data_dir: PathBuf,
    /// PD client port (store i uses 20160+i and status 20180+i).
    #[arg(long, default_value_t = 2379)]
    pub pd_port: u16,
    /// Region split size for the stores (e.g. 96MiB, 256KiB).
    #[arg(long)]
    pub region_split_size: Option<String>,
    /// Mutual TLS on every link (client, store to store, store to PD, status ports), with
    /// certificates from `kvctl cert` in DATA_DIR/certs (made on the first run, then kept).
    #[arg(long)]
    pub tls: bool,
}

pub async fn run(a: PlaygroundArgs) -> anyhow::Result<()> {
    if a.stores == 0 || a.stores > 16 {
        anyhow::bail!("--stores must be between 1 and 16");
    }
    let pd_addr = format!("127.0.0.1:{}", a.pd_port);
    let certs = a.data_dir.join("certs");
    let security = if a.tls {
        crate::cert::run(&crate::cert::CertArgs {
            dir: certs.clone(),
            hosts: vec![],
            client_cn: "root".into(),
            days: 365,
            reuse_ca: false,
            other_ca: false,
            expired: false,
            if_missing: true,
        })?;
        crate::cert::security_config(&certs)
    } else {
        Default::default()
    };
    let pd_cfg = PdConfig {
        name: "pd1".into(),
        data_dir: a.data_dir.join("pd1"),
        client_addr: pd_addr.clone(),
        peer_addr: format!("127.0.0.1:{}", a.pd_port + 1),
        status_addr: String::new(),
        schedule: atoll_pd::config::ScheduleConfig {
            max_replicas: a.stores.min(3),
            ..Default::default()
        },
        security: security.clone(),
        ..Default::default()
    };
    let pd = PdServer::start(pd_cfg).await?;
    let mut nodes = vec![];
    for i in 0..a.stores {
        let mut cfg = NodeConfig {
            pd: pd_addr.clone(),
            data_dir: a.data_dir.join(format!("store{}", i + 1)),
            addr: format!("127.0.0.1:{}", 20160 + i),
            status_addr: format!("127.0.0.1:{}", 20180 + i),
            security: security.clone(),
            ..Default::default()
        };
        if let Some(s) = &a.region_split_size {
            cfg.raftstore.region_split_size = s
                .parse()
                .map_err(|e| anyhow::anyhow!("--region-split-size: {e}"))?;
        }
        nodes.push(Node::start(cfg).await?);
    }
    println!(
        "Atoll playground is up: PD at {pd_addr}, {} storage nodes, data in {}",
        a.stores,
        a.data_dir.display()
    );
    let endpoints: Vec<String> = (0..a.stores)
        .map(|i| format!("127.0.0.1:{}", 20160 + i))
        .collect();
    if a.tls {
        let f = |n: &str| certs.join(n).display().to_string();
        let (ca, cert, key) = (f("ca.pem"), f("client.pem"), f("client-key.pem"));
        println!(
            "Mutual TLS on every link; certificates in {}",
            certs.display()
        );
        println!(
            "Try:  kvctl --pd {pd_addr} --cacert {ca} --cert {cert} --key {key} put hello world"
        );
        println!(
            "etcd clients: export ETCDCTL_API=3 ETCDCTL_ENDPOINTS={} ETCDCTL_CACERT={ca} ETCDCTL_CERT={cert} ETCDCTL_KEY={key}",
            endpoints.join(",")
        );
        println!(
            "curl: curl --cacert {ca} --cert {cert} --key {key} https://{}/version",
            endpoints[0]
        );
    } else {
        println!("Try:  kvctl --pd {pd_addr} put hello world && kvctl --pd {pd_addr} get hello");
        println!(
            "etcd clients: export ETCDCTL_API=3 ETCDCTL_ENDPOINTS={}",
            endpoints.join(",")
        );
    }
    println!("Stop with Ctrl-C.");
    atoll_util::shutdown_signal().await;
    println!("stopping...");
    for n in nodes {
        n.stop().await;
    }
    pd.stop().await;
    Ok(())
}
