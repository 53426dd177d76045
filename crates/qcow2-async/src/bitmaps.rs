//! Persistent dirty bitmaps (reference §5) that never lie (invariant 6).
//!
//! On disk a bitmap is either *consistent* — its stored bits cover every write since it
//! was created — or flagged `in_use`, which tells every reader "these bits are stale,
//! discard them". The engine keeps that promise with one rule: **before the first write a
//! read-write handle makes, every consistent bitmap is flagged `in_use` on disk**; only a
//! clean close stores the in-memory bits and clears the flag. A crash in between leaves
//! the bitmaps flagged, never silently stale — the same protocol as QEMU's, and the on-disk
//! layout QEMU writes (directory, tables, data clusters from the metadata allocator).
//!
//! Bits are set in memory when a write, write-zeroes or discard *starts*, before any data
//! moves, so a stored bitmap is always a superset of what changed.
//!
//! Storing is copy-on-write: data clusters, tables and the directory go to fresh clusters,
//! the header switch is one sector write, and the old clusters are freed only after the new
//! header is durable. Only QEMU's open-time marking rewrites the directory in place, and it
//! does so with the autoclear bit cleared around it, so a torn directory is never trusted.

use std::ops::Range;

use qcow2_format::bitmap::{
    bitmap_data_size, bitmap_table_size, decode_bitmap_table, encode_bitmap_table, test_bit,
    BitmapDirectory, BitmapDirectoryEntry, BitmapFlags, BitmapTableEntry,
    BITMAP_TYPE_DIRTY_TRACKING, QEMU_MAX_GRANULARITY_BITS, QEMU_MIN_GRANULARITY_BITS,
};
use qcow2_format::{AutoclearFeatures, BitmapsExtension, Version};

use crate::alloc::Pool;
use crate::error::{Error, Result};
use crate::meta::Meta;

/// What [`crate::Image::bitmaps`] reports about one persistent bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BitmapInfo {
    /// Unique name.
    pub name: String,
    /// Bytes of guest disk per bit.
    pub granularity: u64,
    /// Enabled bitmaps (QEMU's `auto` flag) record every write.
    pub enabled: bool,
    /// The bitmap was found `in_use` when the image was opened: a writer did not close the
    /// image cleanly, so its bits cannot be trusted. It can only be removed (QEMU's
    /// "inconsistent" bitmaps).
    pub inconsistent: bool,
}

/// Options for [`crate::Image::add_bitmap`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct BitmapOptions {
    /// Bytes per bit, a power of two from 512 B to 2 GiB. Default as QEMU: the cluster
    /// size clamped to 4 KiB..=64 KiB.
    pub granularity: Option<u64>,
    /// Create the bitmap disabled (it records nothing until enabled).
    pub disabled: bool,
}

/// One bitmap as the engine holds it.
#[derive(Debug)]
struct Bitmap {
    name: String,
    granularity_bits: u8,
    enabled: bool,
    inconsistent: bool,
    /// The bits, LSB first (empty for inconsistent bitmaps).
    data: Vec<u8>,
    /// Where it is stored now: table `(offset, entries)` and its data clusters.
    table: Option<(u64, u32)>,
    data_clusters: Vec<u64>,
}

/// Every persistent bitmap of an image, held inside [`Meta`] so that storing them uses the
/// metadata allocator and the same barriers as all other metadata.
#[derive(Debug, Default)]
pub(crate) struct Bitmaps {
    list: Vec<Bitmap>,
    /// The directory now on disk: `(offset, bytes)`.
    directory: Option<(u64, u64)>,
    /// Every consistent bitmap is flagged `in_use` on disk, so in-memory bits may run ahead.
    marked_in_use: bool,
    /// Clusters of removed bitmaps, freed once a header without them is durable.
    orphaned: Vec<(u64, u64)>,
}

impl Bitmaps {
    /// Whether a write must set bits (some bitmap records writes).
    pub(crate) fn tracking(&self) -> bool {
        self.list.iter().any(|b| b.enabled && !b.inconsistent)
    }

    /// Whether any bitmap has bits worth storing at close.
    pub(crate) fn has_consistent(&self) -> bool {
        self.list.iter().any(|b| !b.inconsistent)
    }

    /// Whether some bitmap could not be loaded (it was left in use).
    pub(crate) fn has_inconsistent(&self) -> bool {
        self.list.iter().any(|b| b.inconsistent)
    }

    /// Follows a disk resize: bits past a new end go, new bits start clean (as QEMU's
    /// `hbitmap_truncate`).
    pub(crate) fn resize(&mut self, disk_size: u64) {
        for b in self.list.iter_mut().filter(|b| !b.inconsistent) {
            let bits = qcow2_format::bitmap::bitmap_bits(disk_size, b.granularity_bits);
            b.data.resize(bits.div_ceil(8) as usize, 0);
            if bits % 8 != 0 {
                if let Some(last) = b.data.last_mut() {
                    *last &= (1u8 << (bits % 8)) - 1;
                }
            }
        }
    }

    fn find(&self, name: &str) -> Result<usize> {
        self.list
            .iter()
            .position(|b| b.name == name)
            .ok_or_else(|| Error::InvalidArgument(format!("no bitmap named '{name}'")))
    }

    fn find_consistent(&self, name: &str) -> Result<usize> {
        let i = self.find(name)?;
        if self.list[i].inconsistent {
            return Err(Error::InvalidArgument(format!(
                "bitmap '{name}' is inconsistent (the image was not closed cleanly); it can only be removed"
            )));
        }
        Ok(i)
    }

    pub(crate) fn infos(&self) -> Vec<BitmapInfo> {
        self.list
            .iter()
            .map(|b| BitmapInfo {
                name: b.name.clone(),
                granularity: 1 << b.granularity_bits,
                enabled: b.enabled,
                inconsistent: b.inconsistent,
            })
            .collect()
    }

    /// Dirty guest byte ranges of bitmap `name` within `range`, merged and clipped.
    pub(crate) fn dirty_ranges(
        &self,
        name: &str,
        range: Range<u64>,
        disk_size: u64,
    ) -> Result<Vec<Range<u64>>> {
        let b = &self.list[self.find_consistent(name)?];
        let end = range.end.min(disk_size);
        let g = u32::from(b.granularity_bits);
        let mut out: Vec<Range<u64>> = Vec::new();
        if range.start >= end {
            return Ok(out);
        }
        let mut bit = range.start >> g;
        let last = (end - 1) >> g;
        while bit <= last {
            // Skip clean bytes quickly: the common case is a sparse bitmap.
            if bit % 8 == 0 && b.data.get((bit / 8) as usize) == Some(&0) {
                bit += 8;
                continue;
            }
            if test_bit(&b.data, bit) == Some(true) {
                let s = (bit << g).max(range.start);
                let e = ((bit + 1) << g).min(end);
                match out.last_mut() {
                    Some(r) if r.end == s => r.end = e,
                    _ => out.push(s..e),
                }
            }
            bit += 1;
        }
        Ok(out)
    }

    /// Marks `[off, off + len)` dirty in every enabled bitmap.
    pub(crate) fn set_dirty(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        for b in self
            .list
            .iter_mut()
            .filter(|b| b.enabled && !b.inconsistent)
        {
            let g = u32::from(b.granularity_bits);
            set_bits(&mut b.data, off >> g, (off + len - 1) >> g);
        }
    }
}

/// Sets bits `first..=last` (clamped to the data), whole bytes at a time in the middle.
fn set_bits(data: &mut [u8], first: u64, last: u64) {
    let nbits = data.len() as u64 * 8;
    if first >= nbits {
        return;
    }
    let last = last.min(nbits - 1);
    let mut bit = first;
    while bit <= last {
        if bit % 8 == 0 && bit + 7 <= last {
            data[(bit / 8) as usize] = 0xff;
            bit += 8;
        } else {
            data[(bit / 8) as usize] |= 1 << (bit % 8);
            bit += 1;
        }
    }
}

/// QEMU's default granularity: the cluster size clamped to 4 KiB..=64 KiB.
fn default_granularity(cluster_size: u64) -> u64 {
    cluster_size.clamp(4096, 65536)
}

impl Meta {
    /// Loads the bitmaps when the image opens. A read-write open marks every consistent
    /// bitmap `in_use` on disk the way QEMU does; an extension whose autoclear bit was
    /// cleared (a program without bitmap support wrote the image) is dropped on a
    /// read-write open. Returns whether the dropped bitmaps' clusters now leak, so that the
    /// caller reclaims them.
    pub(crate) async fn load_bitmaps(&mut self, disk_size: u64) -> Result<bool> {
        let h = &self.hdr.header;
        let bit = h.autoclear.contains(AutoclearFeatures::BITMAPS);
        let Some(ext) = self.hdr.bitmaps else {
            if bit && self.writable {
                // The bit without the extension means nothing; drop it rather than carry
                // QEMU's quirk of an empty directory at offset 0 (reference §5.4).
                self.hdr
                    .header
                    .autoclear
                    .set(AutoclearFeatures::BITMAPS, false);
                self.write_header().await?;
                self.barrier.sync().await?;
            }
            return Ok(false);
        };
        if !bit {
            tracing::warn!(
                "a program lacking bitmap support modified this image: its bitmaps are dropped"
            );
            if self.writable {
                self.hdr.bitmaps = None;
                self.write_header().await?;
                self.barrier.sync().await?;
                return Ok(true);
            }
            return Ok(false);
        }
        let cs = self.cs();
        if ext.directory_size > self.limits.max_bitmap_directory_bytes {
            return Err(Error::Format {
                context: "bitmap directory",
                source: qcow2_format::Error::LimitExceeded {
                    what: "bitmap directory size",
                    value: ext.directory_size,
                    limit: self.limits.max_bitmap_directory_bytes,
                },
            });
        }
        let bytes = self
            .read_bytes(ext.directory_offset, ext.directory_size)
            .await?;
        let dir = BitmapDirectory::decode(&bytes, ext.nb_bitmaps, &self.limits)
            .map_err(Error::format("bitmap directory"))?;
        dir.validate_qemu(cs, disk_size, &self.limits)
            .map_err(|(_, e)| Error::format("bitmap directory")(e))?;
        let mut list = Vec::with_capacity(dir.entries.len());
        for e in &dir.entries {
            let raw = self
                .read_bytes(e.bitmap_table_offset, u64::from(e.bitmap_table_size) * 8)
                .await?;
            let table = decode_bitmap_table(&raw, e.bitmap_table_size, cs, &self.limits)
                .map_err(Error::format("bitmap table"))?;
            let inconsistent = e.flags.in_use();
            let mut data = Vec::new();
            if !inconsistent {
                let size = bitmap_data_size(disk_size, e.granularity_bits);
                data = vec![0u8; size as usize];
                for (i, t) in table.iter().enumerate() {
                    let start = i as u64 * cs;
                    if start >= size {
                        break;
                    }
                    let end = (start + cs).min(size) as usize;
                    let chunk = &mut data[start as usize..end];
                    match *t {
                        BitmapTableEntry::Zeros => {}
                        BitmapTableEntry::Ones => chunk.fill(0xff),
                        BitmapTableEntry::Data(off) => {
                            let c = self.read_cluster(off).await?;
                            chunk.copy_from_slice(&c[..chunk.len()]);
                        }
                    }
                }
            } else {
                tracing::warn!(name = %e.name, "bitmap is in use (not stored cleanly): inconsistent");
            }
            list.push(Bitmap {
                name: e.name.clone(),
                granularity_bits: e.granularity_bits,
                enabled: e.flags.auto(),
                inconsistent,
                data,
                table: Some((e.bitmap_table_offset, e.bitmap_table_size)),
                data_clusters: table
                    .iter()
                    .filter_map(|t| match t {
                        BitmapTableEntry::Data(o) => Some(*o),
                        _ => None,
                    })
                    .collect(),
            });
        }
        self.bitmaps = Bitmaps {
            list,
            directory: Some((ext.directory_offset, ext.directory_size)),
            marked_in_use: false,
            orphaned: Vec::new(),
        };
        if self.writable {
            self.mark_bitmaps_in_use_in_place(&dir).await?;
        }
        Ok(false)
    }

    /// QEMU's open-time sequence: clear the autoclear bit (so a torn directory is never
    /// believed), rewrite the directory in place with `in_use` set, set the bit again —
    /// each step synced.
    async fn mark_bitmaps_in_use_in_place(&mut self, dir: &BitmapDirectory) -> Result<()> {
        if !self.bitmaps.list.iter().any(|b| !b.inconsistent) {
            self.bitmaps.marked_in_use = true;
            return Ok(());
        }
        let mut dir = dir.clone();
        for e in &mut dir.entries {
            e.flags = e.flags.with(BitmapFlags::IN_USE, true);
        }
        let bytes = dir.encode().map_err(Error::format("bitmap directory"))?;
        let (off, _) = self.bitmaps.directory.expect("loaded");
        self.hdr
            .header
            .autoclear
            .set(AutoclearFeatures::BITMAPS, false);
        self.write_header().await?;
        self.barrier.sync().await?;
        self.write(off, &bytes, "bitmap directory").await?;
        self.barrier.sync().await?;
        self.hdr
            .header
            .autoclear
            .set(AutoclearFeatures::BITMAPS, true);
        self.write_header().await?;
        self.barrier.sync().await?;
        self.bitmaps.marked_in_use = true;
        Ok(())
    }

    /// Makes sure the on-disk bitmaps say `in_use` before bits change in memory only (the
    /// first write after a clean store by another handle).
    pub(crate) async fn bitmaps_before_write(&mut self) -> Result<()> {
        if !self.bitmaps.marked_in_use && self.bitmaps.tracking() {
            self.store_bitmaps(true).await?;
        }
        Ok(())
    }

    pub(crate) fn bitmap_infos(&self) -> Vec<BitmapInfo> {
        self.bitmaps.infos()
    }

    /// Adds a bitmap, empty, as `qemu-img bitmap --add` does.
    pub(crate) async fn add_bitmap(&mut self, name: &str, o: &BitmapOptions) -> Result<()> {
        if self.hdr.header.version != Version::V3 {
            return Err(Error::unsupported(
                "persistent bitmaps",
                "Cannot store dirty bitmaps in qcow2 v2 files",
            ));
        }
        if name.is_empty() || name.len() > usize::from(self.limits.max_bitmap_name) {
            return Err(Error::InvalidArgument(format!(
                "bitmap name must be 1..={} bytes",
                self.limits.max_bitmap_name
            )));
        }
        if name.contains('\0') {
            return Err(Error::InvalidArgument("bitmap name contains NUL".into()));
        }
        if self.bitmaps.list.iter().any(|b| b.name == name) {
            return Err(Error::InvalidArgument(format!(
                "bitmap '{name}' already exists"
            )));
        }
        if self.bitmaps.list.len() as u64 >= u64::from(self.limits.max_bitmaps) {
            return Err(Error::NoSpace(format!(
                "at most {} bitmaps per image",
                self.limits.max_bitmaps
            )));
        }
        let g = o.granularity.unwrap_or(default_granularity(self.cs()));
        let min = 1u64 << QEMU_MIN_GRANULARITY_BITS;
        let max = 1u64 << QEMU_MAX_GRANULARITY_BITS;
        if !g.is_power_of_two() || !(min..=max).contains(&g) {
            return Err(Error::InvalidArgument(format!(
                "bitmap granularity {g} must be a power of two from {min} to {max}"
            )));
        }
        let bits = g.trailing_zeros() as u8;
        let disk = self.hdr.header.size;
        let table = bitmap_table_size(disk, bits, self.cs());
        if table > u64::from(self.limits.max_bitmap_table_entries)
            || table * self.cs() > qcow2_format::bitmap::QEMU_MAX_BITMAP_PHYS_SIZE
        {
            return Err(Error::InvalidArgument(format!(
                "bitmap granularity {g} is too fine for a {disk}-byte disk"
            )));
        }
        let dir_len = self.directory_len() + entry_len(name);
        if dir_len > self.limits.max_bitmap_directory_bytes {
            return Err(Error::NoSpace("the bitmap directory is full".into()));
        }
        self.bitmaps.list.push(Bitmap {
            name: name.to_string(),
            granularity_bits: bits,
            enabled: !o.disabled,
            inconsistent: false,
            data: vec![0u8; bitmap_data_size(disk, bits) as usize],
            table: None,
            data_clusters: Vec::new(),
        });
        self.store_bitmaps(true).await
    }

    fn directory_len(&self) -> u64 {
        self.bitmaps.list.iter().map(|b| entry_len(&b.name)).sum()
    }

    /// Removes a bitmap (consistent or not) and frees its clusters.
    pub(crate) async fn remove_bitmap(&mut self, name: &str) -> Result<()> {
        let i = self.bitmaps.find(name)?;
        let b = self.bitmaps.list.remove(i);
        let cs = self.cs();
        if let Some((off, n)) = b.table {
            self.bitmaps.orphaned.push((off, u64::from(n) * 8));
        }
        self.bitmaps
            .orphaned
            .extend(b.data_clusters.iter().map(|&d| (d, cs)));
        self.store_bitmaps(true).await
    }

    /// Clears every bit.
    pub(crate) async fn clear_bitmap(&mut self, name: &str) -> Result<()> {
        let i = self.bitmaps.find_consistent(name)?;
        self.bitmaps.list[i].data.fill(0);
        self.store_bitmaps(true).await
    }

    /// Enables or disables recording.
    pub(crate) async fn enable_bitmap(&mut self, name: &str, on: bool) -> Result<()> {
        let i = self.bitmaps.find_consistent(name)?;
        self.bitmaps.list[i].enabled = on;
        self.store_bitmaps(true).await
    }

    /// `target |= source` for each source (granularities may differ).
    pub(crate) async fn merge_bitmaps(&mut self, target: &str, sources: &[&str]) -> Result<()> {
        let t = self.bitmaps.find_consistent(target)?;
        let size = self.hdr.header.size;
        let mut ranges = Vec::new();
        for s in sources {
            ranges.extend(self.bitmaps.dirty_ranges(s, 0..size, size)?);
        }
        let b = &mut self.bitmaps.list[t];
        let g = u32::from(b.granularity_bits);
        for r in ranges {
            set_bits(&mut b.data, r.start >> g, (r.end - 1) >> g);
        }
        self.store_bitmaps(true).await
    }

    pub(crate) fn bitmap_dirty_ranges(
        &self,
        name: &str,
        range: Range<u64>,
    ) -> Result<Vec<Range<u64>>> {
        self.bitmaps.dirty_ranges(name, range, self.hdr.header.size)
    }

    /// Writes every bitmap to fresh clusters and switches the header to the new directory.
    /// With `in_use`, consistent bitmaps are stored flagged (their bits are not written: a
    /// reader discards them anyway); without, their bits are stored and the flag cleared —
    /// a clean close. Inconsistent bitmaps keep their entry as it is.
    pub(crate) async fn store_bitmaps(&mut self, in_use: bool) -> Result<()> {
        let cs = self.cs();
        let mut entries = Vec::with_capacity(self.bitmaps.list.len());
        let mut old: Vec<(u64, u64)> = std::mem::take(&mut self.bitmaps.orphaned);
        if let Some((off, len)) = self.bitmaps.directory {
            old.push((off, len));
        }
        for i in 0..self.bitmaps.list.len() {
            let b = &self.bitmaps.list[i];
            if b.inconsistent {
                let (off, n) = b.table.expect("inconsistent bitmaps were loaded");
                entries.push(BitmapDirectoryEntry {
                    bitmap_table_offset: off,
                    bitmap_table_size: n,
                    flags: BitmapFlags::IN_USE.with(BitmapFlags::AUTO, b.enabled),
                    bitmap_type: BITMAP_TYPE_DIRTY_TRACKING,
                    granularity_bits: b.granularity_bits,
                    name: b.name.clone(),
                    extra_data: Vec::new(),
                });
                continue;
            }
            let n = bitmap_table_size(self.hdr.header.size, b.granularity_bits, cs);
            let mut table = vec![BitmapTableEntry::Zeros; n as usize];
            let mut clusters = Vec::new();
            if !in_use {
                for (slot, entry) in table.iter_mut().enumerate() {
                    let b = &self.bitmaps.list[i];
                    let start = slot * cs as usize;
                    let chunk = &b.data[start..(start + cs as usize).min(b.data.len())];
                    if chunk.iter().all(|&x| x == 0) {
                        continue;
                    }
                    let mut buf = vec![0u8; cs as usize];
                    buf[..chunk.len()].copy_from_slice(chunk);
                    let off = self.alloc(1, Pool::Metadata).await?;
                    self.write(off, &buf, "bitmap data").await?;
                    clusters.push(off);
                    *entry = BitmapTableEntry::data(off).map_err(Error::format("bitmap table"))?;
                }
            }
            let bytes = encode_bitmap_table(&table);
            let table_off = self
                .alloc((bytes.len() as u64).div_ceil(cs), Pool::Metadata)
                .await?;
            self.write(table_off, &bytes, "bitmap table").await?;
            let b = &mut self.bitmaps.list[i];
            if let Some((off, n)) = b.table.take() {
                old.push((off, u64::from(n) * 8));
            }
            old.extend(b.data_clusters.drain(..).map(|d| (d, cs)));
            b.table = Some((table_off, n as u32));
            b.data_clusters = clusters;
            entries.push(BitmapDirectoryEntry {
                bitmap_table_offset: table_off,
                bitmap_table_size: n as u32,
                flags: BitmapFlags(0)
                    .with(BitmapFlags::IN_USE, in_use)
                    .with(BitmapFlags::AUTO, b.enabled),
                bitmap_type: BITMAP_TYPE_DIRTY_TRACKING,
                granularity_bits: b.granularity_bits,
                name: b.name.clone(),
                extra_data: Vec::new(),
            });
        }
        let dir = BitmapDirectory { entries };
        let new_dir = if dir.entries.is_empty() {
            None
        } else {
            let bytes = dir.encode().map_err(Error::format("bitmap directory"))?;
            let off = self
                .alloc((bytes.len() as u64).div_ceil(cs), Pool::Metadata)
                .await?;
            self.write(off, &bytes, "bitmap directory").await?;
            Some((off, bytes.len() as u64, dir.entries.len() as u32))
        };
        // Everything new, and the refcounts that own it, must be durable before the header
        // points at it — with lazy refcounts too: the header switch is not covered by the
        // dirty bit's repair.
        self.write_blocks().await?;
        self.barrier.sync().await?;
        self.hdr.bitmaps = new_dir.map(|(off, len, nb)| BitmapsExtension {
            nb_bitmaps: nb,
            directory_size: len,
            directory_offset: off,
        });
        self.hdr
            .header
            .autoclear
            .set(AutoclearFeatures::BITMAPS, new_dir.is_some());
        self.write_header().await?;
        self.barrier.sync().await?;
        self.bitmaps.directory = new_dir.map(|(off, len, _)| (off, len));
        self.bitmaps.marked_in_use = in_use;
        for (off, len) in old {
            self.free_later(off, len);
        }
        self.writeback().await
    }
}

/// Bytes a directory entry named `name` takes, padded to 8.
fn entry_len(name: &str) -> u64 {
    (qcow2_format::bitmap::BITMAP_DIR_ENTRY_HEADER_SIZE as u64 + name.len() as u64).div_ceil(8) * 8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_bits_fills_whole_bytes_and_edges() {
        let mut d = vec![0u8; 4];
        set_bits(&mut d, 3, 20);
        assert_eq!(d, [0xf8, 0xff, 0x1f, 0]);
        set_bits(&mut d, 30, 1000);
        assert_eq!(d[3], 0xc0, "clamped to the data");
    }

    #[test]
    fn dirty_ranges_merge_and_clip() {
        let mut b = Bitmaps::default();
        b.list.push(Bitmap {
            name: "b".into(),
            granularity_bits: 16,
            enabled: true,
            inconsistent: false,
            data: vec![0u8; 2],
            table: None,
            data_clusters: vec![],
        });
        b.set_dirty(65536, 1);
        b.set_dirty(2 * 65536 + 10, 65536);
        let size = 16 * 65536;
        assert_eq!(
            b.dirty_ranges("b", 0..size, size).unwrap(),
            vec![65536..4 * 65536]
        );
        assert_eq!(
            b.dirty_ranges("b", 70000..80000, size).unwrap(),
            vec![70000..80000]
        );
        assert!(b.dirty_ranges("nope", 0..size, size).is_err());
    }

    #[test]
    fn default_granularity_is_qemus() {
        assert_eq!(default_granularity(512), 4096);
        assert_eq!(default_granularity(65536), 65536);
        assert_eq!(default_granularity(2 << 20), 65536);
    }
}
