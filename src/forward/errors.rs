//! Kafka error codes by name, and one table of what the forwarder does with each error a leader
//! answers for a partition: retry it, refresh the leader map first, and whether the batch may
//! be in the log although the answer is an error (docs/design.md §3.12, §3.13).

use kafka_protocol::error::ResponseError;

use crate::kafka::produce::acks;

/// UNKNOWN_TOPIC_OR_PARTITION.
pub(crate) const UNKNOWN_TOPIC_OR_PARTITION: i16 = ResponseError::UnknownTopicOrPartition.code();
/// NOT_LEADER_OR_FOLLOWER.
pub(crate) const NOT_LEADER_OR_FOLLOWER: i16 = ResponseError::NotLeaderOrFollower.code();
/// FENCED_LEADER_EPOCH.
pub(crate) const FENCED_LEADER_EPOCH: i16 = ResponseError::FencedLeaderEpoch.code();
/// MESSAGE_TOO_LARGE.
pub(crate) const MESSAGE_TOO_LARGE: i16 = ResponseError::MessageTooLarge.code();
/// RECORD_LIST_TOO_LARGE.
pub(crate) const RECORD_LIST_TOO_LARGE: i16 = ResponseError::RecordListTooLarge.code();
/// OUT_OF_ORDER_SEQUENCE_NUMBER.
pub(crate) const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = ResponseError::OutOfOrderSequenceNumber.code();
/// DUPLICATE_SEQUENCE_NUMBER.
pub(crate) const DUPLICATE_SEQUENCE_NUMBER: i16 = ResponseError::DuplicateSequenceNumber.code();
/// INVALID_PRODUCER_EPOCH.
pub(crate) const INVALID_PRODUCER_EPOCH: i16 = ResponseError::InvalidProducerEpoch.code();
/// UNKNOWN_PRODUCER_ID.
pub(crate) const UNKNOWN_PRODUCER_ID: i16 = ResponseError::UnknownProducerId.code();
/// PRODUCER_FENCED.
pub(crate) const PRODUCER_FENCED: i16 = ResponseError::ProducerFenced.code();
/// SASL_AUTHENTICATION_FAILED: a partition whose leader refused leaderlink's SASL credentials.
pub(crate) const SASL_AUTHENTICATION_FAILED: i16 = ResponseError::SaslAuthenticationFailed.code();
/// NETWORK_EXCEPTION: also a partition whose leader's TLS handshake failed (Kafka has no code of
/// its own for that; the message says TLS).
pub(crate) const NETWORK_EXCEPTION: i16 = ResponseError::NetworkException.code();

/// Whether the batch may be in the log after such an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    No,
    /// Only under acks=all: the old leader may have appended before losing leadership.
    UnderAcksAll,
    Maybe,
}

/// The errors that need more than kafka-protocol's "retriable": (error, refresh the leader map
/// before the retry, may be written). Every listed error is retried; any other code is retried
/// exactly when kafka-protocol calls it retriable, without a refresh, and counts as not written.
const TABLE: [(ResponseError, bool, Written); 8] = [
    (ResponseError::UnknownTopicOrPartition, true, Written::No),
    (ResponseError::LeaderNotAvailable, true, Written::No),
    (
        ResponseError::NotLeaderOrFollower,
        true,
        Written::UnderAcksAll,
    ),
    (ResponseError::NetworkException, true, Written::No),
    (ResponseError::KafkaStorageError, true, Written::No),
    (ResponseError::FencedLeaderEpoch, true, Written::No),
    (ResponseError::RequestTimedOut, false, Written::Maybe),
    (
        ResponseError::NotEnoughReplicasAfterAppend,
        false,
        Written::Maybe,
    ),
];

fn entry(code: i16) -> Option<&'static (ResponseError, bool, Written)> {
    TABLE.iter().find(|(e, _, _)| e.code() == code)
}

/// Errors after which the leader map is refreshed before retrying.
pub(crate) fn needs_refresh(code: i16) -> bool {
    entry(code).is_some_and(|(_, refresh, _)| *refresh)
}

/// Errors the forwarder retries within the caller's deadline.
pub(crate) fn retriable(code: i16) -> bool {
    entry(code).is_some() || ResponseError::try_from_code(code).is_some_and(|e| e.is_retriable())
}

/// Answers after which the batch may nevertheless be in the log (docs/design.md §3.12), with
/// the call's acks.
pub(crate) fn may_have_appended(code: i16, acks_value: i16) -> bool {
    match entry(code) {
        Some((_, _, Written::Maybe)) => true,
        Some((_, _, Written::UnderAcksAll)) => acks_value == acks::ALL,
        _ => false,
    }
}

/// Kafka's name for an error code, e.g. `UNKNOWN_TOPIC_OR_PARTITION`.
pub fn error_name(code: i16) -> String {
    match ResponseError::try_from_code(code) {
        None => String::new(),
        Some(ResponseError::Unknown(_)) => "UNKNOWN_ERROR_CODE".into(),
        Some(e) => {
            let camel = e.to_string();
            let mut out = String::with_capacity(camel.len() + 8);
            for (i, c) in camel.chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    out.push('_');
                }
                out.push(c.to_ascii_uppercase());
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_are_kafka_style() {
        assert_eq!(error_name(3), "UNKNOWN_TOPIC_OR_PARTITION");
        assert_eq!(error_name(6), "NOT_LEADER_OR_FOLLOWER");
        assert_eq!(error_name(0), "");
        assert_eq!(error_name(20), "NOT_ENOUGH_REPLICAS_AFTER_APPEND");
    }

    #[test]
    fn the_table_keeps_the_codes_it_has_always_had() {
        // The codes the forwarder refreshed on, retried and counted as maybe written before
        // the table existed (as bare numbers).
        for c in [3, 5, 6, 13, 56, 74] {
            assert!(needs_refresh(c) && retriable(c), "{c}");
        }
        for c in [0, 7, 19, 20, 45, 10] {
            assert!(!needs_refresh(c), "{c}");
        }
        assert!(retriable(7) && retriable(19) && retriable(20));
        assert!(!retriable(10) && !retriable(87));
        assert!(may_have_appended(7, acks::LEADER) && may_have_appended(20, acks::LEADER));
        assert!(may_have_appended(6, acks::ALL) && !may_have_appended(6, acks::LEADER));
        assert!(!may_have_appended(19, acks::ALL) && !may_have_appended(3, acks::ALL));
    }
}
