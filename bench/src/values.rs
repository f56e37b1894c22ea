//! The record values the workers send (`--values`): what a codec gets to compress.

use bytes::Bytes;
use clap::ValueEnum;
use rand::{Rng, SeedableRng, rngs::StdRng};

/// What record values hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ValueKind {
    /// Every value is `-s` bytes of `x` (the measurements before `--values` existed). Any codec
    /// shrinks these to almost nothing, so compression figures need another kind.
    Repeated,
    /// JSON-like event lines: field names and words from a small vocabulary, ids and numbers
    /// that vary, no two values alike; about what application events compress to.
    Text,
    /// Random bytes: incompressible.
    Random,
}

/// Distinct values the text and random kinds draw from: enough that the records of one batch
/// (at most a few thousand) rarely repeat.
const POOL: usize = 4096;

/// Values of one kind, each `-s` bytes; cheap to clone.
#[derive(Debug, Clone)]
pub struct Values(std::sync::Arc<Vec<Bytes>>);

impl Values {
    /// The values of `kind`, `size` bytes each, from a fixed seed (runs send the same bytes).
    pub fn new(kind: ValueKind, size: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
        let pool = match kind {
            ValueKind::Repeated => vec![Bytes::from(vec![b'x'; size])],
            ValueKind::Random => (0..POOL)
                .map(|_| Bytes::from((0..size).map(|_| rng.random::<u8>()).collect::<Vec<u8>>()))
                .collect(),
            ValueKind::Text => (0..POOL)
                .map(|_| Bytes::from(text(&mut rng, size)))
                .collect(),
        };
        Self(std::sync::Arc::new(pool))
    }

    /// The value of the `k`-th record sent.
    pub fn get(&self, k: u64) -> Bytes {
        self.0[(k % self.0.len() as u64) as usize].clone()
    }
}

const WORDS: [&str; 24] = [
    "checkout",
    "payment",
    "cart",
    "login",
    "search",
    "order",
    "shipped",
    "refund",
    "user",
    "session",
    "browser",
    "mobile",
    "accepted",
    "declined",
    "pending",
    "eu-west",
    "us-east",
    "premium",
    "standard",
    "retry",
    "timeout",
    "success",
    "warehouse",
    "invoice",
];

/// One JSON-like event line of exactly `size` bytes.
fn text(rng: &mut StdRng, size: usize) -> Vec<u8> {
    let mut pick = || WORDS[rng.random_range(0..WORDS.len())];
    let (event, status, region) = (pick(), pick(), pick());
    let mut s = format!(
        "{{\"event\":\"{}\",\"status\":\"{}\",\"region\":\"{}\",\"user\":{},\"order\":\"{:016x}\",\
         \"amount\":{}.{:02},\"ts\":{},\"note\":\"",
        event,
        status,
        region,
        rng.random_range(0..1_000_000),
        rng.random::<u64>(),
        rng.random_range(0..10_000),
        rng.random_range(0..100),
        1_764_000_000_000u64 + rng.random_range(0..100_000_000),
    );
    while s.len() < size {
        let w = WORDS[rng.random_range(0..WORDS.len())];
        s.push_str(w);
        s.push(' ');
    }
    let mut b = s.into_bytes();
    b.truncate(size);
    b
}
