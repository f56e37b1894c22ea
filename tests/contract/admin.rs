//! The Admin service against the mock cluster, through a generated client.

use crate::common;

use std::time::Duration;

use common::{admin, connections, forward_one, records, request, start, topic, warm_topic};
use leaderlink::proto::v1::{
    Acks, DrainConnectionRequest, GetConfigRequest, GetStatsRequest, ListLeadersRequest,
    RefreshMetadataRequest,
};
use tonic::{Code, Request};

const TOKEN: &str = "let-me-in";

fn with_token<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_calls_describe_leaders_connections_stats_and_config() {
    let h = start(|cfg| cfg.admin_token = Some(TOKEN.into())).await;
    let t = topic("adm");
    h.dev.create_topic(&t, 2).unwrap();
    let mut c = h.client.clone();
    for i in 0..6u64 {
        let r = forward_one(
            &mut c,
            request(i, Acks::All, &t, (i % 2) as i32, records("a", 3)),
        )
        .await
        .unwrap();
        assert_eq!(r.error_code, 0);
    }
    let mut a = admin(&h).await;

    let leaders = a
        .list_leaders(ListLeadersRequest {})
        .await
        .unwrap()
        .into_inner();
    let mine: Vec<_> = leaders.leaders.iter().filter(|l| l.topic == t).collect();
    assert_eq!(mine.len(), 2, "{leaders:?}");
    for l in &mine {
        assert!(l.leader_id >= 1, "{l:?}");
        assert!(l.leader_address.starts_with("127.0.0.1:"), "{l:?}");
        assert!(l.metadata_age_ms >= 0);
    }

    let conns = connections(&mut a).await;
    let open: Vec<_> = conns.iter().filter(|c| c.state == "OPEN").collect();
    assert!(!open.is_empty(), "{conns:?}");
    let sent: u64 = open.iter().map(|c| c.sent).sum();
    let completed: u64 = open.iter().map(|c| c.completed).sum();
    assert!(sent >= 6 && completed >= 6, "{open:?}");
    for c in &open {
        assert!((3..=12).contains(&c.produce_version), "{c:?}");
        assert!(c.latency_p99_ms >= c.latency_p50_ms);
        assert_eq!(c.in_flight, 0);
    }

    let stats = a.get_stats(GetStatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.calls_ok, 6, "{stats:?}");
    assert_eq!(stats.records_forwarded, 18);
    assert!(stats.bytes_forwarded > 18);
    assert!(stats.metadata_refreshes >= 1);
    assert_eq!(stats.sheds, 0);

    let cfg = a
        .get_config(GetConfigRequest {})
        .await
        .unwrap()
        .into_inner()
        .toml;
    assert!(cfg.contains("admin_token = \"<redacted>\""), "{cfg}");
    assert!(!cfg.contains(TOKEN));
    let parsed: leaderlink::config::Config = toml::from_str(&cfg).unwrap();
    assert_eq!(parsed.max_in_flight, 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_calls_need_the_token() {
    let h = start(|cfg| cfg.admin_token = Some(TOKEN.into())).await;
    let mut a = admin(&h).await;
    let e = a
        .refresh_metadata(RefreshMetadataRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = a
        .refresh_metadata(with_token(RefreshMetadataRequest {}, "guess"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = a
        .drain_connection(DrainConnectionRequest { broker_id: 1 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    let before = a.get_stats(GetStatsRequest {}).await.unwrap().into_inner();
    let r = a
        .refresh_metadata(with_token(RefreshMetadataRequest {}, TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert!(r.metadata_age_ms >= 0 && r.metadata_age_ms < 5_000, "{r:?}");
    let after = a.get_stats(GetStatsRequest {}).await.unwrap().into_inner();
    assert!(after.metadata_refreshes > before.metadata_refreshes);
    let e = a
        .drain_connection(with_token(DrainConnectionRequest { broker_id: 99 }, TOKEN))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_connection_lets_in_flight_requests_finish_and_reconnects() {
    // Merging off: each call's record is a request of its own, so 20 are in flight.
    let h = start(|c| c.max_batch_bytes = 0).await;
    let (t, warm) = warm_topic(&h, "drain", 1).await;
    let mut c = h.client.clone();
    let leader = warm.leader_id;
    h.dev
        .set_leader_latency(Duration::from_millis(400))
        .unwrap();
    let mut a = admin(&h).await;

    let calls: Vec<_> = (1..=20u64)
        .map(|i| {
            let mut c = h.client.clone();
            let t = t.clone();
            tokio::spawn(async move {
                forward_one(&mut c, request(i, Acks::Leader, &t, 0, records("d", 1))).await
            })
        })
        .collect();
    // Wait until the requests are on the wire, then drain their connection.
    let mut seen_in_flight = 0;
    for _ in 0..100 {
        let conns = connections(&mut a).await;
        seen_in_flight = conns
            .iter()
            .filter(|c| c.broker_id == leader)
            .map(|c| c.in_flight)
            .sum();
        if seen_in_flight >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen_in_flight, 20, "the 20 calls were in flight together");
    let d = a
        .drain_connection(DrainConnectionRequest { broker_id: leader })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.drained, 1);
    assert_eq!(d.in_flight, 20);
    let draining = connections(&mut a).await;
    assert!(
        draining
            .iter()
            .any(|c| c.broker_id == leader && c.state == "DRAINING"),
        "{draining:?}"
    );
    for call in calls {
        let r = call.await.unwrap().unwrap();
        assert_eq!(
            (r.error_code, r.attempts),
            (0, 1),
            "in-flight requests finish: {r:?}"
        );
    }
    h.dev.set_leader_latency(Duration::ZERO).unwrap();
    let r = forward_one(&mut c, request(99, Acks::Leader, &t, 0, records("n", 1)))
        .await
        .unwrap();
    assert_eq!(r.error_code, 0);
    let conns = connections(&mut a).await;
    let slot = conns
        .iter()
        .find(|c| c.broker_id == leader && c.state == "OPEN")
        .expect("a new connection");
    assert_eq!(slot.connects, 2, "reconnected on next use: {slot:?}");
    assert_eq!(slot.poisoned, 0, "a drain is not a failure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_idle_for_metadata_max_idle_ms_leaves_the_leader_map_until_used_again() {
    let h = start(|cfg| {
        cfg.admin_token = Some(TOKEN.into());
        cfg.metadata_max_idle_ms = 1_000;
    })
    .await;
    let (idle, busy) = (topic("idle"), topic("busy"));
    for t in [&idle, &busy] {
        h.dev.create_topic(t, 1).unwrap();
    }
    let mut c = h.client.clone();
    let mut a = admin(&h).await;
    let mut id = 0u64;
    let mut send = async |c: &mut _, t: &str| {
        id += 1;
        let r = forward_one(c, request(id, Acks::All, t, 0, records("a", 1)))
            .await
            .unwrap();
        assert_eq!(r.error_code, 0, "{r:?}");
    };
    let mapped = async |a: &mut leaderlink::proto::v1::admin_client::AdminClient<_>| {
        let leaders = a
            .list_leaders(ListLeadersRequest {})
            .await
            .unwrap()
            .into_inner()
            .leaders;
        let has = |t: &str| leaders.iter().any(|l| l.topic == t);
        (has(&idle), has(&busy))
    };
    send(&mut c, &idle).await;
    send(&mut c, &busy).await;
    assert_eq!(mapped(&mut a).await, (true, true));
    // Only `busy` is used from now on. Each refresh asks for the topics in use; `idle` must
    // leave the map within a few refreshes after its second of idleness.
    let mut rounds = 0;
    loop {
        send(&mut c, &busy).await;
        a.refresh_metadata(with_token(RefreshMetadataRequest {}, TOKEN))
            .await
            .unwrap();
        match mapped(&mut a).await {
            (false, true) => break,
            (true, true) => {}
            other => panic!("the busy topic left the map: {other:?}"),
        }
        rounds += 1;
        assert!(rounds < 100, "the idle topic never left the leader map");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Used again, it is learnt again like a new topic.
    send(&mut c, &idle).await;
    assert_eq!(mapped(&mut a).await, (true, true));
}
