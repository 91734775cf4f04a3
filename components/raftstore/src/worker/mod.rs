//! Background workers of a store, one thread (or task) each, fed by bounded queues from the
//! pollers ([`crate::task`]): snapshots ([`region`]), split checks ([`split_check`]) and PD
//! ([`pd`]).

pub mod pd;
pub mod region;
pub mod split_check;
