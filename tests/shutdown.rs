//! Graceful drain of the real binary: SIGTERM with calls in flight.

mod common;

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{free_port, records, request};
use leaderlink::proto::v1::{
    Acks, GetStatsRequest, admin_client::AdminClient, forwarder_client::ForwarderClient,
};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

struct Server {
    child: Child,
    addr: String,
    admin: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn spawn(extra: &[&str]) -> Server {
    let (p, q) = (free_port(), free_port());
    let addr = format!("127.0.0.1:{p}");
    let admin = format!("127.0.0.1:{q}");
    let child = Command::new(env!("CARGO_BIN_EXE_leaderlink"))
        .args([
            "serve",
            "--listen",
            &addr,
            "--admin-listen",
            &admin,
            "--metrics-listen",
            "127.0.0.1:0",
            "--dev-topics",
            "d:1",
        ])
        .args(extra)
        // A dev leader slowed with --dev-leader-latency-ms answers ApiVersions that late too;
        // the bound for a silent broker (handshake_timeout_ms, 2 s) must not cut it off.
        .env("LEADERLINK_HANDSHAKE_TIMEOUT_MS", "10000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("http://{addr}");
    // Up to 30 s: with a slow dev leader, ApiVersions and Metadata take several round trips.
    for _ in 0..600 {
        if let Ok(ch) = tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            && let Ok(r) = HealthClient::new(ch)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
            && r.into_inner().status == 1
        {
            return Server { child, addr, admin };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut s = Server { child, addr, admin };
    s.child.kill().ok();
    panic!("leaderlink did not become SERVING");
}

/// Starts `n` calls and waits until the server reports them in progress.
async fn calls_in_flight(
    s: &Server,
    n: u64,
) -> Vec<
    tokio::task::JoinHandle<
        Result<tonic::Response<leaderlink::proto::v1::ForwardResponse>, tonic::Status>,
    >,
> {
    let client = ForwarderClient::connect(format!("http://{}", s.addr))
        .await
        .unwrap();
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move {
                let mut r = tonic::Request::new(request(i, Acks::Leader, "d", 0, records("x", 1)));
                r.set_timeout(Duration::from_secs(30));
                c.forward(r).await
            })
        })
        .collect();
    let mut admin = AdminClient::connect(format!("http://{}", s.admin))
        .await
        .unwrap();
    for _ in 0..200 {
        let st = admin
            .get_stats(GetStatsRequest {})
            .await
            .unwrap()
            .into_inner();
        if st.calls_in_progress == n {
            return calls;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("calls never got in flight");
}

fn sigterm(s: &Server) {
    let ok = Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

fn wait_exit(s: &mut Server) -> (Option<i32>, String) {
    for _ in 0..300 {
        if let Some(status) = s.child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            s.child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code(), err);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("leaderlink did not exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_calls_finish_refuses_new_ones_and_exits_0() {
    let mut s = spawn(&[
        "--dev-leader-latency-ms",
        "1500",
        "--shutdown-grace-ms",
        "20000",
    ])
    .await;
    let calls = calls_in_flight(&s, 10).await;
    sigterm(&s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A new call is refused: the listener is closed (or the connection goes away).
    let refused = match ForwarderClient::connect(format!("http://{}", s.addr)).await {
        Err(_) => true,
        Ok(mut c) => {
            let mut r = tonic::Request::new(request(99, Acks::Leader, "d", 0, records("n", 1)));
            r.set_timeout(Duration::from_secs(5));
            c.forward(r).await.is_err()
        }
    };
    assert!(refused, "a call after SIGTERM must not be served");
    for c in calls {
        let r = c
            .await
            .unwrap()
            .expect("in-flight call completes")
            .into_inner();
        assert_eq!(r.partitions[0].error_code, 0, "{r:?}");
    }
    let (code, stderr) = wait_exit(&mut s);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("every in-flight call finished"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_grace_answers_unavailable_and_warns() {
    let mut s = spawn(&[
        "--dev-leader-latency-ms",
        "2000",
        "--shutdown-grace-ms",
        "300",
    ])
    .await;
    let calls = calls_in_flight(&s, 5).await;
    sigterm(&s);
    for c in calls {
        let e = c.await.unwrap().expect_err("cut off by the grace");
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(e.message().contains("shutdown_grace"), "{e:?}");
    }
    let (code, stderr) = wait_exit(&mut s);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("shutdown grace expired"), "{stderr}");
}

/// Log lines that go to a pipe (as a pod's do, read by `kubectl logs`) carry no ANSI colour
/// codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_to_a_pipe_carry_no_colour() {
    let mut s = spawn(&[]).await;
    sigterm(&s);
    let (code, stderr) = wait_exit(&mut s);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("INFO"), "text log lines: {stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "escape codes in the log lines: {stderr:?}"
    );
}

/// A caller watching health (gRPC clients with health checking keep a Watch open on every
/// connection) learns NOT_SERVING at shutdown, then its stream ends: it does not hold the drain
/// until the grace expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_watch_sees_not_serving_then_ends_without_holding_the_drain() {
    use futures::StreamExt;
    use leaderlink::server::{Drained, FORWARDER_SERVICE};
    use tonic_health::pb::health_check_response::ServingStatus;
    let h = common::start(|_| {}).await;
    let mut watches = Vec::new();
    for addr in [h.server.addr, h.server.admin_addr] {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel);
        let mut w = health
            .watch(HealthCheckRequest {
                service: FORWARDER_SERVICE.into(),
            })
            .await
            .unwrap()
            .into_inner();
        // NOT_SERVING until the first metadata fetch, then SERVING.
        loop {
            let s = w.next().await.unwrap().unwrap().status;
            if s == ServingStatus::Serving as i32 {
                break;
            }
        }
        watches.push(w);
    }
    // A grace far longer than the drain needs: a held drain would run into it.
    let drained = h.server.shutdown(Duration::from_secs(20)).await;
    assert_eq!(drained, Drained::Clean);
    for mut w in watches {
        let mut seen = Vec::new();
        while let Some(m) = w.next().await {
            seen.push(m.unwrap().status);
        }
        assert_eq!(
            seen.last(),
            Some(&(ServingStatus::NotServing as i32)),
            "{seen:?}"
        );
    }
}
