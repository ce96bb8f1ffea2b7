//! The order of a stream epoch: a round-robin interleave of shards and a
//! shuffle buffer. Both depend only on the shard lengths and on the random
//! generator, never on the items, so the same code orders the real items (in
//! `stream_epoch`) and replays the order on item ids alone
//! ([`StreamDataset::order`](crate::StreamDataset::order)).

use crate::rng::{below, ChaCha8Rng};

/// Whose turn it is among `n` slots read round-robin: slot 0, 1, ..., n - 1,
/// 0, 1, ..., skipping slots already finished. A slot is finished by
/// [`finish_current`](Self::finish_current) on its turn.
///
/// Restricted to any subset of the slots, the sequence of turns is the
/// round-robin over that subset; this is what lets worker threads each follow
/// the turns of their own slots and still produce them in the consumer's order.
#[derive(Debug)]
pub(crate) struct RoundRobin {
    active: Vec<usize>,
    at: usize,
}

impl RoundRobin {
    /// Slots `0..n`, slot 0 first.
    pub(crate) fn new(n: usize) -> Self {
        Self {
            active: (0..n).collect(),
            at: 0,
        }
    }

    /// The slot whose turn it is, or `None` once every slot is finished.
    pub(crate) fn current(&self) -> Option<usize> {
        self.active.get(self.at).copied()
    }

    /// The current slot took its turn and stays in the rotation.
    pub(crate) fn advance(&mut self) {
        self.at += 1;
        if self.at >= self.active.len() {
            self.at = 0;
        }
    }

    /// The current slot is exhausted: it leaves the rotation, and the turn
    /// passes to the next slot.
    pub(crate) fn finish_current(&mut self) {
        self.active.remove(self.at);
        if self.at >= self.active.len() {
            self.at = 0;
        }
    }
}

/// A shuffle buffer of `capacity` items (torchdata's `Shuffler`): the first
/// `capacity` inputs fill it; after that, each input replaces a uniformly
/// chosen buffered item, which is emitted; once the input ends, the buffer is
/// drained in uniformly random order. Without a generator it passes items
/// straight through.
///
/// torchdata drains with `list.pop(idx)`; this drains with `swap_remove(idx)`,
/// which is O(1) and just as uniform (the generators differ anyway, so the
/// orders are not torchdata's).
#[derive(Debug)]
pub(crate) struct ShuffleBuffer<T> {
    items: Vec<T>,
    capacity: usize,
    rng: Option<ChaCha8Rng>,
}

impl<T> ShuffleBuffer<T> {
    /// A buffer of `capacity` (>= 1) items drawing from `rng`; `None` passes through.
    pub(crate) fn new(capacity: usize, rng: Option<ChaCha8Rng>) -> Self {
        let capacity = capacity.max(1);
        let reserve = if rng.is_some() { capacity } else { 0 };
        Self {
            items: Vec::with_capacity(reserve.min(1 << 16)),
            capacity,
            rng,
        }
    }

    /// Offers the next input; returns the item to emit now, if any.
    pub(crate) fn push(&mut self, item: T) -> Option<T> {
        let Some(rng) = &mut self.rng else {
            return Some(item);
        };
        if self.items.len() < self.capacity {
            self.items.push(item);
            return None;
        }
        let i = below(rng, self.items.len() as u64) as usize;
        Some(std::mem::replace(&mut self.items[i], item))
    }

    /// After the last input: the next buffered item, in random order.
    pub(crate) fn drain_one(&mut self) -> Option<T> {
        if self.items.is_empty() {
            return None;
        }
        let i = match &mut self.rng {
            Some(rng) => below(rng, self.items.len() as u64) as usize,
            None => 0,
        };
        Some(self.items.swap_remove(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::derive_rng;

    #[test]
    fn round_robin_skips_finished_slots() {
        let mut rr = RoundRobin::new(3);
        let mut lens = [2usize, 0, 3];
        let mut turns = Vec::new();
        while let Some(s) = rr.current() {
            if lens[s] == 0 {
                rr.finish_current();
            } else {
                lens[s] -= 1;
                turns.push(s);
                rr.advance();
            }
        }
        assert_eq!(turns, vec![0, 2, 0, 2, 2]);
    }

    #[test]
    fn shuffle_buffer_is_a_permutation_and_local() {
        let mut buf = ShuffleBuffer::new(4, Some(derive_rng(1, 2, 3)));
        let mut out: Vec<usize> = (0..100).filter_map(|i| buf.push(i)).collect();
        // Nothing is emitted before the buffer is full, and an item leaves at
        // the earliest when the buffer has been filled behind it.
        assert_eq!(out.len(), 96);
        for (pos, &item) in out.iter().enumerate() {
            assert!(item <= pos + 4, "item {item} emitted at {pos}");
        }
        while let Some(i) = buf.drain_one() {
            out.push(i);
        }
        let mut sorted = out.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(out, (0..100).collect::<Vec<_>>());

        let mut plain = ShuffleBuffer::new(4, None);
        assert_eq!(plain.push(7), Some(7));
        assert_eq!(plain.drain_one(), None);
    }
}
