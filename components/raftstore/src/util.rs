//! Helpers over regions, epochs and messages shared by the raft and apply sides.

use crate::{Error, Result};
use atoll_proto::metapb::{self, PeerRole};
use raft::eraftpb::ConfState;

pub fn encode_msg<M: prost::Message>(m: &M) -> Vec<u8> {
    m.encode_to_vec()
}

pub fn decode_msg<M: prost::Message + Default>(b: &[u8]) -> Result<M> {
    Ok(M::decode(b)?)
}

pub fn conf_state_from_region(region: &metapb::Region) -> ConfState {
    let mut cs = ConfState::default();
    for p in &region.peers {
        if p.role == PeerRole::Learner as i32 {
            cs.learners.push(p.id);
        } else {
            cs.voters.push(p.id);
        }
    }
    cs
}

pub fn find_peer(region: &metapb::Region, store_id: u64) -> Option<&metapb::Peer> {
    region.peers.iter().find(|p| p.store_id == store_id)
}

pub fn find_peer_by_id(region: &metapb::Region, peer_id: u64) -> Option<&metapb::Peer> {
    region.peers.iter().find(|p| p.id == peer_id)
}

pub fn epoch(region: &metapb::Region) -> metapb::RegionEpoch {
    region.region_epoch.unwrap_or_default()
}

/// Whether `a` is older than `b` in either dimension.
pub fn is_epoch_stale(a: &metapb::RegionEpoch, b: &metapb::RegionEpoch) -> bool {
    a.version < b.version || a.conf_ver < b.conf_ver
}

/// Checks a request's epoch against the region. `check_ver` for data requests (splits move
/// keys), `check_conf_ver` for membership-sensitive admin commands.
pub fn check_epoch(
    region: &metapb::Region,
    req_epoch: Option<&metapb::RegionEpoch>,
    check_ver: bool,
    check_conf_ver: bool,
) -> Result<()> {
    let cur = epoch(region);
    let Some(req) = req_epoch else {
        return Err(Error::EpochNotMatch {
            msg: format!("region {} request carries no epoch", region.id),
            current_regions: vec![region.clone()],
        });
    };
    if (check_ver && req.version != cur.version) || (check_conf_ver && req.conf_ver != cur.conf_ver)
    {
        return Err(Error::EpochNotMatch {
            msg: format!(
                "region {} epoch {{conf_ver {}, version {}}} != request {{conf_ver {}, version {}}}",
                region.id, cur.conf_ver, cur.version, req.conf_ver, req.version
            ),
            current_regions: vec![region.clone()],
        });
    }
    Ok(())
}

/// The one reading of a region's end key: `None` when the region is unbounded above (its end
/// key is empty).
pub fn region_end(end_key: &[u8]) -> Option<&[u8]> {
    (!end_key.is_empty()).then_some(end_key)
}

/// Whether `key` lies before the range end `end_key` (an empty end is +infinity).
pub fn is_before_end(key: &[u8], end_key: &[u8]) -> bool {
    region_end(end_key).is_none_or(|e| key < e)
}

/// Whether `end`, the exclusive end of a range of keys, stays within the region.
pub fn end_within_region(end: &[u8], region: &metapb::Region) -> bool {
    region_end(&region.end_key).is_none_or(|e| end <= e)
}

pub fn key_not_in_region(key: Vec<u8>, region: &metapb::Region) -> Error {
    Error::KeyNotInRegion {
        key,
        region_id: region.id,
        start_key: region.start_key.clone(),
        end_key: region.end_key.clone(),
    }
}

pub fn check_key_in_region(key: &[u8], region: &metapb::Region) -> Result<()> {
    if key >= region.start_key.as_slice() && is_before_end(key, &region.end_key) {
        Ok(())
    } else {
        Err(key_not_in_region(key.to_vec(), region))
    }
}

/// The user key of a stored data key (memcomparable prefix, timestamp ignored).
pub fn user_key_of(data_key: &[u8]) -> Result<Vec<u8>> {
    atoll_keys::decode_data_key(data_key)
        .map(|(k, _)| k)
        .map_err(|e| Error::InvalidRequest(format!("bad data key: {e}")))
}

/// `[start, end)` of a region in the data column families' stored form (a region that ends at
/// +infinity ends at `atoll_keys::DATA_MAX_KEY`, above every stored data key).
pub fn data_bounds(region: &metapb::Region) -> (Vec<u8>, Vec<u8>) {
    (
        atoll_keys::data_start_key(&region.start_key),
        atoll_keys::data_end_bound(&region.end_key),
    )
}

pub fn is_learner(p: &metapb::Peer) -> bool {
    p.role == PeerRole::Learner as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(ver: u64, conf: u64) -> metapb::Region {
        metapb::Region {
            id: 1,
            start_key: b"b".to_vec(),
            end_key: b"d".to_vec(),
            region_epoch: Some(metapb::RegionEpoch {
                conf_ver: conf,
                version: ver,
            }),
            peers: vec![
                metapb::Peer {
                    id: 2,
                    store_id: 1,
                    role: 0,
                },
                metapb::Peer {
                    id: 3,
                    store_id: 2,
                    role: PeerRole::Learner as i32,
                },
            ],
        }
    }

    #[test]
    fn epochs_and_keys() {
        let r = region(2, 3);
        let same = metapb::RegionEpoch {
            conf_ver: 3,
            version: 2,
        };
        let older = metapb::RegionEpoch {
            conf_ver: 3,
            version: 1,
        };
        check_epoch(&r, Some(&same), true, true).unwrap();
        assert!(check_epoch(&r, Some(&older), true, false).is_err());
        check_epoch(&r, Some(&older), false, true).unwrap();
        assert!(is_epoch_stale(&older, &same));
        check_key_in_region(b"c", &r).unwrap();
        assert!(matches!(
            check_key_in_region(b"d", &r),
            Err(Error::KeyNotInRegion { .. })
        ));
        let cs = conf_state_from_region(&r);
        assert_eq!(cs.voters, vec![2]);
        assert_eq!(cs.learners, vec![3]);
        let k = atoll_keys::append_ts(atoll_keys::data_key(b"abc"), 9);
        assert_eq!(user_key_of(&k).unwrap(), b"abc");
    }

    #[test]
    fn the_region_end_bound() {
        assert_eq!(region_end(b""), None);
        assert_eq!(region_end(b"m"), Some(&b"m"[..]));
        assert!(
            is_before_end(b"\xff\xff\xff", b""),
            "an empty end is +infinity"
        );
        assert!(is_before_end(b"a", b"b"));
        assert!(!is_before_end(b"b", b"b"), "the end is exclusive");
        let r = region(1, 1);
        assert!(
            end_within_region(b"d", &r),
            "a range may end at the region's end"
        );
        assert!(!end_within_region(b"e", &r));
        let unbounded = metapb::Region::default();
        assert!(end_within_region(b"\xff", &unbounded));
        assert!(check_key_in_region(b"\xff", &unbounded).is_ok());
        assert!(check_key_in_region(b"a", &r).is_err(), "below the start");
    }
}
