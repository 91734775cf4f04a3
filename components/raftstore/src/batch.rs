//! The batch system: many finite-state machines (one per region), a fixed pool of poller
//! threads, and mailboxes that schedule an FSM onto the pool only when it has work.
//!
//! - An FSM is either *idle* (parked inside its mailbox) or *scheduled* (owned by exactly one
//!   poller, or waiting in the pool's queue). Sending to an idle FSM's mailbox takes it out and
//!   queues it; sending to a scheduled one only queues the message.
//! - A poller takes a batch of FSMs, lets the handler process each one's messages, then calls
//!   [`PollHandler::end`] once for the whole batch: that is where the raft poller writes one
//!   `WriteBatch` with one fsync for every region of the round.
//! - No thread, task or timer exists per FSM: an idle region costs a parked box.
//! - The pool's queue holds each FSM at most once (sending moves a parked FSM into it; a
//!   scheduled one is not parked), so its length is bounded by the number of FSMs; mailboxes
//!   are bounded by their capacity for outside traffic (`try_send`).
//!
//! - The pool's queue ([`ReadyQueue`]) parks an idle poller at once, without spinning or
//!   yielding first: on a machine with few cores and many busy threads (every store's pollers,
//!   its gRPC workers, RocksDB's, other processes), a spinning wait takes the core from the
//!   thread that would have sent the work (crossbeam's channel spun and called `sched_yield`
//!   about ten times per wait: 5,000 calls per second per store at 400 puts/s).
//!
//! Race-freedom of the idle/scheduled hand-off: a sender enqueues and then, under the slot
//! lock, takes the FSM if it is parked; a poller parks the FSM under the same lock only if the
//! queue is empty. So a message is never left in the queue of a parked FSM.

use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The pool's queue of scheduled FSMs: a FIFO whose consumers block on a condition variable
/// (parking_lot's: no spinning before the thread sleeps). Its length is bounded by the number
/// of FSMs (see the module comment), so it needs no capacity of its own. Once closed (the
/// pool shut down) it drops what it holds and everything sent to it: queued FSMs hold their
/// mailboxes, which hold the queue, and nothing would ever free them (nor the engine they
/// hold open).
struct ReadyQueue<T> {
    state: Mutex<(VecDeque<T>, bool)>,
    ready: Condvar,
}

impl<T> ReadyQueue<T> {
    fn new() -> Arc<Self> {
        Arc::new(ReadyQueue {
            state: Mutex::new((VecDeque::new(), false)),
            ready: Condvar::new(),
        })
    }

    fn send(&self, t: T) {
        let mut s = self.state.lock();
        if s.1 {
            drop(s);
            drop(t);
            return;
        }
        s.0.push_back(t);
        drop(s);
        self.ready.notify_one();
    }

    /// The oldest item, waiting for one.
    fn recv(&self) -> T {
        let mut s = self.state.lock();
        loop {
            if let Some(t) = s.0.pop_front() {
                return t;
            }
            self.ready.wait(&mut s);
        }
    }

    fn try_recv(&self) -> Option<T> {
        self.state.lock().0.pop_front()
    }

    /// Drops what is queued, and from now on what is sent.
    fn close(&self) {
        let items = {
            let mut s = self.state.lock();
            s.1 = true;
            std::mem::take(&mut s.0)
        };
        drop(items);
    }
}

pub trait Fsm: Send + 'static {
    type Message: Send + 'static;

    /// Set once the FSM has stopped: its mailbox closes when the poller releases it.
    fn is_stopped(&self) -> bool;

    /// Whether the FSM wants another round although no message is queued.
    fn needs_poll(&self) -> bool {
        false
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum SendError<T> {
    /// The mailbox holds its capacity of messages: back off.
    Full(T),
    /// The FSM is gone.
    Closed(T),
}

impl<T> SendError<T> {
    pub fn into_inner(self) -> T {
        match self {
            SendError::Full(t) | SendError::Closed(t) => t,
        }
    }
}

struct Slot<F: Fsm> {
    queue: VecDeque<F::Message>,
    parked: Option<Box<F>>,
    closed: bool,
}

struct MailboxInner<F: Fsm> {
    slot: Mutex<Slot<F>>,
    capacity: usize,
    scheduler: Arc<ReadyQueue<Scheduled<F>>>,
}

pub struct Mailbox<F: Fsm> {
    inner: Arc<MailboxInner<F>>,
}

impl<F: Fsm> Clone for Mailbox<F> {
    fn clone(&self) -> Self {
        Mailbox {
            inner: self.inner.clone(),
        }
    }
}

enum Scheduled<F: Fsm> {
    Fsm(Box<F>, Mailbox<F>),
    Stop,
}

impl<F: Fsm> Mailbox<F> {
    fn new(fsm: Box<F>, capacity: usize, scheduler: Arc<ReadyQueue<Scheduled<F>>>) -> Self {
        Mailbox {
            inner: Arc::new(MailboxInner {
                slot: Mutex::new(Slot {
                    queue: VecDeque::new(),
                    parked: Some(fsm),
                    closed: false,
                }),
                capacity,
                scheduler,
            }),
        }
    }

    /// Sends unless the mailbox is full (for traffic from outside: proposals, raft messages).
    pub fn try_send(&self, msg: F::Message) -> Result<(), SendError<F::Message>> {
        self.send(msg, false)
    }

    /// Sends even past capacity (for internal messages that must not be lost: apply results,
    /// ticks, snapshot notifications).
    pub fn force_send(&self, msg: F::Message) -> Result<(), SendError<F::Message>> {
        self.send(msg, true)
    }

    fn send(&self, msg: F::Message, force: bool) -> Result<(), SendError<F::Message>> {
        let mut slot = self.inner.slot.lock();
        if slot.closed {
            return Err(SendError::Closed(msg));
        }
        if !force && slot.queue.len() >= self.inner.capacity {
            return Err(SendError::Full(msg));
        }
        slot.queue.push_back(msg);
        if let Some(fsm) = slot.parked.take() {
            drop(slot);
            // The pool outlives every mailbox while running; after shutdown the FSM is dropped.
            self.inner.scheduler.send(Scheduled::Fsm(fsm, self.clone()));
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.inner.slot.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_closed(&self) -> bool {
        self.inner.slot.lock().closed
    }

    /// Moves queued messages into `out` (which must be empty).
    pub(crate) fn drain_into(&self, out: &mut VecDeque<F::Message>) {
        let mut slot = self.inner.slot.lock();
        std::mem::swap(&mut slot.queue, out);
    }

    /// Parks the FSM unless messages arrived meanwhile; returns it back if it must keep running.
    fn release(&self, fsm: Box<F>) -> Option<Box<F>> {
        let mut slot = self.inner.slot.lock();
        if fsm.is_stopped() {
            slot.closed = true;
            slot.queue.clear();
            return None;
        }
        if !slot.queue.is_empty() || fsm.needs_poll() {
            return Some(fsm);
        }
        slot.parked = Some(fsm);
        None
    }

    /// Closes the mailbox; returns the parked FSM if it was idle (so the caller can drop it).
    pub fn close(&self) -> Option<Box<F>> {
        let mut slot = self.inner.slot.lock();
        slot.closed = true;
        slot.queue.clear();
        slot.parked.take()
    }
}

/// Region id to mailbox.
pub struct Router<F: Fsm> {
    mailboxes: RwLock<HashMap<u64, Mailbox<F>>>,
    scheduler: Arc<ReadyQueue<Scheduled<F>>>,
    capacity: usize,
}

impl<F: Fsm> Router<F> {
    pub fn mailbox(&self, id: u64) -> Option<Mailbox<F>> {
        self.mailboxes.read().get(&id).cloned()
    }

    /// Registers a new FSM (idle). Replaces and closes any previous one under that id.
    pub fn register(&self, id: u64, fsm: Box<F>) -> Mailbox<F> {
        let mb = Mailbox::new(fsm, self.capacity, self.scheduler.clone());
        if let Some(old) = self.mailboxes.write().insert(id, mb.clone()) {
            old.close();
        }
        mb
    }

    /// Removes the mailbox if it is still the one given (a later registration wins).
    pub fn unregister(&self, id: u64, mb: &Mailbox<F>) {
        let mut m = self.mailboxes.write();
        if m.get(&id)
            .is_some_and(|cur| Arc::ptr_eq(&cur.inner, &mb.inner))
        {
            m.remove(&id);
        }
    }

    pub fn try_send(&self, id: u64, msg: F::Message) -> Result<(), SendError<F::Message>> {
        match self.mailbox(id) {
            Some(mb) => mb.try_send(msg),
            None => Err(SendError::Closed(msg)),
        }
    }

    pub fn force_send(&self, id: u64, msg: F::Message) -> Result<(), SendError<F::Message>> {
        match self.mailbox(id) {
            Some(mb) => mb.force_send(msg),
            None => Err(SendError::Closed(msg)),
        }
    }

    pub fn ids(&self) -> Vec<u64> {
        self.mailboxes.read().keys().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.mailboxes.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every mailbox (at shutdown) and returns the parked FSMs.
    pub fn close_all(&self) -> Vec<Box<F>> {
        let mbs: Vec<_> = self.mailboxes.write().drain().map(|(_, m)| m).collect();
        mbs.into_iter().filter_map(|m| m.close()).collect()
    }
}

/// What a poller thread does with a batch.
pub trait PollHandler<F: Fsm>: Send + 'static {
    /// Start of a round.
    fn begin(&mut self, batch_len: usize);
    /// Processes one FSM's messages (the queue is drained into `msgs`).
    fn handle(&mut self, fsm: &mut F, msgs: &mut VecDeque<F::Message>);
    /// End of a round, once every FSM of the batch was handled.
    fn end(&mut self, batch: &mut [Box<F>]);
    /// The thread is exiting.
    fn shutdown(&mut self) {}
}

pub struct BatchSystem<F: Fsm> {
    router: Arc<Router<F>>,
    receiver: Arc<ReadyQueue<Scheduled<F>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    max_batch: usize,
}

impl<F: Fsm> BatchSystem<F> {
    pub fn new(mailbox_capacity: usize, max_batch: usize) -> Self {
        let (tx, rx) = {
            let q = ReadyQueue::new();
            (q.clone(), q)
        };
        BatchSystem {
            router: Arc::new(Router {
                mailboxes: RwLock::new(HashMap::new()),
                scheduler: tx,
                capacity: mailbox_capacity,
            }),
            receiver: rx,
            threads: Mutex::new(vec![]),
            max_batch: max_batch.max(1),
        }
    }

    pub fn router(&self) -> Arc<Router<F>> {
        self.router.clone()
    }

    /// Starts `n` poller threads named `name-i`, each with a handler from `make`.
    pub fn spawn<H: PollHandler<F>>(&self, name: &str, n: usize, mut make: impl FnMut(usize) -> H) {
        let mut threads = self.threads.lock();
        for i in 0..n {
            let rx = self.receiver.clone();
            let mut handler = make(i);
            let max_batch = self.max_batch;
            let h = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || poll_loop(rx, &mut handler, max_batch))
                .expect("spawn poller thread");
            threads.push(h);
        }
    }

    /// Stops the pollers (after their current round) and joins them.
    pub fn shutdown(&self) {
        let threads: Vec<_> = std::mem::take(&mut *self.threads.lock());
        for _ in 0..threads.len() {
            self.router.scheduler.send(Scheduled::Stop);
        }
        for t in threads {
            let _ = t.join();
        }
        // FSMs still queued, or sent after this, would otherwise never be freed.
        self.receiver.close();
    }
}

fn poll_loop<F: Fsm, H: PollHandler<F>>(
    rx: Arc<ReadyQueue<Scheduled<F>>>,
    handler: &mut H,
    max_batch: usize,
) {
    let mut batch: Vec<Box<F>> = Vec::with_capacity(max_batch);
    let mut boxes: Vec<Mailbox<F>> = Vec::with_capacity(max_batch);
    let mut msgs = VecDeque::new();
    let mut stopping = false;
    loop {
        // Block only when nothing is carried over from the previous round.
        if batch.is_empty() {
            if stopping {
                break;
            }
            match rx.recv() {
                Scheduled::Fsm(f, mb) => {
                    batch.push(f);
                    boxes.push(mb);
                }
                Scheduled::Stop => break,
            }
        }
        while batch.len() < max_batch && !stopping {
            match rx.try_recv() {
                Some(Scheduled::Fsm(f, mb)) => {
                    batch.push(f);
                    boxes.push(mb);
                }
                Some(Scheduled::Stop) => stopping = true,
                None => break,
            }
        }
        handler.begin(batch.len());
        for (fsm, mb) in batch.iter_mut().zip(boxes.iter()) {
            mb.drain_into(&mut msgs);
            handler.handle(fsm, &mut msgs);
            msgs.clear();
        }
        handler.end(&mut batch);
        // Park what has no more work; keep the rest for the next round.
        let mut kept = 0;
        let old_batch = std::mem::take(&mut batch);
        let old_boxes = std::mem::take(&mut boxes);
        for (fsm, mb) in old_batch.into_iter().zip(old_boxes) {
            if let Some(fsm) = mb.release(fsm) {
                kept += 1;
                batch.push(fsm);
                boxes.push(mb);
            }
        }
        let _ = kept;
    }
    // Hand back what this poller still holds so nothing is lost at shutdown.
    for (fsm, mb) in batch.into_iter().zip(boxes) {
        let mut slot = mb.inner.slot.lock();
        if !slot.closed {
            slot.parked = Some(fsm);
        }
    }
    handler.shutdown();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counter {
        seen: Arc<AtomicUsize>,
        stop_at: usize,
        stopped: bool,
    }

    impl Fsm for Counter {
        type Message = usize;
        fn is_stopped(&self) -> bool {
            self.stopped
        }
    }

    struct H {
        rounds: Arc<AtomicUsize>,
    }

    impl PollHandler<Counter> for H {
        fn begin(&mut self, _: usize) {}
        fn handle(&mut self, fsm: &mut Counter, msgs: &mut VecDeque<usize>) {
            for _ in msgs.drain(..) {
                let n = fsm.seen.fetch_add(1, Ordering::SeqCst) + 1;
                if n == fsm.stop_at {
                    fsm.stopped = true;
                }
            }
        }
        fn end(&mut self, _: &mut [Box<Counter>]) {
            self.rounds.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn every_message_is_handled_and_batched() {
        let sys = BatchSystem::<Counter>::new(1024, 256);
        let rounds = Arc::new(AtomicUsize::new(0));
        let r2 = rounds.clone();
        sys.spawn("test-poller", 2, move |_| H { rounds: r2.clone() });
        let router = sys.router();
        let counters: Vec<_> = (0..500).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        for (i, c) in counters.iter().enumerate() {
            router.register(
                i as u64,
                Box::new(Counter {
                    seen: c.clone(),
                    stop_at: 0,
                    stopped: false,
                }),
            );
        }
        let senders: Vec<_> = (0..4)
            .map(|_| {
                let router = router.clone();
                std::thread::spawn(move || {
                    for round in 0..50 {
                        for id in 0..500u64 {
                            router.force_send(id, round).unwrap();
                        }
                    }
                })
            })
            .collect();
        for s in senders {
            s.join().unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while counters.iter().any(|c| c.load(Ordering::SeqCst) < 200) {
            assert!(std::time::Instant::now() < deadline, "messages lost");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(counters.iter().all(|c| c.load(Ordering::SeqCst) == 200));
        // 100,000 messages in far fewer rounds.
        assert!(rounds.load(Ordering::SeqCst) < 100_000);
        sys.shutdown();
    }

    #[test]
    fn full_and_closed_mailboxes() {
        let sys = BatchSystem::<Counter>::new(2, 8);
        let router = sys.router();
        let seen = Arc::new(AtomicUsize::new(0));
        router.register(
            1,
            Box::new(Counter {
                seen: seen.clone(),
                stop_at: 3,
                stopped: false,
            }),
        );
        // No pollers yet: the mailbox fills up.
        router.try_send(1, 0).unwrap();
        router.try_send(1, 0).unwrap();
        assert_eq!(router.try_send(1, 0), Err(SendError::Full(0)));
        router.force_send(1, 0).unwrap();
        let rounds = Arc::new(AtomicUsize::new(0));
        sys.spawn("test-poller", 1, move |_| H {
            rounds: rounds.clone(),
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !router.mailbox(1).unwrap().is_closed() {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(matches!(router.try_send(1, 0), Err(SendError::Closed(0))));
        assert!(matches!(router.try_send(9, 0), Err(SendError::Closed(0))));
        sys.shutdown();
    }

    /// After shutdown an FSM is freed, also when a message arrives for it later (a queued FSM
    /// holds its mailbox, which holds the queue: kept, they would hold each other, and the
    /// FSM its engine, forever; a restarted store then found its RocksDB still locked).
    #[test]
    fn shutdown_frees_the_fsms_also_when_sent_to_later() {
        let sys = BatchSystem::<Counter>::new(16, 8);
        let rounds = Arc::new(AtomicUsize::new(0));
        sys.spawn("test-poller", 1, move |_| H {
            rounds: rounds.clone(),
        });
        let router = sys.router();
        let seen = Arc::new(AtomicUsize::new(0));
        router.register(
            1,
            Box::new(Counter {
                seen: seen.clone(),
                stop_at: 0,
                stopped: false,
            }),
        );
        router.force_send(1, 0).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while seen.load(Ordering::SeqCst) < 1 {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        sys.shutdown();
        let _ = router.force_send(1, 0);
        assert_eq!(Arc::strong_count(&seen), 1, "the FSM is still alive");
    }
}
