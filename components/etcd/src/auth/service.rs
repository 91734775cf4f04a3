//! etcd's `Auth` gRPC service over [`AuthStore`], with etcd's semantics and errors
//! (`server/auth/store.go`).

use super::{hash_password, AuthStore, Caller, Need, RoleRecord, UserRecord, ROOT_ROLE, ROOT_USER};
use crate::context::EtcdContext;
use crate::errors;
use atoll_proto::etcdserverpb::auth_server::Auth;
use atoll_proto::etcdserverpb::*;
use base64::Engine;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct AuthService {
    ctx: Arc<EtcdContext>,
}

impl AuthService {
    pub fn new(ctx: Arc<EtcdContext>) -> Self {
        AuthService { ctx }
    }

    fn auth(&self) -> &AuthStore {
        &self.ctx.auth
    }

    fn header(&self) -> Option<ResponseHeader> {
        Some(self.ctx.header(self.ctx.pd.tso_high_water() as i64))
    }

    /// The caller of `req` if it is an admin (root, or anyone while auth is disabled).
    async fn admin<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        self.auth().authorize(req, &[Need::Admin]).await
    }
}

/// The password hash for a new password: `hashed` (base64 of a bcrypt hash, etcd's
/// `hashedPassword`) if given, else the bcrypt hash of `password`.
async fn new_password(password: &str, hashed: &str) -> Result<Vec<u8>, Status> {
    if !hashed.is_empty() {
        return base64::engine::general_purpose::STANDARD
            .decode(hashed)
            .map_err(|_| {
                errors::atoll(tonic::Code::InvalidArgument, "hashedPassword is not base64")
            });
    }
    hash_password(password.to_string()).await
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(
        &self,
        req: Request<AuthEnableRequest>,
    ) -> Result<Response<AuthEnableResponse>, Status> {
        self.admin(&req).await?;
        self.auth()
            .mutate(|s| {
                if s.state.enabled {
                    return Ok(false);
                }
                let Some(root) = s.users.get(ROOT_USER) else {
                    return Err(errors::root_user_not_exist());
                };
                if !root.roles.iter().any(|r| r == ROOT_ROLE) {
                    return Err(errors::root_role_not_exist());
                }
                s.state.enabled = true;
                s.state.enabled_revision = s.state.revision;
                Ok(true)
            })
            .await?;
        Ok(Response::new(AuthEnableResponse {
            header: self.header(),
        }))
    }

    async fn auth_disable(
        &self,
        req: Request<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        self.admin(&req).await?;
        self.auth()
            .mutate(|s| {
                if !s.state.enabled {
                    return Ok(false);
                }
                s.state.enabled = false;
                Ok(true)
            })
            .await?;
        Ok(Response::new(AuthDisableResponse {
            header: self.header(),
        }))
    }

    async fn auth_status(
        &self,
        _req: Request<AuthStatusRequest>,
    ) -> Result<Response<AuthStatusResponse>, Status> {
        self.auth().refresh().await?;
        let s = self.auth().state();
        Ok(Response::new(AuthStatusResponse {
            header: self.header(),
            enabled: s.enabled(),
            auth_revision: s.revision(),
        }))
    }

    async fn authenticate(
        &self,
        req: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let r = req.into_inner();
        let token = match self.auth().authenticate(&r.name, &r.password).await {
            Ok(t) => t,
            Err(e) => {
                // Perhaps a change made on another store is not here yet: read and try once more.
                self.auth().refresh().await?;
                self.auth()
                    .authenticate(&r.name, &r.password)
                    .await
                    .map_err(|_| e)?
            }
        };
        Ok(Response::new(AuthenticateResponse {
            header: self.header(),
            token,
        }))
    }

    async fn user_add(
        &self,
        req: Request<AuthUserAddRequest>,
    ) -> Result<Response<AuthUserAddResponse>, Status> {
        self.admin(&req).await?;
        let r = req.into_inner();
        if r.name.is_empty() {
            return Err(errors::user_empty());
        }
        self.auth().refresh().await?;
        if self.auth().state().users.contains_key(&r.name) {
            return Err(errors::user_already_exist());
        }
        let no_password = r.options.as_ref().is_some_and(|o| o.no_password);
        let password = if no_password {
            vec![]
        } else {
            new_password(&r.password, &r.hashed_password).await?
        };
        self.auth()
            .mutate(|s| {
                if s.users.contains_key(&r.name) {
                    return Err(errors::user_already_exist());
                }
                s.users.insert(
                    r.name.clone(),
                    UserRecord {
                        name: r.name.clone(),
                        password: password.clone(),
                        roles: vec![],
                        no_password,
                        tokens_from: s.state.revision,
                    },
                );
                Ok(true)
            })
            .await?;
        Ok(Response::new(AuthUserAddResponse {
            header: self.header(),
        }))
    }

    async fn user_get(
        &self,
        req: Request<AuthUserGetRequest>,
    ) -> Result<Response<AuthUserGetResponse>, Status> {
        let caller = self.auth().caller_of(&req).await?;
        // Read as etcd reads it: every change made before the call, on any store.
        self.auth().refresh().await?;
        let name = req.into_inner().name;
        let s = self.auth().state();
        // etcd: root, or the user itself.
        if caller != Caller::User(name.clone()) {
            super::check_in(&s, &caller, &[Need::Admin])?;
        }
        let Some(u) = s.users.get(&name) else {
            return Err(errors::user_not_found());
        };
        Ok(Response::new(AuthUserGetResponse {
            header: self.header(),
            roles: u.roles.clone(),
        }))
    }

    async fn user_list(
        &self,
        req: Request<AuthUserListRequest>,
    ) -> Result<Response<AuthUserListResponse>, Status> {
        self.admin(&req).await?;
        self.auth().refresh().await?;
        Ok(Response::new(AuthUserListResponse {
            header: self.header(),
            users: self.auth().state().users.keys().cloned().collect(),
        }))
    }

    async fn user_delete(
        &self,
        req: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        self.admin(&req).await?;
        let name = req.into_inner().name;
        self.auth()
            .mutate(|s| {
                if s.state.enabled && name == ROOT_USER {
                    return Err(errors::invalid_auth_mgmt());
                }
                if s.users.remove(&name).is_none() {
                    return Err(errors::user_not_found());
                }
                Ok(true)
            })
            .await?;
        Ok(Response::new(AuthUserDeleteResponse {
            header: self.header(),
        }))
    }

    async fn user_change_password(
        &self,
        req: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        self.admin(&req).await?;
        let r = req.into_inner();
        self.auth().refresh().await?;
        let Some(u) = self.auth().state().users.get(&r.name).cloned() else {
            return Err(errors::user_not_found());
        };
        let password = if u.no_password {
            vec![]
        } else {
            new_password(&r.password, &r.hashed_password).await?
        };
        self.auth()
            .mutate(|s| {
                let rev = s.state.revision;
                let Some(u) = s.users.get_mut(&r.name) else {
                    return Err(errors::user_not_found());
                };
                if !u.no_password {
                    u.password = password.clone();
                }
                u.tokens_from = rev;
                Ok(true)
            })
            .await?;
        Ok(Response::new(AuthUserChangePasswordResponse {
            header: self.header(),
        }))
    }

    async fn user_grant_role(
        &self,
        req: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        self.admin(&req).await?;
        let r = req.into_inner();
        self.auth()
            .mutate(|s| {
                if !s.users.contains_key(&r.user) {
                    return Err(errors::user_not_found());
                }
                if r.role != ROOT_ROLE && !s.roles.contains_key(&r.role) {
                    return Err(errors::role_not_found());
                }
                let u = s.users.get_mut(&r.user).expect("checked");
                if u.roles.contains(&r.role) {
                    return Ok(false);
                }
                u.roles.push(r.role.clone());
                u.roles.sort();
                Ok(true)
            })
            .await?;
        Ok(Response::new(AuthUserGrantRoleResponse {
            header: self.header(),
        }))
    }

    async fn user_revoke_role(
        &self,
        req: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        self.admin(&req).await?;
        let r = req.into_inner();
        self.auth()
            .mutate(|s| {
                if s.state.enabled && r.name == ROOT_USER && r.role == ROOT_ROLE {
                    return Err(errors::invalid_auth_mgmt());
                }
                let Some(u) = s.users.get_mut(&r.name) else {
                    return Err(errors::user_not_found());
                };
                let before = u.roles.len();
                u.roles.retain(|x| *x != r.role);
                if u.roles.len() == before {
                    return Err(errors::role_not_granted());
                }
                Ok(true)
            })
            .await?;
        Ok(Response::new(AuthUserRevokeRoleResponse {
            header: self.header(),
        }))
    }

    async fn role_add(
        &self,
        req: Request<AuthRoleAddRequest>,
    ) -> Result<Response<AuthRoleAddResponse>, Status> {
        self.admin(&req).await?;
        let name = req.into_inner().name;
        if name.is_empty() {
            return Err(errors::role_empty());
        }
        self.auth()
            .mutate(|s| {
                if s.roles.contains_key(&name) {
                    return Err(errors::role_already_exist());
                }
                s.roles.insert(
                    name.clone(),
                    RoleRecord {
                        name: name.clone(),
                        perms: vec![],
                    },
                );
                Ok(true)
            })
            .await?;
        Ok(Response::new(AuthRoleAddResponse {
            header: self.header(),
        }))
    }

    async fn role_get(
        &self,
        req: Request<AuthRoleGetRequest>,
    ) -> Result<Response<AuthRoleGetResponse>, Status> {
        let caller = self.auth().caller_of(&req).await?;
        // Read as etcd reads it: every change made before the call, on any store.
        self.auth().refresh().await?;
        let role = req.into_inner().role;
        let s = self.auth().state();
        // etcd: root, or a user that has the role.
        let own = matches!(&caller, Caller::User(u) if s.has_role(u, &role));
        if !own {
            super::check_in(&s, &caller, &[Need::Admin])?;
        }
        let Some(r) = s.roles.get(&role) else {
            return Err(errors::role_not_found());
        };
        let perm = if role == ROOT_ROLE {
            vec![super::root_perm()]
        } else {
            r.perms.clone()
        };
        Ok(Response::new(AuthRoleGetResponse {
            header: self.header(),
            perm,
        }))
    }

    async fn role_list(
        &self,
        req: Request<AuthRoleListRequest>,
    ) -> Result<Response<AuthRoleListResponse>, Status> {
        self.admin(&req).await?;
        self.auth().refresh().await?;
        Ok(Response::new(AuthRoleListResponse {
            header: self.header(),
            roles: self.auth().state().roles.keys().cloned().collect(),
        }))
    }

    async fn role_delete(
        &self,
        req: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        self.admin(&req).await?;
        let role = req.into_inner().role;
        self.auth()
            .mutate(|s| {
                if s.state.enabled && role == ROOT_ROLE {
                    return Err(errors::invalid_auth_mgmt());
                }
                if s.roles.remove(&role).is_none() {
                    return Err(errors::role_not_found());
                }
                for u in s.users.values_mut() {
                    u.roles.retain(|r| *r != role);
                }
                Ok(true)
            })
            .await?;
        Ok(Response::new(AuthRoleDeleteResponse {
            header: self.header(),
        }))
    }

    async fn role_grant_permission(
        &self,
        req: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        self.admin(&req).await?;
        let r = req.into_inner();
        let Some(perm) = r.perm else {
            return Err(errors::permission_not_given());
        };
        if !super::perm::valid_permission_range(&perm.key, &perm.range_end) {
            return Err(errors::invalid_auth_mgmt());
        }
        self.auth()
            .mutate(|s| {
                let Some(role) = s.roles.get_mut(&r.name) else {
                    return Err(errors::role_not_found());
                };
                match role
                    .perms
                    .iter_mut()
                    .find(|p| p.key == perm.key && p.range_end == perm.range_end)
                {
                    Some(p) => p.perm_type = perm.perm_type,
                    None => {
                        role.perms.push(perm.clone());
                        role.perms.sort_by(|a, b| a.key.cmp(&b.key));
                    }
                }
                Ok(true)
            })
            .await?;
        Ok(Response::new(AuthRoleGrantPermissionResponse {
            header: self.header(),
        }))
    }

    async fn role_revoke_permission(
        &self,
        req: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        self.admin(&req).await?;
        let r = req.into_inner();
        self.auth()
            .mutate(|s| {
                let Some(role) = s.roles.get_mut(&r.role) else {
                    return Err(errors::role_not_found());
                };
                let before = role.perms.len();
                role.perms
                    .retain(|p| !(p.key == r.key && p.range_end == r.range_end));
                if role.perms.len() == before {
                    return Err(errors::permission_not_granted());
                }
                Ok(true)
            })
            .await?;
        Ok(Response::new(AuthRoleRevokePermissionResponse {
            header: self.header(),
        }))
    }
}
