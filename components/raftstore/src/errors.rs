//! Raftstore errors, and their one mapping into typed protocol region errors.

use atoll_proto::{errorpb, metapb};

#[derive(Debug, thiserror::Error, Clone)]
pub enum Error {
    #[error("peer is not leader for region {region_id}, leader may be {leader:?}")]
    NotLeader {
        region_id: u64,
        leader: Option<metapb::Peer>,
    },
    #[error("epoch not match: {msg}")]
    EpochNotMatch {
        msg: String,
        current_regions: Vec<metapb::Region>,
    },
    #[error("key {key:?} is not in region {region_id} [{start_key:?}, {end_key:?})")]
    KeyNotInRegion {
        key: Vec<u8>,
        region_id: u64,
        start_key: Vec<u8>,
        end_key: Vec<u8>,
    },
    #[error("region {0} not found")]
    RegionNotFound(u64),
    #[error("region {0} is not initialized yet")]
    RegionNotInitialized(u64),
    #[error("request for store {request_store_id} reached store {actual_store_id}")]
    StoreNotMatch {
        request_store_id: u64,
        actual_store_id: u64,
    },
    #[error("server is busy: {0}")]
    ServerIsBusy(String),
    #[error("raft entry of region {region_id} too large: {entry_size} bytes")]
    RaftEntryTooLarge { region_id: u64, entry_size: u64 },
    #[error("stale command: its outcome is unknown to this peer")]
    StaleCommand,
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("engine: {0}")]
    Engine(String),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<atoll_engine::Error> for Error {
    fn from(e: atoll_engine::Error) -> Self {
        Error::Engine(e.to_string())
    }
}

impl From<raft::Error> for Error {
    fn from(e: raft::Error) -> Self {
        match e {
            raft::Error::ProposalDropped => Error::NotLeader {
                region_id: 0,
                leader: None,
            },
            e => Error::Other(format!("raft: {e}")),
        }
    }
}

impl From<prost::DecodeError> for Error {
    fn from(e: prost::DecodeError) -> Self {
        Error::Other(format!("decode: {e}"))
    }
}

impl From<protobuf::ProtobufError> for Error {
    fn from(e: protobuf::ProtobufError) -> Self {
        Error::Other(format!("decode raft message: {e}"))
    }
}

impl Error {
    /// Whether the caller may retry (after refreshing its region cache or backing off).
    pub fn is_region_error(&self) -> bool {
        !matches!(
            self,
            Error::InvalidRequest(_) | Error::Engine(_) | Error::Other(_)
        )
    }
}

/// The single place raftstore errors become protocol errors.
impl From<Error> for errorpb::Error {
    fn from(e: Error) -> errorpb::Error {
        let mut out = errorpb::Error {
            message: e.to_string(),
            ..Default::default()
        };
        match e {
            Error::NotLeader { region_id, leader } => {
                out.not_leader = Some(errorpb::NotLeader { region_id, leader })
            }
            Error::EpochNotMatch {
                current_regions, ..
            } => out.epoch_not_match = Some(errorpb::EpochNotMatch { current_regions }),
            Error::KeyNotInRegion {
                key,
                region_id,
                start_key,
                end_key,
            } => {
                out.key_not_in_region = Some(errorpb::KeyNotInRegion {
                    key,
                    region_id,
                    start_key,
                    end_key,
                })
            }
            Error::RegionNotFound(region_id) => {
                out.region_not_found = Some(errorpb::RegionNotFound { region_id })
            }
            Error::RegionNotInitialized(region_id) => {
                out.region_not_initialized = Some(errorpb::RegionNotInitialized { region_id })
            }
            Error::StoreNotMatch {
                request_store_id,
                actual_store_id,
            } => {
                out.store_not_match = Some(errorpb::StoreNotMatch {
                    request_store_id,
                    actual_store_id,
                })
            }
            Error::ServerIsBusy(reason) => {
                out.server_is_busy = Some(errorpb::ServerIsBusy {
                    reason,
                    backoff_ms: 20,
                })
            }
            Error::RaftEntryTooLarge {
                region_id,
                entry_size,
            } => {
                out.raft_entry_too_large = Some(errorpb::RaftEntryTooLarge {
                    region_id,
                    entry_size,
                })
            }
            Error::StaleCommand => out.stale_command = Some(errorpb::StaleCommand {}),
            Error::InvalidRequest(_) | Error::Engine(_) | Error::Other(_) => {}
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_to_typed_fields() {
        let e: errorpb::Error = Error::NotLeader {
            region_id: 3,
            leader: Some(metapb::Peer {
                id: 4,
                store_id: 5,
                role: 0,
            }),
        }
        .into();
        assert_eq!(e.not_leader.unwrap().leader.unwrap().store_id, 5);
        let e: errorpb::Error = Error::EpochNotMatch {
            msg: "x".into(),
            current_regions: vec![],
        }
        .into();
        assert!(e.epoch_not_match.is_some());
        let e: errorpb::Error = Error::ServerIsBusy("full".into()).into();
        assert!(e.server_is_busy.is_some());
    }
}
