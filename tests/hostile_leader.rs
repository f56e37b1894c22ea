//! Hostile leaders ("Trust no one", item 3): a scripted fake Kafka broker on 127.0.0.1:0 that
//! answers ApiVersions and Metadata properly (one broker, itself; topic `t`, partition 0 led by
//! node 1) and then misbehaves on Produce in one scripted way per test, driven end to end through
//! leaderlink's gRPC server with a real tonic client.
//!
//! Each case checks what the caller sees (code, and a message naming the cause), that every
//! concurrent call in flight fails (none hangs), that the leader connection is poisoned and
//! replaced, that leaderlink recovers as soon as the broker behaves, that the server keeps
//! serving (health, another call, no panic on a runtime worker), and that the connection
//! counters are back to zero. The last test repeats the hostile cases 50 times and checks that
//! memory, file descriptors and sockets do not grow.
//!
//! leaderlink retries connection failures within the caller's deadline (README, "How it
//! behaves"), so a leader that is hostile on *every* connection makes a call end at its deadline,
//! which should be DEADLINE_EXCEEDED naming the last cause. That each fault is detected promptly
//! is shown with a leader that is hostile *once*: all the calls in flight on the poisoned
//! connection are retried on a new one and succeed long before their deadline.
//!
//! Two of them guard fixes: a retry round started with no time left used to hide the leader's
//! fault behind a connect timeout (`a_persistently_hostile_leader_is_reported_with_its_fault`),
//! and a request whose caller had gone away used to stay pending for ever on a silent leader
//! (`a_cancelled_calls_request_is_still_timed_out`).

mod common;

use std::{
    net::SocketAddr,
    sync::{
        Arc, Once,
        atomic::{
            AtomicBool, AtomicI32, AtomicI64, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering,
        },
    },
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use futures::future::join_all;
use kafka_protocol::{
    messages::{
        ApiKey, ApiVersionsResponse, BrokerId, InitProducerIdResponse, MetadataRequest,
        MetadataResponse, ProduceRequest, ProduceResponse, ProducerId, RequestHeader,
        ResponseHeader, TopicName,
        api_versions_response::ApiVersion,
        metadata_response::{
            MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
        },
        produce_response::{PartitionProduceResponse, TopicProduceResponse},
    },
    protocol::{Decodable, Encodable, StrBytes},
};
use leaderlink::{
    config::Config,
    forward::ForwardError,
    kafka::{connection::ConnStats, pool::Slot},
    proto::v1::{
        Acks, ForwardRequest, ForwardResponse, LeaderConnection, Record, admin_client::AdminClient,
        forwarder_client::ForwarderClient,
    },
    server::Running,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::RwLock,
    time::Instant,
};
use tonic::{Code, Status, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

// ---------------------------------------------------------------------------------------------
// Timing. Real time, short deadlines; no assertion depends on a tight timing.

/// Deadline of calls that meet a leader hostile on every connection. leaderlink answers 5% (at
/// most 100 ms) before it, so that its DEADLINE_EXCEEDED beats the caller's own timer (which
/// would answer CANCELLED); 2 s gives the full 100 ms against scheduling delays under load.
const HOSTILE_DEADLINE: Duration = Duration::from_secs(2);
/// Deadline of calls that are expected to succeed (after at most one poisoned connection).
const LONG_DEADLINE: Duration = Duration::from_secs(5);
/// A call that succeeds after one poisoned connection must be answered within this (of 5 s).
const PROMPT: Duration = Duration::from_secs(3);
/// How long after its deadline a call may still be unanswered before it counts as hung.
const HANG_MARGIN: Duration = Duration::from_secs(3);
/// Calls in flight at once in every case.
const CONCURRENT: usize = 4;
/// Longest the fake waits for `gather` Produce requests before it misbehaves.
const GATHER_WAIT: Duration = Duration::from_secs(1);
/// The trickle: one byte of a valid answer every this often (an answer is ~50 bytes: ~3 s, well
/// beyond [`HOSTILE_DEADLINE`]).
const TRICKLE_EVERY: Duration = Duration::from_millis(60);

// ---------------------------------------------------------------------------------------------
// Test isolation and panic detection.

/// The memory test takes this exclusively, every other test shares it: the process RSS and the
/// open file descriptors it samples are then not disturbed by other tests of this file.
static GATE: RwLock<()> = RwLock::const_new(());

/// Panics on tokio worker threads (leaderlink's tasks, tonic's, the fake broker's). A test's own
/// assertions run on the test thread and are not counted.
static WORKER_PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_worker_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("tokio-runtime-worker"))
            {
                WORKER_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

// ---------------------------------------------------------------------------------------------
// The fake broker.

/// How the fake broker answers Produce (and, for `SilentHandshake`, ApiVersions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    /// Proper answers.
    Behave,
    /// Case 1: bytes that are no Kafka frame at all (an HTTP answer).
    Garbage,
    /// Case 1, well framed: the right correlation id, then a body that is garbage.
    GarbageBody,
    /// Case 2: a length prefix of 0x7fff_ffff.
    HugeLength,
    /// Case 2: a negative length prefix.
    NegativeLength,
    /// Case 3: a valid answer under a correlation id nobody waits for.
    UnknownCorrelation,
    /// Case 4: half an answer, then the connection closed (FIN).
    CutThenClose,
    /// Case 5: half an answer, then nothing; the socket stays open (half-open).
    CutThenSilence,
    /// Case 6: the Produce is read, never answered; the socket stays open.
    Silence,
    /// Case 7: valid answers, one byte every [`TRICKLE_EVERY`].
    Trickle,
    /// Extra: a new connection's ApiVersions is never answered.
    SilentHandshake,
    /// A well-formed Produce answer that omits the partition asked for.
    OmitPartition,
    /// Of the gathered Produce requests, the first is answered NOT_ENOUGH_REPLICAS (retriable,
    /// nothing appended) and the others OUT_OF_ORDER_SEQUENCE_NUMBER, as a broker does for the
    /// batches behind one it refused; then the connection behaves.
    SequenceGap,
    /// Produce as a broker checks an idempotent producer's sequences on `t`-0: the next
    /// sequence is appended, an earlier one is a duplicate, a later one OUT_OF_ORDER. The batch
    /// with the next sequence is refused NOT_ENOUGH_REPLICAS (retriable, nothing appended) as
    /// often as `refusals` says. The gathered requests are answered together; OUT_OF_ORDER
    /// answers after them are counted as `strays` (a batch sent although leaderlink knew an
    /// earlier one was missing).
    EnforceSequence,
}

impl Mode {
    const ALL: [Mode; 14] = [
        Mode::Behave,
        Mode::Garbage,
        Mode::GarbageBody,
        Mode::HugeLength,
        Mode::NegativeLength,
        Mode::UnknownCorrelation,
        Mode::CutThenClose,
        Mode::CutThenSilence,
        Mode::Silence,
        Mode::Trickle,
        Mode::SilentHandshake,
        Mode::OmitPartition,
        Mode::SequenceGap,
        Mode::EnforceSequence,
    ];

    fn from_u8(v: u8) -> Mode {
        Mode::ALL[usize::from(v)]
    }

    /// Faults leaderlink can only notice by its deadline.
    fn only_the_deadline_tells(self) -> bool {
        matches!(
            self,
            Mode::CutThenSilence | Mode::Silence | Mode::Trickle | Mode::SilentHandshake
        )
    }
}

struct BrokerState {
    port: i32,
    mode: AtomicU8,
    /// Misbehave once, then behave: the first connection to misbehave switches `mode` back.
    once: AtomicBool,
    /// Produce requests to collect on a connection before misbehaving (all calls in flight).
    gather: AtomicUsize,
    next_offset: AtomicI64,
    hostile_acts: AtomicU64,
    produce_requests: AtomicU64,
    /// Connections that carried a Metadata request.
    metadata_conns: AtomicU64,
    /// Connections open now (on the fake's side).
    live: AtomicI64,
    /// [`Mode::EnforceSequence`]: the next sequence of `t`-0, refusals left, and OUT_OF_ORDER
    /// answers after the gathered requests.
    expected_sequence: AtomicI32,
    refusals: AtomicU32,
    strays: AtomicU64,
}

impl BrokerState {
    fn mode(&self) -> Mode {
        Mode::from_u8(self.mode.load(Ordering::SeqCst))
    }

    /// Whether this connection gets to misbehave in `mode` (in once-mode only the first does).
    fn claim(&self, mode: Mode) -> bool {
        if mode == Mode::Behave {
            return false;
        }
        let claimed = !self.once.load(Ordering::SeqCst)
            || self
                .mode
                .compare_exchange(
                    mode as u8,
                    Mode::Behave as u8,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_ok();
        if claimed {
            self.hostile_acts.fetch_add(1, Ordering::SeqCst);
        }
        claimed
    }
}

/// A fake Kafka broker on 127.0.0.1:0.
struct FakeBroker {
    addr: SocketAddr,
    state: Arc<BrokerState>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl FakeBroker {
    async fn start() -> FakeBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(BrokerState {
            port: i32::from(addr.port()),
            mode: AtomicU8::new(Mode::Behave as u8),
            once: AtomicBool::new(false),
            gather: AtomicUsize::new(1),
            next_offset: AtomicI64::new(0),
            hostile_acts: AtomicU64::new(0),
            produce_requests: AtomicU64::new(0),
            metadata_conns: AtomicU64::new(0),
            live: AtomicI64::new(0),
            expected_sequence: AtomicI32::new(0),
            refusals: AtomicU32::new(0),
            strays: AtomicU64::new(0),
        });
        let st = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(st.clone(), sock));
            }
        });
        FakeBroker {
            addr,
            state,
            accept,
        }
    }

    /// Switches the script: `mode` on every connection from now on (`once`: only until one
    /// connection has misbehaved), after collecting `gather` Produce requests.
    fn set(&self, mode: Mode, once: bool, gather: usize) {
        self.state.gather.store(gather, Ordering::SeqCst);
        self.state.once.store(once, Ordering::SeqCst);
        self.state.mode.store(mode as u8, Ordering::SeqCst);
    }

    fn behave(&self) {
        self.set(Mode::Behave, false, 1);
    }

    fn metadata_conns(&self) -> u64 {
        self.state.metadata_conns.load(Ordering::SeqCst)
    }

    fn produce_requests(&self) -> u64 {
        self.state.produce_requests.load(Ordering::SeqCst)
    }

    fn hostile_acts(&self) -> u64 {
        self.state.hostile_acts.load(Ordering::SeqCst)
    }
}

/// Counts a connection as live while its handler runs (also when the handler is dropped).
struct Live(Arc<BrokerState>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One request as read off the wire.
struct Req {
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    /// The body, after the header.
    body: Bytes,
}

/// Reads one request frame; `None` on EOF, an I/O error or a frame that makes no sense.
async fn read_request(r: &mut OwnedReadHalf) -> Option<Req> {
    let len = r.read_i32().await.ok()?;
    if !(8..=64 << 20).contains(&len) {
        return None;
    }
    let mut buf = vec![0; len as usize];
    r.read_exact(&mut buf).await.ok()?;
    let mut b = Bytes::from(buf);
    let key = ApiKey::try_from(i16::from_be_bytes([b[0], b[1]])).ok()?;
    let version = i16::from_be_bytes([b[2], b[3]]);
    // The header version follows the API version (classic v1 or flexible v2 here).
    let header = RequestHeader::decode(&mut b, key.request_header_version(version)).ok()?;
    Some(Req {
        key,
        version,
        correlation_id: header.correlation_id,
        body: b,
    })
}

/// A whole response frame: length prefix, response header (its version per the API, always v0
/// for ApiVersions), body.
fn frame<R: Encodable>(req: &Req, correlation_id: i32, body: &R) -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_i32(0);
    ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(&mut buf, req.key.response_header_version(req.version))
        .expect("response header encodes");
    body.encode(&mut buf, req.version).expect("body encodes");
    let len = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    buf.freeze()
}

fn api_versions_answer(req: &Req) -> Bytes {
    let api = |key: ApiKey, min: i16, max: i16| {
        ApiVersion::default()
            .with_api_key(key as i16)
            .with_min_version(min)
            .with_max_version(max)
    };
    let resp = ApiVersionsResponse::default().with_api_keys(vec![
        api(ApiKey::Produce, 3, 9),
        api(ApiKey::Metadata, 0, 12),
        api(ApiKey::ApiVersions, 0, 3),
        api(ApiKey::InitProducerId, 0, 4),
    ]);
    frame(req, req.correlation_id, &resp)
}

fn metadata_answer(st: &BrokerState, req: &Req) -> Option<Bytes> {
    let asked = MetadataRequest::decode(&mut req.body.clone(), req.version).ok()?;
    let names: Vec<String> = match asked.topics {
        None => vec!["t".to_string()],
        Some(ts) => ts
            .iter()
            .filter_map(|t| t.name.as_ref().map(|n| n.0.to_string()))
            .collect(),
    };
    let topics = names
        .into_iter()
        .map(|name| {
            let topic = MetadataResponseTopic::default()
                .with_name(Some(TopicName(StrBytes::from_string(name.clone()))));
            if name == "t" {
                topic.with_partitions(vec![
                    MetadataResponsePartition::default()
                        .with_partition_index(0)
                        .with_leader_id(BrokerId(1))
                        .with_leader_epoch(0)
                        .with_replica_nodes(vec![BrokerId(1)])
                        .with_isr_nodes(vec![BrokerId(1)]),
                ])
            } else {
                topic.with_error_code(3) // UNKNOWN_TOPIC_OR_PARTITION
            }
        })
        .collect();
    let resp = MetadataResponse::default()
        .with_brokers(vec![
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(1))
                .with_host(StrBytes::from_static_str("127.0.0.1"))
                .with_port(st.port),
        ])
        .with_controller_id(BrokerId(1))
        .with_cluster_id(Some(StrBytes::from_static_str("hostile")))
        .with_topics(topics);
    Some(frame(req, req.correlation_id, &resp))
}

/// An answer to a Produce request, under `correlation_id`, with `partition` giving each
/// partition's answer from its index.
fn produce_answer_with(
    req: &Req,
    correlation_id: i32,
    mut partition: impl FnMut(i32) -> PartitionProduceResponse,
) -> Option<Bytes> {
    let asked = ProduceRequest::decode(&mut req.body.clone(), req.version).ok()?;
    let responses = asked
        .topic_data
        .iter()
        .map(|t| {
            TopicProduceResponse::default()
                .with_name(t.name.clone())
                .with_partition_responses(
                    t.partition_data
                        .iter()
                        .map(|p| partition(p.index))
                        .collect(),
                )
        })
        .collect();
    let resp = ProduceResponse::default().with_responses(responses);
    Some(frame(req, correlation_id, &resp))
}

/// A successful answer to a Produce request, under `correlation_id`.
fn produce_answer(st: &BrokerState, req: &Req, correlation_id: i32) -> Option<Bytes> {
    produce_answer_with(req, correlation_id, |index| {
        PartitionProduceResponse::default()
            .with_index(index)
            .with_error_code(0)
            .with_base_offset(st.next_offset.fetch_add(1, Ordering::SeqCst))
            .with_log_append_time_ms(-1)
            .with_log_start_offset(0)
    })
}

/// [`Mode::EnforceSequence`]'s answer to a Produce request; `after_gather` counts strays.
fn sequence_answer(st: &BrokerState, req: &Req, after_gather: bool) -> Option<Bytes> {
    let asked = ProduceRequest::decode(&mut req.body.clone(), req.version).ok()?;
    /// Producer id, base sequence and record count of a batch.
    type Header = (i64, i32, i32);
    // The record batch header (v2): producer id at byte 43, base sequence at 53, count at 57.
    // Read at fixed offsets: the fake needs three fields, not a decoded batch.
    let header = |b: &[u8]| -> Option<Header> {
        let at = |o: usize, n: usize| b.get(o..o + n);
        Some((
            i64::from_be_bytes(at(43, 8)?.try_into().ok()?),
            i32::from_be_bytes(at(53, 4)?.try_into().ok()?),
            i32::from_be_bytes(at(57, 4)?.try_into().ok()?),
        ))
    };
    let batches: Vec<(i32, Option<Header>)> = asked
        .topic_data
        .iter()
        .flat_map(|t| t.partition_data.iter())
        .map(|p| (p.index, p.records.as_deref().and_then(header)))
        .collect();
    produce_answer_with(req, req.correlation_id, |index| {
        let r = PartitionProduceResponse::default()
            .with_index(index)
            .with_log_append_time_ms(-1)
            .with_log_start_offset(0);
        let ok = |r: PartitionProduceResponse, count: i32| {
            r.with_base_offset(st.next_offset.fetch_add(i64::from(count), Ordering::SeqCst))
        };
        let Some((_, Some((pid, seq, count)))) = batches.iter().find(|(i, _)| *i == index) else {
            return r.with_error_code(87); // INVALID_RECORD
        };
        if *pid < 0 {
            return ok(r, *count);
        }
        let expected = st.expected_sequence.load(Ordering::SeqCst);
        if *seq == expected {
            let refuse = st
                .refusals
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if refuse {
                return r.with_error_code(19).with_base_offset(-1); // NOT_ENOUGH_REPLICAS
            }
            st.expected_sequence.fetch_add(*count, Ordering::SeqCst);
            ok(r, *count)
        } else if *seq < expected {
            r.with_error_code(46).with_base_offset(-1) // DUPLICATE_SEQUENCE_NUMBER
        } else {
            if after_gather {
                st.strays.fetch_add(1, Ordering::SeqCst);
            }
            r.with_error_code(45).with_base_offset(-1) // OUT_OF_ORDER_SEQUENCE_NUMBER
        }
    })
}

/// An answer to a Produce request that gives every partition `code`.
fn error_answer(req: &Req, code: i16) -> Option<Bytes> {
    produce_answer_with(req, req.correlation_id, |index| {
        PartitionProduceResponse::default()
            .with_index(index)
            .with_error_code(code)
            .with_base_offset(-1)
            .with_log_append_time_ms(-1)
            .with_log_start_offset(-1)
    })
}

/// Answers ApiVersions, Metadata and Produce properly. `None`: stop serving this connection.
fn proper_answer(st: &BrokerState, req: &Req) -> Option<Bytes> {
    match req.key {
        ApiKey::ApiVersions => Some(api_versions_answer(req)),
        ApiKey::Metadata => metadata_answer(st, req),
        ApiKey::Produce => produce_answer(st, req, req.correlation_id),
        ApiKey::InitProducerId => Some(frame(
            req,
            req.correlation_id,
            &InitProducerIdResponse::default()
                .with_producer_id(ProducerId(1000))
                .with_producer_epoch(0),
        )),
        _ => None,
    }
}

/// Reads and drops whatever comes until the peer closes; the write half stays open meanwhile
/// (dropping it would send FIN).
async fn hold(mut r: OwnedReadHalf, _w: OwnedWriteHalf) {
    let mut sink = vec![0u8; 64 * 1024];
    while let Ok(n) = r.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

async fn serve(st: Arc<BrokerState>, sock: TcpStream) {
    st.live.fetch_add(1, Ordering::SeqCst);
    let _live = Live(st.clone());
    let _ = sock.set_nodelay(true);
    let (mut r, mut w) = sock.into_split();
    let mut metadata_seen = false;
    loop {
        let Some(req) = read_request(&mut r).await else {
            return;
        };
        if req.key == ApiKey::Metadata && !metadata_seen {
            metadata_seen = true;
            st.metadata_conns.fetch_add(1, Ordering::SeqCst);
        }
        let mode = st.mode();
        if req.key == ApiKey::ApiVersions && mode == Mode::SilentHandshake && st.claim(mode) {
            return hold(r, w).await;
        }
        if req.key == ApiKey::Produce {
            st.produce_requests.fetch_add(1, Ordering::SeqCst);
            if mode != Mode::SilentHandshake && st.claim(mode) {
                // Let every call in flight get its request onto this connection first.
                let mut pending = vec![req];
                let until = Instant::now() + GATHER_WAIT;
                while pending.len() < st.gather.load(Ordering::SeqCst) {
                    match tokio::time::timeout_at(until, read_request(&mut r)).await {
                        Ok(Some(more)) if more.key == ApiKey::Produce => {
                            st.produce_requests.fetch_add(1, Ordering::SeqCst);
                            pending.push(more);
                        }
                        Ok(Some(other)) => match proper_answer(&st, &other) {
                            Some(a) if w.write_all(&a).await.is_ok() => {}
                            _ => return,
                        },
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                return misbehave(&st, mode, r, w, pending).await;
            }
        }
        match proper_answer(&st, &req) {
            Some(a) if w.write_all(&a).await.is_ok() => {}
            _ => return,
        }
    }
}

/// Writes the gathered requests' `answers` at once, then serves the connection: Produce with
/// `produce`, everything else properly. Stops at the first answer that cannot be made.
async fn answer_then_serve(
    st: &BrokerState,
    mut r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    answers: impl Iterator<Item = Option<Bytes>>,
    produce: impl Fn(&Req) -> Option<Bytes>,
) {
    let mut all = BytesMut::new();
    for a in answers {
        let Some(a) = a else { return };
        all.put_slice(&a);
    }
    if w.write_all(&all).await.is_err() {
        return;
    }
    while let Some(req) = read_request(&mut r).await {
        let answer = if req.key == ApiKey::Produce {
            st.produce_requests.fetch_add(1, Ordering::SeqCst);
            produce(&req)
        } else {
            proper_answer(st, &req)
        };
        match answer {
            Some(a) if w.write_all(&a).await.is_ok() => {}
            _ => return,
        }
    }
}

async fn misbehave(
    st: &BrokerState,
    mode: Mode,
    r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    pending: Vec<Req>,
) {
    let first = &pending[0];
    let Some(answer) = produce_answer(st, first, first.correlation_id) else {
        return;
    };
    let half = &answer[..answer.len() / 2];
    let wrote = match mode {
        Mode::Behave | Mode::SilentHandshake => unreachable!("not hostile on Produce"),
        Mode::EnforceSequence => {
            // Sequences stay enforced on this connection, strays counted after the gathered.
            let gathered = pending.iter().map(|req| sequence_answer(st, req, false));
            return answer_then_serve(st, r, w, gathered, |req| sequence_answer(st, req, true))
                .await;
        }
        Mode::Garbage => {
            w.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await
        }
        Mode::GarbageBody => {
            // Header v1 (correlation id, no tags), then a "topic array" of 2^32 - 2 elements
            // and some text.
            let mut f = BytesMut::new();
            let garbage = b"\xff\xff\xff\xff\x0fthis is not a produce answer";
            f.put_i32(4 + 1 + garbage.len() as i32);
            f.put_i32(first.correlation_id);
            f.put_u8(0);
            f.put_slice(garbage);
            w.write_all(&f).await
        }
        Mode::HugeLength => {
            w.write_all(&[0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 1, 2, 3])
                .await
        }
        Mode::NegativeLength => w.write_all(&(-1i32).to_be_bytes()).await,
        Mode::UnknownCorrelation => {
            match produce_answer(st, first, first.correlation_id.wrapping_add(1_000_000)) {
                Some(a) => w.write_all(&a).await,
                None => return,
            }
        }
        Mode::CutThenClose => {
            if w.write_all(half).await.is_ok() {
                // FIN, then read until leaderlink closes its side too.
                let _ = w.shutdown().await;
            }
            Ok(())
        }
        Mode::CutThenSilence => w.write_all(half).await,
        Mode::Silence => Ok(()),
        Mode::OmitPartition => {
            let resp = ProduceResponse::default().with_responses(vec![]);
            w.write_all(&frame(first, first.correlation_id, &resp))
                .await
        }
        Mode::SequenceGap => {
            let gathered = pending
                .iter()
                .enumerate()
                .map(|(k, req)| error_answer(req, if k == 0 { 19 } else { 45 }));
            // The connection behaves from now on.
            return answer_then_serve(st, r, w, gathered, |req| {
                produce_answer(st, req, req.correlation_id)
            })
            .await;
        }
        Mode::Trickle => {
            let mut all = BytesMut::new();
            for req in &pending {
                match produce_answer(st, req, req.correlation_id) {
                    Some(a) => all.put_slice(&a),
                    None => return,
                }
            }
            for b in all.iter() {
                if w.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(TRICKLE_EVERY).await;
            }
            Ok(())
        }
    };
    if wrote.is_ok() {
        hold(r, w).await;
    }
}

// ---------------------------------------------------------------------------------------------
// leaderlink in front of it, and the client side.

struct Setup {
    broker: FakeBroker,
    server: Running,
    channel: Channel,
    client: ForwarderClient<Channel>,
    admin: AdminClient<Channel>,
    next_id: AtomicU64,
}

/// Starts a fake broker and a leaderlink bootstrapped to it, and checks that a first call works
/// (unless `warm` is false: then only waits for health SERVING).
async fn setup(warm: bool) -> Setup {
    count_worker_panics();
    let broker = FakeBroker::start().await;
    let cfg = Config {
        bootstrap: vec![broker.addr.to_string()],
        // Retries after a poisoned connection come 5 ms later instead of 50: same behaviour,
        // shorter tests.
        retry_backoff_ms: 5,
        ..Config::default()
    };
    cfg.validate().expect("valid test config");
    // On 127.0.0.1:0, metrics too.
    let server = common::start_server(&cfg).await;
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .expect("client connects");
    let client = ForwarderClient::new(channel.clone());
    let admin = AdminClient::connect(format!("http://{}", server.admin_addr))
        .await
        .expect("admin client connects");
    let s = Setup {
        broker,
        server,
        channel,
        client,
        admin,
        next_id: AtomicU64::new(1),
    };
    // Health turns SERVING once the first metadata fetch (over its own connection) succeeded.
    let until = Instant::now() + Duration::from_secs(5);
    while s.health().await != ServingStatus::Serving {
        assert!(Instant::now() < until, "health never turned SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if warm {
        s.assert_one_call_succeeds(1).await;
        assert_eq!(s.stats().connects, 1);
    }
    s
}

/// A one-partition request to `t`-0 with one record of `value_len` bytes.
fn request(id: u64, value_len: usize) -> ForwardRequest {
    let mut req = common::request(id, Acks::Leader, "t", 0, common::records("hostile", 1));
    if value_len > 0 {
        req.partitions[0].records = vec![Record {
            key: None,
            value: Some(Bytes::from(vec![b'x'; value_len])),
            headers: vec![],
            timestamp_ms: 0,
        }];
    }
    req
}

/// Plain copies of a slot's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    in_flight: u64,
    queued: u64,
    in_flight_bytes: u64,
    errors: u64,
    timeouts: u64,
    poisoned: u64,
    connects: u64,
}

impl Counts {
    fn of(s: &ConnStats) -> Counts {
        let get = |a: &AtomicU64| a.load(Ordering::SeqCst);
        Counts {
            in_flight: get(&s.in_flight),
            queued: get(&s.queued),
            in_flight_bytes: get(&s.in_flight_bytes),
            errors: get(&s.errors),
            timeouts: get(&s.timeouts),
            poisoned: get(&s.poisoned),
            connects: get(&s.connects),
        }
    }
}

/// A call's outcome and how long it took.
type Outcome = (Result<ForwardResponse, Status>, Duration);

impl Setup {
    /// The single leader connection slot (broker 1, index 0).
    fn slot(&self) -> Arc<Slot> {
        let slots = self.server.forwarder.pool().slots();
        assert_eq!(slots.len(), 1, "one leader, one connection slot");
        slots[0].clone()
    }

    fn stats(&self) -> Counts {
        Counts::of(&self.slot().stats)
    }

    async fn health(&self) -> ServingStatus {
        let mut h = HealthClient::new(self.channel.clone());
        match h
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
        {
            Ok(r) => r.into_inner().status(),
            Err(_) => ServingStatus::Unknown,
        }
    }

    async fn connections(&self) -> Vec<LeaderConnection> {
        common::connections(&mut self.admin.clone()).await
    }

    /// One Forward call with `deadline` (sent as grpc-timeout). A call still unanswered
    /// [`HANG_MARGIN`] after its deadline is reported as hung instead of waited for.
    async fn call(&self, deadline: Duration, value_len: usize) -> Outcome {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut c = self.client.clone();
        let mut req = tonic::Request::new(request(id, value_len));
        req.set_timeout(deadline);
        let started = Instant::now();
        let r = match tokio::time::timeout(deadline + HANG_MARGIN, c.forward(req)).await {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(Status::unknown(
                "HUNG: no answer long after the call's deadline",
            )),
        };
        (r, started.elapsed())
    }

    /// `n` calls at once.
    async fn calls(&self, n: usize, deadline: Duration, value_len: usize) -> Vec<Outcome> {
        join_all((0..n).map(|_| self.call(deadline, value_len))).await
    }

    /// `n` concurrent calls, started `gap` apart (so their deadlines are `gap` apart too).
    async fn staggered_calls(&self, n: usize, deadline: Duration, gap: Duration) -> Vec<Outcome> {
        join_all((0..n).map(|i| async move {
            tokio::time::sleep(gap * i as u32).await;
            self.call(deadline, 0).await
        }))
        .await
    }

    /// A call succeeds and its only partition was answered with `attempts` Produce requests.
    async fn assert_one_call_succeeds(&self, attempts: u32) {
        let (r, elapsed) = self.call(LONG_DEADLINE, 0).await;
        let resp = r.unwrap_or_else(|e| panic!("a call to a behaving leader failed: {e:?}"));
        let p = &resp.partitions[0];
        assert_eq!(p.error_code, 0, "{p:?}");
        assert!(p.base_offset >= 0, "{p:?}");
        assert_eq!(p.leader_id, 1, "{p:?}");
        assert_eq!(p.attempts, attempts, "{p:?}");
        assert!(elapsed < PROMPT, "took {elapsed:?}");
    }

    /// The slot's in-flight and queued gauges drop back to zero (they do so synchronously on
    /// a poison; the short poll only covers answers still being delivered).
    async fn assert_gauges_settle(&self) {
        let until = Instant::now() + Duration::from_secs(2);
        loop {
            let c = self.stats();
            if (c.in_flight, c.queued, c.in_flight_bytes) == (0, 0, 0) {
                return;
            }
            assert!(
                Instant::now() < until,
                "connection gauges stay above zero: {c:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The server still serves and nothing panicked on a runtime worker.
    async fn assert_alive(&self) {
        assert_eq!(self.health().await, ServingStatus::Serving);
        assert_eq!(
            WORKER_PANICS.load(Ordering::SeqCst),
            0,
            "a task panicked on a tokio worker (see the output above)"
        );
    }
}

/// The call failed (it neither succeeded nor hung) and was answered by its deadline, give or
/// take scheduling slack.
fn failed_by_deadline(o: &Outcome, deadline: Duration) -> &Status {
    let (r, elapsed) = o;
    let status = match r {
        Ok(resp) => panic!("expected a failure, the call succeeded: {resp:?}"),
        Err(s) => s,
    };
    assert!(
        *elapsed <= deadline + Duration::from_secs(2),
        "answered {elapsed:?} after the start, deadline {deadline:?}: {status:?}"
    );
    status
}

/// The call failed with `code` and a message naming each of `needles`.
fn assert_failed(o: &Outcome, code: Code, needles: &[&str], deadline: Duration) {
    let status = failed_by_deadline(o, deadline);
    assert_eq!(status.code(), code, "after {:?}: {status:?}", o.1);
    for n in needles {
        assert!(
            status.message().contains(n),
            "the message should name {n:?}: {:?}",
            status.message()
        );
    }
}

/// The failure of a call whose leader stayed hostile until its deadline: at the deadline (not
/// before), naming the partition.
///
/// The code is DEADLINE_EXCEEDED naming the fault (checked exactly by
/// `a_persistently_hostile_leader_is_reported_with_its_fault`), or UNAVAILABLE when the last
/// attempt could not reach the leader; the cause is checked on the connection (Admin
/// ListConnections).
fn assert_failed_at_deadline(o: &Outcome, deadline: Duration) {
    let status = failed_by_deadline(o, deadline);
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Unavailable),
        "after {:?}: {status:?}",
        o.1
    );
    assert!(status.message().contains("t-0"), "{status:?}");
    assert!(o.1 >= deadline * 3 / 4, "failed early, after {:?}", o.1);
}

// ---------------------------------------------------------------------------------------------
// The scenarios.

/// Cases 1–4: faults leaderlink can see on the wire. `cause`: how the connection's cause reads.
async fn detectable_fault(mode: Mode, cause: &str) {
    assert!(!mode.only_the_deadline_tells());
    let _shared = GATE.read().await;
    let s = setup(true).await;

    // 1. Hostile on every connection, at its first Produce: leaderlink retries within the
    // deadline, reconnecting after each poison, until the deadline ends every call.
    s.broker.set(mode, false, 1);
    let before = s.stats();
    let acts = s.broker.hostile_acts();
    for o in s.calls(CONCURRENT, HOSTILE_DEADLINE, 0).await {
        assert_failed_at_deadline(&o, HOSTILE_DEADLINE);
    }
    let after = s.stats();
    assert!(
        after.poisoned >= before.poisoned + 2,
        "each retry met the fault on a new connection: {before:?} -> {after:?}"
    );
    assert!(
        after.connects >= before.connects + 2,
        "{before:?} -> {after:?}"
    );
    assert!(s.broker.hostile_acts() >= acts + 2);
    s.assert_gauges_settle().await;
    // The last connection is shown closed, with the broker's fault as the cause.
    let conns = s.connections().await;
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_eq!(conns[0].state, "CLOSED", "{conns:?}");
    assert!(conns[0].closed_cause.contains(cause), "{conns:?}");
    assert_eq!(conns[0].poisoned, s.stats().poisoned);
    assert_eq!(conns[0].connects, s.stats().connects);
    assert_eq!((conns[0].in_flight, conns[0].queued), (0, 0));

    // 2. The broker behaves again: the next call opens a new connection and succeeds at its
    // first attempt.
    s.broker.behave();
    let c0 = s.stats().connects;
    s.assert_one_call_succeeds(1).await;
    assert_eq!(
        s.stats().connects,
        c0 + 1,
        "the poisoned connection was replaced"
    );

    // 3. Hostile once, with every call in flight on the connection when the fault comes: the
    // fault fails them all at once, the connection is poisoned and replaced, and every call
    // succeeds on its second attempt long before its deadline.
    s.broker.set(mode, true, CONCURRENT);
    let before = s.stats();
    let acts = s.broker.hostile_acts();
    for (r, elapsed) in s.calls(CONCURRENT, LONG_DEADLINE, 0).await {
        let resp = r.unwrap_or_else(|e| panic!("{mode:?} once: {e:?}"));
        let p = &resp.partitions[0];
        assert_eq!(p.error_code, 0, "{p:?}");
        assert_eq!(
            p.attempts, 2,
            "failed once by the poison, then answered: {p:?}"
        );
        assert!(
            p.possibly_duplicated,
            "the first attempt was written: {p:?}"
        );
        assert!(
            elapsed < PROMPT,
            "{mode:?}: the fault must fail the calls at once, took {elapsed:?}"
        );
    }
    assert_eq!(s.broker.hostile_acts(), acts + 1);
    let after = s.stats();
    assert_eq!(after.poisoned, before.poisoned + 1, "{after:?}");
    assert_eq!(after.connects, before.connects + 1, "{after:?}");
    // Requests failed by the poison (a well-framed garbage body is delivered to its caller,
    // which then poisons; the others fail by the poison).
    assert!(
        after.errors >= before.errors + CONCURRENT as u64 - 1,
        "{before:?} -> {after:?}"
    );
    s.assert_gauges_settle().await;
    assert_eq!(s.connections().await[0].state, "OPEN");

    // 4. Still serving: another call on the same connection, health, no panic.
    let c0 = s.stats().connects;
    s.assert_one_call_succeeds(1).await;
    assert_eq!(s.stats().connects, c0);
    s.assert_alive().await;
}

/// Cases 5–7: faults only the deadline reveals.
async fn deadline_fault(mode: Mode) {
    assert!(mode.only_the_deadline_tells());
    let _shared = GATE.read().await;
    // Two leaderlinks (each with its own fake broker) side by side, to halve the time.
    tokio::join!(
        deadline_fault_one_call(mode),
        deadline_fault_concurrent(mode)
    );
}

/// The slot's connection is shown closed by the missing answer, with nothing left in flight.
fn assert_closed_by_timeout(conns: &[LeaderConnection]) {
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_eq!(conns[0].state, "CLOSED", "{conns:?}");
    assert!(
        conns[0]
            .closed_cause
            .contains("no answer within the deadline"),
        "{conns:?}"
    );
    assert_eq!((conns[0].in_flight, conns[0].queued), (0, 0));
}

/// One call: DEADLINE_EXCEEDED at its deadline, naming the missing answer; the connection is
/// poisoned (a late answer could no longer be trusted) and replaced once the broker behaves.
async fn deadline_fault_one_call(mode: Mode) {
    let s = setup(true).await;
    let deadline = HOSTILE_DEADLINE;
    s.broker.set(mode, false, 1);
    let before = s.stats();
    let o = s.call(deadline, 0).await;
    assert_failed(
        &o,
        Code::DeadlineExceeded,
        &["t-0", "no answer within the deadline"],
        deadline,
    );
    assert!(o.1 >= deadline * 3 / 4, "failed early, after {:?}", o.1);
    let after = s.stats();
    assert_eq!(after.poisoned, before.poisoned + 1, "{after:?}");
    assert_eq!(after.timeouts, before.timeouts + 1, "{after:?}");
    s.assert_gauges_settle().await;
    assert_closed_by_timeout(&s.connections().await);

    s.broker.behave();
    s.assert_one_call_succeeds(1).await;
    assert_eq!(s.stats().connects, after.connects + 1);
    assert_eq!(s.connections().await[0].state, "OPEN");
    s.assert_alive().await;
}

/// Several calls in flight on one connection: all fail at their deadline, none hangs; the
/// connection is poisoned and replaced once the broker behaves.
async fn deadline_fault_concurrent(mode: Mode) {
    let s = setup(true).await;
    let deadline = HOSTILE_DEADLINE;
    s.broker.set(mode, false, CONCURRENT);
    let before = s.stats();
    let produced = s.broker.produce_requests();
    for o in s.calls(CONCURRENT, deadline, 0).await {
        assert_failed_at_deadline(&o, deadline);
    }
    let after = s.stats();
    assert!(after.poisoned > before.poisoned, "{after:?}");
    assert!(after.timeouts > before.timeouts, "{after:?}");
    assert!(
        after.errors + after.timeouts - before.errors - before.timeouts >= CONCURRENT as u64,
        "each request failed by its own timeout or by the poison: {before:?} -> {after:?}"
    );
    assert!(s.broker.produce_requests() >= produced + CONCURRENT as u64);
    s.assert_gauges_settle().await;
    // A call that got its fellow's poison a few milliseconds before its own deadline may have
    // reconnected in a last round without time left to send: then the slot shows that new
    // connection, open. Otherwise it shows the poisoned one.
    let conns = s.connections().await;
    let replaced = conns[0].state != "OPEN";
    if replaced {
        assert_closed_by_timeout(&conns);
    }

    s.broker.behave();
    let c0 = s.stats().connects;
    s.assert_one_call_succeeds(1).await;
    assert_eq!(s.stats().connects, c0 + u64::from(replaced));
    assert_eq!(s.connections().await[0].state, "OPEN");
    s.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case1_garbage_bytes_instead_of_an_answer() {
    // "HTTP" read as a length prefix is 1.2 GB: refused, not allocated.
    detectable_fault(Mode::Garbage, "bytes exceeds the limit of").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case1_a_well_framed_answer_with_a_garbage_body() {
    detectable_fault(Mode::GarbageBody, "malformed Produce response").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case2_a_huge_length_prefix() {
    detectable_fault(
        Mode::HugeLength,
        "frame of 2147483647 bytes exceeds the limit",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case2_a_negative_length_prefix() {
    detectable_fault(Mode::NegativeLength, "invalid frame length -1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case3_an_answer_with_an_unknown_correlation_id() {
    // With requests pending, an id that is not the oldest one's is reported as out of order.
    detectable_fault(Mode::UnknownCorrelation, "correlation id").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case4_an_answer_cut_in_half_then_the_connection_closed() {
    detectable_fault(Mode::CutThenClose, "the broker closed the connection").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case5_an_answer_cut_in_half_then_nothing_half_open() {
    deadline_fault(Mode::CutThenSilence).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case6_no_answer_at_all_socket_kept_open() {
    deadline_fault(Mode::Silence).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case7_a_valid_answer_trickled_slower_than_the_deadline() {
    deadline_fault(Mode::Trickle).await;
}

/// Extra: a leader that accepts connections but never answers ApiVersions. The calls cannot
/// reach the leader at all: UNAVAILABLE at their deadline, naming the connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_a_leader_that_never_answers_the_handshake() {
    let _shared = GATE.read().await;
    // No warm-up call: the leader connection must be opened while the broker is silent (the
    // metadata connection is already open once health is SERVING).
    let s = setup(false).await;
    let deadline = Duration::from_millis(800);
    s.broker.set(Mode::SilentHandshake, false, 1);
    for o in s.calls(CONCURRENT, deadline, 0).await {
        // The cause reads "connecting to … timed out": only the code and the partition are
        // checked.
        assert_failed(
            &o,
            Code::Unavailable,
            &["cannot reach the leader of t-0"],
            deadline,
        );
        assert!(o.1 >= deadline * 3 / 4, "failed early: {:?}", o.1);
    }
    assert!(s.broker.hostile_acts() >= 1);
    assert_eq!(s.stats().connects, 0, "no connection was established");
    s.broker.behave();
    // The slot may still back off from the failed connect; the call retries past that.
    s.assert_one_call_succeeds(1).await;
    assert_eq!(s.stats().connects, 1);
    s.assert_gauges_settle().await;
    s.assert_alive().await;
}

/// A leader that stays hostile until the deadline: the answer is DEADLINE_EXCEEDED naming the
/// leader's fault, never the failure of a retry round that had no time left (a dial cut short
/// by the deadline, or "deadline passed before the request could be written").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistently_hostile_leader_is_reported_with_its_fault() {
    let _shared = GATE.read().await;
    let cases = [
        (Mode::Garbage, "bytes exceeds the limit of"),
        (Mode::GarbageBody, "malformed Produce response"),
        (
            Mode::HugeLength,
            "frame of 2147483647 bytes exceeds the limit",
        ),
        (Mode::NegativeLength, "invalid frame length -1"),
        (Mode::UnknownCorrelation, "correlation id"),
        (Mode::CutThenClose, "the broker closed the connection"),
        (Mode::CutThenSilence, "no answer within the deadline"),
        (Mode::Silence, "no answer within the deadline"),
        (Mode::Trickle, "no answer within the deadline"),
    ];
    let wrong: Vec<String> = join_all(cases.iter().map(|&(mode, cause)| async move {
        let s = setup(true).await;
        let metadata_conns = s.broker.metadata_conns();
        s.broker.set(mode, false, 1);
        let mut wrong = Vec::new();
        // 5 ms apart: a fellow request's timeout poisons the connection shortly before a
        // call's own deadline.
        let gap = Duration::from_millis(5);
        for (r, elapsed) in s.staggered_calls(CONCURRENT, HOSTILE_DEADLINE, gap).await {
            match r {
                Err(st)
                    if st.code() == Code::DeadlineExceeded
                        && st.message().contains("last cause:")
                        && st.message().contains(cause) => {}
                other => wrong.push(format!(
                    "{mode:?} after {elapsed:?}: {:?}",
                    other.map_err(|st| (st.code(), st.message().to_string()))
                )),
            }
        }
        // A call running out of time must not tear down the shared metadata connection (a new
        // one would be dialled by the next refresh, which the next call forces after a failure).
        s.broker.behave();
        s.assert_one_call_succeeds(1).await;
        let redialled = s.broker.metadata_conns() - metadata_conns;
        if redialled > 0 {
            wrong.push(format!(
                "{mode:?}: the metadata connection was torn down and dialled again \
                 {redialled} time(s)"
            ));
        }
        wrong
    }))
    .await
    .into_iter()
    .flatten()
    .collect();
    assert!(
        wrong.is_empty(),
        "{} wrong outcome(s):\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// A call cancelled by its caller before its deadline (the client stops waiting, which drops
/// the handler and its request's `InFlight`) on a leader that went silent: the request's
/// deadline is still applied, the connection is poisoned then, and the next call reconnects
/// instead of queueing behind the dead request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_calls_request_is_still_timed_out() {
    let _shared = GATE.read().await;
    let s = setup(true).await;
    s.broker.set(Mode::Silence, false, 1);
    let deadline = Duration::from_millis(500);
    // The caller gives up after 100 ms, before its 500 ms deadline.
    let mut c = s.client.clone();
    let mut req = tonic::Request::new(request(999, 0));
    req.set_timeout(deadline);
    let gave_up = tokio::time::timeout(Duration::from_millis(100), c.forward(req)).await;
    assert!(gave_up.is_err(), "the caller gave up first: {gave_up:?}");
    // Well after that deadline, the request should have been timed out and its connection
    // poisoned: nobody waits for the answer any more, and a late one could not be trusted.
    tokio::time::sleep(deadline + Duration::from_millis(400)).await;
    let after = s.stats();
    let conns = s.connections().await;
    // The leader behaves again (on new connections): the next call should get through.
    s.broker.behave();
    let (r, elapsed) = s.call(Duration::from_secs(1), 0).await;
    assert!(
        after.in_flight == 0 && after.poisoned >= 1 && r.is_ok(),
        "the cancelled call's request is still in flight on the silent connection long after \
         its deadline: {after:?}, {conns:?}; the next call, to a leader that behaves again on new \
         connections, got {:?} after {elapsed:?}",
        r.map(|_| ()).map_err(|s| s.message().to_string())
    );
}

/// A leader that answers a Produce request without the partition it carried: the connection
/// is out of trust and replaced, the batch is sent again, and since the leader had it, the
/// result says it may be in the log twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_omits_the_partition_is_retried_and_flagged_possibly_duplicated() {
    let _shared = GATE.read().await;
    let s = setup(true).await;
    s.broker.set(Mode::OmitPartition, true, 1);
    let (r, _) = s.call(LONG_DEADLINE, 0).await;
    let resp = r.expect("the retry on a new connection succeeds");
    let p = &resp.partitions[0];
    assert_eq!((p.error_code, p.attempts), (0, 2), "{p:?}");
    assert!(p.possibly_duplicated, "{p:?}");
    assert_eq!(s.broker.hostile_acts(), 1);
    s.assert_alive().await;
}

/// An idempotent batch refused with a retriable error, and the batches of the partition behind
/// it answered OUT_OF_ORDER_SEQUENCE_NUMBER (the broker still waits for the refused one's
/// sequence): those are retried behind it, and every call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_behind_a_refused_batch_is_retried_behind_it() {
    let _shared = GATE.read().await;
    let s = setup(true).await;
    const CALLS: usize = 3;
    s.broker.set(Mode::SequenceGap, true, CALLS);
    let results = join_all((0..CALLS as u64).map(|i| {
        let mut c = s.client.clone();
        async move {
            let mut req = tonic::Request::new(common::request(
                100 + i,
                Acks::All,
                "t",
                0,
                common::records(&format!("gap{i}"), 1),
            ));
            req.set_timeout(LONG_DEADLINE);
            c.forward(req).await
        }
    }))
    .await;
    let mut attempts = Vec::new();
    for r in results {
        let resp = r.expect("every call succeeds").into_inner();
        let p = &resp.partitions[0];
        assert_eq!(p.error_code, 0, "{p:?}");
        assert!(!p.possibly_duplicated, "{p:?}");
        attempts.push(p.attempts);
    }
    attempts.sort_unstable();
    assert_eq!(attempts, vec![2; CALLS], "each call sent twice");
    assert_eq!(s.broker.hostile_acts(), 1);
    s.assert_alive().await;
}

/// Five idempotent batches of t-0 in flight (`raw`: callers' own batches of one producer,
/// sequences 0 to 4; else records leaderlink stamps); the leader refuses the first three times
/// (retriable) and, as a broker does, answers OUT_OF_ORDER for the four behind it. leaderlink
/// must then send them again in sequence order, each once the one before it is appended: sent
/// on their own schedule, they come back OUT_OF_ORDER while the first is being retried.
async fn retries_in_sequence_order(raw: bool) {
    let _shared = GATE.read().await;
    let s = setup(true).await;
    const CALLS: usize = 5;
    const REFUSALS: u32 = 3;
    s.broker.state.refusals.store(REFUSALS, Ordering::SeqCst);
    s.broker.set(Mode::EnforceSequence, true, CALLS);
    let results = join_all((0..CALLS as u64).map(|i| {
        let mut c = s.client.clone();
        async move {
            let mut req = common::request(100 + i, Acks::All, "t", 0, common::records("seq", 1));
            if raw {
                let value = format!("raw{i}");
                req.partitions[0].records.clear();
                req.partitions[0].record_batch = common::raw_batch(&[&value], 77, i as i32);
            }
            let mut req = tonic::Request::new(req);
            req.set_timeout(LONG_DEADLINE);
            c.forward(req).await
        }
    }))
    .await;
    for r in results {
        let resp = r.expect("every call succeeds").into_inner();
        let p = &resp.partitions[0];
        assert_eq!(p.error_code, 0, "{p:?}");
        assert!(!p.possibly_duplicated, "{p:?}");
    }
    assert_eq!(
        s.broker.hostile_acts(),
        1,
        "the first requests were gathered"
    );
    assert_eq!(s.broker.state.refusals.load(Ordering::SeqCst), 0);
    assert_eq!(
        s.broker.state.expected_sequence.load(Ordering::SeqCst),
        CALLS as i32,
        "each batch appended once"
    );
    assert_eq!(
        s.broker.state.strays.load(Ordering::SeqCst),
        0,
        "batches sent while an earlier one was missing"
    );
    s.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_go_in_sequence_order_one_after_another() {
    retries_in_sequence_order(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_idempotent_batches_are_retried_in_sequence_order_too() {
    retries_in_sequence_order(true).await;
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// Every hostile case, over and over: memory, descriptors and sockets stay flat, the counters
/// add up, and the gauges are back to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_hostile_leaders_do_not_grow_memory() {
    // Alone: no other test of this file allocates or opens sockets meanwhile.
    let _alone = GATE.write().await;
    let s = setup(true).await;
    const ITERATIONS: usize = 50;
    const BASELINE_AFTER: usize = 5;
    // Each call carries 256 KiB, so a leak of any per-request buffer (the gRPC message, the
    // encoded batch, the Produce frame or a pending entry holding it) loses >= 256 KiB per call,
    // 4 calls per iteration: >= 45 MiB over the 45 measured iterations. The margin of 20 MiB is
    // far below that and far above what allocator arenas and caches of a test process wander
    // by once warmed up (a few MiB), so it cannot flake and still catches such a leak.
    const VALUE: usize = 256 * 1024;
    const MARGIN_KIB: u64 = 20 * 1024;
    let rotation = [
        Mode::Garbage,
        Mode::GarbageBody,
        Mode::HugeLength,
        Mode::NegativeLength,
        Mode::UnknownCorrelation,
        Mode::CutThenClose,
        Mode::CutThenSilence,
        Mode::Silence,
        Mode::Trickle,
    ];
    let short = Duration::from_millis(250);
    let mut baseline = None;
    for i in 0..ITERATIONS {
        let mode = rotation[i % rotation.len()];
        s.broker.set(mode, true, CONCURRENT);
        if mode.only_the_deadline_tells() {
            // Straight through the Forwarder, all with the same deadline: the calls cannot be
            // cancelled by their caller's timer before leaderlink's own, and none is left with
            // time for a retry, so each iteration poisons at most once (once
            // if a request reached the broker: on a starved machine all four may still be
            // queued at the deadline, and are then withdrawn unsent).
            let deadline = Instant::now() + short;
            let results = join_all((0..CONCURRENT).map(|_| {
                let id = s.next_id.fetch_add(1, Ordering::Relaxed);
                s.server
                    .forwarder
                    .forward(request(id, VALUE), deadline, None, None)
            }))
            .await;
            for r in results {
                match r {
                    Err(ForwardError::DeadlineExceeded { detail })
                        if detail.contains("no answer within the deadline")
                            || detail.contains("not sent") => {}
                    other => panic!("iteration {i}, {mode:?}: {other:?}"),
                }
            }
        } else {
            for (r, _) in s.calls(CONCURRENT, LONG_DEADLINE, VALUE).await {
                let resp = r.unwrap_or_else(|e| panic!("iteration {i}, {mode:?}: {e:?}"));
                assert_eq!(resp.partitions[0].error_code, 0, "{resp:?}");
                assert_eq!(resp.partitions[0].attempts, 2, "{resp:?}");
            }
        }
        if i + 1 == BASELINE_AFTER {
            baseline = Some((rss_kib(), open_fds()));
        }
    }
    let acts = s.broker.hostile_acts();
    assert!(acts >= ITERATIONS as u64 * 9 / 10, "{acts} hostile acts");
    // And one more proper call.
    s.broker.behave();
    s.assert_one_call_succeeds(1).await;

    let c = s.stats();
    // One poison per hostile act, and one new connection per poison.
    assert_eq!(c.poisoned, acts, "{c:?}");
    assert_eq!(c.connects, 1 + acts, "{c:?}");
    s.assert_gauges_settle().await;

    // leaderlink closed every poisoned connection: on the fake's side only the metadata
    // connection and the current leader connection remain.
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        let live = s.broker.state.live.load(Ordering::SeqCst);
        if live <= 2 {
            break;
        }
        assert!(
            Instant::now() < until,
            "{live} connections still open on the broker's side"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (rss0, fds0) = baseline.expect("baseline taken");
    let (rss1, fds1) = (rss_kib(), open_fds());
    eprintln!(
        "RSS after {BASELINE_AFTER} iterations {rss0} KiB, after {ITERATIONS}: {rss1} KiB; \
         open fds {fds0} -> {fds1}"
    );
    assert!(
        rss1 <= rss0 + MARGIN_KIB,
        "RSS grew from {rss0} KiB to {rss1} KiB over {} hostile iterations",
        ITERATIONS - BASELINE_AFTER
    );
    // Both ends of every connection live in this process; a leaked socket shows here.
    assert!(
        fds1 <= fds0 + 4,
        "open file descriptors grew: {fds0} -> {fds1}"
    );
    s.assert_alive().await;
}
