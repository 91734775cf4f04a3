//! Bootstrap: the store's identity and data format marker, and the first region's states
//! (written before PD is told, undone if another store bootstrapped the cluster first).

use crate::raft::storage;
use crate::{util, Error, Result};
use atoll_engine::{KvEngine, WriteBatch, CF_RAFT};
use atoll_proto::metapb;
use atoll_proto::raft_serverpb::StoreIdent;

pub fn load_store_ident(engine: &impl KvEngine) -> Result<Option<StoreIdent>> {
    match engine.get_value_cf(CF_RAFT, &atoll_keys::store_ident_key())? {
        Some(v) => Ok(Some(util::decode_msg(&v)?)),
        None => Ok(None),
    }
}

pub fn write_store_ident(engine: &impl KvEngine, ident: &StoreIdent) -> Result<()> {
    let mut wb = engine.write_batch();
    wb.put_cf(
        CF_RAFT,
        &atoll_keys::store_ident_key(),
        &util::encode_msg(ident),
    )?;
    wb.put_cf(
        CF_RAFT,
        &atoll_keys::data_format_key(),
        &atoll_keys::DATA_FORMAT_VERSION.to_be_bytes(),
    )?;
    engine.write(wb, true)?;
    Ok(())
}

/// Refuses a data directory written in another on-disk format than this build's
/// ([`atoll_keys::DATA_FORMAT_VERSION`]), with an error that says what to do.
pub fn check_data_format(engine: &impl KvEngine) -> Result<()> {
    if load_store_ident(engine)?.is_none() {
        return Ok(());
    }
    let found = match engine.get_value_cf(CF_RAFT, &atoll_keys::data_format_key())? {
        Some(v) => match <[u8; 4]>::try_from(v.as_slice()) {
            Ok(b) => u32::from_be_bytes(b),
            Err(_) => return Err(Error::Other("undecodable data format marker".into())),
        },
        None => 0,
    };
    if found != atoll_keys::DATA_FORMAT_VERSION {
        return Err(Error::Other(format!(
            "this data directory is in data format {found}, this build reads format {}: \
             start it with an empty --data-dir (data formats are not converted in place)",
            atoll_keys::DATA_FORMAT_VERSION
        )));
    }
    Ok(())
}

/// Writes a region's initial states (before telling PD about it, or in tests).
pub fn prepare_bootstrap_region(engine: &impl KvEngine, region: &metapb::Region) -> Result<()> {
    let mut wb = engine.write_batch();
    storage::write_initial_states(&mut wb, region)?;
    engine.write(wb, true)?;
    Ok(())
}

/// Undoes [`prepare_bootstrap_region`] (another store bootstrapped the cluster first).
pub fn clear_prepared_bootstrap(engine: &impl KvEngine, region_id: u64) -> Result<()> {
    storage::clear_raft_state(engine, region_id, true)
}

/// Whether the engine holds any region at all.
pub fn has_regions(engine: &impl KvEngine) -> Result<bool> {
    let (s, e) = atoll_keys::region_state_range();
    let mut any = false;
    engine.scan_cf(CF_RAFT, &s, Some(&e), false, |_, _| {
        any = true;
        Ok(false)
    })?;
    Ok(any)
}
