//! What the apply side tells the rest of the node about applied writes: the one hook a change
//! feed needs ([`ApplyObserver`]). The raftstore knows nothing of what the writes mean; the
//! observer (the storage layer's change log) decodes them.

/// One write to the `write` column family, staged by a region's apply (raw key and value).
#[derive(Clone, Debug)]
pub struct ObservedWrite {
    pub region_id: u64,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// Called on the apply threads. Cheap when nothing is observed: `observes` is asked once per
/// command and must not block.
pub trait ApplyObserver: Send + Sync {
    /// Whether the writes of `region_id` are wanted.
    fn observes(&self, region_id: u64) -> bool;
    /// The observed writes of a batch, in apply order, *before* the batch is written: whoever
    /// later finds them in the engine can be sure they were handed over first.
    fn before_write(&self, writes: &[ObservedWrite]);
    /// The batch holding `writes` (the same slice as [`ApplyObserver::before_write`]) is
    /// written.
    fn after_write(&self, writes: &[ObservedWrite]);
    /// The region's data changed by other means than applied commands (a snapshot was
    /// applied, or the peer was destroyed): what was observed of it no longer tells the whole
    /// story.
    fn reset(&self, region_id: u64);
}
