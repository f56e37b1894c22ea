//! The Admin gRPC service: what an operator asks a running leaderlink with grpcurl.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tonic::{Code, Request, Response, Status};

use crate::{
    config::Config,
    forward::Forwarder,
    kafka::{
        connection::{ConnState, Connection},
        error::chain,
        metadata::{LeaderMap, TopicState},
        pool::Slot,
    },
    proto::v1::{
        DrainConnectionRequest, DrainConnectionResponse, GetConfigRequest, GetConfigResponse,
        GetStatsRequest, GetStatsResponse, LeaderConnection, ListConnectionsRequest,
        ListConnectionsResponse, ListLeadersRequest, ListLeadersResponse, PartitionLeader,
        RefreshMetadataRequest, admin_server,
    },
    stats::Stats,
};

/// The Admin service.
pub struct AdminService {
    forwarder: Forwarder,
    config: Arc<Config>,
}

impl AdminService {
    /// An admin view of `forwarder`, configured by `config`.
    pub fn new(forwarder: Forwarder, config: Arc<Config>) -> Self {
        Self { forwarder, config }
    }

    /// Checks `authorization: Bearer <token>` when a token is configured.
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(token) = self.config.admin_token.as_deref() else {
            return Ok(());
        };
        let Some(value) = req.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "this call changes state: send `authorization: Bearer <admin_token>`",
            ));
        };
        let given = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if constant_time_eq(given.as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err(Status::permission_denied("wrong admin token"))
        }
    }
}

/// Compares without returning early, so the time taken does not tell how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

fn age_ms(map: &LeaderMap) -> i64 {
    map.fetched_at
        .map_or(-1, |t| t.elapsed().as_millis().min(i64::MAX as u128) as i64)
}

fn leaders(map: &LeaderMap) -> ListLeadersResponse {
    let age = age_ms(map);
    let mut out = Vec::new();
    let mut topics: Vec<_> = map.topics.iter().collect();
    topics.sort_by(|a, b| a.0.cmp(b.0));
    for (topic, state) in topics {
        match state {
            TopicState::Error(code) => out.push(PartitionLeader {
                topic: topic.clone(),
                partition: -1,
                leader_id: -1,
                error_code: i32::from(*code),
                metadata_age_ms: age,
                ..Default::default()
            }),
            TopicState::Partitions(parts) => {
                for (i, p) in parts.iter().enumerate() {
                    out.push(PartitionLeader {
                        topic: topic.clone(),
                        partition: i as i32,
                        leader_id: p.leader_id,
                        leader_address: map
                            .brokers
                            .get(&p.leader_id)
                            .map(|b| b.addr())
                            .unwrap_or_default(),
                        leader_epoch: p.leader_epoch,
                        error_code: i32::from(p.error_code),
                        metadata_age_ms: age,
                    });
                }
            }
        }
    }
    ListLeadersResponse {
        leaders: out,
        metadata_age_ms: age,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn describe(slot: &Slot, conn: Option<(&Arc<Connection>, &str)>) -> LeaderConnection {
    let s = &slot.stats;
    let get = Stats::get;
    let (state, cause, address, version) = match conn {
        None => (
            "NOT_CONNECTED".to_string(),
            String::new(),
            String::new(),
            -1,
        ),
        Some((c, addr)) => {
            let (state, cause) = match c.state() {
                ConnState::Open => ("OPEN", String::new()),
                ConnState::Draining => ("DRAINING", String::new()),
                ConnState::Closed(e) => ("CLOSED", chain(&e)),
            };
            (
                state.to_string(),
                cause,
                addr.to_string(),
                i32::from(c.produce_version()),
            )
        }
    };
    LeaderConnection {
        broker_id: slot.broker_id,
        index: slot.index as u32,
        address,
        state,
        closed_cause: cause,
        in_flight: get(&s.in_flight),
        peak_in_flight: get(&s.peak_in_flight),
        queued: get(&s.queued),
        peak_queued: get(&s.peak_queued),
        in_flight_bytes: get(&s.in_flight_bytes),
        sent: get(&s.sent),
        completed: get(&s.completed),
        errors: get(&s.errors),
        timeouts: get(&s.timeouts),
        poisoned: get(&s.poisoned),
        rejected: get(&s.rejected),
        connects: get(&s.connects),
        produce_version: version,
        latency_p50_ms: ms(s.latency.quantile(0.50)),
        latency_p99_ms: ms(s.latency.quantile(0.99)),
    }
}

#[tonic::async_trait]
impl admin_server::Admin for AdminService {
    async fn list_leaders(
        &self,
        _: Request<ListLeadersRequest>,
    ) -> Result<Response<ListLeadersResponse>, Status> {
        Ok(Response::new(leaders(
            &self.forwarder.metadata().leader_map(),
        )))
    }

    async fn list_connections(
        &self,
        _: Request<ListConnectionsRequest>,
    ) -> Result<Response<ListConnectionsResponse>, Status> {
        let mut connections = Vec::new();
        for slot in self.forwarder.pool().slots() {
            let current = slot.current();
            connections.push(describe(
                &slot,
                current.as_ref().map(|(c, a)| (c, a.as_str())),
            ));
            for (c, a) in slot.draining() {
                connections.push(describe(&slot, Some((&c, &a))));
            }
        }
        Ok(Response::new(ListConnectionsResponse { connections }))
    }

    async fn get_stats(
        &self,
        _: Request<GetStatsRequest>,
    ) -> Result<Response<GetStatsResponse>, Status> {
        let s = self.forwarder.stats();
        let get = Stats::get;
        Ok(Response::new(GetStatsResponse {
            calls_ok: s.calls_with_code(Code::Ok),
            calls_invalid_argument: s.calls_with_code(Code::InvalidArgument),
            calls_deadline_exceeded: s.calls_with_code(Code::DeadlineExceeded),
            calls_unavailable: s.calls_with_code(Code::Unavailable),
            calls_resource_exhausted: s.calls_with_code(Code::ResourceExhausted),
            calls_internal: s.calls_with_code(Code::Internal),
            records_forwarded: get(&s.records_forwarded),
            bytes_forwarded: get(&s.bytes_forwarded),
            retries: get(&s.retries),
            sheds: get(&s.sheds),
            metadata_refreshes: self.forwarder.metadata().refreshes(),
            calls_in_progress: get(&s.calls_in_progress),
        }))
    }

    async fn refresh_metadata(
        &self,
        req: Request<RefreshMetadataRequest>,
    ) -> Result<Response<ListLeadersResponse>, Status> {
        self.authorize(&req)?;
        let deadline = Instant::now()
            + crate::grpc::caller_timeout(req.metadata())
                .unwrap_or(Duration::from_millis(self.config.default_timeout_ms));
        let map = self
            .forwarder
            .metadata()
            .refresh(&[], None, deadline)
            .await
            .map_err(|e| Status::unavailable(format!("metadata refresh failed: {}", chain(&e))))?;
        Ok(Response::new(leaders(&map)))
    }

    async fn drain_connection(
        &self,
        req: Request<DrainConnectionRequest>,
    ) -> Result<Response<DrainConnectionResponse>, Status> {
        self.authorize(&req)?;
        let broker = req.into_inner().broker_id;
        let (drained, in_flight) = self.forwarder.pool().drain(broker);
        if drained == 0 {
            return Err(Status::not_found(format!(
                "no open connection to broker {broker}"
            )));
        }
        Ok(Response::new(DrainConnectionResponse {
            drained: drained as u32,
            in_flight: in_flight as u64,
        }))
    }

    async fn get_config(
        &self,
        _: Request<GetConfigRequest>,
    ) -> Result<Response<GetConfigResponse>, Status> {
        Ok(Response::new(GetConfigResponse {
            toml: self.config.redacted_toml(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
