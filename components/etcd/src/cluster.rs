//! etcd's Cluster service. The members are the storage nodes that serve the API: PD's stores
//! in state Up, one member per store (id = store id, name `store-<id>`, client and peer URL
//! `http://<advertised address>`: a store takes clients and its peers on one port).
//!
//! Membership changes through etcd's calls are refused: a member joins by starting a storage
//! node with `--pd` and leaves with `kvctl store delete <id>` (PD moves its data away first).
//! An id that is no member gets etcd's own `member not found`; promoting a member gets etcd's
//! `can only promote a learner member` (every store is a voter); everything else gets
//! `Unimplemented` with the way to do it.

use crate::auth::Need;
use crate::context::EtcdContext;
use crate::errors;
use atoll_proto::etcdserverpb::cluster_server::Cluster;
use atoll_proto::etcdserverpb::{
    Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    MemberUpdateRequest, MemberUpdateResponse,
};
use atoll_proto::metapb;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct ClusterService {
    ctx: Arc<EtcdContext>,
}

impl ClusterService {
    pub fn new(ctx: Arc<EtcdContext>) -> Self {
        ClusterService { ctx }
    }

    /// The members: PD's Up stores, in id order.
    pub async fn members(&self) -> Result<Vec<Member>, Status> {
        let stores = self
            .ctx
            .pd
            .get_all_stores(true)
            .await
            .map_err(|e| errors::from_pd(&e))?;
        let mut members: Vec<Member> = stores
            .into_iter()
            .filter_map(|info| info.store)
            .filter(|s| s.state == metapb::StoreState::Up as i32)
            .map(|s| store_member(&s, self.ctx.url_scheme()))
            .collect();
        members.sort_by_key(|m| m.id);
        Ok(members)
    }

    async fn must_be_member(&self, id: u64) -> Result<(), Status> {
        if self.members().await?.iter().any(|m| m.id == id) {
            Ok(())
        } else {
            Err(errors::member_not_found())
        }
    }

    /// etcd's cluster header: no revision.
    fn header(&self) -> Option<atoll_proto::etcdserverpb::ResponseHeader> {
        Some(self.ctx.header(0))
    }
}

/// A store as an etcd member; `scheme`: `http` or `https` (the client port's).
pub fn store_member(s: &metapb::Store, scheme: &str) -> Member {
    let url = format!("{scheme}://{}", s.address);
    Member {
        id: s.id,
        name: format!("store-{}", s.id),
        peer_ur_ls: vec![url.clone()],
        client_ur_ls: vec![url],
        is_learner: false,
    }
}

/// etcd's check of peer URLs (`types.NewURLs`): each `scheme://host:port` with scheme http,
/// https, unix or unixs, a host with a port, and no path.
fn valid_peer_urls(urls: &[String]) -> bool {
    !urls.is_empty()
        && urls.iter().all(|u| {
            let Some((scheme, rest)) = u.split_once("://") else {
                return false;
            };
            if !matches!(scheme, "http" | "https" | "unix" | "unixs") {
                return false;
            }
            if rest.contains('/') {
                return false;
            }
            match rest.rsplit_once(':') {
                Some((host, port)) => {
                    !host.is_empty() && !port.is_empty() && port.parse::<u16>().is_ok()
                }
                None => false,
            }
        })
}

const HOW_TO_ADD: &str = "members are storage nodes: add one by starting a storage node with --pd";
const HOW_TO_REMOVE: &str =
    "members are storage nodes: remove one with `kvctl store delete <id>` (PD moves its data away first)";
const HOW_TO_UPDATE: &str =
    "members are storage nodes: a store's address changes by restarting it with a new --advertise-addr";

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        request: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        if !valid_peer_urls(&request.get_ref().peer_ur_ls) {
            return Err(errors::member_bad_urls());
        }
        self.ctx.auth.authorize(&request, &[Need::Admin]).await?;
        Err(errors::unimplemented(HOW_TO_ADD))
    }

    async fn member_remove(
        &self,
        request: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        // etcd's checkMembershipOperationPermission.
        self.ctx.auth.authorize(&request, &[Need::Admin]).await?;
        self.must_be_member(request.get_ref().id).await?;
        Err(errors::unimplemented(HOW_TO_REMOVE))
    }

    async fn member_update(
        &self,
        request: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        // etcd's checkMembershipOperationPermission.
        self.ctx.auth.authorize(&request, &[Need::Admin]).await?;
        self.must_be_member(request.get_ref().id).await?;
        Err(errors::unimplemented(HOW_TO_UPDATE))
    }

    /// `linearizable` is accepted: the list always comes from PD's leader.
    async fn member_list(
        &self,
        _request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let members = self.members().await?;
        Ok(Response::new(MemberListResponse {
            header: self.header(),
            members,
        }))
    }

    async fn member_promote(
        &self,
        request: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        // etcd's checkMembershipOperationPermission.
        self.ctx.auth.authorize(&request, &[Need::Admin]).await?;
        self.must_be_member(request.get_ref().id).await?;
        Err(errors::member_not_learner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_urls_are_checked_as_etcd_does() {
        let ok = |v: &[&str]| valid_peer_urls(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(ok(&["http://10.0.0.1:2380"]));
        assert!(ok(&["https://host:2380", "http://[::1]:2380"]));
        assert!(!ok(&[]));
        assert!(!ok(&["10.0.0.1:2380"]));
        assert!(!ok(&["ftp://h:1"]));
        assert!(!ok(&["http://h"]));
        assert!(!ok(&["http://h:1/path"]));
    }

    #[test]
    fn a_store_is_a_member() {
        let store = metapb::Store {
            id: 4,
            address: "127.0.0.1:20160".into(),
            ..Default::default()
        };
        let m = store_member(&store, "http");
        assert_eq!(m.id, 4);
        assert_eq!(m.name, "store-4");
        assert_eq!(m.client_ur_ls, vec!["http://127.0.0.1:20160".to_string()]);
        assert_eq!(m.peer_ur_ls, m.client_ur_ls);
        assert!(!m.is_learner);
        // With TLS on the client port, clients that sync their endpoints dial https.
        let m = store_member(&store, "https");
        assert_eq!(m.client_ur_ls, vec!["https://127.0.0.1:20160".to_string()]);
    }
}
