//! The PD worker: every conversation between a store and PD — region and store heartbeats,
//! split ids, split reports, and checks that a peer is still a member — runs here, on the
//! store's async runtime, off the pollers. Operator steps PD sends back are routed to the
//! regions' peers.

use crate::fsm::context::StoreContext;
use crate::msg::{CasualMessage, PeerMsg, StoreMsg};
use crate::task::PdTask;
use crate::util;
use crate::Error;
use atoll_engine::KvEngine;
use atoll_pd_client::PdClient;
use atoll_proto::pdpb;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Runs until `rx` closes. `stats` builds the store heartbeat's statistics.
pub async fn run<E: KvEngine>(
    ctx: Arc<StoreContext<E>>,
    pd: Arc<dyn PdClient>,
    mut rx: mpsc::Receiver<PdTask>,
    stats: Arc<dyn Fn() -> pdpb::StoreStats + Send + Sync>,
) {
    {
        let router = ctx.router.clone();
        pd.set_heartbeat_handler(Box::new(move |resp: pdpb::RegionHeartbeatResponse| {
            let id = resp.region_id;
            let _ = router.try_send(
                id,
                PeerMsg::Casual(CasualMessage::PdOperator(Box::new(resp))),
            );
        }));
    }
    let mut store_hb = tokio::time::interval(ctx.cfg.pd_store_heartbeat_interval.0);
    store_hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut region_hb = tokio::time::interval(ctx.cfg.pd_heartbeat_interval.0);
    region_hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    region_hb.tick().await;
    let mut housekeeping = tokio::time::interval(Duration::from_secs(10));
    let last_full_round = Arc::new(parking_lot::Mutex::new(None));
    loop {
        tokio::select! {
            task = rx.recv() => {
                let Some(task) = task else { break };
                handle(&ctx, &pd, task);
            }
            _ = store_hb.tick() => {
                let pd = pd.clone();
                let s = stats();
                let ctx = ctx.clone();
                let asked = last_full_round.clone();
                let min_gap = ctx.cfg.pd_heartbeat_interval.0;
                tokio::spawn(async move {
                    fail::fail_point!(crate::failpoints::PD_STORE_HEARTBEAT, |_| ());
                    match pd.store_heartbeat(s).await {
                        Err(e) => tracing::debug!(error = %e, "store heartbeat"),
                        Ok(resp) if resp.require_region_reports => {
                            // A new PD leader: every leader here reports now (at most one
                            // such round per pd-heartbeat-interval).
                            let due = {
                                let mut last = asked.lock();
                                let due = last.is_none_or(|t: std::time::Instant| t.elapsed() >= min_gap);
                                if due {
                                    *last = Some(std::time::Instant::now());
                                }
                                due
                            };
                            if due {
                                tell_leaders(&ctx, || CasualMessage::HeartbeatPd);
                            }
                        }
                        Ok(_) => {}
                    }
                });
            }
            _ = region_hb.tick() => {
                // Every leader checks whether PD's view of its region is out of date and
                // reports only then (hibernating ones too: a message, not a wake-up).
                tell_leaders(&ctx, || CasualMessage::PeriodicHeartbeatPd);
            }
            _ = housekeeping.tick() => {
                ctx.meta.lock().expire_parked(Duration::from_secs(30));
                ctx.snap_mgr.gc(Duration::from_secs(600));
                ctx.send_store_msg(StoreMsg::PeerDestroyed { region_id: 0 });
            }
        }
    }
}

/// Sends `msg()` to every region this store leads.
fn tell_leaders<E: KvEngine>(ctx: &StoreContext<E>, msg: impl Fn() -> CasualMessage) {
    let leaders: Vec<u64> = ctx
        .meta
        .lock()
        .readers
        .iter()
        .filter(|(_, d)| d.term > 0)
        .map(|(id, _)| *id)
        .collect();
    for id in leaders {
        let _ = ctx.router.try_send(id, PeerMsg::Casual(msg()));
    }
}

fn handle<E: KvEngine>(ctx: &Arc<StoreContext<E>>, pd: &Arc<dyn PdClient>, task: PdTask) {
    let pd = pd.clone();
    let ctx = ctx.clone();
    match task {
        PdTask::Heartbeat(req) => {
            tokio::spawn(async move {
                let region_id = req.region.as_ref().map_or(0, |r| r.id);
                let dropped = (|| {
                    fail::fail_point!(crate::failpoints::PD_REGION_HEARTBEAT, |_| true);
                    false
                })();
                let sent = if dropped {
                    Err("dropped by failpoint".to_string())
                } else {
                    pd.region_heartbeat(*req).await.map_err(|e| e.to_string())
                };
                if let Err(e) = sent {
                    tracing::debug!(region_id, error = %e, "region heartbeat");
                    // PD did not hear it: the next periodic check reports again.
                    let _ = ctx
                        .router
                        .try_send(region_id, PeerMsg::Casual(CasualMessage::PdReportLost));
                }
            });
        }
        PdTask::AskSplit {
            region,
            split_keys,
            cb,
        } => {
            tokio::spawn(async move {
                let region_id = region.id;
                match pd
                    .ask_batch_split(region.clone(), split_keys.len() as u32)
                    .await
                {
                    Ok(ids) => {
                        let msg = CasualMessage::ProposeSplit {
                            epoch: util::epoch(&region),
                            split_keys,
                            ids,
                            cb,
                        };
                        if let Err(e) = ctx.router.force_send(region_id, PeerMsg::Casual(msg)) {
                            e.into_inner().refuse(Error::RegionNotFound(region_id));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(region_id, error = %e, "ask split");
                        if let Some(cb) = cb {
                            cb(Err(Error::Other(format!("ask PD for split ids: {e}"))));
                        }
                    }
                }
            });
        }
        PdTask::ReportSplit { regions } => {
            tokio::spawn(async move {
                if let Err(e) = pd.report_batch_split(regions).await {
                    tracing::debug!(error = %e, "report split");
                }
            });
        }
        PdTask::ValidatePeer { region, peer } => {
            tokio::spawn(async move {
                match pd.get_region_by_id(region.id).await {
                    Ok(Some(info)) => {
                        let theirs = util::epoch(&info.region);
                        let ours = util::epoch(&region);
                        let member = util::find_peer_by_id(&info.region, peer.id).is_some();
                        if !member && theirs.conf_ver > ours.conf_ver {
                            let _ = ctx.router.force_send(
                                region.id,
                                PeerMsg::Casual(CasualMessage::StalePeer {
                                    region: info.region,
                                }),
                            );
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::debug!(region_id = region.id, error = %e, "validate peer"),
                }
            });
        }
    }
}
