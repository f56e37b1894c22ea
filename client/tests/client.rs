//! The client library against a real leaderlink in front of its embedded mock cluster: merged
//! calls each get their own result, a message's calls for one partition reach leaderlink as one
//! request, a merged request leaderlink refuses as too large is sent again call by call,
//! per-partition order holds, a cancelled call leaves its neighbours alone, deadlines hold, and
//! a leaderlink restart fails the calls in flight UNAVAILABLE while later calls succeed.

mod common;

use std::{net::SocketAddr, time::Duration};

use futures::future::join_all;
use leaderlink::{
    config::Config,
    dev::DevCluster,
    server::{self, Running},
    stats::Outcome,
};
use leaderlink_client::{Acks, Client, Options, Payload, Record};
use tokio::time::Instant;
use tonic::Code;

async fn serve(dev: &DevCluster, addr: SocketAddr) -> Running {
    serve_with(dev, addr, |_| {}).await
}

async fn serve_with(
    dev: &DevCluster,
    addr: SocketAddr,
    tweak: impl FnOnce(&mut Config),
) -> Running {
    let mut cfg = Config {
        bootstrap: dev.bootstrap().split(',').map(str::to_string).collect(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    tweak(&mut cfg);
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    server::start(&cfg, listener, admin).await.unwrap()
}

struct Setup {
    dev: DevCluster,
    server: Running,
    client: Client,
}

async fn setup(topic: &str, partitions: i32, connections: usize) -> Setup {
    setup_with(topic, partitions, connections, |_| {}).await
}

async fn setup_with(
    topic: &str,
    partitions: i32,
    connections: usize,
    tweak: impl FnOnce(&mut Config),
) -> Setup {
    let dev = DevCluster::start(3).unwrap();
    dev.create_topic(topic, partitions).unwrap();
    let server = serve_with(&dev, "127.0.0.1:0".parse().unwrap(), tweak).await;
    let client = Client::connect(
        &[format!("http://{}", server.addr)],
        Options {
            connections,
            ..Options::default()
        },
    )
    .await
    .unwrap();
    Setup {
        dev,
        server,
        client,
    }
}

fn one(value: &str) -> Payload {
    Payload::Records(vec![Record {
        key: Some(value.to_string().into()),
        value: Some(value.to_string().into()),
        ..Default::default()
    }])
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// The values of `topic`-`partition` from offset 0, `n` of them.
fn read_back(bootstrap: &str, topic: &str, partition: i32, n: usize) -> Vec<Vec<u8>> {
    common::read_back(bootstrap, topic, partition, n)
        .into_iter()
        .map(|(_, value)| value)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_calls_each_get_their_own_result() {
    let s = setup("merged", 2, 1).await;
    let calls = (0..64).map(|i| {
        let c = s.client.clone();
        async move {
            let v = format!("m{i}");
            let r = c
                .forward("merged", i % 2, one(&v), Acks::Leader, soon())
                .await
                .unwrap();
            (i, v, r)
        }
    });
    let results = join_all(calls).await;
    for p in 0..2 {
        let back = read_back(s.dev.bootstrap(), "merged", p, 32);
        for (i, v, r) in results.iter().filter(|(i, _, _)| i % 2 == p) {
            assert_eq!((r.error_code, r.partition), (0, p), "call {i}: {r:?}");
            let at = usize::try_from(r.base_offset).unwrap();
            assert_eq!(
                back[at],
                v.as_bytes(),
                "call {i}'s offset holds another record"
            );
        }
    }
    // The 64 calls went out together, and their records shared leader batches.
    let (batches, records) = s.server.forwarder.pool().batches_sent();
    assert_eq!(records, 64);
    assert!(batches < 64, "{batches} leader batches for 64 calls");
}

// One thread: every call is queued before the lane runs, so they share its first message.
#[tokio::test]
async fn calls_for_one_partition_go_to_leaderlink_as_one_request() {
    let s = setup("one-request", 2, 1).await;
    let deadline = soon();
    let calls = (0..64).map(|i| {
        s.client.forward(
            "one-request",
            i % 2,
            one(&format!("r{i}")),
            Acks::Leader,
            deadline,
        )
    });
    let results = join_all(calls).await;
    for (i, r) in results.iter().enumerate() {
        let r = r.as_ref().unwrap();
        assert_eq!((r.error_code, r.attempts), (0, 1), "call {i}: {r:?}");
    }
    // Each partition's offsets 0..32 went to its calls in the order they were made.
    for p in 0..2 {
        let offsets: Vec<i64> = results
            .iter()
            .skip(p)
            .step_by(2)
            .map(|r| r.as_ref().unwrap().base_offset)
            .collect();
        assert_eq!(offsets, (0..32).collect::<Vec<i64>>(), "partition {p}");
    }
    // leaderlink answered two requests, one per partition, not 64.
    let requests = s.server.forwarder.stats().calls(Outcome::Ok);
    assert_eq!(requests, 2, "requests for 64 calls");
}

// One thread: every call is queued before the lane runs, so they share its first message.
#[tokio::test]
async fn a_merged_request_leaderlink_refuses_as_too_large_is_sent_again_call_by_call() {
    // Each call's request fits leaderlink's limit; four of them together do not.
    let s = setup_with("too-large", 1, 1, |cfg| cfg.max_request_bytes = 3000).await;
    let deadline = soon();
    let big = |i: usize| {
        Payload::Records(vec![Record {
            value: Some(vec![b'a' + i as u8; 1000].into()),
            ..Default::default()
        }])
    };
    let results = join_all((0..4).map(|i| {
        s.client
            .forward("too-large", 0, big(i), Acks::Leader, deadline)
    }))
    .await;
    let offsets: Vec<i64> = results
        .into_iter()
        .map(|r| {
            let r = r.unwrap();
            assert_eq!(r.error_code, 0, "{r:?}");
            r.base_offset
        })
        .collect();
    assert_eq!(offsets, vec![0, 1, 2, 3]);
    let back = read_back(s.dev.bootstrap(), "too-large", 0, 4);
    for (i, v) in back.iter().enumerate() {
        assert_eq!(v, &vec![b'a' + i as u8; 1000], "offset {i}");
    }
    // leaderlink refused the merged request, then took the calls one by one.
    let stats = s.server.forwarder.stats();
    assert_eq!(
        (stats.calls(Outcome::Invalid), stats.calls(Outcome::Ok)),
        (1, 4)
    );
    // A call too large on its own gets leaderlink's answer.
    let e = s
        .client
        .forward(
            "too-large",
            0,
            Payload::Records(vec![Record {
                value: Some(vec![b'x'; 4000].into()),
                ..Default::default()
            }]),
            Acks::Leader,
            soon(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("max_request_bytes"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_for_one_partition_keep_the_order_they_were_made_in() {
    let s = setup("order", 1, 4).await;
    // Made in order on one task: offsets follow that order.
    let calls = (0..50).map(|i| {
        s.client
            .forward("order", 0, one(&format!("o{i}")), Acks::Leader, soon())
    });
    let offsets: Vec<i64> = join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap().base_offset)
        .collect();
    assert_eq!(offsets, (0..50).collect::<Vec<i64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_call_does_not_disturb_its_neighbours() {
    let s = setup("cancel", 1, 1).await;
    s.dev
        .set_leader_latency(Duration::from_millis(300))
        .unwrap();
    let call = |v: &'static str| {
        let c = s.client.clone();
        tokio::spawn(async move { c.forward("cancel", 0, one(v), Acks::Leader, soon()).await })
    };
    let a = call("a");
    let b = call("b");
    let c = call("c");
    tokio::time::sleep(Duration::from_millis(50)).await;
    b.abort();
    let a = a.await.unwrap().unwrap();
    let c = c.await.unwrap().unwrap();
    assert!(b.await.unwrap_err().is_cancelled());
    assert_eq!((a.error_code, c.error_code), (0, 0));
    assert_ne!(a.base_offset, c.base_offset);
    s.dev.set_leader_latency(Duration::ZERO).unwrap();
    // The client goes on.
    let d = s
        .client
        .forward("cancel", 0, one("d"), Acks::Leader, soon())
        .await
        .unwrap();
    assert_eq!(d.error_code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calls_deadline_holds() {
    let s = setup("deadline", 1, 1).await;
    s.client
        .forward("deadline", 0, one("warm"), Acks::Leader, soon())
        .await
        .unwrap();
    s.dev
        .set_leader_latency(Duration::from_millis(1000))
        .unwrap();
    let started = Instant::now();
    let e = s
        .client
        .forward(
            "deadline",
            0,
            one("late"),
            Acks::Leader,
            started + Duration::from_millis(200),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    // Answered by its deadline (leaderlink's own answer comes a little before it).
    assert!(
        started.elapsed() < Duration::from_millis(700),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaderlink_restart_fails_calls_in_flight_unavailable_and_later_calls_succeed() {
    let s = setup("restart", 1, 2).await;
    let addr = s.server.addr;
    s.client
        .forward("restart", 0, one("warm"), Acks::Leader, soon())
        .await
        .unwrap();
    s.dev
        .set_leader_latency(Duration::from_millis(2000))
        .unwrap();
    let in_flight: Vec<_> = (0..8)
        .map(|i| {
            let c = s.client.clone();
            tokio::spawn(async move {
                c.forward("restart", 0, one(&format!("f{i}")), Acks::Leader, soon())
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // No grace: the calls still running are cut off.
    s.server.shutdown(Duration::ZERO).await;
    for call in in_flight {
        let e = call.await.unwrap().unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    }
    s.dev.set_leader_latency(Duration::ZERO).unwrap();
    let _server = serve(&s.dev, addr).await;
    // The lanes reconnect: within a few seconds calls succeed again.
    let started = Instant::now();
    loop {
        match s
            .client
            .forward("restart", 0, one("after"), Acks::Leader, soon())
            .await
        {
            Ok(r) => {
                assert_eq!(r.error_code, 0, "{r:?}");
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                assert!(started.elapsed() < Duration::from_secs(10), "{e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
