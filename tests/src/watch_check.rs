//! Checking recorded etcd watch streams against the writes that were made: the watch checker
//! of the chaos suite and of `tests/watch.rs`.
//!
//! # Input
//!
//! A [`History`]:
//!
//! - every write made to the watched keys through the etcd API ([`Write`]): acknowledged, with
//!   its revision (`header.revision` of the Put / DeleteRange / Txn response) and exactly what
//!   it did (a delete is listed only if it deleted a key: take it from `prev_kvs` or
//!   `deleted`), or of unknown outcome (an error or a timeout: it may or may not have happened,
//!   at an unknown revision; its ops are what it would have done, and a delete in it may have
//!   found nothing to delete);
//! - `history_start`: a revision at which none of the watched keys existed and after which
//!   every write to them is in `writes` (e.g. the `header.revision` of a Range made before the
//!   writers began, on fresh keys);
//! - per watcher ([`WatcherLog`]): the watched range (etcd's conventions: empty `range_end` =
//!   one key, `"\0"` = every key from `key` on, otherwise `[key, range_end)`), its flags
//!   (`prev_kv`, the NOPUT / NODELETE filters) and its life as a list of [`Incarnation`]s: one
//!   watch each, created with a start revision on some node, with every [`Response`] received
//!   for it in order (events; progress notifications, i.e. responses with no events that are
//!   neither `created` nor `canceled`, whose `header.revision` R promises that every event up
//!   to R has been sent; `created`; `canceled`, with `compact_revision` if the start revision
//!   was compacted). A watcher resumes after a failure with a new incarnation at "last revision
//!   seen + 1" (the last event's revision or the last progress revision, whichever is larger),
//!   possibly on another node; after a compaction cancel at C, at C.
//!
//! # Model
//!
//! Each acknowledged write op is a *fact*: key K has version (value, or deleted) at revision R.
//! An unknown write becomes facts once some watcher delivers one of its puts (values are
//! unique, so the put names the write): it happened, at that revision, and all its puts are
//! facts at that revision. A delete event that no acknowledged write explains becomes a fact
//! if an unknown write could have made it. Facts of one key, in revision order, are the key's
//! *timeline*, from which each version's `create_revision` and `version` follow (a key starts
//! absent at `history_start`).
//!
//! A watcher *covers* the revisions from its first start revision (for start revision 0, the
//! `created` response's `header.revision` + 1) up to the last revision it saw, less the gaps a
//! compaction cancel excuses.
//!
//! # Guarantees checked ([`Kind`])
//!
//! - **Ordered**: event revisions are non-decreasing within a response and strictly increasing
//!   from one response to the next over the watcher's whole life; a progress notification does
//!   not go below a revision already seen.
//! - **Unique**: no (key, mod_revision) is delivered twice to a watcher, across resumes too.
//! - **Atomic**: the events of one revision never come in two responses, and a watcher that got
//!   some of a revision's facts in its range got all of them.
//! - **Reliable**: every fact in the watcher's range (and not filtered out) at a covered
//!   revision was delivered.
//! - **Phantom**: every event is a fact: an acknowledged write's op at its revision, or an
//!   unknown write's op, at one revision for every watcher that sees it.
//! - **Bookmark**: no event at or below a progress notification's revision arrives after it.
//! - **PrevKv**: with `prev_kv`, an event's `prev_kv` is the key's previous version on its
//!   timeline (none for a create); without it, none is sent.
//! - **Create**: a put event's `create_revision` and `version` are the timeline's (a put on an
//!   absent key has `create_revision == mod_revision`, `version == 1`; every later put adds
//!   one); a delete event's kv has only the key and the revision.
//! - **Start**: no event below the incarnation's start revision.
//! - **Filter**: NOPUT / NODELETE hold.
//! - **Compaction**: a compaction cancel names a revision above the start it refused.
//! - **Resume**: the recorder resumed where it should have (a harness check: a wrong resume
//!   would hide or fake other violations).
//! - **Protocol**: `created` comes first, nothing comes after `canceled`, an event response's
//!   `header.revision` is at least its events'.
//!
//! `create_revision`, `version` and `prev_kv` are only checked where the timeline is known to
//! be complete below the event: where no unknown write to the key is left unexplained, or below
//! the revision up to which an unfiltered watcher covering the key from `history_start` saw
//! everything (a write there would have been delivered to it). Others are counted in
//! [`Report::unverifiable`].

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

/// An etcd revision (in Atoll, a PD commit timestamp).
pub type Rev = i64;

/// One effect of a write on one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteOp {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
}

impl WriteOp {
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> WriteOp {
        WriteOp::Put {
            key: key.into(),
            value: value.into(),
        }
    }
    pub fn delete(key: impl Into<Vec<u8>>) -> WriteOp {
        WriteOp::Delete { key: key.into() }
    }
    pub fn key(&self) -> &[u8] {
        match self {
            WriteOp::Put { key, .. } | WriteOp::Delete { key } => key,
        }
    }
    /// The value put, `None` for a delete.
    pub fn value(&self) -> Option<&[u8]> {
        match self {
            WriteOp::Put { value, .. } => Some(value),
            WriteOp::Delete { .. } => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteOutcome {
    /// Answered, at this revision.
    Acked(Rev),
    /// An error or a timeout: it may or may not have happened.
    Unknown,
}

/// One Put, DeleteRange or Txn made through the etcd API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Write {
    pub ops: Vec<WriteOp>,
    pub outcome: WriteOutcome,
}

/// `mvccpb.KeyValue`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: Rev,
    pub mod_revision: Rev,
    pub version: i64,
    pub lease: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// `mvccpb.Event`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub kv: Kv,
    pub prev_kv: Option<Kv>,
}

/// One `WatchResponse`, as received.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub header_revision: Rev,
    pub watch_id: i64,
    pub created: bool,
    pub canceled: bool,
    pub compact_revision: Rev,
    pub cancel_reason: String,
    pub fragment: bool,
    pub events: Vec<Event>,
    /// When the recorder received it (nanoseconds since [`crate::etcd_watch::WatchCtl::base`];
    /// not judged here, the lease checker's).
    #[serde(default)]
    pub received_ns: u64,
}

impl Response {
    /// A progress notification: no events, neither `created` nor `canceled`.
    pub fn is_progress(&self) -> bool {
        self.events.is_empty() && !self.created && !self.canceled
    }

    pub fn from_proto(r: &atoll_proto::etcdserverpb::WatchResponse) -> Response {
        let kv = |k: &atoll_proto::mvccpb::KeyValue| Kv {
            key: k.key.clone(),
            value: k.value.clone(),
            create_revision: k.create_revision,
            mod_revision: k.mod_revision,
            version: k.version,
            lease: k.lease,
        };
        Response {
            header_revision: r.header.as_ref().map_or(0, |h| h.revision),
            watch_id: r.watch_id,
            created: r.created,
            canceled: r.canceled,
            compact_revision: r.compact_revision,
            cancel_reason: r.cancel_reason.clone(),
            fragment: r.fragment,
            received_ns: 0,
            events: r
                .events
                .iter()
                .map(|e| Event {
                    kind: if e.r#type == 1 {
                        EventKind::Delete
                    } else {
                        EventKind::Put
                    },
                    kv: e.kv.as_ref().map(kv).unwrap_or_default(),
                    prev_kv: e.prev_kv.as_ref().map(kv),
                })
                .collect(),
        }
    }
}

/// One watch of a watcher's life: created with `start_revision` on `node`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incarnation {
    pub start_revision: Rev,
    pub node: String,
    pub responses: Vec<Response>,
    /// Why it ended (for reports only).
    pub end: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatcherLog {
    pub name: String,
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    pub prev_kv: bool,
    /// The NOPUT filter.
    pub no_put: bool,
    /// The NODELETE filter.
    pub no_delete: bool,
    pub incarnations: Vec<Incarnation>,
}

impl WatcherLog {
    /// Whether the watched range holds `k` (etcd's range conventions).
    pub fn contains(&self, k: &[u8]) -> bool {
        range_contains(&self.key, &self.range_end, k)
    }
    fn wants(&self, kind: EventKind) -> bool {
        match kind {
            EventKind::Put => !self.no_put,
            EventKind::Delete => !self.no_delete,
        }
    }
}

/// etcd's range: `range_end` empty = the key alone, `"\0"` = every key from `key` on.
pub fn range_contains(key: &[u8], range_end: &[u8], k: &[u8]) -> bool {
    if range_end.is_empty() {
        k == key
    } else if range_end == [0] {
        k >= key
    } else {
        k >= key && k < range_end
    }
}

/// The `range_end` that makes `[prefix, range_end)` every key starting with `prefix`
/// (etcd's `GetPrefixRangeEnd`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(&last) = end.last() {
        if last < 0xff {
            *end.last_mut().unwrap() += 1;
            return end;
        }
        end.pop();
    }
    vec![0]
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct History {
    pub history_start: Rev,
    pub writes: Vec<Write>,
    pub watchers: Vec<WatcherLog>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Ordered,
    Unique,
    Atomic,
    Reliable,
    Phantom,
    Bookmark,
    PrevKv,
    Create,
    Start,
    Filter,
    Compaction,
    Resume,
    Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    pub kind: Kind,
    /// The watcher it was seen on (empty if none in particular).
    pub watcher: String,
    pub description: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} [{}]: {}",
            self.kind, self.watcher, self.description
        )
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub violations: Vec<Violation>,
    /// Events delivered and checked, over every watcher.
    pub events_checked: usize,
    /// Facts some watcher had to deliver (summed over watchers).
    pub expected_deliveries: usize,
    pub responses: usize,
    pub progress_notifications: usize,
    /// New incarnations after the first, over every watcher.
    pub resumes: usize,
    /// Cancels with a `compact_revision`.
    pub compactions: usize,
    pub writes_acked: usize,
    pub writes_unknown: usize,
    /// Unknown writes some watcher showed to have happened.
    pub unknown_resolved: usize,
    /// `create_revision` / `version` / `prev_kv` checks skipped: the timeline below the event
    /// may miss an unknown write.
    pub unverifiable: usize,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }
    pub fn count(&self, kind: Kind) -> usize {
        self.violations.iter().filter(|v| v.kind == kind).count()
    }
    pub fn kinds(&self) -> BTreeMap<Kind, usize> {
        let mut m = BTreeMap::new();
        for v in &self.violations {
            *m.entry(v.kind).or_default() += 1;
        }
        m
    }
    /// One line of counts.
    pub fn summary(&self) -> String {
        format!(
            "{} events checked ({} expected deliveries), {} responses, {} progress notifications, \
             {} resumes, {} compaction cancels, writes {} acknowledged / {} unknown ({} of them \
             seen), {} unverifiable metadata checks, {} violations {:?}",
            self.events_checked,
            self.expected_deliveries,
            self.responses,
            self.progress_notifications,
            self.resumes,
            self.compactions,
            self.writes_acked,
            self.writes_unknown,
            self.unknown_resolved,
            self.unverifiable,
            self.violations.len(),
            self.kinds()
        )
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "watch check: {}", self.summary())?;
        for v in self.violations.iter().take(30) {
            writeln!(f, "  {v}")?;
        }
        if self.violations.len() > 30 {
            writeln!(f, "  ... and {} more", self.violations.len() - 30)?;
        }
        Ok(())
    }
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show_val(v: &Option<Vec<u8>>) -> String {
    match v {
        Some(v) => format!("put {:?}", show(v)),
        None => "delete".into(),
    }
}

fn show_kv(kv: &Option<Kv>) -> String {
    match kv {
        None => "none".into(),
        Some(kv) => format!(
            "{}={:?} (create {}, mod {}, version {})",
            show(&kv.key),
            show(&kv.value),
            kv.create_revision,
            kv.mod_revision,
            kv.version
        ),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Acked(usize),
    Unknown(usize),
    /// A delete event only an unknown write (not named by any of its puts) can explain.
    UnknownDelete,
}

#[derive(Clone, Debug)]
struct Fact {
    /// `None`: a delete.
    value: Option<Vec<u8>>,
    source: Source,
}

type KeyRev = (Vec<u8>, Rev);

/// `(create_revision, version)` of a version on a key's timeline.
type Meta = (Rev, i64);

/// A watcher's responses with fragments merged, and where each incarnation's effective start
/// and covered intervals are.
struct Walk {
    /// Per incarnation: the merged responses.
    responses: Vec<Vec<Response>>,
    /// Per incarnation: its effective start (None: a "now" watch that was never created).
    starts: Vec<Option<Rev>>,
    /// Covered revisions, as disjoint inclusive intervals in order.
    covered: Vec<(Rev, Rev)>,
    /// Harness errors found on the way.
    resume_issues: Vec<String>,
}

fn merge_fragments(rs: &[Response]) -> Vec<Response> {
    let mut out: Vec<Response> = vec![];
    let mut pending: Option<Response> = None;
    for r in rs {
        let mut r = r.clone();
        if let Some(mut p) = pending.take() {
            p.events.append(&mut r.events);
            p.header_revision = p.header_revision.max(r.header_revision);
            p.fragment = r.fragment;
            r = p;
        }
        if r.fragment {
            pending = Some(r);
        } else {
            out.push(r);
        }
    }
    if let Some(mut p) = pending {
        p.fragment = false;
        out.push(p);
    }
    out
}

fn walk(w: &WatcherLog) -> Walk {
    let mut responses = vec![];
    let mut starts = vec![];
    let mut covered: Vec<(Rev, Rev)> = vec![];
    let mut resume_issues = vec![];
    // The next revision the watcher expects; the start of the open covered interval.
    let mut next: Option<Rev> = None;
    let mut open: Option<Rev> = None;
    let mut compacted_at: Option<Rev> = None;
    for (i, inc) in w.incarnations.iter().enumerate() {
        let rs = merge_fragments(&inc.responses);
        let start = if inc.start_revision == 0 {
            rs.iter().find(|r| r.created).map(|r| r.header_revision + 1)
        } else {
            Some(inc.start_revision)
        };
        if let Some(s) = start {
            match next {
                None => {
                    open = Some(s);
                    next = Some(s);
                }
                Some(n) if s == n => {}
                Some(n) => {
                    let excused = compacted_at.is_some_and(|c| s == c.max(n));
                    if !excused {
                        resume_issues.push(format!(
                            "incarnation {i} on {} starts at {s}{} but the last revision seen \
                             was {}: it should start at {n}",
                            inc.node,
                            if inc.start_revision == 0 {
                                " (a \"now\" watch)"
                            } else {
                                ""
                            },
                            n - 1
                        ));
                    }
                    if s > n {
                        // Revisions n..s-1 are not watched: close the covered interval.
                        if let Some(o) = open {
                            if n > o {
                                covered.push((o, n - 1));
                            }
                        }
                        open = Some(s);
                        next = Some(s);
                    }
                }
            }
        }
        compacted_at = None;
        for r in &rs {
            if r.canceled && r.compact_revision != 0 {
                compacted_at = Some(r.compact_revision);
            }
            if let Some(n) = next.as_mut() {
                if let Some(last) = r.events.last() {
                    *n = (*n).max(last.kv.mod_revision + 1);
                } else if r.is_progress() {
                    *n = (*n).max(r.header_revision + 1);
                }
            }
        }
        responses.push(rs);
        starts.push(start);
    }
    if let (Some(o), Some(n)) = (open, next) {
        if n > o {
            covered.push((o, n - 1));
        }
    }
    Walk {
        responses,
        starts,
        covered,
        resume_issues,
    }
}

fn is_covered(covered: &[(Rev, Rev)], r: Rev) -> bool {
    covered.iter().any(|&(lo, hi)| lo <= r && r <= hi)
}

/// Checks `h` (see the module documentation).
pub fn check(h: &History) -> Report {
    let mut rep = Report::default();
    let viol = |kind: Kind, watcher: &str, description: String| Violation {
        kind,
        watcher: watcher.to_string(),
        description,
    };
    let mut violations = vec![];

    // 1. Facts of acknowledged writes.
    let mut facts: HashMap<KeyRev, Fact> = HashMap::new();
    let mut acked_put: HashMap<(Vec<u8>, Vec<u8>), Rev> = HashMap::new();
    let mut unk_put: HashMap<(Vec<u8>, Vec<u8>), Vec<usize>> = HashMap::new();
    let mut unk_del: HashMap<Vec<u8>, Vec<usize>> = HashMap::new();
    for (i, w) in h.writes.iter().enumerate() {
        match w.outcome {
            WriteOutcome::Acked(rev) => {
                rep.writes_acked += 1;
                for op in &w.ops {
                    let k = (op.key().to_vec(), rev);
                    if let Some(f) = facts.get(&k) {
                        violations.push(viol(
                            Kind::Reliable,
                            "",
                            format!(
                                "two acknowledged writes of {} at revision {rev} ({} and {}): \
                                 one of them is lost",
                                show(op.key()),
                                show_val(&f.value),
                                show_val(&op.value().map(<[u8]>::to_vec))
                            ),
                        ));
                        continue;
                    }
                    facts.insert(
                        k,
                        Fact {
                            value: op.value().map(<[u8]>::to_vec),
                            source: Source::Acked(i),
                        },
                    );
                    if let Some(v) = op.value() {
                        acked_put.insert((op.key().to_vec(), v.to_vec()), rev);
                    }
                }
            }
            WriteOutcome::Unknown => {
                rep.writes_unknown += 1;
                for op in &w.ops {
                    match op.value() {
                        Some(v) => unk_put
                            .entry((op.key().to_vec(), v.to_vec()))
                            .or_default()
                            .push(i),
                        None => unk_del.entry(op.key().to_vec()).or_default().push(i),
                    }
                }
            }
        }
    }

    let walks: Vec<Walk> = h.watchers.iter().map(walk).collect();

    // 2. Unknown writes that watchers saw happen: first by their (unique) put values, then
    // delete events no acknowledged write explains.
    let mut resolved: HashMap<usize, Rev> = HashMap::new();
    for wk in &walks {
        for e in wk.responses.iter().flatten().flat_map(|r| &r.events) {
            if e.kind != EventKind::Put {
                continue;
            }
            let rev = e.kv.mod_revision;
            if facts.contains_key(&(e.kv.key.clone(), rev)) {
                continue;
            }
            let Some(cands) = unk_put.get(&(e.kv.key.clone(), e.kv.value.clone())) else {
                continue;
            };
            if cands.iter().any(|u| resolved.get(u) == Some(&rev)) {
                continue;
            }
            let Some(&u) = cands.iter().find(|u| !resolved.contains_key(u)) else {
                continue;
            };
            resolved.insert(u, rev);
            for op in &h.writes[u].ops {
                if let Some(v) = op.value() {
                    facts
                        .entry((op.key().to_vec(), rev))
                        .or_insert_with(|| Fact {
                            value: Some(v.to_vec()),
                            source: Source::Unknown(u),
                        });
                }
            }
        }
    }
    for wk in &walks {
        for e in wk.responses.iter().flatten().flat_map(|r| &r.events) {
            if e.kind != EventKind::Delete {
                continue;
            }
            let k = (e.kv.key.clone(), e.kv.mod_revision);
            if facts.contains_key(&k) {
                continue;
            }
            let Some(cands) = unk_del.get(&e.kv.key) else {
                continue;
            };
            let rev = e.kv.mod_revision;
            let source = if let Some(&u) = cands.iter().find(|u| resolved.get(u) == Some(&rev)) {
                Source::Unknown(u)
            } else if let Some(&u) = cands.iter().find(|&&u| {
                !resolved.contains_key(&u) && h.writes[u].ops.iter().all(|o| o.value().is_none())
            }) {
                // A pure delete: it happened here.
                resolved.insert(u, rev);
                Source::Unknown(u)
            } else if cands.iter().any(|u| !resolved.contains_key(u)) {
                Source::UnknownDelete
            } else {
                continue;
            };
            facts.insert(
                k,
                Fact {
                    value: None,
                    source,
                },
            );
        }
    }
    rep.unknown_resolved = resolved.len();

    // 3. Timelines and their metadata.
    let mut timeline: HashMap<Vec<u8>, BTreeMap<Rev, Option<Vec<u8>>>> = HashMap::new();
    for ((k, r), f) in &facts {
        timeline
            .entry(k.clone())
            .or_default()
            .insert(*r, f.value.clone());
    }
    let mut meta: HashMap<Vec<u8>, BTreeMap<Rev, Meta>> = HashMap::new();
    for (k, tl) in &timeline {
        let m = meta.entry(k.clone()).or_default();
        let mut cur: Option<Meta> = None;
        for (&r, v) in tl {
            // A put creates the key (absent before) or adds a version; a delete ends it.
            cur = v.as_ref().map(|_| cur.map_or((r, 1), |(c, n)| (c, n + 1)));
            if let Some(c) = cur {
                m.insert(r, c);
            }
        }
    }
    // Where each key's timeline may miss an unknown write: unresolved ones anywhere, resolved
    // ones whose delete of the key nobody saw at their revision.
    let mut uncertain: HashMap<Vec<u8>, Vec<Option<Rev>>> = HashMap::new();
    for (u, w) in h.writes.iter().enumerate() {
        if w.outcome != WriteOutcome::Unknown {
            continue;
        }
        for op in &w.ops {
            let at = match resolved.get(&u) {
                None => None,
                Some(&r) => {
                    if facts.contains_key(&(op.key().to_vec(), r)) {
                        continue;
                    }
                    Some(r)
                }
            };
            uncertain.entry(op.key().to_vec()).or_default().push(at);
        }
    }
    // Per key: up to which revision an unfiltered watcher that covered it from history_start
    // on saw everything.
    let complete_until = |k: &[u8]| -> Option<Rev> {
        h.watchers
            .iter()
            .zip(&walks)
            .filter(|(w, _)| !w.no_put && !w.no_delete && w.contains(k))
            .filter_map(|(_, wk)| {
                let &(lo, hi) = wk.covered.first()?;
                (lo <= h.history_start + 1).then_some(hi)
            })
            .max()
    };
    let mut complete_cache: HashMap<Vec<u8>, Option<Rev>> = HashMap::new();
    let mut verifiable = |k: &[u8], r: Rev| -> bool {
        let Some(unc) = uncertain.get(k) else {
            return true;
        };
        let cu = *complete_cache
            .entry(k.to_vec())
            .or_insert_with(|| complete_until(k));
        let below_complete = |x: Rev| cu.is_some_and(|c| x <= c);
        unc.iter().all(|at| match at {
            None => below_complete(r - 1),
            Some(a) => *a >= r || below_complete(*a),
        })
    };

    // 4. Each watcher.
    for (w, wk) in h.watchers.iter().zip(&walks) {
        let name = w.name.as_str();
        for issue in &wk.resume_issues {
            violations.push(viol(Kind::Resume, name, issue.clone()));
        }
        rep.resumes += w.incarnations.len().saturating_sub(1);
        let mut delivered: HashMap<KeyRev, (usize, usize)> = HashMap::new();
        let mut delivered_revs: HashSet<Rev> = HashSet::new();
        let mut last_event: Option<Rev> = None;
        let mut last_progress: Option<Rev> = None;
        let mut last_seen: Option<Rev> = None;
        for (i, (rs, start)) in wk.responses.iter().zip(&wk.starts).enumerate() {
            let node = &w.incarnations[i].node;
            if last_seen.is_none() {
                last_seen = start.map(|s| s - 1);
            }
            let mut canceled = false;
            for (j, r) in rs.iter().enumerate() {
                rep.responses += 1;
                let at = format!("incarnation {i} on {node}, response {j}");
                if canceled {
                    violations.push(viol(
                        Kind::Protocol,
                        name,
                        format!("{at}: a response after the watch was canceled: {r:?}"),
                    ));
                }
                if r.created && j != 0 {
                    violations.push(viol(
                        Kind::Protocol,
                        name,
                        format!("{at}: `created` is not the first response"),
                    ));
                }
                if j == 0 && !r.created {
                    violations.push(viol(
                        Kind::Protocol,
                        name,
                        format!("{at}: the first response is not `created`: {r:?}"),
                    ));
                }
                if r.canceled {
                    canceled = true;
                    if r.compact_revision != 0 {
                        rep.compactions += 1;
                        if let Some(s) = start {
                            if r.compact_revision <= *s {
                                violations.push(viol(
                                    Kind::Compaction,
                                    name,
                                    format!(
                                        "{at}: canceled with compact_revision {} though it \
                                         started at {s}: that start was not compacted",
                                        r.compact_revision
                                    ),
                                ));
                            }
                        }
                    }
                }
                if r.is_progress() {
                    rep.progress_notifications += 1;
                    let p = r.header_revision;
                    if let Some(ls) = last_seen {
                        if p < ls {
                            violations.push(viol(
                                Kind::Ordered,
                                name,
                                format!(
                                    "{at}: progress notification at {p}{}, below revision {ls} \
                                     already seen (a client resuming from it gets duplicates)",
                                    if p == 0 { " (no revision)" } else { "" }
                                ),
                            ));
                        }
                    }
                    last_progress = Some(last_progress.map_or(p, |x| x.max(p)));
                    last_seen = Some(last_seen.map_or(p, |x| x.max(p)));
                    continue;
                }
                if r.events.is_empty() {
                    continue;
                }
                let max_rev = r.events.iter().map(|e| e.kv.mod_revision).max().unwrap();
                if r.header_revision < max_rev {
                    violations.push(viol(
                        Kind::Protocol,
                        name,
                        format!(
                            "{at}: header.revision {} below its events' revision {max_rev}",
                            r.header_revision
                        ),
                    ));
                }
                let mut prev_in_resp: Option<Rev> = None;
                let mut revs_here: BTreeSet<Rev> = BTreeSet::new();
                for e in &r.events {
                    rep.events_checked += 1;
                    let rev = e.kv.mod_revision;
                    let key = &e.kv.key;
                    let what = format!("{at}: {:?} {}@{rev}", e.kind, show(key));
                    if let Some(p) = prev_in_resp {
                        if rev < p {
                            violations.push(viol(
                                Kind::Ordered,
                                name,
                                format!("{what} after an event at {p} in the same response"),
                            ));
                        }
                    }
                    prev_in_resp = Some(rev);
                    let dup = delivered.contains_key(&(key.clone(), rev));
                    if !revs_here.contains(&rev) && !dup {
                        if let Some(le) = last_event {
                            if rev < le {
                                violations.push(viol(
                                    Kind::Ordered,
                                    name,
                                    format!("{what} after an earlier response's event at {le}"),
                                ));
                            } else if rev == le && delivered_revs.contains(&rev) {
                                violations.push(viol(
                                    Kind::Atomic,
                                    name,
                                    format!(
                                        "{what}: revision {rev} split over two responses \
                                         (an earlier one had events at it)"
                                    ),
                                ));
                            }
                        }
                    }
                    revs_here.insert(rev);
                    if let Some(lp) = last_progress {
                        if rev <= lp {
                            violations.push(viol(
                                Kind::Bookmark,
                                name,
                                format!("{what} delivered after a progress notification at {lp}"),
                            ));
                        }
                    }
                    if let Some(s) = start {
                        if rev < *s {
                            violations.push(viol(
                                Kind::Start,
                                name,
                                format!("{what} is below the watch's start revision {s}"),
                            ));
                        }
                    }
                    if !w.contains(key) {
                        violations.push(viol(
                            Kind::Phantom,
                            name,
                            format!("{what}: the key is outside the watched range"),
                        ));
                    }
                    if !w.wants(e.kind) {
                        violations.push(viol(
                            Kind::Filter,
                            name,
                            format!("{what}: the watch filters these events out"),
                        ));
                    }
                    if let Some((pi, pj)) = delivered.insert((key.clone(), rev), (i, j)) {
                        violations.push(viol(
                            Kind::Unique,
                            name,
                            format!(
                                "{what} delivered twice (first in incarnation {pi}, response {pj})"
                            ),
                        ));
                    }
                    // The event against the facts.
                    let value = match e.kind {
                        EventKind::Put => Some(e.kv.value.clone()),
                        EventKind::Delete => None,
                    };
                    match facts.get(&(key.clone(), rev)) {
                        Some(f) if f.value == value => {}
                        Some(f) => violations.push(viol(
                            Kind::Phantom,
                            name,
                            format!(
                                "{what} ({}) but the write at {rev} did {}",
                                show_val(&value),
                                show_val(&f.value)
                            ),
                        )),
                        None => {
                            let why = match &value {
                                Some(v) => {
                                    let kv = (key.clone(), v.clone());
                                    if let Some(ar) = acked_put.get(&kv) {
                                        format!("the put of this value was acknowledged at {ar}")
                                    } else if let Some(us) = unk_put.get(&kv) {
                                        let at: Vec<Rev> = us
                                            .iter()
                                            .filter_map(|u| resolved.get(u).copied())
                                            .collect();
                                        format!(
                                            "the unknown-outcome write of this value was seen \
                                             at {at:?} elsewhere"
                                        )
                                    } else {
                                        "no write put this value".into()
                                    }
                                }
                                None => "no write deleted this key at this revision".into(),
                            };
                            violations.push(viol(
                                Kind::Phantom,
                                name,
                                format!("{what} ({}): {why}", show_val(&value)),
                            ));
                        }
                    }
                    // Metadata.
                    let prev_meta = || {
                        let tl = timeline.get(key)?;
                        let (&pr, pv) = tl.range(..rev).next_back()?;
                        let pv = pv.as_ref()?;
                        let (c, n) = meta[key][&pr];
                        Some(Kv {
                            key: key.clone(),
                            value: pv.clone(),
                            create_revision: c,
                            mod_revision: pr,
                            version: n,
                            lease: 0,
                        })
                    };
                    let known = facts.contains_key(&(key.clone(), rev));
                    let check_meta = known && verifiable(key, rev);
                    match e.kind {
                        EventKind::Put if check_meta => {
                            let (c, n) = meta[key][&rev];
                            if e.kv.create_revision != c || e.kv.version != n {
                                violations.push(viol(
                                    Kind::Create,
                                    name,
                                    format!(
                                        "{what}: create_revision {} version {}, expected {c} and \
                                         {n} (previous version: {})",
                                        e.kv.create_revision,
                                        e.kv.version,
                                        show_kv(&prev_meta())
                                    ),
                                ));
                            }
                        }
                        EventKind::Put => {
                            if known {
                                rep.unverifiable += 1;
                            }
                        }
                        EventKind::Delete => {
                            if e.kv.create_revision != 0
                                || e.kv.version != 0
                                || !e.kv.value.is_empty()
                            {
                                violations.push(viol(
                                    Kind::Create,
                                    name,
                                    format!(
                                        "{what}: a delete event's kv carries create_revision {}, \
                                         version {}, value {:?} (etcd: none)",
                                        e.kv.create_revision,
                                        e.kv.version,
                                        show(&e.kv.value)
                                    ),
                                ));
                            }
                        }
                    }
                    if !w.prev_kv {
                        if e.prev_kv.is_some() {
                            violations.push(viol(
                                Kind::PrevKv,
                                name,
                                format!("{what}: prev_kv sent though the watch did not ask"),
                            ));
                        }
                    } else if check_meta {
                        let exp = prev_meta();
                        if e.prev_kv != exp {
                            violations.push(viol(
                                Kind::PrevKv,
                                name,
                                format!(
                                    "{what}: prev_kv {}, expected {}",
                                    show_kv(&e.prev_kv),
                                    show_kv(&exp)
                                ),
                            ));
                        }
                    } else if known {
                        rep.unverifiable += 1;
                    }
                }
                for &rv in &revs_here {
                    delivered_revs.insert(rv);
                }
                let last = r.events.last().unwrap().kv.mod_revision;
                last_event = Some(last_event.map_or(last, |x| x.max(last)));
                last_seen = Some(last_seen.map_or(last, |x| x.max(last)));
            }
        }

        // Reliable and atomic: every fact in range at a covered revision was delivered.
        let mut missing: BTreeMap<Rev, Vec<(&Vec<u8>, &Fact)>> = BTreeMap::new();
        for ((k, r), f) in &facts {
            let kind = if f.value.is_some() {
                EventKind::Put
            } else {
                EventKind::Delete
            };
            if !w.contains(k) || !w.wants(kind) || !is_covered(&wk.covered, *r) {
                continue;
            }
            rep.expected_deliveries += 1;
            if !delivered.contains_key(&(k.clone(), *r)) {
                missing.entry(*r).or_default().push((k, f));
            }
        }
        for (r, mut ms) in missing {
            ms.sort_by(|a, b| a.0.cmp(b.0));
            let list: Vec<String> = ms
                .iter()
                .map(|(k, f)| {
                    let src = match f.source {
                        Source::Acked(_) => "acknowledged",
                        Source::Unknown(_) => "unknown outcome, seen by another watcher",
                        Source::UnknownDelete => "unknown delete, seen by another watcher",
                    };
                    format!("{} {} ({src})", show(k), show_val(&f.value))
                })
                .collect();
            let seen = last_seen.map_or("nothing".to_string(), |s| s.to_string());
            let bookmark = last_progress.filter(|p| *p >= r);
            let suffix = match bookmark {
                Some(p) => format!("; a progress notification at {p} vouched for it"),
                None => String::new(),
            };
            if delivered_revs.contains(&r) {
                violations.push(viol(
                    Kind::Atomic,
                    name,
                    format!(
                        "revision {r} delivered in part: missing {}{suffix}",
                        list.join(", ")
                    ),
                ));
            } else {
                violations.push(viol(
                    Kind::Reliable,
                    name,
                    format!(
                        "never delivered at {r}: {} (watcher saw up to {seen}){suffix}",
                        list.join(", ")
                    ),
                ));
            }
        }
    }
    rep.violations = violations;
    rep
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: Rev = 100;

    fn put(k: &str, v: &str, rev: Rev, create: Rev, version: i64) -> Event {
        Event {
            kind: EventKind::Put,
            kv: Kv {
                key: k.into(),
                value: v.into(),
                create_revision: create,
                mod_revision: rev,
                version,
                lease: 0,
            },
            prev_kv: None,
        }
    }

    fn del(k: &str, rev: Rev) -> Event {
        Event {
            kind: EventKind::Delete,
            kv: Kv {
                key: k.into(),
                mod_revision: rev,
                ..Default::default()
            },
            prev_kv: None,
        }
    }

    fn with_prev(mut e: Event, prev: Option<Event>) -> Event {
        e.prev_kv = prev.map(|p| p.kv);
        e
    }

    fn created(rev: Rev) -> Response {
        Response {
            header_revision: rev,
            created: true,
            ..Default::default()
        }
    }

    fn events(evs: Vec<Event>) -> Response {
        Response {
            header_revision: evs.iter().map(|e| e.kv.mod_revision).max().unwrap_or(0),
            events: evs,
            ..Default::default()
        }
    }

    fn progress(rev: Rev) -> Response {
        Response {
            header_revision: rev,
            ..Default::default()
        }
    }

    fn acked(rev: Rev, ops: Vec<WriteOp>) -> Write {
        Write {
            ops,
            outcome: WriteOutcome::Acked(rev),
        }
    }

    fn unknown(ops: Vec<WriteOp>) -> Write {
        Write {
            ops,
            outcome: WriteOutcome::Unknown,
        }
    }

    fn inc(start: Rev, responses: Vec<Response>) -> Incarnation {
        Incarnation {
            start_revision: start,
            node: "n1".into(),
            responses,
            end: String::new(),
        }
    }

    fn watcher(name: &str, prefix: &str, incs: Vec<Incarnation>) -> WatcherLog {
        WatcherLog {
            name: name.into(),
            key: prefix.into(),
            range_end: prefix_end(prefix.as_bytes()),
            incarnations: incs,
            ..Default::default()
        }
    }

    /// Three writes: a=1 at 110, a txn {a=2, b=1} at 120, delete a at 130.
    fn writes() -> Vec<Write> {
        vec![
            acked(110, vec![WriteOp::put("p/a", "a1")]),
            acked(
                120,
                vec![WriteOp::put("p/a", "a2"), WriteOp::put("p/b", "b1")],
            ),
            acked(130, vec![WriteOp::delete("p/a")]),
        ]
    }

    fn good_events() -> Vec<Response> {
        vec![
            created(START),
            events(vec![put("p/a", "a1", 110, 110, 1)]),
            events(vec![
                put("p/a", "a2", 120, 110, 2),
                put("p/b", "b1", 120, 120, 1),
            ]),
            events(vec![del("p/a", 130)]),
            progress(140),
        ]
    }

    fn hist(watchers: Vec<WatcherLog>) -> History {
        History {
            history_start: START,
            writes: writes(),
            watchers,
        }
    }

    fn only(r: &Report, kind: Kind) {
        assert!(r.count(kind) > 0, "expected a {kind:?} violation:\n{r}");
        let others: Vec<&Violation> = r.violations.iter().filter(|v| v.kind != kind).collect();
        assert!(
            others.is_empty(),
            "unexpected violations besides {kind:?}:\n{r}"
        );
    }

    #[test]
    fn a_correct_history_passes() {
        let h = hist(vec![watcher(
            "w",
            "p/",
            vec![inc(START + 1, good_events())],
        )]);
        let r = check(&h);
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.events_checked, 4);
        assert_eq!(r.expected_deliveries, 4);
        assert_eq!(r.progress_notifications, 1);
    }

    #[test]
    fn resumes_on_another_node_pass() {
        let mut second = inc(
            121,
            vec![created(125), events(vec![del("p/a", 130)]), progress(140)],
        );
        second.node = "n2".into();
        let h = hist(vec![watcher(
            "w",
            "p/",
            vec![inc(START + 1, good_events()[..3].to_vec()), second],
        )]);
        let r = check(&h);
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.resumes, 1);
        assert_eq!(r.events_checked, 4);
    }

    #[test]
    fn resume_after_a_progress_notification_passes() {
        let h = hist(vec![watcher(
            "w",
            "p/",
            vec![
                inc(
                    START + 1,
                    vec![
                        created(START),
                        events(vec![put("p/a", "a1", 110, 110, 1)]),
                        progress(115),
                    ],
                ),
                inc(
                    116,
                    vec![
                        created(116),
                        events(good_events()[2].events.clone()),
                        events(vec![del("p/a", 130)]),
                    ],
                ),
            ],
        )]);
        let r = check(&h);
        assert!(r.is_ok(), "{r}");
    }

    #[test]
    fn a_now_watch_starts_after_its_created_revision() {
        // Created at 115: the put at 110 is not expected, the rest are.
        let h = hist(vec![watcher(
            "w",
            "p/",
            vec![inc(
                0,
                vec![
                    created(115),
                    good_events()[2].clone(),
                    good_events()[3].clone(),
                ],
            )],
        )]);
        let r = check(&h);
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.expected_deliveries, 3);
        // An event before the created revision is below its start.
        let h = hist(vec![watcher(
            "w",
            "p/",
            vec![inc(0, vec![created(115), good_events()[1].clone()])],
        )]);
        only(&check(&h), Kind::Start);
    }

    #[test]
    fn reports_order() {
        // The txn's response before the first put's.
        let mut rs = good_events();
        rs.swap(1, 2);
        let r = check(&hist(vec![watcher("w", "p/", vec![inc(START + 1, rs)])]));
        // (The swapped put also carries version metadata computed from the true order: fine.)
        assert!(r.count(Kind::Ordered) > 0, "{r}");
        // Within one response.
        let rs = vec![
            created(START),
            events(vec![
                put("p/a", "a2", 120, 110, 2),
                put("p/b", "b1", 120, 120, 1),
                put("p/a", "a1", 110, 110, 1),
            ]),
            events(vec![del("p/a", 130)]),
        ];
        let r = check(&hist(vec![watcher("w", "p/", vec![inc(START + 1, rs)])]));
        only(&r, Kind::Ordered);
        // A progress notification below a revision already seen.
        let mut rs = good_events();
        rs.insert(3, progress(115));
        let r = check(&hist(vec![watcher("w", "p/", vec![inc(START + 1, rs)])]));
        only(&r, Kind::Ordered);
    }

    #[test]
    fn reports_duplicates() {
        let mut rs = good_events();
        rs.insert(2, events(vec![put("p/a", "a1", 110, 110, 1)]));
        let r = check(&hist(vec![watcher("w", "p/", vec![inc(START + 1, rs)])]));
        assert!(r.count(Kind::Unique) > 0, "{r}");
        // Across a resume: the second incarnation replays the put at 110 though it starts at 121.
        let h = hist(vec![watcher(
            "w",
            "p/",
            vec![
                inc(START + 1, good_events()[..3].to_vec()),
                inc(
                    121,
                    vec![
                        created(125),
                        events(vec![
                            put("p/a", "a2", 120, 110, 2),
                            put("p/b", "b1", 120, 120, 1),
                        ]),
                        events(vec![del("p/a", 130)]),
                    ],
                ),
            ],
        )]);
        let r = check(&h);
        assert!(r.count(Kind::Unique) >= 2, "{r}");
    }

    #[test]
    fn reports_a_revision_split_over_responses() {
        let rs = vec![
            created(START),
            events(vec![put("p/a", "a1", 110, 110, 1)]),
            events(vec![put("p/a", "a2", 120, 110, 2)]),
            events(vec![put("p/b", "b1", 120, 120, 1)]),
            events(vec![del("p/a", 130)]),
        ];
        let r = check(&hist(vec![watcher("w", "p/", vec![inc(START + 1, rs)])]));
        only(&r, Kind::Atomic);
    }

    #[test]
    fn reports_a_txn_delivered_in_part() {
        let rs = vec![
            created(START),
            events(vec![put("p/a", "a1", 110, 110, 1)]),
            events(vec![put("p/a", "a2", 120, 110, 2)]),
            events(vec![del("p/a", 130)]),
        ];
        let r = check(&hist(vec![watcher("w", "p/", vec![inc(START + 1, rs)])]));
        only(&r, Kind::Atomic);
        // A watcher of p/a alone only expects its own half.
        let mut w = watcher(
            "w",
            "p/a",
            vec![inc(
                START + 1,
                vec![
                    created(START),
                    events(vec![put("p/a", "a1", 110, 110, 1)]),
                    events(vec![put("p/a", "a2", 120, 110, 2)]),
                    events(vec![del("p/a", 130)]),
                ],
            )],
        );
        w.range_end = vec![];
        let r = check(&hist(vec![w]));
        assert!(r.is_ok(), "{r}");
    }

    #[test]
    fn reports_a_lost_event() {
        let mut rs = good_events();
        rs.remove(3); // the delete at 130; the progress at 140 still comes
        let r = check(&hist(vec![watcher("w", "p/", vec![inc(START + 1, rs)])]));
        only(&r, Kind::Reliable);
        // Without the progress notification the delete is beyond what the watcher saw: no
        // violation (it may still be on its way).
        let r = check(&hist(vec![watcher(
            "w",
            "p/",
            vec![inc(START + 1, good_events()[..3].to_vec())],
        )]));
        assert!(r.is_ok(), "{r}");
        // A resume that skips revisions misses them too, and the harness is told.
        let h = hist(vec![watcher(
            "w",
            "p/",
            vec![
                inc(START + 1, good_events()[..2].to_vec()),
                inc(
                    125,
                    vec![created(125), events(vec![del("p/a", 130)]), progress(140)],
                ),
            ],
        )]);
        let r = check(&h);
        assert!(r.count(Kind::Resume) == 1, "{r}");
    }

    #[test]
    fn reports_phantoms() {
        // A value nobody wrote.
        let mut rs = good_events();
        rs.insert(4, events(vec![put("p/c", "zz", 135, 135, 1)]));
        let r = check(&hist(vec![watcher("w", "p/", vec![inc(START + 1, rs)])]));
        only(&r, Kind::Phantom);
        // A value at the wrong revision.
        let mut rs = good_events();
        rs[1] = events(vec![put("p/a", "a1", 111, 111, 1)]);
        let r = check(&hist(vec![watcher("w", "p/", vec![inc(START + 1, rs)])]));
        assert!(r.count(Kind::Phantom) > 0, "{r}");
        // A delete nobody made.
        let mut rs = good_events();
        rs.insert(4, events(vec![del("p/b", 135)]));
        let r = check(&hist(vec![watcher("w", "p/", vec![inc(START + 1, rs)])]));
        only(&r, Kind::Phantom);
        // The right key and revision with another value, or a delete where the write put.
        let mut rs = good_events();
        rs[1] = events(vec![put("p/a", "zz", 110, 110, 1)]);
        let r = check(&hist(vec![watcher("w", "p/", vec![inc(START + 1, rs)])]));
        only(&r, Kind::Phantom);
        let mut rs = good_events();
        rs[2].events[1] = del("p/b", 120);
        let r = check(&hist(vec![watcher("w", "p/", vec![inc(START + 1, rs)])]));
        only(&r, Kind::Phantom);
        // A key outside the range.
        let mut rs = good_events();
        rs.insert(4, events(vec![put("q/x", "a1", 135, 135, 1)]));
        let r = check(&hist(vec![watcher("w", "p/", vec![inc(START + 1, rs)])]));
        assert!(r.count(Kind::Phantom) > 0, "{r}");
    }

    #[test]
    fn unknown_writes_may_appear_once_at_one_revision() {
        let mut h = hist(vec![]);
        h.writes.push(unknown(vec![
            WriteOp::put("p/c", "c1"),
            WriteOp::put("p/d", "d1"),
        ]));
        h.writes.push(unknown(vec![WriteOp::put("p/c", "never")]));
        let mut rs = good_events();
        rs.insert(
            4,
            events(vec![
                put("p/c", "c1", 135, 135, 1),
                put("p/d", "d1", 135, 135, 1),
            ]),
        );
        // Two watchers see it at one revision: fine.
        h.watchers = vec![
            watcher("w1", "p/", vec![inc(START + 1, rs.clone())]),
            watcher("w2", "p/", vec![inc(START + 1, rs.clone())]),
        ];
        let r = check(&h);
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.unknown_resolved, 1);
        // A third watcher sees it at another revision.
        let mut rs3 = good_events();
        rs3.insert(
            4,
            events(vec![
                put("p/c", "c1", 136, 136, 1),
                put("p/d", "d1", 136, 136, 1),
            ]),
        );
        h.watchers
            .push(watcher("w3", "p/", vec![inc(START + 1, rs3)]));
        let r = check(&h);
        assert!(r.count(Kind::Phantom) >= 2, "{r}");
        assert!(
            r.violations
                .iter()
                .all(|v| v.watcher == "w3" || v.kind == Kind::Reliable),
            "{r}"
        );
        // One watcher misses the unknown write another saw (it covers revision 135).
        h.watchers.pop();
        h.watchers
            .push(watcher("w3", "p/", vec![inc(START + 1, good_events())]));
        let r = check(&h);
        only(&r, Kind::Reliable);
        assert!(r.violations.iter().all(|v| v.watcher == "w3"), "{r}");
    }

    #[test]
    fn reports_a_late_event_after_a_progress_notification() {
        let rs = vec![
            created(START),
            events(vec![put("p/a", "a1", 110, 110, 1)]),
            progress(125),
            events(vec![
                put("p/a", "a2", 120, 110, 2),
                put("p/b", "b1", 120, 120, 1),
            ]),
            events(vec![del("p/a", 130)]),
        ];
        let r = check(&hist(vec![watcher("w", "p/", vec![inc(START + 1, rs)])]));
        only(&r, Kind::Bookmark);
    }

    #[test]
    fn reports_an_event_at_the_revision_of_an_earlier_progress_notification() {
        let rs = vec![
            created(START),
            events(vec![put("p/a", "a1", 110, 110, 1)]),
            progress(120),
            events(vec![
                put("p/a", "a2", 120, 110, 2),
                put("p/b", "b1", 120, 120, 1),
            ]),
            events(vec![del("p/a", 130)]),
        ];
        let r = check(&hist(vec![watcher("w", "p/", vec![inc(START + 1, rs)])]));
        only(&r, Kind::Bookmark);
    }

    #[test]
    fn a_seen_unknown_write_whose_delete_nobody_saw_leaves_the_key_unverifiable() {
        // u = {put p/c, delete p/b}: seen at 135 through p/c, its delete of p/b (which held b1
        // since 120) not seen by anyone: a watcher that started at 140 cannot tell whether b2
        // at 150 is a create.
        let mut h = hist(vec![]);
        h.writes.push(unknown(vec![
            WriteOp::put("p/c", "c1"),
            WriteOp::delete("p/b"),
        ]));
        h.writes.push(acked(150, vec![WriteOp::put("p/b", "b2")]));
        let mut late = watcher(
            "late",
            "p/",
            vec![inc(
                135,
                vec![
                    created(134),
                    events(vec![put("p/c", "c1", 135, 135, 1)]),
                    events(vec![put("p/b", "b2", 150, 150, 1)]),
                ],
            )],
        );
        late.prev_kv = false;
        let r = check(&History {
            history_start: START,
            writes: h.writes.clone(),
            watchers: vec![late],
        });
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.unknown_resolved, 1);
        assert!(r.unverifiable >= 1, "{}", r.summary());
    }

    #[test]
    fn checks_prev_kv() {
        let good = |w: bool| {
            let mut rs = vec![
                created(START),
                events(vec![put("p/a", "a1", 110, 110, 1)]),
                events(vec![
                    with_prev(
                        put("p/a", "a2", 120, 110, 2),
                        Some(put("p/a", "a1", 110, 110, 1)),
                    ),
                    put("p/b", "b1", 120, 120, 1),
                ]),
                events(vec![with_prev(
                    del("p/a", 130),
                    Some(put("p/a", "a2", 120, 110, 2)),
                )]),
            ];
            if !w {
                for r in &mut rs {
                    for e in &mut r.events {
                        e.prev_kv = None;
                    }
                }
            }
            rs
        };
        let mut w = watcher("w", "p/", vec![inc(START + 1, good(true))]);
        w.prev_kv = true;
        let r = check(&hist(vec![w.clone()]));
        assert!(r.is_ok(), "{r}");
        // A stale prev_kv.
        w.incarnations[0].responses[3].events[0].prev_kv = Some(put("p/a", "a1", 110, 110, 1).kv);
        only(&check(&hist(vec![w.clone()])), Kind::PrevKv);
        // A prev_kv on a create.
        w.incarnations[0].responses = good(true);
        w.incarnations[0].responses[1].events[0].prev_kv = Some(put("p/a", "a0", 105, 105, 1).kv);
        only(&check(&hist(vec![w.clone()])), Kind::PrevKv);
        // A missing prev_kv.
        w.incarnations[0].responses = good(true);
        w.incarnations[0].responses[2].events[0].prev_kv = None;
        only(&check(&hist(vec![w.clone()])), Kind::PrevKv);
        // prev_kv not asked for but sent.
        w.prev_kv = false;
        w.incarnations[0].responses = good(true);
        only(&check(&hist(vec![w.clone()])), Kind::PrevKv);
        w.incarnations[0].responses = good(false);
        assert!(check(&hist(vec![w])).is_ok());
    }

    #[test]
    fn checks_create_revision_and_version() {
        let mut rs = good_events();
        rs[2].events[0].kv.version = 1; // a2 is the second version since a's creation
        only(
            &check(&hist(vec![watcher("w", "p/", vec![inc(START + 1, rs)])])),
            Kind::Create,
        );
        let mut rs = good_events();
        rs[2].events[1].kv.create_revision = 110; // b1 is a create
        only(
            &check(&hist(vec![watcher("w", "p/", vec![inc(START + 1, rs)])])),
            Kind::Create,
        );
        // After a delete, a put creates the key anew.
        let mut h = hist(vec![]);
        h.writes.push(acked(150, vec![WriteOp::put("p/a", "a3")]));
        let mut rs = good_events();
        rs.push(events(vec![put("p/a", "a3", 150, 110, 3)]));
        h.watchers = vec![watcher("w", "p/", vec![inc(START + 1, rs)])];
        only(&check(&h), Kind::Create);
        h.watchers[0].incarnations[0].responses[5] = events(vec![put("p/a", "a3", 150, 150, 1)]);
        assert!(check(&h).is_ok());
        // A delete event with metadata.
        let mut rs = good_events();
        rs[3].events[0].kv.version = 2;
        only(
            &check(&hist(vec![watcher("w", "p/", vec![inc(START + 1, rs)])])),
            Kind::Create,
        );
    }

    #[test]
    fn metadata_below_an_unexplained_unknown_write_is_not_judged() {
        // An unknown put of p/b that no watcher saw, with a watcher that did not cover p/b from
        // the start: it may have happened before b1 (b1 would then be version 2).
        let mut h = hist(vec![]);
        h.writes.push(unknown(vec![WriteOp::put("p/b", "b0")]));
        let rs = vec![
            created(115),
            events(vec![
                put("p/a", "a2", 120, 110, 2),
                put("p/b", "b1", 120, 105, 2),
            ]),
        ];
        h.watchers = vec![watcher("w", "p/", vec![inc(116, rs.clone())])];
        let r = check(&h);
        assert!(r.is_ok(), "{r}");
        assert!(r.unverifiable > 0);
        // With a complete watcher covering p/b up to 140, which did not see b0, b1 must be a
        // create.
        h.watchers
            .push(watcher("full", "p/", vec![inc(START + 1, good_events())]));
        let r = check(&h);
        only(&r, Kind::Create);
        assert!(r.violations.iter().all(|v| v.watcher == "w"), "{r}");
    }

    #[test]
    fn checks_start_revision() {
        let h = hist(vec![watcher(
            "w",
            "p/",
            vec![inc(
                115,
                vec![
                    created(115),
                    events(vec![put("p/a", "a1", 110, 110, 1)]),
                    good_events()[2].clone(),
                ],
            )],
        )]);
        only(&check(&h), Kind::Start);
    }

    #[test]
    fn checks_filters() {
        let mut w = watcher("w", "p/", vec![inc(START + 1, good_events())]);
        w.no_delete = true;
        only(&check(&hist(vec![w.clone()])), Kind::Filter);
        // Without the delete event it passes: the delete is not expected.
        w.incarnations[0].responses.remove(3);
        assert!(check(&hist(vec![w.clone()])).is_ok());
        w.no_delete = false;
        w.no_put = true;
        w.incarnations[0].responses =
            vec![created(START), events(vec![del("p/a", 130)]), progress(140)];
        let r = check(&hist(vec![w.clone()]));
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.expected_deliveries, 1);
        w.incarnations[0]
            .responses
            .insert(1, events(vec![put("p/a", "a1", 110, 110, 1)]));
        only(&check(&hist(vec![w])), Kind::Filter);
    }

    #[test]
    fn checks_compaction_cancels() {
        let cancel = |c: Rev| Response {
            header_revision: 150,
            canceled: true,
            compact_revision: c,
            ..Default::default()
        };
        // Started at 101, compacted at 115: canceled, resumed at 115; the put at 110 is excused.
        let h = hist(vec![watcher(
            "w",
            "p/",
            vec![
                inc(START + 1, vec![created(150), cancel(115)]),
                inc(
                    115,
                    vec![
                        created(150),
                        good_events()[2].clone(),
                        good_events()[3].clone(),
                        progress(140),
                    ],
                ),
            ],
        )]);
        let r = check(&h);
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.compactions, 1);
        // A compact_revision at or below the start is no reason.
        let h = hist(vec![watcher(
            "w",
            "p/",
            vec![
                inc(120, vec![created(150), cancel(120)]),
                inc(
                    120,
                    vec![
                        created(150),
                        good_events()[2].clone(),
                        good_events()[3].clone(),
                    ],
                ),
            ],
        )]);
        let r = check(&h);
        // (The watcher started at 120, after a1: its history is not complete; fine here.)
        only(&r, Kind::Compaction);
    }

    #[test]
    fn checks_the_protocol() {
        // Events before `created`.
        let mut rs = good_events();
        rs.swap(0, 1);
        let r = check(&hist(vec![watcher("w", "p/", vec![inc(START + 1, rs)])]));
        only(&r, Kind::Protocol);
        // A response after `canceled`.
        let mut rs = good_events();
        rs.insert(
            2,
            Response {
                header_revision: 115,
                canceled: true,
                ..Default::default()
            },
        );
        let r = check(&hist(vec![watcher("w", "p/", vec![inc(START + 1, rs)])]));
        assert!(r.count(Kind::Protocol) > 0, "{r}");
        // header.revision below the events'.
        let mut rs = good_events();
        rs[2].header_revision = 110;
        only(
            &check(&hist(vec![watcher("w", "p/", vec![inc(START + 1, rs)])])),
            Kind::Protocol,
        );
    }

    #[test]
    fn fragments_are_merged() {
        let mut rs = good_events();
        let mut first = events(vec![put("p/a", "a2", 120, 110, 2)]);
        first.fragment = true;
        rs.splice(2..3, [first, events(vec![put("p/b", "b1", 120, 120, 1)])]);
        let r = check(&hist(vec![watcher("w", "p/", vec![inc(START + 1, rs)])]));
        assert!(r.is_ok(), "{r}");
    }

    #[test]
    fn two_acked_writes_of_one_key_at_one_revision_are_reported() {
        let mut h = hist(vec![]);
        h.writes
            .push(acked(120, vec![WriteOp::put("p/a", "other")]));
        let r = check(&h);
        only(&r, Kind::Reliable);
    }

    #[test]
    fn ranges() {
        assert_eq!(prefix_end(b"p/"), b"p0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert!(range_contains(b"k", b"", b"k"));
        assert!(!range_contains(b"k", b"", b"k1"));
        assert!(range_contains(b"k", b"\0", b"z"));
        assert!(!range_contains(b"k", b"\0", b"a"));
        assert!(range_contains(b"a", b"c", b"b"));
        assert!(!range_contains(b"a", b"c", b"c"));
    }
}
