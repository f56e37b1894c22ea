//! A call's side of the idempotent producer: the batches with a producer id it has handed to
//! leaders and not yet settled (docs/design.md §3.16).

use std::{collections::HashMap, sync::Arc};

use super::idempotence::{Open, Producer, Tp};

/// The batches with a producer id one call has handed to leaders and not yet settled (see
/// [`Producer::settle`]). Dropping it settles the rest as given up: a call that ends by its
/// deadline, or is cancelled, leaves no batch counted as open.
pub(super) struct Ledger {
    producer: Arc<Producer>,
    held: HashMap<usize, (Tp, Open, Option<u64>)>,
}

impl Ledger {
    pub(super) fn new(producer: Arc<Producer>) -> Self {
        Self {
            producer,
            held: HashMap::new(),
        }
    }

    /// Item `i`'s batch (on `tp`) is in leaderlink's hands; `generation` for leaderlink's own
    /// stamps. A batch stamped anew replaces its earlier stamp, which is settled as given up.
    pub(super) fn hold(&mut self, i: usize, tp: Tp, open: Open, generation: Option<u64>) {
        if let Some((tp, open, generation)) = self.held.insert(i, (tp, open, generation)) {
            self.producer.settle(&tp, open, generation, false);
        }
    }

    pub(super) fn holds(&self, i: usize) -> bool {
        self.held.contains_key(&i)
    }

    pub(super) fn get(&self, i: usize) -> Option<(Tp, Open, Option<u64>)> {
        self.held.get(&i).cloned()
    }

    /// Item `i`'s batch, if it is held, is back from the wire (see [`Producer::off_wire`]).
    pub(super) fn off_wire(&self, i: usize) {
        if let Some((tp, open, _)) = self.held.get(&i) {
            self.producer.off_wire(tp, *open);
        }
    }

    /// Item `i` has its final answer: acknowledged or not.
    pub(super) fn settle(&mut self, i: usize, acked: bool) {
        if let Some((tp, open, generation)) = self.held.remove(&i) {
            self.producer.settle(&tp, open, generation, acked);
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        for (_, (tp, open, generation)) in self.held.drain() {
            self.producer.settle(&tp, open, generation, false);
        }
    }
}
