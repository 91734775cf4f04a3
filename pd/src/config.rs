//! `pd-server` configuration: the TOML file (kebab-case) and the flags that override it.

use atoll_util::config::ReadableDuration;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct PdConfig {
    pub name: String,
    pub data_dir: PathBuf,
    /// gRPC (and HTTP status) for stores and clients.
    pub client_addr: String,
    /// PD-to-PD raft.
    pub peer_addr: String,
    pub advertise_client_addr: String,
    pub advertise_peer_addr: String,
    /// NAME=PEER_ADDR[,NAME=PEER_ADDR...]; empty = just this member.
    pub initial_cluster: String,
    /// HTTP status address (/metrics, /status, /fail); empty = client port + 1000... disabled when "".
    pub status_addr: String,
    pub log_level: String,
    pub raft: PdRaftConfig,
    pub schedule: ScheduleConfig,
    pub tso: TsoConfig,
    pub gc: GcConfig,
    /// TLS (`[security]`: cert-file, key-file, trusted-ca-file, client-cert-auth, peer-*).
    pub security: atoll_util::tls::SecurityConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct PdRaftConfig {
    pub tick_interval: ReadableDuration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Compact PD's raft log once it holds this many applied entries.
    pub log_compact_threshold: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Peers PD keeps for each region.
    pub max_replicas: usize,
    /// A store silent this long is down: its peers are replaced elsewhere.
    pub max_store_down_time: ReadableDuration,
    /// A store silent this long is disconnected: no new peers or leaders go there.
    pub store_disconnect_time: ReadableDuration,
    /// How often schedulers (balance, removal) look at the cluster.
    pub schedule_interval: ReadableDuration,
    /// Concurrent operators moving leaders.
    pub leader_schedule_limit: usize,
    /// Concurrent operators moving region peers (balance).
    pub region_schedule_limit: usize,
    /// Concurrent operators repairing replicas (replica checker, store removal).
    pub replica_schedule_limit: usize,
    /// Peers being added (snapshots in flight) per store at most.
    pub max_snapshot_count: usize,
    /// An operator not finished by then is dropped.
    pub operator_timeout: ReadableDuration,
    /// Balance regions when a store's count differs from the mean by more than this fraction.
    pub tolerance_ratio: f64,
    pub enable_balance: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct TsoConfig {
    /// Time window persisted ahead through raft before any timestamp in it is served.
    pub save_interval: ReadableDuration,
}

impl Default for PdConfig {
    fn default() -> Self {
        PdConfig {
            name: "pd".into(),
            data_dir: PathBuf::from("pd-data"),
            client_addr: "127.0.0.1:2379".into(),
            peer_addr: "127.0.0.1:2380".into(),
            advertise_client_addr: String::new(),
            advertise_peer_addr: String::new(),
            initial_cluster: String::new(),
            status_addr: String::new(),
            log_level: "info".into(),
            raft: PdRaftConfig::default(),
            schedule: ScheduleConfig::default(),
            tso: TsoConfig::default(),
            gc: GcConfig::default(),
            security: Default::default(),
        }
    }
}

impl Default for PdRaftConfig {
    fn default() -> Self {
        PdRaftConfig {
            tick_interval: ReadableDuration::millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            log_compact_threshold: 10_000,
        }
    }
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            max_replicas: 3,
            max_store_down_time: ReadableDuration::secs(1800),
            store_disconnect_time: ReadableDuration::secs(20),
            schedule_interval: ReadableDuration::millis(500),
            leader_schedule_limit: 4,
            region_schedule_limit: 4,
            replica_schedule_limit: 8,
            max_snapshot_count: 3,
            operator_timeout: ReadableDuration::secs(60),
            tolerance_ratio: 0.1,
            enable_balance: true,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct GcConfig {
    /// Versions older than this are garbage: the leader keeps the GC safe point at
    /// `now - life-time` (a TSO timestamp). A snapshot read or transaction older than this
    /// fails with "snapshot too old". `0s` turns automatic GC off (the safe point then only
    /// moves when set by hand: `kvctl gc --safe-point TS`).
    pub life_time: ReadableDuration,
    /// How often the leader advances the safe point.
    pub run_interval: ReadableDuration,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            life_time: ReadableDuration::secs(600),
            run_interval: ReadableDuration::secs(10),
        }
    }
}

impl Default for TsoConfig {
    fn default() -> Self {
        TsoConfig {
            save_interval: ReadableDuration::secs(3),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error("read {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("parse {path}: {err}")]
    Parse { path: String, err: String },
}

/// One member of the initial cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitialMember {
    pub name: String,
    pub peer_addr: String,
    /// Derived from the name, identical on every member.
    pub id: u64,
}

/// A member's raft id: a non-zero hash of its name, so every member derives the same ids.
pub fn member_id(name: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h.max(1) >> 1 | 1
}

impl PdConfig {
    pub fn from_file(path: &str) -> Result<Self, ConfigError> {
        let s = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
            path: path.into(),
            err,
        })?;
        toml::from_str(&s).map_err(|e| ConfigError::Parse {
            path: path.into(),
            err: e.to_string(),
        })
    }

    pub fn advertise_client(&self) -> &str {
        if self.advertise_client_addr.is_empty() {
            &self.client_addr
        } else {
            &self.advertise_client_addr
        }
    }

    pub fn advertise_peer(&self) -> &str {
        if self.advertise_peer_addr.is_empty() {
            &self.peer_addr
        } else {
            &self.advertise_peer_addr
        }
    }

    pub fn members(&self) -> Result<Vec<InitialMember>, ConfigError> {
        if self.initial_cluster.trim().is_empty() {
            return Ok(vec![InitialMember {
                name: self.name.clone(),
                peer_addr: self.advertise_peer().to_string(),
                id: member_id(&self.name),
            }]);
        }
        let mut out = vec![];
        for part in self
            .initial_cluster
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let (name, addr) = part.split_once('=').ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "initial-cluster entry {part:?} is not NAME=PEER_ADDR"
                ))
            })?;
            let addr = addr.trim().trim_start_matches("http://").to_string();
            out.push(InitialMember {
                name: name.trim().to_string(),
                id: member_id(name.trim()),
                peer_addr: addr,
            });
        }
        if !out.iter().any(|m| m.name == self.name) {
            return Err(ConfigError::Invalid(format!(
                "initial-cluster does not name this member ({})",
                self.name
            )));
        }
        let mut ids: Vec<u64> = out.iter().map(|m| m.id).collect();
        ids.sort();
        ids.dedup();
        if ids.len() != out.len() {
            return Err(ConfigError::Invalid(
                "initial-cluster names must be distinct".into(),
            ));
        }
        Ok(out)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(ConfigError::Invalid("name must not be empty".into()));
        }
        for (what, a) in [
            ("client-addr", &self.client_addr),
            ("peer-addr", &self.peer_addr),
        ] {
            if a.parse::<std::net::SocketAddr>().is_err() && !a.contains(':') {
                return Err(ConfigError::Invalid(format!(
                    "{what} {a:?} is not HOST:PORT"
                )));
            }
        }
        if self.schedule.max_replicas == 0 {
            return Err(ConfigError::Invalid(
                "max-replicas must be at least 1".into(),
            ));
        }
        if self.raft.election_ticks <= self.raft.heartbeat_ticks {
            return Err(ConfigError::Invalid(
                "raft.election-ticks must exceed raft.heartbeat-ticks".into(),
            ));
        }
        if self.tso.save_interval.0 < std::time::Duration::from_millis(100) {
            return Err(ConfigError::Invalid(
                "tso.save-interval must be at least 100ms".into(),
            ));
        }
        self.members()?;
        self.security.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let c: PdConfig = toml::from_str(
            r#"
            name = "pd1"
            initial-cluster = "pd1=127.0.0.1:2380,pd2=127.0.0.1:2381"
            [schedule]
            max-replicas = 5
            max-store-down-time = "30s"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.schedule.max_replicas, 5);
        assert_eq!(c.members().unwrap().len(), 2);
        assert_ne!(member_id("pd1"), member_id("pd2"));
        let bad = PdConfig {
            initial_cluster: "pd2=127.0.0.1:1".into(),
            ..c.clone()
        };
        assert!(bad.validate().is_err());
        assert!(toml::from_str::<PdConfig>("nope = 1").is_err());
    }

    #[test]
    fn example_config_parses() {
        let s = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/examples/pd.toml"
        ))
        .unwrap();
        let c: PdConfig = toml::from_str(&s).unwrap();
        c.validate().unwrap();
    }
}
