//! Owned I/O buffers.
//!
//! An [`IoBuf`] is what a backend hands to the kernel. It wraps, without copying, a
//! `Vec<u8>`, a `bytes::BytesMut`, a `bytes::Bytes` (shared, read-only: copied on the first
//! mutable access, which writes never make), memory of its own aligned for O_DIRECT, or a range
//! of a [`SharedRegion`] such as mapped guest memory. A list of them is a vectored request
//! ([`super::BlockFile::read_vectored_at`]).
//!
//! The engine hands buffers to a backend *by value* because an io_uring submission may outlive
//! the future that issued it: if the caller gives up (drops its future), the kernel may still be
//! writing into the memory. Ownership lets the backend keep the allocation alive until the
//! completion arrives. O_DIRECT additionally needs the memory itself to be aligned, which a
//! `Vec<u8>` cannot promise, hence the two representations below.

use std::alloc::{self, Layout};
use std::fmt;
use std::io;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

/// Memory that lives outside the engine and outlives every I/O on it while an `Arc` to it is
/// held: guest RAM mapped by a vhost-user backend, a shared-memory ring, a memory-mapped file.
///
/// # Safety
///
/// Implementors promise that `as_ptr()..as_ptr() + len()` stays mapped, readable and writable,
/// and at the same address, for as long as the value exists; and users of
/// [`IoBuf::from_region`] promise that, while an `IoBuf` over a range exists, nothing else
/// reads or writes that range (the virtio contract for a request's buffers: the driver does
/// not touch them until the device has put the request on the used ring).
pub unsafe trait SharedRegion: Send + Sync + 'static {
    /// Start of the region.
    fn as_ptr(&self) -> *mut u8;
    /// Length of the region in bytes.
    fn len(&self) -> usize;
    /// Whether the region is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An owned, heap-allocated byte buffer whose start is aligned to a chosen power of two.
///
/// Alignment 1 buffers are backed by a plain `Vec<u8>`, so [`IoBuf::from_vec`] and
/// [`IoBuf::into_vec`] do not copy. Larger alignments (e.g. 4096 for O_DIRECT) use their own
/// allocation. The heap address never changes while the buffer exists, even when the `IoBuf`
/// value itself is moved, which is what lets a backend hand [`IoBuf::as_mut_ptr`] to the kernel.
pub struct IoBuf {
    repr: Repr,
}

enum Repr {
    /// Alignment 1: a `Vec` whose length is the buffer length.
    Vec(Vec<u8>),
    /// Alignment > 1.
    Aligned(Aligned),
    /// A caller's `BytesMut`, kept as it is.
    BytesMut(BytesMut),
    /// A caller's `Bytes`: shared and read-only, so a mutable access first copies it into a
    /// `Vec` (reads into such a buffer work, but cost that copy).
    Shared(Bytes),
    /// `len` bytes at `start` of a shared region; exclusive by the region's contract.
    Region {
        region: Arc<dyn SharedRegion>,
        start: usize,
        len: usize,
    },
}

/// Memory from `std::alloc` with layout `(len, align)` when `len > 0`, or a dangling,
/// well-aligned pointer when `len == 0` (nothing is allocated then). Freed on drop.
struct Aligned {
    ptr: NonNull<u8>,
    len: usize,
    align: usize,
}

// SAFETY: an `Aligned` uniquely owns its allocation (like `Vec<u8>`, which is Send + Sync); the
// pointer is never shared with another value, and `&IoBuf` only gives out `&[u8]`.
unsafe impl Send for Aligned {}
// SAFETY: see `Send`; shared access is read-only through `Deref`.
unsafe impl Sync for Aligned {}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes whose address is a multiple of `align`.
    ///
    /// # Panics
    ///
    /// If `align` is not a power of two or `len` rounded up to `align` overflows `isize`
    /// (programming errors, like `Layout::from_size_align`). Aborts on allocation failure, like
    /// `Vec`.
    pub fn zeroed(len: usize, align: usize) -> IoBuf {
        assert!(
            align.is_power_of_two(),
            "IoBuf alignment must be a power of two, got {align}"
        );
        if align == 1 {
            return IoBuf {
                repr: Repr::Vec(vec![0; len]),
            };
        }
        if len == 0 {
            return IoBuf {
                repr: Repr::Aligned(Aligned {
                    ptr: dangling(align),
                    len: 0,
                    align,
                }),
            };
        }
        let layout = Layout::from_size_align(len, align)
            .unwrap_or_else(|e| panic!("IoBuf of {len} bytes aligned to {align}: {e}"));
        // SAFETY: `layout` has a non-zero size (len > 0 was checked above).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        IoBuf {
            repr: Repr::Aligned(Aligned { ptr, len, align }),
        }
    }

    /// Wraps a vector without copying; the alignment is 1.
    pub fn from_vec(vec: Vec<u8>) -> IoBuf {
        IoBuf {
            repr: Repr::Vec(vec),
        }
    }

    /// Wraps a `BytesMut` without copying.
    pub fn from_bytes_mut(bytes: BytesMut) -> IoBuf {
        IoBuf {
            repr: Repr::BytesMut(bytes),
        }
    }

    /// Wraps a `Bytes` without copying: a write hands its memory to the kernel as it is. A
    /// mutable access (a read into it) first copies it.
    pub fn from_bytes(bytes: Bytes) -> IoBuf {
        IoBuf {
            repr: Repr::Shared(bytes),
        }
    }

    /// The bytes `range` of `region`, without copying: the kernel reads or writes the region's
    /// memory directly. `None` if the range is out of bounds.
    ///
    /// # Safety
    ///
    /// Nothing else may access the range while the returned buffer exists (see
    /// [`SharedRegion`]).
    pub unsafe fn from_region(
        region: Arc<dyn SharedRegion>,
        range: std::ops::Range<usize>,
    ) -> Option<IoBuf> {
        if range.start > range.end || range.end > region.len() {
            return None;
        }
        Some(IoBuf {
            repr: Repr::Region {
                region,
                start: range.start,
                len: range.end - range.start,
            },
        })
    }

    /// Copies `data` into a new buffer aligned to `align` (see [`IoBuf::zeroed`] for panics).
    pub fn from_slice(data: &[u8], align: usize) -> IoBuf {
        if align == 1 || data.is_empty() {
            return IoBuf::from_vec(data.to_vec());
        }
        assert!(
            align.is_power_of_two(),
            "IoBuf alignment must be a power of two, got {align}"
        );
        let len = data.len();
        let layout = Layout::from_size_align(len, align)
            .unwrap_or_else(|e| panic!("IoBuf of {len} bytes aligned to {align}: {e}"));
        // Not zeroed first: every byte is written by the copy below (zero-filling a large
        // buffer it is about to overwrite was a third of a 1 MiB O_DIRECT write's CPU).
        // SAFETY: `layout` has a non-zero size (`data` is not empty).
        let raw = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        // SAFETY: `ptr` is valid for `len` bytes of writes (just allocated with this size)
        // and cannot overlap `data`, which is borrowed memory of someone else's.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.as_ptr(), len) };
        IoBuf {
            repr: Repr::Aligned(Aligned { ptr, len, align }),
        }
    }

    /// Number of bytes in the buffer.
    pub fn len(&self) -> usize {
        match &self.repr {
            Repr::Vec(v) => v.len(),
            Repr::Aligned(a) => a.len,
            Repr::BytesMut(b) => b.len(),
            Repr::Shared(b) => b.len(),
            Repr::Region { len, .. } => *len,
        }
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The alignment the buffer was created with. The actual address may happen to be more
    /// aligned; use [`IoBuf::is_aligned_to`] to check a requirement.
    pub fn alignment(&self) -> usize {
        match &self.repr {
            Repr::Aligned(a) => a.align,
            _ => 1,
        }
    }

    /// Whether the address *and* the length are multiples of `align`, i.e. whether an O_DIRECT
    /// transfer of the whole buffer is acceptable.
    pub fn is_aligned_to(&self, align: usize) -> bool {
        align <= 1 || (self.as_ptr() as usize % align == 0 && self.len() % align == 0)
    }

    /// Start of the buffer. Stays valid (and unchanged) until the buffer is dropped.
    pub fn as_ptr(&self) -> *const u8 {
        match &self.repr {
            Repr::Vec(v) => v.as_ptr(),
            Repr::Aligned(a) => a.ptr.as_ptr(),
            Repr::BytesMut(b) => b.as_ptr(),
            Repr::Shared(b) => b.as_ptr(),
            Repr::Region { region, start, .. } => region.as_ptr().wrapping_add(*start),
        }
    }

    /// Mutable start of the buffer, e.g. for the kernel to fill. Stays valid (and unchanged)
    /// until the buffer is dropped; moving the `IoBuf` does not move the bytes. A buffer made
    /// from `Bytes` is copied into memory of its own first.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.deref_mut().as_mut_ptr()
    }

    /// Converts into a vector; free for a vector, a copy otherwise.
    pub fn into_vec(self) -> Vec<u8> {
        match self.repr {
            Repr::Vec(v) => v,
            Repr::BytesMut(b) => b.into(),
            _ => self.to_vec(),
        }
    }

    /// Converts into a `BytesMut`; free for a vector or a `BytesMut` (and for a `Bytes` nobody
    /// else holds), a copy otherwise.
    pub fn into_bytes_mut(self) -> BytesMut {
        match self.repr {
            Repr::Vec(v) => BytesMut::from(Bytes::from(v)),
            Repr::BytesMut(b) => b,
            Repr::Shared(b) => b.try_into_mut().unwrap_or_else(|b| BytesMut::from(&b[..])),
            _ => BytesMut::from(&self[..]),
        }
    }

    /// Converts into a `Bytes` without copying (aligned memory and regions become the
    /// `Bytes`' owner).
    pub fn freeze(self) -> Bytes {
        match self.repr {
            Repr::Vec(v) => Bytes::from(v),
            Repr::BytesMut(b) => b.freeze(),
            Repr::Shared(b) => b,
            repr => Bytes::from_owner(IoBuf { repr }),
        }
    }
}

impl AsRef<[u8]> for IoBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl From<BytesMut> for IoBuf {
    fn from(bytes: BytesMut) -> IoBuf {
        IoBuf::from_bytes_mut(bytes)
    }
}

impl From<Bytes> for IoBuf {
    fn from(bytes: Bytes) -> IoBuf {
        IoBuf::from_bytes(bytes)
    }
}

/// A non-null pointer aligned to `align` that is never dereferenced (for empty buffers).
fn dangling(align: usize) -> NonNull<u8> {
    NonNull::new(std::ptr::null_mut::<u8>().wrapping_add(align))
        .expect("a power-of-two alignment is non-zero")
}

/// Rejects a data transfer that O_DIRECT would refuse (or, for other backends emulating an
/// alignment, that the engine should never issue), before anything reaches the kernel: an
/// `EINVAL` from deep inside a ring is much harder to attribute than this message.
pub(crate) fn check_aligned(align: usize, buf: &IoBuf, offset: u64) -> io::Result<()> {
    if align <= 1 || (offset % align as u64 == 0 && buf.is_aligned_to(align)) {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "unaligned request for a file opened with O_DIRECT: offset {offset}, length {}, \
             address {:p}, required alignment {align}",
            buf.len(),
            buf.as_ptr()
        ),
    ))
}

/// `offset + len`, or `InvalidInput` if that does not fit in a `u64`.
pub(crate) fn checked_end(offset: u64, len: u64) -> io::Result<u64> {
    offset.checked_add(len).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} overflows u64"),
        )
    })
}

impl Aligned {
    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised (zeroed at allocation) bytes owned by
        // `self`, or is dangling-but-aligned with `len == 0`, which a slice allows.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: `ptr` came from `alloc_zeroed` (or `alloc`, fully initialised by
            // `from_slice`) with exactly this size and alignment (the
            // layout was valid then, so it still is), and it is freed only here, once.
            unsafe {
                alloc::dealloc(
                    self.ptr.as_ptr(),
                    Layout::from_size_align_unchecked(self.len, self.align),
                )
            }
        }
    }
}

impl Deref for IoBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.repr {
            Repr::Vec(v) => v,
            Repr::Aligned(a) => a.as_slice(),
            Repr::BytesMut(b) => b,
            Repr::Shared(b) => b,
            Repr::Region { region, start, len } => {
                // SAFETY: `from_region` checked `start + len <= region.len()`; the region keeps
                // the memory mapped while `region` (held here) lives, and by its contract
                // nothing else accesses the range while this buffer exists.
                unsafe { std::slice::from_raw_parts(region.as_ptr().add(*start), *len) }
            }
        }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        if let Repr::Shared(b) = &self.repr {
            // Copy on write: `Bytes` may be shared with other readers.
            self.repr = Repr::Vec(b.to_vec());
        }
        match &mut self.repr {
            Repr::Vec(v) => v,
            Repr::Aligned(a) => a.as_mut_slice(),
            Repr::BytesMut(b) => b,
            Repr::Shared(_) => unreachable!("replaced by a vector above"),
            Repr::Region { region, start, len } => {
                // SAFETY: as in `deref`; `&mut self` makes this the only access through the
                // buffer, and the region's contract excludes every other one.
                unsafe { std::slice::from_raw_parts_mut(region.as_ptr().add(*start), *len) }
            }
        }
    }
}

impl Clone for IoBuf {
    /// Copies the bytes into a new buffer with the same alignment.
    fn clone(&self) -> IoBuf {
        IoBuf::from_slice(self, self.alignment())
    }
}

impl fmt::Debug for IoBuf {
    // Contents are omitted: buffers are routinely a cluster (64 KiB) or more.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len())
            .field("alignment", &self.alignment())
            .finish()
    }
}

impl From<Vec<u8>> for IoBuf {
    fn from(vec: Vec<u8>) -> IoBuf {
        IoBuf::from_vec(vec)
    }
}

impl PartialEq for IoBuf {
    /// Compares contents only, not alignment.
    fn eq(&self, other: &IoBuf) -> bool {
        **self == **other
    }
}

impl Eq for IoBuf {}

#[cfg(test)]
mod tests {
    #[test]
    fn from_slice_copies_every_byte_into_an_aligned_buffer() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        for align in [1, 512, 4096] {
            let b = IoBuf::from_slice(&data, align);
            assert_eq!(&b[..], &data[..], "align {align}");
            assert_eq!(b.as_ptr() as usize % align, 0);
        }
        assert!(IoBuf::from_slice(&[], 4096).is_empty());
    }

    use super::*;

    #[test]
    fn zeroed_is_aligned_and_zero() {
        for &align in &[1usize, 2, 512, 4096, 65536] {
            for &len in &[0usize, 1, 4095, 4096, 10_000] {
                let buf = IoBuf::zeroed(len, align);
                assert_eq!(buf.len(), len);
                assert_eq!(buf.is_empty(), len == 0);
                assert_eq!(buf.alignment(), align);
                assert_eq!(buf.as_ptr() as usize % align, 0, "len {len} align {align}");
                assert!(buf.iter().all(|&b| b == 0));
            }
        }
    }

    #[test]
    fn zero_length_buffers_work() {
        let mut buf = IoBuf::zeroed(0, 4096);
        assert!(buf.is_empty());
        assert_eq!(&buf[..], &[] as &[u8]);
        assert_eq!(&mut buf[..], &mut [] as &mut [u8]);
        assert!(buf.is_aligned_to(4096));
        assert_eq!(buf.clone().into_vec(), Vec::<u8>::new());
        assert!(IoBuf::from_vec(Vec::new()).is_empty());
    }

    #[test]
    fn vec_round_trip_is_free() {
        let v = vec![1u8, 2, 3];
        let p = v.as_ptr();
        let buf = IoBuf::from_vec(v);
        assert_eq!(buf.alignment(), 1);
        assert_eq!(buf.as_ptr(), p);
        let v = buf.into_vec();
        assert_eq!(v.as_ptr(), p);
        assert_eq!(v, [1, 2, 3]);
    }

    #[test]
    fn from_slice_copies_and_mutates() {
        let mut buf = IoBuf::from_slice(b"hello", 4096);
        assert_eq!(&buf[..], b"hello");
        buf[0] = b'j';
        assert_eq!(buf.clone().into_vec(), b"jello");
        assert_eq!(buf, IoBuf::from_vec(b"jello".to_vec()));
        assert!(
            !buf.is_aligned_to(4096),
            "length 5 is not a multiple of 4096"
        );
        assert!(IoBuf::zeroed(8192, 4096).is_aligned_to(4096));
    }

    #[test]
    fn address_survives_moves() {
        let mut buf = IoBuf::zeroed(4096, 4096);
        let p = buf.as_mut_ptr();
        let moved = Box::new(buf);
        assert_eq!(moved.as_ptr(), p as *const u8);
    }

    #[test]
    #[should_panic(expected = "power of two")]
    fn bad_alignment_panics() {
        let _ = IoBuf::zeroed(1, 3);
    }

    #[test]
    fn bytes_round_trips_do_not_copy() {
        let b = BytesMut::from(&b"guest data"[..]);
        let p = b.as_ptr();
        let mut buf = IoBuf::from(b);
        assert_eq!(buf.as_mut_ptr() as *const u8, p);
        buf[0] = b'G';
        let back = buf.into_bytes_mut();
        assert_eq!(back.as_ptr(), p);
        assert_eq!(&back[..], b"Guest data");
        let frozen = IoBuf::from(back).freeze();
        assert_eq!(frozen.as_ptr(), p);

        let shared = Bytes::from(vec![9u8; 100]);
        let p = shared.as_ptr();
        let buf = IoBuf::from(shared.clone());
        assert_eq!(
            buf.as_ptr(),
            p,
            "a write hands the caller's memory over as it is"
        );
        let mut buf = buf;
        buf[0] = 1;
        assert_ne!(buf.as_ptr(), p, "mutating a shared Bytes copies it");
        assert_eq!(shared[0], 9, "and leaves the caller's copy alone");

        let aligned = IoBuf::zeroed(8192, 4096);
        let p = aligned.as_ptr();
        let frozen = aligned.freeze();
        assert_eq!(frozen.as_ptr(), p);
        assert_eq!(frozen.len(), 8192);
        let v = IoBuf::from_vec(vec![1, 2, 3]);
        let p = v.as_ptr();
        assert_eq!(v.into_bytes_mut().as_ptr(), p);
    }

    struct Heap(Box<[u8]>, *mut u8);
    // SAFETY: the test owns the box and only touches it through IoBufs over disjoint ranges.
    unsafe impl Send for Heap {}
    // SAFETY: as above.
    unsafe impl Sync for Heap {}
    // SAFETY: the pointer is the box's, which stays put while `Heap` lives.
    unsafe impl SharedRegion for Heap {
        fn as_ptr(&self) -> *mut u8 {
            self.1
        }
        fn len(&self) -> usize {
            self.0.len()
        }
    }

    #[test]
    fn regions_are_used_in_place() {
        let mut mem = vec![0u8; 4096].into_boxed_slice();
        let ptr = mem.as_mut_ptr();
        let region: Arc<dyn SharedRegion> = Arc::new(Heap(mem, ptr));
        // SAFETY: the two ranges are disjoint and nothing else touches the region.
        let (mut a, b) = unsafe {
            (
                IoBuf::from_region(region.clone(), 0..100).unwrap(),
                IoBuf::from_region(region.clone(), 100..4096).unwrap(),
            )
        };
        assert_eq!(a.as_mut_ptr(), ptr);
        assert_eq!(b.as_ptr(), ptr.wrapping_add(100) as *const u8);
        a.fill(7);
        assert_eq!(b.len(), 3996);
        drop(a);
        // SAFETY: as above.
        let whole = unsafe { IoBuf::from_region(region.clone(), 0..4096) }.unwrap();
        assert!(whole[..100].iter().all(|&x| x == 7));
        // SAFETY: out of bounds is refused before anything is touched.
        assert!(unsafe { IoBuf::from_region(region, 4000..4097) }.is_none());
    }

    #[test]
    fn send_sync() {
        fn check<T: Send + Sync>() {}
        check::<IoBuf>();
    }
}
