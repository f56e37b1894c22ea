//! Merging: the calls a lane sends in one message become as few requests as they can.
//!
//! Calls for one partition with `records`, the same acks and the same deadline (to the
//! millisecond, the resolution of `call_timeout_ms`) become one `ForwardRequest` whose records
//! follow each other in the order the calls were made, up to
//! [`Options::max_merge_bytes`](crate::Options::max_merge_bytes). leaderlink then handles one
//! request where it would have handled many: one validation, one task, one answer. Its own
//! accumulation still merges the records of requests from other lanes and clients into shared
//! Kafka batches.
//!
//! The answer is about the whole request; each call gets its part of it, as leaderlink's own
//! accumulation does for the calls sharing a record batch (docs/design.md §3.20):
//! * the offset of a call's first record is the request's base offset plus the records before
//!   it;
//! * record errors (INVALID_RECORD etc.) go to the call that holds the record, by its index in
//!   that call's records. The leader refused the whole batch and nothing of it is in the log, so
//!   the other calls are sent again, alone;
//! * a request refused as too large (MESSAGE_TOO_LARGE, RECORD_LIST_TOO_LARGE), or as malformed
//!   (INVALID_ARGUMENT, e.g. over leaderlink's `max_request_bytes`), is sent again call by call,
//!   so that each call gets the answer it would have got alone;
//! * any other answer (success, another Kafka error, a failed call) is every call's.
//!
//! Raw `record_batch` payloads, calls with partition -1 (leaderlink chooses it from the key)
//! and calls sent again are never merged.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
};

use tokio::{sync::oneshot, time::Instant};
use tonic::{Code, Status};

use crate::proto::{ForwardBatch, ForwardRequest, ForwardResponse, PartitionData, Record};
use crate::proto::{PartitionResult, RecordError};

/// Where a call's answer goes.
pub(crate) type Reply = oneshot::Sender<Result<ForwardResponse, Status>>;

/// Kafka's MESSAGE_TOO_LARGE: a batch over the topic's `max.message.bytes`.
const MESSAGE_TOO_LARGE: i32 = 10;
/// Kafka's RECORD_LIST_TOO_LARGE: a batch larger than the leader's log segment size.
const RECORD_LIST_TOO_LARGE: i32 = 18;

/// Bytes a record adds to a merged request beyond its key, value and headers (its length,
/// attributes, deltas; an estimate on the high side).
const RECORD_OVERHEAD: usize = 16;

/// A call waiting to be sent by its lane.
pub(crate) struct Queued {
    pub(crate) request: ForwardRequest,
    pub(crate) deadline: Instant,
    pub(crate) reply: Reply,
    /// Sent again after a merged request was refused for another call's records or as a
    /// whole: goes alone.
    pub(crate) alone: bool,
    /// Produce requests that carried the call's records before it was sent again (added to
    /// its result's `attempts`).
    pub(crate) attempts: u32,
}

/// A request in flight on a lane, by its id.
pub(crate) enum Waiter {
    /// The request of one call.
    One { reply: Reply, attempts: u32 },
    /// The request of several calls' records.
    Merged(Merged),
}

/// A request that carries several calls' records.
pub(crate) struct Merged {
    topic: String,
    partition: i32,
    acks: i32,
    /// The request's records, kept to send calls again alone (cheap: `Bytes` are shared).
    records: Vec<Record>,
    members: Vec<Member>,
}

/// One call of a merged request: its records are `records[first..first + count]`.
struct Member {
    reply: Reply,
    deadline: Instant,
    first: usize,
    count: usize,
    attempts: u32,
}

/// A request being built from queued calls.
struct Draft {
    request: ForwardRequest,
    /// The first call's reply and its earlier attempts.
    reply: Reply,
    deadline: Instant,
    attempts: u32,
    /// The calls merged into it after the first (empty for a request of one call).
    more: Vec<Member>,
    /// Bytes of its records (see [`merge_size`]); `None` when others may not join.
    bytes: Option<usize>,
}

impl Draft {
    /// Whether `request` (of `bytes`) may join this draft within `max` bytes.
    fn takes(&self, request: &ForwardRequest, bytes: usize, max: usize) -> bool {
        let (Some(have), Some(p), Some(q)) = (
            self.bytes,
            self.request.partitions.first(),
            request.partitions.first(),
        ) else {
            return false;
        };
        have + bytes <= max
            && self.request.acks == request.acks
            && self.request.call_timeout_ms == request.call_timeout_ms
            && p.partition == q.partition
            && p.topic == q.topic
    }
}

/// The size in bytes `request` adds to a merged request, or `None` if it must go alone.
fn merge_size(request: &ForwardRequest, alone: bool, max: usize) -> Option<usize> {
    let [p] = request.partitions.as_slice() else {
        return None;
    };
    if alone
        || max == 0
        || p.partition < 0
        || !p.record_batch.is_empty()
        || p.records.is_empty()
        || !request.transactional_id.is_empty()
    {
        return None;
    }
    let bytes: usize = p
        .records
        .iter()
        .map(|r| {
            let headers: usize = r
                .headers
                .iter()
                .map(|h| h.key.len() + h.value.as_ref().map_or(0, |v| v.len()))
                .sum();
            r.key.as_ref().map_or(0, |k| k.len())
                + r.value.as_ref().map_or(0, |v| v.len())
                + headers
                + RECORD_OVERHEAD
        })
        .sum();
    (bytes <= max).then_some(bytes)
}

/// Takes every queued call (dropping those whose caller left or whose deadline passed) into
/// one `ForwardBatch`, merging what may be merged (the module's rules), and records each
/// request under a new id in `pending`.
pub(crate) fn take_batch(
    queued: &mut Vec<Queued>,
    next_id: &mut u64,
    pending: &mut HashMap<u64, Waiter>,
    max_merge_bytes: usize,
) -> ForwardBatch {
    let now = Instant::now();
    let mut drafts: Vec<Draft> = Vec::with_capacity(queued.len());
    // The last draft of each partition (by partition and a hash of the topic): a call may
    // join only that one, so that a partition's records keep the order of their calls.
    let mut last: HashMap<(i32, u64), usize> = HashMap::new();
    let hasher = RandomState::new();
    for q in queued.drain(..) {
        if q.reply.is_closed() {
            continue;
        }
        let left = q.deadline.saturating_duration_since(now);
        if left.is_zero() {
            let _ = q.reply.send(Err(Status::deadline_exceeded(
                "deadline passed before sending",
            )));
            continue;
        }
        let mut request = q.request;
        request.call_timeout_ms = u32::try_from(left.as_millis().max(1)).unwrap_or(u32::MAX);
        let bytes = merge_size(&request, q.alone, max_merge_bytes);
        let key = request
            .partitions
            .first()
            .map(|p| (p.partition, hasher.hash_one(&p.topic)));
        if let (Some(b), Some(key)) = (bytes, key)
            && let Some(&d) = last.get(&key)
            && drafts[d].takes(&request, b, max_merge_bytes)
        {
            let draft = &mut drafts[d];
            let records = std::mem::take(&mut request.partitions[0].records);
            let into = &mut draft.request.partitions[0].records;
            draft.more.push(Member {
                reply: q.reply,
                deadline: q.deadline,
                first: into.len(),
                count: records.len(),
                attempts: q.attempts,
            });
            into.extend(records);
            draft.bytes = draft.bytes.map(|have| have + b);
            continue;
        }
        if let Some(key) = key {
            last.insert(key, drafts.len());
        }
        drafts.push(Draft {
            request,
            reply: q.reply,
            deadline: q.deadline,
            attempts: q.attempts,
            more: Vec::new(),
            bytes,
        });
    }
    let mut requests = Vec::with_capacity(drafts.len());
    for mut d in drafts {
        *next_id += 1;
        d.request.id = *next_id;
        let waiter = if d.more.is_empty() {
            Waiter::One {
                reply: d.reply,
                attempts: d.attempts,
            }
        } else {
            let p = &d.request.partitions[0];
            let first = d.more[0].first;
            let mut members = Vec::with_capacity(d.more.len() + 1);
            members.push(Member {
                reply: d.reply,
                deadline: d.deadline,
                first: 0,
                count: first,
                attempts: d.attempts,
            });
            members.append(&mut d.more);
            Waiter::Merged(Merged {
                topic: p.topic.clone(),
                partition: p.partition,
                acks: d.request.acks,
                records: p.records.clone(),
                members,
            })
        };
        pending.insert(d.request.id, waiter);
        requests.push(d.request);
    }
    ForwardBatch { requests }
}

impl Waiter {
    /// Hands `resp` to the call or calls of the request; calls to be sent again alone go to
    /// `again`.
    pub(crate) fn answer(self, mut resp: ForwardResponse, again: &mut Vec<Queued>) {
        match self {
            Waiter::One { reply, attempts } => {
                for p in &mut resp.partitions {
                    p.attempts = p.attempts.saturating_add(attempts);
                }
                let _ = reply.send(Ok(resp));
            }
            Waiter::Merged(m) => m.answer(resp, again),
        }
    }

    /// Fails the call or calls of the request with `status`.
    pub(crate) fn fail(self, status: &Status) {
        let fail = |reply: Reply| {
            let _ = reply.send(Err(Status::new(status.code(), status.message())));
        };
        match self {
            Waiter::One { reply, .. } => fail(reply),
            Waiter::Merged(m) => m.members.into_iter().for_each(|c| fail(c.reply)),
        }
    }
}

impl Merged {
    fn answer(self, resp: ForwardResponse, again: &mut Vec<Queued>) {
        let id = resp.id;
        if resp.status_code != 0 {
            if resp.status_code == Code::InvalidArgument as i32 {
                return self.send_again(0, again);
            }
            for c in self.members {
                let _ = c.reply.send(Ok(ForwardResponse {
                    id,
                    partitions: Vec::new(),
                    status_code: resp.status_code,
                    status_message: resp.status_message.clone(),
                }));
            }
            return;
        }
        let Some(p) = resp.partitions.into_iter().next() else {
            return self.fail(&Status::internal(
                "leaderlink answered without a partition result",
            ));
        };
        if p.error_code != 0 && !p.record_errors.is_empty() {
            return self.split_record_errors(id, p, again);
        }
        if matches!(p.error_code, MESSAGE_TOO_LARGE | RECORD_LIST_TOO_LARGE) {
            return self.send_again(p.attempts, again);
        }
        for c in self.members {
            let mut r = p.clone();
            if r.error_code == 0 && r.base_offset >= 0 {
                r.base_offset += c.first as i64;
            }
            r.attempts = r.attempts.saturating_add(c.attempts);
            let _ = c.reply.send(Ok(one(id, r)));
        }
    }

    /// The leader refused the batch for some records: their calls get their errors, by their
    /// index in the call's records; the others are sent again.
    fn split_record_errors(mut self, id: u64, p: PartitionResult, again: &mut Vec<Queued>) {
        let members = std::mem::take(&mut self.members);
        for c in members {
            let own = c.first..c.first + c.count;
            let errors: Vec<RecordError> = p
                .record_errors
                .iter()
                .filter_map(|e| {
                    let at = usize::try_from(e.batch_index).ok()?;
                    own.contains(&at).then(|| RecordError {
                        batch_index: (at - c.first) as i32,
                        message: e.message.clone(),
                    })
                })
                .collect();
            if errors.is_empty() {
                let attempts = c.attempts.saturating_add(p.attempts);
                again.push(self.alone(c, attempts));
                continue;
            }
            let message = errors
                .iter()
                .map(|e| {
                    let m = if e.message.is_empty() {
                        "rejected"
                    } else {
                        &e.message
                    };
                    format!("record {}: {m}", e.batch_index)
                })
                .collect::<Vec<_>>()
                .join("; ");
            let r = PartitionResult {
                error_message: message,
                record_errors: errors,
                base_offset: -1,
                attempts: p.attempts.saturating_add(c.attempts),
                ..p.clone()
            };
            let _ = c.reply.send(Ok(one(id, r)));
        }
    }

    /// Every call goes again, alone, having taken `attempts` more Produce requests.
    fn send_again(mut self, attempts: u32, again: &mut Vec<Queued>) {
        for c in std::mem::take(&mut self.members) {
            let a = c.attempts.saturating_add(attempts);
            again.push(self.alone(c, a));
        }
    }

    /// The call `c` as a request of its own.
    fn alone(&self, c: Member, attempts: u32) -> Queued {
        Queued {
            request: ForwardRequest {
                acks: self.acks,
                partitions: vec![PartitionData {
                    topic: self.topic.clone(),
                    partition: self.partition,
                    records: self.records[c.first..c.first + c.count].to_vec(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            deadline: c.deadline,
            reply: c.reply,
            alone: true,
            attempts,
        }
    }

    fn fail(self, status: &Status) {
        Waiter::Merged(self).fail(status)
    }
}

/// A call's answer holding `result`.
fn one(id: u64, result: PartitionResult) -> ForwardResponse {
    ForwardResponse {
        id,
        partitions: vec![result],
        status_code: 0,
        status_message: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;

    fn call(
        partition: i32,
        value: &str,
        deadline: Instant,
    ) -> (Queued, oneshot::Receiver<Result<ForwardResponse, Status>>) {
        let (reply, rx) = oneshot::channel();
        let request = ForwardRequest {
            acks: 2,
            partitions: vec![PartitionData {
                topic: "t".into(),
                partition,
                records: vec![Record {
                    value: Some(Bytes::copy_from_slice(value.as_bytes())),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let q = Queued {
            request,
            deadline,
            reply,
            alone: false,
            attempts: 0,
        };
        (q, rx)
    }

    /// The requests of `batch` as (partition, values).
    fn shape(batch: &ForwardBatch) -> Vec<(i32, Vec<String>)> {
        batch
            .requests
            .iter()
            .map(|r| {
                let p = &r.partitions[0];
                let values = p
                    .records
                    .iter()
                    .map(|x| String::from_utf8(x.value.clone().unwrap().to_vec()).unwrap())
                    .collect();
                (p.partition, values)
            })
            .collect()
    }

    #[tokio::test]
    async fn a_partitions_calls_merge_in_order_and_never_jump_a_call_that_goes_alone() {
        let d = Instant::now() + Duration::from_secs(10);
        let mut queued = Vec::new();
        let mut keep = Vec::new();
        for (p, v) in [(0, "a"), (1, "b"), (0, "c")] {
            let (q, rx) = call(p, v, d);
            queued.push(q);
            keep.push(rx);
        }
        // A raw batch of partition 0: the next call of partition 0 may not join "a" and "c".
        let (mut raw, rx) = call(0, "raw", d);
        raw.request.partitions[0].records.clear();
        raw.request.partitions[0].record_batch = Bytes::from_static(b"batch");
        queued.push(raw);
        keep.push(rx);
        for (p, v) in [(0, "d"), (1, "e"), (0, "f")] {
            let (q, rx) = call(p, v, d);
            queued.push(q);
            keep.push(rx);
        }
        // Another deadline (by seconds): a request of its own, after "d" and "f".
        let (q, rx) = call(0, "g", d + Duration::from_secs(1));
        queued.push(q);
        keep.push(rx);
        let mut pending = HashMap::new();
        let batch = take_batch(&mut queued, &mut 0, &mut pending, 1024);
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            shape(&batch),
            vec![
                (0, s(&["a", "c"])),
                (1, s(&["b", "e"])),
                (0, s(&[])),
                (0, s(&["d", "f"])),
                (0, s(&["g"])),
            ]
        );
        assert_eq!(pending.len(), 5);
    }

    #[tokio::test]
    async fn a_merged_request_stays_within_max_merge_bytes() {
        let d = Instant::now() + Duration::from_secs(10);
        let mut queued = Vec::new();
        let mut keep = Vec::new();
        for v in ["aaaa", "bbbb", "cccc"] {
            let (q, rx) = call(0, v, d);
            queued.push(q);
            keep.push(rx);
        }
        // Two records of 4 + 16 bytes fit in 40, three do not.
        let batch = take_batch(&mut queued, &mut 0, &mut HashMap::new(), 40);
        assert_eq!(batch.requests.len(), 2);
        assert_eq!(batch.requests[0].partitions[0].records.len(), 2);
        // With merging off, every call is a request.
        for v in ["a", "b"] {
            let (q, rx) = call(0, v, d);
            queued.push(q);
            keep.push(rx);
        }
        let batch = take_batch(&mut queued, &mut 0, &mut HashMap::new(), 0);
        assert_eq!(batch.requests.len(), 2);
    }

    #[tokio::test]
    async fn each_call_of_a_merged_request_gets_its_offset_and_its_record_errors() {
        let d = Instant::now() + Duration::from_secs(10);
        let mut queued = Vec::new();
        let mut rxs = Vec::new();
        for v in ["a", "b", "c"] {
            let (q, rx) = call(0, v, d);
            queued.push(q);
            rxs.push(rx);
        }
        let mut pending = HashMap::new();
        let batch = take_batch(&mut queued, &mut 0, &mut pending, 1024);
        let id = batch.requests[0].id;
        let ok = PartitionResult {
            topic: "t".into(),
            base_offset: 100,
            attempts: 1,
            ..Default::default()
        };
        let mut again = Vec::new();
        pending.remove(&id).unwrap().answer(one(id, ok), &mut again);
        assert!(again.is_empty());
        for (i, rx) in rxs.iter_mut().enumerate() {
            let r = rx.try_recv().unwrap().unwrap();
            assert_eq!(r.partitions[0].base_offset, 100 + i as i64);
        }

        // Refused for "b"'s record: "b" gets the error at its own index, "a" and "c" go again.
        let mut rxs = Vec::new();
        for v in ["a", "b", "c"] {
            let (q, rx) = call(0, v, d);
            queued.push(q);
            rxs.push(rx);
        }
        let batch = take_batch(&mut queued, &mut 0, &mut pending, 1024);
        let id = batch.requests[0].id;
        let refused = PartitionResult {
            error_code: 87,
            error_name: "INVALID_RECORD".into(),
            base_offset: -1,
            attempts: 1,
            record_errors: vec![RecordError {
                batch_index: 1,
                message: "no key".into(),
            }],
            ..Default::default()
        };
        pending
            .remove(&id)
            .unwrap()
            .answer(one(id, refused), &mut again);
        let b = rxs[1].try_recv().unwrap().unwrap();
        let b = &b.partitions[0];
        assert_eq!((b.error_code, b.record_errors[0].batch_index), (87, 0));
        assert_eq!(b.error_message, "record 0: no key");
        let values: Vec<_> = again
            .iter()
            .map(|q| {
                (
                    q.alone,
                    q.attempts,
                    shape(&ForwardBatch {
                        requests: vec![q.request.clone()],
                    }),
                )
            })
            .collect();
        assert_eq!(
            values,
            vec![
                (true, 1, vec![(0, vec!["a".to_string()])]),
                (true, 1, vec![(0, vec!["c".to_string()])]),
            ]
        );
    }

    /// A small deterministic generator (xorshift64), so that a failing case can be replayed
    /// from its seed.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    #[tokio::test]
    async fn random_messages_keep_each_partitions_order_and_give_every_call_its_own_offset() {
        let base = Instant::now() + Duration::from_secs(10);
        let mut merged_requests = 0;
        for seed in 1..=300u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let max = 40 + rng.below(200) as usize;
            let mut queued = Vec::new();
            // Per call: its partition, its values, and its answer (None: dropped by its caller).
            let mut calls = Vec::new();
            for i in 0..(1 + rng.below(40)) {
                let partition = rng.below(3) as i32;
                // Two deadlines a second apart, a few raw batches, calls of 1 to 3 records.
                let deadline = base + Duration::from_secs(rng.below(2));
                let (mut q, rx) = call(partition, &format!("{i}-0"), deadline);
                let records = &mut q.request.partitions[0].records;
                for j in 1..(1 + rng.below(3)) {
                    records.push(Record {
                        value: Some(Bytes::from(format!("{i}-{j}"))),
                        ..Default::default()
                    });
                }
                if rng.below(8) == 0 {
                    let p = &mut q.request.partitions[0];
                    p.records.clear();
                    p.record_batch = Bytes::from(format!("{i}-raw"));
                }
                let values: Vec<String> = q.request.partitions[0]
                    .records
                    .iter()
                    .map(|r| String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap())
                    .collect();
                let rx = if rng.below(10) == 0 {
                    drop(rx);
                    None
                } else {
                    Some(rx)
                };
                calls.push((partition, values, rx));
                queued.push(q);
            }
            let mut pending = HashMap::new();
            let batch = take_batch(&mut queued, &mut 0, &mut pending, max);
            // The leader: each partition's log in request order; every request answered with
            // its base offset.
            let mut logs: HashMap<i32, Vec<String>> = HashMap::new();
            let mut again = Vec::new();
            for r in &batch.requests {
                let p = &r.partitions[0];
                let log = logs.entry(p.partition).or_default();
                let base_offset = log.len() as i64;
                let merged = matches!(pending.get(&r.id), Some(Waiter::Merged(_)));
                if merged {
                    merged_requests += 1;
                    let bytes: usize = p
                        .records
                        .iter()
                        .map(|x| x.value.as_ref().unwrap().len() + RECORD_OVERHEAD)
                        .sum();
                    assert!(
                        bytes <= max,
                        "seed {seed}: {bytes} bytes merged, bound {max}"
                    );
                }
                if p.records.is_empty() {
                    log.push(String::from_utf8(p.record_batch.to_vec()).unwrap());
                } else {
                    log.extend(
                        p.records
                            .iter()
                            .map(|x| String::from_utf8(x.value.clone().unwrap().to_vec()).unwrap()),
                    );
                }
                let result = PartitionResult {
                    partition: p.partition,
                    base_offset,
                    attempts: 1,
                    ..Default::default()
                };
                pending
                    .remove(&r.id)
                    .unwrap()
                    .answer(one(r.id, result), &mut again);
            }
            assert!(pending.is_empty() && again.is_empty(), "seed {seed}");
            // Every live call is in the log once, at the offset it was given; a partition's
            // calls are in the order they were made.
            let mut at: HashMap<i32, i64> = HashMap::new();
            for (i, (partition, values, rx)) in calls.iter_mut().enumerate() {
                let Some(rx) = rx else { continue };
                let r = rx.try_recv().unwrap().unwrap();
                let offset = r.partitions[0].base_offset;
                let log = &logs[partition];
                let first = usize::try_from(offset).unwrap();
                if values.is_empty() {
                    assert_eq!(log[first], format!("{i}-raw"), "seed {seed}, call {i}");
                } else {
                    assert_eq!(
                        &log[first..first + values.len()],
                        &values[..],
                        "seed {seed}, call {i}"
                    );
                }
                let before = at.insert(*partition, offset);
                assert!(
                    before.is_none_or(|b| b < offset),
                    "seed {seed}, call {i}: out of order"
                );
            }
        }
        // The cases did merge.
        assert!(merged_requests > 300, "{merged_requests} merged requests");
    }
}
