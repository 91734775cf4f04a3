//! etcd's server errors (`api/v3rpc/rpctypes/error.go` of etcd v3.5.17), one function per error,
//! each a [`tonic::Status`] with etcd's exact code and message. Clients match these by message
//! (`rpctypes.Error` maps a status back to its error by its description), so a message must
//! never be reworded.
//!
//! Atoll's own conditions that etcd has no word for are answered with a status whose message
//! starts with `atoll: ` (see [`atoll`]).

use tonic::{Code, Status};

macro_rules! etcd_errors {
    ($( $(#[$doc:meta])* $name:ident => $code:ident, $msg:literal; )*) => {
        $(
            $(#[$doc])*
            #[doc = concat!("`", stringify!($code), "`: \"", $msg, "\"")]
            pub fn $name() -> Status {
                Status::new(Code::$code, $msg)
            }
        )*

        /// Every error above: (function name, gRPC code, message).
        pub const ALL: &[(&str, Code, &str)] = &[
            $( (stringify!($name), Code::$code, $msg), )*
        ];
    };
}

etcd_errors! {
    // Requests.
    empty_key => InvalidArgument, "etcdserver: key is not provided";
    /// A `Put` with `ignore_value` or `ignore_lease` on a key that does not exist.
    key_not_found => InvalidArgument, "etcdserver: key not found";
    value_provided => InvalidArgument, "etcdserver: value is provided";
    lease_provided => InvalidArgument, "etcdserver: lease is provided";
    too_many_ops => InvalidArgument, "etcdserver: too many operations in txn request";
    duplicate_key => InvalidArgument, "etcdserver: duplicate key given in txn request";
    compacted => OutOfRange, "etcdserver: mvcc: required revision has been compacted";
    future_rev => OutOfRange, "etcdserver: mvcc: required revision is a future revision";
    no_space => ResourceExhausted, "etcdserver: mvcc: database space exceeded";

    // Leases.
    lease_not_found => NotFound, "etcdserver: requested lease not found";
    lease_exist => FailedPrecondition, "etcdserver: lease already exists";
    lease_ttl_too_large => OutOfRange, "etcdserver: too large lease TTL";

    // Watches.
    watch_canceled => Cancelled, "etcdserver: watch canceled";

    // Membership.
    member_exist => FailedPrecondition, "etcdserver: member ID already exist";
    peer_url_exist => FailedPrecondition, "etcdserver: Peer URLs already exists";
    member_not_enough_started => FailedPrecondition, "etcdserver: re-configuration failed due to not enough started members";
    member_bad_urls => InvalidArgument, "etcdserver: given member URLs are invalid";
    member_not_found => NotFound, "etcdserver: member not found";
    member_not_learner => FailedPrecondition, "etcdserver: can only promote a learner member";
    learner_not_ready => FailedPrecondition, "etcdserver: can only promote a learner member which is in sync with leader";
    too_many_learners => FailedPrecondition, "etcdserver: too many learner members in cluster";
    cluster_id_mismatch => FailedPrecondition, "etcdserver: cluster ID mismatch";

    // Size and rate.
    request_too_large => InvalidArgument, "etcdserver: request is too large";
    too_many_requests => ResourceExhausted, "etcdserver: too many requests";

    // Authentication.
    root_user_not_exist => FailedPrecondition, "etcdserver: root user does not exist";
    root_role_not_exist => FailedPrecondition, "etcdserver: root user does not have root role";
    user_already_exist => FailedPrecondition, "etcdserver: user name already exists";
    user_empty => InvalidArgument, "etcdserver: user name is empty";
    user_not_found => FailedPrecondition, "etcdserver: user name not found";
    role_already_exist => FailedPrecondition, "etcdserver: role name already exists";
    role_not_found => FailedPrecondition, "etcdserver: role name not found";
    role_empty => InvalidArgument, "etcdserver: role name is empty";
    auth_failed => InvalidArgument, "etcdserver: authentication failed, invalid user ID or password";
    permission_not_given => InvalidArgument, "etcdserver: permission not given";
    permission_denied => PermissionDenied, "etcdserver: permission denied";
    role_not_granted => FailedPrecondition, "etcdserver: role is not granted to the user";
    permission_not_granted => FailedPrecondition, "etcdserver: permission is not granted to the role";
    auth_not_enabled => FailedPrecondition, "etcdserver: authentication is not enabled";
    invalid_auth_token => Unauthenticated, "etcdserver: invalid auth token";
    invalid_auth_mgmt => InvalidArgument, "etcdserver: invalid auth management";
    auth_old_revision => InvalidArgument, "etcdserver: revision of auth store is old";

    // Availability. Clients retry `Unavailable` for idempotent calls.
    no_leader => Unavailable, "etcdserver: no leader";
    not_leader => FailedPrecondition, "etcdserver: not leader";
    leader_changed => Unavailable, "etcdserver: leader changed";
    not_capable => Unavailable, "etcdserver: not capable";
    stopped => Unavailable, "etcdserver: server stopped";
    timeout => Unavailable, "etcdserver: request timed out";
    timeout_due_to_leader_fail => Unavailable, "etcdserver: request timed out, possibly due to previous leader failure";
    timeout_due_to_connection_lost => Unavailable, "etcdserver: request timed out, possibly due to connection lost";
    timeout_wait_applied_index => Unavailable, "etcdserver: request timed out, waiting for the applied index took too long";
    unhealthy => Unavailable, "etcdserver: unhealthy cluster";
    corrupt => DataLoss, "etcdserver: corrupt cluster";
    not_supported_for_learner => Unavailable, "etcdserver: rpc not supported for learner";
    bad_leader_transferee => FailedPrecondition, "etcdserver: bad leader transferee";

    // Downgrades.
    cluster_version_unavailable => Unavailable, "etcdserver: cluster version not found during downgrade";
    wrong_downgrade_version_format => InvalidArgument, "etcdserver: wrong downgrade target version format";
    invalid_downgrade_target_version => InvalidArgument, "etcdserver: invalid downgrade target version";
    downgrade_in_process => FailedPrecondition, "etcdserver: cluster has a downgrade job in progress";
    no_inflight_downgrade => FailedPrecondition, "etcdserver: no inflight downgrade job";

    // The caller went away or ran out of time.
    canceled => Cancelled, "etcdserver: request canceled";
    deadline_exceeded => DeadlineExceeded, "etcdserver: context deadline exceeded";
}

/// An Atoll condition etcd has no error for: `code` with the message `atoll: <what>`.
pub fn atoll(code: Code, what: impl std::fmt::Display) -> Status {
    Status::new(code, format!("atoll: {what}"))
}

/// `Unimplemented`, for an etcd call Atoll does not serve: `atoll: <what>`.
pub fn unimplemented(what: impl std::fmt::Display) -> Status {
    atoll(Code::Unimplemented, what)
}

/// A PD error as the status an etcd client acts on: timeouts as etcd's
/// [`timeout`] (which clients retry), an unreachable PD as `Unavailable`, the rest `Unknown`
/// (as etcd answers errors it has no mapping for).
pub fn from_pd(e: &atoll_pd_client::Error) -> Status {
    use atoll_pd_client::Error as E;
    match e {
        E::Timeout(_) => timeout(),
        E::Unreachable { .. } => atoll(Code::Unavailable, e),
        _ => atoll(Code::Unknown, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn messages_are_etcds() {
        assert_eq!(ALL.len(), 61);
        let mut names = HashSet::new();
        let mut messages = HashSet::new();
        for (name, code, msg) in ALL {
            assert!(names.insert(*name), "{name} twice");
            assert!(messages.insert(*msg), "{msg} twice");
            assert!(msg.starts_with("etcdserver: "), "{msg}");
            assert_ne!(*code, Code::Ok);
        }
        let s = key_not_found();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "etcdserver: key not found");
        assert_eq!(compacted().code(), Code::OutOfRange);
        assert_eq!(future_rev().code(), Code::OutOfRange);
        assert_eq!(lease_not_found().code(), Code::NotFound);
        assert_eq!(no_leader().code(), Code::Unavailable);
        assert_eq!(
            unimplemented("x").message(),
            "atoll: x",
            "atoll's own errors are marked as such"
        );
    }
}
