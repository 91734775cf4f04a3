//! Who is on the other end of a connection, as the transport proved it.
//!
//! A server that terminates TLS puts a [`PeerIdentity`] into every request's extensions
//! (tonic copies a connection's `connect_info` into each request; the HTTP gateway sees the same
//! extensions). Authentication reads it there: with `--client-cert-auth` the certificate's
//! common name is the user, as in etcd. A plaintext connection carries no `PeerIdentity`.

/// The verified client certificate of a connection, if the client presented one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The subject common name (CN) of the client's leaf certificate.
    pub common_name: Option<String>,
    /// The peer's socket address.
    pub remote_addr: Option<std::net::SocketAddr>,
    /// The certificate chains to the cluster's peer CA (and its common name is allowed by
    /// `--peer-cert-allowed-cn`): a store or PD member, allowed on internal services.
    pub cluster_member: bool,
}
