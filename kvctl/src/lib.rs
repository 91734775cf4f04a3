//! kvctl
