//! `kvctl lease grant|keep-alive|revoke|list|ttl`: etcd's Lease service (`etcdserverpb.Lease`)
//! through the etcd API of the storage nodes (or of any etcd cluster, with `--endpoints`).
//! Output follows etcdctl's: lease ids in hex (`%016x`), and hex ids taken back as input.

use crate::etcd::Etcd;
use atoll_proto::etcdserverpb::lease_client::LeaseClient;
use atoll_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest,
    LeaseRevokeRequest, LeaseTimeToLiveRequest,
};
use serde_json::json;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;

#[derive(clap::Args, Debug)]
pub struct LeaseArgs {
    /// etcd API endpoints, comma separated (default: every storage node PD knows).
    #[arg(long, global = true)]
    pub endpoints: Option<String>,
    #[command(subcommand)]
    pub cmd: LeaseCmd,
}

#[derive(clap::Subcommand, Debug)]
pub enum LeaseCmd {
    /// Grant a lease of TTL seconds; prints its id in hex.
    Grant {
        ttl: i64,
        /// Ask for this id (hex) instead of one the server picks.
        #[arg(long)]
        id: Option<String>,
    },
    /// Keep the lease alive, one line per renewal, until it is gone (then exit non-zero).
    KeepAlive {
        id: String,
        /// Renew once, print the answer and exit.
        #[arg(long)]
        once: bool,
    },
    /// Revoke the lease: its keys are deleted.
    Revoke { id: String },
    /// Every lease.
    List,
    /// The lease's granted and remaining TTL (and, with --keys, its keys).
    Ttl {
        id: String,
        #[arg(long)]
        keys: bool,
    },
}

/// A lease id as etcdctl takes it: hex, `0x` allowed.
pub fn parse_id(s: &str) -> anyhow::Result<i64> {
    let h = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    i64::from_str_radix(h, 16)
        .map_err(|_| anyhow::anyhow!("bad lease id {s:?}: expected hex, as etcdctl prints it"))
}

/// A lease id as etcdctl prints it.
pub fn hex(id: i64) -> String {
    format!("{id:016x}")
}

fn revision(h: &Option<atoll_proto::etcdserverpb::ResponseHeader>) -> i64 {
    h.as_ref().map_or(0, |h| h.revision)
}

pub async fn run(etcd: &Etcd, cmd: LeaseCmd, json_out: bool) -> anyhow::Result<()> {
    let out = |text: String, j: serde_json::Value| {
        if json_out {
            println!("{j}");
        } else {
            println!("{text}");
        }
    };
    match cmd {
        LeaseCmd::Grant { ttl, id } => {
            let id = id.as_deref().map(parse_id).transpose()?.unwrap_or(0);
            let r = etcd
                .call(|ch| async move {
                    LeaseClient::new(ch)
                        .lease_grant(LeaseGrantRequest { ttl, id })
                        .await
                })
                .await?;
            anyhow::ensure!(r.error.is_empty(), "{}", r.error);
            out(
                format!("lease {} granted with TTL({}s)", hex(r.id), r.ttl),
                json!({"id": hex(r.id), "ttl": r.ttl, "revision": revision(&r.header)}),
            );
        }
        LeaseCmd::Revoke { id } => {
            let id = parse_id(&id)?;
            let r = etcd
                .call(|ch| async move {
                    LeaseClient::new(ch)
                        .lease_revoke(LeaseRevokeRequest { id })
                        .await
                })
                .await?;
            out(
                format!("lease {} revoked", hex(id)),
                json!({"id": hex(id), "revoked": true, "revision": revision(&r.header)}),
            );
        }
        LeaseCmd::List => {
            let r = etcd
                .call(|ch| async move {
                    LeaseClient::new(ch)
                        .lease_leases(LeaseLeasesRequest {})
                        .await
                })
                .await?;
            let mut text = format!("found {} leases", r.leases.len());
            for l in &r.leases {
                text.push('\n');
                text.push_str(&hex(l.id));
            }
            let ids: Vec<String> = r.leases.iter().map(|l| hex(l.id)).collect();
            out(text, json!({"leases": ids}));
        }
        LeaseCmd::Ttl { id, keys } => {
            let id = parse_id(&id)?;
            let r = etcd
                .call(|ch| async move {
                    LeaseClient::new(ch)
                        .lease_time_to_live(LeaseTimeToLiveRequest { id, keys })
                        .await
                })
                .await?;
            let ks: Vec<String> = r
                .keys
                .iter()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect();
            let text = if r.granted_ttl == 0 && r.ttl == -1 {
                format!("lease {} already expired", hex(r.id))
            } else {
                let mut t = format!(
                    "lease {} granted with TTL({}s), remaining({}s)",
                    hex(r.id),
                    r.granted_ttl,
                    r.ttl
                );
                if keys {
                    t.push_str(&format!(", attached keys([{}])", ks.join(" ")));
                }
                t
            };
            let mut j = json!({"id": hex(r.id), "ttl": r.ttl, "granted_ttl": r.granted_ttl});
            if keys {
                j["keys"] = json!(ks);
            }
            out(text, j);
        }
        LeaseCmd::KeepAlive { id, once } => {
            let id = parse_id(&id)?;
            keep_alive(etcd, id, once, &out).await?;
        }
    }
    Ok(())
}

/// Renews the lease over one KeepAlive stream, a third of its TTL after each answer (as etcd's
/// client does), moving to the next endpoint when the stream breaks. Returns an error when the
/// lease is gone (an answer with TTL <= 0).
async fn keep_alive(
    etcd: &Etcd,
    id: i64,
    once: bool,
    out: &impl Fn(String, serde_json::Value),
) -> anyhow::Result<()> {
    let mut failures = 0usize;
    loop {
        let (url, ch) = etcd.current();
        let url = url.to_string();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let req = LeaseKeepAliveRequest { id };
        tx.send(req).await?;
        let opened = tokio::time::timeout(
            etcd.timeout,
            LeaseClient::new(ch).lease_keep_alive(ReceiverStream::new(rx)),
        )
        .await;
        let mut inbound = match opened {
            Ok(Ok(s)) => s.into_inner(),
            Ok(Err(s)) if !retryable_stream_error(&s) => return Err(crate::etcd::status_error(s)),
            Ok(Err(s)) => {
                failures = broke(etcd, &url, s.message(), failures).await?;
                continue;
            }
            Err(_) => {
                failures = broke(etcd, &url, "no answer", failures).await?;
                continue;
            }
        };
        loop {
            let msg = tokio::time::timeout(etcd.timeout, inbound.message()).await;
            let resp: LeaseKeepAliveResponse = match msg {
                Ok(Ok(Some(r))) => r,
                Ok(Err(s)) if !retryable_stream_error(&s) => {
                    return Err(crate::etcd::status_error(s))
                }
                Ok(Err(s)) => {
                    failures = broke(etcd, &url, s.message(), failures).await?;
                    break;
                }
                Ok(Ok(None)) => {
                    failures = broke(etcd, &url, "stream closed", failures).await?;
                    break;
                }
                Err(_) => {
                    failures = broke(etcd, &url, "no answer", failures).await?;
                    break;
                }
            };
            failures = 0;
            if resp.ttl <= 0 {
                anyhow::bail!("lease {} expired or revoked", hex(id));
            }
            out(
                format!("lease {} keepalived with TTL({})", hex(resp.id), resp.ttl),
                json!({"id": hex(resp.id), "ttl": resp.ttl, "revision": revision(&resp.header)}),
            );
            if once {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_secs_f64((resp.ttl as f64 / 3.0).max(0.5))).await;
            if tx.send(req).await.is_err() {
                break;
            }
        }
    }
}

fn retryable_stream_error(s: &tonic::Status) -> bool {
    use tonic::Code;
    // etcd ends a keep-alive stream with Unavailable (no leader) or Canceled; a store going
    // away shows as Unavailable or Unknown (h2 reset).
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

/// Reports a broken stream, moves to the next endpoint and waits a little; after as many
/// failures in a row as there are endpoints times ten, gives up.
async fn broke(etcd: &Etcd, url: &str, why: &str, failures: usize) -> anyhow::Result<usize> {
    eprintln!("kvctl: keep-alive through {url}: {why}; trying the next endpoint");
    etcd.advance();
    anyhow::ensure!(failures < 30, "keep-alive: no endpoint answers ({why})");
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(failures + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_read_and_print_as_etcdctl() {
        assert_eq!(parse_id("694d7a1a3b7e6c0b").unwrap(), 0x694d7a1a3b7e6c0b);
        assert_eq!(parse_id("0x10").unwrap(), 16);
        assert!(parse_id("xyz").is_err());
        assert_eq!(hex(0x2a), "000000000000002a");
    }
}
