//! What a call answers: each partition's result, and the errors that end a call as a whole
//! (with the partitions they concern), plus the span of one Produce request.

use opentelemetry::KeyValue;

use super::{
    ForwardError,
    call::{Failure, ItemState},
    error_name,
    validate::{self, Validated},
};
use crate::{
    kafka::{
        error::{ConnError, chain},
        metadata::Broker,
    },
    proto::v1::PartitionResult,
    telemetry::SendSpan,
};

/// The call's error when a leader connection's bound refused a batch (RESOURCE_EXHAUSTED).
pub(super) fn overloaded(v: &Validated, st: &[ItemState], cause: ConnError) -> ForwardError {
    let refused: Vec<String> = st
        .iter()
        .enumerate()
        .filter(|(_, s)| s.overloaded.is_some())
        .take(5)
        .map(|(i, _)| format!("{}-{}", v.items[i].topic, v.items[i].partition))
        .collect();
    ForwardError::Overloaded {
        detail: format!(
            "the leader connection of {} refused the batch{}",
            refused.join(", "),
            answered_list(v, st)
        ),
        cause,
    }
}

/// The call's error when its deadline passed with partitions still pending.
pub(super) fn expired(v: &Validated, st: &[ItemState], pending: &[usize]) -> ForwardError {
    let name = |i: usize| format!("{}-{}", v.items[i].topic, v.items[i].partition);
    let waiting: Vec<String> = pending.iter().take(5).map(|&i| name(i)).collect();
    let answered = answered_list(v, st);
    let last = pending.iter().rev().find_map(|&i| st[i].last.clone());
    let all_connecting = pending.iter().all(|&i| {
        matches!(
            st[i].last,
            Some(Failure::Conn {
                connecting: true,
                ..
            })
        )
    });
    if all_connecting && let Some(Failure::Conn { cause, .. }) = last {
        return ForwardError::Unavailable {
            detail: format!(
                "cannot reach the leader of {}{answered}",
                waiting.join(", ")
            ),
            cause,
        };
    }
    let cause = match last {
        Some(Failure::Kafka { code, message }) => format!(
            "last answer {}{}",
            error_name(code),
            message.map(|m| format!(" ({m})")).unwrap_or_default()
        ),
        Some(Failure::Conn { cause, .. }) => format!("last cause: {}", chain(&cause)),
        None => "no attempt could be made in time".into(),
    };
    ForwardError::DeadlineExceeded {
        detail: format!(
            "{} of {} partitions unanswered ({}{}); {cause}{answered}",
            pending.len(),
            v.items.len(),
            waiting.join(", "),
            if pending.len() > 5 { ", …" } else { "" }
        ),
    }
}

/// The span of one Produce request to a leader (OpenTelemetry messaging conventions, client
/// side), a child of the call's span: started when the request is queued, ended once the call
/// has read the answer. Nothing is built unless the span is recorded.
pub(super) fn leader_span(
    v: &Validated,
    chunk: &[usize],
    broker: &Broker,
    attempt: u32,
) -> SendSpan {
    SendSpan::start(|| {
        let first = &v.items[chunk[0]];
        // Integers as i64: OpenTelemetry has no unsigned attributes (u64 would export as a
        // string).
        let records: i64 = chunk.iter().map(|&i| i64::from(v.items[i].records)).sum();
        let mut attributes = vec![
            KeyValue::new("messaging.system", "kafka"),
            KeyValue::new("messaging.operation.type", "send"),
            KeyValue::new("messaging.operation.name", "produce"),
            KeyValue::new("messaging.batch.message_count", records),
            KeyValue::new("server.address", broker.host.clone()),
            KeyValue::new("server.port", i64::from(broker.port)),
            KeyValue::new("leaderlink.leader_id", i64::from(broker.id)),
            KeyValue::new("leaderlink.partitions", chunk.len() as i64),
            KeyValue::new("leaderlink.attempt", i64::from(attempt)),
            KeyValue::new("leaderlink.acks", i64::from(v.acks)),
        ];
        let name = if chunk.iter().all(|&i| v.items[i].topic == first.topic) {
            attributes.push(KeyValue::new(
                "messaging.destination.name",
                first.topic.clone(),
            ));
            format!("send {}", first.topic).into()
        } else {
            "send".into()
        };
        if chunk.len() == 1 {
            attributes.push(KeyValue::new(
                "messaging.destination.partition.id",
                first.partition.to_string(),
            ));
        }
        (name, attributes)
    })
}

/// "; answered: t-0 at offset 5, …" for the partitions that already have a result.
fn answered_list(v: &Validated, st: &[ItemState]) -> String {
    let answered: Vec<String> = st
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.result.as_ref().map(|r| (i, r)))
        .take(5)
        .map(|(i, r)| {
            let name = format!("{}-{}", v.items[i].topic, v.items[i].partition);
            match r.error_code {
                0 => format!("{name} at offset {}", r.base_offset),
                _ => format!("{name} with {}", r.error_name),
            }
        })
        .collect();
    if answered.is_empty() {
        String::new()
    } else {
        format!("; answered: {}", answered.join(", "))
    }
}

/// Whether `cause` is a failure to open a connection (as opposed to one on an open connection).
pub(super) fn is_connect_failure(cause: &ConnError) -> bool {
    matches!(
        cause,
        ConnError::Connect { .. }
            | ConnError::ConnectTimeout { .. }
            | ConnError::HandshakeTimeout { .. }
            | ConnError::Avoided { .. }
    )
}

/// A partition's success.
pub(super) fn ok_result(
    it: &validate::Item,
    base_offset: i64,
    log_append_time_ms: i64,
    log_start_offset: i64,
    leader_id: i32,
    st: &ItemState,
) -> PartitionResult {
    PartitionResult {
        topic: it.topic.clone(),
        partition: it.partition,
        base_offset,
        log_append_time_ms,
        log_start_offset,
        leader_id,
        attempts: st.attempts,
        possibly_duplicated: st.possibly_duplicated,
        ..Default::default()
    }
}

/// A partition's final error.
pub(super) fn error_result(
    it: &validate::Item,
    code: i16,
    message: String,
    leader_id: i32,
    st: &ItemState,
) -> PartitionResult {
    PartitionResult {
        topic: it.topic.clone(),
        partition: it.partition,
        error_code: i32::from(code),
        error_name: error_name(code),
        error_message: message,
        base_offset: -1,
        log_append_time_ms: -1,
        log_start_offset: -1,
        leader_id,
        attempts: st.attempts,
        possibly_duplicated: st.possibly_duplicated,
        record_errors: Vec::new(),
    }
}
