//! Checking etcd leases under faults: the lease checker of the chaos suite.
//!
//! # Input
//!
//! A [`LeaseHistory`], all times in nanoseconds since one `Instant` of the test process
//! ([`Ns`]). The servers run on the same host and count their timers on the same monotonic
//! clock (`Instant`, `CLOCK_MONOTONIC`), which SIGSTOP does not stop: no clock skew to allow for.
//!
//! - per lease ([`LeaseLog`]): its granted TTL, when the grant was sent and answered, the keys
//!   put with it (each put's call interval and whether it was acknowledged), every keep-alive
//!   (sent, answered or given up, and whether it answered a TTL > 0, TTL 0, or nothing), and an
//!   explicit revoke if there was one (call interval, outcome);
//! - observations ([`Observation`]): linearizable Ranges over every leased key, with their call
//!   interval and the leased keys present (with the lease each carries);
//! - deletes of leased keys seen by a watcher ([`WatchedDelete`]: when received, revision);
//! - the nemesis' faults ([`FaultWindow`]: injected, healed, which store or PD) and PD's view of
//!   each lease's owner ([`OwnerSeen`]: the region holding the lease's record and its leader,
//!   the time the harness asked).
//!
//! # The bounds
//!
//! **Early** (`early_limit`): a lease must live at least until `s + TTL` for every `s` that is
//! the *send* time of a keep-alive answered with TTL > 0 (or of the grant): the owner renews to
//! `now + TTL` with its own `now`, which is after the request was sent (same clock), and a
//! successor counts from its promotion, later still (docs/design/leases.md, "Why no lease
//! expires early"). No clock allowance is taken: there is no second clock. A revoke call
//! ends that promise from the moment it is sent. Evidence of an early expiry:
//!
//! - a Range invoked after the key's put was acknowledged, *completed* before the limit, that
//!   does not find the key (a linearizable read: the key was gone at some instant before it
//!   completed);
//! - a watch DELETE of the key *received* before the limit;
//! - a keep-alive answered TTL 0 before the limit.
//!
//! **Late** (`late_limit`): with a stable owner a lease is gone by `a + TTL` for `a` the time the
//! last keep-alive that may have renewed it was *answered* (or given up: one with no answer may
//! still be applied an instant later; if a fault held it, see below), or the grant answered.
//! The documented failover behaviour pushes that: a new owner counts a full TTL from its own
//! promotion. So the bound `b` starts at `a + TTL`, then, in time order, for each event at
//! `t <= b + grace`:
//!
//! - an **owner change** (PD reports another region or another leader for the lease's record)
//!   seen at `o` makes it `max(b, o + TTL)`. The poller sees a change when PD reports it, at or
//!   after the promotion (a new leader reports itself to PD at once): later than the real one,
//!   so safe;
//! - a **fault** injected at `i` and healed at `h` makes it `max(b, X)`:
//!   - a PD member killed or paused (the revoke needs PD's timestamps; PD may elect after the
//!     heal): `X = h + settle`;
//!   - a store that owned the lease then as far as PD said (or PD said nothing yet): a paused
//!     owner resumes its timers at `h`: `X = h + settle` (a successor is an owner change);
//!   - any other store: it may have led a region the revoke writes, or coordinated a
//!     transaction whose locks the revoke must wait out (a lock's TTL, 3 s, from its start):
//!     `X = i + settle`;
//!   - and if a keep-alive without an answer was outstanding to that store, or the store owned
//!     the lease, during the fault, that keep-alive may be applied when it heals:
//!     `X = max(X, h + TTL)`.
//!
//! `settle` is 6 s in the chaos suite (an election, 1–2 s; a lock's TTL, 3 s; the expiry
//! driver's retry, 1 s) and `grace` 2 s (a timer tick of 100 ms, the `expiring` mark and the
//! revoke's transaction on a loaded machine). `late_limit = b + grace`. Once the faults have
//! healed at `H` this is the strict final bound: `max(a + TTL, last owner change + TTL, H +
//! settle (or + TTL where a keep-alive was held)) + 2 s`. A key of the lease seen in a Range
//! *invoked* after `late_limit` is a missed expiry. A successful revoke has the stricter bound
//! of its answer: a key seen in a Range invoked after it is a revoked key still present.
//!
//! # Violations ([`Kind`])
//!
//! - **EarlyExpiry**, **MissedExpiry**, **RevokedPresent**: above (one per lease and kind).
//! - **NotAtomic**: the keys of one lease deleted at different revisions (watch), or one Range,
//!   invoked after all its puts were acknowledged, that holds some of them but not all.
//! - **WrongLease**: a leased key read back carrying another lease.
//!
//! Leases whose late limit is after the last Range are not judged for missed expiry
//! ([`Report::unjudged`]): the harness observes long enough for none to be left.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use crate::watch_check::Rev;

/// Nanoseconds since the run's base instant.
pub type Ns = u64;
pub const MS: Ns = 1_000_000;
pub const SEC: Ns = 1_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KaOutcome {
    /// Answered with TTL > 0.
    Renewed,
    /// Answered with TTL 0: the lease does not exist (any more).
    Expired,
    /// No answer (an error, a timeout): it may have renewed the lease.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepAlive {
    pub sent: Ns,
    /// Answered, or given up on.
    pub done: Ns,
    pub outcome: KaOutcome,
    /// The store it was sent to.
    pub node: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeasedKey {
    pub key: Vec<u8>,
    pub invoke: Ns,
    pub done: Ns,
    /// The put was acknowledged (otherwise its outcome is unknown or it failed).
    pub acked: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RevokeOutcome {
    Revoked,
    /// `requested lease not found`.
    NotFound,
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoke {
    pub invoke: Ns,
    pub done: Ns,
    pub outcome: RevokeOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseLog {
    pub id: i64,
    /// Who kept it (reports only).
    pub keeper: String,
    /// The granted TTL.
    pub ttl: Ns,
    pub grant_sent: Ns,
    pub granted: Ns,
    pub keys: Vec<LeasedKey>,
    pub keep_alives: Vec<KeepAlive>,
    pub revoke: Option<Revoke>,
}

/// One linearizable Range over the leased keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    pub invoke: Ns,
    pub done: Ns,
    pub revision: Rev,
    /// The leased keys present, each with its `lease`.
    pub present: Vec<(Vec<u8>, i64)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchedDelete {
    pub received: Ns,
    pub key: Vec<u8>,
    pub revision: Rev,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultWindow {
    pub inject: Ns,
    pub heal: Ns,
    pub what: String,
    /// The store it hit (its client address); `None`: a PD member.
    pub store: Option<String>,
}

/// What PD said of a lease's record at `seen`: the region holding it and the store (client
/// address) leading that region. The poller records the first sighting and every change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerSeen {
    pub lease: i64,
    pub seen: Ns,
    pub region: u64,
    pub owner: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LeaseHistory {
    pub leases: Vec<LeaseLog>,
    pub observations: Vec<Observation>,
    pub deletes: Vec<WatchedDelete>,
    pub faults: Vec<FaultWindow>,
    pub owners: Vec<OwnerSeen>,
    /// Time allowed for an expiry once due (see the module doc).
    pub grace: Ns,
    /// How long a fault may hold an expiry up after it (see the module doc).
    pub settle: Ns,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    EarlyExpiry,
    MissedExpiry,
    RevokedPresent,
    NotAtomic,
    WrongLease,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    pub kind: Kind,
    pub lease: i64,
    pub description: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} [lease {:x}]: {}",
            self.kind, self.lease, self.description
        )
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub violations: Vec<Violation>,
    pub leases: usize,
    pub keys: usize,
    pub keep_alives: usize,
    pub keep_alives_renewed: usize,
    pub keep_alives_unknown: usize,
    pub revoked: usize,
    /// Leases that ended by expiry (not revoked), judged for it.
    pub expired_judged: usize,
    pub observations: usize,
    pub deletes_seen: usize,
    pub owner_changes: usize,
    /// Leases whose late limit lies after the last observation: not judged for missed expiry.
    pub unjudged: usize,
    /// Per lease that expired (not revoked) and was seen gone: how long after `last keep-alive
    /// answered + TTL` the first Range not finding its keys completed, in ms (an upper estimate
    /// of how late it expired), sorted.
    pub lateness_ms: Vec<u64>,
    /// Of those, the ones later than a full TTL (a timer restarted by an owner change, or
    /// held by a fault).
    pub later_than_ttl: usize,
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
            "{} leases ({} keys, {} revoked, {} expiries judged, {} unjudged), {} keep-alives \
             ({} renewed, {} unknown), {} observations, {} deletes watched, {} owner changes; \
             {} early expiries, {} missed expiries, {} revoked keys present, {} not atomic, \
             {} wrong lease; {} violations; expiry after last keep-alive + TTL: p50 {} ms, \
             max {} ms, {} later than a TTL more",
            self.leases,
            self.keys,
            self.revoked,
            self.expired_judged,
            self.unjudged,
            self.keep_alives,
            self.keep_alives_renewed,
            self.keep_alives_unknown,
            self.observations,
            self.deletes_seen,
            self.owner_changes,
            self.count(Kind::EarlyExpiry),
            self.count(Kind::MissedExpiry),
            self.count(Kind::RevokedPresent),
            self.count(Kind::NotAtomic),
            self.count(Kind::WrongLease),
            self.violations.len(),
            pct(&self.lateness_ms, 50),
            pct(&self.lateness_ms, 100),
            self.later_than_ttl,
        )
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "lease check: {}", self.summary())?;
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

fn ms(t: Ns) -> String {
    format!("{:.3} s", t as f64 / SEC as f64)
}

/// Before this instant the lease must exist (see the module doc).
pub fn early_limit(l: &LeaseLog) -> Ns {
    let renewed = l
        .keep_alives
        .iter()
        .filter(|k| k.outcome == KaOutcome::Renewed)
        .map(|k| k.sent);
    let last = renewed.fold(l.grant_sent, Ns::max);
    let limit = last + l.ttl;
    match l.revoke {
        Some(r) => limit.min(r.invoke),
        None => limit,
    }
}

/// The times PD's view of a lease's owner changed (of `lease`, or of every lease).
pub fn owner_changes(owners: &[OwnerSeen], lease: Option<i64>) -> Vec<(i64, Ns)> {
    let mut by_lease: BTreeMap<i64, Vec<&OwnerSeen>> = BTreeMap::new();
    for o in owners.iter().filter(|o| lease.is_none_or(|l| o.lease == l)) {
        by_lease.entry(o.lease).or_default().push(o);
    }
    let mut out = vec![];
    for (id, mut v) in by_lease {
        v.sort_by_key(|o| o.seen);
        for w in v.windows(2) {
            if (w[0].region, &w[0].owner) != (w[1].region, &w[1].owner) {
                out.push((id, w[1].seen));
            }
        }
    }
    out
}

/// After this instant no key of the lease may be present (see the module doc).
pub fn late_limit(
    l: &LeaseLog,
    faults: &[FaultWindow],
    owners: &[OwnerSeen],
    grace: Ns,
    settle: Ns,
) -> Ns {
    let mut b = last_answer(l) + l.ttl;
    let mine: Vec<&OwnerSeen> = {
        let mut v: Vec<&OwnerSeen> = owners.iter().filter(|o| o.lease == l.id).collect();
        v.sort_by_key(|o| o.seen);
        v
    };
    // Whether `addr` may have owned the lease during [a, h]: PD said so then, or last before
    // then, or PD never said anything before h.
    let owned = |addr: &str, a: Ns, h: Ns| {
        let before = mine.iter().rev().find(|o| o.seen < a);
        let mut during = mine.iter().filter(|o| o.seen >= a && o.seen <= h);
        let known = mine.iter().any(|o| o.seen <= h);
        !known || before.is_some_and(|o| o.owner == addr) || during.any(|o| o.owner == addr)
    };
    // (when it happened or was seen, the bound it may push to)
    let mut pushes: Vec<(Ns, Ns)> = owner_changes(owners, Some(l.id))
        .into_iter()
        .filter(|(_, seen)| *seen >= l.grant_sent)
        .map(|(_, seen)| (seen, seen + l.ttl))
        .collect();
    for f in faults.iter().filter(|f| f.heal >= l.grant_sent) {
        let (a, h) = (f.inject, f.heal.max(f.inject));
        let mut to = match &f.store {
            None => h + settle,
            Some(addr) if owned(addr, a, h) => h + settle,
            Some(_) => a + settle,
        };
        let held = l.keep_alives.iter().any(|k| {
            k.outcome == KaOutcome::Unknown
                && k.sent <= h
                && k.done >= a
                && f.store
                    .as_ref()
                    .is_some_and(|addr| *addr == k.node || owned(addr, a, h))
        });
        if held {
            to = to.max(h + l.ttl);
        }
        pushes.push((a, to));
    }
    pushes.sort();
    for (t, to) in pushes {
        if t <= b + grace {
            b = b.max(to);
        }
    }
    b + grace
}

pub fn check(h: &LeaseHistory) -> Report {
    let mut r = Report {
        leases: h.leases.len(),
        observations: h.observations.len(),
        deletes_seen: h.deletes.len(),
        owner_changes: owner_changes(&h.owners, None).len(),
        ..Default::default()
    };
    // Which lease each key belongs to (keys are unique to one lease).
    let mut owner: HashMap<&[u8], usize> = HashMap::new();
    for (i, l) in h.leases.iter().enumerate() {
        for k in &l.keys {
            owner.insert(k.key.as_slice(), i);
        }
    }
    let mut obs: Vec<&Observation> = h.observations.iter().collect();
    obs.sort_by_key(|o| o.invoke);
    let last_invoke = obs.last().map_or(0, |o| o.invoke);
    // Deletes per lease.
    let mut deletes: HashMap<usize, Vec<&WatchedDelete>> = HashMap::new();
    for d in &h.deletes {
        if let Some(&i) = owner.get(d.key.as_slice()) {
            deletes.entry(i).or_default().push(d);
        }
    }
    for (i, l) in h.leases.iter().enumerate() {
        r.keys += l.keys.len();
        r.keep_alives += l.keep_alives.len();
        r.keep_alives_renewed += l
            .keep_alives
            .iter()
            .filter(|k| k.outcome == KaOutcome::Renewed)
            .count();
        r.keep_alives_unknown += l
            .keep_alives
            .iter()
            .filter(|k| k.outcome == KaOutcome::Unknown)
            .count();
        let revoked = l.revoke.filter(|v| v.outcome == RevokeOutcome::Revoked);
        if revoked.is_some() {
            r.revoked += 1;
        }
        let early = early_limit(l);
        let late = late_limit(l, &h.faults, &h.owners, h.grace, h.settle);
        let mut found: BTreeMap<Kind, String> = BTreeMap::new();
        let mut note = |kind: Kind, d: String| {
            found.entry(kind).or_insert(d);
        };
        let all_acked = l.keys.iter().all(|k| k.acked);
        let all_acked_at = l.keys.iter().map(|k| k.done).max().unwrap_or(0);
        let mut present_after_late = false;
        for o in &obs {
            let mut n_present = 0;
            for k in &l.keys {
                let p = o.present.iter().find(|(key, _)| *key == k.key);
                if let Some((_, lease)) = p {
                    n_present += 1;
                    if *lease != l.id {
                        note(
                            Kind::WrongLease,
                            format!(
                                "{} read back with lease {lease:x} at revision {}",
                                show(&k.key),
                                o.revision
                            ),
                        );
                    }
                    if o.invoke > late {
                        present_after_late = true;
                        note(
                            Kind::MissedExpiry,
                            format!(
                                "{} present in a Range invoked at {} (revision {}), after the \
                                 late limit {} (TTL {}, last keep-alive answered {})",
                                show(&k.key),
                                ms(o.invoke),
                                o.revision,
                                ms(late),
                                ms(l.ttl),
                                ms(last_answer(l)),
                            ),
                        );
                    }
                    if let Some(v) = revoked {
                        if o.invoke > v.done {
                            note(
                                Kind::RevokedPresent,
                                format!(
                                    "{} present in a Range invoked at {} (revision {}), after \
                                     the revoke called at {} returned at {}",
                                    show(&k.key),
                                    ms(o.invoke),
                                    o.revision,
                                    ms(v.invoke),
                                    ms(v.done)
                                ),
                            );
                        }
                    }
                } else if k.acked && o.invoke >= k.done && o.done < early {
                    note(
                        Kind::EarlyExpiry,
                        format!(
                            "{} absent in a Range {}..{} (revision {}) before the early limit \
                             {} (TTL {}, last renewed keep-alive sent {})",
                            show(&k.key),
                            ms(o.invoke),
                            ms(o.done),
                            o.revision,
                            ms(early),
                            ms(l.ttl),
                            ms(early - l.ttl.min(early)),
                        ),
                    );
                }
            }
            if all_acked && o.invoke >= all_acked_at && n_present > 0 && n_present < l.keys.len() {
                note(
                    Kind::NotAtomic,
                    format!(
                        "a Range at revision {} holds {n_present} of its {} keys",
                        o.revision,
                        l.keys.len()
                    ),
                );
            }
        }
        for k in &l.keep_alives {
            if k.outcome == KaOutcome::Expired && k.done < early {
                note(
                    Kind::EarlyExpiry,
                    format!(
                        "a keep-alive sent at {} answered TTL 0 at {}, before the early limit {}",
                        ms(k.sent),
                        ms(k.done),
                        ms(early)
                    ),
                );
            }
        }
        if let Some(ds) = deletes.get(&i) {
            for d in ds {
                if d.received < early {
                    note(
                        Kind::EarlyExpiry,
                        format!(
                            "a watch DELETE of {} at revision {} received at {}, before the \
                             early limit {}",
                            show(&d.key),
                            d.revision,
                            ms(d.received),
                            ms(early)
                        ),
                    );
                }
            }
            let revs: BTreeSet<Rev> = ds.iter().map(|d| d.revision).collect();
            if revs.len() > 1 {
                note(
                    Kind::NotAtomic,
                    format!("its keys were deleted at revisions {revs:?} (watch)"),
                );
            }
        }
        if l.revoke.is_none() && !l.keys.is_empty() {
            // When it was first seen gone, after it was last seen present.
            let holds = |o: &Observation| {
                o.present
                    .iter()
                    .any(|(k, _)| l.keys.iter().any(|lk| lk.key == *k))
            };
            let last_present = obs.iter().filter(|o| holds(o)).map(|o| o.invoke).max();
            if let Some(p) = last_present {
                let gone = obs
                    .iter()
                    .filter(|o| o.invoke > p && !holds(o))
                    .map(|o| o.done)
                    .min();
                if let Some(g) = gone {
                    let due = last_answer(l) + l.ttl;
                    let late = g.saturating_sub(due);
                    r.lateness_ms.push(late / MS);
                    if late > l.ttl {
                        r.later_than_ttl += 1;
                    }
                }
            }
        }
        if revoked.is_none() && !l.keys.is_empty() {
            if late <= last_invoke || present_after_late {
                r.expired_judged += 1;
            } else {
                r.unjudged += 1;
            }
        }
        for (kind, description) in found {
            r.violations.push(Violation {
                kind,
                lease: l.id,
                description: format!("{} ({})", description, l.keeper),
            });
        }
    }
    r.lateness_ms.sort_unstable();
    r
}

/// The `p`th percentile of sorted `v` (0 if empty).
fn pct(v: &[u64], p: usize) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v[((v.len() - 1) * p / 100).min(v.len() - 1)]
}

fn last_answer(l: &LeaseLog) -> Ns {
    l.keep_alives
        .iter()
        .filter(|k| k.outcome != KaOutcome::Expired)
        .map(|k| k.done)
        .fold(l.granted, Ns::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Ns = 4 * SEC;

    /// A lease granted at 1 s (answered 1.01 s), keys put by 1.1 s, kept alive at 2, 3, 4 s
    /// (each answered 10 ms later), then let go: early limit 8 s, late limit 4.01 + 4 + 2.
    fn lease(id: i64, keys: &[&str]) -> LeaseLog {
        LeaseLog {
            id,
            keeper: "k0".into(),
            ttl: TTL,
            grant_sent: SEC,
            granted: SEC + 10 * MS,
            keys: keys
                .iter()
                .map(|k| LeasedKey {
                    key: k.as_bytes().to_vec(),
                    invoke: SEC + 20 * MS,
                    done: SEC + 100 * MS,
                    acked: true,
                })
                .collect(),
            keep_alives: [2, 3, 4]
                .iter()
                .map(|s| KeepAlive {
                    sent: s * SEC,
                    done: s * SEC + 10 * MS,
                    outcome: KaOutcome::Renewed,
                    node: "n1".into(),
                })
                .collect(),
            revoke: None,
        }
    }

    fn obs(at: Ns, rev: Rev, present: &[(&str, i64)]) -> Observation {
        Observation {
            invoke: at,
            done: at + 5 * MS,
            revision: rev,
            present: present
                .iter()
                .map(|(k, l)| (k.as_bytes().to_vec(), *l))
                .collect(),
        }
    }

    fn del(k: &str, rev: Rev, at: Ns) -> WatchedDelete {
        WatchedDelete {
            received: at,
            key: k.as_bytes().to_vec(),
            revision: rev,
        }
    }

    /// Present until 9 s, gone at 9.5 s and after, deleted at one revision.
    fn hist() -> LeaseHistory {
        let both = [("l/a", 7), ("l/b", 7)];
        LeaseHistory {
            leases: vec![lease(7, &["l/a", "l/b"])],
            observations: vec![
                obs(SEC, 10, &[]),
                obs(2 * SEC, 20, &both),
                obs(7 * SEC, 70, &both),
                obs(9 * SEC, 90, &both),
                obs(9 * SEC + 500 * MS, 95, &[]),
                obs(12 * SEC, 120, &[]),
            ],
            deletes: vec![
                del("l/a", 93, 9 * SEC + 200 * MS),
                del("l/b", 93, 9 * SEC + 200 * MS),
            ],
            faults: vec![],
            owners: vec![],
            grace: 2 * SEC,
            settle: 6 * SEC,
        }
    }

    fn fault(i: Ns, heal: Ns, store: Option<&str>) -> FaultWindow {
        FaultWindow {
            inject: i,
            heal,
            what: "a fault".into(),
            store: store.map(String::from),
        }
    }

    fn seen(lease: i64, at: Ns, region: u64, owner: &str) -> OwnerSeen {
        OwnerSeen {
            lease,
            seen: at,
            region,
            owner: owner.into(),
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
        let r = check(&hist());
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.leases, 1);
        assert_eq!(r.keep_alives_renewed, 3);
        assert_eq!(r.expired_judged, 1);
        assert_eq!(r.unjudged, 0);
        // Last keep-alive answered at 4.01 s, TTL 4 s: first seen gone by 9.505 s.
        assert_eq!(r.lateness_ms, vec![1495]);
        assert_eq!(r.later_than_ttl, 0);
    }

    const G: Ns = 2 * SEC;
    const S: Ns = 6 * SEC;

    #[test]
    fn limits() {
        let h = hist();
        let l = &h.leases[0];
        assert_eq!(early_limit(l), 8 * SEC);
        assert_eq!(late_limit(l, &[], &[], G, S), 10 * SEC + 10 * MS);
        // An unknown keep-alive may have renewed: the late bound moves, the early one not.
        let mut l2 = l.clone();
        l2.keep_alives.push(KeepAlive {
            sent: 5 * SEC,
            done: 6 * SEC,
            outcome: KaOutcome::Unknown,
            node: "n2".into(),
        });
        assert_eq!(early_limit(&l2), 8 * SEC);
        assert_eq!(late_limit(&l2, &[], &[], G, S), 12 * SEC);
        // A revoke call ends the promise.
        l2.revoke = Some(Revoke {
            invoke: 5 * SEC,
            done: 5 * SEC + 50 * MS,
            outcome: RevokeOutcome::Unknown,
        });
        assert_eq!(early_limit(&l2), 5 * SEC);
    }

    #[test]
    fn owner_changes_push_the_late_limit() {
        let h = hist();
        let l = &h.leases[0];
        let base = 10 * SEC + 10 * MS;
        // First seen on n1 (not a change), then on n2 at 7 s: a full TTL from there.
        let o = [seen(7, 2 * SEC, 1, "n1"), seen(7, 7 * SEC, 1, "n2")];
        assert_eq!(late_limit(l, &[], &o, G, S), 13 * SEC);
        assert_eq!(owner_changes(&o, None), vec![(7, 7 * SEC)]);
        // A split (another region, same leader) is a change too.
        let o = [seen(7, 2 * SEC, 1, "n1"), seen(7, 7 * SEC, 5, "n1")];
        assert_eq!(late_limit(l, &[], &o, G, S), 13 * SEC);
        // Another lease's change, or one seen after the deadline and its grace, does not count.
        let o = [seen(8, 2 * SEC, 1, "n1"), seen(8, 7 * SEC, 1, "n2")];
        assert_eq!(late_limit(l, &[], &o, G, S), base);
        let o = [
            seen(7, 2 * SEC, 1, "n1"),
            seen(7, 12 * SEC + 100 * MS, 1, "n2"),
        ];
        assert_eq!(late_limit(l, &[], &o, G, S), base);
    }

    #[test]
    fn faults_push_the_late_limit() {
        let h = hist();
        let l = &h.leases[0];
        let base = 10 * SEC + 10 * MS;
        let owned = [seen(7, 2 * SEC, 1, "n1")];
        // PD: settle after the heal.
        let pd = [fault(6 * SEC, 9 * SEC, None)];
        assert_eq!(late_limit(l, &pd, &owned, G, S), 17 * SEC);
        // The owner's store: settle after the heal.
        let own = [fault(6 * SEC, 9 * SEC, Some("n1"))];
        assert_eq!(late_limit(l, &own, &owned, G, S), 17 * SEC);
        // Unknown owner (PD never said): as if it were the owner.
        assert_eq!(late_limit(l, &own, &[], G, S), 17 * SEC);
        // Another store: settle after the injection.
        let other = [fault(6 * SEC, 9 * SEC, Some("n2"))];
        assert_eq!(late_limit(l, &other, &owned, G, S), 14 * SEC);
        // ... unless a keep-alive without an answer was outstanding to it: TTL from the heal.
        let mut l2 = l.clone();
        l2.keep_alives.push(KeepAlive {
            sent: 5 * SEC,
            done: 6 * SEC + 500 * MS,
            outcome: KaOutcome::Unknown,
            node: "n2".into(),
        });
        assert_eq!(late_limit(&l2, &other, &owned, G, S), 15 * SEC);
        // Chained: a fault injected before the pushed bound pushes again.
        let chain = [
            fault(6 * SEC, 9 * SEC, None),
            fault(16 * SEC, 17 * SEC, None),
        ];
        assert_eq!(late_limit(l, &chain, &owned, G, S), 25 * SEC);
        // A fault after the deadline and its grace changes nothing.
        let late = [fault(11 * SEC, 12 * SEC, None)];
        assert_eq!(late_limit(l, &late, &owned, G, S), base);
    }

    #[test]
    fn reports_an_early_expiry_seen_by_a_range() {
        let mut h = hist();
        // Gone at 7 s, before 4 s (last renewed keep-alive sent) + 4 s.
        h.observations[2] = obs(7 * SEC, 70, &[]);
        only(&check(&h), Kind::EarlyExpiry);
        // Not before the put was acknowledged: a Range invoked before it proves nothing.
        let mut h = hist();
        h.observations[0] = obs(SEC + 50 * MS, 10, &[]);
        assert!(check(&h).is_ok());
    }

    #[test]
    fn reports_an_early_expiry_seen_by_a_watch() {
        let mut h = hist();
        h.deletes = vec![del("l/a", 75, 7 * SEC + 900 * MS), del("l/b", 75, 8 * SEC)];
        let r = check(&h);
        only(&r, Kind::EarlyExpiry);
        // Received at the limit: fine.
        h.deletes[0].received = 8 * SEC;
        assert!(check(&h).is_ok());
    }

    #[test]
    fn reports_an_early_expiry_seen_by_a_keep_alive() {
        let mut h = hist();
        h.leases[0].keep_alives.push(KeepAlive {
            sent: 5 * SEC,
            done: 5 * SEC + 10 * MS,
            outcome: KaOutcome::Expired,
            node: "n1".into(),
        });
        only(&check(&h), Kind::EarlyExpiry);
    }

    #[test]
    fn a_revoke_is_not_an_early_expiry() {
        let mut h = hist();
        h.leases[0].revoke = Some(Revoke {
            invoke: 5 * SEC,
            done: 5 * SEC + 50 * MS,
            outcome: RevokeOutcome::Revoked,
        });
        h.observations[2] = obs(7 * SEC, 70, &[]);
        h.observations[3] = obs(9 * SEC, 90, &[]);
        h.deletes = vec![
            del("l/a", 52, 5 * SEC + 60 * MS),
            del("l/b", 52, 5 * SEC + 60 * MS),
        ];
        let r = check(&h);
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.revoked, 1);
    }

    #[test]
    fn reports_a_missed_expiry() {
        let mut h = hist();
        // Still there at 11 s, past 4.01 + 4 + 2.
        h.observations[5] = obs(11 * SEC, 110, &[("l/a", 7), ("l/b", 7)]);
        h.deletes.clear();
        only(&check(&h), Kind::MissedExpiry);
        // ... unless PD was down until 8 s: then 8 + 6 + 2 = 16 s.
        h.faults.push(fault(5 * SEC, 8 * SEC, None));
        assert!(check(&h).is_ok());
        // ... but not past that.
        h.observations
            .push(obs(16 * SEC + MS, 160, &[("l/a", 7), ("l/b", 7)]));
        only(&check(&h), Kind::MissedExpiry);
    }

    #[test]
    fn a_lease_not_observed_past_its_late_limit_is_unjudged() {
        let mut h = hist();
        h.observations.truncate(4);
        let r = check(&h);
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.unjudged, 1);
        assert_eq!(r.expired_judged, 0);
    }

    #[test]
    fn reports_a_revoked_key_still_present() {
        let mut h = hist();
        h.leases[0].revoke = Some(Revoke {
            invoke: 5 * SEC,
            done: 5 * SEC + 50 * MS,
            outcome: RevokeOutcome::Revoked,
        });
        h.observations[2] = obs(7 * SEC, 70, &[("l/a", 7), ("l/b", 7)]);
        h.observations[3] = obs(9 * SEC, 90, &[]);
        h.observations[4] = obs(9 * SEC + 500 * MS, 95, &[]);
        h.deletes = vec![
            del("l/a", 80, 8 * SEC + 60 * MS),
            del("l/b", 80, 8 * SEC + 60 * MS),
        ];
        only(&check(&h), Kind::RevokedPresent);
        // A revoke of unknown outcome only makes the lease lapse.
        h.leases[0].revoke.as_mut().unwrap().outcome = RevokeOutcome::Unknown;
        assert!(check(&h).is_ok());
    }

    #[test]
    fn reports_deletes_at_two_revisions() {
        let mut h = hist();
        h.deletes[1].revision = 94;
        only(&check(&h), Kind::NotAtomic);
    }

    #[test]
    fn reports_a_range_holding_part_of_a_lease() {
        let mut h = hist();
        h.observations[3] = obs(9 * SEC, 90, &[("l/b", 7)]);
        only(&check(&h), Kind::NotAtomic);
        // Before every put was acknowledged, part of the keys is expected.
        let mut h = hist();
        h.leases[0].keys[1].done = 3 * SEC;
        h.observations[1] = obs(2 * SEC, 20, &[("l/a", 7)]);
        assert!(check(&h).is_ok(), "{}", check(&h));
    }

    #[test]
    fn reports_a_key_with_another_lease() {
        let mut h = hist();
        h.observations[2] = obs(7 * SEC, 70, &[("l/a", 7), ("l/b", 0)]);
        only(&check(&h), Kind::WrongLease);
    }
}
