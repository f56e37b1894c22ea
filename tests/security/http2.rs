//! Hostile HTTP/2 callers, with a raw h2 client: each protection of the caller listener is a
//! config key (README "Protection against overload"), and each test shows that key at work
//! while a well-behaved caller alongside is still served.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use bytes::Bytes;
use http::Request;
use leaderlink::proto::v1::Acks;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::common::{self, Harness};

/// A well-behaved caller's Forward succeeds.
async fn assert_served(h: &Harness, topic: &str) {
    let mut c = h.client.clone();
    let req = common::request(1, Acks::Leader, topic, 0, common::records("polite", 1));
    let resp = c
        .forward(req)
        .await
        .expect("a well-behaved caller is served")
        .into_inner();
    assert_eq!(resp.partitions[0].error_code, 0, "{resp:?}");
}

/// The attackers' source address: another host than the well-behaved caller's 127.0.0.1, since
/// leaderlink penalizes the address of a connection it closed for abuse
/// (`http2_abuse_penalty_ms`).
const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A TCP connection to leaderlink from `from`.
async fn tcp_from(h: &Harness, from: IpAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(h.server.addr).await.unwrap()
}

/// A raw HTTP/2 client connection to leaderlink from [`ATTACKER`]; its connection task's outcome
/// comes back on the handle.
async fn raw_h2(
    h: &Harness,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = tcp_from(h, ATTACKER).await;
    let (send, conn) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    (send, tokio::spawn(conn))
}

fn forward_headers() -> Request<()> {
    Request::post("http://leaderlink/leaderlink.v1.Forwarder/Forward")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// Rapid reset (CVE-2023-44487): a caller that opens streams and resets them at once, in a
/// tight loop, gets its connection closed with GOAWAY (ENHANCE_YOUR_CALM) once more than
/// `http2_max_pending_reset_streams` of its resets are pending; the server serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_costs_the_attacker_its_connection() {
    let h = common::start(|cfg| cfg.http2_max_pending_reset_streams = 20).await;
    let (topic, _) = common::warm_topic(&h, "h2-reset", 1).await;
    let opened = rapid_reset_until_closed(&h).await;
    assert!(
        opened < 100_000,
        "the server stopped the loop: {opened} streams"
    );
    assert_served(&h, &topic).await;
}

/// Opens and resets streams from [`ATTACKER`] in a tight loop until the server closes the
/// connection, which it must do with GOAWAY (ENHANCE_YOUR_CALM) within 10 s; the streams opened.
async fn rapid_reset_until_closed(h: &Harness) -> usize {
    let (mut send, conn) = raw_h2(h).await;
    let mut opened = 0;
    for _ in 0..100_000 {
        let Ok(ready) = send.ready().await else { break };
        send = ready;
        let Ok((_, mut stream)) = send.send_request(forward_headers(), false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        opened += 1;
    }
    let closed = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the attacker's connection is closed")
        .unwrap();
    let e = closed.expect_err("closed by the server, with an error");
    // The server sends GOAWAY (ENHANCE_YOUR_CALM) and closes. The client learns it from the
    // GOAWAY, or, when its next write reaches the closed socket first, from that write's error.
    let io = e.get_io().map(std::io::Error::kind);
    assert!(
        (e.is_go_away() && e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM))
            || matches!(
                io,
                Some(std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset)
            ),
        "{e:?}"
    );
    opened
}

/// Whether leaderlink answers a new connection from `from` within `within`: its first bytes
/// (its SETTINGS frame) arrive, as they do at once on a connection it serves.
async fn answers_connection_from(h: &Harness, from: IpAddr, within: Duration) -> bool {
    let mut tcp = tcp_from(h, from).await;
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut first = [0u8; 9];
    matches!(
        tokio::time::timeout(within, tcp.read(&mut first)).await,
        Ok(Ok(n)) if n > 0
    )
}

/// A process-wide value of leaderlink's `/metrics` (summed over label sets; 0 when absent).
async fn caller_metric(h: &Harness, name: &'static str) -> f64 {
    let addr = h.server.metrics_addr.to_string();
    let (status, _, body) =
        tokio::task::spawn_blocking(move || common::http_get(&addr, "/metrics"))
            .await
            .unwrap()
            .expect("an HTTP response");
    assert_eq!(status, 200);
    body.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .sum()
}

/// After a connection closed for rapid reset, the attacker's address gets no answer on new
/// connections for `http2_abuse_penalty_ms` (they are held, unanswered), while other addresses
/// are served; after the penalty it is answered again. `/metrics` counts the penalty and shows
/// a held connection. With the penalty at 0 it is answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_resetters_address_is_held_off_for_the_penalty() {
    const PENALTY: Duration = Duration::from_secs(3);
    let h = common::start(|cfg| cfg.http2_abuse_penalty_ms = PENALTY.as_millis() as u64).await;
    let (topic, _) = common::warm_topic(&h, "h2-penalty", 1).await;
    let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
    assert!(answers_connection_from(&h, ATTACKER, Duration::from_secs(5)).await);
    let before = caller_metric(&h, "leaderlink_caller_penalties_total").await;
    rapid_reset_until_closed(&h).await;
    let penalized = tokio::time::Instant::now();
    assert!(
        caller_metric(&h, "leaderlink_caller_penalties_total").await > before,
        "the penalty is counted"
    );
    // A connection from the address, held open: /metrics shows it held.
    let held = tcp_from(&h, ATTACKER).await;
    let shown = tokio::time::timeout(Duration::from_secs(2), async {
        while caller_metric(&h, "leaderlink_caller_connections_held").await < 1.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(shown.is_ok(), "the held connection is shown");
    drop(held);
    assert!(
        !answers_connection_from(&h, ATTACKER, Duration::from_secs(1)).await,
        "a penalized address was answered"
    );
    assert!(
        answers_connection_from(&h, other, Duration::from_secs(5)).await,
        "another address was not answered"
    );
    assert_served(&h, &topic).await;
    tokio::time::sleep(PENALTY.saturating_sub(penalized.elapsed()) + Duration::from_millis(200))
        .await;
    assert!(
        answers_connection_from(&h, ATTACKER, Duration::from_secs(5)).await,
        "the address was still refused after its penalty"
    );
    h.server.shutdown(Duration::from_secs(5)).await;

    let h = common::start(|cfg| cfg.http2_abuse_penalty_ms = 0).await;
    rapid_reset_until_closed(&h).await;
    assert!(
        answers_connection_from(&h, ATTACKER, Duration::from_secs(5)).await,
        "with the penalty off, the address is answered at once"
    );
}

/// h2 answers a header list between one and four times `http2_max_header_list_size` with 431,
/// and would do so for ever on one connection. Such streams never become calls: leaderlink
/// closes the connection once more than `MAX_REFUSED_STREAMS` (20) streams were answered
/// without becoming calls, and penalizes its address; a well-behaved caller is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_keeps_sending_oversized_headers_loses_its_connection() {
    let h = common::start(|_| {}).await;
    let (topic, _) = common::warm_topic(&h, "h2-oversized", 1).await;
    let (mut send, conn) = raw_h2(&h).await;
    let mut refused = 0;
    for _ in 0..10_000 {
        let Ok(ready) = send.ready().await else { break };
        send = ready;
        let mut req = forward_headers();
        req.headers_mut()
            .insert("x-padding", "p".repeat(20 * 1024).parse().unwrap());
        let Ok((answer, _)) = send.send_request(req, true) else {
            break;
        };
        match answer.await {
            Ok(a) => {
                assert_eq!(a.status(), 431, "a 20 KiB header list is refused");
                refused += 1;
            }
            Err(e) if e.is_reset() => refused += 1,
            Err(_) => break,
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .unwrap_or_else(|_| panic!("the connection is closed (after {refused} refusals)"));
    assert!(ended.is_ok(), "{ended:?}");
    let allowed = leaderlink::grpc::abuse::MAX_REFUSED_STREAMS as usize;
    assert!(
        (allowed..=allowed + 1).contains(&refused),
        "closed after {refused} refusals"
    );
    assert!(
        !answers_connection_from(&h, ATTACKER, Duration::from_secs(1)).await,
        "the address is penalized"
    );
    assert_served(&h, &topic).await;
}

/// A request whose header list is larger than `http2_max_header_list_size` is refused before a
/// call starts; one under it is served, and so is a well-behaved caller after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_header_list_is_refused() {
    let h = common::start(|cfg| cfg.http2_max_header_list_size = 4096).await;
    let (topic, _) = common::warm_topic(&h, "h2-headers", 1).await;
    let call = |size: usize| {
        let mut c = h.client.clone();
        let topic = topic.clone();
        async move {
            let mut req = tonic::Request::new(common::request(
                2,
                Acks::Leader,
                &topic,
                0,
                common::records("headers", 1),
            ));
            req.metadata_mut()
                .insert("x-padding", "a".repeat(size).parse().unwrap());
            c.forward(req).await
        }
    };
    let small = call(2048)
        .await
        .expect("a 2 KiB header is within the limit");
    assert_eq!(small.into_inner().partitions[0].error_code, 0);
    let big = call(8192).await;
    assert!(big.is_err(), "an 8 KiB header is over the limit: {big:?}");
    assert_served(&h, &topic).await;
}

/// A caller that stops answering PINGs (a host that vanished; here a raw socket that sent the
/// HTTP/2 preface and reads nothing after) has its connection closed after
/// `http2_keepalive_interval_ms` plus `http2_keepalive_timeout_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_stops_answering_pings_is_closed() {
    let h = common::start(|cfg| {
        cfg.http2_keepalive_interval_ms = 200;
        cfg.http2_keepalive_timeout_ms = 200;
    })
    .await;
    let mut tcp = TcpStream::connect(h.server.addr).await.unwrap();
    // The client preface and an empty SETTINGS frame; never a SETTINGS or PING ACK.
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut sink = vec![0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tcp.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the silent connection is still open after 5 s"
    );
}

/// Idle connections do not live for ever: `max_connection_age_ms` sends each GOAWAY, and after
/// `max_connection_age_grace_ms` it is closed. 200 idle HTTP/2 connections are all gone 2.5 s
/// later, with the descriptors they took; a well-behaved caller is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_at_their_maximum_age() {
    let h = common::start(|cfg| {
        cfg.max_connection_age_ms = 1000;
        cfg.max_connection_age_grace_ms = 500;
    })
    .await;
    let (topic, _) = common::warm_topic(&h, "h2-idle", 1).await;
    let fds = || std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    let before = fds();
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(raw_h2(&h).await);
    }
    assert!(fds() >= before + 200, "the idle connections are open");
    assert_served(&h, &topic).await;
    for (_send, conn) in idle {
        let ended = tokio::time::timeout(Duration::from_millis(2500), conn).await;
        assert!(ended.is_ok(), "an idle connection outlived its maximum age");
    }
    // Both ends of every idle connection are closed (a few descriptors of the well-behaved
    // caller's new connection may remain).
    assert!(
        fds() <= before + 8,
        "descriptors: {before} before, {} after",
        fds()
    );
    assert_served(&h, &topic).await;
}

fn forward_stream_headers() -> Request<()> {
    Request::post("http://leaderlink/leaderlink.v1.Forwarder/ForwardStream")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// Opens a ForwardStream on `send` (once it has a stream slot): the connection's handle back,
/// the answers, and the stream to send requests on.
async fn open_forward_stream(
    send: h2::client::SendRequest<Bytes>,
) -> (
    h2::client::SendRequest<Bytes>,
    h2::client::ResponseFuture,
    h2::SendStream<Bytes>,
) {
    let mut send = send.ready().await.expect("a stream slot");
    let (answers, requests) = send
        .send_request(forward_stream_headers(), false)
        .expect("the stream opens");
    (send, answers, requests)
}

/// Sends request `id` (one record tagged `tag`, for `topic` partition 0) on a stream; `false`
/// once the connection is gone.
fn send_request(requests: &mut h2::SendStream<Bytes>, topic: &str, id: u64, tag: &str) -> bool {
    let req = common::request(id, Acks::Leader, topic, 0, common::records(tag, 1));
    requests.send_data(grpc_message(&req), false).is_ok()
}

/// One gRPC message (uncompressed): flag, length, the encoded request.
fn grpc_message(req: &leaderlink::proto::v1::ForwardRequest) -> Bytes {
    use prost::Message;
    let body = req.encode_to_vec();
    let mut m = Vec::with_capacity(5 + body.len());
    m.push(0);
    m.extend_from_slice(&(body.len() as u32).to_be_bytes());
    m.extend_from_slice(&body);
    Bytes::from(m)
}

/// Records forwarded so far by `h`'s leaderlink.
fn forwarded(h: &Harness) -> u64 {
    h.server
        .forwarder
        .stats()
        .records_forwarded
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// Waits until `h` has forwarded no further record for 500 ms (at most 20 s); the count then.
async fn forwarded_when_settled(h: &Harness) -> u64 {
    let mut last = forwarded(h);
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = forwarded(h);
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("still forwarding after 20 s: {last}");
}

/// A ForwardStream whose caller sends and sends but never reads an answer: the answers it leaves
/// unread fill its HTTP/2 stream window and the server's send buffer, then the stream's
/// `max_stream_in_flight` requests wait to hand theirs over, and no further request is read.
/// leaderlink stops forwarding for it after a bounded number of requests (not every one it was
/// sent), serves a well-behaved caller meanwhile, and lets go of it when the caller goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_stream_that_never_reads_its_answers_is_held_back() {
    let h = common::start(|cfg| cfg.max_stream_in_flight = 16).await;
    let (topic, _) = common::warm_topic(&h, "h2-unread", 1).await;
    let (send, conn) = raw_h2(&h).await;
    // `_answers` is never polled: nothing of the answers is read or released.
    let (send, _answers, mut requests) = open_forward_stream(send).await;
    const SENT: u64 = 20_000;
    let before = forwarded(&h);
    for i in 0..SENT {
        // h2 keeps what the server's window does not take yet on the attacker's side; an error
        // means the server closed the connection.
        if !send_request(&mut requests, &topic, i, "unread") {
            break;
        }
    }
    let held_back = forwarded_when_settled(&h).await - before;
    eprintln!("forwarded for the caller that reads no answer: {held_back} of {SENT}");
    // Either the requests wait: each answer is about 60 bytes, and the 64 KiB window, hyper's
    // 400 KiB send buffer per stream, the stream's answer channel and its 16 requests in flight
    // hold well under 10,000 of them. Or the server closes the connection first: h2 refuses to
    // buffer unread small DATA frames beyond a budget (GOAWAY ENHANCE_YOUR_CALM,
    // "too_many_data_frames"), which is what happens with these one-record requests.
    assert!(
        held_back < SENT / 2,
        "{held_back} of {SENT} requests forwarded for a caller that reads no answer"
    );
    assert_served(&h, &topic).await;
    // The attacker goes: its stream's tasks end, and nothing more is forwarded for it.
    drop((requests, send));
    conn.abort();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = forwarded_when_settled(&h).await;
    assert_served(&h, &topic).await;
    assert_eq!(
        forwarded(&h),
        after + 1,
        "only the well-behaved caller's record after the attacker left"
    );
}

/// ForwardStreams that are opened and never closed (each sent one request, got its answer, and
/// stays open) hold no call slot: with `max_concurrent_calls` 4 and 50 such streams, a
/// well-behaved caller is served. They do not live for ever either: `max_connection_age_ms` plus
/// its grace closes their connection although none of them ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_streams_that_never_close_hold_no_call_slot() {
    let h = common::start(|cfg| {
        cfg.max_concurrent_calls = 4;
        cfg.max_connection_age_ms = 1000;
        cfg.max_connection_age_grace_ms = 500;
    })
    .await;
    let (topic, _) = common::warm_topic(&h, "h2-open", 1).await;
    let (mut send, conn) = raw_h2(&h).await;
    let opened_at = tokio::time::Instant::now();
    let mut open = Vec::new();
    for i in 0..50 {
        let (ready, answer, mut requests) = open_forward_stream(send).await;
        send = ready;
        assert!(
            send_request(&mut requests, &topic, i, "open"),
            "the request is sent"
        );
        // Its answer arrives; the stream stays open (no end of stream from the caller).
        let mut body = answer.await.expect("answer headers").into_body();
        let first = body.data().await.expect("an answer").expect("answer data");
        assert!(first.len() > 5, "a gRPC message: {first:?}");
        open.push((requests, body));
    }
    assert_eq!(
        h.server
            .forwarder
            .stats()
            .calls_in_progress
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    for _ in 0..4 {
        assert_served(&h, &topic).await;
    }
    let ended = tokio::time::timeout_at(opened_at + Duration::from_millis(2500), conn).await;
    assert!(
        ended.is_ok(),
        "the connection of streams that never closed outlived its maximum age and grace"
    );
    assert_served(&h, &topic).await;
}

/// `idle_connection_timeout_ms`: a connection with no call in progress for that long is closed
/// (here 300 ms, and at least `QUIET` = 1 s after anything was read from it); one with a
/// ForwardStream open is not, however long the stream stays quiet, and is closed once the
/// stream ends. A well-behaved caller is served before and after (its client reconnects).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_call_are_closed_after_the_idle_timeout() {
    let h = common::start(|cfg| cfg.idle_connection_timeout_ms = 300).await;
    let (topic, _) = common::warm_topic(&h, "h2-idle-timeout", 1).await;
    let fds = || std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    let before = fds();
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(raw_h2(&h).await);
    }
    // A connection with a stream open: one request, answered, then nothing for 2.5 s.
    let (send, busy) = raw_h2(&h).await;
    let (_send, answer, mut requests) = open_forward_stream(send).await;
    assert!(
        send_request(&mut requests, &topic, 1, "busy"),
        "the request is sent"
    );
    let mut body = answer.await.expect("answer headers").into_body();
    body.data().await.expect("an answer").expect("answer data");
    let opened = tokio::time::Instant::now();
    for (_send, conn) in idle {
        let ended = tokio::time::timeout_at(opened + Duration::from_secs(3), conn).await;
        assert!(
            ended.is_ok(),
            "an idle connection outlived its idle timeout"
        );
    }
    assert!(
        fds() <= before + 8,
        "descriptors: {before} before, {} after",
        fds()
    );
    tokio::time::sleep_until(opened + Duration::from_millis(2500)).await;
    assert!(
        !busy.is_finished(),
        "a connection with a stream open was closed as idle"
    );
    // The stream ends: the connection has no call now, and goes.
    requests
        .send_data(Bytes::new(), true)
        .expect("the stream ends");
    while body.data().await.is_some() {}
    let ended = tokio::time::timeout(Duration::from_secs(3), busy).await;
    assert!(
        ended.is_ok(),
        "the connection outlived its idle timeout after its stream ended"
    );
    assert_served(&h, &topic).await;
}

/// A ForwardStream whose caller goes away (its connection dropped) while its requests wait on a
/// slow leader: the requests are dropped at once, as unary calls whose caller went are, and give
/// back their slots of `max_concurrent_calls` (a caller that reconnects and goes again and again
/// cannot pile up calls nobody will read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_streams_requests_give_back_their_call_slots() {
    let h = common::start(|_| {}).await;
    let (topic, _) = common::warm_topic(&h, "h2-gone", 1).await;
    h.dev.set_leader_latency(Duration::from_secs(5)).unwrap();
    let in_progress = || {
        h.server
            .forwarder
            .stats()
            .calls_in_progress
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let (send, conn) = raw_h2(&h).await;
    let (send, _answers, mut requests) = open_forward_stream(send).await;
    for i in 0..50 {
        assert!(
            send_request(&mut requests, &topic, i, "gone"),
            "the request is sent"
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while in_progress() < 50 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream's requests are running: {}",
            in_progress()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The caller goes; the leader would answer only 5 s after the requests were sent.
    drop((requests, send));
    conn.abort();
    let gone = tokio::time::Instant::now();
    while in_progress() > 0 {
        assert!(
            gone.elapsed() < Duration::from_secs(2),
            "{} calls of a gone stream still hold their slots",
            in_progress()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.dev.set_leader_latency(Duration::ZERO).unwrap();
    assert_served(&h, &topic).await;
}

/// The stream window leaderlink grants (`http2_initial_stream_window_bytes`) is all a caller may
/// send on a stream before leaderlink reads it: asked for 1 MiB, a new stream gets exactly the
/// window, at its default and when configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_may_send_only_its_window_before_leaderlink_reads() {
    for (window, tweak) in [(64 * 1024, None), (20_000, Some(20_000))] {
        let h = common::start(|cfg| {
            if let Some(w) = tweak {
                cfg.http2_initial_stream_window_bytes = w;
            }
        })
        .await;
        let (send, conn) = raw_h2(&h).await;
        // A first call answered: leaderlink's SETTINGS (its first frame) are in effect.
        let mut send = send.ready().await.unwrap();
        let (answer, _) = send
            .send_request(forward_stream_headers(), true)
            .expect("the stream opens");
        answer.await.expect("an answer");
        let (_send, _answers, mut requests) = open_forward_stream(send).await;
        requests.reserve_capacity(1024 * 1024);
        let granted = tokio::time::timeout(
            Duration::from_secs(5),
            std::future::poll_fn(|cx| requests.poll_capacity(cx)),
        )
        .await
        .expect("capacity within 5 s")
        .expect("the stream is open")
        .unwrap();
        assert_eq!(granted, window, "configured: {tweak:?}");
        conn.abort();
        h.server.shutdown(Duration::from_secs(5)).await;
    }
}
