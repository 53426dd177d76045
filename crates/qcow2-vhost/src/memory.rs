//! Guest memory as the engine sees it: each mapped region of guest RAM as a
//! [`SharedRegion`], so that a request's data segments become [`IoBuf`]s the kernel reads
//! and writes directly, without a copy.

use std::sync::Arc;

use qcow2_async::io::{IoBuf, SharedRegion};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion,
};

use crate::request::Piece;

/// One mapping of guest RAM. The `Arc` keeps the mapping alive (vm-memory unmaps a region
/// when its last `Arc` goes), even after the frontend removes the region or disconnects,
/// so an I/O in flight never writes into memory that was unmapped under it.
struct GuestRam(Arc<MmapRegion>);

// SAFETY: `MmapRegion` maps its memory PROT_READ | PROT_WRITE at a fixed address and unmaps it
// only on drop, which the `Arc` we hold prevents while this value exists. Exclusive use of a
// range is the virtio contract: the driver does not touch a request's buffers until the device
// returns the request on the used ring, which this crate does only after the engine has given
// the buffers back. A driver that breaks the contract races with the device on its own memory,
// as with any virtio device; it cannot reach memory outside its regions, because every range
// is checked against the region it lies in.
unsafe impl SharedRegion for GuestRam {
    fn as_ptr(&self) -> *mut u8 {
        self.0.as_ptr()
    }
    fn len(&self) -> usize {
        self.0.size()
    }
}

/// A snapshot of the guest's memory map, with one shared region per mapping.
pub(crate) struct GuestView {
    mem: Arc<GuestMemoryMmap>,
    /// `(guest start, length, region)`, sorted by start.
    regions: Vec<(u64, u64, Arc<dyn SharedRegion>)>,
}

/// A guest range that is not (entirely) mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unmapped(pub u64);

impl GuestView {
    pub(crate) fn new(mem: Arc<GuestMemoryMmap>) -> GuestView {
        let regions = mem
            .iter()
            .map(|r| {
                let ram: Arc<dyn SharedRegion> = Arc::new(GuestRam(r.get_mmap()));
                (r.start_addr().0, r.len(), ram)
            })
            .collect();
        GuestView { mem, regions }
    }

    /// Whether this view was made from `mem`.
    pub(crate) fn is_of(&self, mem: &Arc<GuestMemoryMmap>) -> bool {
        Arc::ptr_eq(&self.mem, mem)
    }

    /// The region holding `addr`: `(its guest start, length, region)`.
    fn region(&self, addr: u64) -> Option<&(u64, u64, Arc<dyn SharedRegion>)> {
        let i = self
            .regions
            .partition_point(|r| r.0 <= addr)
            .checked_sub(1)?;
        let r = &self.regions[i];
        (addr - r.0 < r.1).then_some(r)
    }

    /// Appends buffers over the guest memory of `pieces` to `out` (a piece that spans two
    /// regions becomes two buffers).
    ///
    /// # Safety
    ///
    /// The caller must not create another buffer over the same memory while these exist:
    /// they are a request's data, returned to the driver only after the buffers are dropped.
    pub(crate) unsafe fn bufs(
        &self,
        pieces: &[Piece],
        out: &mut Vec<IoBuf>,
    ) -> Result<(), Unmapped> {
        for p in pieces {
            let mut addr = p.addr;
            let mut left = u64::from(p.len);
            while left > 0 {
                let (start, len, ram) = self.region(addr).ok_or(Unmapped(addr))?;
                let off = addr - start;
                let n = left.min(len - off);
                // Region lengths are host mapping sizes, so these fit in usize.
                let range = off as usize..(off + n) as usize;
                // SAFETY: exclusivity is the caller's promise (see above); the range lies within
                // the region, which `from_region` checks again.
                let buf =
                    unsafe { IoBuf::from_region(ram.clone(), range) }.ok_or(Unmapped(addr))?;
                out.push(buf);
                addr += n;
                left -= n;
            }
        }
        Ok(())
    }

    /// Copies guest memory of `pieces` into `buf` (which is as long as the pieces are, or
    /// shorter: then only its length is read).
    pub(crate) fn read(&self, pieces: &[Piece], buf: &mut [u8]) -> Result<(), Unmapped> {
        let mut at = 0;
        for p in pieces {
            if at == buf.len() {
                break;
            }
            let n = (p.len as usize).min(buf.len() - at);
            self.mem
                .read_slice(&mut buf[at..at + n], GuestAddress(p.addr))
                .map_err(|_| Unmapped(p.addr))?;
            at += n;
        }
        Ok(())
    }

    /// Copies `data` into the guest memory of `pieces`, as far as they reach; returns the
    /// bytes written.
    pub(crate) fn write(&self, pieces: &[Piece], data: &[u8]) -> Result<usize, Unmapped> {
        let mut at = 0;
        for p in pieces {
            if at == data.len() {
                break;
            }
            let n = (p.len as usize).min(data.len() - at);
            self.mem
                .write_slice(&data[at..at + n], GuestAddress(p.addr))
                .map_err(|_| Unmapped(p.addr))?;
            at += n;
        }
        Ok(at)
    }

    /// The underlying memory map (tests write guest memory through it).
    #[cfg(test)]
    pub(crate) fn mem_for_tests(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Sets the status byte.
    pub(crate) fn write_status(&self, addr: u64, status: u8) -> Result<(), Unmapped> {
        self.mem
            .write_slice(&[status], GuestAddress(addr))
            .map_err(|_| Unmapped(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> GuestView {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0x1000), 0x2000),
            (GuestAddress(0x3000), 0x1000),
            (GuestAddress(0x10000), 0x1000),
        ])
        .unwrap();
        GuestView::new(Arc::new(mem))
    }

    #[test]
    fn pieces_become_buffers_split_at_region_ends() {
        let v = view();
        v.mem
            .write_slice(&[7u8; 0x20], GuestAddress(0x2ff0))
            .unwrap();
        let mut out = Vec::new();
        // SAFETY: no other buffer over this memory exists in the test.
        unsafe {
            v.bufs(
                &[Piece {
                    addr: 0x2ff0,
                    len: 0x20,
                }],
                &mut out,
            )
        }
        .unwrap();
        assert_eq!(
            out.len(),
            2,
            "0x1000..0x3000 and 0x3000..0x4000 are two regions"
        );
        assert_eq!(out[0].len() + out[1].len(), 0x20);
        assert!(out.iter().all(|b| b.iter().all(|&x| x == 7)));
        // Writing through a buffer reaches guest memory.
        out[1][0] = 9;
        drop(out);
        let mut b = [0u8; 1];
        v.mem.read_slice(&mut b, GuestAddress(0x3000)).unwrap();
        assert_eq!(b, [9]);
    }

    #[test]
    fn unmapped_ranges_are_refused() {
        let v = view();
        let mut out = Vec::new();
        for (addr, len) in [
            (0x0, 1),
            (0x3ff0, 0x20),
            (0x4000, 1),
            (0x10fff, 2),
            (u64::MAX - 1, 1),
        ] {
            // SAFETY: as above.
            let r = unsafe { v.bufs(&[Piece { addr, len }], &mut out) };
            assert!(r.is_err(), "{addr:#x}+{len}");
            out.clear();
        }
        assert!(v.write_status(0x5000, 0).is_err());
        assert!(v
            .read(
                &[Piece {
                    addr: 0x4000,
                    len: 4
                }],
                &mut [0; 4]
            )
            .is_err());
    }

    #[test]
    fn reads_and_writes_follow_the_pieces() {
        let v = view();
        let pieces = [
            Piece {
                addr: 0x1000,
                len: 3,
            },
            Piece {
                addr: 0x10000,
                len: 5,
            },
        ];
        assert_eq!(v.write(&pieces, b"abcdefgh").unwrap(), 8);
        let mut back = [0u8; 8];
        v.read(&pieces, &mut back).unwrap();
        assert_eq!(&back, b"abcdefgh");
        // A longer answer is cut to the pieces; a shorter one fills a prefix.
        assert_eq!(v.write(&pieces, &[1u8; 20]).unwrap(), 8);
        assert_eq!(v.write(&pieces, b"xy").unwrap(), 2);
    }
}
