//! Walks a response body's shape before kafka-protocol decodes it.
//!
//! kafka-protocol's decoder reserves `Vec::with_capacity(n)` from array counts read off the
//! wire, before it has seen a single element: a few hostile (or corrupt) bytes announcing
//! 2^31 elements make it request hundreds of gigabytes, and a failed allocation aborts the
//! process. This walker knows the layout of the responses leaderlink decodes (Produce
//! 3–12, Metadata 1–12, ApiVersions 0–3, SaslHandshake 0–1, SaslAuthenticate 0–2; any other
//! API is refused) and checks every count against the bytes that remain
//! — including counts inside the tagged fields kafka-protocol decodes — so the decoder is only
//! ever given a body whose arrays really are there. It allocates nothing.

use kafka_protocol::messages::ApiKey;

/// Why a body was refused.
pub type Refusal = String;

struct Walk<'a> {
    b: &'a [u8],
    flexible: bool,
}

impl<'a> Walk<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Refusal> {
        if n > self.b.len() {
            return Err(format!("{n} bytes announced, {} left", self.b.len()));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn fixed(&mut self, n: usize) -> Result<(), Refusal> {
        self.take(n).map(|_| ())
    }

    fn i16(&mut self) -> Result<i16, Refusal> {
        let s = self.take(2)?;
        Ok(i16::from_be_bytes([s[0], s[1]]))
    }

    fn i32(&mut self) -> Result<i32, Refusal> {
        let s = self.take(4)?;
        Ok(i32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }

    /// An unsigned varint. kafka-protocol reads these as u32 (dropping higher bits), so a
    /// value that does not fit is refused: the two readings must never disagree.
    fn uvarint(&mut self) -> Result<u64, Refusal> {
        let mut v = 0u64;
        for shift in (0..35).step_by(7) {
            let byte = self.take(1)?[0];
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                if v > u64::from(u32::MAX) {
                    return Err(format!("varint {v} does not fit 32 bits"));
                }
                return Ok(v);
            }
        }
        Err("varint longer than 5 bytes".into())
    }

    /// A (nullable) string: classic int16 length, or compact uvarint length + 1.
    fn string(&mut self) -> Result<(), Refusal> {
        self.sized(false)
    }

    /// (Nullable) bytes: classic int32 length, or compact uvarint length + 1.
    fn bytes(&mut self) -> Result<(), Refusal> {
        self.sized(true)
    }

    /// A length-prefixed value (-1 for null); `wide` picks the classic int32 prefix over int16.
    fn sized(&mut self, wide: bool) -> Result<(), Refusal> {
        let len = if self.flexible {
            self.uvarint()? as i64 - 1
        } else if wide {
            i64::from(self.i32()?)
        } else {
            i64::from(self.i16()?)
        };
        if len < -1 {
            return Err(format!("length {len}"));
        }
        self.fixed(len.max(0) as usize)
    }

    /// An array's element count, checked against the bytes left (an element takes at least
    /// `min_element` bytes).
    fn count(&mut self, min_element: usize) -> Result<usize, Refusal> {
        let n = if self.flexible {
            self.uvarint()? as i64 - 1
        } else {
            i64::from(self.i32()?)
        };
        if n < -1 {
            return Err(format!("array length {n}"));
        }
        let n = n.max(0) as usize;
        if n.saturating_mul(min_element.max(1)) > self.b.len() {
            return Err(format!(
                "array of {n} elements announced with {} bytes left",
                self.b.len()
            ));
        }
        Ok(n)
    }

    fn array(
        &mut self,
        min_element: usize,
        mut each: impl FnMut(&mut Self) -> Result<(), Refusal>,
    ) -> Result<(), Refusal> {
        for _ in 0..self.count(min_element)? {
            each(self)?;
        }
        Ok(())
    }

    /// Tagged fields (flexible versions only). `known` walks the value of every tag that
    /// kafka-protocol decodes into a field (it reads those values in place, ignoring the
    /// declared size) and returns `Ok(true)` for them; such a value must fill its declared size
    /// exactly, or the two readings would part ways. Other tags are skipped by size, as
    /// kafka-protocol does.
    fn tags(
        &mut self,
        mut known: impl FnMut(u64, &mut Walk<'a>) -> Result<bool, Refusal>,
    ) -> Result<(), Refusal> {
        if !self.flexible {
            return Ok(());
        }
        let n = self.uvarint()?;
        if n as usize > self.b.len() {
            return Err(format!(
                "{n} tagged fields with {} bytes left",
                self.b.len()
            ));
        }
        for _ in 0..n {
            let tag = self.uvarint()?;
            let size = self.uvarint()? as usize;
            let mut inner = Walk {
                b: self.take(size)?,
                flexible: true,
            };
            if known(tag, &mut inner)? && !inner.b.is_empty() {
                return Err(format!(
                    "tagged field {tag} declares {size} bytes, its value leaves {} over",
                    inner.b.len()
                ));
            }
        }
        Ok(())
    }

    fn no_known_tags(&mut self) -> Result<(), Refusal> {
        self.tags(|_, _| Ok(false))
    }
}

/// Checks `body` (the response without its header) for `api` at `version`.
pub fn check(api: ApiKey, version: i16, body: &[u8]) -> Result<(), Refusal> {
    match api {
        ApiKey::Produce => produce(version, body),
        ApiKey::Metadata => metadata(version, body),
        ApiKey::ApiVersions => api_versions(version, body),
        ApiKey::SaslHandshake => sasl_handshake(body),
        ApiKey::SaslAuthenticate => sasl_authenticate(version, body),
        ApiKey::InitProducerId => init_producer_id(version, body),
        _ => Err(format!("no shape known for {api:?} responses")),
    }
}

fn produce(v: i16, body: &[u8]) -> Result<(), Refusal> {
    let mut w = Walk {
        b: body,
        flexible: v >= 9,
    };
    w.array(4, |w| {
        w.string()?; // topic name
        w.array(22, |w| {
            w.fixed(4 + 2 + 8)?; // index, error code, base offset
            if v >= 2 {
                w.fixed(8)?; // log append time
            }
            if v >= 5 {
                w.fixed(8)?; // log start offset
            }
            if v >= 8 {
                w.array(4, |w| {
                    w.fixed(4)?;
                    w.string()?;
                    w.no_known_tags()
                })?;
                w.string()?; // error message
            }
            w.tags(|tag, inner| {
                if tag == 0 && v >= 10 {
                    // current_leader: leader id, leader epoch, its own tagged fields.
                    inner.fixed(8)?;
                    inner.no_known_tags()?;
                    return Ok(true);
                }
                Ok(false)
            })
        })?;
        w.no_known_tags()
    })?;
    if v >= 1 {
        w.fixed(4)?; // throttle time
    }
    w.tags(|tag, inner| {
        if tag == 0 && v >= 10 {
            // node_endpoints
            inner.array(4, |w| {
                w.fixed(4)?;
                w.string()?;
                w.fixed(4)?;
                w.string()?;
                w.no_known_tags()
            })?;
            return Ok(true);
        }
        Ok(false)
    })
}

fn metadata(v: i16, body: &[u8]) -> Result<(), Refusal> {
    let mut w = Walk {
        b: body,
        flexible: v >= 9,
    };
    if v >= 3 {
        w.fixed(4)?; // throttle time
    }
    w.array(8, |w| {
        w.fixed(4)?; // node id
        w.string()?; // host
        w.fixed(4)?; // port
        if v >= 1 {
            w.string()?; // rack
        }
        w.no_known_tags()
    })?;
    if v >= 2 {
        w.string()?; // cluster id
    }
    if v >= 1 {
        w.fixed(4)?; // controller id
    }
    w.array(4, |w| {
        w.fixed(2)?; // error code
        w.string()?; // name
        if v >= 10 {
            w.fixed(16)?; // topic id
        }
        if v >= 1 {
            w.fixed(1)?; // is internal
        }
        w.array(10, |w| {
            w.fixed(2 + 4 + 4)?; // error, index, leader
            if v >= 7 {
                w.fixed(4)?; // leader epoch
            }
            let lists = if v >= 5 { 3 } else { 2 };
            for _ in 0..lists {
                let n = w.count(4)?;
                w.fixed(n * 4)?;
            }
            w.no_known_tags()
        })?;
        if v >= 8 {
            w.fixed(4)?; // topic authorized operations
        }
        w.no_known_tags()
    })?;
    if (8..=10).contains(&v) {
        w.fixed(4)?; // cluster authorized operations
    }
    w.no_known_tags()
}

fn api_versions(v: i16, body: &[u8]) -> Result<(), Refusal> {
    let mut w = Walk {
        b: body,
        flexible: v >= 3,
    };
    w.fixed(2)?; // error code
    w.array(6, |w| {
        w.fixed(6)?;
        w.no_known_tags()
    })?;
    if v >= 1 {
        w.fixed(4)?; // throttle time
    }
    w.tags(|tag, inner| match tag {
        // supported_features / finalized_features
        0 | 2 => {
            inner.array(5, |w| {
                w.string()?;
                w.fixed(4)?;
                w.no_known_tags()
            })?;
            Ok(true)
        }
        // finalized_features_epoch (int64), zk_migration_ready (bool)
        1 => inner.fixed(8).map(|()| true),
        3 => inner.fixed(1).map(|()| true),
        _ => Ok(false),
    })
}

fn sasl_handshake(body: &[u8]) -> Result<(), Refusal> {
    let mut w = Walk {
        b: body,
        flexible: false,
    };
    w.fixed(2)?; // error code
    w.array(2, |w| w.string())
}

fn sasl_authenticate(v: i16, body: &[u8]) -> Result<(), Refusal> {
    let mut w = Walk {
        b: body,
        flexible: v >= 2,
    };
    w.fixed(2)?; // error code
    w.string()?; // error message
    w.bytes()?; // auth bytes
    if v >= 1 {
        w.fixed(8)?; // session lifetime
    }
    w.no_known_tags()
}

fn init_producer_id(v: i16, body: &[u8]) -> Result<(), Refusal> {
    let mut w = Walk {
        b: body,
        flexible: v >= 2,
    };
    w.fixed(4 + 2 + 8 + 2)?; // throttle time, error code, producer id, epoch
    w.no_known_tags()
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use kafka_protocol::{
        messages::{
            ApiVersionsResponse, BrokerId, MetadataResponse, ProduceResponse, TopicName,
            api_versions_response::{ApiVersion, SupportedFeatureKey},
            metadata_response::{
                MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
            },
            produce_response::{
                BatchIndexAndErrorMessage, LeaderIdAndEpoch, NodeEndpoint,
                PartitionProduceResponse, TopicProduceResponse,
            },
        },
        protocol::{Encodable, StrBytes},
    };

    use super::*;

    fn enc<T: Encodable>(m: &T, v: i16) -> Vec<u8> {
        let mut b = BytesMut::new();
        m.encode(&mut b, v).unwrap();
        b.to_vec()
    }

    fn produce_resp(v: i16) -> ProduceResponse {
        let mut p = PartitionProduceResponse::default()
            .with_index(3)
            .with_base_offset(42);
        if v >= 8 {
            p = p
                .with_record_errors(vec![
                    BatchIndexAndErrorMessage::default().with_batch_index(1),
                ])
                .with_error_message(Some(StrBytes::from_static_str("boom")));
        }
        if v >= 10 {
            p = p.with_current_leader(
                LeaderIdAndEpoch::default()
                    .with_leader_id(BrokerId(2))
                    .with_leader_epoch(7),
            );
        }
        let mut r = ProduceResponse::default().with_responses(vec![
            TopicProduceResponse::default()
                .with_name(TopicName(StrBytes::from_static_str("t")))
                .with_partition_responses(vec![p.clone(), p]),
        ]);
        if v >= 10 {
            r = r.with_node_endpoints(vec![
                NodeEndpoint::default()
                    .with_node_id(BrokerId(2))
                    .with_host(StrBytes::from_static_str("h"))
                    .with_port(9092),
            ]);
        }
        r
    }

    #[test]
    fn real_encodings_pass_in_every_version() {
        for v in 3..=12 {
            check(ApiKey::Produce, v, &enc(&produce_resp(v), v))
                .unwrap_or_else(|e| panic!("produce v{v}: {e}"));
        }
        for v in 1..=12 {
            let m = MetadataResponse::default()
                .with_brokers(vec![
                    MetadataResponseBroker::default()
                        .with_node_id(BrokerId(1))
                        .with_host(StrBytes::from_static_str("h"))
                        .with_port(1),
                ])
                .with_topics(vec![
                    MetadataResponseTopic::default()
                        .with_name(Some(TopicName(StrBytes::from_static_str("t"))))
                        .with_partitions(vec![
                            MetadataResponsePartition::default()
                                .with_replica_nodes(vec![BrokerId(1), BrokerId(2)])
                                .with_isr_nodes(vec![BrokerId(1)]),
                        ]),
                ]);
            check(ApiKey::Metadata, v, &enc(&m, v))
                .unwrap_or_else(|e| panic!("metadata v{v}: {e}"));
        }
        for v in 0..=3 {
            let mut m = ApiVersionsResponse::default().with_api_keys(vec![
                ApiVersion::default().with_api_key(0).with_max_version(12),
            ]);
            if v >= 3 {
                m = m.with_supported_features(vec![
                    SupportedFeatureKey::default().with_name(StrBytes::from_static_str("f")),
                ]);
            }
            check(ApiKey::ApiVersions, v, &enc(&m, v))
                .unwrap_or_else(|e| panic!("api versions v{v}: {e}"));
        }
        for v in 0..=4 {
            let m = kafka_protocol::messages::InitProducerIdResponse::default()
                .with_producer_id(kafka_protocol::messages::ProducerId(7))
                .with_producer_epoch(3);
            check(ApiKey::InitProducerId, v, &enc(&m, v))
                .unwrap_or_else(|e| panic!("init producer id v{v}: {e}"));
        }
    }

    #[test]
    fn huge_counts_are_refused_before_any_decoder_sees_them() {
        // Produce v9 (flexible): topic array of 2^32-2 elements in 3 bytes.
        let body = [0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0];
        assert!(
            check(ApiKey::Produce, 9, &body)
                .unwrap_err()
                .contains("elements announced")
        );
        // Produce v8 (classic): i32::MAX topics.
        let body = [0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0];
        assert!(check(ApiKey::Produce, 8, &body).is_err());
        // A truncated valid body.
        let full = enc(&produce_resp(12), 12);
        for cut in [1, full.len() / 2, full.len() - 1] {
            assert!(
                check(ApiKey::Produce, 12, &full[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        // A node_endpoints tag announcing a huge array.
        let mut tagged = enc(&produce_resp(9), 9);
        tagged.pop(); // top-level tag count 0
        tagged.extend_from_slice(&[1, 0, 5, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(check(ApiKey::Produce, 10, &tagged).is_err());
        // A tag number beyond 32 bits (kafka-protocol would read tag 0).
        let body = [
            0, 0, 1, 0, 0, 0, 0, 1, 0x80, 0x80, 0x80, 0x80, 0x10, 5, 0xff, 0xff, 0xff, 0xff, 0x0f,
        ];
        assert!(
            check(ApiKey::ApiVersions, 3, &body)
                .unwrap_err()
                .contains("32 bits")
        );
        // A known tag whose value is shorter than its declared size: the rest would be read by
        // kafka-protocol as more fields.
        // (Built without node_endpoints, so the body ends in a top-level tag count of 0.)
        let mut short = enc(&produce_resp(9), 10);
        assert_eq!(short.pop(), Some(0));
        short.extend_from_slice(&[2, 0, 8, 1, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f, 5, 0]);
        assert!(
            check(ApiKey::Produce, 10, &short)
                .unwrap_err()
                .contains("declares")
        );
        // Metadata replica list claiming a million brokers.
        let mut m = enc(
            &MetadataResponse::default().with_topics(vec![
                MetadataResponseTopic::default()
                    .with_name(Some(TopicName(StrBytes::from_static_str("t"))))
                    .with_partitions(vec![MetadataResponsePartition::default()]),
            ]),
            8,
        );
        // Patch the first replica count (after throttle 4, brokers 4, cluster id 2,
        // controller 4, topics 4, error 2, name 3, internal 1, partitions 4, 10 fixed, epoch 4).
        let at = 4 + 4 + 2 + 4 + 4 + 2 + 3 + 1 + 4 + 10 + 4;
        m[at..at + 4].copy_from_slice(&1_000_000i32.to_be_bytes());
        assert!(check(ApiKey::Metadata, 8, &m).is_err());
    }

    #[test]
    fn sasl_answers_pass_and_hostile_counts_do_not() {
        use kafka_protocol::messages::{SaslAuthenticateResponse, SaslHandshakeResponse};
        let hs = SaslHandshakeResponse::default().with_mechanisms(vec![
            StrBytes::from_static_str("PLAIN"),
            StrBytes::from_static_str("SCRAM-SHA-512"),
        ]);
        for v in 0..=1 {
            check(ApiKey::SaslHandshake, v, &enc(&hs, v)).unwrap();
        }
        let mut hostile = enc(&hs, 1);
        hostile[2..6].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(check(ApiKey::SaslHandshake, 1, &hostile).is_err());
        let auth = SaslAuthenticateResponse::default()
            .with_error_message(Some(StrBytes::from_static_str("no")))
            .with_auth_bytes(bytes::Bytes::from_static(b"r=abc,s=c2FsdA==,i=4096"));
        for v in 0..=2 {
            let body = enc(&auth, v);
            check(ApiKey::SaslAuthenticate, v, &body).unwrap();
            assert!(check(ApiKey::SaslAuthenticate, v, &body[..body.len() - 3]).is_err());
        }
        assert!(
            check(ApiKey::Fetch, 4, &[]).is_err(),
            "unknown APIs are refused"
        );
    }
}
