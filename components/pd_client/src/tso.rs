//! Timestamp batching: every caller waiting for a timestamp at the same moment shares one
//! request on the TSO stream to the PD leader (`count` = number of callers); PD answers with
//! the last timestamp of a contiguous block.

use crate::rpc::{check_header, RpcPdClient};
use crate::{compose_ts, Error, Result};
use atoll_proto::pdpb;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

const MAX_BATCH: usize = 10_000;

/// (timestamps wanted, where the first of them goes)
type Waiter = (u32, oneshot::Sender<Result<u64>>);

pub struct TsoBatcher {
    tx: mpsc::Sender<Waiter>,
    rx: Mutex<Option<mpsc::Receiver<Waiter>>>,
    /// The largest timestamp received so far.
    high: AtomicU64,
}

impl TsoBatcher {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel(65536);
        TsoBatcher {
            tx,
            rx: Mutex::new(Some(rx)),
            high: AtomicU64::new(0),
        }
    }

    pub(crate) fn start(&self, client: RpcPdClient) {
        if let Some(rx) = self.rx.lock().take() {
            tokio::spawn(run(client, rx));
        }
    }

    /// `count` consecutive fresh timestamps; returns the first.
    pub async fn get(&self, count: u32, deadline: Duration) -> Result<u64> {
        let count = count.clamp(1, 1 << 16);
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((count, tx))
            .await
            .map_err(|_| Error::Other("TSO dispatcher stopped".into()))?;
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(r)) => {
                if let Ok(first) = r {
                    self.high
                        .fetch_max(first + u64::from(count) - 1, Ordering::AcqRel);
                }
                r
            }
            Ok(Err(_)) => Err(Error::Other("TSO dispatcher dropped the request".into())),
            Err(_) => Err(Error::Timeout(deadline)),
        }
    }
}

impl TsoBatcher {
    /// The largest timestamp this process has received from PD: every timestamp PD hands
    /// out from now on is above it.
    pub fn high_water(&self) -> u64 {
        self.high.load(Ordering::Acquire)
    }
}

impl Default for TsoBatcher {
    fn default() -> Self {
        Self::new()
    }
}

async fn run(client: RpcPdClient, mut rx: mpsc::Receiver<Waiter>) {
    let mut pending: Vec<Waiter> = Vec::new();
    'outer: loop {
        // Wait for the first request before opening a stream.
        if pending.is_empty() {
            match rx.recv().await {
                Some(w) => pending.push(w),
                None => return,
            }
        }
        let (addr, mut grpc) = match client.tso_stream().await {
            Ok(x) => x,
            Err(e) => {
                for (_, w) in pending.drain(..) {
                    let _ = w.send(Err(e.clone()));
                }
                continue;
            }
        };
        let (req_tx, req_rx) = mpsc::channel::<pdpb::TsoRequest>(16);
        let mut stream = match grpc
            .tso(tokio_stream::wrappers::ReceiverStream::new(req_rx))
            .await
        {
            Ok(s) => s.into_inner(),
            Err(s) => {
                client.on_stream_error(&addr);
                let e = Error::Unreachable {
                    addrs: addr.clone(),
                    reason: s.message().to_string(),
                };
                for (_, w) in pending.drain(..) {
                    let _ = w.send(Err(e.clone()));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        loop {
            if pending.is_empty() {
                match rx.recv().await {
                    Some(w) => pending.push(w),
                    None => return,
                }
            }
            let mut count: u32 = pending.iter().map(|(c, _)| *c).sum();
            while pending.len() < MAX_BATCH && count < 100_000 {
                match rx.try_recv() {
                    Ok(w) => {
                        count += w.0;
                        pending.push(w);
                    }
                    Err(_) => break,
                }
            }
            let started = Instant::now();
            if req_tx
                .send(pdpb::TsoRequest {
                    header: client.header(),
                    count,
                })
                .await
                .is_err()
            {
                client.on_stream_error(&addr);
                continue 'outer;
            }
            let resp = match tokio::time::timeout(Duration::from_secs(3), stream.message()).await {
                Ok(Ok(Some(r))) => r,
                other => {
                    client.on_stream_error(&addr);
                    let e = match other {
                        Err(_) => Error::Timeout(started.elapsed()),
                        Ok(Err(s)) => Error::Unreachable {
                            addrs: addr.clone(),
                            reason: s.message().to_string(),
                        },
                        _ => Error::Unreachable {
                            addrs: addr.clone(),
                            reason: "TSO stream closed".into(),
                        },
                    };
                    for (_, w) in pending.drain(..) {
                        let _ = w.send(Err(e.clone()));
                    }
                    continue 'outer;
                }
            };
            if let Err((e, leader)) = check_header(resp.header.as_ref()) {
                if leader.is_some() {
                    client.on_stream_error(&addr);
                }
                for (_, w) in pending.drain(..) {
                    let _ = w.send(Err(e.clone()));
                }
                continue 'outer;
            }
            let Some(ts) = resp.timestamp else {
                for (_, w) in pending.drain(..) {
                    let _ = w.send(Err(Error::Other("TSO response without timestamp".into())));
                }
                continue;
            };
            if resp.count != count {
                for (_, w) in pending.drain(..) {
                    let _ = w.send(Err(Error::Other("TSO response count mismatch".into())));
                }
                continue;
            }
            let last = compose_ts(ts.physical, ts.logical);
            let mut next = last + 1 - count as u64;
            for (c, w) in pending.drain(..) {
                let _ = w.send(Ok(next));
                next += c as u64;
            }
        }
    }
}
