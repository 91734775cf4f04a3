//! Unit tests of the core, in-process over the memory engine with a recording transport (see
//! [`crate::test_support`]): no thread, no socket. Pollers are driven round by round by hand,
//! so each test can look between a round's handling and its write.

mod command;
mod conf_change;
mod crate_map;
mod hibernation;
mod life;
mod log_gc;
mod pd_report;
mod query;
mod ready;
mod split;
mod storage;
