//! A virtio-blk request as a guest may post it: an arbitrary descriptor chain (addresses,
//! lengths, write flags), arbitrary header and segment bytes, arbitrary sector ranges.
//! Nothing panics; a chain that parses is split into header, data and status so that every
//! byte of the chain lands in exactly one part, in order, with the header exactly 16 bytes
//! and the status the chain's last writable byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_vhost::request::{
    byte_range, Desc, Header, Layout, Piece, Segment, HEADER_LEN, SECTOR, SEGMENT_LEN,
};

/// Bytes of input per descriptor: address (8), length (4), flags (1).
const DESC_BYTES: usize = 13;

/// Contiguous address ranges, with touching neighbours of the same direction merged, so
/// that a descriptor split into pieces compares equal to the descriptor.
fn merged(ranges: impl IntoIterator<Item = (u64, u64, bool)>) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for (start, end, w) in ranges {
        if start == end {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.1 == start && last.2 == w => last.1 = end,
            _ => out.push((start, end, w)),
        }
    }
    out
}

fn ranges(p: &[Piece], w: bool) -> impl Iterator<Item = (u64, u64, bool)> + '_ {
    p.iter().map(move |p| {
        assert!(p.len > 0, "no empty piece");
        (p.addr, p.addr + u64::from(p.len), w)
    })
}

fuzz_target!(|data: &[u8]| {
    let (fixed, chain) = data.split_at(data.len().min(HEADER_LEN + SEGMENT_LEN + 24));
    let mut fixed = fixed.to_vec();
    fixed.resize(HEADER_LEN + SEGMENT_LEN + 24, 0);

    let _ = Header::decode(fixed[..HEADER_LEN].try_into().unwrap());
    let seg = Segment::decode(fixed[HEADER_LEN..HEADER_LEN + SEGMENT_LEN].try_into().unwrap());
    let _ = seg.unmap();
    let word = |i: usize| {
        let at = HEADER_LEN + SEGMENT_LEN + 8 * i;
        u64::from_le_bytes(fixed[at..at + 8].try_into().unwrap())
    };
    let (sector, len, capacity) = (word(0), word(1), word(2));
    if let Some(off) = byte_range(sector, len, capacity) {
        assert_eq!(off, sector * SECTOR);
        assert!(off + len <= capacity && len % SECTOR == 0);
    }

    let descs: Vec<Desc> = chain
        .chunks_exact(DESC_BYTES)
        .map(|d| Desc {
            addr: u64::from_le_bytes(d[..8].try_into().unwrap()),
            len: u32::from_le_bytes(d[8..12].try_into().unwrap()),
            writable: d[12] & 1 != 0,
        })
        .collect();
    let Ok(layout) = Layout::parse(descs.iter().copied()) else {
        return;
    };
    let header: u64 = layout.header().iter().map(|p| u64::from(p.len)).sum();
    assert_eq!(header, HEADER_LEN as u64);
    let total: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
    assert_eq!(
        header + layout.readable_len() + layout.writable_len() + 1,
        total,
        "every byte of the chain is in one part"
    );
    let want = merged(
        descs
            .iter()
            .map(|d| (d.addr, d.addr + u64::from(d.len), d.writable)),
    );
    let got = merged(
        ranges(layout.header(), false)
            .chain(ranges(layout.readable(), false))
            .chain(ranges(layout.writable(), true))
            .chain([(layout.status(), layout.status() + 1, true)]),
    );
    assert_eq!(got, want, "the parts are the chain, in order");
});
