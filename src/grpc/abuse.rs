//! Callers that HTTP/2 finds abusive lose their address for a while
//! (`http2_abuse_penalty_ms`).
//!
//! h2 already closes a connection that abuses it: too many streams reset before they were
//! accepted (rapid reset, CVE-2023-44487), too many stream errors, header lists far over
//! `http2_max_header_list_size`, CONTINUATION floods. It says so with GOAWAY ENHANCE_YOUR_CALM.
//! But the attacker connects again at once and starts over, so a connection closed is only a
//! pause of a few hundred streams, and the server pays for every stream and every handshake.
//!
//! So each caller connection is watched ([`Watch`], inside [`super::conn::CallerIo`]), and its
//! address goes into [`Penalties`] for the penalty when
//! - a frame leaderlink writes to it is a GOAWAY with ENHANCE_YOUR_CALM (h2 judged it);
//! - or leaderlink ended more of its streams with HEADERS than became calls, by more than
//!   [`MAX_REFUSED_STREAMS`]. Every call is counted as it begins, before its trailers (the
//!   HEADERS frame that ends it) are written; a stream ended with HEADERS that never became a call
//!   is h2's 431 answer to a header list over `http2_max_header_list_size`, which h2 sends for as
//!   long as the caller keeps sending them, without ever closing the connection;
//! - or more streams were opened on it than became calls, by more than the streams it may have
//!   open at once (`http2_max_concurrent_streams`) plus [`MAX_UNSERVED_STREAMS`]. This catches
//!   the streams h2 refuses or the caller resets without an answer (malformed headers, a stream
//!   over the concurrency limit, a reset before the stream was accepted). Streams on their way to
//!   becoming calls (read but not yet accepted) never number more than the concurrency limit.
//!
//! Such a connection ends at once (its read side reports the end of the stream). Until the penalty
//! ends, new connections from the address are held as they are accepted, before any HTTP/2 or TLS
//! work: what the caller sends on them is read and thrown away, nothing is answered, and they are
//! closed when the penalty ends. Closing them at once would not do: the attacker connects again
//! in a tight loop, and a connection accepted and closed costs the server more than one held.
//! Connections the address already has are not touched.
//!
//! The frames are followed by hand (their 9-byte headers, and the error code of a GOAWAY)
//! because h2 keeps its frame codec private and neither hyper nor tonic reports why a connection
//! ended or which streams it refused.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tracing::{debug, warn};

use super::idle::Activity;
use crate::stats::GaugeGuard;

/// Streams of a caller connection that h2 may answer 431 (a header list over
/// `http2_max_header_list_size`) before the connection is closed and its address penalized (see
/// the module docs). As many as `http2_max_pending_reset_streams` allows by default: a
/// well-behaved caller has none, and each costs the server the decoding of a header list larger
/// than it accepts.
pub const MAX_REFUSED_STREAMS: u64 = 20;

/// Streams a caller connection may open beyond `http2_max_concurrent_streams` that never become
/// calls and are not answered 431 (see the module docs) before the connection is closed and its
/// address penalized. A well-behaved caller has none (a gRPC client keeps to the concurrency limit
/// leaderlink announces).
pub const MAX_UNSERVED_STREAMS: u64 = 100;

/// Addresses the penalty table holds at most. When it is full, expired entries are dropped, and
/// if it is still full a new abuser is not penalized (its connection is still closed by h2), so
/// that a flood of addresses cannot grow the table without bound.
pub const MAX_PENALIZED: usize = 10_000;

/// Connections from penalized addresses held at once (see the module docs). Beyond it they are
/// closed as they are accepted. Each holds a descriptor and a [`HOLD_BUFFER`] (16 MiB for all).
pub const MAX_HELD: usize = 256;

/// The buffer a held connection's bytes are read into and thrown away.
const HOLD_BUFFER: usize = 64 * 1024;

/// How often a held connection is read (see [`hold`]).
const HOLD_PACE: Duration = Duration::from_millis(100);

/// HTTP/2 error code ENHANCE_YOUR_CALM (RFC 9113 §7).
const ENHANCE_YOUR_CALM: u32 = 0xb;
/// The client connection preface (RFC 9113 §3.4), before a caller's first frame.
const PREFACE_LEN: usize = 24;

static PENALTIES: AtomicU64 = AtomicU64::new(0);
static HELD: AtomicU64 = AtomicU64::new(0);
static CLOSED: AtomicU64 = AtomicU64::new(0);

/// Penalties given so far, in this process (`/metrics`): one per connection closed for abuse
/// (one already penalized address's penalty starts again).
pub fn penalties() -> u64 {
    PENALTIES.load(Ordering::Relaxed)
}

/// Connections from penalized addresses held now, in this process (`/metrics`).
pub fn connections_held() -> u64 {
    HELD.load(Ordering::Relaxed)
}

/// Connections from penalized addresses closed as they were accepted, because [`MAX_HELD`] were
/// held, so far in this process (`/metrics`).
pub fn connections_closed() -> u64 {
    CLOSED.load(Ordering::Relaxed)
}

/// The caller addresses refused new connections, and until when.
#[derive(Debug)]
pub struct Penalties {
    penalty: Duration,
    until: Mutex<HashMap<IpAddr, Instant>>,
    /// [`MAX_HELD`] permits, one per held connection.
    held: Arc<Semaphore>,
}

impl Penalties {
    /// A table whose entries last `penalty`.
    pub fn new(penalty: Duration) -> Arc<Self> {
        Arc::new(Self {
            penalty,
            until: Mutex::new(HashMap::new()),
            held: Arc::new(Semaphore::new(MAX_HELD)),
        })
    }

    /// Until when `peer`'s address is penalized (`None`: it is not; one of unknown address
    /// never is).
    fn penalized(&self, peer: Option<SocketAddr>) -> Option<Instant> {
        let ip = peer?.ip();
        let mut until = self.until.lock().unwrap_or_else(|p| p.into_inner());
        match until.get(&ip) {
            Some(&t) if t > Instant::now() => Some(t),
            Some(_) => {
                until.remove(&ip);
                None
            }
            None => None,
        }
    }

    /// `tcp`, just accepted from `peer`, back if its address is not penalized; else it is held
    /// until the penalty ends (or closed at once when [`MAX_HELD`] are held) and `None`.
    pub fn admit(&self, tcp: TcpStream, peer: Option<SocketAddr>) -> Option<TcpStream> {
        let Some(until) = self.penalized(peer) else {
            return Some(tcp);
        };
        let Ok(slot) = self.held.clone().try_acquire_owned() else {
            debug!(?peer, "closing a connection from a penalized address");
            CLOSED.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        debug!(?peer, "holding a connection from a penalized address");
        tokio::spawn(hold(tcp, until, slot));
        None
    }

    /// `peer`'s connection was closed for `cause`: its address is refused for the penalty.
    fn penalize(&self, peer: SocketAddr, cause: &'static str) {
        let now = Instant::now();
        let mut until = self.until.lock().unwrap_or_else(|p| p.into_inner());
        if until.len() >= MAX_PENALIZED && !until.contains_key(&peer.ip()) {
            until.retain(|_, t| *t > now);
            if until.len() >= MAX_PENALIZED {
                warn!(%peer, cause, max = MAX_PENALIZED, "a caller connection was closed for abuse; the penalty table is full, so its address is not refused");
                return;
            }
        }
        until.insert(peer.ip(), now + self.penalty);
        PENALTIES.fetch_add(1, Ordering::Relaxed);
        warn!(
            %peer,
            cause,
            penalty_ms = self.penalty.as_millis() as u64,
            "a caller connection was closed for abuse; its address is refused new connections for the penalty"
        );
    }
}

/// Reads what `tcp` sends and throws it away until `until` (or until its peer closes it), then
/// closes it. It reads all there is at most once per [`HOLD_PACE`]: an attacker writing small
/// frames one by one would otherwise wake the server for each.
async fn hold(tcp: TcpStream, until: Instant, _slot: OwnedSemaphorePermit) {
    // Counted out however the task ends (also when the runtime drops it).
    let _held = GaugeGuard::enter(&HELD);
    let mut buf = vec![0; HOLD_BUFFER];
    let drain = async {
        loop {
            if tcp.readable().await.is_err() {
                return;
            }
            loop {
                match tcp.try_read(&mut buf) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return,
                }
            }
            tokio::time::sleep(HOLD_PACE).await;
        }
    };
    let _ = tokio::time::timeout_at(until, drain).await;
}

/// What [`FrameScan`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// HEADERS, on this stream, and whether it ends the stream (END_STREAM).
    Headers(u32, bool),
    /// GOAWAY, with its error code.
    GoAway(u32),
}

/// Follows HTTP/2 frame boundaries through the bytes one side of a connection sends.
#[derive(Debug, Default)]
struct FrameScan {
    /// Bytes still to pass before the first frame (the client's preface).
    preface: usize,
    /// The current frame header's bytes seen so far (all 9 once it is in the payload).
    head: [u8; 9],
    head_len: usize,
    /// The current frame's payload bytes still to come.
    left: usize,
    /// The current frame's payload bytes seen.
    seen: usize,
    /// The current GOAWAY's error code, as far as seen (it is at payload bytes 4..8).
    code: [u8; 4],
}

impl FrameScan {
    /// The bytes a server writes: it sends no preface, its first bytes are a frame header.
    fn server() -> Self {
        Self::default()
    }

    /// The bytes a client writes: the preface, then frames.
    fn client() -> Self {
        Self {
            preface: PREFACE_LEN,
            ..Self::default()
        }
    }

    /// Feeds `bytes` (the next ones sent), calling `on` for each HEADERS frame they begin and
    /// each GOAWAY they complete.
    fn feed(&mut self, mut bytes: &[u8], on: &mut impl FnMut(Frame)) {
        let skip = self.preface.min(bytes.len());
        self.preface -= skip;
        bytes = &bytes[skip..];
        while !bytes.is_empty() {
            if self.head_len < self.head.len() {
                let n = (self.head.len() - self.head_len).min(bytes.len());
                self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
                self.head_len += n;
                bytes = &bytes[n..];
                if self.head_len == self.head.len() {
                    let h = self.head;
                    self.left = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                    self.seen = 0;
                    if h[3] == 0x1 {
                        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                        on(Frame::Headers(stream, h[4] & 0x1 != 0));
                    }
                    if self.left == 0 {
                        self.end(on);
                    }
                }
                continue;
            }
            let n = self.left.min(bytes.len());
            if self.head[3] == 0x7 {
                // The part of [4, 8) within [seen, seen + n).
                let from = 4.max(self.seen);
                let to = 8.min(self.seen + n);
                if from < to {
                    self.code[from - 4..to - 4]
                        .copy_from_slice(&bytes[from - self.seen..to - self.seen]);
                }
            }
            self.seen += n;
            self.left -= n;
            bytes = &bytes[n..];
            if self.left == 0 {
                self.end(on);
            }
        }
    }

    /// The current frame is complete: a GOAWAY is reported, and the next header begins.
    fn end(&mut self, on: &mut impl FnMut(Frame)) {
        if self.head[3] == 0x7 && self.seen >= 8 {
            on(Frame::GoAway(u32::from_be_bytes(self.code)));
        }
        self.head_len = 0;
    }
}

/// The abuse watch of one connection (see the module docs): follows the frames read from and
/// written to it, and says when it has become abusive.
pub(super) struct Watch {
    penalties: Arc<Penalties>,
    /// The connection's calls.
    activity: Arc<Activity>,
    /// How many more streams than calls the caller may have opened.
    allowance: u64,
    /// What the caller sends.
    read: FrameScan,
    /// What leaderlink sends.
    written: FrameScan,
    /// Streams the caller opened, and the highest stream id among them.
    opened: u64,
    last_stream: u32,
    /// Streams leaderlink ended with HEADERS (a call's trailers, or h2's 431).
    ended: u64,
}

impl Watch {
    /// The watch of a connection whose calls `activity` counts, on which the caller may have up
    /// to `max_concurrent_streams` open; an abuser's address goes into `penalties`.
    pub(super) fn new(
        penalties: Arc<Penalties>,
        activity: Arc<Activity>,
        max_concurrent_streams: u32,
    ) -> Self {
        Self {
            penalties,
            activity,
            allowance: u64::from(max_concurrent_streams) + MAX_UNSERVED_STREAMS,
            read: FrameScan::client(),
            written: FrameScan::server(),
            opened: 0,
            last_stream: 0,
            ended: 0,
        }
    }

    /// Penalizes `peer` (if known) for `cause`.
    pub(super) fn penalize(&self, peer: Option<SocketAddr>, cause: &'static str) {
        if let Some(peer) = peer {
            self.penalties.penalize(peer, cause);
        }
    }

    /// Follows `read`, bytes the caller just sent; the cause when they made the connection
    /// abusive.
    pub(super) fn read(&mut self, read: &[u8]) -> Option<&'static str> {
        let (opened, last) = (&mut self.opened, &mut self.last_stream);
        self.read.feed(read, &mut |frame| {
            // A HEADERS frame on a stream already open is its trailers.
            if let Frame::Headers(id, _) = frame
                && id > *last
            {
                *last = id;
                *opened += 1;
            }
        });
        (self.opened > self.activity.started() + self.allowance)
            .then_some("more streams opened than became calls")
    }

    /// Follows `written`, bytes leaderlink just wrote; the cause when they made the connection
    /// abusive.
    pub(super) fn written(&mut self, written: &[u8]) -> Option<&'static str> {
        let (mut calm, ended) = (false, &mut self.ended);
        self.written.feed(written, &mut |frame| match frame {
            Frame::GoAway(ENHANCE_YOUR_CALM) => calm = true,
            Frame::Headers(_, true) => *ended += 1,
            _ => {}
        });
        if calm {
            Some("GOAWAY ENHANCE_YOUR_CALM")
        } else if self.ended > self.activity.started() + MAX_REFUSED_STREAMS {
            Some("more streams answered by HTTP/2 alone (431) than allowed")
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame: 9-byte header then payload.
    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, 0, 0, 0, 0, 1]);
        f.extend_from_slice(payload);
        f
    }

    fn scan_in_pieces(mut scan: FrameScan, bytes: &[u8], piece: usize) -> Vec<Frame> {
        let mut seen = Vec::new();
        for chunk in bytes.chunks(piece) {
            scan.feed(chunk, &mut |s| seen.push(s));
        }
        seen
    }

    #[test]
    fn headers_and_goaway_codes_are_found_however_the_writes_split_them() {
        let mut bytes = frame(0x4, &[]); // SETTINGS ack
        bytes.extend(frame(0x1, &[0; 30])); // HEADERS on stream 1
        bytes.extend(frame(0x0, &[7; 40_000])); // DATA
        bytes.extend(frame(0x3, &1u32.to_be_bytes())); // RST_STREAM
        bytes.extend(frame(0x6, &[0; 8])); // PING
        let mut goaway = vec![0, 0, 0, 9];
        goaway.extend_from_slice(&0xbu32.to_be_bytes());
        goaway.extend_from_slice(b"too_many_resets");
        bytes.extend(frame(0x7, &goaway));
        let want = vec![Frame::Headers(1, false), Frame::GoAway(0xb)];
        let mut client = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        client.extend_from_slice(&bytes);
        for piece in [1, 2, 3, 5, 9, 10, 13, 4096, bytes.len()] {
            assert_eq!(
                scan_in_pieces(FrameScan::server(), &bytes, piece),
                want,
                "pieces of {piece}"
            );
            assert_eq!(
                scan_in_pieces(FrameScan::client(), &client, piece),
                want,
                "after the preface, pieces of {piece}"
            );
        }
    }

    #[test]
    fn a_goaway_too_short_for_its_code_reports_nothing() {
        let mut bytes = frame(0x7, &[0, 0, 0, 1, 0]);
        bytes.extend(frame(0x1, &[0; 5]));
        assert_eq!(
            scan_in_pieces(FrameScan::server(), &bytes, 3),
            vec![Frame::Headers(1, false)]
        );
    }

    #[tokio::test]
    async fn a_penalty_refuses_the_address_until_it_ends() {
        tokio::time::pause();
        let p = Penalties::new(Duration::from_secs(10));
        let bad: SocketAddr = "127.0.0.2:5000".parse().unwrap();
        let same_host: SocketAddr = "127.0.0.2:6000".parse().unwrap();
        let other: SocketAddr = "127.0.0.3:5000".parse().unwrap();
        assert!(p.penalized(Some(bad)).is_none());
        p.penalize(bad, "test");
        assert!(
            p.penalized(Some(same_host)).is_some(),
            "the address, whatever the port"
        );
        assert!(p.penalized(Some(other)).is_none());
        assert!(p.penalized(None).is_none());
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(p.penalized(Some(same_host)).is_none(), "the penalty ended");
    }

    #[tokio::test]
    async fn a_full_table_takes_no_new_address_until_entries_expire() {
        tokio::time::pause();
        let p = Penalties::new(Duration::from_secs(10));
        for i in 0..MAX_PENALIZED as u32 {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            p.penalize(SocketAddr::new(ip.into(), 1), "test");
        }
        let late: SocketAddr = "192.168.0.1:1".parse().unwrap();
        p.penalize(late, "test");
        assert!(p.penalized(Some(late)).is_none(), "the table was full");
        tokio::time::advance(Duration::from_secs(11)).await;
        p.penalize(late, "test");
        assert!(
            p.penalized(Some(late)).is_some(),
            "expired entries made room"
        );
    }
}
