//! Linearizability checking for Atoll's chaos tests.
//!
//! A chaos test records a [history](Operation) of client operations (with the
//! wall-clock interval `[invoke_ns, complete_ns]` in which each one ran and
//! what the client saw) and hands it to [`check`], which decides whether the
//! history is consistent with every key being an atomic register;
//! [`lost_writes`] additionally checks the values read after the faults
//! healed. On failure, dump the history with `serde_json` (every type here
//! is `Serialize`/`Deserialize`) and print the [`Report`] (it implements
//! `Display`).
//!
//! # Model
//!
//! Every key is an independent register holding `Option<String>` (`None` =
//! absent), supporting `Get`, `Put`, `Delete` and compare-and-swap (`Cas`).
//! Linearizability is compositional ("P-compositionality"), so each key is
//! checked on its own, and keys are checked in parallel.
//!
//! Time: operation A must be linearized before B iff
//! `A.complete_ns < B.invoke_ns`. Equal timestamps are treated as concurrent
//! (a return at `t` and a call at `t` overlap): the conservative choice, which
//! never turns clock granularity into a false alarm.
//!
//! * [`Outcome::Failed`] operations definitely had no effect and are dropped.
//! * [`Outcome::Unknown`] operations (timeouts, lost connections) may take
//!   effect at any time after their invocation, or never: they are calls
//!   whose return is at +infinity, and the search succeeds once every
//!   *completed* operation is linearized, whatever the Unknown ones did. An
//!   Unknown `Get` carries no information and is dropped; an Unknown `Cas` is
//!   modelled as "swapped" (a failed compare is the same as no effect).
//!
//! # Algorithm
//!
//! Per key we run the Wing & Gong search with the memoisation of Lowe
//! ("Testing for linearizability", 2017), as in Porcupine: the call and return
//! events of the completed operations form a doubly linked list ordered by
//! time. The operations that may take effect next are those whose call
//! precedes the first return in the list (plus Unknown operations invoked no
//! later). The search linearizes one whose precondition holds in the current
//! register value (lifting it out of the list), and backtracks when none is
//! left. A cache of explored configurations — (set of linearized operations
//! as a bitset, register value) — prunes it. Values are interned to `u32`s;
//! bitsets are cached as "number of leading all-ones words + the words up to
//! the last non-zero one", which is small for mostly-sequential histories.
//!
//! On top of that, the following rules shrink the search. Each is sound *and*
//! complete — a key passes with the rule iff it passes without it — and the
//! tests check the whole against an independent brute-force checker.
//!
//! 1. **Unobserved Unknown writes are dropped.** Call an operation X that may
//!    follow an Unknown write W (X does not complete before W is invoked) an
//!    *observer* of W if it could behave differently because the register
//!    holds W's value `w`: a `Get` that returned `w`, a swapping/Unknown `Cas`
//!    expecting `w`, or a failed `Cas` expecting something else. Without
//!    observers, W can be cut out of any linearization (what follows it is a
//!    blind `Put`/`Delete`, or nothing), so it is dropped before the search
//!    ([`KeyReport::unknown_pruned`] counts them), to a fixpoint. The same
//!    happens *during* the search: once all observers of W are linearized,
//!    W is retired and marked in the bitset, so "W happened and was
//!    overwritten" and "W never happened" are one cached configuration.
//! 2. **An Unknown write is only linearized right before an operation that
//!    needs it:** a `Get`/`Cas` observing its value, or a failed `Cas` whose
//!    expected value it just overwrote (any other placement can be rewritten
//!    into this form by dropping the write or moving it later). It is only
//!    tried when such an operation is among the candidates, and the cache key
//!    records the restriction.
//! 3. **Identical operations go in interval order.** Two operations with the
//!    same effect (after rule 7) where one begins and ends no later than the
//!    other can be swapped in any linearization, so the later one is only
//!    tried once the earlier is linearized (e.g. a client's retries of a
//!    timed-out `Put`).
//! 4. **Reads go first.** A `Get` or failed `Cas` that may go next and fits
//!    the current value is linearized at once, without trying alternatives:
//!    moving it to the front of any valid completion keeps it valid.
//! 5. **Value exhaustion.** If a completed operation needs a value (a `Get`
//!    result or a swapping `Cas`'s expected value) that is not current, and
//!    every operation left that writes it is invoked after it completes, the
//!    configuration is a dead end. This cuts wrong branches at once, notably
//!    with unique written values.
//! 6. **Dominance.** A configuration that equals an explored (hence failed)
//!    one except that more Unknown operations are used up has fewer options,
//!    so it fails too.
//! 7. **Unread values are one value.** Values that no operation reads or
//!    compares against can only be told apart by equality tests that never
//!    happen, so they share one id (this makes e.g. writes that are never
//!    read identical for rule 3, and merges cached configurations).
//!
//! # Budget and limits
//!
//! [`CheckOptions::max_states_per_key`] bounds the number of cached
//! configurations per key (each costs a few tens of bytes plus the bitset
//! window); a key that exhausts it is reported as
//! [`KeyResult::Inconclusive`], never as a violation. Linearizability
//! checking is NP-complete: a single key with dozens of operations in flight
//! at all times, few distinct values and many Unknown outcomes can exhaust
//! any budget. Spreading the load over many keys keeps each key cheap.

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

// ---------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------

/// What a client asked the store to do with a key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OpKind {
    /// Read the key.
    Get,
    /// Blindly set the key to the value.
    Put(String),
    /// Blindly remove the key.
    Delete,
    /// Atomically set the key to `new` iff its current value is `expected`.
    /// `expected: None` means "only if absent"; `new: None` means delete.
    Cas {
        /// Value the key must hold for the swap to happen.
        expected: Option<String>,
        /// Value the key is set to if the swap happens.
        new: Option<String>,
    },
}

/// What the client observed when the operation finished.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// A `Get` returned this value (`None` = absent).
    GetOk(Option<String>),
    /// A `Put` was acknowledged.
    PutOk,
    /// A `Delete` was acknowledged.
    DeleteOk,
    /// A `Cas` was acknowledged: `true` = swapped, `false` = the compare
    /// failed and the operation had no effect.
    CasOk(bool),
    /// A `Cas` was acknowledged as not swapped, with the value the key held when it was
    /// compared (`None` = absent): a failed compare that is also a read of that value.
    CasFailed(Option<String>),
    /// The operation definitely had no effect (e.g. rejected before being
    /// proposed). Such operations are ignored by the checker.
    Failed,
    /// Timed out / connection lost: the operation may or may not have taken
    /// effect, at any time after it was invoked. `complete_ns` is ignored.
    Unknown,
}

/// One client operation on one key, as recorded by the test harness.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Operation {
    /// Client (process/thread) that issued the operation. Only used in
    /// reports: no ordering is derived from it.
    pub client: u64,
    /// Key the operation touched.
    pub key: String,
    /// What was requested.
    pub kind: OpKind,
    /// Time the request was sent (any monotonic clock shared by all clients).
    pub invoke_ns: u64,
    /// Time the response was received. Ignored for [`Outcome::Unknown`];
    /// must be `>= invoke_ns` otherwise.
    pub complete_ns: u64,
    /// What the client observed.
    pub outcome: Outcome,
}

impl Operation {
    /// Whether the operation's outcome is [`Outcome::Unknown`].
    pub fn is_unknown(&self) -> bool {
        self.outcome == Outcome::Unknown
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpKind::Get => write!(f, "Get"),
            OpKind::Put(v) => write!(f, "Put({v:?})"),
            OpKind::Delete => write!(f, "Delete"),
            OpKind::Cas { expected, new } => write!(f, "Cas({expected:?} -> {new:?})"),
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_unknown() {
            write!(
                f,
                "client {} [{}..inf) {} {:?} -> Unknown",
                self.client, self.invoke_ns, self.kind, self.key
            )
        } else {
            write!(
                f,
                "client {} [{}..{}] {} {:?} -> {:?}",
                self.client, self.invoke_ns, self.complete_ns, self.kind, self.key, self.outcome
            )
        }
    }
}

/// Verdict for one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyResult {
    /// The key's history is linearizable.
    Ok,
    /// No linearization exists.
    Violation {
        /// Human-readable description of the deepest point the search
        /// reached: the last operations linearized, the register value there
        /// and why none of the possible next operations fits.
        explanation: String,
    },
    /// The checker could not decide: the search budget was exhausted, or the
    /// history is malformed (e.g. a `Put` with outcome `GetOk`).
    Inconclusive {
        /// Why no verdict could be reached.
        reason: String,
    },
}

impl KeyResult {
    /// `true` for [`KeyResult::Ok`].
    pub fn is_ok(&self) -> bool {
        matches!(self, KeyResult::Ok)
    }
    /// `true` for [`KeyResult::Violation`].
    pub fn is_violation(&self) -> bool {
        matches!(self, KeyResult::Violation { .. })
    }
    /// `true` for [`KeyResult::Inconclusive`].
    pub fn is_inconclusive(&self) -> bool {
        matches!(self, KeyResult::Inconclusive { .. })
    }
}

/// Result of checking one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyReport {
    /// The key.
    pub key: String,
    /// Number of operations on this key in the history (all outcomes).
    pub ops: usize,
    /// Unknown-outcome operations that were removed before the search
    /// because they cannot matter (Unknown `Get`s, no-op `Cas`es, writes
    /// whose value nothing observes afterwards).
    pub unknown_pruned: usize,
    /// Configurations cached by the search (a measure of its cost).
    pub states_explored: usize,
    /// The verdict.
    pub result: KeyResult,
}

/// Result of [`check`]: one [`KeyReport`] per key, sorted by key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Per-key results, sorted by key.
    pub keys: Vec<KeyReport>,
}

impl Report {
    /// Keys whose history is not linearizable.
    pub fn violations(&self) -> Vec<&KeyReport> {
        self.keys
            .iter()
            .filter(|k| k.result.is_violation())
            .collect()
    }

    /// Keys the checker could not decide (budget exhausted, malformed).
    pub fn inconclusive(&self) -> Vec<&KeyReport> {
        self.keys
            .iter()
            .filter(|k| k.result.is_inconclusive())
            .collect()
    }

    /// No key has a violation. Inconclusive keys do not count against this:
    /// check [`Report::inconclusive`] separately.
    pub fn is_linearizable(&self) -> bool {
        self.keys.iter().all(|k| !k.result.is_violation())
    }

    /// Total number of operations over all keys.
    pub fn total_ops(&self) -> usize {
        self.keys.iter().map(|k| k.ops).sum()
    }

    /// The report for `key`, if the key occurred.
    pub fn key(&self, key: &str) -> Option<&KeyReport> {
        self.keys
            .binary_search_by(|k| k.key.as_str().cmp(key))
            .ok()
            .map(|i| &self.keys[i])
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let violations = self.violations();
        let inconclusive = self.inconclusive();
        writeln!(
            f,
            "linearizability: {} ops on {} keys; {} keys violate linearizability, {} inconclusive",
            self.total_ops(),
            self.keys.len(),
            violations.len(),
            inconclusive.len()
        )?;
        for k in violations {
            if let KeyResult::Violation { explanation } = &k.result {
                writeln!(f, "VIOLATION on key {:?}:\n{explanation}", k.key)?;
            }
        }
        for k in inconclusive {
            if let KeyResult::Inconclusive { reason } = &k.result {
                writeln!(f, "INCONCLUSIVE on key {:?}: {reason}", k.key)?;
            }
        }
        Ok(())
    }
}

/// Options for [`check`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckOptions {
    /// Value of every key before the history starts (default `None`).
    pub initial: Option<String>,
    /// Search budget: maximum number of cached configurations per key
    /// before the key is reported [`KeyResult::Inconclusive`]. `0` means
    /// unlimited. Default 5,000,000.
    pub max_states_per_key: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            initial: None,
            max_states_per_key: 5_000_000,
        }
    }
}

/// Checks every key of `history` for linearizability (see the module docs).
/// The order of `history` does not matter.
pub fn check(history: &[Operation], opts: &CheckOptions) -> Report {
    run_check(group_by_key(history, &[]), opts)
}

/// Like [`check`], but every key in `final_values` is extended with one
/// final `Get` at +infinity (after every operation, including Unknown ones,
/// has settled) that returned the given value. A key that appears only in
/// `final_values` is checked against [`CheckOptions::initial`].
pub fn check_with_final_values(
    history: &[Operation],
    final_values: &HashMap<String, Option<String>>,
    opts: &CheckOptions,
) -> Report {
    let finals: Vec<Operation> = final_values
        .iter()
        .map(|(key, value)| Operation {
            client: u64::MAX,
            key: key.clone(),
            kind: OpKind::Get,
            invoke_ns: u64::MAX,
            complete_ns: u64::MAX,
            outcome: Outcome::GetOk(value.clone()),
        })
        .collect();
    run_check(group_by_key(history, &finals), opts)
}

/// Keys (sorted) whose final value — read after all faults healed and all
/// operations settled — cannot be explained by the history: the key's
/// history extended with a final `Get` at +infinity returning that value is
/// not linearizable. This is how acknowledged writes that were lost are
/// found. Only keys in `final_values` are considered. Uses
/// [`CheckOptions::default`]; keys whose check is inconclusive are not
/// reported: use [`check_with_final_values`] for the full report.
///
/// Note that a key whose history is non-linearizable even without the final
/// read is reported too.
pub fn lost_writes(
    history: &[Operation],
    final_values: &HashMap<String, Option<String>>,
) -> Vec<String> {
    let report = check_with_final_values(history, final_values, &CheckOptions::default());
    let mut keys: Vec<String> = report
        .keys
        .into_iter()
        .filter(|k| k.result.is_violation() && final_values.contains_key(&k.key))
        .map(|k| k.key)
        .collect();
    keys.sort();
    keys
}

// ---------------------------------------------------------------------------
// Driver: grouping by key, parallelism
// ---------------------------------------------------------------------------

/// Index used for the synthetic final read of [`check_with_final_values`].
const FINAL_READ: usize = usize::MAX;

/// `(index in the history, operation)` for one key.
type KeyOps<'a> = Vec<(usize, &'a Operation)>;

fn group_by_key<'a>(
    history: &'a [Operation],
    finals: &'a [Operation],
) -> Vec<(&'a str, KeyOps<'a>)> {
    let mut by_key: HashMap<&'a str, KeyOps<'a>> = HashMap::new();
    for (i, op) in history.iter().enumerate() {
        by_key.entry(op.key.as_str()).or_default().push((i, op));
    }
    for op in finals {
        by_key
            .entry(op.key.as_str())
            .or_default()
            .push((FINAL_READ, op));
    }
    by_key.into_iter().collect()
}

fn run_check(mut groups: Vec<(&str, KeyOps<'_>)>, opts: &CheckOptions) -> Report {
    // Biggest keys first, so that one huge key does not start last.
    groups.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(b.0)));
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(groups.len())
        .max(1);
    let mut keys: Vec<KeyReport> = if threads == 1 {
        groups
            .iter()
            .map(|(key, ops)| check_key(key, ops, opts))
            .collect()
    } else {
        let next = AtomicUsize::new(0);
        let results: Vec<Mutex<Option<KeyReport>>> =
            groups.iter().map(|_| Mutex::new(None)).collect();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((key, ops)) = groups.get(i) else {
                        break;
                    };
                    let report = check_key(key, ops, opts);
                    *results[i].lock().unwrap() = Some(report);
                });
            }
        });
        results
            .into_iter()
            .map(|r| r.into_inner().unwrap().expect("every key is checked"))
            .collect()
    };
    keys.sort_by(|a, b| a.key.cmp(&b.key));
    Report { keys }
}

// ---------------------------------------------------------------------------
// Per-key preparation
// ---------------------------------------------------------------------------

const NIL: u32 = u32::MAX;
/// `restrict` value meaning "the last step was not an Unknown write".
const UNRESTRICTED: u32 = u32::MAX;

/// An operation's effect on the register, with values interned (0 = absent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Step {
    /// Valid iff the value is `.0`; no change.
    Read(u32),
    /// Always valid; sets the value (Put, Delete).
    Write(u32),
    /// Valid iff the value is `exp`; sets it to `new`.
    Cas { exp: u32, new: u32 },
    /// A failed compare: valid iff the value is not `exp`; no change.
    CasFail { exp: u32 },
}

impl Step {
    fn apply(self, value: u32) -> Option<u32> {
        match self {
            Step::Read(v) => (value == v).then_some(value),
            Step::Write(v) => Some(v),
            Step::Cas { exp, new } => (value == exp).then_some(new),
            Step::CasFail { exp } => (value != exp).then_some(value),
        }
    }

    /// Value this step writes, if it writes.
    fn written(self) -> Option<u32> {
        match self {
            Step::Write(v) | Step::Cas { new: v, .. } => Some(v),
            Step::Read(_) | Step::CasFail { .. } => None,
        }
    }

    /// Value whose presence this step requires, if any (a "strong" observer).
    fn requires(self) -> Option<u32> {
        match self {
            Step::Read(v) | Step::Cas { exp: v, .. } => Some(v),
            Step::Write(_) | Step::CasFail { .. } => None,
        }
    }

    /// May this step immediately follow an Unknown write that changed the
    /// value from `before` to `value` (rule 2 of the module docs)?
    fn may_follow_unknown(self, value: u32, before: u32) -> bool {
        match self {
            Step::Read(v) | Step::Cas { exp: v, .. } => v == value,
            Step::CasFail { exp } => exp == before,
            Step::Write(_) => false,
        }
    }
}

/// A normalized operation of one key.
#[derive(Clone, Debug)]
struct KOp<'a> {
    op: &'a Operation,
    /// Index in the caller's history ([`FINAL_READ`] for the synthetic read).
    orig: usize,
    invoke: u64,
    /// `u64::MAX` for Unknown operations.
    complete: u64,
    unknown: bool,
    step: Step,
}

struct Prepared<'a> {
    ops: Vec<KOp<'a>>,
    /// Interned values: `values[id]` (see [`Interner`]).
    values: Vec<Option<&'a str>>,
    initial: u32,
    initial_value: Option<&'a str>,
    unknown_pruned: usize,
}

/// Interns register values to `u32` ids (rule 7). Values that no operation ever
/// reads or compares against (never a `Get` result nor a `Cas` expected
/// value) cannot influence any outcome, so they all share the id
/// [`UNREAD`]: the register semantics only ever test the value for equality
/// with such "mentioned" values, so the abstraction is exact. It makes
/// e.g. all Unknown writes of never-read unique values identical (rule 3).
struct Interner<'a> {
    mentioned: HashSet<Option<&'a str>>,
    ids: HashMap<Option<&'a str>, u32>,
    /// `values[id]`; `values[UNREAD]` is a placeholder.
    values: Vec<Option<&'a str>>,
}

/// Id shared by all values that no operation reads or compares against.
const UNREAD: u32 = 0;

impl<'a> Interner<'a> {
    fn new(mentioned: HashSet<Option<&'a str>>) -> Self {
        Interner {
            mentioned,
            ids: HashMap::new(),
            values: vec![None],
        }
    }

    fn id(&mut self, v: Option<&'a str>) -> u32 {
        if !self.mentioned.contains(&v) {
            return UNREAD;
        }
        *self.ids.entry(v).or_insert_with(|| {
            self.values.push(v);
            (self.values.len() - 1) as u32
        })
    }
}

fn describe(orig: usize, op: &Operation) -> String {
    if orig == FINAL_READ {
        format!("final read (after healing) -> {:?}", op.outcome)
    } else {
        format!("#{orig} {op}")
    }
}

/// Validates and normalizes one key's operations, drops the ones that cannot
/// matter, and sorts the rest by invocation time.
fn prepare<'a>(
    entries: &[(usize, &'a Operation)],
    initial: Option<&'a str>,
) -> Result<Prepared<'a>, String> {
    let mut mentioned = HashSet::new();
    for &(_, op) in entries {
        match (&op.kind, &op.outcome) {
            (_, Outcome::Failed) => {}
            (OpKind::Get, Outcome::GetOk(v)) => {
                mentioned.insert(v.as_deref());
            }
            (OpKind::Cas { expected, .. }, Outcome::CasOk(_) | Outcome::Unknown) => {
                mentioned.insert(expected.as_deref());
            }
            (OpKind::Cas { .. }, Outcome::CasFailed(current)) => {
                mentioned.insert(current.as_deref());
            }
            _ => {}
        }
    }
    let mut interner = Interner::new(mentioned);
    let initial_value = initial;
    let initial = interner.id(initial);
    let mut ops = Vec::with_capacity(entries.len());
    let mut unknown_pruned = 0;
    for &(orig, op) in entries {
        let o = &op.outcome;
        let (step, unknown) = match (&op.kind, o) {
            (_, Outcome::Failed) => continue,
            (OpKind::Get, Outcome::Unknown) => {
                unknown_pruned += 1;
                continue;
            }
            (OpKind::Get, Outcome::GetOk(v)) => (Step::Read(interner.id(v.as_deref())), false),
            (OpKind::Put(v), Outcome::PutOk | Outcome::Unknown) => (
                Step::Write(interner.id(Some(v.as_str()))),
                *o == Outcome::Unknown,
            ),
            (OpKind::Delete, Outcome::DeleteOk | Outcome::Unknown) => {
                (Step::Write(interner.id(None)), *o == Outcome::Unknown)
            }
            (OpKind::Cas { expected, new }, Outcome::CasOk(swapped)) => {
                let exp = interner.id(expected.as_deref());
                if *swapped {
                    let new = interner.id(new.as_deref());
                    (Step::Cas { exp, new }, false)
                } else {
                    (Step::CasFail { exp }, false)
                }
            }
            (OpKind::Cas { expected, .. }, Outcome::CasFailed(current)) => {
                if current == expected {
                    return Err(format!(
                        "{}: not swapped, yet the current value it reports is the expected one",
                        describe(orig, op)
                    ));
                }
                (Step::Read(interner.id(current.as_deref())), false)
            }
            (OpKind::Cas { expected, new }, Outcome::Unknown) => {
                if expected == new {
                    // Swapping a value for itself changes nothing.
                    unknown_pruned += 1;
                    continue;
                }
                let exp = interner.id(expected.as_deref());
                let new = interner.id(new.as_deref());
                (Step::Cas { exp, new }, true)
            }
            _ => {
                return Err(format!(
                    "{}: outcome does not match the operation kind",
                    describe(orig, op)
                ))
            }
        };
        if !unknown && op.complete_ns < op.invoke_ns {
            return Err(format!(
                "{}: completes before it is invoked",
                describe(orig, op)
            ));
        }
        ops.push(KOp {
            op,
            orig,
            invoke: op.invoke_ns,
            complete: if unknown { u64::MAX } else { op.complete_ns },
            unknown,
            step,
        });
    }
    ops.sort_by_key(|a| (a.invoke, a.complete, a.orig));
    let (ops, pruned) = prune_unobserved_unknown(ops);
    Ok(Prepared {
        ops,
        values: interner.values,
        initial,
        initial_value,
        unknown_pruned: unknown_pruned + pruned,
    })
}

/// The "observer" relation of rule 1 (module docs): for every Unknown write
/// W, the operations that may follow W and could behave differently because
/// the register holds W's value. Returns `watchers[x]` = the Unknown writes
/// that operation `x` observes, and `count[w]` = number of observers of `w`.
fn observer_relation(ops: &[KOp<'_>]) -> (Vec<Vec<u32>>, Vec<u32>) {
    let mut strong: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut failed_cas: Vec<u32> = Vec::new();
    for (i, o) in ops.iter().enumerate() {
        if let Some(v) = o.step.requires() {
            strong.entry(v).or_default().push(i as u32);
        } else if let Step::CasFail { .. } = o.step {
            failed_cas.push(i as u32);
        }
    }
    let mut watchers = vec![Vec::new(); ops.len()];
    let mut count = vec![0u32; ops.len()];
    for (wi, w) in ops.iter().enumerate() {
        if !w.unknown {
            continue;
        }
        let value = w.step.written().expect("Unknown operations are writes");
        let may_follow = |x: u32| x as usize != wi && ops[x as usize].complete >= w.invoke;
        for &x in strong.get(&value).into_iter().flatten() {
            if may_follow(x) {
                watchers[x as usize].push(wi as u32);
                count[wi] += 1;
            }
        }
        for &x in &failed_cas {
            if may_follow(x) && ops[x as usize].step != (Step::CasFail { exp: value }) {
                watchers[x as usize].push(wi as u32);
                count[wi] += 1;
            }
        }
    }
    (watchers, count)
}

/// Rule 1 (module docs) applied before the search: drops, to a fixpoint,
/// every Unknown write that has no observer. Returns the remaining
/// operations (order preserved) and how many were dropped.
fn prune_unobserved_unknown(ops: Vec<KOp<'_>>) -> (Vec<KOp<'_>>, usize) {
    let (watchers, mut count) = observer_relation(&ops);
    let mut dropped = vec![false; ops.len()];
    let mut work: Vec<usize> = (0..ops.len())
        .filter(|&i| ops[i].unknown && count[i] == 0)
        .collect();
    for &i in &work {
        dropped[i] = true;
    }
    while let Some(x) = work.pop() {
        for &w in &watchers[x] {
            let w = w as usize;
            count[w] -= 1;
            if count[w] == 0 && !dropped[w] {
                dropped[w] = true;
                work.push(w);
            }
        }
    }
    let n_dropped = dropped.iter().filter(|&&d| d).count();
    let kept = ops
        .into_iter()
        .zip(dropped)
        .filter(|(_, d)| !d)
        .map(|(o, _)| o)
        .collect();
    (kept, n_dropped)
}

// ---------------------------------------------------------------------------
// Per-key check
// ---------------------------------------------------------------------------

fn check_key(key: &str, entries: &[(usize, &Operation)], opts: &CheckOptions) -> KeyReport {
    let ops_count = entries.iter().filter(|(i, _)| *i != FINAL_READ).count();
    let mut report = KeyReport {
        key: key.to_string(),
        ops: ops_count,
        unknown_pruned: 0,
        states_explored: 0,
        result: KeyResult::Ok,
    };
    let prepared = match prepare(entries, opts.initial.as_deref()) {
        Ok(p) => p,
        Err(msg) => {
            report.result = KeyResult::Inconclusive {
                reason: format!("malformed history: {msg}"),
            };
            return report;
        }
    };
    report.unknown_pruned = prepared.unknown_pruned;
    let max_states = if opts.max_states_per_key == 0 {
        usize::MAX
    } else {
        opts.max_states_per_key
    };
    let mut search = Search::new(&prepared, max_states);
    let outcome = search.run();
    report.states_explored = search.memo.len();
    report.result = match outcome {
        SearchOutcome::Linearizable => KeyResult::Ok,
        SearchOutcome::BudgetExhausted => KeyResult::Inconclusive {
            reason: format!(
                "search budget of {} states exhausted (deepest point: {} of {} completed operations linearized)",
                opts.max_states_per_key, search.best, search.completed_total
            ),
        },
        SearchOutcome::NotLinearizable => {
            if search.snapshot.is_none() {
                search.take_snapshot();
            }
            KeyResult::Violation {
                explanation: search.explain(key, entries),
            }
        }
    };
    report
}

/// Bitset of "linearized or retired" operations, tracking the first word
/// that is not all ones (`lead`) and one past the last non-zero word (`end`)
/// so that the cache key can store only the window in between.
struct Bits {
    words: Vec<u64>,
    lead: usize,
    end: usize,
}

impl Bits {
    fn new(n: usize) -> Self {
        Bits {
            // One spare word so that `lead` always finds a non-full word.
            words: vec![0; n / 64 + 1],
            lead: 0,
            end: 0,
        }
    }

    fn get(&self, i: u32) -> bool {
        self.words[i as usize / 64] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, i: u32) {
        let w = i as usize / 64;
        self.words[w] |= 1 << (i % 64);
        if w == self.lead {
            while self.words[self.lead] == u64::MAX {
                self.lead += 1;
            }
        }
        self.end = self.end.max(w + 1);
    }

    fn clear(&mut self, i: u32) {
        let w = i as usize / 64;
        self.words[w] &= !(1 << (i % 64));
        self.lead = self.lead.min(w);
        if w + 1 == self.end {
            while self.end > 0 && self.words[self.end - 1] == 0 {
                self.end -= 1;
            }
        }
    }

    fn window(&self) -> &[u64] {
        if self.end > self.lead {
            &self.words[self.lead..self.end]
        } else {
            &[]
        }
    }
}

/// Pass-through hasher for keys that are already well-mixed hashes.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = x;
    }
}

fn mix(h: u64, x: u64) -> u64 {
    (h.rotate_left(5) ^ x).wrapping_mul(0x517C_C1B7_2722_0A95)
}

fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^ (h >> 33)
}

/// A bitset stored in the memo arena: `lead` all-ones words, then the `len`
/// words at `off`, then zeros.
#[derive(Clone, Copy)]
struct Packed {
    lead: u32,
    len: u32,
    off: usize,
}

struct MemoEntry {
    next: u32,
    state: u32,
    restrict: u32,
    /// Fully explored (and so failed).
    done: bool,
    completed: Packed,
    unknown: Packed,
}

/// The cache of explored configurations: (completed operations linearized,
/// Unknown operations unavailable (linearized or retired), value,
/// restriction). Entries live in flat arrays, chained per hash of
/// everything but the Unknown part.
///
/// Besides exact matches it prunes *dominated* configurations (rule 6): one that
/// equals a fully explored (failed) configuration except that more Unknown
/// operations are unavailable has a subset of its completions, so it fails
/// too. Only fully explored configurations are used for this, never ones
/// still on the search path.
#[derive(Default)]
struct Memo {
    heads: HashMap<u64, u32, BuildHasherDefault<IdHasher>>,
    entries: Vec<MemoEntry>,
    words: Vec<u64>,
}

impl Memo {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn words(&self, p: Packed) -> &[u64] {
        &self.words[p.off..p.off + p.len as usize]
    }

    fn equal(&self, p: Packed, bits: &Bits) -> bool {
        p.lead as usize == bits.lead && self.words(p) == bits.window()
    }

    /// Is the packed set a subset of `bits`?
    fn subset(&self, p: Packed, bits: &Bits) -> bool {
        let lead = p.lead as usize;
        lead <= bits.lead
            && self
                .words(p)
                .iter()
                .zip(&bits.words[lead..])
                .all(|(&w, &b)| w & !b == 0)
    }

    fn pack(&mut self, bits: &Bits) -> Packed {
        let window = bits.window();
        let p = Packed {
            lead: bits.lead as u32,
            len: window.len() as u32,
            off: self.words.len(),
        };
        self.words.extend_from_slice(window);
        p
    }

    /// Inserts the configuration and returns its index, or `None` if it was
    /// already explored or is dominated by a fully explored one.
    fn insert(
        &mut self,
        completed: &Bits,
        unknown: &Bits,
        state: u32,
        restrict: u32,
    ) -> Option<u32> {
        let mut h = mix(
            mix(mix(0, completed.lead as u64), u64::from(state)),
            u64::from(restrict),
        );
        for &w in completed.window() {
            h = mix(h, w);
        }
        let h = fmix64(h);
        let head = self.heads.get(&h).copied().unwrap_or(NIL);
        let mut cur = head;
        while cur != NIL {
            let e = &self.entries[cur as usize];
            if e.state == state
                && e.restrict == restrict
                && self.equal(e.completed, completed)
                && (self.equal(e.unknown, unknown) || (e.done && self.subset(e.unknown, unknown)))
            {
                return None;
            }
            cur = e.next;
        }
        let idx = u32::try_from(self.entries.len()).expect("memo too large");
        let completed = self.pack(completed);
        let unknown = self.pack(unknown);
        self.entries.push(MemoEntry {
            next: head,
            state,
            restrict,
            done: false,
            completed,
            unknown,
        });
        self.heads.insert(h, idx);
        Some(idx)
    }

    /// Marks a configuration as fully explored.
    fn finish(&mut self, idx: u32) {
        self.entries[idx as usize].done = true;
    }
}

/// The candidates of one configuration on the search path:
/// `cands[start..end]`, of which those before `next` were tried.
struct Level {
    start: usize,
    next: usize,
    end: usize,
}

struct Frame {
    op: u32,
    memo: u32,
    prev_state: u32,
    prev_restrict: u32,
    trail_len: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CandidateStatus {
    /// Its precondition fails in the current value.
    Inapplicable,
    /// Rule 2: does not observe the Unknown write just linearized.
    DoesNotFollowUnknown,
    /// Rule 3: an identical earlier operation is tried first.
    IdenticalEarlier,
    /// An Unknown write that would not change the value.
    NoChange,
    /// Could be linearized here, but every continuation fails.
    DeadEnd,
}

/// The deepest dead end of a failed search, for the explanation.
struct Snapshot {
    progress: usize,
    /// The register value, spelled out (interned values may be [`UNREAD`]).
    value: String,
    restrict: u32,
    recent: Vec<u32>,
    depth: usize,
    blocking: Option<u32>,
    candidates: Vec<(u32, CandidateStatus)>,
    /// A completed operation whose value can never come back (see
    /// [`Search::refresh`]), with that value.
    starved: Option<(u32, u32)>,
}

enum SearchOutcome {
    Linearizable,
    NotLinearizable,
    BudgetExhausted,
}

const RECENT_SHOWN: usize = 12;
const CANDIDATES_SHOWN: usize = 24;

/// WGL search over one key. Completed operations have a call and a return
/// node in the event list (`ev_*`, node 0 = head); Unknown operations have
/// only a call, kept in a separate list (`uk_*`, indexed by operation, head
/// = `ops.len()`) ordered by invocation, so that at each step the completed
/// candidates are tried before the Unknown ones.
struct Search<'p, 'a> {
    p: &'p Prepared<'a>,
    ev_next: Vec<u32>,
    ev_prev: Vec<u32>,
    ev_op: Vec<u32>,
    ev_ret: Vec<bool>,
    ev_time: Vec<u64>,
    call_node: Vec<u32>,
    ret_node: Vec<u32>,
    uk_next: Vec<u32>,
    uk_prev: Vec<u32>,
    uk_head: u32,
    /// Operations linearized or retired: completed ones in `cbits`, Unknown
    /// ones in `ubits`, at index `sub[op]`.
    cbits: Bits,
    ubits: Bits,
    sub: Vec<u32>,
    watchers: Vec<Vec<u32>>,
    /// Per Unknown write: observers neither linearized nor retired.
    obs_count: Vec<u32>,
    /// The operation that must be linearized (or retired) first by rule 3,
    /// or NIL.
    prev_identical: Vec<u32>,
    state: u32,
    restrict: u32,
    remaining: usize,
    completed_total: usize,
    /// Operations removed from the lists (linearized or retired), in order.
    trail: Vec<u32>,
    work: Vec<u32>,
    /// Per value: the completed operations that need it (`Get` results,
    /// swapping `Cas` expected values), by completion time, and the index
    /// of the first one not linearized yet.
    readers: Vec<Vec<u32>>,
    readers_head: Vec<usize>,
    /// Per value: the operations that write it, by invocation time, and the
    /// index of the first one still available.
    writers: Vec<Vec<u32>>,
    writers_head: Vec<usize>,
    /// Per operation: its index in `readers` / `writers` of its value.
    reader_pos: Vec<u32>,
    writer_pos: Vec<u32>,
    /// Per value: needed but impossible (see [`Search::refresh`]).
    starved_flag: Vec<bool>,
    /// Number of starved values; a configuration with any is a dead end.
    starved: usize,
    /// Values whose starvation must be re-evaluated.
    dirty: Vec<u32>,
    /// Candidate lists of the configurations on the search path.
    cands: Vec<u32>,
    /// Scratch for [`Search::push_candidates`].
    wanted: Vec<u32>,
    followers: Vec<u32>,
    frames: Vec<Frame>,
    memo: Memo,
    max_states: usize,
    best: usize,
    snap_pending: bool,
    snapshot: Option<Snapshot>,
}

impl<'p, 'a> Search<'p, 'a> {
    fn new(p: &'p Prepared<'a>, max_states: usize) -> Self {
        let ops = &p.ops;
        let n = ops.len();
        let mut events: Vec<(u64, bool, u32)> = Vec::new();
        for (i, o) in ops.iter().enumerate() {
            if !o.unknown {
                events.push((o.invoke, false, i as u32));
                events.push((o.complete, true, i as u32));
            }
        }
        // Calls sort before returns at equal times: equal timestamps overlap.
        events.sort_unstable();
        let m = events.len();
        let mut s = Search {
            p,
            ev_next: (1..=m as u32).chain([NIL]).collect(),
            ev_prev: [NIL].into_iter().chain(0..m as u32).collect(),
            ev_op: vec![NIL; m + 1],
            ev_ret: vec![false; m + 1],
            ev_time: vec![0; m + 1],
            call_node: vec![NIL; n],
            ret_node: vec![NIL; n],
            uk_next: vec![NIL; n + 1],
            uk_prev: vec![NIL; n + 1],
            uk_head: n as u32,
            cbits: Bits::new(n),
            ubits: Bits::new(n),
            sub: Vec::with_capacity(n),
            watchers: Vec::new(),
            obs_count: Vec::new(),
            prev_identical: vec![NIL; n],
            state: p.initial,
            restrict: UNRESTRICTED,
            remaining: m / 2,
            completed_total: m / 2,
            trail: Vec::new(),
            work: Vec::new(),
            readers: vec![Vec::new(); p.values.len()],
            readers_head: vec![0; p.values.len()],
            writers: vec![Vec::new(); p.values.len()],
            writers_head: vec![0; p.values.len()],
            reader_pos: vec![NIL; n],
            writer_pos: vec![NIL; n],
            starved_flag: vec![false; p.values.len()],
            starved: 0,
            dirty: Vec::new(),
            cands: Vec::new(),
            wanted: Vec::new(),
            followers: Vec::new(),
            frames: Vec::new(),
            memo: Memo::default(),
            max_states,
            best: 0,
            snap_pending: false,
            snapshot: None,
        };
        for (k, &(t, ret, op)) in events.iter().enumerate() {
            let node = k + 1;
            s.ev_op[node] = op;
            s.ev_ret[node] = ret;
            s.ev_time[node] = t;
            if ret {
                s.ret_node[op as usize] = node as u32;
            } else {
                s.call_node[op as usize] = node as u32;
            }
        }
        let mut last = s.uk_head;
        let mut identical: HashMap<(Step, bool), Vec<u32>> = HashMap::new();
        for (i, o) in ops.iter().enumerate() {
            if o.unknown {
                s.uk_next[last as usize] = i as u32;
                s.uk_prev[i] = last;
                last = i as u32;
            }
            // Rule 3: the latest earlier identical operation whose
            // interval also ends no later (ops are sorted by invocation).
            let class = identical.entry((o.step, o.unknown)).or_default();
            if let Some(&prev) = class
                .iter()
                .rev()
                .take(16)
                .find(|&&j| ops[j as usize].complete <= o.complete)
            {
                s.prev_identical[i] = prev;
            }
            class.push(i as u32);
        }
        let (mut nc, mut nu) = (0, 0);
        for o in ops {
            let counter = if o.unknown { &mut nu } else { &mut nc };
            s.sub.push(*counter);
            *counter += 1;
        }
        s.cbits = Bits::new(nc as usize);
        s.ubits = Bits::new(nu as usize);
        for (i, o) in ops.iter().enumerate() {
            if let (Some(v), false) = (o.step.requires(), o.unknown) {
                s.readers[v as usize].push(i as u32);
            }
            // Ops are sorted by invocation already.
            if let Some(v) = o.step.written() {
                s.writer_pos[i] = s.writers[v as usize].len() as u32;
                s.writers[v as usize].push(i as u32);
            }
        }
        for list in &mut s.readers {
            list.sort_by_key(|&r| (ops[r as usize].complete, r));
            for (pos, &r) in list.iter().enumerate() {
                s.reader_pos[r as usize] = pos as u32;
            }
        }
        for v in 0..p.values.len() as u32 {
            s.refresh(v);
        }
        let (watchers, count) = observer_relation(ops);
        s.watchers = watchers;
        s.obs_count = count;
        s
    }

    fn is_removed(&self, op: u32) -> bool {
        let bits = if self.p.ops[op as usize].unknown {
            &self.ubits
        } else {
            &self.cbits
        };
        bits.get(self.sub[op as usize])
    }

    fn mark_removed(&mut self, op: u32, removed: bool) {
        let o = &self.p.ops[op as usize];
        let sub = self.sub[op as usize];
        let bits = if o.unknown {
            &mut self.ubits
        } else {
            &mut self.cbits
        };
        if removed {
            bits.set(sub);
        } else {
            bits.clear(sub);
        }
        let (requires, written, unknown) = (o.step.requires(), o.step.written(), o.unknown);
        if let (Some(v), false) = (requires, unknown) {
            let pos = self.reader_pos[op as usize] as usize;
            let v = v as usize;
            if !removed {
                self.readers_head[v] = self.readers_head[v].min(pos);
            } else if pos == self.readers_head[v] {
                let mut head = pos;
                while head < self.readers[v].len() && self.is_removed(self.readers[v][head]) {
                    head += 1;
                }
                self.readers_head[v] = head;
            }
            self.dirty.push(v as u32);
        }
        if let Some(v) = written {
            let pos = self.writer_pos[op as usize] as usize;
            let v = v as usize;
            if !removed {
                self.writers_head[v] = self.writers_head[v].min(pos);
            } else if pos == self.writers_head[v] {
                let mut head = pos;
                while head < self.writers[v].len() && self.is_removed(self.writers[v][head]) {
                    head += 1;
                }
                self.writers_head[v] = head;
            }
            self.dirty.push(v as u32);
        }
    }

    /// Rule 5, value exhaustion: a value is *starved* when it is not the
    /// current value and some completed operation R that needs it completes
    /// before every operation left that could write it is invoked: R can
    /// never be linearized, so the configuration is a dead end. (It suffices
    /// to look at the reader that completes first and the writer invoked
    /// first.)
    fn refresh(&mut self, v: u32) {
        let i = v as usize;
        let starved = self.state != v
            && match self.readers[i].get(self.readers_head[i]) {
                None => false,
                Some(&r) => match self.writers[i].get(self.writers_head[i]) {
                    None => true,
                    Some(&w) => self.p.ops[w as usize].invoke > self.p.ops[r as usize].complete,
                },
            };
        if starved != self.starved_flag[i] {
            self.starved_flag[i] = starved;
            if starved {
                self.starved += 1;
            } else {
                self.starved -= 1;
            }
        }
    }

    fn refresh_dirty(&mut self) {
        while let Some(v) = self.dirty.pop() {
            self.refresh(v);
        }
    }

    fn progress(&self) -> usize {
        self.completed_total - self.remaining
    }

    fn lift(&mut self, op: u32) {
        if self.p.ops[op as usize].unknown {
            let (prev, next) = (self.uk_prev[op as usize], self.uk_next[op as usize]);
            self.uk_next[prev as usize] = next;
            if next != NIL {
                self.uk_prev[next as usize] = prev;
            }
        } else {
            for node in [self.call_node[op as usize], self.ret_node[op as usize]] {
                let (prev, next) = (self.ev_prev[node as usize], self.ev_next[node as usize]);
                self.ev_next[prev as usize] = next;
                if next != NIL {
                    self.ev_prev[next as usize] = prev;
                }
            }
        }
    }

    /// Exact inverse of [`Search::lift`] (undone in LIFO order).
    fn unlift(&mut self, op: u32) {
        if self.p.ops[op as usize].unknown {
            let (prev, next) = (self.uk_prev[op as usize], self.uk_next[op as usize]);
            self.uk_next[prev as usize] = op;
            if next != NIL {
                self.uk_prev[next as usize] = op;
            }
        } else {
            for node in [self.ret_node[op as usize], self.call_node[op as usize]] {
                let (prev, next) = (self.ev_prev[node as usize], self.ev_next[node as usize]);
                self.ev_next[prev as usize] = node;
                if next != NIL {
                    self.ev_prev[next as usize] = node;
                }
            }
        }
    }

    /// Removes `op` from the pool (it is being linearized) and retires every
    /// Unknown write left without observers as a consequence (rule 1).
    fn remove(&mut self, op: u32) {
        self.trail.push(op);
        self.mark_removed(op, true);
        self.lift(op);
        self.work.push(op);
        while let Some(x) = self.work.pop() {
            let watchers = std::mem::take(&mut self.watchers[x as usize]);
            for &w in &watchers {
                self.obs_count[w as usize] -= 1;
                if self.obs_count[w as usize] == 0 && !self.is_removed(w) {
                    self.trail.push(w);
                    self.mark_removed(w, true);
                    self.lift(w);
                    self.work.push(w);
                }
            }
            self.watchers[x as usize] = watchers;
        }
    }

    fn undo(&mut self, frame: &Frame) {
        while self.trail.len() > frame.trail_len {
            let x = self.trail.pop().expect("trail is longer than trail_len");
            for &w in &self.watchers[x as usize] {
                self.obs_count[w as usize] += 1;
            }
            self.unlift(x);
            self.mark_removed(x, false);
        }
        self.dirty.push(self.state);
        self.dirty.push(frame.prev_state);
        self.state = frame.prev_state;
        self.restrict = frame.prev_restrict;
        if !self.p.ops[frame.op as usize].unknown {
            self.remaining += 1;
        }
        self.refresh_dirty();
    }

    fn status(&self, op: u32) -> Option<CandidateStatus> {
        let o = &self.p.ops[op as usize];
        let prev = self.prev_identical[op as usize];
        if prev != NIL && !self.is_removed(prev) {
            return Some(CandidateStatus::IdenticalEarlier);
        }
        if self.restrict != UNRESTRICTED && !o.step.may_follow_unknown(self.state, self.restrict) {
            return Some(CandidateStatus::DoesNotFollowUnknown);
        }
        match o.step.apply(self.state) {
            None => Some(CandidateStatus::Inapplicable),
            Some(next) if o.unknown && next == self.state => Some(CandidateStatus::NoChange),
            Some(_) => None,
        }
    }

    /// Tries to linearize `op` next; on success pushes a frame.
    fn try_push(&mut self, op: u32) -> bool {
        let o = &self.p.ops[op as usize];
        let unknown = o.unknown;
        let Some(next) = o.step.apply(self.state) else {
            return false;
        };
        let mut frame = Frame {
            op,
            memo: NIL,
            prev_state: self.state,
            prev_restrict: self.restrict,
            trail_len: self.trail.len(),
        };
        self.remove(op);
        self.dirty.push(self.state);
        self.dirty.push(next);
        self.state = next;
        self.refresh_dirty();
        self.restrict = if unknown {
            frame.prev_state
        } else {
            UNRESTRICTED
        };
        if !unknown {
            self.remaining -= 1;
        }
        match self
            .memo
            .insert(&self.cbits, &self.ubits, self.state, self.restrict)
        {
            Some(idx) => frame.memo = idx,
            None => {
                self.undo(&frame);
                return false;
            }
        }
        self.frames.push(frame);
        if !unknown && self.progress() > self.best {
            self.best = self.progress();
            self.snap_pending = true;
        }
        true
    }

    /// Backtracks out of the current (exhausted) configuration.
    fn pop(&mut self) {
        let top = self.frames.last().expect("pop at the root");
        if self.snap_pending && !self.p.ops[top.op as usize].unknown && self.progress() == self.best
        {
            self.take_snapshot();
            self.snap_pending = false;
        }
        let frame = self.frames.pop().expect("pop at the root");
        self.memo.finish(frame.memo);
        self.undo(&frame);
    }

    /// Rule 4, a partial-order reduction: a read-only candidate (a `Get` or a failed
    /// `Cas`) that fits the current value can be linearized right away,
    /// without trying anything else. If the configuration has a valid
    /// completion, moving the read to its front keeps it valid: the read
    /// changes nothing, and being a candidate (invoked before the first
    /// pending return) nothing must precede it. Right after an Unknown write
    /// the read must also be allowed to follow it (rule 2), which keeps the
    /// completion in the form the search looks for.
    fn forced_read(&self) -> Option<u32> {
        let mut node = self.ev_next[0];
        while node != NIL && !self.ev_ret[node as usize] {
            let op = self.ev_op[node as usize];
            let step = self.p.ops[op as usize].step;
            if matches!(step, Step::Read(_) | Step::CasFail { .. }) && self.status(op).is_none() {
                return Some(op);
            }
            node = self.ev_next[node as usize];
        }
        None
    }

    /// Pushes the candidates of the current configuration onto `cands`: a
    /// forced read alone if there is one; otherwise the operations that may
    /// take effect next — completed operations invoked before the first
    /// pending return, then Unknown writes invoked no later. An Unknown
    /// write is only a candidate if some candidate could follow it (rule 2):
    /// one needing its value, or a failed `Cas` expecting the current value.
    /// Writes of a value that some pending operation needs are tried first
    /// (the order only affects speed).
    fn push_candidates(&mut self) {
        if self.starved > 0 {
            return;
        }
        if let Some(op) = self.forced_read() {
            self.cands.push(op);
            return;
        }
        let start = self.cands.len();
        // Values needed by candidates that cannot go next (for ordering),
        // and by all others (for rule 2).
        let mut wanted = std::mem::take(&mut self.wanted);
        let mut followers = std::mem::take(&mut self.followers);
        wanted.clear();
        followers.clear();
        let mut failed_cas_here = false;
        let mut node = self.ev_next[0];
        let mut frt = u64::MAX;
        while node != NIL {
            if self.ev_ret[node as usize] {
                frt = self.ev_time[node as usize];
                break;
            }
            let op = self.ev_op[node as usize];
            let step = self.p.ops[op as usize].step;
            failed_cas_here |= step == Step::CasFail { exp: self.state };
            if self.status(op).is_none() {
                self.cands.push(op);
                if let Some(v) = step.requires() {
                    followers.push(v);
                }
            } else if let Some(v) = step.requires() {
                wanted.push(v);
            }
            node = self.ev_next[node as usize];
        }
        let unknown_start = self.cands.len();
        let mut u = self.uk_next[self.uk_head as usize];
        while u != NIL && self.p.ops[u as usize].invoke <= frt {
            if let Step::Cas { exp, .. } = self.p.ops[u as usize].step {
                followers.push(exp);
            }
            if self.status(u).is_none() {
                self.cands.push(u);
            }
            u = self.uk_next[u as usize];
        }
        let ops = &self.p.ops;
        let writes = |op: u32, values: &[u32]| {
            ops[op as usize]
                .step
                .written()
                .is_some_and(|w| values.contains(&w))
        };
        if !failed_cas_here {
            let mut keep = unknown_start;
            for i in unknown_start..self.cands.len() {
                let op = self.cands[i];
                if writes(op, &wanted) || writes(op, &followers) {
                    self.cands[keep] = self.cands[i];
                    keep += 1;
                }
            }
            self.cands.truncate(keep);
        }
        if !wanted.is_empty() {
            self.cands[start..].sort_by_key(|&op| !writes(op, &wanted));
        }
        self.wanted = wanted;
        self.followers = followers;
    }

    fn run(&mut self) -> SearchOutcome {
        if self.remaining == 0 {
            return SearchOutcome::Linearizable;
        }
        self.push_candidates();
        let mut levels = vec![Level {
            start: 0,
            next: 0,
            end: self.cands.len(),
        }];
        while let Some(level) = levels.last_mut() {
            if self.memo.len() >= self.max_states {
                return SearchOutcome::BudgetExhausted;
            }
            if level.next == level.end {
                // Exhausted: backtrack.
                let start = level.start;
                levels.pop();
                self.cands.truncate(start);
                if !levels.is_empty() {
                    self.pop();
                }
                continue;
            }
            let op = self.cands[level.next];
            level.next += 1;
            if self.try_push(op) {
                if self.remaining == 0 {
                    return SearchOutcome::Linearizable;
                }
                let start = self.cands.len();
                self.push_candidates();
                levels.push(Level {
                    start,
                    next: start,
                    end: self.cands.len(),
                });
            }
        }
        SearchOutcome::NotLinearizable
    }

    /// Records the current (exhausted) configuration for the explanation.
    fn take_snapshot(&mut self) {
        let recent = self
            .frames
            .iter()
            .rev()
            .take(RECENT_SHOWN)
            .rev()
            .map(|f| f.op)
            .collect();
        let mut candidates = Vec::new();
        let mut blocking = None;
        let mut frt = u64::MAX;
        let mut node = self.ev_next[0];
        while node != NIL {
            if self.ev_ret[node as usize] {
                blocking = Some(self.ev_op[node as usize]);
                frt = self.ev_time[node as usize];
                break;
            }
            candidates.push(self.ev_op[node as usize]);
            node = self.ev_next[node as usize];
        }
        let mut u = self.uk_next[self.uk_head as usize];
        while u != NIL && self.p.ops[u as usize].invoke <= frt {
            candidates.push(u);
            u = self.uk_next[u as usize];
        }
        let candidates = candidates
            .into_iter()
            .map(|c| (c, self.status(c).unwrap_or(CandidateStatus::DeadEnd)))
            .collect();
        let starved = (self.starved > 0)
            .then(|| {
                let v = self.starved_flag.iter().position(|&f| f)?;
                Some((self.readers[v][self.readers_head[v]], v as u32))
            })
            .flatten();
        self.snapshot = Some(Snapshot {
            starved,
            progress: self.progress(),
            value: self.concrete_value(),
            restrict: self.restrict,
            recent,
            depth: self.frames.len(),
            blocking,
            candidates,
        });
    }

    /// The current register value as written by the last write on the
    /// search path (or the initial value).
    fn concrete_value(&self) -> String {
        for f in self.frames.iter().rev() {
            let op = self.p.ops[f.op as usize].op;
            match &op.kind {
                OpKind::Put(v) => return format!("{:?}", Some(v)),
                OpKind::Delete => return "None".to_string(),
                OpKind::Cas { new, .. }
                    if !matches!(op.outcome, Outcome::CasOk(false) | Outcome::CasFailed(_)) =>
                {
                    return format!("{new:?}")
                }
                _ => {}
            }
        }
        format!("{:?}", self.p.initial_value)
    }

    fn value(&self, id: u32) -> String {
        if id == UNREAD {
            "a value that no operation reads or compares against".to_string()
        } else {
            format!("{:?}", self.p.values[id as usize])
        }
    }

    fn op_line(&self, op: u32) -> String {
        let o = &self.p.ops[op as usize];
        describe(o.orig, o.op)
    }

    fn explain(&self, key: &str, entries: &[(usize, &Operation)]) -> String {
        let ops = &self.p.ops;
        let unknown = ops.iter().filter(|o| o.unknown).count();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "key {key:?}: no linearization exists ({} completed and {} unknown-outcome operations searched, initial value {:?}).",
            self.completed_total,
            unknown,
            self.p.initial_value
        );
        let Some(snap) = &self.snapshot else {
            return s;
        };
        let _ = writeln!(
            s,
            "Deepest dead end of the search: {} of {} completed operations linearized; the value there is {}.",
            snap.progress,
            self.completed_total,
            snap.value
        );
        if snap.restrict != UNRESTRICTED {
            let _ = writeln!(
                s,
                "(The last step applied an unknown-outcome write over {}; only operations observing it were tried next.)",
                self.value(snap.restrict)
            );
        }
        let _ = writeln!(s, "Last linearized operations, oldest first:");
        if snap.recent.is_empty() {
            let _ = writeln!(s, "  (none: the history fails from its very start)");
        }
        if snap.depth > snap.recent.len() {
            let _ = writeln!(s, "  ... {} earlier", snap.depth - snap.recent.len());
        }
        for &op in &snap.recent {
            let _ = writeln!(s, "  {}", self.op_line(op));
        }
        if let Some(b) = snap.blocking {
            let _ = writeln!(
                s,
                "Earliest-completing operation not linearized yet (operations invoked after it completed must follow it):\n  {}",
                self.op_line(b)
            );
        }
        if let Some((reader, v)) = snap.starved {
            let _ = writeln!(
                s,
                "Dead end: this operation needs the value {}, which is not the current value, and no operation left that could take effect before it completes writes it:\n  {}",
                self.value(v),
                self.op_line(reader)
            );
        }
        let _ = writeln!(s, "Operations that could take effect at that point:");
        for &(op, status) in snap.candidates.iter().take(CANDIDATES_SHOWN) {
            let o = &ops[op as usize];
            let why = match status {
                CandidateStatus::Inapplicable => match o.step {
                    Step::Read(v) => format!(
                        "impossible: it returned {} but the value would be {}",
                        self.value(v),
                        snap.value
                    ),
                    Step::Cas { exp, .. } => format!(
                        "impossible: it swapped, expecting {}, but the value would be {}",
                        self.value(exp),
                        snap.value
                    ),
                    Step::CasFail { exp } => format!(
                        "impossible: its compare failed, but the value would equal the expected {}",
                        self.value(exp)
                    ),
                    Step::Write(_) => "impossible".to_string(),
                },
                CandidateStatus::DoesNotFollowUnknown => {
                    "not tried right after an unknown-outcome write it does not observe".to_string()
                }
                CandidateStatus::IdenticalEarlier => {
                    "not tried yet: an identical operation that began and ended no later goes first"
                        .to_string()
                }
                CandidateStatus::NoChange => "would not change the value".to_string(),
                CandidateStatus::DeadEnd if snap.starved.is_some() => {
                    "possible, but not tried: dead end".to_string()
                }
                CandidateStatus::DeadEnd => {
                    "possible here, but every continuation fails".to_string()
                }
            };
            let _ = writeln!(s, "  {} -- {why}", self.op_line(op));
        }
        if snap.candidates.len() > CANDIDATES_SHOWN {
            let _ = writeln!(s, "  ... {} more", snap.candidates.len() - CANDIDATES_SHOWN);
        }
        for hint in self.hints(entries).into_iter().take(5) {
            let _ = writeln!(s, "Hint: {hint}");
        }
        s
    }

    /// Observations of values that nothing (or only failed operations) wrote.
    fn hints(&self, entries: &[(usize, &Operation)]) -> Vec<String> {
        let mut writers: HashMap<Option<&str>, bool> = HashMap::new(); // value -> some non-Failed writer
        for &(_, op) in entries {
            let written = match &op.kind {
                OpKind::Put(v) => Some(Some(v.as_str())),
                OpKind::Delete => Some(None),
                OpKind::Cas { new, .. } => Some(new.as_deref()),
                OpKind::Get => None,
            };
            if let Some(v) = written {
                let ok = !matches!(
                    op.outcome,
                    Outcome::Failed | Outcome::CasOk(false) | Outcome::CasFailed(_)
                );
                *writers.entry(v).or_default() |= ok;
            }
        }
        let initial = self.p.initial_value;
        let mut hints = Vec::new();
        for o in &self.p.ops {
            let Some(v) = o.step.requires() else { continue };
            let v = self.p.values[v as usize];
            if v == initial {
                continue;
            }
            match writers.get(&v) {
                None => hints.push(format!(
                    "{} observed {v:?}, which no operation on this key ever wrote",
                    describe(o.orig, o.op)
                )),
                Some(false) => hints.push(format!(
                    "{} observed {v:?}, which only Failed (or compare-failed) operations wrote",
                    describe(o.orig, o.op)
                )),
                Some(true) => {}
            }
        }
        hints
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    // ----- helpers ---------------------------------------------------------

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    fn op(client: u64, kind: OpKind, invoke: u64, complete: u64, outcome: Outcome) -> Operation {
        Operation {
            client,
            key: "k".to_string(),
            kind,
            invoke_ns: invoke,
            complete_ns: complete,
            outcome,
        }
    }

    fn put(client: u64, v: &str, invoke: u64, complete: u64) -> Operation {
        op(
            client,
            OpKind::Put(v.into()),
            invoke,
            complete,
            Outcome::PutOk,
        )
    }

    fn get(client: u64, v: Option<&str>, invoke: u64, complete: u64) -> Operation {
        let out = Outcome::GetOk(v.map(str::to_string));
        op(client, OpKind::Get, invoke, complete, out)
    }

    fn del(client: u64, invoke: u64, complete: u64) -> Operation {
        op(client, OpKind::Delete, invoke, complete, Outcome::DeleteOk)
    }

    fn cas(
        client: u64,
        expected: Option<&str>,
        new: Option<&str>,
        invoke: u64,
        complete: u64,
        swapped: bool,
    ) -> Operation {
        let kind = OpKind::Cas {
            expected: expected.map(str::to_string),
            new: new.map(str::to_string),
        };
        op(client, kind, invoke, complete, Outcome::CasOk(swapped))
    }

    fn unknown(mut o: Operation) -> Operation {
        o.outcome = Outcome::Unknown;
        o.complete_ns = 0; // ignored
        o
    }

    fn failed(mut o: Operation) -> Operation {
        o.outcome = Outcome::Failed;
        o
    }

    fn on_key(mut o: Operation, key: &str) -> Operation {
        o.key = key.to_string();
        o
    }

    fn result_of(history: &[Operation]) -> KeyReport {
        let report = check(history, &CheckOptions::default());
        assert_eq!(report.keys.len(), 1, "{report}");
        report.keys.into_iter().next().unwrap()
    }

    #[track_caller]
    fn assert_ok(history: &[Operation]) -> KeyReport {
        let r = result_of(history);
        assert_eq!(r.result, KeyResult::Ok, "history: {history:#?}");
        r
    }

    #[track_caller]
    fn assert_violation(history: &[Operation]) -> String {
        let r = result_of(history);
        match r.result {
            KeyResult::Violation { explanation } => {
                println!("{explanation}");
                explanation
            }
            other => panic!("expected a violation, got {other:?} for {history:#?}"),
        }
    }

    fn cas_failed(
        client: u64,
        expected: Option<&str>,
        current: Option<&str>,
        invoke: u64,
        complete: u64,
    ) -> Operation {
        let kind = OpKind::Cas {
            expected: expected.map(str::to_string),
            new: s("never"),
        };
        let out = Outcome::CasFailed(current.map(str::to_string));
        op(client, kind, invoke, complete, out)
    }

    #[test]
    fn failed_cas_reporting_a_stale_current_value_is_a_violation() {
        // The deposed-leader answer: "not swapped, the key holds A" after B was written.
        let h = [
            put(1, "A", 0, 1),
            put(2, "B", 2, 3),
            cas_failed(3, Some("C"), Some("A"), 4, 5),
        ];
        assert_violation(&h);
        // Without the value it reports, the same answer looks fine.
        let mut blind = h.clone();
        blind[2].outcome = Outcome::CasOk(false);
        assert_ok(&blind);
        // Reporting the current value is fine.
        assert_ok(&[
            put(1, "A", 0, 1),
            put(2, "B", 2, 3),
            cas_failed(3, Some("C"), Some("B"), 4, 5),
        ]);
    }

    #[test]
    fn failed_cas_reporting_the_expected_value_is_malformed() {
        let r = result_of(&[put(1, "A", 0, 1), cas_failed(2, Some("A"), Some("A"), 2, 3)]);
        assert!(
            matches!(r.result, KeyResult::Inconclusive { .. }),
            "{:?}",
            r.result
        );
    }

    // ----- basic semantics ---------------------------------------------------

    #[test]
    fn empty_history_is_linearizable() {
        let report = check(&[], &CheckOptions::default());
        assert!(report.is_linearizable());
        assert!(report.keys.is_empty());
        assert_eq!(report.total_ops(), 0);
    }

    #[test]
    fn sequential_history_passes() {
        assert_ok(&[
            get(1, None, 0, 1),
            put(1, "a", 2, 3),
            get(2, Some("a"), 4, 5),
            put(2, "b", 6, 7),
            get(1, Some("b"), 8, 9),
            del(1, 10, 11),
            get(2, None, 12, 13),
            cas(1, None, Some("c"), 14, 15, true),
            get(2, Some("c"), 16, 17),
        ]);
    }

    #[test]
    fn initial_value_option_is_respected() {
        let h = [
            get(1, Some("init"), 0, 1),
            put(1, "a", 2, 3),
            get(1, Some("a"), 4, 5),
        ];
        let opts = CheckOptions {
            initial: s("init"),
            ..CheckOptions::default()
        };
        assert!(check(&h, &opts).is_linearizable());
        assert!(!check(&h, &CheckOptions::default()).is_linearizable());
    }

    #[test]
    fn concurrent_overlapping_write_and_read_pass_either_way() {
        // The read overlaps the write: it may see the old or the new value.
        assert_ok(&[
            put(1, "a", 0, 10),
            put(2, "b", 20, 40),
            get(3, Some("a"), 25, 35),
        ]);
        assert_ok(&[
            put(1, "a", 0, 10),
            put(2, "b", 20, 40),
            get(3, Some("b"), 25, 35),
        ]);
        // Two concurrent writes and reads that order them differently than
        // their invocations: still fine, b then a.
        assert_ok(&[
            put(1, "a", 0, 100),
            put(2, "b", 10, 90),
            get(3, Some("b"), 20, 30),
            get(3, Some("a"), 40, 50),
            get(4, Some("a"), 95, 99),
        ]);
    }

    #[test]
    fn stale_read_is_a_violation() {
        let explanation = assert_violation(&[
            put(1, "a", 0, 10),
            put(2, "b", 20, 30),
            get(3, Some("a"), 40, 50), // b completed before this read began
        ]);
        assert!(explanation.contains("key \"k\""), "{explanation}");
        assert!(explanation.contains("Get"), "{explanation}");
        assert!(explanation.contains("Some(\"b\")"), "{explanation}");
    }

    #[test]
    fn new_old_inversion_is_a_violation() {
        // Reads concurrent with the write of b: once a read saw b, a later
        // read may not see a again.
        assert_violation(&[
            put(1, "a", 0, 10),
            put(2, "b", 20, 100),
            get(3, Some("b"), 30, 40),
            get(4, Some("a"), 50, 60),
        ]);
    }

    #[test]
    fn read_of_never_written_value_is_a_violation() {
        let explanation = assert_violation(&[
            put(1, "a", 0, 10),
            get(2, Some("zzz"), 5, 15),
            put(1, "b", 20, 30),
        ]);
        assert!(
            explanation.contains("no operation on this key ever wrote"),
            "{explanation}"
        );
    }

    #[test]
    fn equal_timestamps_are_concurrent() {
        // The read is invoked at the write's completion time: overlapping.
        assert_ok(&[put(1, "a", 0, 10), get(2, None, 10, 20)]);
        // One nanosecond later it must see the write.
        assert_violation(&[put(1, "a", 0, 10), get(2, None, 11, 20)]);
    }

    #[test]
    fn failed_ops_are_ignored() {
        // A Failed write must not be observable ...
        assert_violation(&[failed(put(1, "a", 0, 10)), get(2, Some("a"), 20, 30)]);
        // ... and does not overwrite anything.
        assert_ok(&[
            put(1, "a", 0, 10),
            failed(put(1, "b", 20, 30)),
            get(2, Some("a"), 40, 50),
        ]);
    }

    #[test]
    fn delete_semantics() {
        assert_ok(&[put(1, "a", 0, 10), del(1, 20, 30), get(2, None, 40, 50)]);
        assert_violation(&[
            put(1, "a", 0, 10),
            del(1, 20, 30),
            get(2, Some("a"), 40, 50),
        ]);
        // Deleting an absent key is fine, and a read concurrent with the
        // delete may see either.
        assert_ok(&[
            del(1, 0, 5),
            put(1, "a", 6, 10),
            del(2, 20, 40),
            get(3, Some("a"), 25, 30),
            get(3, None, 45, 50),
        ]);
    }

    #[test]
    fn duplicate_values() {
        // a is written twice; the second a explains the last read.
        assert_ok(&[
            put(1, "a", 0, 10),
            put(1, "b", 20, 30),
            put(2, "a", 40, 50),
            get(3, Some("a"), 60, 70),
        ]);
        // Both writes of a precede the write of b: reading a is stale.
        assert_violation(&[
            put(1, "a", 0, 10),
            put(2, "a", 12, 15),
            put(1, "b", 20, 30),
            get(3, Some("a"), 60, 70),
        ]);
        // A concurrent write of a (overlapping the read) explains it.
        assert_ok(&[
            put(1, "a", 0, 10),
            put(1, "b", 20, 30),
            put(2, "a", 55, 80),
            get(3, Some("a"), 60, 70),
        ]);
    }

    // ----- compare-and-swap --------------------------------------------------

    #[test]
    fn cas_success_and_failure_semantics() {
        assert_ok(&[
            cas(1, None, Some("a"), 0, 10, true), // only if absent
            cas(2, None, Some("x"), 20, 30, false),
            cas(1, Some("a"), Some("b"), 40, 50, true),
            cas(2, Some("a"), Some("y"), 60, 70, false),
            get(3, Some("b"), 80, 90),
            cas(1, Some("b"), None, 100, 110, true), // swap to absent
            get(3, None, 120, 130),
        ]);
    }

    #[test]
    fn cas_true_with_impossible_expected_value_is_a_violation() {
        // c was never the value, so a swap expecting c cannot have succeeded.
        assert_violation(&[
            put(1, "a", 0, 10),
            cas(2, Some("c"), Some("d"), 20, 30, true),
        ]);
        // Expected absent, but the key was written before the CAS began.
        assert_violation(&[put(1, "a", 0, 10), cas(2, None, Some("d"), 20, 30, true)]);
    }

    #[test]
    fn cas_false_when_value_matched_is_a_violation() {
        assert_violation(&[
            put(1, "a", 0, 10),
            cas(2, Some("a"), Some("b"), 20, 30, false),
        ]);
        // A failed CAS has no effect.
        assert_violation(&[
            put(1, "a", 0, 10),
            cas(2, Some("x"), Some("b"), 20, 30, false),
            get(3, Some("b"), 40, 50),
        ]);
    }

    #[test]
    fn two_successful_cas_from_same_value_is_a_violation() {
        // Both claim to have swapped a away: only one can have.
        assert_violation(&[
            put(1, "a", 0, 10),
            cas(2, Some("a"), Some("b"), 20, 40, true),
            cas(3, Some("a"), Some("c"), 25, 45, true),
        ]);
        // But a chain is fine: a -> b -> c.
        assert_ok(&[
            put(1, "a", 0, 10),
            cas(2, Some("a"), Some("b"), 20, 40, true),
            cas(3, Some("b"), Some("c"), 25, 45, true),
            get(1, Some("c"), 50, 60),
        ]);
    }

    // ----- unknown outcomes --------------------------------------------------

    #[test]
    fn unknown_write_observed_later_passes() {
        let r = assert_ok(&[
            put(1, "a", 0, 10),
            unknown(put(2, "b", 20, 0)),
            get(3, Some("a"), 30, 40),
            put(1, "c", 50, 60),
            get(3, Some("c"), 70, 80),
            // The timed-out write took effect long after its client gave up.
            get(3, Some("b"), 1000, 1010),
        ]);
        assert_eq!(r.unknown_pruned, 0);
    }

    #[test]
    fn unknown_write_never_observed_passes_and_is_pruned() {
        let r = assert_ok(&[
            put(1, "a", 0, 10),
            unknown(put(2, "b", 20, 0)),
            get(3, Some("a"), 30, 40),
            unknown(del(2, 45, 0)),
            get(3, Some("a"), 50, 60),
            unknown(get(4, None, 70, 0)),
        ]);
        // Put(b) and Delete are never observed; the Unknown Get says nothing.
        assert_eq!(r.unknown_pruned, 3);
    }

    #[test]
    fn unknown_write_observed_before_its_invocation_is_a_violation() {
        assert_violation(&[
            put(1, "a", 0, 10),
            get(3, Some("b"), 20, 30),
            unknown(put(2, "b", 40, 0)),
        ]);
    }

    #[test]
    fn unknown_write_takes_effect_at_most_once() {
        // b appears, is overwritten by c, then reappears: one Unknown Put(b)
        // cannot explain both.
        assert_violation(&[
            unknown(put(1, "b", 0, 0)),
            get(2, Some("b"), 10, 20),
            put(2, "c", 30, 40),
            get(2, Some("b"), 50, 60),
        ]);
        // Two identical Unknown Puts (a retry) can.
        assert_ok(&[
            unknown(put(1, "b", 0, 0)),
            unknown(put(1, "b", 5, 0)),
            get(2, Some("b"), 10, 20),
            put(2, "c", 30, 40),
            get(2, Some("b"), 50, 60),
        ]);
    }

    #[test]
    fn unknown_cas_semantics() {
        // Unknown CAS that took effect.
        assert_ok(&[
            put(1, "a", 0, 10),
            unknown(cas(2, Some("a"), Some("b"), 20, 0, false)),
            get(3, Some("b"), 30, 40),
        ]);
        // Unknown CAS that did not (or failed its compare).
        assert_ok(&[
            put(1, "a", 0, 10),
            unknown(cas(2, Some("x"), Some("b"), 20, 0, false)),
            get(3, Some("a"), 30, 40),
        ]);
        // It cannot have swapped from a value the key never had.
        assert_violation(&[
            put(1, "a", 0, 10),
            unknown(cas(2, Some("x"), Some("b"), 20, 0, false)),
            get(3, Some("b"), 30, 40),
        ]);
    }

    #[test]
    fn failed_cas_can_be_explained_by_unknown_write() {
        // The failed CAS needs the value to differ from a: only the Unknown
        // Put(b) explains that, so it must not be pruned.
        let h = [
            put(1, "a", 0, 10),
            unknown(put(2, "b", 20, 0)),
            cas(3, Some("a"), Some("c"), 30, 40, false),
        ];
        let r = assert_ok(&h);
        assert_eq!(r.unknown_pruned, 0);
        // Without the Unknown Put it is a violation.
        assert_violation(&[h[0].clone(), h[2].clone()]);
    }

    #[test]
    fn pruning_cascades_through_unknown_cas() {
        // Put(b) is observed only by the Unknown CAS b -> c, whose value c is
        // never observed: both are dropped.
        let h = [
            put(1, "a", 0, 10),
            unknown(put(2, "b", 20, 0)),
            unknown(cas(3, Some("b"), Some("c"), 30, 0, false)),
            get(4, Some("a"), 40, 50),
        ];
        let r = assert_ok(&h);
        assert_eq!(r.unknown_pruned, 2);
        // If c is read, both are kept and needed.
        let mut h2 = h.to_vec();
        h2.push(get(4, Some("c"), 60, 70));
        let r = assert_ok(&h2);
        assert_eq!(r.unknown_pruned, 0);
    }

    #[test]
    fn prune_function_keeps_exactly_the_observed_writes() {
        let history = [
            put(1, "a", 0, 10),
            unknown(put(2, "seen", 20, 0)),
            unknown(put(2, "unseen", 21, 0)),
            unknown(put(2, "seen-too-early", 22, 0)),
            get(3, Some("seen-too-early"), 0, 15), // completes before invoke
            get(3, Some("seen"), 30, 40),
        ];
        let entries: Vec<(usize, &Operation)> = history.iter().enumerate().collect();
        let p = prepare(&entries, None).unwrap();
        assert_eq!(p.unknown_pruned, 2);
        let kept: Vec<&OpKind> = p
            .ops
            .iter()
            .filter(|o| o.unknown)
            .map(|o| &o.op.kind)
            .collect();
        assert_eq!(kept, vec![&OpKind::Put("seen".into())]);
    }

    #[test]
    fn many_identical_unknown_retries_stay_cheap() {
        let mut h = vec![put(1, "a", 0, 10)];
        for i in 0..200 {
            h.push(unknown(put(2, "x", 20 + i, 0)));
        }
        h.push(get(3, Some("x"), 1000, 1010));
        h.push(put(3, "b", 1020, 1030));
        h.push(get(3, Some("x"), 1040, 1050));
        h.push(put(3, "c", 1060, 1070));
        h.push(get(3, Some("x"), 1080, 1090));
        let r = assert_ok(&h);
        assert!(r.states_explored < 10_000, "{r:?}");
    }

    #[test]
    fn many_observed_unknown_writes_stay_cheap() {
        // 64 clients each time out on a write; every value is read later, in
        // an order unrelated to the invocations, interleaved with acknowledged
        // writes and failed CASes.
        let mut h = vec![put(0, "init", 0, 1)];
        for c in 0..64u64 {
            h.push(unknown(put(c, &format!("u{c}"), 10 + c, 0)));
        }
        let mut t = 1000;
        for i in 0..64u64 {
            let c = (i * 37) % 64;
            h.push(get(100, Some(&format!("u{c}")), t, t + 5));
            h.push(cas(101, Some("nope"), Some("z"), t + 6, t + 7, false));
            h.push(put(102, &format!("w{i}"), t + 8, t + 9));
            t += 10;
        }
        let start = Instant::now();
        let r = assert_ok(&h);
        println!("{r:?} in {:?}", start.elapsed());
        assert!(r.states_explored < 200_000, "{r:?}");
        // The same with one value read twice (after being overwritten) is a
        // violation.
        h.push(get(100, Some("u5"), t, t + 5));
        assert_violation(&h);
    }

    #[test]
    fn unknown_get_is_dropped() {
        assert_ok(&[put(1, "a", 0, 10), unknown(get(2, Some("zzz"), 20, 0))]);
    }

    // ----- lost writes ---------------------------------------------------------

    #[test]
    fn lost_acknowledged_write_is_detected() {
        let history = vec![
            on_key(put(1, "a", 0, 10), "lost"),
            on_key(put(1, "b", 20, 30), "lost"),
            on_key(put(1, "a", 0, 10), "fine"),
            on_key(unknown(put(2, "b", 20, 0)), "fine"),
            on_key(put(1, "a", 0, 10), "deleted"),
            on_key(put(1, "x", 0, 10), "stale"),
            on_key(put(1, "y", 20, 30), "stale"),
        ];
        let finals: HashMap<String, Option<String>> = [
            ("lost".to_string(), None),   // acknowledged b vanished
            ("fine".to_string(), s("b")), // the Unknown write took effect
            ("deleted".to_string(), None),
            ("stale".to_string(), s("x")), // y was acknowledged after x
            ("untouched".to_string(), None),
            ("phantom".to_string(), s("p")), // never written at all
        ]
        .into_iter()
        .collect();
        assert_eq!(
            lost_writes(&history, &finals),
            vec!["deleted", "lost", "phantom", "stale"]
        );
        let report = check_with_final_values(&history, &finals, &CheckOptions::default());
        println!("{report}");
        assert_eq!(report.keys.len(), 6);
        assert_eq!(report.total_ops(), history.len());
        // The final read does not change the verdict of the history alone.
        assert!(check(&history, &CheckOptions::default()).is_linearizable());
        // The other possible final value of "fine" is also explainable.
        let mut finals2 = finals.clone();
        finals2.insert("fine".into(), s("a"));
        finals2.insert("lost".into(), s("b"));
        finals2.insert("deleted".into(), s("a"));
        finals2.insert("stale".into(), s("y"));
        finals2.insert("phantom".into(), None);
        assert!(lost_writes(&history, &finals2).is_empty());
    }

    // ----- reports, options, robustness -----------------------------------------

    #[test]
    fn keys_are_checked_independently() {
        let history = vec![
            on_key(put(1, "a", 0, 10), "x"),
            on_key(put(1, "a", 0, 10), "y"),
            on_key(get(2, None, 20, 30), "y"), // stale on y only
            on_key(get(2, Some("a"), 20, 30), "x"),
            on_key(failed(put(3, "q", 0, 1)), "z"),
        ];
        let report = check(&history, &CheckOptions::default());
        println!("{report}");
        assert!(!report.is_linearizable());
        let v = report.violations();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].key, "y");
        assert!(report.inconclusive().is_empty());
        assert_eq!(report.total_ops(), 5);
        assert_eq!(report.key("x").unwrap().result, KeyResult::Ok);
        assert_eq!(report.key("z").unwrap().ops, 1);
        assert!(report.key("nope").is_none());
        assert!(format!("{report}").contains("VIOLATION on key \"y\""));
    }

    #[test]
    fn malformed_history_is_inconclusive() {
        let r = result_of(&[op(1, OpKind::Get, 0, 1, Outcome::PutOk)]);
        assert!(r.result.is_inconclusive(), "{r:?}");
        let r = result_of(&[put(1, "a", 10, 5)]);
        assert!(r.result.is_inconclusive(), "{r:?}");
    }

    #[test]
    fn exhausted_budget_is_inconclusive() {
        let h: Vec<Operation> = (0..10).map(|i| put(1, "a", i * 10, i * 10 + 5)).collect();
        let opts = CheckOptions {
            max_states_per_key: 3,
            ..CheckOptions::default()
        };
        let report = check(&h, &opts);
        assert!(report.is_linearizable());
        assert_eq!(report.inconclusive().len(), 1, "{report}");
        let unlimited = CheckOptions {
            max_states_per_key: 0,
            ..CheckOptions::default()
        };
        assert!(check(&h, &unlimited).keys[0].result.is_ok());
    }

    #[test]
    fn history_and_report_round_trip_through_json() {
        let history = vec![
            put(1, "a", 0, 10),
            unknown(cas(2, None, Some("b"), 5, 0, false)),
            failed(del(3, 1, 2)),
            get(4, Some("a"), 20, 30),
            get(4, Some("b"), 20, 30),
        ];
        let json = serde_json::to_string_pretty(&history).unwrap();
        let back: Vec<Operation> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, history);
        let report = check(&back, &CheckOptions::default());
        let json = serde_json::to_string(&report).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);
        assert!(!report.is_linearizable());
    }

    // ----- randomized histories ---------------------------------------------------

    /// SplitMix64: small, seedable, dependency-free.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, p: f64) -> bool {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
        }
    }

    struct GenConfig {
        ops: usize,
        keys: usize,
        clients: usize,
        /// Probability that an operation times out (outcome Unknown).
        unknown: f64,
        /// Probability that an operation is rejected (outcome Failed).
        failed: f64,
        /// Number of distinct values in the value pool (duplicates!).
        values: u64,
        max_gap: u64,
        max_duration: u64,
    }

    impl GenConfig {
        fn small() -> Self {
            GenConfig {
                ops: 120,
                keys: 2,
                clients: 5,
                unknown: 0.1,
                failed: 0.05,
                values: 4,
                max_gap: 20,
                max_duration: 60,
            }
        }
    }

    /// Generates a history that is linearizable by construction: every
    /// operation gets a real interval, a linearization point inside it (for
    /// Unknown operations that took effect: anywhere after invocation), and
    /// its result comes from a sequential register applied in
    /// linearization-point order. Returns the history and the final values.
    fn generate(seed: u64, cfg: &GenConfig) -> (Vec<Operation>, HashMap<String, Option<String>>) {
        let mut rng = Rng(seed);
        let mut clock = vec![0u64; cfg.clients];
        struct Slot {
            client: u64,
            key: String,
            invoke: u64,
            complete: u64,
            /// Linearization point, if the operation takes effect.
            lp: Option<u64>,
            fate: Outcome, // Unknown / Failed / PutOk (= completed normally)
        }
        let mut slots = Vec::with_capacity(cfg.ops);
        for _ in 0..cfg.ops {
            // The client that is furthest behind issues the next operation.
            let c = (0..cfg.clients).min_by_key(|&c| clock[c]).unwrap();
            let invoke = clock[c] + 1 + rng.below(cfg.max_gap);
            let duration = rng.below(cfg.max_duration + 1);
            let complete = invoke + duration;
            clock[c] = complete;
            let key = format!("key{}", rng.below(cfg.keys as u64));
            let (fate, lp) = if rng.chance(cfg.unknown) {
                let took_effect = rng.chance(0.5);
                // May take effect long after the client gave up.
                let lp = invoke + rng.below(3 * duration + 1);
                (Outcome::Unknown, took_effect.then_some(lp))
            } else if rng.chance(cfg.failed) {
                (Outcome::Failed, None)
            } else {
                (Outcome::PutOk, Some(invoke + rng.below(duration + 1)))
            };
            slots.push(Slot {
                client: c as u64,
                key,
                invoke,
                complete,
                lp,
                fate,
            });
        }
        let value = |rng: &mut Rng| -> Option<String> {
            if rng.chance(0.1) {
                None
            } else {
                Some(format!("v{}", rng.below(cfg.values)))
            }
        };
        let mut order: Vec<usize> = (0..slots.len())
            .filter(|&i| slots[i].lp.is_some())
            .collect();
        order.sort_by_key(|&i| (slots[i].lp, i));
        let mut state: HashMap<String, Option<String>> = HashMap::new();
        let mut history: Vec<Option<Operation>> = (0..slots.len()).map(|_| None).collect();
        for i in order {
            let sl = &slots[i];
            let cur = state.entry(sl.key.clone()).or_default();
            let r = rng.below(100);
            let (kind, outcome) = if r < 40 {
                (OpKind::Get, Outcome::GetOk(cur.clone()))
            } else if r < 70 {
                let v = match value(&mut rng) {
                    Some(v) if rng.chance(0.7) => v,
                    _ => format!("u{i}"),
                };
                *cur = Some(v.clone());
                (OpKind::Put(v), Outcome::PutOk)
            } else if r < 78 {
                *cur = None;
                (OpKind::Delete, Outcome::DeleteOk)
            } else {
                let expected = if rng.chance(0.5) {
                    cur.clone()
                } else {
                    value(&mut rng)
                };
                let new = value(&mut rng);
                let swapped = *cur == expected;
                if swapped {
                    *cur = new.clone();
                }
                (OpKind::Cas { expected, new }, Outcome::CasOk(swapped))
            };
            let outcome = if sl.fate == Outcome::Unknown {
                Outcome::Unknown
            } else {
                outcome
            };
            history[i] = Some(Operation {
                client: sl.client,
                key: sl.key.clone(),
                kind,
                invoke_ns: sl.invoke,
                complete_ns: sl.complete,
                outcome,
            });
        }
        // Operations without effect: Failed, or Unknown that never happened.
        for (i, sl) in slots.iter().enumerate() {
            if history[i].is_none() {
                let kind = match rng.below(4) {
                    0 => OpKind::Get,
                    1 => OpKind::Put(format!("n{i}")),
                    2 => OpKind::Delete,
                    _ => OpKind::Cas {
                        expected: value(&mut rng),
                        new: value(&mut rng),
                    },
                };
                history[i] = Some(Operation {
                    client: sl.client,
                    key: sl.key.clone(),
                    kind,
                    invoke_ns: sl.invoke,
                    complete_ns: sl.complete,
                    outcome: sl.fate.clone(),
                });
            }
        }
        for k in 0..cfg.keys {
            state.entry(format!("key{k}")).or_default();
        }
        (history.into_iter().map(Option::unwrap).collect(), state)
    }

    /// A value that provably cannot be the register's value at any time from
    /// `t` on for `key`: every operation that could write it completed, and
    /// a later acknowledged write of another value completed before `t`.
    fn impossible_value_at(history: &[Operation], key: &str, t: u64) -> Option<Option<String>> {
        let ops: Vec<&Operation> = history.iter().filter(|o| o.key == key).collect();
        let writes = |o: &Operation| -> Option<Option<String>> {
            match (&o.kind, &o.outcome) {
                (_, Outcome::Failed | Outcome::CasOk(false) | Outcome::CasFailed(_)) => None,
                (OpKind::Put(v), _) => Some(Some(v.clone())),
                (OpKind::Delete, _) => Some(None),
                (OpKind::Cas { new, .. }, _) => Some(new.clone()),
                (OpKind::Get, _) => None,
            }
        };
        let mut candidates: Vec<Option<String>> = vec![None];
        candidates.extend(ops.iter().filter_map(|o| writes(o)));
        candidates.sort();
        candidates.dedup();
        for v in candidates {
            // Latest completion of a writer of v (the initial None counts
            // as written at time 0).
            let mut last_write = if v.is_none() { Some(0) } else { None };
            let mut ok = true;
            for o in &ops {
                if writes(o).as_ref() == Some(&v) {
                    if o.outcome == Outcome::Unknown {
                        ok = false;
                    }
                    last_write = last_write.max(Some(o.complete_ns));
                }
            }
            let Some(last_write) = last_write else {
                continue;
            };
            if !ok {
                continue;
            }
            let overwritten = ops.iter().any(|o| {
                o.outcome != Outcome::Unknown
                    && writes(o).is_some_and(|w| w != v)
                    && o.invoke_ns > last_write
                    && o.complete_ns < t
            });
            if overwritten {
                return Some(v);
            }
        }
        None
    }

    #[test]
    fn random_linearizable_histories_pass() {
        let configs = [
            GenConfig::small(),
            GenConfig {
                ops: 400,
                keys: 3,
                clients: 10,
                unknown: 0.2,
                failed: 0.05,
                values: 3,
                max_gap: 10,
                max_duration: 80,
            },
            GenConfig {
                ops: 300,
                keys: 1,
                clients: 16,
                unknown: 0.05,
                failed: 0.0,
                values: 2,
                max_gap: 5,
                max_duration: 40,
            },
        ];
        for (ci, cfg) in configs.iter().enumerate() {
            for seed in 0..150u64 {
                let seed = seed + 1000 * ci as u64;
                let (history, finals) = generate(seed, cfg);
                let report = check(&history, &CheckOptions::default());
                assert!(
                    report.is_linearizable() && report.inconclusive().is_empty(),
                    "seed {seed} (config {ci}): {report}\nhistory: {}",
                    serde_json::to_string(&history).unwrap()
                );
                let lost = lost_writes(&history, &finals);
                assert!(lost.is_empty(), "seed {seed} (config {ci}): lost {lost:?}");
            }
        }
    }

    #[test]
    fn random_histories_with_a_corrupted_read_are_violations() {
        let concurrent = GenConfig {
            ops: 150,
            keys: 1,
            clients: 12,
            unknown: 0.1,
            failed: 0.02,
            values: 4,
            max_gap: 10,
            max_duration: 60,
        };
        for (ci, (cfg, seeds)) in [(GenConfig::small(), 300u64), (concurrent, 50)]
            .iter()
            .enumerate()
        {
            let (mut stale, mut lost) = (0, 0);
            let started = Instant::now();
            for seed in 0..*seeds {
                let (mut history, mut finals) = generate(seed, cfg);
                let original = history.clone();
                let mut rng = Rng(seed ^ 0xDEAD_BEEF);
                let reads: Vec<usize> = (0..history.len())
                    .filter(|&i| matches!(history[i].outcome, Outcome::GetOk(_)))
                    .collect();
                if reads.is_empty() {
                    continue;
                }
                // Prefer a stale (overwritten) value; else a never-written one.
                let start = rng.below(reads.len() as u64) as usize;
                let mut corrupted = None;
                for j in 0..reads.len() {
                    let i = reads[(start + j) % reads.len()];
                    let h = &history[i];
                    if let Some(v) = impossible_value_at(&history, &h.key, h.invoke_ns) {
                        corrupted = Some((i, v));
                        stale += 1;
                        break;
                    }
                }
                let (i, v) = corrupted.unwrap_or((reads[start], s("never-written")));
                let key = history[i].key.clone();
                history[i].outcome = Outcome::GetOk(v.clone());
                let report = check(&history, &CheckOptions::default());
                let kr = report.key(&key).unwrap();
                assert!(
                    kr.result.is_violation(),
                    "seed {seed} (config {ci}): read #{i} corrupted to {v:?} not detected: {report}\nhistory: {}",
                    serde_json::to_string(&history).unwrap()
                );
                // Only the corrupted key is affected.
                assert_eq!(report.violations().len(), 1, "seed {seed}: {report}");

                // Corrupt the final value of that key the same way: lost write.
                if let Some(v) = impossible_value_at(&original, &key, u64::MAX) {
                    finals.insert(key.clone(), v.clone());
                    assert_eq!(
                        lost_writes(&original, &finals),
                        vec![key.clone()],
                        "seed {seed} (config {ci}): final value {v:?} of {key}"
                    );
                    lost += 1;
                }
            }
            println!(
                "config {ci} ({:?}): {stale} of {seeds} corrupted reads used a previously written (stale) value; {lost} lost final values detected",
                started.elapsed()
            );
            assert!(stale * 3 > *seeds, "too few stale-read candidates: {stale}");
            assert!(lost * 3 > *seeds, "too few lost-write candidates: {lost}");
        }
    }

    fn perf_run(label: &str, seed: u64, cfg: &GenConfig) -> std::time::Duration {
        let (history, finals) = generate(seed, cfg);
        let start = Instant::now();
        let report = check(&history, &CheckOptions::default());
        let elapsed = start.elapsed();
        let states: usize = report.keys.iter().map(|k| k.states_explored).sum();
        let pruned: usize = report.keys.iter().map(|k| k.unknown_pruned).sum();
        println!(
            "{label}: checked {} ops on {} keys in {elapsed:?} ({states} states, {pruned} unknown ops pruned)",
            report.total_ops(),
            report.keys.len()
        );
        assert!(report.is_linearizable(), "seed {seed}: {report}");
        assert!(report.inconclusive().is_empty(), "seed {seed}: {report}");
        let start = Instant::now();
        assert!(lost_writes(&history, &finals).is_empty());
        println!("{label}: lost_writes in {:?}", start.elapsed());
        elapsed
    }

    #[test]
    fn perf_50k_ops_100_keys_16_clients() {
        let cfg = GenConfig {
            ops: 50_000,
            keys: 100,
            clients: 16,
            unknown: 0.03,
            failed: 0.01,
            values: 5,
            max_gap: 100,
            max_duration: 1_000,
        };
        let elapsed = perf_run("perf 50k/100/16", 42, &cfg);
        // Generous: debug builds on slow CI machines.
        assert!(elapsed.as_secs() < 60, "too slow: {elapsed:?}");
    }

    /// The upper end of the expected load, and hot keys; run with
    /// `cargo test --release -- --ignored --nocapture perf_200k`.
    #[test]
    #[ignore]
    fn perf_200k_ops_64_clients() {
        // (ops, keys, clients, unknown, distinct values); the last ones are
        // hot keys: ~6 and ~15 operations in flight on a key at all times.
        let scenarios = [
            (200_000, 1000, 64, 0.03, 5),
            (200_000, 100, 64, 0.03, 5),
            (200_000, 100, 64, 0.10, 5),
            (200_000, 100, 64, 0.03, 1_000_000),
            (200_000, 10, 64, 0.03, 5),
            (50_000, 1, 16, 0.03, 5),
        ];
        for (ops, keys, clients, unknown, values) in scenarios {
            let cfg = GenConfig {
                ops,
                keys,
                clients,
                unknown,
                failed: 0.01,
                values,
                max_gap: 100,
                max_duration: 1_000,
            };
            let label = format!(
                "perf {ops} ops/{keys} keys/{clients} clients, unknown={unknown}, values={values}"
            );
            let elapsed = perf_run(&label, 7, &cfg);
            assert!(elapsed.as_secs() < 60, "too slow: {elapsed:?}");
        }
    }

    // ----- cross-check against a brute-force reference -----------------------

    /// Reference semantics, written independently of the checker: tries
    /// every order of every subset of operations that contains all
    /// completed ones (Unknown ones are optional; an Unknown CAS swaps or
    /// fails its compare depending on the value), respecting real time,
    /// against a sequential register. The only optimisation is remembering
    /// failed (set of done operations, value) pairs. Small histories only.
    fn brute_force_linearizable(history: &[Operation], initial: Option<&str>) -> bool {
        fn next_values(op: &Operation, v: &Option<String>) -> Vec<Option<String>> {
            match (&op.kind, &op.outcome) {
                (OpKind::Get, Outcome::GetOk(r)) if r == v => vec![v.clone()],
                (OpKind::Get, _) => vec![],
                (OpKind::Put(x), _) => vec![Some(x.clone())],
                (OpKind::Delete, _) => vec![None],
                (OpKind::Cas { expected, new }, Outcome::CasOk(true)) if expected == v => {
                    vec![new.clone()]
                }
                (OpKind::Cas { expected, .. }, Outcome::CasOk(false)) if expected != v => {
                    vec![v.clone()]
                }
                (OpKind::Cas { expected, .. }, Outcome::CasFailed(cur))
                    if expected != v && cur == v =>
                {
                    vec![v.clone()]
                }
                (OpKind::Cas { expected, new }, Outcome::Unknown) => {
                    vec![if expected == v {
                        new.clone()
                    } else {
                        v.clone()
                    }]
                }
                (OpKind::Cas { .. }, _) => vec![],
            }
        }
        type Failed = HashSet<(Vec<bool>, Option<String>)>;
        fn search(
            ops: &[&Operation],
            done: &mut [bool],
            v: Option<String>,
            failed: &mut Failed,
        ) -> bool {
            if failed.contains(&(done.to_vec(), v.clone())) {
                return false;
            }
            let finished = ops
                .iter()
                .zip(done.iter())
                .all(|(o, d)| *d || o.outcome == Outcome::Unknown);
            if finished {
                return true;
            }
            for i in 0..ops.len() {
                if done[i] {
                    continue;
                }
                let must_wait = (0..ops.len()).any(|j| {
                    !done[j]
                        && j != i
                        && ops[j].outcome != Outcome::Unknown
                        && ops[j].complete_ns < ops[i].invoke_ns
                });
                if must_wait {
                    continue;
                }
                for nv in next_values(ops[i], &v) {
                    done[i] = true;
                    if search(ops, done, nv, failed) {
                        return true;
                    }
                    done[i] = false;
                }
            }
            failed.insert((done.to_vec(), v));
            false
        }
        let ops: Vec<&Operation> = history
            .iter()
            .filter(|o| o.outcome != Outcome::Failed)
            .filter(|o| !(o.kind == OpKind::Get && o.outcome == Outcome::Unknown))
            .collect();
        let mut failed = Failed::new();
        search(
            &ops,
            &mut vec![false; ops.len()],
            initial.map(str::to_string),
            &mut failed,
        )
    }

    fn random_small_history(rng: &mut Rng, n: usize) -> Vec<Operation> {
        let pool = [None, s("a"), s("b"), s("c")];
        let pick = |rng: &mut Rng| pool[rng.below(pool.len() as u64) as usize].clone();
        (0..n)
            .map(|i| {
                let invoke = rng.below(30);
                let complete = invoke + rng.below(12);
                let kind = match rng.below(5) {
                    0 | 1 => OpKind::Get,
                    2 => OpKind::Put(pick(rng).unwrap_or_else(|| "a".into())),
                    3 => OpKind::Delete,
                    _ => OpKind::Cas {
                        expected: pick(rng),
                        new: pick(rng),
                    },
                };
                let outcome = if rng.chance(0.2) {
                    Outcome::Unknown
                } else if rng.chance(0.05) {
                    Outcome::Failed
                } else {
                    match kind {
                        OpKind::Get => Outcome::GetOk(pick(rng)),
                        OpKind::Put(_) => Outcome::PutOk,
                        OpKind::Delete => Outcome::DeleteOk,
                        OpKind::Cas { .. } => Outcome::CasOk(rng.chance(0.5)),
                    }
                };
                Operation {
                    client: i as u64,
                    key: "k".into(),
                    kind,
                    invoke_ns: invoke,
                    complete_ns: complete,
                    outcome,
                }
            })
            .collect()
    }

    #[test]
    fn agrees_with_brute_force_on_small_histories() {
        let mut verdicts = [0usize; 2];
        for seed in 0..6000u64 {
            let mut rng = Rng(seed);
            let n = 1 + rng.below(12) as usize;
            let mut history = if seed % 2 == 0 {
                random_small_history(&mut rng, n)
            } else {
                // Linearizable by construction, then maybe one op mutated.
                let cfg = GenConfig {
                    ops: n,
                    keys: 1,
                    clients: 1 + rng.below(4) as usize,
                    unknown: 0.25,
                    failed: 0.05,
                    values: 2,
                    max_gap: 5,
                    max_duration: 15,
                };
                generate(seed, &cfg).0
            };
            if seed % 4 == 1 {
                let other = random_small_history(&mut rng, n);
                let i = rng.below(n as u64) as usize;
                history[i].kind = other[i].kind.clone();
                history[i].outcome = other[i].outcome.clone();
            }
            for o in &mut history {
                o.key = "k".into();
            }
            let initial = if seed % 3 == 0 { Some("a") } else { None };
            let opts = CheckOptions {
                initial: initial.map(str::to_string),
                ..CheckOptions::default()
            };
            let expected = brute_force_linearizable(&history, initial);
            let report = check(&history, &opts);
            assert!(report.inconclusive().is_empty(), "seed {seed}: {report}");
            assert_eq!(
                report.is_linearizable(),
                expected,
                "seed {seed}: checker and brute force disagree (initial {initial:?}): {report}\n{}",
                serde_json::to_string_pretty(&history).unwrap()
            );
            verdicts[expected as usize] += 1;

            // The same with a final read of a random value.
            let final_value = [None, s("a"), s("b"), s("c")][rng.below(4) as usize].clone();
            let mut extended = history.clone();
            extended.push(Operation {
                client: 99,
                key: "k".into(),
                kind: OpKind::Get,
                invoke_ns: u64::MAX,
                complete_ns: u64::MAX,
                outcome: Outcome::GetOk(final_value.clone()),
            });
            let expected = brute_force_linearizable(&extended, initial);
            let finals = HashMap::from([("k".to_string(), final_value.clone())]);
            let report = check_with_final_values(&history, &finals, &opts);
            assert_eq!(
                report.is_linearizable(),
                expected,
                "seed {seed}: final value {final_value:?}: {report}\n{}",
                serde_json::to_string_pretty(&history).unwrap()
            );
        }
        println!(
            "verdicts: {} not linearizable, {} linearizable",
            verdicts[0], verdicts[1]
        );
        assert!(verdicts[0] > 1000 && verdicts[1] > 1000, "{verdicts:?}");
    }
}
