//! The conformance suite: every engine implementation runs [`run_all`] from its tests.
//! Each check takes a fresh engine from the factory.

use crate::*;

pub fn run_all<E: KvEngine>(mut new_engine: impl FnMut() -> E) {
    point_get_and_delete(&new_engine());
    write_batch_is_atomic_across_cfs(&new_engine());
    snapshot_is_consistent(&new_engine());
    iterator_bounds_forward(&new_engine());
    iterator_bounds_reverse(&new_engine());
    delete_range(&new_engine());
    unknown_cf_is_an_error(&new_engine());
    scan_cf_stops_when_asked(&new_engine());
    approximate_size_after_flush(&new_engine());
    empty_values_are_values(&new_engine());
}

fn put(e: &impl KvEngine, cf: &str, k: &[u8], v: &[u8]) {
    let mut wb = e.write_batch();
    wb.put_cf(cf, k, v).unwrap();
    e.write(wb, false).unwrap();
}

fn collect<I: EngineIterator>(it: &mut I, first: bool, forward: bool) -> Vec<Vec<u8>> {
    let mut out = vec![];
    let mut ok = first;
    while ok {
        out.push(it.key().to_vec());
        ok = if forward {
            it.next().unwrap()
        } else {
            it.prev().unwrap()
        };
    }
    out
}

pub fn point_get_and_delete(e: &impl KvEngine) {
    assert_eq!(e.get_value_cf(CF_DEFAULT, b"k").unwrap(), None);
    put(e, CF_DEFAULT, b"k", b"v");
    assert_eq!(
        e.get_value_cf(CF_DEFAULT, b"k").unwrap().as_deref(),
        Some(&b"v"[..])
    );
    // Column families are separate key spaces.
    assert_eq!(e.get_value_cf(CF_WRITE, b"k").unwrap(), None);
    let mut wb = e.write_batch();
    wb.delete_cf(CF_DEFAULT, b"k").unwrap();
    e.write(wb, true).unwrap();
    assert_eq!(e.get_value_cf(CF_DEFAULT, b"k").unwrap(), None);
}

pub fn write_batch_is_atomic_across_cfs(e: &impl KvEngine) {
    let mut wb = e.write_batch();
    assert!(wb.is_empty());
    wb.put_cf(CF_DEFAULT, b"a", b"1").unwrap();
    wb.put_cf(CF_LOCK, b"a", b"2").unwrap();
    wb.put_cf(CF_RAFT, b"a", b"3").unwrap();
    wb.delete_cf(CF_DEFAULT, b"a").unwrap();
    wb.put_cf(CF_DEFAULT, b"a", b"4").unwrap();
    assert_eq!(wb.count(), 5);
    assert!(wb.data_size() >= 9, "data size {}", wb.data_size());
    let snap = e.snapshot();
    e.write(wb, true).unwrap();
    assert_eq!(snap.get_value_cf(CF_LOCK, b"a").unwrap(), None);
    assert_eq!(
        e.get_value_cf(CF_DEFAULT, b"a").unwrap().as_deref(),
        Some(&b"4"[..])
    );
    assert_eq!(
        e.get_value_cf(CF_LOCK, b"a").unwrap().as_deref(),
        Some(&b"2"[..])
    );
    assert_eq!(
        e.get_value_cf(CF_RAFT, b"a").unwrap().as_deref(),
        Some(&b"3"[..])
    );
    let mut wb = e.write_batch();
    wb.put_cf(CF_DEFAULT, b"x", b"x").unwrap();
    wb.clear();
    assert!(wb.is_empty());
    e.write(wb, false).unwrap();
    assert_eq!(e.get_value_cf(CF_DEFAULT, b"x").unwrap(), None);
}

pub fn snapshot_is_consistent(e: &impl KvEngine) {
    put(e, CF_WRITE, b"k1", b"old");
    let snap = e.snapshot();
    let snap2 = snap.clone();
    put(e, CF_WRITE, b"k1", b"new");
    put(e, CF_WRITE, b"k2", b"new");
    assert_eq!(
        snap.get_value_cf(CF_WRITE, b"k1").unwrap().as_deref(),
        Some(&b"old"[..])
    );
    assert_eq!(snap2.get_value_cf(CF_WRITE, b"k2").unwrap(), None);
    let mut it = snap.iterator_cf(CF_WRITE, IterOptions::default()).unwrap();
    let first = it.seek_to_first().unwrap();
    assert_eq!(collect(&mut it, first, true), vec![b"k1".to_vec()]);
    // The snapshot outlives other handles and can move across threads.
    let h = std::thread::spawn(move || snap2.get_value_cf(CF_WRITE, b"k1").unwrap());
    assert_eq!(h.join().unwrap().as_deref(), Some(&b"old"[..]));
}

fn fill(e: &impl KvEngine, cf: &str, keys: &[&[u8]]) {
    let mut wb = e.write_batch();
    for k in keys {
        wb.put_cf(cf, k, b"v").unwrap();
    }
    e.write(wb, false).unwrap();
}

pub fn iterator_bounds_forward(e: &impl KvEngine) {
    fill(e, CF_DEFAULT, &[b"a", b"b", b"c", b"d", b"e"]);
    let mut it = e
        .iterator_cf(
            CF_DEFAULT,
            IterOptions::new(Some(b"b".to_vec()), Some(b"e".to_vec())),
        )
        .unwrap();
    let first = it.seek_to_first().unwrap();
    assert_eq!(
        collect(&mut it, first, true),
        vec![b"b".to_vec(), b"c".to_vec(), b"d".to_vec()]
    );
    assert!(it.seek(b"a").unwrap());
    assert_eq!(it.key(), b"b");
    assert!(it.seek(b"bb").unwrap());
    assert_eq!(it.key(), b"c");
    assert_eq!(it.value(), b"v");
    assert!(!it.seek(b"e").unwrap());
    assert!(!it.valid().unwrap());
    // Unbounded.
    let mut it = e.iterator_cf(CF_DEFAULT, IterOptions::default()).unwrap();
    let first = it.seek(b"").unwrap();
    assert_eq!(collect(&mut it, first, true).len(), 5);
}

pub fn iterator_bounds_reverse(e: &impl KvEngine) {
    fill(e, CF_LOCK, &[b"a", b"b", b"c", b"d", b"e"]);
    let mut it = e
        .iterator_cf(
            CF_LOCK,
            IterOptions::new(Some(b"b".to_vec()), Some(b"e".to_vec())),
        )
        .unwrap();
    let last = it.seek_to_last().unwrap();
    assert_eq!(
        collect(&mut it, last, false),
        vec![b"d".to_vec(), b"c".to_vec(), b"b".to_vec()]
    );
    assert!(it.seek_for_prev(b"cc").unwrap());
    assert_eq!(it.key(), b"c");
    assert!(it.seek_for_prev(b"z").unwrap());
    assert_eq!(it.key(), b"d");
    assert!(!it.seek_for_prev(b"a").unwrap());
    let mut it = e.iterator_cf(CF_LOCK, IterOptions::default()).unwrap();
    assert!(it.seek_for_prev(b"c").unwrap());
    assert_eq!(it.key(), b"c");
    assert!(it.prev().unwrap());
    assert_eq!(it.key(), b"b");
}

pub fn delete_range(e: &impl KvEngine) {
    fill(e, CF_WRITE, &[b"a", b"b", b"c", b"d"]);
    let mut wb = e.write_batch();
    wb.delete_range_cf(CF_WRITE, b"b", b"d").unwrap();
    e.write(wb, true).unwrap();
    let mut it = e.iterator_cf(CF_WRITE, IterOptions::default()).unwrap();
    let first = it.seek_to_first().unwrap();
    assert_eq!(
        collect(&mut it, first, true),
        vec![b"a".to_vec(), b"d".to_vec()]
    );
}

pub fn unknown_cf_is_an_error(e: &impl KvEngine) {
    assert!(e.get_value_cf("nope", b"k").is_err());
    assert!(e.iterator_cf("nope", IterOptions::default()).is_err());
    let mut wb = e.write_batch();
    assert!(wb.put_cf("nope", b"k", b"v").is_err());
}

pub fn scan_cf_stops_when_asked(e: &impl KvEngine) {
    fill(e, CF_RAFT, &[b"k1", b"k2", b"k3", b"k4"]);
    let mut seen = vec![];
    e.scan_cf(CF_RAFT, b"k2", Some(b"k9"), true, |k, _| {
        seen.push(k.to_vec());
        Ok(seen.len() < 2)
    })
    .unwrap();
    assert_eq!(seen, vec![b"k2".to_vec(), b"k3".to_vec()]);
}

pub fn approximate_size_after_flush(e: &impl KvEngine) {
    let mut wb = e.write_batch();
    for i in 0..2000u32 {
        wb.put_cf(CF_DEFAULT, format!("s{i:06}").as_bytes(), &[7u8; 100])
            .unwrap();
    }
    e.write(wb, false).unwrap();
    e.flush().unwrap();
    let all = e.approximate_size_cf(CF_DEFAULT, b"s", Some(b"t")).unwrap();
    assert!(all > 20_000, "approximate size {all}");
    let none = e.approximate_size_cf(CF_DEFAULT, b"x", None).unwrap();
    assert!(none < all / 10, "approximate size of an empty range {none}");
    e.compact_range_cf(CF_DEFAULT, None, None).unwrap();
}

pub fn empty_values_are_values(e: &impl KvEngine) {
    put(e, CF_DEFAULT, b"empty", b"");
    assert_eq!(e.get_value_cf(CF_DEFAULT, b"empty").unwrap(), Some(vec![]));
}
