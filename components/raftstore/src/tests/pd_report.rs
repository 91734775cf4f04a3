//! Region heartbeats on change: a leader reports its region to PD when something PD routes or
//! schedules by changed, when forced (leadership, split, membership, PD asked), when the last
//! report was lost, and otherwise only after `pd-heartbeat-max-interval`.

use crate::msg::{CasualMessage, PeerMsg};
use crate::task::PdTask;
use crate::test_support::{TestRegion, TestStore};
use atoll_util::config::ReadableDuration;
use std::time::Duration;

/// Region heartbeats the store handed to its PD worker since the last call.
fn reports(s: &mut TestStore) -> usize {
    let mut n = 0;
    while let Ok(t) = s.receivers.pd_rx.try_recv() {
        if matches!(t, PdTask::Heartbeat(_)) {
            n += 1;
        }
    }
    n
}

fn casual(s: &mut TestStore, r: &mut TestRegion, m: CasualMessage) {
    s.round(&mut r.fsm, vec![PeerMsg::Casual(m)]);
}

#[test]
fn an_unchanged_region_is_not_reported_until_its_max_interval() {
    let mut s = TestStore::configured(1, |c| {
        c.pd_heartbeat_interval = ReadableDuration::millis(10);
        c.pd_heartbeat_max_interval = ReadableDuration::millis(300);
    });
    let mut r = s.leader_region(1, b"", b"");
    assert_eq!(reports(&mut s), 1, "a new leader reports at once");

    // Nothing changed: periodic checks send nothing.
    for _ in 0..5 {
        casual(&mut s, &mut r, CasualMessage::PeriodicHeartbeatPd);
    }
    assert_eq!(reports(&mut s), 0);
    // A few writes are not news either.
    s.must_write(&mut r, b"k", b"v");
    casual(&mut s, &mut r, CasualMessage::PeriodicHeartbeatPd);
    assert_eq!(reports(&mut s), 0);

    // Size moved by more than an eighth: reported once.
    r.fsm.on_region_stats(64 << 20, 500_000);
    casual(&mut s, &mut r, CasualMessage::PeriodicHeartbeatPd);
    assert_eq!(reports(&mut s), 1);
    casual(&mut s, &mut r, CasualMessage::PeriodicHeartbeatPd);
    assert_eq!(reports(&mut s), 0);

    // PD did not get it: the next check reports again.
    casual(&mut s, &mut r, CasualMessage::PdReportLost);
    assert_eq!(reports(&mut s), 0, "lost is not a report by itself");
    casual(&mut s, &mut r, CasualMessage::PeriodicHeartbeatPd);
    assert_eq!(reports(&mut s), 1);

    // Forced (PD asked, or an event): always.
    casual(&mut s, &mut r, CasualMessage::HeartbeatPd);
    assert_eq!(reports(&mut s), 1);

    // Past the max interval an unchanged region reports.
    std::thread::sleep(Duration::from_millis(350));
    casual(&mut s, &mut r, CasualMessage::PeriodicHeartbeatPd);
    assert_eq!(reports(&mut s), 1);
    casual(&mut s, &mut r, CasualMessage::PeriodicHeartbeatPd);
    assert_eq!(reports(&mut s), 0);
}

/// PD learns of a dead store only after its disconnect time and may pick it as a leader
/// transfer target meanwhile: the leader refuses (a pending transfer takes no proposals until
/// an election timeout, and PD repeats the step at every heartbeat). Found by
/// tests/hibernation.rs: writes stalled after a store was killed while PD balanced leaders
/// onto it.
#[test]
fn no_leader_transfer_to_a_down_store() {
    let (mut s, mut r) = crate::test_support::TestStore::three_voters_led_here(|c| {
        c.store_liveness_timeout = ReadableDuration::millis(20);
    });
    let now = std::time::Instant::now();
    s.ctx.liveness.heard(2, now);
    s.ctx.liveness.heard(3, now);
    std::thread::sleep(Duration::from_millis(30));
    s.ctx.liveness.heard(3, std::time::Instant::now());
    let mut out = vec![];
    s.ctx.liveness.check(std::time::Instant::now(), &mut out);
    assert!(s.ctx.liveness.is_down(2) && !s.ctx.liveness.is_down(3));
    let transfer = |peer_id: u64, store_id: u64| {
        PeerMsg::Casual(CasualMessage::PdOperator(Box::new(
            atoll_proto::pdpb::RegionHeartbeatResponse {
                transfer_leader: Some(atoll_proto::pdpb::TransferLeader {
                    peer: Some(atoll_proto::metapb::Peer {
                        id: peer_id,
                        store_id,
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            },
        )))
    };
    s.handle(&mut r.fsm, vec![transfer(12, 2)]);
    assert_eq!(
        r.fsm.peer.raft_group.raft.lead_transferee, None,
        "transfer to the down store 2 started"
    );
    s.end(&mut r.fsm);
    s.handle(&mut r.fsm, vec![transfer(13, 3)]);
    assert_eq!(
        r.fsm.peer.raft_group.raft.lead_transferee,
        Some(13),
        "transfer to the live store 3 refused"
    );
    s.end(&mut r.fsm);
}
