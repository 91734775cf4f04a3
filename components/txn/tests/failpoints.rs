//! Failpoint tests: in their own binary because the `fail` registry is process-wide.

use atoll_engine::memory::MemoryEngine;
use atoll_engine::KvEngine;
use atoll_proto::kvrpcpb::Op;
use atoll_txn::actions::{FP_COMMIT, FP_PREWRITE};
use atoll_txn::{commit, prewrite, Error, MvccReader, MvccTxn, PrewriteParams};

fn apply(e: &MemoryEngine, txn: MvccTxn) {
    let mut wb = e.write_batch();
    for m in txn.into_modifies() {
        m.apply_to(&mut wb).unwrap();
    }
    e.write(wb, false).unwrap();
}

#[test]
fn prewrite_and_commit_failpoints() {
    if !fail::has_failpoints() {
        eprintln!("failpoints feature off: skipping");
        return;
    }
    let scenario = fail::FailScenario::setup();
    let e = MemoryEngine::new();
    let params = PrewriteParams {
        primary: b"k".to_vec(),
        start_ts: 10,
        lock_ttl: 1000,
        ..Default::default()
    };

    fail::cfg(FP_PREWRITE, "return(injected)").unwrap();
    let mut txn = MvccTxn::new(10);
    let r = MvccReader::new(e.snapshot());
    let err = prewrite(&mut txn, &r, &params, (Op::Put, b"k", b"v"), false).unwrap_err();
    assert!(
        matches!(err, Error::Other(ref m) if m.contains("injected")),
        "{err:?}"
    );
    assert!(txn.is_empty());
    fail::remove(FP_PREWRITE);

    let mut txn = MvccTxn::new(10);
    prewrite(&mut txn, &r, &params, (Op::Put, b"k", b"v"), false).unwrap();
    apply(&e, txn);

    fail::cfg(FP_COMMIT, "return(boom)").unwrap();
    let r = MvccReader::new(e.snapshot());
    let mut txn = MvccTxn::new(10);
    assert!(matches!(
        commit(&mut txn, &r, b"k", 20),
        Err(Error::Other(_))
    ));
    fail::remove(FP_COMMIT);
    commit(&mut txn, &r, b"k", 20).unwrap();
    apply(&e, txn);
    let r = MvccReader::new(e.snapshot());
    assert_eq!(r.get(b"k", 20, &[]).unwrap(), Some(b"v".to_vec()));
    scenario.teardown();
}
