//! etcd's Watch service on real processes (1 PD + 3 stores), through gRPC, with the watch
//! checker (`atoll_tests::watch_check`) wherever a stream can be judged against the writes.
//!
//! - `watch_spanning_regions_under_concurrent_writers`: a prefix split into 4 regions, 4
//!   writers putting (and deleting) concurrently through different stores; two watchers (one
//!   from a past revision, one "now") on two stores; then a replay from the first revision on a
//!   third store equals the recorded history, and a watch dropped halfway and resumed at "last
//!   revision + 1" on another store gets exactly the rest.
//! - `watch_stream_protocol`: on one stream: `created`, a client-chosen watch id, the same id
//!   refused, cancel (no event after it), NOPUT / NODELETE, `prev_kv`, a txn writing two
//!   regions arriving as one response at the txn's revision, and a progress request answered
//!   (watch id -1, at or above every acknowledged revision).
//! - `watch_below_compaction_is_canceled`: a start revision below the compaction point is
//!   created, then canceled with `compact_revision`; at the compaction point it works.
//! - `progress_notifications_never_go_below_events_sent`: progress requested every 20 ms
//!   during writes, then with PD down: never below an event already sent, never revision 0.
//! - `orphaned_txn_locks_do_not_hold_a_watch_back`: a multi-region txn abandoned by its client
//!   leaves locks; a watch of one of their regions goes on past them, a put to a locked key
//!   succeeds.

use atoll_proto::etcdserverpb::kv_client::KvClient;
use atoll_proto::etcdserverpb::watch_client::WatchClient;
use atoll_proto::etcdserverpb::watch_create_request::FilterType;
use atoll_proto::etcdserverpb::{
    watch_request, CompactionRequest, WatchCancelRequest, WatchCreateRequest, WatchRequest,
    WatchResponse,
};
use atoll_tests::etcd_watch::{self, progress_request, WatchCtl, WatchSpec};
use atoll_tests::procs::{ClusterOpts, ProcCluster};
use atoll_tests::runtime;
use atoll_tests::watch_check::{
    self, prefix_end, EventKind, History, Incarnation, Kind, Response, Rev, WatcherLog, Write,
    WriteOp, WriteOutcome,
};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;

/// One cluster at a time: each wants the machine's cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn start() -> ProcCluster {
    let c = ProcCluster::start(ClusterOpts {
        pds: 1,
        stores: 3,
        ..Default::default()
    });
    c.wait_ready(Duration::from_secs(60));
    for s in &c.stores {
        let up = atoll_tests::wait_until(Duration::from_secs(30), || {
            std::net::TcpStream::connect(&s.addr).is_ok()
        });
        assert!(up, "store at {} never listened", s.addr);
    }
    c
}

fn must_split(c: &ProcCluster, keys: &[&str]) {
    let mut args = vec!["split"];
    args.extend_from_slice(keys);
    let out = c.kvctl(&args);
    assert!(
        out.status.success(),
        "split {keys:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Regions PD reports that overlap `[start, end)`.
fn regions_overlapping(c: &ProcCluster, start: &str, end: &str) -> usize {
    let v = c.kvctl_json(&["regions"]);
    v["regions"]
        .as_array()
        .expect("regions")
        .iter()
        .filter(|r| {
            let s = r["start_key"].as_str().unwrap_or_default();
            let e = r["end_key"].as_str().unwrap_or_default();
            s < end && (e.is_empty() || e > start)
        })
        .count()
}

fn nodes(c: &ProcCluster) -> Vec<String> {
    c.stores.iter().map(|s| s.addr.clone()).collect()
}

/// One watch stream: what was sent is recorded by the caller, what came back is kept.
struct Stream {
    tx: futures::channel::mpsc::UnboundedSender<WatchRequest>,
    rx: tonic::Streaming<WatchResponse>,
    got: Vec<WatchResponse>,
}

impl Stream {
    async fn open(addr: &str) -> Stream {
        let mut client = WatchClient::new(etcd_watch::channel(addr));
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let rx = tokio::time::timeout(Duration::from_secs(10), client.watch(rx))
            .await
            .unwrap_or_else(|_| panic!("watch on {addr}: no answer in 10 s"))
            .unwrap_or_else(|e| panic!("watch on {addr}: {e}"))
            .into_inner();
        Stream {
            tx,
            rx,
            got: vec![],
        }
    }

    fn send(&self, r: WatchRequest) {
        self.tx.unbounded_send(r).expect("request stream open");
    }

    fn create(&self, c: WatchCreateRequest) {
        self.send(WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(c)),
        });
    }

    fn cancel(&self, watch_id: i64) {
        self.send(WatchRequest {
            request_union: Some(watch_request::RequestUnion::CancelRequest(
                WatchCancelRequest { watch_id },
            )),
        });
    }

    /// Reads responses until `done(all received so far)` holds; panics after `within`.
    async fn until(
        &mut self,
        what: &str,
        within: Duration,
        done: impl Fn(&[WatchResponse]) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + within;
        while !done(&self.got) {
            match tokio::time::timeout_at(deadline, self.rx.message()).await {
                Ok(Ok(Some(r))) => self.got.push(r),
                Ok(Ok(None)) => panic!("{what}: the stream ended; got {:#?}", self.got),
                Ok(Err(e)) => panic!("{what}: {e}; got {:#?}", self.got),
                Err(_) => panic!("{what}: not within {within:?}; got {:#?}", self.got),
            }
        }
    }

    /// Asks for progress until a progress notification at or above `rev` arrives.
    async fn progress_to(&mut self, rev: Rev, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            self.send(progress_request());
            let step = tokio::time::Instant::now() + Duration::from_millis(500);
            loop {
                if self.got.iter().any(|r| is_progress(r) && header(r) >= rev) {
                    return;
                }
                let until = step.min(deadline);
                match tokio::time::timeout_at(until, self.rx.message()).await {
                    Ok(Ok(Some(r))) => self.got.push(r),
                    Ok(Ok(None)) => panic!("progress to {rev}: the stream ended"),
                    Ok(Err(e)) => panic!("progress to {rev}: {e}"),
                    Err(_) => break,
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no progress notification at or above {rev} within {within:?}; got {:#?}",
                self.got
                    .iter()
                    .filter(|r| is_progress(r))
                    .collect::<Vec<_>>()
            );
        }
    }

    /// Responses for `watch_id` (and broadcast progress notifications, watch id -1), up to
    /// its cancel.
    fn of(&self, watch_id: i64) -> Vec<&WatchResponse> {
        let mut out = vec![];
        for r in &self.got {
            if r.watch_id == watch_id || (r.watch_id == -1 && is_progress(r)) {
                out.push(r);
                if r.watch_id == watch_id && r.canceled {
                    break;
                }
            }
        }
        out
    }

    /// The recorded incarnation of `watch_id` for the checker.
    fn incarnation(&self, watch_id: i64, start: Rev, node: &str) -> Incarnation {
        Incarnation {
            start_revision: start,
            node: node.to_string(),
            responses: self
                .of(watch_id)
                .into_iter()
                .map(Response::from_proto)
                .collect(),
            end: String::new(),
        }
    }
}

fn header(r: &WatchResponse) -> Rev {
    r.header.as_ref().map_or(0, |h| h.revision)
}

fn is_progress(r: &WatchResponse) -> bool {
    r.events.is_empty() && !r.created && !r.canceled
}

fn create(key: &str, range_end: &[u8], start: Rev) -> WatchCreateRequest {
    WatchCreateRequest {
        key: key.as_bytes().to_vec(),
        range_end: range_end.to_vec(),
        start_revision: start,
        ..Default::default()
    }
}

fn acked_rev(w: &Write) -> Rev {
    match w.outcome {
        WriteOutcome::Acked(r) => r,
        WriteOutcome::Unknown => panic!("a write failed with no faults: {w:?}"),
    }
}

async fn must_write(kv: &mut KvClient<Channel>, ops: Vec<WriteOp>) -> Write {
    let w = etcd_watch::write(kv, &ops, Duration::from_secs(10)).await;
    acked_rev(&w);
    w
}

/// (key, revision, value or None for a delete) of every event, in the order received.
fn flat_events(rs: &[&WatchResponse]) -> Vec<(String, Rev, Option<String>)> {
    rs.iter()
        .flat_map(|r| &r.events)
        .map(|e| {
            let kv = e.kv.as_ref().expect("event kv");
            (
                String::from_utf8_lossy(&kv.key).into_owned(),
                kv.mod_revision,
                (e.r#type == 0).then(|| String::from_utf8_lossy(&kv.value).into_owned()),
            )
        })
        .collect()
}

/// The events the acknowledged writes made, by (revision, key).
fn expected_events(writes: &[Write], within: &str) -> Vec<(String, Rev, Option<String>)> {
    let mut v: Vec<_> = writes
        .iter()
        .flat_map(|w| {
            let r = acked_rev(w);
            w.ops.iter().map(move |op| {
                (
                    String::from_utf8_lossy(op.key()).into_owned(),
                    r,
                    op.value().map(|v| String::from_utf8_lossy(v).into_owned()),
                )
            })
        })
        .filter(|(k, _, _)| k.starts_with(within))
        .collect();
    v.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    v
}

fn sorted(mut v: Vec<(String, Rev, Option<String>)>) -> Vec<(String, Rev, Option<String>)> {
    v.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    v
}

fn assert_clean(h: &History) -> watch_check::Report {
    let r = watch_check::check(h);
    eprintln!("{r}");
    assert!(r.is_ok(), "watch violations:\n{r}");
    r
}

#[test]
fn watch_spanning_regions_under_concurrent_writers() {
    let _g = SERIAL.lock();
    let c = start();
    must_split(&c, &["wp/k025", "wp/k050", "wp/k075"]);
    let spanned = regions_overlapping(&c, "wp/", "wp0");
    assert!(spanned >= 4, "the prefix spans {spanned} regions");
    let nodes = nodes(&c);
    let seed = atoll_tests::seed();
    let rt = runtime();
    rt.block_on(async {
        let history_start = etcd_watch::current_revision(&nodes[0], b"wp/")
            .await
            .expect("range");
        let prefix = |name: &str| WatchSpec {
            name: name.into(),
            key: b"wp/".to_vec(),
            range_end: prefix_end(b"wp/"),
            start_revision: history_start + 1,
            ..Default::default()
        };
        let ctl = WatchCtl::new(Duration::from_secs(15));
        let specs = vec![
            WatchSpec {
                request_progress: Some(Duration::from_secs(1)),
                ..prefix("from-start-store0")
            },
            WatchSpec {
                start_revision: 0,
                prev_kv: true,
                ..prefix("now-prev-kv-store1")
            },
        ];
        let mut watchers = vec![];
        for (i, spec) in specs.into_iter().enumerate() {
            let log = Arc::new(Mutex::new(spec.log()));
            // One node each: a failure resumes on the same store.
            let h = tokio::spawn(etcd_watch::run_watcher(
                spec,
                vec![nodes[i].clone()],
                0,
                ctl.clone(),
                log.clone(),
            ));
            watchers.push((log, h));
        }
        // The "now" watcher is created before the first write.
        let now_log = watchers[1].0.clone();
        let created = atoll_tests::wait_until_async(Duration::from_secs(20), || {
            let l = now_log.clone();
            async move {
                l.lock()
                    .incarnations
                    .iter()
                    .any(|i| i.responses.iter().any(|r| r.created))
            }
        })
        .await;
        assert!(
            created,
            "the \"now\" watch was never created: {:?}",
            now_log.lock()
        );

        // 4 writers, each through its own store, 150 writes each: puts, some deletes.
        let mut tasks = vec![];
        for id in 0..4usize {
            let addr = nodes[id % nodes.len()].clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed ^ id as u64);
                let mut kv = etcd_watch::kv_client(&addr);
                let mut out = vec![];
                for n in 0..150 {
                    let key = format!("wp/k{:03}", rng.gen_range(0..100));
                    let op = if rng.gen_bool(0.85) {
                        WriteOp::put(key, format!("w{id}-{n}"))
                    } else {
                        WriteOp::delete(key)
                    };
                    out.push(must_write(&mut kv, vec![op]).await);
                }
                out
            }));
        }
        let mut writes = vec![];
        for t in tasks {
            writes.extend(t.await.unwrap());
        }
        let target = writes.iter().map(acked_rev).max().unwrap();
        let expected = expected_events(&writes, "wp/");
        assert!(
            expected.len() > 400,
            "only {} events written",
            expected.len()
        );

        // Both live watchers catch up and pass the checker.
        ctl.catch_up_to
            .store(target, std::sync::atomic::Ordering::Relaxed);
        let mut logs = vec![];
        for (log, h) in watchers {
            let r = tokio::time::timeout(Duration::from_secs(60), h)
                .await
                .expect("a watcher did not catch up in 60 s")
                .unwrap();
            r.unwrap_or_else(|e| panic!("{}: {e}", log.lock().name));
            logs.push(log.lock().clone());
        }
        let live = assert_clean(&History {
            history_start,
            writes: writes.clone(),
            watchers: logs.clone(),
        });
        eprintln!(
            "live watchers: {} resumes; {} events checked",
            live.resumes, live.events_checked
        );

        // Replay from the first revision, on the third store: exactly the recorded history.
        let mut s = Stream::open(&nodes[2]).await;
        s.create(create("wp/", &prefix_end(b"wp/"), history_start + 1));
        s.progress_to(target, Duration::from_secs(60)).await;
        let replay = flat_events(&s.of(s.got[0].watch_id));
        assert!(s.got[0].created, "first response: {:?}", s.got[0]);
        assert_eq!(
            sorted(replay.clone()),
            expected,
            "a replay from {} differs from the history",
            history_start + 1
        );
        let revs: Vec<Rev> = replay.iter().map(|e| e.1).collect();
        assert!(revs.windows(2).all(|w| w[0] <= w[1]), "replay out of order");
        let mut replay_log = WatcherLog {
            name: "replay-store2".into(),
            key: b"wp/".to_vec(),
            range_end: prefix_end(b"wp/"),
            ..Default::default()
        };
        replay_log.incarnations.push(s.incarnation(
            s.got[0].watch_id,
            history_start + 1,
            &nodes[2],
        ));

        // Halfway, then resumed at last + 1 on another store: exactly the rest.
        let mut first = Stream::open(&nodes[0]).await;
        first.create(create("wp/", &prefix_end(b"wp/"), history_start + 1));
        let half = expected.len() / 2;
        first
            .until("the first half", Duration::from_secs(60), |rs| {
                rs.iter().map(|r| r.events.len()).sum::<usize>() >= half
            })
            .await;
        let id0 = first.got[0].watch_id;
        let part1 = flat_events(&first.of(id0));
        let last = part1.last().unwrap().1;
        let inc0 = first.incarnation(id0, history_start + 1, &nodes[0]);
        drop(first);
        let mut second = Stream::open(&nodes[1]).await;
        second.create(create("wp/", &prefix_end(b"wp/"), last + 1));
        second.progress_to(target, Duration::from_secs(60)).await;
        let id1 = second.got[0].watch_id;
        let part2 = flat_events(&second.of(id1));
        assert!(
            part2.iter().all(|e| e.1 > last),
            "the resumed watch went back"
        );
        let mut both = part1.clone();
        both.extend(part2.iter().cloned());
        assert_eq!(
            sorted(both),
            expected,
            "first half ({} events up to {last}) + resumed rest ({} events) differ from the \
             history",
            part1.len(),
            part2.len()
        );
        let mut resume_log = WatcherLog {
            name: "resumed-store0-store1".into(),
            key: b"wp/".to_vec(),
            range_end: prefix_end(b"wp/"),
            ..Default::default()
        };
        resume_log.incarnations.push(inc0);
        resume_log
            .incarnations
            .push(second.incarnation(id1, last + 1, &nodes[1]));
        let all = assert_clean(&History {
            history_start,
            writes,
            watchers: vec![replay_log, resume_log],
        });
        assert_eq!(all.resumes, 1);
        assert_eq!(all.events_checked, 2 * expected.len());
    });
}

#[test]
fn watch_stream_protocol() {
    let _g = SERIAL.lock();
    let c = start();
    must_split(&c, &["wx/t/m"]);
    let nodes = nodes(&c);
    let rt = runtime();
    rt.block_on(async {
        let mut kv = etcd_watch::kv_client(&nodes[1]);
        let history_start = etcd_watch::current_revision(&nodes[0], b"wx/")
            .await
            .expect("range");
        let mut writes: Vec<Write> = vec![];
        let mut s = Stream::open(&nodes[0]).await;

        // A watch with a client-chosen id, then the same id again: refused as etcd refuses it,
        // and the first one lives on.
        s.create(WatchCreateRequest {
            watch_id: 7,
            ..create("wx/", &prefix_end(b"wx/"), history_start + 1)
        });
        s.until("created 7", Duration::from_secs(10), |rs| !rs.is_empty())
            .await;
        let r = &s.got[0];
        assert!(r.created && !r.canceled && r.watch_id == 7, "{r:?}");
        s.create(WatchCreateRequest {
            watch_id: 7,
            ..create("wx/other", &[], 0)
        });
        s.until("duplicate 7", Duration::from_secs(10), |rs| rs.len() >= 2)
            .await;
        let r = &s.got[1];
        assert!(
            r.created
                && r.canceled
                && r.watch_id == -1
                && r.cancel_reason == "mvcc: duplicate watch ID provided on the WatchStream",
            "a duplicate watch id must be answered as etcd does (created, canceled, watch_id -1, \
             etcd's reason): {r:?}"
        );

        // prev_kv on one key: a create has none, an update has the version before, a delete
        // the last version.
        s.create(WatchCreateRequest {
            watch_id: 13,
            prev_kv: true,
            ..create("wx/p", &[], 0)
        });
        s.until("created 13", Duration::from_secs(10), |rs| {
            rs.iter().any(|r| r.watch_id == 13 && r.created)
        })
        .await;
        let p1 = must_write(&mut kv, vec![WriteOp::put("wx/p", "1")]).await;
        let p2 = must_write(&mut kv, vec![WriteOp::put("wx/p", "2")]).await;
        let p3 = must_write(&mut kv, vec![WriteOp::delete("wx/p")]).await;
        let (r1, r2, r3) = (acked_rev(&p1), acked_rev(&p2), acked_rev(&p3));
        assert_eq!(p3.ops.len(), 1, "the delete deleted wx/p: {p3:?}");
        writes.extend([p1, p2, p3]);
        s.until("3 prev_kv events", Duration::from_secs(20), |rs| {
            rs.iter()
                .filter(|r| r.watch_id == 13)
                .map(|r| r.events.len())
                .sum::<usize>()
                >= 3
        })
        .await;
        let evs: Vec<_> = s
            .of(13)
            .into_iter()
            .flat_map(|r| r.events.clone())
            .collect();
        assert_eq!(evs.len(), 3, "{evs:?}");
        assert!(
            evs[0].prev_kv.is_none(),
            "a create has no prev_kv: {:?}",
            evs[0]
        );
        let pk = evs[1].prev_kv.as_ref().expect("prev_kv of the update");
        assert_eq!(
            (
                pk.value.as_slice(),
                pk.mod_revision,
                pk.create_revision,
                pk.version
            ),
            (&b"1"[..], r1, r1, 1),
            "{pk:?}"
        );
        assert_eq!(evs[2].r#type, 1, "a delete event: {:?}", evs[2]);
        let pk = evs[2].prev_kv.as_ref().expect("prev_kv of the delete");
        assert_eq!(
            (
                pk.value.as_slice(),
                pk.mod_revision,
                pk.create_revision,
                pk.version
            ),
            (&b"2"[..], r2, r1, 2),
            "{pk:?}"
        );
        assert_eq!(evs[2].kv.as_ref().unwrap().mod_revision, r3);

        // NOPUT and NODELETE.
        s.create(WatchCreateRequest {
            watch_id: 10,
            filters: vec![FilterType::Noput as i32],
            ..create("wx/f", &[], 0)
        });
        s.create(WatchCreateRequest {
            watch_id: 11,
            filters: vec![FilterType::Nodelete as i32],
            ..create("wx/f", &[], 0)
        });
        s.create(WatchCreateRequest {
            watch_id: 12,
            ..create("wx/f", &[], 0)
        });
        s.until("created 10, 11, 12", Duration::from_secs(10), |rs| {
            [10, 11, 12]
                .iter()
                .all(|id| rs.iter().any(|r| r.watch_id == *id && r.created))
        })
        .await;
        for op in [
            WriteOp::put("wx/f", "1"),
            WriteOp::delete("wx/f"),
            WriteOp::put("wx/f", "2"),
            WriteOp::delete("wx/f"),
        ] {
            writes.push(must_write(&mut kv, vec![op]).await);
        }

        // A txn writing two regions, then one deleting both and putting a third key: each
        // arrives as one response, at the txn's revision.
        s.create(WatchCreateRequest {
            watch_id: 14,
            ..create("wx/t/", &prefix_end(b"wx/t/"), 0)
        });
        s.until("created 14", Duration::from_secs(10), |rs| {
            rs.iter().any(|r| r.watch_id == 14 && r.created)
        })
        .await;
        let t1 = must_write(
            &mut kv,
            vec![WriteOp::put("wx/t/a", "x"), WriteOp::put("wx/t/z", "y")],
        )
        .await;
        let t2 = must_write(
            &mut kv,
            vec![
                WriteOp::delete("wx/t/a"),
                WriteOp::delete("wx/t/z"),
                WriteOp::put("wx/t/b", "z"),
            ],
        )
        .await;
        assert_eq!(t2.ops.len(), 3, "the txn deleted both keys: {t2:?}");
        let (tr1, tr2) = (acked_rev(&t1), acked_rev(&t2));
        writes.extend([t1, t2]);
        s.until("the txns' events", Duration::from_secs(20), |rs| {
            rs.iter()
                .filter(|r| r.watch_id == 14)
                .map(|r| r.events.len())
                .sum::<usize>()
                >= 5
        })
        .await;
        let txn_resps: Vec<Vec<(String, Rev, Option<String>)>> = s
            .of(14)
            .into_iter()
            .filter(|r| !r.events.is_empty())
            .map(|r| flat_events(&[r]))
            .collect();
        let opt = |v: &str| Some(v.to_string());
        assert_eq!(
            txn_resps.into_iter().map(sorted).collect::<Vec<_>>(),
            vec![
                vec![
                    ("wx/t/a".into(), tr1, opt("x")),
                    ("wx/t/z".into(), tr1, opt("y"))
                ],
                vec![
                    ("wx/t/a".into(), tr2, None),
                    ("wx/t/b".into(), tr2, opt("z")),
                    ("wx/t/z".into(), tr2, None)
                ],
            ],
            "each txn must arrive as one response at its revision"
        );

        // Cancel: the canceled watch gets nothing more; a new one on the same key does.
        s.create(WatchCreateRequest {
            watch_id: 8,
            ..create("wx/c", &[], 0)
        });
        s.until("created 8", Duration::from_secs(10), |rs| {
            rs.iter().any(|r| r.watch_id == 8 && r.created)
        })
        .await;
        writes.push(must_write(&mut kv, vec![WriteOp::put("wx/c", "1")]).await);
        s.until("event for 8", Duration::from_secs(20), |rs| {
            rs.iter().any(|r| r.watch_id == 8 && !r.events.is_empty())
        })
        .await;
        s.cancel(8);
        s.until("canceled 8", Duration::from_secs(10), |rs| {
            rs.iter().any(|r| r.watch_id == 8 && r.canceled)
        })
        .await;
        let canceled_at = s.got.len();
        s.create(WatchCreateRequest {
            watch_id: 9,
            ..create("wx/c", &[], 0)
        });
        s.until("created 9", Duration::from_secs(10), |rs| {
            rs.iter().any(|r| r.watch_id == 9 && r.created)
        })
        .await;
        for v in ["2", "3"] {
            writes.push(must_write(&mut kv, vec![WriteOp::put("wx/c", v)]).await);
        }
        s.until("2 events for 9", Duration::from_secs(20), |rs| {
            rs.iter()
                .filter(|r| r.watch_id == 9)
                .map(|r| r.events.len())
                .sum::<usize>()
                >= 2
        })
        .await;
        let after: Vec<&WatchResponse> = s.got[canceled_at..]
            .iter()
            .filter(|r| r.watch_id == 8)
            .collect();
        assert!(
            after.is_empty(),
            "responses for a canceled watch: {after:?}"
        );

        // A progress request: answered for the whole stream (watch id -1, as etcd 3.5), at or
        // above every acknowledged revision.
        let top = writes.iter().map(acked_rev).max().unwrap();
        s.progress_to(top, Duration::from_secs(30)).await;
        let p = s
            .got
            .iter()
            .find(|r| is_progress(r) && header(r) >= top)
            .unwrap();
        assert_eq!(p.watch_id, -1, "a progress request's answer: {p:?}");

        // The filter watches: only deletes, only puts, everything.
        let f = |id: i64| -> Vec<EventKind> {
            s.of(id)
                .into_iter()
                .flat_map(|r| &r.events)
                .map(|e| {
                    if e.r#type == 1 {
                        EventKind::Delete
                    } else {
                        EventKind::Put
                    }
                })
                .collect()
        };
        assert_eq!(f(10), vec![EventKind::Delete; 2], "NOPUT");
        assert_eq!(f(11), vec![EventKind::Put; 2], "NODELETE");
        assert_eq!(f(12).len(), 4, "no filter");

        // Everything through the checker.
        let log = |name: &str, id: i64, key: &str, range_end: &[u8], start: Rev| {
            let mut l = WatcherLog {
                name: name.into(),
                key: key.as_bytes().to_vec(),
                range_end: range_end.to_vec(),
                ..Default::default()
            };
            l.incarnations.push(s.incarnation(id, start, &nodes[0]));
            l
        };
        let mut logs = vec![
            log("all-7", 7, "wx/", &prefix_end(b"wx/"), history_start + 1),
            log("prev-kv-13", 13, "wx/p", &[], 0),
            log("noput-10", 10, "wx/f", &[], 0),
            log("nodelete-11", 11, "wx/f", &[], 0),
            log("nofilter-12", 12, "wx/f", &[], 0),
            log("txn-14", 14, "wx/t/", &prefix_end(b"wx/t/"), 0),
            log("canceled-8", 8, "wx/c", &[], 0),
            log("after-cancel-9", 9, "wx/c", &[], 0),
        ];
        logs[1].prev_kv = true;
        logs[2].no_put = true;
        logs[3].no_delete = true;
        let r = assert_clean(&History {
            history_start,
            writes,
            watchers: logs,
        });
        assert!(r.expected_deliveries >= 20, "{}", r.summary());
    });
}

#[test]
fn watch_below_compaction_is_canceled() {
    let _g = SERIAL.lock();
    let c = start();
    let nodes = nodes(&c);
    let rt = runtime();
    rt.block_on(async {
        let history_start = etcd_watch::current_revision(&nodes[0], b"wc/k")
            .await
            .expect("range");
        let mut kv = etcd_watch::kv_client(&nodes[0]);
        let mut writes = vec![];
        for v in ["1", "2", "3"] {
            writes.push(must_write(&mut kv, vec![WriteOp::put("wc/k", v)]).await);
        }
        let revs: Vec<Rev> = writes.iter().map(acked_rev).collect();
        let mut raw = KvClient::new(etcd_watch::channel(&nodes[1]));
        raw.compact(CompactionRequest {
            revision: revs[1],
            physical: false,
        })
        .await
        .expect("compact");
        // Below the compaction point: created, then canceled with compact_revision.
        let mut s = Stream::open(&nodes[2]).await;
        s.create(create("wc/k", &[], revs[0]));
        s.until("created, then canceled", Duration::from_secs(20), |rs| {
            rs.iter().any(|r| r.canceled)
        })
        .await;
        assert!(
            s.got[0].created && !s.got[0].canceled,
            "first: {:?}",
            s.got[0]
        );
        let cancel = s.got.iter().find(|r| r.canceled).unwrap();
        assert_eq!(
            (
                cancel.compact_revision,
                cancel.watch_id,
                cancel.events.len()
            ),
            (revs[1], s.got[0].watch_id, 0),
            "canceled with the compaction point: {cancel:?}"
        );
        // At the compaction point: the versions from there on.
        let mut s2 = Stream::open(&nodes[0]).await;
        s2.create(create("wc/k", &[], revs[1]));
        s2.progress_to(revs[2], Duration::from_secs(30)).await;
        let id = s2.got[0].watch_id;
        assert!(s2.got.iter().all(|r| !r.canceled), "{:?}", s2.got);
        let evs = flat_events(&s2.of(id));
        assert_eq!(
            evs,
            vec![
                ("wc/k".into(), revs[1], Some("2".into())),
                ("wc/k".into(), revs[2], Some("3".into()))
            ]
        );
        // The checker: the canceled incarnation, then the resumed one at the compaction point.
        let mut log = WatcherLog {
            name: "compacted".into(),
            key: b"wc/k".to_vec(),
            ..Default::default()
        };
        log.incarnations
            .push(s.incarnation(s.got[0].watch_id, revs[0], &nodes[2]));
        log.incarnations
            .push(s2.incarnation(id, revs[1], &nodes[0]));
        let r = assert_clean(&History {
            history_start,
            writes,
            watchers: vec![log],
        });
        assert_eq!((r.compactions, r.events_checked), (1, 2));
        assert_eq!(r.count(Kind::Compaction), 0);
    });
}

/// etcd's client (clientv3) resumes a watch at `header.revision + 1` of the last response
/// without events, so a progress notification must never carry a revision below an event the
/// stream already sent (the client would get those events again after a reconnect), nor a
/// revision of 0. Two writers put under a prefix of two regions while the stream asks for
/// progress every 20 ms; then PD is killed and progress is asked once more: no answer, or one
/// at or above what was sent; PD restarted, progress reaches every acknowledged revision.
#[test]
fn progress_notifications_never_go_below_events_sent() {
    let _g = SERIAL.lock();
    let mut c = start();
    must_split(&c, &["wq/m"]);
    let nodes = nodes(&c);
    let rt = runtime();
    let (history_start, writes, mut s) = rt.block_on(async {
        let history_start = etcd_watch::current_revision(&nodes[0], b"wq/")
            .await
            .expect("range");
        let mut s = Stream::open(&nodes[0]).await;
        s.create(create("wq/", &prefix_end(b"wq/"), history_start + 1));
        s.until("created", Duration::from_secs(10), |rs| !rs.is_empty())
            .await;
        let mut tasks = vec![];
        for id in 0..2usize {
            let addr = nodes[(id + 1) % nodes.len()].clone();
            tasks.push(tokio::spawn(async move {
                let mut kv = etcd_watch::kv_client(&addr);
                let mut out = vec![];
                for n in 0..150 {
                    let key = format!("wq/{}{:02}", ["a", "z"][n % 2], n % 10);
                    out.push(
                        must_write(&mut kv, vec![WriteOp::put(key, format!("q{id}-{n}"))]).await,
                    );
                }
                out
            }));
        }
        let all_done = async {
            let mut w = vec![];
            for t in tasks {
                w.extend(t.await.unwrap());
            }
            w
        };
        tokio::pin!(all_done);
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let writes = loop {
            tokio::select! {
                w = &mut all_done => break w,
                _ = tick.tick() => s.send(progress_request()),
                m = s.rx.message() => match m {
                    Ok(Some(r)) => s.got.push(r),
                    other => panic!("watch stream: {other:?}"),
                },
            }
        };
        (history_start, writes, s)
    });
    let top = writes.iter().map(acked_rev).max().unwrap();
    rt.block_on(s.progress_to(top, Duration::from_secs(30)));
    let id = s.got[0].watch_id;

    // PD down: a progress request must not be answered at revision 0 (nor below what was
    // sent: the checker below). Whatever arrives within 8 s is kept.
    c.pds[0].proc_.kill();
    s.send(progress_request());
    let during = s.got.len();
    rt.block_on(async {
        while let Ok(m) = tokio::time::timeout(Duration::from_secs(8), s.rx.message()).await {
            s.got.push(m.expect("stream").expect("stream open"));
        }
    });
    let zero: Vec<WatchResponse> = s.got[during..]
        .iter()
        .filter(|r| is_progress(r) && header(r) == 0)
        .cloned()
        .collect();
    c.pds[0].proc_.start();
    c.wait_ready(Duration::from_secs(60));
    rt.block_on(s.progress_to(top, Duration::from_secs(60)));

    let mut log = WatcherLog {
        name: "progress-20ms".into(),
        key: b"wq/".to_vec(),
        range_end: prefix_end(b"wq/"),
        ..Default::default()
    };
    log.incarnations
        .push(s.incarnation(id, history_start + 1, &nodes[0]));
    let r = watch_check::check(&History {
        history_start,
        writes,
        watchers: vec![log],
    });
    eprintln!("{r}");
    let progress = s.got.iter().filter(|r| is_progress(r)).count();
    assert!(progress >= 10, "only {progress} progress notifications");
    assert!(
        zero.is_empty(),
        "with PD down, a progress request was answered at revision 0: {zero:?}"
    );
    assert!(r.is_ok(), "watch violations:\n{r}");
}

/// The store leading the region `key` is in, by index into `c.stores` (PD's view).
fn leader_of(c: &ProcCluster, key: &str) -> Option<usize> {
    let v = c.kvctl_json(&["regions"]);
    let id = v["regions"].as_array()?.iter().find_map(|r| {
        let (s, e) = (r["start_key"].as_str()?, r["end_key"].as_str()?);
        let inside = s <= key && (e.is_empty() || key < e);
        inside.then(|| r["leader"]["store_id"].as_u64()).flatten()
    })?;
    c.store_index_of(id)
}

/// A multi-region etcd txn whose client gives up while one of its regions is slow to prewrite
/// (the `txn::prewrite` failpoint sleeps on the store leading it) leaves prewrite locks in the
/// other regions. They are orphans:
/// once their TTL has run out (3 s) readers and writers resolve them, and a watch over one of
/// those regions must go on past them. Checked: after that, a put in the locked region
/// is delivered to a watch created before the txn, the watch's progress reaches its revision,
/// and a put to the locked key itself succeeds.
#[test]
fn orphaned_txn_locks_do_not_hold_a_watch_back() {
    let _g = SERIAL.lock();
    let c = start();
    let keys: Vec<String> = (0..10).map(|i| format!("wo/k{i}")).collect();
    let split: Vec<&str> = keys.iter().map(String::as_str).collect();
    must_split(&c, &split);
    let nodes = nodes(&c);
    // Three keys in three regions: two led by stores other than `frozen` (the slow one), one
    // led by it.
    let mut setup = None;
    let found = atoll_tests::wait_until(Duration::from_secs(60), || {
        let leaders: Vec<Option<usize>> = keys.iter().map(|k| leader_of(&c, k)).collect();
        for s in 0..c.stores.len() {
            let on: Vec<usize> = (0..keys.len()).filter(|&i| leaders[i] == Some(s)).collect();
            let off: Vec<usize> = (0..keys.len())
                .filter(|&i| leaders[i].is_some_and(|l| l != s))
                .collect();
            if let (Some(&kc), [ka, kb, ..]) = (on.first(), off.as_slice()) {
                let coordinator = (0..c.stores.len()).find(|&x| x != s).unwrap();
                setup = Some((
                    s,
                    keys[*ka].clone(),
                    keys[*kb].clone(),
                    keys[kc].clone(),
                    coordinator,
                ));
                return true;
            }
        }
        false
    });
    assert!(found, "no store leads some of the regions but not all");
    let (frozen, ka, kb, kc, coordinator) = setup.unwrap();
    eprintln!("txn over {ka}, {kb}, {kc}; slow store {frozen}, coordinator {coordinator}");
    let rt = runtime();
    let history_start = rt
        .block_on(etcd_watch::current_revision(&nodes[coordinator], b"wo/"))
        .expect("range");
    let mut s = rt.block_on(Stream::open(&nodes[coordinator]));
    s.create(create(&kb, &prefix_end(kb.as_bytes()), history_start + 1));
    rt.block_on(s.until("created", Duration::from_secs(10), |rs| !rs.is_empty()));

    // The txn, abandoned by its client while the store leading kc's region takes 3 s over
    // each prewrite (the others prewrite at once).
    let status = c.stores[frozen].status_addr.clone();
    atoll_tests::procs::set_failpoint(&status, "txn::prewrite", "sleep(3000)");
    let txn = rt.block_on(async {
        let mut kv = etcd_watch::kv_client(&nodes[coordinator]);
        let ops = vec![
            WriteOp::put(ka.clone(), "orphan"),
            WriteOp::put(kb.clone(), "orphan"),
            WriteOp::put(kc.clone(), "orphan"),
        ];
        etcd_watch::write(&mut kv, &ops, Duration::from_millis(800)).await
    });
    atoll_tests::procs::remove_failpoint(&status, "txn::prewrite");
    assert_eq!(
        txn.outcome,
        WriteOutcome::Unknown,
        "the txn was answered though a region it writes was slow: {txn:?}"
    );
    // The scenario needs the orphan's locks: at least one left in ka's or kb's region.
    let pd = atoll_pd_client::rpc::parse_endpoints(&c.pd_endpoints());
    let cl = rt
        .block_on(atoll_client::Client::connect(
            atoll_client::ClientConfig::new(pd),
        ))
        .expect("client");
    let stores: Vec<(u64, String)> = (0..c.stores.len())
        .map(|i| (c.store_id_of(i).expect("store id"), nodes[i].clone()))
        .collect();
    let locks = |when: &str| {
        let l = rt
            .block_on(etcd_watch::store_locks(&cl, &stores, b"wo/", b"wo0"))
            .expect("scan locks");
        for (st, lock) in &l {
            eprintln!("{when}: {}", etcd_watch::show_lock(*st, lock));
        }
        l
    };
    let left = locks("after the txn was abandoned");
    assert!(
        left.iter()
            .any(|(_, l)| l.key == ka.as_bytes() || l.key == kb.as_bytes()),
        "the abandoned txn left no lock: this run tests nothing (locks: {left:?})"
    );

    // A put in kb's region, after the freeze: the watch delivers it and reaches its revision.
    let after = format!("{kb}x");
    let w = rt.block_on(async {
        let mut kv = etcd_watch::kv_client(&nodes[coordinator]);
        must_write(&mut kv, vec![WriteOp::put(after.clone(), "after")]).await
    });
    let r = acked_rev(&w);
    let reached = rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            s.send(progress_request());
            let step = tokio::time::Instant::now() + Duration::from_millis(500);
            while let Ok(m) = tokio::time::timeout_at(step.min(deadline), s.rx.message()).await {
                s.got.push(m.expect("stream").expect("stream open"));
            }
            if s.got.iter().any(|x| is_progress(x) && header(x) >= r) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
        }
    });
    let delivered = s
        .got
        .iter()
        .flat_map(|x| &x.events)
        .any(|e| e.kv.as_ref().is_some_and(|kv| kv.key == after.as_bytes()));
    // A writer of the locked key itself resolves the orphan's lock.
    let overwrite = rt.block_on(async {
        let mut kv = etcd_watch::kv_client(&nodes[coordinator]);
        etcd_watch::write(
            &mut kv,
            &[WriteOp::put(kb.clone(), "over")],
            Duration::from_secs(20),
        )
        .await
    });
    let still = locks("at the end");
    let overwritten = matches!(overwrite.outcome, WriteOutcome::Acked(_));
    assert!(
        reached && delivered && overwritten,
        "the abandoned txn's locks held things back: the put of {after} at {r} delivered to the \
         watch: {delivered}, its progress reached it: {reached}; a put to {kb} succeeded within \
         20 s: {overwritten}; locks now: {still:?}"
    );
}
