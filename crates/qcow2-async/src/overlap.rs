//! Metadata overlap checks and the reaction to corruption (reference §7.2, §7.3).
//!
//! Before metadata is written, its target is checked against the other metadata the engine
//! knows cheaply — QEMU's default "cached" level: header, active L1, refcount table, every
//! refcount block, cached L2 tables, snapshot table and bitmap directory. Data clusters are
//! checked before guest data is written into them. A hit means the image's metadata already
//! lies (say an L2 entry points into the refcount table): the image is marked corrupt, and
//! every later write is refused, so the damage is not made worse.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use crate::error::{Error, Result};
use crate::meta::Meta;
use qcow2_format::{AutoclearFeatures, ImageHeader, IncompatibleFeatures, Version};

/// What kind of metadata a write puts down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Header,
    L1,
    L2,
    RefcountBlock,
    RefcountTable,
    /// COPIED-flag repairs: an entry in an L1 or L2 table.
    TableEntry,
    /// Guest data, or new structures placed in free space.
    Other,
}

impl Kind {
    pub(crate) fn of(what: &str) -> Kind {
        match what {
            "header" => Kind::Header,
            "L1 table" => Kind::L1,
            "L2 table" => Kind::L2,
            "refcount block" => Kind::RefcountBlock,
            "refcount table" | "refcount table entry" => Kind::RefcountTable,
            "COPIED flag repair" => Kind::TableEntry,
            _ => Kind::Other,
        }
    }
}

fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    alen > 0 && blen > 0 && a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

/// Where the header says metadata lies: the part of the overlap check that comes from it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HeaderRanges {
    cs: u64,
    l1: (u64, u64),
    reftable: (u64, u64),
    /// The snapshot table's first cluster, when there are snapshots.
    snapshots: Option<u64>,
    bitmap_directory: Option<(u64, u64)>,
}

impl HeaderRanges {
    pub(crate) fn of(hdr: &ImageHeader, cs: u64) -> HeaderRanges {
        let h = &hdr.header;
        HeaderRanges {
            cs,
            l1: (h.l1_table_offset, u64::from(h.l1_size) * 8),
            reftable: (
                h.refcount_table_offset,
                u64::from(h.refcount_table_clusters) * cs,
            ),
            snapshots: (h.nb_snapshots > 0).then_some(h.snapshots_offset),
            bitmap_directory: hdr
                .bitmaps
                .filter(|_| h.autoclear.contains(AutoclearFeatures::BITMAPS))
                .map(|b| (b.directory_offset, b.directory_size)),
        }
    }

    /// The metadata `[off, off + len)` would overwrite that a write of `kind` must not,
    /// given the refcount blocks and a test for cached L2 tables.
    fn overlap_of(
        &self,
        refblocks: &HashSet<u64>,
        l2_cached: impl Fn(u64) -> bool,
        off: u64,
        len: u64,
        kind: Kind,
    ) -> Option<&'static str> {
        let cs = self.cs;
        let start = off / cs * cs;
        let end = (off + len).div_ceil(cs) * cs;
        let span = end - start;
        if kind != Kind::Header && overlaps(start, span, 0, cs) {
            return Some("qcow2_header");
        }
        if !matches!(kind, Kind::L1 | Kind::TableEntry)
            && overlaps(start, span, self.l1.0, self.l1.1)
        {
            return Some("active L1 table");
        }
        if kind != Kind::RefcountTable && overlaps(start, span, self.reftable.0, self.reftable.1) {
            return Some("refcount table");
        }
        if let Some(s) = self.snapshots {
            if overlaps(start, span, s, cs) {
                return Some("snapshot table");
            }
        }
        if let Some((o, l)) = self.bitmap_directory {
            if overlaps(start, span, o, l) {
                return Some("bitmap directory");
            }
        }
        let mut c = start;
        while c < end {
            if kind != Kind::RefcountBlock && refblocks.contains(&c) {
                return Some("refcount block");
            }
            if !matches!(kind, Kind::L2 | Kind::TableEntry) && l2_cached(c) {
                return Some("active L2 table");
            }
            c += cs;
        }
        None
    }
}

/// What the overlap check of a guest data write needs, published by `Meta` so that an
/// overwrite of an allocated cluster is checked without the metadata lock: the header's
/// ranges (republished on every header write), the refcount blocks (owned here: `Meta`
/// changes the set only through [`Regions::add_refblock`] / [`Regions::set_refblocks`]),
/// and whether the image was found corrupt.
#[derive(Debug, Default)]
pub(crate) struct Regions {
    state: RwLock<(HeaderRanges, HashSet<u64>)>,
    corrupt: AtomicBool,
}

impl Regions {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, (HeaderRanges, HashSet<u64>)> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, (HeaderRanges, HashSet<u64>)> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_header(&self, ranges: HeaderRanges) {
        self.write().0 = ranges;
    }

    pub(crate) fn set_refblocks(&self, blocks: HashSet<u64>) {
        self.write().1 = blocks;
    }

    pub(crate) fn add_refblock(&self, off: u64) {
        self.write().1.insert(off);
    }

    /// Whether guest data may go into the host cluster at `host` as far as the published
    /// state tells; `false` sends the caller to `Meta`, which checks again and reports.
    pub(crate) fn data_target_ok(&self, host: u64, l2_cached: impl Fn(u64) -> bool) -> bool {
        let g = self.read();
        let cs = g.0.cs;
        g.0.overlap_of(&g.1, l2_cached, host, cs, Kind::Other)
            .is_none()
    }

    /// Set once corruption is found, or writes are halted after a failed metadata update
    /// (`Meta::halt`): every later write is refused, with the reason kept in `Meta`.
    pub(crate) fn is_corrupt(&self) -> bool {
        self.corrupt.load(Ordering::Acquire)
    }

    pub(crate) fn set_corrupt(&self, corrupt: bool) {
        self.corrupt.store(corrupt, Ordering::Release);
    }
}

impl Meta {
    /// The metadata `[off, off + len)` would overwrite that a write of `kind` must not.
    fn overlap_of(&self, off: u64, len: u64, kind: Kind) -> Option<&'static str> {
        let ranges = HeaderRanges::of(&self.hdr, self.cs());
        let g = self.regions.read();
        ranges.overlap_of(&g.1, |c| self.l2_cached(c), off, len, kind)
    }

    pub(crate) async fn overlap_check(&mut self, off: u64, len: u64, kind: Kind) -> Result<()> {
        match self.overlap_of(off, len, kind) {
            None => Ok(()),
            Some(what) => {
                let msg = format!(
                    "Preventing invalid write on metadata (overlaps with {what}) at {off:#x}"
                );
                Err(self.signal_corruption(msg).await)
            }
        }
    }

    /// Checks that guest data may be written into the host cluster at `host`.
    pub(crate) async fn check_data_target(&mut self, host: u64) -> Result<()> {
        let cs = self.cs();
        self.overlap_check(host, cs, Kind::Other).await
    }

    /// Records corruption; on a writable v3 image also sets the corrupt bit so that no
    /// program writes to it again before a repair. Returns the error to hand the caller.
    pub(crate) async fn signal_corruption(&mut self, msg: String) -> Error {
        if self.corrupt.is_none() {
            tracing::error!("qcow2: Marking image as corrupt: {msg}");
            self.corrupt = Some(msg.clone());
            self.regions.set_corrupt(true);
            let h = &mut self.hdr.header;
            if self.writable && h.version == Version::V3 {
                h.incompatible.set(IncompatibleFeatures::CORRUPT, true);
                // Best effort: the error below is what matters to the caller.
                if let Ok(bytes) = self.hdr.encode() {
                    let _ = self
                        .file
                        .write_at(crate::io::IoBuf::from_vec(bytes), 0)
                        .await;
                    let _ = self.file.flush().await;
                }
            }
        }
        Error::Corrupt(msg)
    }
}
