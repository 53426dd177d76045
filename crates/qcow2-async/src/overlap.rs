//! Metadata overlap checks and the reaction to corruption (reference §7.2, §7.3).
//!
//! Before metadata is written, its target is checked against the other metadata the engine
//! knows cheaply — QEMU's default "cached" level: header, active L1, refcount table, every
//! refcount block, cached L2 tables, snapshot table and bitmap directory. Data clusters are
//! checked before guest data is written into them. A hit means the image's metadata already
//! lies (say an L2 entry points into the refcount table): the image is marked corrupt, and
//! every later write is refused, so the damage is not made worse.

use crate::error::{Error, Result};
use crate::meta::Meta;
use qcow2_format::{AutoclearFeatures, IncompatibleFeatures, Version};

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

impl Meta {
    /// The metadata `[off, off + len)` would overwrite that a write of `kind` must not.
    fn overlap_of(&self, off: u64, len: u64, kind: Kind) -> Option<&'static str> {
        let cs = self.cs();
        let h = &self.hdr.header;
        let start = off / cs * cs;
        let end = (off + len).div_ceil(cs) * cs;
        let span = end - start;
        if kind != Kind::Header && overlaps(start, span, 0, cs) {
            return Some("qcow2_header");
        }
        if !matches!(kind, Kind::L1 | Kind::TableEntry)
            && overlaps(start, span, h.l1_table_offset, u64::from(h.l1_size) * 8)
        {
            return Some("active L1 table");
        }
        if kind != Kind::RefcountTable
            && overlaps(
                start,
                span,
                h.refcount_table_offset,
                u64::from(h.refcount_table_clusters) * cs,
            )
        {
            return Some("refcount table");
        }
        if h.nb_snapshots > 0 && overlaps(start, span, h.snapshots_offset, cs) {
            return Some("snapshot table");
        }
        if let (Some(b), true) = (
            self.hdr.bitmaps,
            h.autoclear.contains(AutoclearFeatures::BITMAPS),
        ) {
            if overlaps(start, span, b.directory_offset, b.directory_size) {
                return Some("bitmap directory");
            }
        }
        let mut c = start;
        while c < end {
            if kind != Kind::RefcountBlock && self.refblock_set.contains(&c) {
                return Some("refcount block");
            }
            if !matches!(kind, Kind::L2 | Kind::TableEntry) && self.l2_cached(c) {
                return Some("active L2 table");
            }
            c += cs;
        }
        None
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
