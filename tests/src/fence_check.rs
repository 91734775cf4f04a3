//! Checking etcd elections (`v3electionpb.Election`) and locks (`v3lockpb.Lock`) under faults
//! through fencing revisions: the election and lock checkers of the chaos suite.
//!
//! A leader (a lock holder) is named by the key Campaign (Lock) created for it; that key's
//! `create_revision` is its **fencing revision**. Every write a leader (holder) makes is a Txn
//! guarded by `compare create_revision(its key) == fence`: it succeeds only while the key still
//! exists as that very key, i.e. while the leadership (the lock) is still held as far as the
//! store's state is concerned. Leases can lapse under faults, so a process may go on *believing*
//! it leads after its key is gone; that is allowed (etcd promises no more): what must never
//! happen is that two leaderships both write successfully in interleaved order.
//!
//! # Input
//!
//! [`GuardedWrite`]s: the actor (candidate or lock worker), its term (the how-manieth leadership
//! or critical section of that actor), the fence it used, the call interval and the outcome
//! (succeeded at a revision, failed compare, unknown). For locks also what the worker read of
//! the counter and wrote ([`Section`]), and the counter's final value.
//!
//! # Rules
//!
//! Fences are handed out by the store as `create_revision`s, which grow with real time, and a
//! new leader (holder) gets its key only after every earlier leader's key is gone. So:
//!
//! - **Order** ([`Kind::DoubleLeader`], [`Kind::LockOverlap`]): the succeeded guarded writes,
//!   sorted by their revision, have non-decreasing fences. A write with fence `f1` at a revision
//!   above a write with fence `f2 > f1` means the older leadership (lock) still held its key
//!   after the newer one had written under its own: two leaders (two holders) at once. Since
//!   fences are unique per leadership, this is the same as "each leadership's writes form one
//!   contiguous block". Counted per pair of leaderships.
//! - **Fence reuse** ([`Kind::FenceReuse`]): two leaderships (actor, term) with one fence.
//! - **Lost update** ([`Kind::LostUpdate`], locks): each critical section reads the counter
//!   and writes `read + 1`, guarded only by its fence. With mutual exclusion the succeeded
//!   writes, by revision, write strictly increasing values (a write of unknown outcome that
//!   happened leaves a gap, never a repeat); and the final counter is at least the number of
//!   succeeded increments and at most that plus the unknown ones.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use crate::lease_check::Ns;
use crate::watch_check::Rev;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuardOutcome {
    /// The compare held and the write committed at this revision.
    Wrote(Rev),
    /// The compare failed: the key was gone (or another).
    Refused,
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardedWrite {
    pub actor: String,
    pub term: u64,
    pub fence: Rev,
    pub invoke: Ns,
    pub done: Ns,
    pub outcome: GuardOutcome,
}

/// One leadership as its candidate lived it (reports only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leadership {
    pub actor: String,
    pub term: u64,
    pub key: Vec<u8>,
    pub fence: Rev,
    pub campaign_sent: Ns,
    pub won: Ns,
    /// When the candidate stopped acting as leader (resigned, let its lease go, lost it).
    pub ended: Ns,
    pub how: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ElectionHistory {
    pub leaderships: Vec<Leadership>,
    pub writes: Vec<GuardedWrite>,
}

/// One critical section of a lock worker: what it read of the counter and its guarded write
/// of `read + 1`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    pub key: Vec<u8>,
    pub lock_sent: Ns,
    pub entered: Ns,
    pub exited: Ns,
    /// The counter as read in the section (absent = 0).
    pub read: i64,
    pub write: GuardedWrite,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LockHistory {
    pub sections: Vec<Section>,
    /// The counter read once everything stopped (absent = 0); `None`: not read.
    pub final_counter: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    DoubleLeader,
    LockOverlap,
    FenceReuse,
    LostUpdate,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    pub kind: Kind,
    pub description: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.description)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub violations: Vec<Violation>,
    /// Leaderships or critical sections.
    pub terms: usize,
    pub writes: usize,
    pub writes_ok: usize,
    pub writes_refused: usize,
    pub writes_unknown: usize,
    /// Pairs of terms whose local intervals (won..ended, entered..exited) overlapped in real
    /// time, every write fenced: allowed (a lapsed lease), counted for the report.
    pub fenced_overlaps: usize,
    /// The first few of them, described.
    pub overlap_examples: Vec<String>,
    pub final_counter: Option<i64>,
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
    pub fn summary(&self) -> String {
        format!(
            "{} terms, guarded writes {} ({} succeeded, {} refused, {} unknown), {} fenced \
             real-time overlaps, final counter {:?}; {} violations {:?}",
            self.terms,
            self.writes,
            self.writes_ok,
            self.writes_refused,
            self.writes_unknown,
            self.fenced_overlaps,
            self.final_counter,
            self.violations.len(),
            self.kinds()
        )
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "fence check: {}", self.summary())?;
        for o in &self.overlap_examples {
            writeln!(f, "  fenced overlap: {o}")?;
        }
        for v in self.violations.iter().take(30) {
            writeln!(f, "  {v}")?;
        }
        if self.violations.len() > 30 {
            writeln!(f, "  ... and {} more", self.violations.len() - 30)?;
        }
        Ok(())
    }
}

fn count_writes(r: &mut Report, writes: &[&GuardedWrite]) {
    r.writes = writes.len();
    for w in writes {
        match w.outcome {
            GuardOutcome::Wrote(_) => r.writes_ok += 1,
            GuardOutcome::Refused => r.writes_refused += 1,
            GuardOutcome::Unknown => r.writes_unknown += 1,
        }
    }
}

/// A term: (actor, term number).
type Term<'a> = (&'a str, u64);

/// The order and fence-reuse rules over `writes`; `kind` names an order violation.
fn check_order(writes: &[&GuardedWrite], kind: Kind, out: &mut Vec<Violation>) {
    // Fence reuse: one fence, two terms.
    let mut by_fence: BTreeMap<Rev, BTreeSet<(&str, u64)>> = BTreeMap::new();
    for w in writes {
        by_fence
            .entry(w.fence)
            .or_default()
            .insert((w.actor.as_str(), w.term));
    }
    for (f, terms) in &by_fence {
        if terms.len() > 1 {
            out.push(Violation {
                kind: Kind::FenceReuse,
                description: format!("fence {f} used by {terms:?}"),
            });
        }
    }
    let mut ok: Vec<(Rev, &GuardedWrite)> = writes
        .iter()
        .filter_map(|w| match w.outcome {
            GuardOutcome::Wrote(r) => Some((r, *w)),
            _ => None,
        })
        .collect();
    ok.sort_by_key(|(r, w)| (*r, w.fence));
    // The write with the largest fence so far; a later write with a smaller fence is an
    // interleaving of two terms. One violation per pair of terms.
    let mut max: Option<(Rev, &GuardedWrite)> = None;
    let mut pairs: BTreeSet<(Term, Term)> = BTreeSet::new();
    for (rev, w) in ok {
        if let Some((mrev, m)) = max {
            if w.fence < m.fence {
                if pairs.insert(((w.actor.as_str(), w.term), (m.actor.as_str(), m.term))) {
                    out.push(Violation {
                        kind,
                        description: format!(
                            "{} term {} (fence {}) wrote at revision {rev}, after {} term {} \
                             (fence {}) wrote at revision {mrev}",
                            w.actor, w.term, w.fence, m.actor, m.term, m.fence
                        ),
                    });
                }
                continue;
            }
        }
        if max.is_none_or(|(_, m)| w.fence >= m.fence) {
            max = Some((rev, w));
        }
    }
}

/// Pairs of intervals (from different terms) that overlap, and the first few, described.
fn overlaps(intervals: &mut [(Ns, Ns, String)]) -> (usize, Vec<String>) {
    intervals.sort();
    let mut n = 0;
    let mut shown = vec![];
    for i in 0..intervals.len() {
        for j in i + 1..intervals.len() {
            if intervals[j].0 >= intervals[i].1 {
                break;
            }
            n += 1;
            if shown.len() < 5 {
                shown.push(format!("{} / {}", intervals[i].2, intervals[j].2));
            }
        }
    }
    (n, shown)
}

fn secs(t: Ns) -> String {
    format!("{:.3}", t as f64 / 1e9)
}

pub fn check_election(h: &ElectionHistory) -> Report {
    let writes: Vec<&GuardedWrite> = h.writes.iter().collect();
    let mut r = Report {
        terms: h.leaderships.len(),
        ..Default::default()
    };
    count_writes(&mut r, &writes);
    check_order(&writes, Kind::DoubleLeader, &mut r.violations);
    // A leadership's fence must be its key's own (and one per term).
    let mut fences: HashMap<Rev, (&str, u64)> = HashMap::new();
    for l in &h.leaderships {
        if let Some(o) = fences.insert(l.fence, (l.actor.as_str(), l.term)) {
            if o != (l.actor.as_str(), l.term) {
                r.violations.push(Violation {
                    kind: Kind::FenceReuse,
                    description: format!(
                        "Campaign gave fence {} to {o:?} and to ({}, {})",
                        l.fence, l.actor, l.term
                    ),
                });
            }
        }
    }
    let mut outcomes: HashMap<(&str, u64), [usize; 3]> = HashMap::new();
    for w in &h.writes {
        let i = match w.outcome {
            GuardOutcome::Wrote(_) => 0,
            GuardOutcome::Refused => 1,
            GuardOutcome::Unknown => 2,
        };
        outcomes.entry((w.actor.as_str(), w.term)).or_default()[i] += 1;
    }
    let mut iv: Vec<(Ns, Ns, String)> = h
        .leaderships
        .iter()
        .map(|l| {
            let o = outcomes
                .get(&(l.actor.as_str(), l.term))
                .copied()
                .unwrap_or_default();
            let d = format!(
                "{} term {} fence {} campaign {}..{} s, led until {} s ({}; writes {} ok, {} \
                 refused, {} unknown)",
                l.actor,
                l.term,
                l.fence,
                secs(l.campaign_sent),
                secs(l.won),
                secs(l.ended),
                l.how,
                o[0],
                o[1],
                o[2]
            );
            (l.won, l.ended, d)
        })
        .collect();
    (r.fenced_overlaps, r.overlap_examples) = overlaps(&mut iv);
    r
}

pub fn check_lock(h: &LockHistory) -> Report {
    let writes: Vec<&GuardedWrite> = h.sections.iter().map(|s| &s.write).collect();
    let mut r = Report {
        terms: h.sections.len(),
        final_counter: h.final_counter,
        ..Default::default()
    };
    count_writes(&mut r, &writes);
    check_order(&writes, Kind::LockOverlap, &mut r.violations);
    // Lost updates: by revision, the succeeded increments write strictly increasing values.
    let mut ok: Vec<(Rev, &Section)> = h
        .sections
        .iter()
        .filter_map(|s| match s.write.outcome {
            GuardOutcome::Wrote(rev) => Some((rev, s)),
            _ => None,
        })
        .collect();
    ok.sort_by_key(|(rev, _)| *rev);
    for pair in ok.windows(2) {
        let ((r0, a), (r1, b)) = (pair[0], pair[1]);
        if b.read < a.read + 1 {
            r.violations.push(Violation {
                kind: Kind::LostUpdate,
                description: format!(
                    "{} term {} wrote {} at revision {r1} after {} term {} wrote {} at revision \
                     {r0}: it read {} (an increment lost)",
                    b.write.actor,
                    b.write.term,
                    b.read + 1,
                    a.write.actor,
                    a.write.term,
                    a.read + 1,
                    b.read
                ),
            });
        }
    }
    if let Some(c) = h.final_counter {
        let (lo, hi) = (r.writes_ok as i64, (r.writes_ok + r.writes_unknown) as i64);
        if c < lo || c > hi {
            r.violations.push(Violation {
                kind: Kind::LostUpdate,
                description: format!(
                    "the counter ends at {c}, with {lo} increments succeeded and {} unknown",
                    hi - lo
                ),
            });
        }
    }
    let mut iv: Vec<(Ns, Ns, String)> = h
        .sections
        .iter()
        .map(|s| {
            let d = format!(
                "{} term {} fence {} held {}..{} s (lock sent {} s, write {:?})",
                s.write.actor,
                s.write.term,
                s.write.fence,
                secs(s.entered),
                secs(s.exited),
                secs(s.lock_sent),
                s.write.outcome
            );
            (s.entered, s.exited, d)
        })
        .collect();
    (r.fenced_overlaps, r.overlap_examples) = overlaps(&mut iv);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease_check::SEC;

    fn w(actor: &str, term: u64, fence: Rev, at: Ns, outcome: GuardOutcome) -> GuardedWrite {
        GuardedWrite {
            actor: actor.into(),
            term,
            fence,
            invoke: at,
            done: at + 1,
            outcome,
        }
    }

    fn lead(actor: &str, term: u64, fence: Rev, won: Ns, ended: Ns) -> Leadership {
        Leadership {
            actor: actor.into(),
            term,
            key: format!("e/{actor}/{term}").into_bytes(),
            fence,
            campaign_sent: won,
            won,
            ended,
            how: "resigned".into(),
        }
    }

    /// a leads (fence 100) and writes at 110, 120; b (fence 130) writes at 140, 150 (one of its
    /// writes refused, one unknown); a's late write at 160 is refused.
    fn election() -> ElectionHistory {
        use GuardOutcome::*;
        ElectionHistory {
            leaderships: vec![
                lead("a", 1, 100, SEC, 3 * SEC),
                lead("b", 1, 130, 4 * SEC, 6 * SEC),
            ],
            writes: vec![
                w("a", 1, 100, SEC, Wrote(110)),
                w("a", 1, 100, 2 * SEC, Wrote(120)),
                w("b", 1, 130, 4 * SEC, Wrote(140)),
                w("b", 1, 130, 5 * SEC, Wrote(150)),
                w("b", 1, 130, 5 * SEC, Unknown),
                w("a", 1, 100, 5 * SEC, Refused),
            ],
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
    fn a_correct_election_passes() {
        let r = check_election(&election());
        assert!(r.is_ok(), "{r}");
        assert_eq!((r.writes_ok, r.writes_refused, r.writes_unknown), (4, 1, 1));
        assert_eq!(r.fenced_overlaps, 0);
    }

    #[test]
    fn reports_two_leaders_writing_interleaved() {
        let mut h = election();
        // a's write at 160 succeeds: a still held its key after b wrote under its own.
        h.writes[5].outcome = GuardOutcome::Wrote(160);
        let r = check_election(&h);
        only(&r, Kind::DoubleLeader);
        assert_eq!(r.count(Kind::DoubleLeader), 1);
        // One violation per pair of leaderships, however many writes interleave.
        h.writes
            .push(w("a", 1, 100, 6 * SEC, GuardOutcome::Wrote(170)));
        assert_eq!(check_election(&h).count(Kind::DoubleLeader), 1);
    }

    #[test]
    fn overlapping_local_intervals_with_fenced_writes_pass() {
        let mut h = election();
        // a believed it led until 5 s (its lease lapsed under it), but its late write failed.
        h.leaderships[0].ended = 5 * SEC;
        let r = check_election(&h);
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.fenced_overlaps, 1);
    }

    #[test]
    fn reports_a_fence_given_twice() {
        let mut h = election();
        h.leaderships[1].fence = 100;
        only(&check_election(&h), Kind::FenceReuse);
        let mut h = election();
        h.writes[2].fence = 100;
        h.writes[3].fence = 100;
        h.writes[4].fence = 100;
        only(&check_election(&h), Kind::FenceReuse);
    }

    fn section(actor: &str, term: u64, fence: Rev, read: i64, outcome: GuardOutcome) -> Section {
        let at = term * SEC;
        Section {
            key: format!("l/{actor}").into_bytes(),
            lock_sent: at,
            entered: at + 10,
            exited: at + 20,
            read,
            write: w(actor, term, fence, at + 15, outcome),
        }
    }

    /// Five sections: increments 1, 2 (unknown, happened), 3, a refused one, 4.
    fn lock() -> LockHistory {
        use GuardOutcome::*;
        LockHistory {
            sections: vec![
                section("a", 1, 100, 0, Wrote(110)),
                section("b", 2, 200, 1, Unknown),
                section("c", 3, 300, 2, Wrote(310)),
                section("a", 4, 400, 3, Refused),
                section("b", 5, 500, 3, Wrote(510)),
            ],
            final_counter: Some(4),
        }
    }

    #[test]
    fn a_correct_lock_history_passes() {
        let r = check_lock(&lock());
        assert!(r.is_ok(), "{r}");
        assert_eq!((r.writes_ok, r.writes_refused, r.writes_unknown), (3, 1, 1));
        // The unknown one may not have happened either.
        let mut h = lock();
        h.final_counter = Some(3);
        h.sections[2].read = 1;
        h.sections[4].read = 2;
        assert!(check_lock(&h).is_ok());
    }

    #[test]
    fn reports_overlapping_holders() {
        let mut h = lock();
        // c (fence 300) writes at 520, after b (fence 500) wrote at 510.
        h.sections[2].write.outcome = GuardOutcome::Wrote(520);
        h.sections[2].read = 4;
        h.final_counter = None;
        only(&check_lock(&h), Kind::LockOverlap);
    }

    #[test]
    fn reports_a_lost_update() {
        let mut h = lock();
        // a and c both read 0 (two holders at once, each writing 1): found by the values even
        // though the fences are in order.
        h.sections[2].read = 0;
        h.sections[4].read = 1;
        h.final_counter = None;
        only(&check_lock(&h), Kind::LostUpdate);
        // The final counter alone: fewer than the succeeded increments.
        let mut h = lock();
        h.final_counter = Some(2);
        only(&check_lock(&h), Kind::LostUpdate);
        // More than every increment that may have happened.
        let mut h = lock();
        h.final_counter = Some(5);
        only(&check_lock(&h), Kind::LostUpdate);
    }

    #[test]
    fn counts_fenced_real_time_overlaps() {
        let mut h = lock();
        h.sections[3].exited = 6 * SEC;
        let r = check_lock(&h);
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.fenced_overlaps, 1);
    }
}
