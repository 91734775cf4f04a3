//! `kvctl watch`: follows changes through the etcd Watch API of the storage nodes, one line
//! (or one JSON object) per event. When the store it reads from fails, it goes on from the
//! next store, from the revision after the last one it printed: nothing is missed or
//! printed twice.

use atoll_client::Client;
use atoll_proto::etcdserverpb::watch_client::WatchClient;
use atoll_proto::etcdserverpb::watch_request::RequestUnion;
use atoll_proto::etcdserverpb::{WatchCreateRequest, WatchRequest};
use atoll_proto::mvccpb::event::EventType;
use serde_json::json;
use std::time::Duration;
use tokio_stream::StreamExt;

#[derive(clap::Args, Debug)]
pub struct WatchArgs {
    /// The key (with --prefix: every key that starts with it).
    pub key: String,
    /// Watch every key with KEY as prefix.
    #[arg(long)]
    pub prefix: bool,
    /// Start at this revision (inclusive): replay history from it. Default: from now.
    #[arg(long, default_value_t = 0)]
    pub rev: i64,
    /// Print the value each event replaced.
    #[arg(long)]
    pub prev_kv: bool,
}

/// etcd's prefix end: the key after every key that starts with `p` (`"\0"`: no end).
pub fn prefix_end(p: &[u8]) -> Vec<u8> {
    let mut end = p.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

pub async fn run(c: &Client, args: WatchArgs, json_out: bool) -> anyhow::Result<()> {
    let key = args.key.as_bytes().to_vec();
    let range_end = if args.prefix {
        prefix_end(&key)
    } else {
        vec![]
    };
    let mut next_rev = args.rev;
    let mut attempt = 0usize;
    loop {
        let stores = c.pd().get_all_stores(true).await?;
        let addrs: Vec<String> = stores
            .iter()
            .filter_map(|s| s.store.as_ref())
            .map(|s| s.address.clone())
            .collect();
        if addrs.is_empty() {
            anyhow::bail!("no storage node is up");
        }
        let addr = &addrs[attempt % addrs.len()];
        attempt += 1;
        match follow(
            addr,
            &key,
            &range_end,
            &mut next_rev,
            args.prev_kv,
            json_out,
        )
        .await
        {
            Ok(()) => return Ok(()),
            // History below the compaction point is gone on every store: no retry helps.
            Err(e) if e.is::<Compacted>() => return Err(e),
            // So is a refusal of the user's (or a missing user's) watch.
            Err(e) if e.is::<Refused>() => return Err(e),
            Err(e) => {
                eprintln!("kvctl: watch through {addr}: {e}; going on from revision {next_rev}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// The revision asked for is below the compaction point.
#[derive(Debug)]
struct Compacted {
    asked: i64,
    first: i64,
}

impl std::fmt::Display for Compacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "revision {} is compacted: history starts at {}",
            self.asked, self.first
        )
    }
}

impl std::error::Error for Compacted {}

/// etcd's errors for a watch refused by authentication or authorization.
const AUTH_REFUSALS: &[&str] = &[
    "etcdserver: permission denied",
    "etcdserver: user name is empty",
    "etcdserver: invalid auth token",
];

/// The watch was refused: its cancel reason.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "watch canceled: {}", self.0)
    }
}

impl std::error::Error for Refused {}

/// Watches through one store until it fails; `next_rev` follows what was printed.
async fn follow(
    addr: &str,
    key: &[u8],
    range_end: &[u8],
    next_rev: &mut i64,
    prev_kv: bool,
    json_out: bool,
) -> anyhow::Result<()> {
    let mut wc = WatchClient::new(crate::etcd::channel(addr)?);
    let create = WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: key.to_vec(),
            range_end: range_end.to_vec(),
            start_revision: *next_rev,
            prev_kv,
            ..Default::default()
        })),
    };
    let outbound = tokio_stream::iter(vec![create]).chain(tokio_stream::pending());
    let mut inbound = wc.watch(outbound).await?.into_inner();
    while let Some(resp) = inbound.message().await? {
        if resp.canceled {
            if resp.compact_revision > 0 {
                return Err(Compacted {
                    asked: *next_rev,
                    first: resp.compact_revision,
                }
                .into());
            }
            let why = &resp.cancel_reason;
            if AUTH_REFUSALS.iter().any(|r| why.contains(r)) {
                // Another store answers the same: no retry helps.
                return Err(Refused(why.clone()).into());
            }
            anyhow::bail!("watch canceled: {why}");
        }
        if resp.created && *next_rev == 0 {
            // From now: a resume starts right after the revision the watch began at.
            *next_rev = resp.header.as_ref().map_or(0, |h| h.revision) + 1;
        }
        for e in &resp.events {
            let kv = e.kv.clone().unwrap_or_default();
            let put = e.r#type == EventType::Put as i32;
            let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            if json_out {
                let mut j = json!({
                    "type": if put { "PUT" } else { "DELETE" },
                    "key": s(&kv.key),
                    "value": s(&kv.value),
                    "mod_revision": kv.mod_revision,
                    "create_revision": kv.create_revision,
                    "version": kv.version,
                });
                if let Some(p) = &e.prev_kv {
                    j["prev_value"] = json!(s(&p.value));
                }
                println!("{j}");
            } else {
                let prev = e
                    .prev_kv
                    .as_ref()
                    .map(|p| format!("\t(was {})", s(&p.value)))
                    .unwrap_or_default();
                if put {
                    println!(
                        "PUT\t{}\t{}\t@{}{prev}",
                        s(&kv.key),
                        s(&kv.value),
                        kv.mod_revision
                    );
                } else {
                    println!("DELETE\t{}\t@{}{prev}", s(&kv.key), kv.mod_revision);
                }
            }
            *next_rev = kv.mod_revision + 1;
        }
    }
    anyhow::bail!("the store closed the watch")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_as_etcd_computes_them() {
        assert_eq!(prefix_end(b"a"), b"b");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
