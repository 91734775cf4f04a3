//! `storage-node` configuration: TOML (kebab-case) with the flags of the command-line contract
//! as overrides.

pub use atoll_storage::StorageConfig;
use atoll_util::config::{ReadableDuration, ReadableSize};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct NodeConfig {
    /// PD client addresses, comma separated.
    pub pd: String,
    pub data_dir: PathBuf,
    /// gRPC for clients and other stores.
    pub addr: String,
    pub advertise_addr: String,
    /// HTTP: /metrics, /status, /fail/<name>.
    pub status_addr: String,
    pub advertise_status_addr: String,
    pub log_level: String,
    /// How long an auth token from etcd's `Authenticate` stays valid, in seconds (etcd's
    /// `--auth-token-ttl`).
    pub auth_token_ttl: u64,
    /// How long the store uses its cached auth state before a call confirms it with one read
    /// (docs/security.md, "State, replication, restarts"): longer means fewer reads of the
    /// auth records and later enforcement of changes made through other stores.
    pub auth_cache_ttl: ReadableDuration,
    pub storage: StorageConfig,
    pub rocksdb: RocksDbConfig,
    pub raftstore: atoll_raftstore::Config,
    /// TLS (`[security]`: cert-file, key-file, trusted-ca-file, client-cert-auth, peer-*).
    pub security: atoll_util::tls::SecurityConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct RocksDbConfig {
    pub block_cache_size: ReadableSize,
    pub write_buffer_size: ReadableSize,
    pub max_background_jobs: i32,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            pd: "127.0.0.1:2379".into(),
            data_dir: PathBuf::from("store-data"),
            addr: "127.0.0.1:20160".into(),
            advertise_addr: String::new(),
            status_addr: "127.0.0.1:20180".into(),
            advertise_status_addr: String::new(),
            log_level: "info".into(),
            auth_token_ttl: atoll_etcd::auth::DEFAULT_TOKEN_TTL_SECS,
            auth_cache_ttl: ReadableDuration(atoll_etcd::auth::REFRESH_INTERVAL),
            storage: StorageConfig::default(),
            rocksdb: RocksDbConfig::default(),
            raftstore: atoll_raftstore::Config::default(),
            security: Default::default(),
        }
    }
}

impl Default for RocksDbConfig {
    fn default() -> Self {
        RocksDbConfig {
            block_cache_size: ReadableSize::mib(256),
            write_buffer_size: ReadableSize::mib(32),
            max_background_jobs: 2,
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

impl NodeConfig {
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

    pub fn pd_endpoints(&self) -> Vec<String> {
        atoll_pd_client::rpc::parse_endpoints(&self.pd)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.pd_endpoints().is_empty() {
            return Err(ConfigError::Invalid(
                "--pd needs at least one address".into(),
            ));
        }
        if self.addr.is_empty() {
            return Err(ConfigError::Invalid("--addr must not be empty".into()));
        }
        if self.auth_token_ttl == 0 {
            return Err(ConfigError::Invalid(
                "--auth-token-ttl must be at least 1 (seconds)".into(),
            ));
        }
        if self.auth_cache_ttl.0.is_zero()
            || self.auth_cache_ttl.0 > std::time::Duration::from_secs(3600)
        {
            return Err(ConfigError::Invalid(
                "auth-cache-ttl must be more than 0 and at most 1h".into(),
            ));
        }
        if self.storage.max_key_size.0 == 0 || self.storage.max_value_size.0 == 0 {
            return Err(ConfigError::Invalid(
                "storage.max-key-size and max-value-size must be positive".into(),
            ));
        }
        if self.storage.max_value_size.0 + self.storage.max_key_size.0 + 4096
            > self.raftstore.raft_entry_max_size.0
        {
            return Err(ConfigError::Invalid(format!(
                "raftstore.raft-entry-max-size ({}) must exceed the largest key plus value",
                self.raftstore.raft_entry_max_size
            )));
        }
        if self.storage.latch_slots == 0 {
            return Err(ConfigError::Invalid(
                "storage.latch-slots must be positive".into(),
            ));
        }
        self.raftstore
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        self.security.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }

    pub fn advertise(&self, bound: &std::net::SocketAddr) -> String {
        if !self.advertise_addr.is_empty() {
            return self.advertise_addr.clone();
        }
        // A wildcard bind is not an address anyone can dial.
        if bound.ip().is_unspecified() {
            format!("127.0.0.1:{}", bound.port())
        } else {
            bound.to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let s = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/examples/storage-node.toml"
        ))
        .unwrap();
        let c: NodeConfig = toml::from_str(&s).unwrap();
        c.validate().unwrap();
        assert_eq!(c.raftstore.region_split_size, ReadableSize::mib(96));
    }

    #[test]
    fn rejects_bad_values() {
        let c = NodeConfig {
            pd: " , ".into(),
            ..Default::default()
        };
        assert!(c.validate().is_err());
        let mut c = NodeConfig::default();
        c.storage.max_value_size = ReadableSize::mib(64);
        assert!(c.validate().is_err());
        assert!(toml::from_str::<NodeConfig>("unknown-key = 1").is_err());
    }
}
