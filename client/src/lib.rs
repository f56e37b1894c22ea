//! A client for [leaderlink](../README.md): what a broker embeds to forward produce calls.
//!
//! One [`Client::forward`] call forwards one partition's payload and returns its
//! [`PartitionResult`], with the errors `Forward` would return as a [`tonic::Status`]. Underneath,
//! the client keeps several HTTP/2 connections (lanes), each with one long-lived
//! `ForwardBatches` stream, and merges the calls made at the same moment into shared messages:
//! one gRPC message carries what would be many unary calls, and leaderlink merges their records
//! into shared Kafka record batches.
//!
//! * **Merged requests.** Within a message, the calls for one partition with the same acks and
//!   deadline become one request of their records together (up to
//!   [`Options::max_merge_bytes`]), so leaderlink validates and answers one request where it
//!   would have many. Each call still gets its own result: its own offset, the record errors of
//!   its own records (by their index in its records); when the leader refuses a merged request
//!   for another call's records or for its size, the call is sent again, alone.
//!
//! * **No linger.** A lane sends what its callers queued since its last message after one turn
//!   of the scheduler; a lone call goes out at once.
//! * **Order.** The calls for one partition always take the same lane, where leaderlink keeps
//!   their order (ForwardStream's rules): a call made after another one returned, or after it
//!   was made on the same task, lands behind it.
//! * **Deadlines.** Each call carries its own deadline to leaderlink (`call_timeout_ms`) and
//!   gets DEADLINE_EXCEEDED by then at the latest.
//! * **Cancellation.** Dropping a call's future withdraws it if it has not been sent yet; its
//!   neighbours are not disturbed either way.
//! * **Reconnects.** When a lane's stream breaks (leaderlink restarts, the connection drops),
//!   its calls in flight fail UNAVAILABLE (they may or may not have been written) and the next
//!   call opens a new stream.
//!
//! ```no_run
//! use std::time::Duration;
//! use leaderlink_client::{Acks, Client, Payload, Record};
//!
//! # async fn broker() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::connect(&["http://127.0.0.1:50051"], Default::default()).await?;
//! let record = Record {
//!     key: Some("user-42".into()),
//!     value: Some("hello".into()),
//!     ..Default::default()
//! };
//! let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
//! let r = client
//!     .forward("demo", 0, Payload::Records(vec![record]), Acks::Leader, deadline)
//!     .await?;
//! println!("offset {} (Kafka error {})", r.base_offset, r.error_code);
//! # Ok(())
//! # }
//! ```

use std::{
    collections::{HashMap, hash_map::DefaultHasher},
    hash::{Hash, Hasher},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use futures::StreamExt;
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Status,
    transport::{Channel, Endpoint},
};

/// The types of leaderlink's Forwarder service, generated from its `.proto`.
pub mod proto {
    #![allow(missing_docs)]
    tonic::include_proto!("leaderlink.v1");
}

use merge::{Queued, Waiter, take_batch};
pub use proto::{Acks, Header, PartitionResult, Record, RecordError};
use proto::{
    ForwardBatch, ForwardBatchResponse, ForwardRequest, PartitionData,
    forwarder_client::ForwarderClient,
};

mod merge;

/// One partition's payload.
#[derive(Debug, Clone)]
pub enum Payload {
    /// Records that leaderlink encodes into a record batch (and may merge with other calls').
    Records(Vec<Record>),
    /// One Kafka RecordBatch (magic 2), forwarded byte for byte.
    RecordBatch(Bytes),
}

/// Settings of a [`Client`].
#[derive(Debug, Clone)]
pub struct Options {
    /// HTTP/2 connections, each with its own `ForwardBatches` stream; the addresses given to
    /// [`Client::connect`] are used in turn. A single connection serialises every message on
    /// one socket and one server task; a few spread the work over the server's cores.
    pub connections: usize,
    /// Most calls one message carries; more queued at once go in the next.
    pub max_batch: usize,
    /// Largest merged request, in bytes of record keys, values and headers: the calls of one
    /// message for one partition, with the same acks and deadline (to the millisecond), go to
    /// leaderlink as one request of their records together, up to this size. A call larger
    /// than this goes alone. The default stays well below Kafka's default
    /// `max.message.bytes` (1 MiB); a merged request the leader refuses as too large is sent
    /// again call by call. 0 turns merging off: each call is a request of its own.
    pub max_merge_bytes: usize,
    /// Calls a lane queues before [`Client::forward`] waits for room (back pressure on the
    /// caller rather than unbounded memory).
    pub max_queued: usize,
    /// Longest a connection may take to open.
    pub connect_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            connections: 4,
            max_batch: 1024,
            max_merge_bytes: 256 * 1024,
            max_queued: 16 * 1024,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// A connection to leaderlink that merges concurrent calls. Cheap to clone; the lanes end
/// when the last clone is dropped.
#[derive(Clone)]
pub struct Client {
    lanes: Arc<[mpsc::Sender<Queued>]>,
}

impl Client {
    /// Opens `options.connections` HTTP/2 connections to the leaderlink instances at `addrs`
    /// (e.g. `http://127.0.0.1:50051`, used in turn). Fails if an address is invalid or a
    /// connection cannot be opened within `connect_timeout`.
    pub async fn connect(
        addrs: &[impl AsRef<str>],
        options: Options,
    ) -> Result<Client, tonic::transport::Error> {
        let n = options.connections.max(1);
        let mut lanes = Vec::with_capacity(n);
        for i in 0..n {
            let addr = addrs[i % addrs.len().max(1)].as_ref().to_string();
            let channel = Endpoint::from_shared(addr)?
                .connect_timeout(options.connect_timeout)
                .tcp_nodelay(true)
                .connect()
                .await?;
            let (tx, rx) = mpsc::channel(options.max_queued.max(1));
            tokio::spawn(run_lane(
                channel,
                rx,
                options.max_batch.max(1),
                options.max_merge_bytes,
            ));
            lanes.push(tx);
        }
        Ok(Client {
            lanes: lanes.into(),
        })
    }

    /// Forwards `payload` to `topic`-`partition` with `acks`, answered by `deadline`. Kafka
    /// errors come back in the result's `error_code`, as from `Forward`; a failure of the call
    /// itself is a [`Status`]: INVALID_ARGUMENT, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, or
    /// UNAVAILABLE (leaderlink unreachable, or the stream broke while the call was in flight:
    /// it may have been written).
    pub async fn forward(
        &self,
        topic: &str,
        partition: i32,
        payload: Payload,
        acks: Acks,
        deadline: Instant,
    ) -> Result<PartitionResult, Status> {
        let (record_batch, records) = match payload {
            Payload::Records(r) => (Bytes::new(), r),
            Payload::RecordBatch(b) => (b, Vec::new()),
        };
        let request = ForwardRequest {
            acks: acks as i32,
            partitions: vec![PartitionData {
                topic: topic.to_string(),
                partition,
                record_batch,
                records,
            }],
            ..Default::default()
        };
        let lane = &self.lanes[lane_of(topic, partition, self.lanes.len())];
        let (reply, rx) = oneshot::channel();
        let queued = Queued {
            request,
            deadline,
            reply,
            alone: false,
            attempts: 0,
        };
        let answer = async {
            lane.send(queued)
                .await
                .map_err(|_| Status::unavailable("leaderlink client closed"))?;
            rx.await
                .unwrap_or_else(|_| Err(Status::unavailable("leaderlink client lane ended")))
        };
        let resp = match tokio::time::timeout_at(deadline, answer).await {
            Ok(r) => r?,
            Err(_) => return Err(Status::deadline_exceeded("no answer within the deadline")),
        };
        if resp.status_code != 0 {
            return Err(Status::new(
                Code::from_i32(resp.status_code),
                resp.status_message,
            ));
        }
        resp.partitions
            .into_iter()
            .next()
            .ok_or_else(|| Status::internal("leaderlink answered without a partition result"))
    }
}

/// The lane of a partition: always the same, so its calls keep their order on one stream.
fn lane_of(topic: &str, partition: i32, lanes: usize) -> usize {
    let mut h = DefaultHasher::new();
    (topic, partition).hash(&mut h);
    (h.finish() % lanes as u64) as usize
}

/// One lane: opens a `ForwardBatches` stream when calls come, sends them in messages of what
/// is queued (merged as [`merge`] says), and hands each answer to its caller by id. When the
/// stream breaks, the calls in flight fail UNAVAILABLE and the next call opens a new stream.
/// Ends when the client is gone and nothing is in flight.
async fn run_lane(
    channel: Channel,
    mut calls: mpsc::Receiver<Queued>,
    max_batch: usize,
    max_merge_bytes: usize,
) {
    let mut next_id: u64 = 0;
    let mut queued: Vec<Queued> = Vec::new();
    let mut open = true;
    loop {
        if queued.is_empty() && (!open || calls.recv_many(&mut queued, max_batch).await == 0) {
            return;
        }
        let (out, out_rx) = mpsc::channel::<ForwardBatch>(16);
        let mut pending: HashMap<u64, Waiter> = HashMap::new();
        // The first message goes into the stream's buffer before the call opens, so that the
        // server has something to read as soon as it answers the headers.
        let first = take_batch(&mut queued, &mut next_id, &mut pending, max_merge_bytes);
        if !first.requests.is_empty() && out.send(first).await.is_err() {
            continue;
        }
        let mut client = ForwarderClient::new(channel.clone());
        let mut answers = match client.forward_batches(ReceiverStream::new(out_rx)).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                fail_all(&mut pending, &status);
                continue;
            }
        };
        let broken = loop {
            tokio::select! {
                // Only while the stream takes another message at once: waiting to send here
                // would stop the answers from being read, and the server stops reading
                // requests while its answers wait.
                n = calls.recv_many(&mut queued, max_batch), if open && out.capacity() > 0 => {
                    if n == 0 {
                        // The client is gone: finish what is in flight, then end.
                        open = false;
                    } else {
                        // One turn of the scheduler: calls made at the same moment join.
                        tokio::task::yield_now().await;
                        while queued.len() < max_batch {
                            match calls.try_recv() {
                                Ok(q) => queued.push(q),
                                Err(_) => break,
                            }
                        }
                    }
                }
                msg = answers.next() => match msg {
                    Some(Ok(ForwardBatchResponse { responses })) => {
                        // Calls of a merged request that go again, alone (see `merge`): ahead
                        // of those queued after them.
                        let mut again = Vec::new();
                        for r in responses {
                            if let Some(waiter) = pending.remove(&r.id) {
                                waiter.answer(r, &mut again);
                            }
                        }
                        if !again.is_empty() {
                            queued.splice(0..0, again);
                        }
                    }
                    Some(Err(status)) => break status,
                    None => break Status::unavailable("leaderlink ended the ForwardBatches stream"),
                },
            }
            while !queued.is_empty() {
                let batch = take_batch(&mut queued, &mut next_id, &mut pending, max_merge_bytes);
                if !batch.requests.is_empty() && out.send(batch).await.is_err() {
                    break;
                }
            }
            if !open && pending.is_empty() {
                return;
            }
        };
        let status = Status::unavailable(format!(
            "the ForwardBatches stream broke while the call was in flight (it may have been \
             written): {}",
            broken.message()
        ));
        fail_all(&mut pending, &status);
    }
}

fn fail_all(pending: &mut HashMap<u64, Waiter>, status: &Status) {
    for (_, waiter) in pending.drain() {
        waiter.fail(status);
    }
}
