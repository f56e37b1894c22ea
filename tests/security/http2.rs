//! Hostile HTTP/2 callers, with a raw h2 client: each protection of the caller listener is a
//! config key (README "Protection against overload"), and each test shows that key at work
//! while a well-behaved caller alongside is still served.

use std::time::Duration;

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

/// A raw HTTP/2 client connection to leaderlink; its connection task's outcome comes back on the
/// handle.
async fn raw_h2(
    h: &Harness,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(h.server.addr).await.unwrap();
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
    let (mut send, conn) = raw_h2(&h).await;
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
    assert!(
        opened < 100_000,
        "the server stopped the loop: {opened} streams"
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
