//! Views of I/O buffers that can be shared and sliced.
//!
//! A stacked block device passes one buffer down to several devices: a mirror sends the same
//! write to every leg, a driver splits a large transfer into pieces a remote accepts. Copying
//! the data once per leg or piece would cost as much as the I/O itself, so a [`BufView`] is a
//! window on a [`DmaBuf`] that can be shared (read-only, reference-counted) or split (disjoint
//! pieces, each keeping write access).
//!
//! The one rule that keeps this sound: **two live views whose bytes overlap are both
//! read-only.** Sharing turns both the source and the copy read-only; splitting hands out
//! disjoint ranges; only a view no other view overlaps can be written. When the other views are
//! gone, [`BufView::reclaim`] makes the survivor writable (and whole) again.
//!
//! A view of a whole buffer that was never shared is the buffer itself, with no reference
//! count and no allocation, so the common single-consumer I/O pays nothing for any of this.

use crate::DmaBuf;
use std::ops::Deref;
use std::sync::Arc;

/// A window on DMA buffer memory: either a whole buffer owned alone, or a range of a buffer
/// that other views may share.
pub struct BufView {
    repr: Repr,
}

enum Repr {
    /// A whole buffer with no other view of it.
    Whole(DmaBuf),
    /// Only for a moment while a view changes shape; never seen outside these methods.
    Moving,
    /// `start..start + len` of a buffer other views may also reach. `writable` only while no
    /// other live view overlaps this range.
    Part {
        buf: Arc<DmaBuf>,
        start: usize,
        len: usize,
        writable: bool,
    },
}

impl From<DmaBuf> for BufView {
    fn from(buf: DmaBuf) -> BufView {
        BufView {
            repr: Repr::Whole(buf),
        }
    }
}

impl BufView {
    /// A new whole buffer of `len` bytes (contents unspecified).
    pub fn new(len: usize) -> Result<BufView, crate::DmaError> {
        Ok(DmaBuf::new(len)?.into())
    }

    /// A new whole buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> Result<BufView, crate::DmaError> {
        Ok(DmaBuf::zeroed(len)?.into())
    }

    pub fn len(&self) -> usize {
        match &self.repr {
            Repr::Whole(b) => b.len(),
            Repr::Part { len, .. } => *len,
            Repr::Moving => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The virtual address of the first byte.
    pub fn addr(&self) -> usize {
        match &self.repr {
            Repr::Whole(b) => b.addr(),
            Repr::Part { buf, start, .. } => buf.addr() + *start,
            Repr::Moving => 0,
        }
    }

    /// The device address of the first byte, once a device mapper is registered
    /// ([`crate::iova`]); the view's IOVAs are contiguous.
    #[inline]
    pub fn iova(&self) -> Option<u64> {
        crate::iova::iova(self.addr())
    }

    /// Whether this view may be written: it is the only view of its bytes.
    pub fn is_writable(&self) -> bool {
        match &self.repr {
            Repr::Whole(_) => true,
            Repr::Part { writable, .. } => *writable,
            Repr::Moving => false,
        }
    }

    /// Whether this is a whole buffer with no other view of it.
    pub fn is_whole(&self) -> bool {
        matches!(self.repr, Repr::Whole(_))
    }

    /// The bytes, for writing; `None` while other views share them.
    pub fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        match &mut self.repr {
            Repr::Whole(b) => Some(&mut b[..]),
            Repr::Part {
                buf,
                start,
                len,
                writable: true,
            } => {
                // SAFETY: start + len <= buf.len() (kept by split_off), the memory lives as
                // long as `buf`, and `writable` means no other live view overlaps this range,
                // so this `&mut self` borrow is the only access to these bytes.
                Some(unsafe { std::slice::from_raw_parts_mut(buf.raw_ptr().add(*start), *len) })
            }
            Repr::Part { .. } | Repr::Moving => None,
        }
    }

    /// Another view of the same bytes. Both this view and the new one become read-only until
    /// [`reclaim`](Self::reclaim) finds one of them alone again.
    pub fn share(&mut self) -> BufView {
        let p = self.make_part();
        *p.writable = false;
        BufView {
            repr: Repr::Part {
                buf: p.buf.clone(),
                start: *p.start,
                len: *p.len,
                writable: false,
            },
        }
    }

    /// Splits off the bytes from `at` on into a view of their own; this view keeps `..at`.
    /// Both keep this view's write access (their ranges do not overlap). `None`, and no change,
    /// when `at` is past the end.
    pub fn split_off(&mut self, at: usize) -> Option<BufView> {
        if at > self.len() {
            return None;
        }
        let p = self.make_part();
        let tail = BufView {
            repr: Repr::Part {
                buf: p.buf.clone(),
                start: *p.start + at,
                len: *p.len - at,
                writable: *p.writable,
            },
        };
        *p.len = at;
        Some(tail)
    }

    /// Splits off the first `at` bytes into a view of their own; this view keeps the rest.
    /// As [`split_off`](Self::split_off), from the other end.
    pub fn split_to(&mut self, at: usize) -> Option<BufView> {
        let rest = self.split_off(at)?;
        Some(std::mem::replace(self, rest))
    }

    /// Drops the first `n` bytes from this view (all of them when `n` is past the end). The
    /// bytes stay in the buffer, reachable by no view unless another already covers them.
    pub fn advance(&mut self, n: usize) {
        let p = self.make_part();
        let n = n.min(*p.len);
        *p.start += n;
        *p.len -= n;
    }

    /// Joins `next`, the piece that starts where this view ends in the same buffer, back onto
    /// this view. Hands `next` back when it is not that piece.
    pub fn unsplit(&mut self, next: BufView) -> Result<(), BufView> {
        let (
            Repr::Part {
                buf,
                start,
                len,
                writable,
            },
            Repr::Part {
                buf: nbuf,
                start: nstart,
                len: nlen,
                writable: nwritable,
            },
        ) = (&mut self.repr, &next.repr)
        else {
            return Err(next);
        };
        if !Arc::ptr_eq(buf, nbuf) || *start + *len != *nstart {
            return Err(next);
        }
        // The joined range may be written only if both halves could be.
        *writable &= *nwritable;
        *len += *nlen;
        drop(next);
        self.reclaim();
        Ok(())
    }

    /// If no other view of the buffer is left, takes back write access, and becomes the whole
    /// buffer again when this view covers all of it.
    pub fn reclaim(&mut self) {
        let Repr::Part {
            buf,
            start,
            len,
            writable,
        } = &mut self.repr
        else {
            return;
        };
        if Arc::strong_count(buf) != 1 {
            return;
        }
        // No other view exists, so none can overlap.
        *writable = true;
        if *start == 0 && *len == buf.len() {
            let Repr::Part { buf, .. } = std::mem::replace(&mut self.repr, Repr::Moving) else {
                unreachable!("matched Part above");
            };
            match Arc::try_unwrap(buf) {
                Ok(b) => self.repr = Repr::Whole(b),
                Err(buf) => {
                    let len = buf.len();
                    self.repr = Repr::Part {
                        buf,
                        start: 0,
                        len,
                        writable: false,
                    }
                }
            }
        }
    }

    /// The whole buffer, if this view is all that is left of it.
    pub fn into_dma(mut self) -> Result<DmaBuf, BufView> {
        self.reclaim();
        match self.repr {
            Repr::Whole(b) => Ok(b),
            repr => Err(BufView { repr }),
        }
    }

    /// Turns a whole buffer into a range of a shared one (one allocation, once), and lends
    /// out that range's fields.
    fn make_part(&mut self) -> PartMut<'_> {
        if let Repr::Whole(_) = self.repr {
            let Repr::Whole(b) = std::mem::replace(&mut self.repr, Repr::Moving) else {
                unreachable!("matched Whole above");
            };
            let len = b.len();
            self.repr = Repr::Part {
                buf: Arc::new(b),
                start: 0,
                len,
                writable: true,
            };
        }
        let Repr::Part {
            buf,
            start,
            len,
            writable,
        } = &mut self.repr
        else {
            // Moving never outlives the method that set it; Whole was converted above.
            unreachable!("a view is a Part once make_part returns");
        };
        PartMut {
            buf,
            start,
            len,
            writable,
        }
    }
}

/// The fields of a `Repr::Part`, lent by `make_part`.
struct PartMut<'a> {
    buf: &'a Arc<DmaBuf>,
    start: &'a mut usize,
    len: &'a mut usize,
    writable: &'a mut bool,
}

impl Deref for BufView {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.repr {
            Repr::Whole(b) => b,
            Repr::Moving => &[],
            Repr::Part {
                buf, start, len, ..
            } => {
                // SAFETY: start + len <= buf.len() and the memory lives as long as `buf`. Any
                // other view overlapping this range is read-only (the module rule), and a
                // writable view of this range is this one, which `&self` keeps from writing.
                unsafe { std::slice::from_raw_parts(buf.raw_ptr().add(*start), *len) }
            }
        }
    }
}

impl std::fmt::Debug for BufView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.repr {
            Repr::Whole(b) => write!(f, "BufView({b:?})"),
            Repr::Moving => write!(f, "BufView(moving)"),
            Repr::Part {
                buf,
                start,
                len,
                writable,
            } => write!(
                f,
                "BufView({:#x}+{start}, len {len}, {}, {} views)",
                buf.addr(),
                if *writable { "writable" } else { "read-only" },
                Arc::strong_count(buf)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(len: usize) -> BufView {
        let mut b = DmaBuf::new(len).unwrap();
        for (i, x) in b.iter_mut().enumerate() {
            *x = i as u8;
        }
        b.into()
    }

    #[test]
    fn the_front_splits_off_and_the_rest_moves_on() {
        let mut v = filled(4096);
        v.advance(100);
        assert_eq!((v.len(), v[0]), (3996, 100));
        let front = v.split_to(50).unwrap();
        assert_eq!((front.len(), front[0], front[49]), (50, 100, 149));
        assert_eq!((v.len(), v[0]), (3946, 150));
        assert!(
            front.is_writable() && v.is_writable(),
            "disjoint: both writable"
        );
        assert!(v.split_to(3947).is_none());
        v.advance(5000);
        assert!(v.is_empty());
        drop(front);
        drop(v);
    }

    #[test]
    fn a_whole_buffer_is_writable_and_comes_back_whole() {
        let mut v = filled(4096);
        assert!(v.is_whole() && v.is_writable());
        v.bytes_mut().unwrap()[0] = 0xff;
        let b = v.into_dma().unwrap();
        assert_eq!((b.len(), b[0], b[1]), (4096, 0xff, 1));
    }

    #[test]
    fn shared_views_are_read_only_until_the_others_are_gone() {
        let mut v = filled(4096);
        let iova = v.addr();
        let legs: Vec<BufView> = (0..3).map(|_| v.share()).collect();
        assert!(v.bytes_mut().is_none());
        for l in &legs {
            assert!(!l.is_writable());
            assert_eq!((l.addr(), l.len(), l[7]), (iova, 4096, 7));
        }
        let mut legs = legs;
        assert!(legs[0].bytes_mut().is_none());
        // While a leg lives, reclaiming changes nothing.
        let last = legs.pop().unwrap();
        drop(legs);
        v.reclaim();
        assert!(!v.is_writable());
        drop(last);
        v.reclaim();
        assert!(v.is_whole() && v.is_writable());
        assert_eq!(v.into_dma().unwrap().addr(), iova);
    }

    #[test]
    fn split_pieces_are_disjoint_writable_and_join_back() {
        let mut v = filled(16384);
        let iova = v.addr();
        let mut c = v.split_off(8192).unwrap();
        let d = c.split_off(4096).unwrap();
        assert_eq!((v.len(), c.len(), d.len()), (8192, 4096, 4096));
        assert_eq!((c.addr(), d.addr()), (iova + 8192, iova + 12288));
        c.bytes_mut().unwrap().fill(0xcc);
        assert_eq!(
            d[0],
            (12288 % 256) as u8,
            "a neighbour's bytes are untouched"
        );
        // Pieces join only in order and only with their neighbour.
        let d = v.unsplit(d).unwrap_err();
        c.unsplit(d).unwrap();
        v.unsplit(c).unwrap();
        let b = v.into_dma().unwrap();
        assert_eq!((b.len(), b[8192], b[8191]), (16384, 0xcc, 0xff));
    }

    #[test]
    fn a_shared_buffer_splits_into_read_only_pieces() {
        let mut v = filled(8192);
        let other = v.share();
        let mut tail = v.split_off(4096).unwrap();
        assert!(tail.bytes_mut().is_none() && v.bytes_mut().is_none());
        assert!(v.split_off(4097).is_none(), "past the end");
        v.unsplit(tail).unwrap();
        assert!(!v.is_writable(), "the shared copy still lives");
        drop(other);
        assert!(v.into_dma().is_ok());
    }

    #[test]
    fn views_of_other_buffers_do_not_join() {
        let mut a = filled(4096);
        let mut b = filled(4096);
        let a2 = a.split_off(2048).unwrap();
        let b2 = b.split_off(2048).unwrap();
        let b2 = a.unsplit(b2).unwrap_err();
        assert!(b.unsplit(b2).is_ok() && a.unsplit(a2).is_ok());
        // A whole buffer has no neighbour to take.
        let mut w = filled(512);
        assert!(w.unsplit(filled(512)).is_err());
    }

    #[test]
    fn views_move_between_threads() {
        let mut v = filled(4096);
        let leg = v.share();
        let sum = std::thread::spawn(move || leg.iter().map(|&x| x as u64).sum::<u64>())
            .join()
            .unwrap();
        assert_eq!(sum, (0..4096u64).map(|i| i % 256).sum::<u64>());
        assert!(v.into_dma().is_ok());
    }
}
