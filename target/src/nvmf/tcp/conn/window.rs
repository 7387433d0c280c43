//! The receive window: bytes read from the socket and not yet parsed, in a DMA buffer whose
//! in-capsule data a command may borrow instead of having it copied out.
//!
//! A 4 KiB write arrives as one capsule PDU with its data inline; copying that data out of
//! the window into a buffer of its own was an eighth of what such a write cost the reactor.
//! So the window is a [`BufView`]: [`RxWindow::lend`] splits the data's bytes off as a view of
//! their own, which the command hands to its bdev, and the window goes on behind them. The
//! buffer goes back to the pool when the window and every lent view have let go of it, so a
//! write held long by its bdev keeps at most the one window buffer it came in alive.
//!
//! A window that never lent is reused in place (unread bytes moved to its front); one that
//! lent is replaced by a fresh buffer once too little room is left behind the lent bytes.

use dma::{BufView, DmaError};

/// One window buffer: room for many small PDUs per read.
const WINDOW_LEN: usize = 128 << 10;
/// A window that has lent is replaced when less room than this is left to read into, so
/// each read still brings a good batch of PDUs.
const MIN_ROOM: usize = 16 << 10;

#[derive(Default)]
pub(super) struct RxWindow {
    /// `None` while the connection is idle: an idle connection holds no buffer.
    buf: Option<BufView>,
    /// First byte not yet parsed.
    pos: usize,
    /// End of the bytes read.
    len: usize,
    /// Bytes parsed past the end of those read (a PDU's padding not yet arrived): the next
    /// ones to arrive are skipped.
    skip: usize,
}

impl RxWindow {
    /// The bytes read and not yet parsed.
    pub(super) fn avail(&self) -> &[u8] {
        match &self.buf {
            Some(b) => &b[self.pos..self.len],
            None => &[],
        }
    }

    pub(super) fn unparsed(&self) -> usize {
        self.len - self.pos
    }

    /// Marks the next `n` bytes as parsed, including any not yet read.
    pub(super) fn consume(&mut self, n: usize) {
        let here = n.min(self.unparsed());
        self.pos += here;
        self.skip += n - here;
    }

    /// Room to read into behind the unparsed bytes, at least `need` bytes counted from the
    /// first unparsed one. Takes a buffer from the pool when the window has none or has
    /// lent too much of its own.
    pub(super) fn room(&mut self, need: usize) -> Result<&mut [u8], DmaError> {
        if self.pos == self.len {
            self.pos = 0;
            self.len = 0;
        }
        let cap = self.buf.as_ref().map_or(0, |b| b.len());
        let short = cap - self.pos < need;
        let whole = self.buf.as_ref().is_some_and(|b| b.is_whole());
        if whole && short {
            let (pos, len) = (self.pos, self.len);
            self.bytes_mut().copy_within(pos..len, 0);
            self.len -= self.pos;
            self.pos = 0;
        } else if !whole && (short || cap - self.len < MIN_ROOM) {
            let mut fresh = BufView::new(WINDOW_LEN.max(need))?;
            let unparsed = self.avail();
            if let Some(f) = fresh.bytes_mut() {
                f[..unparsed.len()].copy_from_slice(unparsed);
            }
            self.len = unparsed.len();
            self.pos = 0;
            // The old buffer goes back to the pool when the last view lent from it does.
            self.buf = Some(fresh);
        }
        let len = self.len;
        Ok(&mut self.bytes_mut()[len..])
    }

    /// `n` bytes were read into the start of [`room`](Self::room).
    pub(super) fn filled(&mut self, n: usize) {
        let cap = self.buf.as_ref().map_or(0, |b| b.len());
        self.len = (self.len + n).min(cap);
        let skipped = self.skip.min(self.unparsed());
        self.pos += skipped;
        self.skip -= skipped;
    }

    /// The next `n` unparsed bytes as a view of their own, parsed from now on; `None` when
    /// fewer than `n` have arrived.
    pub(super) fn lend(&mut self, n: usize) -> Option<BufView> {
        if n > self.unparsed() {
            return None;
        }
        let buf = self.buf.as_mut()?;
        // The parsed bytes before the data leave the window; the data leaves as its own view.
        buf.advance(self.pos);
        let lent = buf.split_to(n)?;
        self.len -= self.pos + n;
        self.pos = 0;
        Some(lent)
    }

    /// Lets the buffer go while nothing unparsed is in it.
    pub(super) fn release_if_empty(&mut self) {
        if self.pos == self.len {
            self.buf = None;
            self.pos = 0;
            self.len = 0;
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // The window's view is never shared: `lend` splits bytes off it, which leaves both
        // sides writable, and nothing else takes a view of it.
        self.buf
            .as_mut()
            .and_then(|b| b.bytes_mut())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(w: &mut RxWindow, bytes: &[u8]) {
        let room = w.room(bytes.len()).unwrap();
        room[..bytes.len()].copy_from_slice(bytes);
        w.filled(bytes.len());
    }

    #[test]
    fn lent_bytes_stay_put_while_the_window_reads_on() {
        let mut w = RxWindow::default();
        fill(&mut w, b"hdr1DATA1hdr2");
        w.consume(4);
        let lent = w.lend(5).unwrap();
        assert_eq!(&lent[..], b"DATA1");
        assert_eq!(w.avail(), b"hdr2");
        w.consume(4);
        // Reading on, past the lent bytes' buffer into a fresh one, never touches them.
        for i in 0..40u8 {
            fill(&mut w, &[i; 8 << 10]);
            assert_eq!(w.avail(), &[i; 8 << 10][..]);
            w.consume(8 << 10);
        }
        assert_eq!(&lent[..], b"DATA1");
        assert!(lent.is_writable());
    }

    #[test]
    fn unparsed_bytes_survive_a_move_to_a_fresh_buffer() {
        let mut w = RxWindow::default();
        let f = WINDOW_LEN - 1000;
        fill(&mut w, &vec![7; f]);
        w.consume(100);
        let _lent = w.lend(f - 200).unwrap();
        // 100 bytes left unparsed and under MIN_ROOM behind them: the next read moves them.
        let at = w.avail().as_ptr() as usize;
        assert!(w.room(1).unwrap().len() >= MIN_ROOM);
        assert_ne!(w.avail().as_ptr() as usize, at);
        assert_eq!(w.avail(), &[7; 100][..]);
    }

    #[test]
    fn a_window_that_never_lent_reuses_its_buffer() {
        let mut w = RxWindow::default();
        fill(&mut w, &[1; WINDOW_LEN - 10]);
        w.consume(WINDOW_LEN - 20);
        let at = w.avail().as_ptr() as usize;
        fill(&mut w, &[2; 30]);
        assert_eq!(w.avail().len(), 40);
        assert_ne!(w.avail().as_ptr() as usize, at, "moved to the front");
        assert_eq!(&w.avail()[..10], &[1; 10]);
        assert_eq!(&w.avail()[10..], &[2; 30]);
    }

    #[test]
    fn bytes_parsed_before_they_arrive_are_skipped_when_they_do() {
        let mut w = RxWindow::default();
        fill(&mut w, b"ab");
        w.consume(5);
        assert_eq!(w.avail(), b"");
        fill(&mut w, b"cdeFG");
        assert_eq!(w.avail(), b"FG");
    }

    #[test]
    fn lending_more_than_arrived_lends_nothing() {
        let mut w = RxWindow::default();
        fill(&mut w, b"abc");
        assert!(w.lend(4).is_none());
        assert_eq!(w.avail(), b"abc");
        w.consume(3);
        w.release_if_empty();
        assert_eq!(w.avail(), b"");
        assert_eq!(w.room(1).unwrap().len(), WINDOW_LEN);
    }
}
