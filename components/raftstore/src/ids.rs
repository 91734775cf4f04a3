//! Ids that must not be mixed up: a region's, a store's and a peer's are all `u64` on the wire
//! (and in the protobuf types), so the raftstore's public surface takes them as newtypes.
//! `From<u64>` and `.get()` convert at the edges.

use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u64);

        impl $name {
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl From<u64> for $name {
            fn from(id: u64) -> Self {
                $name(id)
            }
        }

        impl From<$name> for u64 {
            fn from(id: $name) -> u64 {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// A region (one raft group).
    RegionId
);
id_type!(
    /// A store (one storage node's raftstore).
    StoreId
);
id_type!(
    /// A peer: one region's replica on one store.
    PeerId
);
