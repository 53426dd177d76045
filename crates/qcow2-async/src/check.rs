//! `check` and `repair`: recount every reference and compare with the refcounts on disk,
//! as `qemu-img check` does (reference §7.4).
//!
//! Repair never drops reachable guest data: leaks are fixed by lowering refcounts in place;
//! anything worse is fixed by rebuilding the refcount structures from the recount, placed
//! past everything in use and switched in with one header write (the old structures become
//! free space). COPIED flags are then made to match the refcounts.

use qcow2_format::accumulate::RefcountAccumulator;
use qcow2_format::bitmap::{decode_bitmap_table, BitmapDirectory, BitmapTableEntry};
use qcow2_format::growth::refcount_metadata_size;
use qcow2_format::l2::decode_extended;
use qcow2_format::{
    AutoclearFeatures, IncompatibleFeatures, L1Entry, L2Entry, ReftableEntry, Version,
};

use crate::error::{Error, Result};
use crate::meta::{be64, Meta};

/// What `repair` may fix (qemu-img's `-r leaks` and `-r all`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Only leaked clusters (refcount higher than the references).
    Leaks,
    /// Leaks and corruptions (refcounts too low, wrong COPIED flags, broken refcount
    /// structures).
    All,
}

/// Overall result of a check, as qemu-img's exit code reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No leaks, no corruptions.
    Clean,
    /// Leaked clusters only (harmless).
    Leaks,
    /// Corruptions found.
    Corrupt,
    /// The check could not complete.
    Error,
}

/// The counts `qemu-img check` reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckReport {
    /// Corruptions found (after repair: remaining).
    pub corruptions: u64,
    /// Leaked clusters found (after repair: remaining).
    pub leaks: u64,
    /// Internal errors (I/O, unreadable structures) that kept the check from completing.
    pub check_errors: u64,
    /// Corruptions the repair fixed.
    pub corruptions_fixed: u64,
    /// Leaks the repair fixed.
    pub leaks_fixed: u64,
    /// One past the highest byte of a cluster in use.
    pub image_end_offset: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters with data (normal or compressed) in the active image.
    pub allocated_clusters: u64,
    /// Allocated guest clusters not contiguous with the previous one in the file.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// One line per finding, in qemu-img's words where it has them.
    pub messages: Vec<String>,
}

impl CheckReport {
    /// The verdict behind qemu-img's exit codes (0 clean, 2 corrupt, 3 leaks, 1 error).
    pub fn verdict(&self) -> Verdict {
        if self.check_errors > 0 {
            Verdict::Error
        } else if self.corruptions > 0 {
            Verdict::Corrupt
        } else if self.leaks > 0 {
            Verdict::Leaks
        } else {
            Verdict::Clean
        }
    }

    /// qemu-img check's exit code for this report.
    pub fn exit_code(&self) -> i32 {
        match self.verdict() {
            Verdict::Clean => 0,
            Verdict::Error => 1,
            Verdict::Corrupt => 2,
            Verdict::Leaks => 3,
        }
    }

    fn corrupt(&mut self, msg: String) {
        self.corruptions += 1;
        self.messages.push(format!("ERROR {msg}"));
    }
}

/// A COPIED flag that disagrees with its cluster's refcount.
struct CopiedFix {
    /// Where the 8-byte entry lives.
    entry_at: u64,
    /// The raw entry with the flag corrected.
    fixed: u64,
}

/// What one pass of [`Meta::check_once`] returns: the report, the references without the
/// refcount structures, the COPIED candidates, and the incomplete snapshot entries counted.
type CheckPass = (CheckReport, RefcountAccumulator, Vec<(u64, u64, u64)>, u64);

struct Scan {
    acc: RefcountAccumulator,
    report: CheckReport,
    /// Active L1/L2 entries whose COPIED flag is to be compared with the refcount:
    /// (entry offset, raw entry, host cluster index).
    copied: Vec<(u64, u64, u64)>,
    last_data: Option<u64>,
    file_len: u64,
    cluster_size: u64,
}

impl Meta {
    /// Recounts every reference. `fix` repairs what it may, then checks again.
    pub(crate) async fn check(
        &mut self,
        virtual_size: u64,
        fix: Option<RepairMode>,
    ) -> Result<CheckReport> {
        self.writeback().await?;
        // With lazy refcounts the blocks may still be in memory only: compare what is on disk.
        self.write_blocks().await?;
        let first = self.check_once(virtual_size).await?;
        let Some(mode) = fix else {
            return Ok(first.0);
        };
        let (report, scan_without_refcounts, copied_fixes, incomplete) = first;
        let mut fixed_leaks = 0;
        let mut fixed_corruptions = 0;
        if report.check_errors > 0 {
            return Ok(report);
        }
        // Incomplete snapshot entries are fixed by rewriting the table, not the refcounts.
        let refcount_corruptions = report.corruptions - incomplete;
        if mode == RepairMode::All && refcount_corruptions > 0 {
            self.rebuild_refcounts(&scan_without_refcounts).await?;
            fixed_corruptions = refcount_corruptions;
            fixed_leaks = report.leaks;
        } else if report.leaks > 0 {
            // Lower leaked refcounts in place: the structures themselves are sound.
            let n = self.file_clusters().await?;
            let full = self
                .refcount_structures_acc(&scan_without_refcounts, n)
                .map_err(Error::format("refcount structures"))?;
            for i in 0..n.max(full.len()) {
                let on_disk = self.refcount(i).await?;
                let expected = full.get(i);
                if on_disk > expected {
                    self.set_refcount(i, expected).await?;
                    fixed_leaks += 1;
                }
            }
            self.write_blocks().await?;
            self.barrier.order().await?;
        }
        if mode == RepairMode::All || (report.corruptions == 0 && report.leaks == fixed_leaks) {
            // COPIED flags once the refcounts are right (QEMU does this for -r leaks only
            // when nothing else is left).
            let fixes = self.copied_fixes(&copied_fixes).await?;
            let l1_start = self.hdr.header.l1_table_offset;
            for f in &fixes {
                self.write(f.entry_at, &f.fixed.to_be_bytes(), "COPIED flag repair")
                    .await?;
                // The active L1 lives in memory too: a stale copy would undo the fix at the
                // next write-back (and the re-check reads it).
                if let Some(i) = f.entry_at.checked_sub(l1_start).map(|d| (d / 8) as usize) {
                    if (i as u64) < self.l1.len() && f.entry_at % 8 == l1_start % 8 {
                        self.l1.store_written(i as u64, f.fixed);
                    }
                }
            }
            fixed_corruptions += fixes.len() as u64;
            self.drop_l2_cache();
        }
        if mode == RepairMode::All && incomplete > 0 {
            // As QEMU: once the refcounts can be trusted to allocate from, rewrite the table,
            // which gives every entry the extra data a v3 image requires.
            let table = self.read_snapshot_table().await?.0;
            self.replace_snapshot_table(table).await?;
            fixed_corruptions += incomplete;
        }
        self.barrier.sync().await?;
        let mut after = self.check_once(virtual_size).await?.0;
        if after.verdict() == Verdict::Clean {
            let h = &mut self.hdr.header;
            if h.version == Version::V3
                && (h.incompatible.contains(IncompatibleFeatures::CORRUPT)
                    || h.incompatible.contains(IncompatibleFeatures::DIRTY))
            {
                h.incompatible = h
                    .incompatible
                    .without(IncompatibleFeatures::CORRUPT)
                    .without(IncompatibleFeatures::DIRTY);
                self.write_header().await?;
                self.barrier.sync().await?;
                // With lazy refcounts the next mapping change must set the bit again.
                self.marked_dirty = false;
            }
            self.corrupt = None;
            self.regions.set_corrupt(false);
        }
        after.leaks_fixed = fixed_leaks;
        after.corruptions_fixed = fixed_corruptions;
        Ok(after)
    }

    async fn file_clusters(&self) -> Result<u64> {
        let len = self
            .file
            .len()
            .await
            .map_err(Error::io("sizing the image"))?;
        Ok(len.div_ceil(self.cs()))
    }

    /// One pass: returns the report, the references without the refcount structures (for a
    /// rebuild), the COPIED candidates, and how many of the corruptions are incomplete
    /// snapshot table entries (which a rewrite of the table fixes).
    async fn check_once(&mut self, virtual_size: u64) -> Result<CheckPass> {
        let cs = self.cs();
        let bits = self.geo.cluster_bits();
        let nb = self.file_clusters().await?;
        // References far past the end of the file are corruption, not a reason to allocate
        // without bound (qemu-iotests 138).
        let bound = nb.max(1 << 16).saturating_mul(4);
        let mut s = Scan {
            acc: RefcountAccumulator::new(bits, bound),
            report: CheckReport {
                total_clusters: virtual_size.div_ceil(cs),
                ..Default::default()
            },
            copied: Vec::new(),
            last_data: None,
            file_len: self
                .file
                .len()
                .await
                .map_err(Error::io("sizing the image"))?,
            cluster_size: cs,
        };
        s.add(0, cs, "header");
        let h = self.hdr.header.clone();
        s.add(
            h.l1_table_offset,
            u64::from(h.l1_size) * 8,
            "active L1 table",
        );
        let l1 = self.l1.entries().to_vec();
        self.scan_l1(&l1, h.l1_table_offset, true, &mut s).await;
        let mut incomplete = 0;
        if h.nb_snapshots > 0 {
            match self.scan_snapshots(&mut s).await {
                Some(n) => incomplete = n,
                // As QEMU: without the snapshot table the refcounts cannot be judged (its
                // trees would all look leaked), and nothing may be repaired from that view.
                None => return Ok((s.report, s.acc, Vec::new(), 0)),
            }
        }
        if let (Some(b), true) = (
            self.hdr.bitmaps,
            h.autoclear.contains(AutoclearFeatures::BITMAPS),
        ) {
            self.scan_bitmaps(b.directory_offset, b.directory_size, b.nb_bitmaps, &mut s)
                .await;
        }
        if let Some(e) = self.hdr.encryption {
            s.add(e.offset, e.length, "encryption header");
        }
        let without_refcounts = s.acc.clone();
        let full = match self.refcount_structures_acc(&without_refcounts, nb) {
            Ok(a) => a,
            Err(e) => {
                s.report.corrupt(format!("refcount table: {e}"));
                without_refcounts.clone()
            }
        };
        for (i, e) in self.refcounts.table().to_vec().iter().enumerate() {
            if let Err(err) = ReftableEntry::decode(*e, bits) {
                s.report.corrupt(format!("refcount table entry {i}: {err}"));
            } else if *e != 0 && (*e >> bits) >= nb {
                s.report.corrupt(format!(
                    "refcount block {i} at {e:#x} is outside the image file"
                ));
            }
        }
        // Compare every cluster of the file, and anything referenced past its end.
        let mut end = 0;
        let limit = nb.max(full.len());
        let mut compare_failed = false;
        for i in 0..limit {
            let on_disk = match self.refcount(i).await {
                Ok(v) => v,
                Err(e) => {
                    if !compare_failed {
                        s.report.check_errors += 1;
                        s.report
                            .messages
                            .push(format!("ERROR reading refcounts: {e}"));
                        compare_failed = true;
                    }
                    continue;
                }
            };
            let expected = full.get(i);
            if on_disk > 0 {
                end = i + 1;
            }
            if on_disk > expected {
                s.report.leaks += 1;
                s.report.messages.push(format!(
                    "Leaked cluster {i} refcount={on_disk} reference={expected}"
                ));
            } else if on_disk < expected {
                s.report.corrupt(format!(
                    "cluster {i} refcount={on_disk} reference={expected}"
                ));
            }
        }
        s.report.image_end_offset = end * cs;
        // COPIED: only meaningful when refcounts are trustworthy for those clusters.
        let copied = std::mem::take(&mut s.copied);
        match self.copied_fixes(&copied).await {
            Ok(fixes) => {
                for _ in fixes {
                    s.report
                        .corrupt("OFLAG_COPIED flag does not match the refcount".into());
                }
            }
            // Unreadable refcounts were already counted as a check error above.
            Err(e) if compare_failed => {
                s.report
                    .messages
                    .push(format!("ERROR comparing COPIED flags: {e}"));
            }
            Err(e) => return Err(e),
        }
        let mut report = s.report;
        report.messages.dedup();
        Ok((report, without_refcounts, copied, incomplete))
    }

    /// The recount plus the refcount table and every refcount block.
    fn refcount_structures_acc(
        &self,
        base: &RefcountAccumulator,
        _nb: u64,
    ) -> std::result::Result<RefcountAccumulator, qcow2_format::Error> {
        let mut acc = base.clone();
        let h = &self.hdr.header;
        acc.add(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * self.cs(),
        )?;
        for e in self.refcounts.table() {
            if let Ok(ReftableEntry(Some(off))) = ReftableEntry::decode(*e, self.geo.cluster_bits())
            {
                acc.add(off, self.cs())?;
            }
        }
        Ok(acc)
    }

    async fn copied_fixes(&mut self, candidates: &[(u64, u64, u64)]) -> Result<Vec<CopiedFix>> {
        let mut out = Vec::new();
        for &(at, raw, cluster) in candidates {
            let rc = self.refcount(cluster).await?;
            let want = rc == 1;
            let has = raw & (1 << 63) != 0;
            if want != has {
                out.push(CopiedFix {
                    entry_at: at,
                    fixed: if want {
                        raw | 1 << 63
                    } else {
                        raw & !(1 << 63)
                    },
                });
            }
        }
        Ok(out)
    }

    async fn scan_l1(&mut self, l1: &[u64], l1_off: u64, active: bool, s: &mut Scan) {
        let cs = self.cs();
        let bits = self.geo.cluster_bits();
        let es = self.geo.l2_entry_size();
        for (i, raw) in l1.iter().enumerate() {
            let e = match L1Entry::decode(*raw, bits) {
                Ok(e) => e,
                Err(err) => {
                    s.report.corrupt(format!("L1 entry {i}: {err}"));
                    continue;
                }
            };
            let Some(l2) = e.l2_offset else { continue };
            if !s.add(l2.0, cs, "L2 table") {
                continue;
            }
            if active {
                s.copied.push((l1_off + i as u64 * 8, *raw, l2.0 >> bits));
            }
            let table = match self.read_cluster(l2.0).await {
                Ok(t) => t,
                Err(err) => {
                    s.report.check_errors += 1;
                    s.report
                        .messages
                        .push(format!("ERROR reading L2 table: {err}"));
                    continue;
                }
            };
            // QEMU's `next_contiguous_offset` starts afresh in every L2 table.
            s.last_data = None;
            for j in 0..self.geo.l2_entries() {
                let at = j * es as usize;
                let raw = be64(&table, at);
                let decoded = if self.fmt.extended_l2 {
                    decode_extended(raw, be64(&table, at + 8), self.fmt).map(|(e, _)| e)
                } else {
                    L2Entry::decode(raw, self.fmt)
                };
                let entry = match decoded {
                    Ok(e) => e,
                    Err(err) => {
                        s.report.corrupt(format!(
                            "L2 entry (L2 offset {:#x}, index {j:#x}): {err}",
                            l2.0
                        ));
                        continue;
                    }
                };
                match entry {
                    L2Entry::Normal { host, .. }
                    | L2Entry::Zero {
                        host: Some(host), ..
                    } => {
                        // QEMU counts preallocated zero clusters as allocated too, and
                        // data-file clusters even though they are not refcounted.
                        if active {
                            s.report.allocated_clusters += 1;
                            if s.last_data.is_some_and(|l| l + cs != host.0) {
                                s.report.fragmented_clusters += 1;
                            }
                            s.last_data = Some(host.0);
                        }
                        if self.fmt.external_data_file {
                            continue;
                        }
                        if s.add(host.0, cs, "data cluster") && active {
                            s.copied.push((l2.0 + at as u64, raw, host.0 >> bits));
                        }
                    }
                    L2Entry::Compressed(d) => {
                        let (start, len) = d.host_range();
                        s.add(start, len, "compressed cluster");
                        if active {
                            // QEMU counts every compressed cluster as fragmented (reads
                            // re-read shared sectors) and leaves the contiguity chain of
                            // normal clusters untouched.
                            s.report.allocated_clusters += 1;
                            s.report.compressed_clusters += 1;
                            s.report.fragmented_clusters += 1;
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Counts the snapshot table and every snapshot's tree. Returns how many entries are
    /// incomplete (each also counted as a corruption), or `None` when the table cannot be
    /// read: unreadable, or beyond QEMU's limits (too many entries, too much extra data, too
    /// big). QEMU's check fails there too, and only its `-r all` (dropping snapshots or
    /// extra data) goes on; we stop.
    async fn scan_snapshots(&mut self, s: &mut Scan) -> Option<u64> {
        let at = self.hdr.header.snapshots_offset;
        let version = self.hdr.header.version.number();
        let table = match self.read_snapshot_table().await {
            Ok((t, used)) => {
                s.add(at, used as u64, "snapshot table");
                t
            }
            Err(e) => {
                s.report.check_errors += 1;
                s.report
                    .messages
                    .push(format!("ERROR failed to read the snapshot table: {e}"));
                return None;
            }
        };
        // v3 requires every entry to carry the disk size in its extra data.
        let incomplete = table.incomplete_entries(version);
        for i in &incomplete {
            s.report
                .corrupt(format!("snapshot table entry {i} is incomplete"));
        }
        for snap in &table.entries {
            if let Err(e) = snap.validate(self.cs(), &self.limits) {
                s.report.corrupt(format!("snapshot {}: {e}", snap.id));
                continue;
            }
            let n = u64::from(snap.l1_size) * 8;
            if !s.add(snap.l1_table_offset, n, "snapshot L1 table") {
                continue;
            }
            match self.read_bytes(snap.l1_table_offset, n).await {
                Ok(b) => {
                    let l1: Vec<u64> = b.chunks_exact(8).map(|c| be64(c, 0)).collect();
                    Box::pin(self.scan_l1(&l1, snap.l1_table_offset, false, s)).await;
                }
                Err(e) => {
                    s.report.check_errors += 1;
                    s.report
                        .messages
                        .push(format!("ERROR reading snapshot L1: {e}"));
                }
            }
        }
        Some(incomplete.len() as u64)
    }

    async fn scan_bitmaps(&mut self, off: u64, size: u64, nb: u32, s: &mut Scan) {
        if !s.add(off, size, "bitmap directory") {
            return;
        }
        let dir = match self
            .read_bytes(off, size)
            .await
            .map_err(|e| e.to_string())
            .and_then(|b| BitmapDirectory::decode(&b, nb, &self.limits).map_err(|e| e.to_string()))
        {
            Ok(d) => d,
            Err(e) => {
                s.report.corrupt(format!("bitmap directory: {e}"));
                return;
            }
        };
        for bm in &dir.entries {
            let n = u64::from(bm.bitmap_table_size) * 8;
            if !s.add(bm.bitmap_table_offset, n, "bitmap table") {
                continue;
            }
            let table = match self.read_bytes(bm.bitmap_table_offset, n).await {
                Ok(b) => decode_bitmap_table(&b, bm.bitmap_table_size, self.cs(), &self.limits),
                Err(e) => {
                    s.report.check_errors += 1;
                    s.report
                        .messages
                        .push(format!("ERROR reading bitmap table: {e}"));
                    continue;
                }
            };
            match table {
                Ok(t) => {
                    for e in t {
                        if let BitmapTableEntry::Data(d) = e {
                            s.add(d, self.cs(), "bitmap data");
                        }
                    }
                }
                Err(e) => s.report.corrupt(format!("bitmap {}: {e}", bm.name)),
            }
        }
    }

    pub(crate) async fn read_bytes(&self, off: u64, len: u64) -> Result<Vec<u8>> {
        crate::meta::read_exact(&self.file, off, len).await
    }

    /// Writes fresh refcount structures describing exactly `refs` (plus themselves) past
    /// everything in use, then points the header at them. Crash safe: until the header write
    /// the old structures are intact; after it the new ones are.
    async fn rebuild_refcounts(&mut self, refs: &RefcountAccumulator) -> Result<()> {
        let cs = self.cs();
        let bits = self.geo.cluster_bits();
        let start = self.file_clusters().await?.max(refs.len());
        let (blocks, _) = refcount_metadata_size(start, bits, self.order(), true)
            .map_err(Error::format("refcount rebuild"))?;
        let per_table_cluster = cs / 8;
        let table_entries = blocks.div_ceil(per_table_cluster) * per_table_cluster;
        let table_clusters = table_entries / per_table_cluster;
        if table_entries * 8 > self.limits.max_refcount_table_bytes {
            return Err(Error::NoSpace(
                "rebuilt refcount table would be too large".into(),
            ));
        }
        let order = self.order();
        let per_block = order.entries_per_block(bits);
        let blocks_at = start * cs;
        let table_at = blocks_at + blocks * cs;
        let end = table_at + table_clusters * cs;
        let mut table = vec![0u8; (table_entries * 8) as usize];
        for b in 0..blocks {
            let mut block = vec![0u8; cs as usize];
            for k in 0..per_block {
                let c = b * per_block + k;
                let v = if c < start {
                    refs.get(c)
                } else if c < end / cs {
                    1
                } else {
                    0
                };
                if v > 0 {
                    order
                        .set(&mut block, k, v.min(order.max()))
                        .map_err(Error::format("refcount rebuild"))?;
                }
            }
            let off = blocks_at + b * cs;
            self.write(off, &block, "rebuilt refcount block").await?;
            table[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
        }
        self.write(table_at, &table, "rebuilt refcount table")
            .await?;
        self.barrier.sync().await?;
        self.hdr.header.refcount_table_offset = table_at;
        self.hdr.header.refcount_table_clusters = table_clusters as u32;
        self.write_header().await?;
        self.barrier.sync().await?;
        self.refcounts
            .replace_table(table.chunks_exact(8).map(|c| be64(c, 0)).collect());
        // The old blocks are free space now: overlap checks must know the new ones only.
        self.regions.set_refblocks(self.refcounts.block_offsets());
        self.reset_refcount_cache();
        Ok(())
    }
}

impl Scan {
    /// Counts a reference to `[off, off + len)`; false (and a corruption) when it cannot be.
    fn add(&mut self, off: u64, len: u64, what: &str) -> bool {
        // QEMU's rule: the last cluster may be partly past the end of the file, anything
        // reaching a whole cluster or more past it is corrupt (and not counted).
        let end = off.saturating_add(len);
        if len > 0 && end.saturating_sub(self.file_len) >= self.cluster_size {
            self.report.corrupt(format!(
                "counting reference for region exceeding the end of the file by one cluster \
                 or more: {what} at {off:#x} size {len:#x}"
            ));
            return false;
        }
        match self.acc.add(off, len) {
            Ok(()) => true,
            Err(e) => {
                self.report.corrupt(format!(
                    "{what} at {off:#x} is beyond the end of the image: {e}"
                ));
                false
            }
        }
    }
}
