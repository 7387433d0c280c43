//! The bytes of in-flight data buffers the target lends to hosts, and each controller's
//! share of them.
//!
//! Like SPDK's shared buffer pool (`num_shared_buffers` × `io_unit_size`, 64 MiB by
//! default), the total is bounded; unlike a plain pool, no controller may hold more than an
//! equal share among the controllers holding any. A command that would go over waits, in
//! order, on its connection (no R2T is sent, no read is started) until buffers come back,
//! so a host that asks for too much slows itself and not its neighbours.
//!
//! A host that took the whole pool while alone keeps it until its commands end; a host that
//! arrives then must still get its share at once, not wait behind it. So a controller under
//! its share may go past the total, up to twice the total (and one holding nothing always
//! gets one command): the pool is the target's intent, twice the pool its bound on memory.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default, Debug)]
pub struct DataBudget {
    limit: AtomicU64,
    used: AtomicU64,
    /// Controllers holding any bytes.
    holders: AtomicU64,
}

impl DataBudget {
    pub fn set_limit(&self, bytes: u64) {
        self.limit.store(bytes, Ordering::Relaxed);
    }

    /// Bytes lent now, and the total (for stats).
    pub fn usage(&self) -> (u64, u64) {
        (
            self.used.load(Ordering::Relaxed),
            self.limit.load(Ordering::Relaxed),
        )
    }

    /// Lends `len` bytes to the controller whose holding is `held`, if its share and the
    /// total allow. Reactors of one controller may race here; the bound is then exceeded
    /// by at most one command per reactor, which is fine for a fairness limit.
    pub fn try_take(&self, held: &AtomicU64, len: u64) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        if limit == 0 {
            return true; // no transport yet: nothing to bound
        }
        let mine = held.load(Ordering::Relaxed);
        let holders = self.holders.load(Ordering::Relaxed) + u64::from(mine == 0);
        let share = limit / holders.max(1);
        // A controller holding nothing always gets one command, so none waits forever.
        if mine > 0 && (mine + len > share || self.used.load(Ordering::Relaxed) + len > 2 * limit) {
            return false;
        }
        self.used.fetch_add(len, Ordering::Relaxed);
        if held.fetch_add(len, Ordering::Relaxed) == 0 {
            self.holders.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    /// Takes back `len` bytes lent to the controller whose holding is `held`.
    pub fn give_back(&self, held: &AtomicU64, len: u64) {
        self.used.fetch_sub(len, Ordering::Relaxed);
        if held.fetch_sub(len, Ordering::Relaxed) == len {
            self.holders.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_shares_among_holders_and_one_command_for_a_newcomer() {
        let b = DataBudget::default();
        b.set_limit(8 << 20);
        let (greedy, modest) = (AtomicU64::new(0), AtomicU64::new(0));
        // Alone, the greedy host may take the whole pool, no more.
        let mut taken = 0;
        while b.try_take(&greedy, 1 << 20) {
            taken += 1;
        }
        assert_eq!(taken, 8);
        // A newcomer gets its half at once, past the total ...
        for _ in 0..4 {
            assert!(b.try_take(&modest, 1 << 20));
        }
        assert!(!b.try_take(&modest, 1 << 20), "its share is half");
        assert_eq!(b.usage(), (12 << 20, 8 << 20));
        // ... and the greedy one, now over its half, gets nothing until it is under it.
        for _ in 0..4 {
            b.give_back(&greedy, 1 << 20);
            assert!(!b.try_take(&greedy, 1 << 20));
        }
        b.give_back(&greedy, 1 << 20);
        assert!(b.try_take(&greedy, 1 << 20), "3 MiB of a 4 MiB share");
        assert_eq!(b.usage(), (8 << 20, 8 << 20));
        // Never past twice the total, whatever the shares.
        let third = AtomicU64::new(0);
        b.set_limit(2 << 20);
        assert!(b.try_take(&third, 1 << 20), "one command for a newcomer");
        assert!(!b.try_take(&third, 1 << 20));
        b.give_back(&third, 1 << 20);
        b.set_limit(8 << 20);
        b.give_back(&modest, 4 << 20);
        b.give_back(&greedy, 4 << 20);
        assert_eq!(b.usage(), (0, 8 << 20));
        assert_eq!(b.holders.load(Ordering::Relaxed), 0);
    }
}
