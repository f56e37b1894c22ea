//! A scripted fake Kafka broker on 127.0.0.1:0: it answers ApiVersions and Metadata properly
//! (one broker, itself; topic `t`, partition 0 led by node 1), then answers Produce in one
//! scripted way ([`Mode`]): properly, or with one of the faults a hostile or broken leader
//! shows (garbage, a huge length prefix, an unknown correlation id, half an answer, silence, a
//! trickle, a refused sequence).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{
            AtomicBool, AtomicI16, AtomicI32, AtomicI64, AtomicU8, AtomicU32, AtomicU64,
            AtomicUsize, Ordering,
        },
    },
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
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
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    time::Instant,
};

/// Longest the fake waits for `gather` Produce requests before it misbehaves.
pub const GATHER_WAIT: Duration = Duration::from_secs(1);
/// The trickle: one byte of a valid answer every this often (an answer is ~50 bytes: ~3 s, well
/// beyond the deadlines of the calls that meet it).
pub const TRICKLE_EVERY: Duration = Duration::from_millis(60);

/// How the fake broker answers Produce (and, for `SilentHandshake`, ApiVersions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Proper answers.
    Behave,
    /// Bytes that are no Kafka frame at all (an HTTP answer).
    Garbage,
    /// The right correlation id, then a body that is garbage.
    GarbageBody,
    /// A length prefix of 0x7fff_ffff.
    HugeLength,
    /// A negative length prefix.
    NegativeLength,
    /// A valid answer under a correlation id nobody waits for.
    UnknownCorrelation,
    /// Half an answer, then the connection closed (FIN).
    CutThenClose,
    /// Half an answer, then nothing; the socket stays open (half-open).
    CutThenSilence,
    /// The Produce is read, never answered; the socket stays open.
    Silence,
    /// Valid answers, one byte every [`TRICKLE_EVERY`].
    Trickle,
    /// Extra: a new connection's ApiVersions is never answered.
    SilentHandshake,
    /// A well-formed Produce answer that omits the partition asked for.
    OmitPartition,
    /// Of the gathered Produce requests, the first is answered NOT_ENOUGH_REPLICAS (retriable,
    /// Nothing appended) and the others OUT_OF_ORDER_SEQUENCE_NUMBER, as a broker does for the
    /// Batches behind one it refused; then the connection behaves.
    SequenceGap,
    /// Produce as a broker checks an idempotent producer's sequences on `t`-0: the next
    /// Sequence is appended, an earlier one is a duplicate, a later one OUT_OF_ORDER. The batch
    /// With the next sequence is refused NOT_ENOUGH_REPLICAS (retriable, nothing appended) as
    /// Often as `refusals` says. The gathered requests are answered together; OUT_OF_ORDER
    /// Answers after them are counted as `strays` (a batch sent although leaderlink knew an
    /// Earlier one was missing).
    EnforceSequence,
    /// A stopped process (SIGSTOP, a long GC pause): every request on every connection, old or
    /// new, is read and never answered, ApiVersions and Metadata too; sockets stay open.
    Frozen,
    /// The gathered Produce requests are refused with `producer_refusal`: by default
    /// OUT_OF_ORDER_SEQUENCE_NUMBER although nothing of their producer came before them (a
    /// leader that lost the producer's state, or an earlier batch acknowledged after the request
    /// left on another connection), or e.g. INVALID_PRODUCER_EPOCH; then the connection behaves.
    RefuseProducer,
}

impl Mode {
    const ALL: [Mode; 16] = [
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
        Mode::Frozen,
        Mode::RefuseProducer,
    ];

    pub fn from_u8(v: u8) -> Mode {
        Mode::ALL[usize::from(v)]
    }

    /// Faults leaderlink can only notice by its deadline.
    pub fn only_the_deadline_tells(self) -> bool {
        matches!(
            self,
            Mode::CutThenSilence | Mode::Silence | Mode::Trickle | Mode::SilentHandshake
        )
    }
}

pub struct BrokerState {
    pub port: i32,
    pub mode: AtomicU8,
    /// Misbehave once, then behave: the first connection to misbehave switches `mode` back.
    pub once: AtomicBool,
    /// Produce requests to collect on a connection before misbehaving (all calls in flight).
    pub gather: AtomicUsize,
    pub next_offset: AtomicI64,
    pub hostile_acts: AtomicU64,
    pub produce_requests: AtomicU64,
    /// Connections that carried a Metadata request.
    pub metadata_conns: AtomicU64,
    /// Connections open now (on the fake's side).
    pub live: AtomicI64,
    /// [`Mode::EnforceSequence`]: the next sequence of `t`-0, refusals left, and OUT_OF_ORDER
    /// answers after the gathered requests.
    pub expected_sequence: AtomicI32,
    pub refusals: AtomicU32,
    pub strays: AtomicU64,
    /// InitProducerId requests answered; the epoch handed out is their count less one (a bump
    /// is visible as a new epoch).
    pub init_producer_ids: AtomicU64,
    /// [`Mode::RefuseProducer`]'s error code.
    pub producer_refusal: AtomicI16,
}

impl BrokerState {
    pub fn mode(&self) -> Mode {
        Mode::from_u8(self.mode.load(Ordering::SeqCst))
    }

    /// Whether this connection gets to misbehave in `mode` (in once-mode only the first does).
    pub fn claim(&self, mode: Mode) -> bool {
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
pub struct FakeBroker {
    pub addr: SocketAddr,
    pub state: Arc<BrokerState>,
    pub accept: tokio::task::JoinHandle<()>,
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl FakeBroker {
    pub async fn start() -> FakeBroker {
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
            init_producer_ids: AtomicU64::new(0),
            producer_refusal: AtomicI16::new(45),
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
    pub fn set(&self, mode: Mode, once: bool, gather: usize) {
        self.state.gather.store(gather, Ordering::SeqCst);
        self.state.once.store(once, Ordering::SeqCst);
        self.state.mode.store(mode as u8, Ordering::SeqCst);
    }

    pub fn behave(&self) {
        self.set(Mode::Behave, false, 1);
    }

    pub fn metadata_conns(&self) -> u64 {
        self.state.metadata_conns.load(Ordering::SeqCst)
    }

    pub fn produce_requests(&self) -> u64 {
        self.state.produce_requests.load(Ordering::SeqCst)
    }

    pub fn hostile_acts(&self) -> u64 {
        self.state.hostile_acts.load(Ordering::SeqCst)
    }
}

/// Counts a connection as live while its handler runs (also when the handler is dropped).
pub struct Live(Arc<BrokerState>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One request as read off the wire.
pub struct Req {
    pub key: ApiKey,
    pub version: i16,
    pub correlation_id: i32,
    /// The body, after the header.
    pub body: Bytes,
}

/// Reads one request frame; `None` on EOF, an I/O error or a frame that makes no sense.
pub async fn read_request(r: &mut OwnedReadHalf) -> Option<Req> {
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
pub fn frame<R: Encodable>(req: &Req, correlation_id: i32, body: &R) -> Bytes {
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

pub fn api_versions_answer(req: &Req) -> Bytes {
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

pub fn metadata_answer(st: &BrokerState, req: &Req) -> Option<Bytes> {
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
pub fn produce_answer_with(
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
pub fn produce_answer(st: &BrokerState, req: &Req, correlation_id: i32) -> Option<Bytes> {
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
pub fn sequence_answer(st: &BrokerState, req: &Req, after_gather: bool) -> Option<Bytes> {
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
pub fn error_answer(req: &Req, code: i16) -> Option<Bytes> {
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
pub fn proper_answer(st: &BrokerState, req: &Req) -> Option<Bytes> {
    match req.key {
        ApiKey::ApiVersions => Some(api_versions_answer(req)),
        ApiKey::Metadata => metadata_answer(st, req),
        ApiKey::Produce => produce_answer(st, req, req.correlation_id),
        ApiKey::InitProducerId => {
            let epoch = st.init_producer_ids.fetch_add(1, Ordering::SeqCst);
            Some(frame(
                req,
                req.correlation_id,
                &InitProducerIdResponse::default()
                    .with_producer_id(ProducerId(1000))
                    .with_producer_epoch(i16::try_from(epoch).unwrap_or(i16::MAX)),
            ))
        }
        _ => None,
    }
}

/// Reads and drops whatever comes until the peer closes; the write half stays open meanwhile
/// (dropping it would send FIN).
pub async fn hold(mut r: OwnedReadHalf, _w: OwnedWriteHalf) {
    let mut sink = vec![0u8; 64 * 1024];
    while let Ok(n) = r.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

pub async fn serve(st: Arc<BrokerState>, sock: TcpStream) {
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
        if mode == Mode::Frozen && st.claim(mode) {
            return hold(r, w).await;
        }
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
pub async fn answer_then_serve(
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

pub async fn misbehave(
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
        Mode::Behave | Mode::SilentHandshake | Mode::Frozen => {
            unreachable!("not hostile on Produce alone")
        }
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
        Mode::RefuseProducer => {
            let code = st.producer_refusal.load(Ordering::SeqCst);
            let gathered = pending.iter().map(|req| error_answer(req, code));
            return answer_then_serve(st, r, w, gathered, |req| {
                produce_answer(st, req, req.correlation_id)
            })
            .await;
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
