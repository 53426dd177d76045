//! The virtio-blk request format, without I/O: where the parts of a request lie in a
//! descriptor chain, and what its header and segments say.
//!
//! A virtio-blk request is one descriptor chain (VIRTIO 1.2, 5.2.6): device-readable bytes
//! first (a 16-byte header `{type: le32, reserved: le32, sector: le64}`, then the data of a
//! write or the segments of a discard), then device-writable bytes (the data of a read or of
//! `GET_ID`), and the last writable byte is the status the device sets. With
//! `VIRTIO_F_VERSION_1` the driver may split these parts over descriptors any way it likes
//! ("any layout"), so [`Layout::parse`] works in bytes, not descriptors.
//!
//! Everything here comes from the guest and is untrusted: parsing refuses (never panics on)
//! overflowing addresses, readable descriptors after writable ones, short headers and
//! missing status bytes. It allocates one vector, bounded by the chain length the queue
//! already bounds.

use std::ops::Range;

use virtio_bindings::virtio_blk as vb;

/// Bytes of the request header.
pub const HEADER_LEN: usize = 16;
/// Bytes of one discard or write-zeroes segment.
pub const SEGMENT_LEN: usize = 16;
/// Bytes of a sector, the unit of virtio-blk addresses whatever the block size.
pub const SECTOR: u64 = 512;
/// Bytes of the device ID returned by `GET_ID`.
pub const ID_LEN: usize = vb::VIRTIO_BLK_ID_BYTES as usize;

/// One descriptor of a chain, as the driver posted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device may write it (`VIRTQ_DESC_F_WRITE`).
    pub writable: bool,
}

/// A range of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes (never 0).
    pub len: u32,
}

/// Why a chain is not a virtio-blk request. Such a chain cannot even be answered with a
/// status when it has no writable byte; the device returns it with nothing written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// A descriptor's address plus length overflows 64 bits.
    #[error("descriptor at {addr:#x} of {len} bytes wraps around the address space")]
    Wraps {
        /// The descriptor's address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// Fewer than 16 readable bytes.
    #[error("request header is {0} bytes, not 16")]
    ShortHeader(usize),
    /// No writable byte for the status.
    #[error("no device-writable byte for the status")]
    NoStatus,
}

/// Where the header, the data and the status of one request lie in guest memory.
///
/// Invariant: `pieces[header]` covers exactly [`HEADER_LEN`] bytes; `pieces[readable]` are
/// the readable bytes after the header, `pieces[writable]` the writable bytes before the
/// status byte; no piece is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pieces: Vec<Piece>,
    header: Range<usize>,
    readable: Range<usize>,
    writable: Range<usize>,
    status: u64,
}

impl Layout {
    /// Splits a chain into header, readable data, writable data and status byte.
    pub fn parse(descs: impl IntoIterator<Item = Desc>) -> Result<Layout, LayoutError> {
        let descs = descs.into_iter();
        let mut pieces = Vec::with_capacity(descs.size_hint().0 + 1);
        let mut header_bytes = 0usize;
        let mut header_end = 0;
        let mut readable_end = 0;
        let mut seen_writable = false;
        for d in descs {
            if d.addr.checked_add(u64::from(d.len)).is_none() {
                return Err(LayoutError::Wraps {
                    addr: d.addr,
                    len: d.len,
                });
            }
            if d.len == 0 {
                continue;
            }
            if !d.writable {
                if seen_writable {
                    return Err(LayoutError::ReadableAfterWritable);
                }
                let mut addr = d.addr;
                let mut len = d.len;
                if header_bytes < HEADER_LEN {
                    let take = len.min((HEADER_LEN - header_bytes) as u32);
                    pieces.push(Piece { addr, len: take });
                    header_bytes += take as usize;
                    header_end = pieces.len();
                    addr += u64::from(take);
                    len -= take;
                }
                if len > 0 {
                    pieces.push(Piece { addr, len });
                }
                readable_end = pieces.len();
            } else {
                if !seen_writable {
                    seen_writable = true;
                    readable_end = pieces.len();
                }
                pieces.push(Piece {
                    addr: d.addr,
                    len: d.len,
                });
            }
        }
        if header_bytes < HEADER_LEN {
            return Err(LayoutError::ShortHeader(header_bytes));
        }
        if !seen_writable {
            return Err(LayoutError::NoStatus);
        }
        // The status is the last writable byte.
        let last = pieces.last_mut().expect("a writable piece exists");
        let status = last.addr + u64::from(last.len) - 1;
        last.len -= 1;
        if last.len == 0 {
            pieces.pop();
        }
        let end = pieces.len();
        Ok(Layout {
            pieces,
            header: 0..header_end,
            readable: header_end..readable_end,
            writable: readable_end..end,
            status,
        })
    }

    /// The pieces holding the 16-byte header.
    pub fn header(&self) -> &[Piece] {
        &self.pieces[self.header.clone()]
    }

    /// Readable bytes after the header: a write's data, a discard's segments.
    pub fn readable(&self) -> &[Piece] {
        &self.pieces[self.readable.clone()]
    }

    /// Writable bytes before the status: a read's data, `GET_ID`'s answer.
    pub fn writable(&self) -> &[Piece] {
        &self.pieces[self.writable.clone()]
    }

    /// Guest address of the status byte.
    pub fn status(&self) -> u64 {
        self.status
    }

    /// Total bytes of readable data after the header.
    pub fn readable_len(&self) -> u64 {
        total(self.readable())
    }

    /// Total bytes of writable data before the status.
    pub fn writable_len(&self) -> u64 {
        total(self.writable())
    }
}

fn total(p: &[Piece]) -> u64 {
    p.iter().map(|p| u64::from(p.len)).sum()
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `VIRTIO_BLK_T_IN`: read.
    In,
    /// `VIRTIO_BLK_T_OUT`: write.
    Out,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: the device's serial.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`.
    WriteZeroes,
    /// Anything else: answered `VIRTIO_BLK_S_UNSUPP`.
    Other(u32),
}

/// The decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The request type.
    pub kind: Kind,
    /// First sector (512 bytes) of a read or write.
    pub sector: u64,
}

impl Header {
    /// Decodes the 16 header bytes (little endian; the reserved word is ignored, as the
    /// spec asks of devices).
    pub fn decode(b: &[u8; HEADER_LEN]) -> Header {
        let t = u32::from_le_bytes(b[0..4].try_into().expect("4 bytes"));
        let kind = match t {
            vb::VIRTIO_BLK_T_IN => Kind::In,
            vb::VIRTIO_BLK_T_OUT => Kind::Out,
            vb::VIRTIO_BLK_T_FLUSH => Kind::Flush,
            vb::VIRTIO_BLK_T_GET_ID => Kind::GetId,
            vb::VIRTIO_BLK_T_DISCARD => Kind::Discard,
            vb::VIRTIO_BLK_T_WRITE_ZEROES => Kind::WriteZeroes,
            t => Kind::Other(t),
        };
        Header {
            kind,
            sector: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
        }
    }
}

/// One segment of a discard or write-zeroes request
/// (`struct virtio_blk_discard_write_zeroes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Flags; bit 0 is `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
    pub flags: u32,
}

impl Segment {
    /// Decodes 16 segment bytes.
    pub fn decode(b: &[u8; SEGMENT_LEN]) -> Segment {
        Segment {
            sector: u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
            num_sectors: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            flags: u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")),
        }
    }

    /// Whether the driver allows unmapping (write-zeroes only).
    pub fn unmap(&self) -> bool {
        self.flags & vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
    }
}

/// The status byte a request ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// `VIRTIO_BLK_S_OK`.
    Ok = vb::VIRTIO_BLK_S_OK as u8,
    /// `VIRTIO_BLK_S_IOERR`: the request was valid in form but failed or was refused
    /// (out of range, misaligned, write to a read-only export, engine error).
    IoErr = vb::VIRTIO_BLK_S_IOERR as u8,
    /// `VIRTIO_BLK_S_UNSUPP`: an unknown request type, or a flag the device does not offer.
    Unsupp = vb::VIRTIO_BLK_S_UNSUPP as u8,
}

/// The byte offset of `len` bytes at `sector`, if the range is sector-aligned in length
/// and lies within a disk of `capacity` bytes (QEMU's `virtio_blk_sect_range_ok`).
pub fn byte_range(sector: u64, len: u64, capacity: u64) -> Option<u64> {
    if len % SECTOR != 0 {
        return None;
    }
    let offset = sector.checked_mul(SECTOR)?;
    (offset.checked_add(len)? <= capacity).then_some(offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            writable: false,
        }
    }
    fn w(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            writable: true,
        }
    }
    fn p(addr: u64, len: u32) -> Piece {
        Piece { addr, len }
    }

    #[test]
    fn the_usual_three_descriptor_read() {
        let l = Layout::parse([r(0x1000, 16), w(0x2000, 4096), w(0x3000, 1)]).unwrap();
        assert_eq!(l.header(), &[p(0x1000, 16)]);
        assert!(l.readable().is_empty());
        assert_eq!(l.writable(), &[p(0x2000, 4096)]);
        assert_eq!(l.status(), 0x3000);
        assert_eq!(l.writable_len(), 4096);
    }

    #[test]
    fn any_layout_header_with_data_and_status_with_data() {
        // Header and write data in one descriptor; status at the end of a data descriptor.
        let l = Layout::parse([r(0x1000, 16 + 512), r(0x5000, 512), w(0x9000, 1)]).unwrap();
        assert_eq!(l.header(), &[p(0x1000, 16)]);
        assert_eq!(l.readable(), &[p(0x1010, 512), p(0x5000, 512)]);
        assert!(l.writable().is_empty());
        assert_eq!(l.status(), 0x9000);

        let l = Layout::parse([r(0x1000, 16), w(0x2000, 513)]).unwrap();
        assert_eq!(l.writable(), &[p(0x2000, 512)]);
        assert_eq!(l.status(), 0x2200);
    }

    #[test]
    fn a_header_split_over_descriptors() {
        let l = Layout::parse([r(0x1000, 4), r(0x2000, 0), r(0x3000, 20), w(0x4000, 1)]).unwrap();
        assert_eq!(l.header(), &[p(0x1000, 4), p(0x3000, 12)]);
        assert_eq!(l.readable(), &[p(0x300c, 8)]);
    }

    #[test]
    fn malformed_chains_are_refused() {
        assert_eq!(
            Layout::parse([r(0, 8), w(0x10, 1)]),
            Err(LayoutError::ShortHeader(8))
        );
        assert_eq!(Layout::parse([r(0, 16)]), Err(LayoutError::NoStatus));
        assert_eq!(
            Layout::parse([r(0, 16), w(0x10, 1), r(0x20, 1)]),
            Err(LayoutError::ReadableAfterWritable)
        );
        assert_eq!(
            Layout::parse([r(u64::MAX - 4, 16), w(0, 1)]),
            Err(LayoutError::Wraps {
                addr: u64::MAX - 4,
                len: 16
            })
        );
        assert_eq!(Layout::parse([]), Err(LayoutError::ShortHeader(0)));
    }

    #[test]
    fn headers_and_segments_decode_little_endian() {
        let mut b = [0u8; 16];
        b[0] = 1;
        b[4] = 0xff; // reserved: ignored
        b[8..16].copy_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(
            Header::decode(&b),
            Header {
                kind: Kind::Out,
                sector: 0x0102_0304_0506_0708
            }
        );
        b[0] = 99;
        assert_eq!(Header::decode(&b).kind, Kind::Other(99));
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&7u64.to_le_bytes());
        s[8..12].copy_from_slice(&9u32.to_le_bytes());
        s[12..16].copy_from_slice(&1u32.to_le_bytes());
        let seg = Segment::decode(&s);
        assert_eq!((seg.sector, seg.num_sectors, seg.unmap()), (7, 9, true));
    }

    #[test]
    fn ranges_follow_qemu() {
        assert_eq!(byte_range(0, 512, 1024), Some(0));
        assert_eq!(byte_range(1, 512, 1024), Some(512));
        assert_eq!(byte_range(2, 512, 1024), None);
        assert_eq!(byte_range(0, 100, 1024), None);
        assert_eq!(byte_range(u64::MAX / 2, 512, u64::MAX), None);
        assert_eq!(byte_range(2, 0, 1024), Some(1024));
    }

    proptest! {
        /// Whatever the chain, parsing either refuses it or accounts for every byte
        /// exactly once: header + readable data = readable bytes, writable data + status
        /// = writable bytes.
        #[test]
        fn parsing_accounts_for_every_byte(
            descs in proptest::collection::vec((any::<u64>(), 0u32..5000, any::<bool>()), 0..12)
        ) {
            let descs: Vec<Desc> = descs
                .into_iter()
                .map(|(addr, len, writable)| Desc { addr: addr >> 1, len, writable })
                .collect();
            if let Ok(l) = Layout::parse(descs.iter().copied()) {
                let readable: u64 = descs.iter().filter(|d| !d.writable).map(|d| u64::from(d.len)).sum();
                let writable: u64 = descs.iter().filter(|d| d.writable).map(|d| u64::from(d.len)).sum();
                prop_assert_eq!(total(l.header()), HEADER_LEN as u64);
                prop_assert_eq!(total(l.header()) + l.readable_len(), readable);
                prop_assert_eq!(l.writable_len() + 1, writable);
                prop_assert!(l.header().iter().chain(l.readable()).chain(l.writable()).all(|p| p.len > 0));
            }
        }
    }
}
