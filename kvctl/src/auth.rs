//! `kvctl auth|user|role`: etcd's Auth API (Atoll's or an etcd cluster's), with etcdctl's
//! commands, arguments and outputs; and `--user` login (etcd's `Authenticate`).

use crate::etcd::Etcd;
use atoll_proto::authpb::permission::Type as PermType;
use atoll_proto::authpb::{Permission, UserAddOptions};
use atoll_proto::etcdserverpb::auth_client::AuthClient;
use atoll_proto::etcdserverpb::*;
use clap::Subcommand;
use serde_json::json;

#[derive(Subcommand, Debug, Clone)]
pub enum AuthCmd {
    /// Enable authentication (the root user must exist; it gets the root role).
    Enable,
    /// Disable authentication.
    Disable,
    /// Whether authentication is enabled, and the auth revision.
    Status,
}

#[derive(Subcommand, Debug, Clone)]
pub enum UserCmd {
    /// Add a user (password: NAME:PASSWORD, --new-user-password, or a prompt).
    Add {
        name: String,
        #[arg(long)]
        new_user_password: Option<String>,
        /// A user that cannot log in with a password (only with a TLS certificate).
        #[arg(long)]
        no_password: bool,
    },
    Delete {
        name: String,
    },
    /// The user's roles.
    Get {
        name: String,
    },
    List,
    /// Change a user's password (--new-password, or a prompt).
    Passwd {
        name: String,
        #[arg(long)]
        new_password: Option<String>,
    },
    GrantRole {
        name: String,
        role: String,
    },
    RevokeRole {
        name: String,
        role: String,
    },
}

#[derive(Subcommand, Debug, Clone)]
pub enum RoleCmd {
    Add {
        name: String,
    },
    Delete {
        name: String,
    },
    /// The role's permissions.
    Get {
        name: String,
    },
    List,
    /// Grant read, write or readwrite on KEY, [KEY, END), KEY as a prefix (--prefix) or every
    /// key from KEY on (--from-key).
    GrantPermission {
        role: String,
        /// read, write or readwrite.
        perm: String,
        key: String,
        end: Option<String>,
        #[arg(long)]
        prefix: bool,
        #[arg(long)]
        from_key: bool,
    },
    /// Revoke the permission on exactly that key or range.
    RevokePermission {
        role: String,
        key: String,
        end: Option<String>,
        #[arg(long)]
        prefix: bool,
        #[arg(long)]
        from_key: bool,
    },
}

/// etcdctl's `GetPrefixRangeEnd`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The range end etcdctl sends for these arguments.
fn range_end(
    key: &str,
    end: Option<&str>,
    prefix: bool,
    from_key: bool,
) -> anyhow::Result<Vec<u8>> {
    let n = usize::from(end.is_some()) + usize::from(prefix) + usize::from(from_key);
    anyhow::ensure!(n <= 1, "give at most one of END, --prefix and --from-key");
    Ok(if prefix {
        if key.is_empty() {
            vec![0]
        } else {
            prefix_end(key.as_bytes())
        }
    } else if from_key {
        vec![0]
    } else {
        end.map(|e| e.as_bytes().to_vec()).unwrap_or_default()
    })
}

/// A password from the terminal (not echoed when stdin is one).
pub fn prompt(what: &str) -> anyhow::Result<String> {
    use std::io::{BufRead, Write};
    eprint!("{what}: ");
    std::io::stderr().flush()?;
    let fd = libc::STDIN_FILENO;
    // SAFETY: termios is plain data; tcgetattr fills it or fails (stdin not a terminal).
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    let tty = unsafe { libc::tcgetattr(fd, &mut t) } == 0;
    if tty {
        let mut quiet = t;
        quiet.c_lflag &= !libc::ECHO;
        // SAFETY: sets the terminal's attributes from a copy of its own.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
    }
    let mut line = String::new();
    let r = std::io::stdin().lock().read_line(&mut line);
    if tty {
        // SAFETY: restores the attributes read above.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) };
        eprintln!();
    }
    r?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

/// `--user NAME[:PASSWORD]` with `--password`: the name and password (prompted for if given
/// by neither), as etcdctl reads them.
pub fn credentials(user: &str, password: Option<&str>) -> anyhow::Result<(String, String)> {
    if let Some(p) = password {
        return Ok((user.to_string(), p.to_string()));
    }
    match user.split_once(':') {
        Some((n, p)) => Ok((n.to_string(), p.to_string())),
        None => Ok((user.to_string(), prompt("Password")?)),
    }
}

/// A token for `name` (etcd's `Authenticate`, on the first endpoint that answers).
pub async fn login(e: &Etcd, name: &str, password: &str) -> anyhow::Result<String> {
    let r = e
        .call(|ch| {
            let req = AuthenticateRequest {
                name: name.to_string(),
                password: password.to_string(),
            };
            async move { AuthClient::new(ch).authenticate(req).await }
        })
        .await?;
    Ok(r.token)
}

fn out(json: bool, text: String, j: serde_json::Value) {
    if json {
        println!("{j}");
    } else {
        println!("{text}");
    }
}

pub async fn auth(e: &Etcd, cmd: AuthCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        AuthCmd::Enable => {
            // etcdctl's loop: without the root role, create it and grant it to root.
            loop {
                match e
                    .call(|ch| async move {
                        AuthClient::new(ch).auth_enable(AuthEnableRequest {}).await
                    })
                    .await
                {
                    Ok(_) => break,
                    Err(err)
                        if err.to_string() == "etcdserver: root user does not have root role" =>
                    {
                        let r = e
                            .call(|ch| async move {
                                AuthClient::new(ch)
                                    .role_add(AuthRoleAddRequest {
                                        name: "root".into(),
                                    })
                                    .await
                            })
                            .await;
                        if let Err(er) = r {
                            anyhow::ensure!(
                                er.to_string() == "etcdserver: role name already exists",
                                er
                            );
                        }
                        e.call(|ch| async move {
                            AuthClient::new(ch)
                                .user_grant_role(AuthUserGrantRoleRequest {
                                    user: "root".into(),
                                    role: "root".into(),
                                })
                                .await
                        })
                        .await?;
                    }
                    Err(err) => return Err(err),
                }
            }
            out(
                json,
                "Authentication Enabled".into(),
                json!({"enabled": true}),
            );
        }
        AuthCmd::Disable => {
            e.call(|ch| async move {
                AuthClient::new(ch)
                    .auth_disable(AuthDisableRequest {})
                    .await
            })
            .await?;
            out(
                json,
                "Authentication Disabled".into(),
                json!({"enabled": false}),
            );
        }
        AuthCmd::Status => {
            let r = e
                .call(
                    |ch| async move { AuthClient::new(ch).auth_status(AuthStatusRequest {}).await },
                )
                .await?;
            out(
                json,
                format!(
                    "Authentication Status: {}\nAuthRevision: {}",
                    r.enabled, r.auth_revision
                ),
                json!({"enabled": r.enabled, "auth_revision": r.auth_revision}),
            );
        }
    }
    Ok(())
}

pub async fn user(e: &Etcd, cmd: UserCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        UserCmd::Add {
            name,
            new_user_password,
            no_password,
        } => {
            let (name, password) = if no_password {
                (name, String::new())
            } else if let Some(p) = new_user_password {
                (name, p)
            } else if let Some((n, p)) = name.split_once(':') {
                (n.to_string(), p.to_string())
            } else {
                (name, prompt("Password of the new user")?)
            };
            let req = AuthUserAddRequest {
                name: name.clone(),
                password,
                options: Some(UserAddOptions { no_password }),
                hashed_password: String::new(),
            };
            e.call(|ch| {
                let req = req.clone();
                async move { AuthClient::new(ch).user_add(req).await }
            })
            .await?;
            out(json, format!("User {name} created"), json!({"user": name}));
        }
        UserCmd::Delete { name } => {
            let req = AuthUserDeleteRequest { name: name.clone() };
            e.call(|ch| {
                let req = req.clone();
                async move { AuthClient::new(ch).user_delete(req).await }
            })
            .await?;
            out(json, format!("User {name} deleted"), json!({"user": name}));
        }
        UserCmd::Get { name } => {
            let req = AuthUserGetRequest { name: name.clone() };
            let r = e
                .call(|ch| {
                    let req = req.clone();
                    async move { AuthClient::new(ch).user_get(req).await }
                })
                .await?;
            out(
                json,
                format!("User: {name}\nRoles: {}", r.roles.join(" ")),
                json!({"user": name, "roles": r.roles}),
            );
        }
        UserCmd::List => {
            let r = e
                .call(
                    |ch| async move { AuthClient::new(ch).user_list(AuthUserListRequest {}).await },
                )
                .await?;
            out(json, r.users.join("\n"), json!({"users": r.users}));
        }
        UserCmd::Passwd { name, new_password } => {
            let password = match new_password {
                Some(p) => p,
                None => prompt("Password")?,
            };
            let req = AuthUserChangePasswordRequest {
                name: name.clone(),
                password,
                hashed_password: String::new(),
            };
            e.call(|ch| {
                let req = req.clone();
                async move { AuthClient::new(ch).user_change_password(req).await }
            })
            .await?;
            out(json, "Password updated".into(), json!({"user": name}));
        }
        UserCmd::GrantRole { name, role } => {
            let req = AuthUserGrantRoleRequest {
                user: name.clone(),
                role: role.clone(),
            };
            e.call(|ch| {
                let req = req.clone();
                async move { AuthClient::new(ch).user_grant_role(req).await }
            })
            .await?;
            out(
                json,
                format!("Role {role} is granted to user {name}"),
                json!({"user": name, "role": role}),
            );
        }
        UserCmd::RevokeRole { name, role } => {
            let req = AuthUserRevokeRoleRequest {
                name: name.clone(),
                role: role.clone(),
            };
            e.call(|ch| {
                let req = req.clone();
                async move { AuthClient::new(ch).user_revoke_role(req).await }
            })
            .await?;
            out(
                json,
                format!("Role {role} is revoked from user {name}"),
                json!({"user": name, "role": role}),
            );
        }
    }
    Ok(())
}

fn perm_text(p: &Permission) -> String {
    let k = String::from_utf8_lossy(&p.key);
    if p.range_end.is_empty() {
        return format!("\t{k}");
    }
    if p.range_end == [0] {
        return format!("\t[{k}, <open ended>");
    }
    let end = String::from_utf8_lossy(&p.range_end);
    if p.range_end == prefix_end(&p.key) {
        format!("\t[{k}, {end}) (prefix {k})")
    } else {
        format!("\t[{k}, {end})")
    }
}

pub async fn role(e: &Etcd, cmd: RoleCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        RoleCmd::Add { name } => {
            let req = AuthRoleAddRequest { name: name.clone() };
            e.call(|ch| {
                let req = req.clone();
                async move { AuthClient::new(ch).role_add(req).await }
            })
            .await?;
            out(json, format!("Role {name} created"), json!({"role": name}));
        }
        RoleCmd::Delete { name } => {
            let req = AuthRoleDeleteRequest { role: name.clone() };
            e.call(|ch| {
                let req = req.clone();
                async move { AuthClient::new(ch).role_delete(req).await }
            })
            .await?;
            out(json, format!("Role {name} deleted"), json!({"role": name}));
        }
        RoleCmd::Get { name } => {
            let req = AuthRoleGetRequest { role: name.clone() };
            let r = e
                .call(|ch| {
                    let req = req.clone();
                    async move { AuthClient::new(ch).role_get(req).await }
                })
                .await?;
            let of = |t: PermType| -> Vec<&Permission> {
                r.perm
                    .iter()
                    .filter(|p| {
                        p.perm_type == t as i32 || p.perm_type == PermType::Readwrite as i32
                    })
                    .collect()
            };
            let (read, write) = (of(PermType::Read), of(PermType::Write));
            let mut text = vec![format!("Role {name}"), "KV Read:".into()];
            text.extend(read.iter().map(|p| perm_text(p)));
            text.push("KV Write:".into());
            text.extend(write.iter().map(|p| perm_text(p)));
            let perms: Vec<_> = r
                .perm
                .iter()
                .map(|p| {
                    json!({
                        "perm": PermType::try_from(p.perm_type).map_or("?", |t| t.as_str_name()),
                        "key": String::from_utf8_lossy(&p.key),
                        "range_end": String::from_utf8_lossy(&p.range_end),
                    })
                })
                .collect();
            out(json, text.join("\n"), json!({"role": name, "perms": perms}));
        }
        RoleCmd::List => {
            let r = e
                .call(
                    |ch| async move { AuthClient::new(ch).role_list(AuthRoleListRequest {}).await },
                )
                .await?;
            out(json, r.roles.join("\n"), json!({"roles": r.roles}));
        }
        RoleCmd::GrantPermission {
            role,
            perm,
            key,
            end,
            prefix,
            from_key,
        } => {
            let t = match perm.to_ascii_lowercase().as_str() {
                "read" => PermType::Read,
                "write" => PermType::Write,
                "readwrite" => PermType::Readwrite,
                _ => {
                    anyhow::bail!("permission type must be read, write or readwrite, not {perm:?}")
                }
            };
            let req = AuthRoleGrantPermissionRequest {
                name: role.clone(),
                perm: Some(Permission {
                    perm_type: t as i32,
                    key: key.as_bytes().to_vec(),
                    range_end: range_end(&key, end.as_deref(), prefix, from_key)?,
                }),
            };
            e.call(|ch| {
                let req = req.clone();
                async move { AuthClient::new(ch).role_grant_permission(req).await }
            })
            .await?;
            out(json, format!("Role {role} updated"), json!({"role": role}));
        }
        RoleCmd::RevokePermission {
            role,
            key,
            end,
            prefix,
            from_key,
        } => {
            let req = AuthRoleRevokePermissionRequest {
                role: role.clone(),
                key: key.as_bytes().to_vec(),
                range_end: range_end(&key, end.as_deref(), prefix, from_key)?,
            };
            e.call(|ch| {
                let req = req.clone();
                async move { AuthClient::new(ch).role_revoke_permission(req).await }
            })
            .await?;
            out(
                json,
                format!("Permission of key {key} is revoked from role {role}"),
                json!({"role": role, "key": key}),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_as_etcdctl_sends_them() {
        assert_eq!(range_end("/a/", None, true, false).unwrap(), b"/a0");
        assert_eq!(range_end("a", None, false, true).unwrap(), b"\0");
        assert_eq!(range_end("a", Some("c"), false, false).unwrap(), b"c");
        assert_eq!(range_end("a", None, false, false).unwrap(), b"");
        assert!(range_end("a", Some("c"), true, false).is_err());
    }

    #[test]
    fn credentials_as_etcdctl_reads_them() {
        assert_eq!(
            credentials("root:pw", None).unwrap(),
            ("root".into(), "pw".into())
        );
        assert_eq!(
            credentials("root", Some("x:y")).unwrap(),
            ("root".into(), "x:y".into())
        );
    }
}
