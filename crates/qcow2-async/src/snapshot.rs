//! Internal snapshots: create, list, apply (revert), delete, and read without applying
//! (reference §4).
//!
//! A snapshot is a copy of the active L1 table plus one more reference on every L2 table and
//! data cluster it reaches. Shared clusters lose COPIED in the active tables, so the next
//! write copies them (invariant 5). Every operation holds the image's snapshot lock
//! exclusively, while guest requests hold it shared: a snapshot captures one instant —
//! every request that completed before the call is in it, none that started after it
//! returned.
//!
//! Crash safety follows the usual rule: reference-count increases reach the disk before the
//! new references (the snapshot table, or an overwritten active L1), decreases after the old
//! references are gone; the snapshot table is rewritten into fresh clusters and switched with
//! one header write.

use std::time::{SystemTime, UNIX_EPOCH};

use qcow2_format::l2::{decode_extended, encode_extended};
use qcow2_format::{L1Entry, L2Entry, SnapshotEntry, SnapshotTable};

use crate::alloc::Pool;
use crate::error::{Error, Result};
use crate::meta::{be64, Meta};

/// What `list_snapshots` reports about one snapshot (the columns of `qemu-img snapshot -l`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotInfo {
    /// Unique id ("1", "2", ...).
    pub id: String,
    /// Name (not necessarily unique, as in QEMU).
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of saved VM state (0 for disk-only snapshots).
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken.
    pub disk_size: u64,
    /// Instruction count, if recorded.
    pub icount: Option<i64>,
}

impl SnapshotInfo {
    fn from_entry(e: &SnapshotEntry, current_size: u64) -> Self {
        SnapshotInfo {
            id: e.id.clone(),
            name: e.name.clone(),
            date_sec: e.date_sec,
            date_nsec: e.date_nsec,
            vm_clock_nsec: e.vm_clock_nsec,
            vm_state_size: e.vm_state_size,
            disk_size: e.disk_size.unwrap_or(current_size),
            icount: e.icount.filter(|&i| i != -1),
        }
    }
}

/// QEMU's `find_snapshot_by_id_or_name`: an id match first, then the first name match.
fn find(table: &SnapshotTable, key: &str) -> Result<usize> {
    table
        .entries
        .iter()
        .position(|e| e.id == key)
        .or_else(|| table.entries.iter().position(|e| e.name == key))
        .ok_or_else(|| Error::InvalidArgument(format!("snapshot '{key}' not found")))
}

impl Meta {
    pub(crate) async fn snapshot_table(&mut self) -> Result<SnapshotTable> {
        if self.hdr.header.nb_snapshots == 0 {
            return Ok(SnapshotTable::default());
        }
        Ok(self.read_snapshot_table().await?.0)
    }

    /// Reads and decodes the snapshot table the header points at, and how many bytes it
    /// takes. An unreadable table is an [`Error::Io`], a malformed one an [`Error::Format`].
    pub(crate) async fn read_snapshot_table(&self) -> Result<(SnapshotTable, usize)> {
        let h = &self.hdr.header;
        let mut want = 65536u64.min(self.limits.max_snapshot_table_bytes);
        loop {
            let bytes = self.read_bytes(h.snapshots_offset, want).await?;
            match SnapshotTable::decode(&bytes, h.nb_snapshots, h.version.number(), &self.limits) {
                Ok(t) => return Ok(t),
                Err(qcow2_format::Error::Truncated { needed, .. }) if needed > want => {
                    // Geometric growth: a table read one missing entry at a time would be
                    // decoded once per entry (65536 entries took minutes).
                    want = needed
                        .max(want.saturating_mul(2))
                        .min(self.limits.max_snapshot_table_bytes.max(needed));
                }
                Err(e) => return Err(Error::format("snapshot table")(e)),
            }
        }
    }

    /// Writes `table` into fresh clusters, points the header at it, frees the old one.
    pub(crate) async fn replace_snapshot_table(&mut self, mut table: SnapshotTable) -> Result<()> {
        let size = self.hdr.header.size;
        table.resolve_defaults(size);
        let version = self.hdr.header.version.number();
        let bytes = table
            .encode(version)
            .map_err(Error::format("snapshot table"))?;
        let cs = self.cs();
        let old = (
            self.hdr.header.snapshots_offset,
            self.hdr.header.nb_snapshots,
            self.snapshot_table_len().await?,
        );
        let new_off = if bytes.is_empty() {
            0
        } else {
            let off = self
                .alloc(self.geo.clusters_for(bytes.len() as u64), Pool::Metadata)
                .await?;
            self.write(off, &bytes, "snapshot table").await?;
            off
        };
        // Everything the new table references (and its own refcounts) first.
        self.writeback().await?;
        self.write_blocks().await?;
        self.barrier.sync().await?;
        self.hdr.header.nb_snapshots = table.entries.len() as u32;
        self.hdr.header.snapshots_offset = new_off;
        self.write_header().await?;
        self.barrier.sync().await?;
        if old.1 > 0 && old.2 > 0 {
            self.update_refcount(old.0, old.2.div_ceil(cs) * cs, -1)
                .await?;
        }
        Ok(())
    }

    /// The bytes the table on disk takes (QEMU's `snapshots_size`). Not the length of its
    /// re-encoding: entries with short extra data (v2, or an incomplete v3 entry) grow when
    /// rewritten, and freeing by the rewritten length could free the cluster after the table.
    async fn snapshot_table_len(&mut self) -> Result<u64> {
        if self.hdr.header.nb_snapshots == 0 {
            return Ok(0);
        }
        Ok(self.read_snapshot_table().await?.1 as u64)
    }

    /// Every (offset, length) an L1 tree references: its L2 tables and their data.
    async fn tree_refs(&mut self, l1: &[u64]) -> Result<Vec<(u64, u64)>> {
        let cs = self.cs();
        let bits = self.geo.cluster_bits();
        let es = self.geo.l2_entry_size() as usize;
        let mut out = Vec::new();
        for (i, raw) in l1.iter().enumerate() {
            let e = L1Entry::decode(*raw, bits)
                .map_err(|e| Error::Corrupt(format!("L1 entry {i}: {e}")))?;
            let Some(l2) = e.l2_offset else { continue };
            out.push((l2.0, cs));
            let table = self.l2_contents(l2.0).await?;
            for j in 0..self.geo.l2_entries() {
                let at = j * es;
                let entry = self.decode_at(&table, at)?;
                match entry {
                    L2Entry::Normal { host, .. }
                    | L2Entry::Zero {
                        host: Some(host), ..
                    } => out.push((host.0, cs)),
                    L2Entry::Compressed(d) => out.push(d.host_range()),
                    _ => {}
                }
            }
        }
        Ok(out)
    }

    fn decode_at(&self, table: &[u8], at: usize) -> Result<L2Entry> {
        let raw = be64(table, at);
        if self.fmt.extended_l2 {
            decode_extended(raw, be64(table, at + 8), self.fmt).map(|(e, _)| e)
        } else {
            L2Entry::decode(raw, self.fmt)
        }
        .map_err(|e| Error::Corrupt(format!("L2 entry: {e}")))
    }

    /// Adds `delta` to every reference of a tree; for increments checks for overflow before
    /// changing anything (QEMU fails half-way; a 2-bit refcount image allows 2 snapshots).
    async fn add_tree_refs(&mut self, refs: &[(u64, u64)], delta: i64) -> Result<()> {
        if delta > 0 {
            let bits = self.geo.cluster_bits();
            let mut per_cluster = std::collections::HashMap::<u64, u64>::new();
            for &(off, len) in refs {
                for c in (off >> bits)..=((off + len - 1) >> bits) {
                    *per_cluster.entry(c).or_default() += 1;
                }
            }
            for (c, n) in per_cluster {
                let rc = self.refcount(c).await?;
                if rc.saturating_add(n * delta as u64) > self.order().max() {
                    return Err(Error::NoSpace(format!(
                        "refcount of cluster {c} would overflow {} bits",
                        self.order().bits()
                    )));
                }
            }
        }
        for &(off, len) in refs {
            self.update_refcount(off, len, delta).await?;
        }
        Ok(())
    }

    /// Makes COPIED in the active L1 and its L2 tables say "refcount is exactly 1".
    async fn recompute_copied(&mut self) -> Result<()> {
        let cs = self.cs();
        let bits = self.geo.cluster_bits();
        let es = self.geo.l2_entry_size() as usize;
        for i in 0..self.l1.len() as usize {
            let e = L1Entry::decode(self.l1.entries()[i], bits)
                .map_err(|e| Error::Corrupt(format!("L1 entry {i}: {e}")))?;
            let Some(l2) = e.l2_offset else { continue };
            let copied = self.refcount(l2.0 >> bits).await? == 1;
            if copied != e.copied {
                self.set_l1_entry(i as u64, L1Entry::new(l2, copied));
            }
            let mut table = self.l2_contents(l2.0).await?;
            let mut changed = false;
            for j in 0..self.geo.l2_entries() {
                let at = j * es;
                let entry = self.decode_at(&table, at)?;
                let fixed = match entry {
                    L2Entry::Normal { host, copied } => {
                        let want = self.refcount(host.0 >> bits).await? == 1;
                        (want != copied).then_some(L2Entry::Normal { host, copied: want })
                    }
                    L2Entry::Zero {
                        host: Some(host),
                        copied,
                    } => {
                        let want = self.refcount(host.0 >> bits).await? == 1;
                        (want != copied).then_some(L2Entry::Zero {
                            host: Some(host),
                            copied: want,
                        })
                    }
                    _ => None,
                };
                if let Some(f) = fixed {
                    let bm = if self.fmt.extended_l2 {
                        qcow2_format::SubclusterBitmap(be64(&table, at + 8))
                    } else {
                        Default::default()
                    };
                    let (w0, w1) = if self.fmt.extended_l2 {
                        encode_extended(&f, bm, self.fmt)
                    } else {
                        f.encode(self.fmt).map(|w| (w, 0))
                    }
                    .map_err(Error::format("L2 entry"))?;
                    table[at..at + 8].copy_from_slice(&w0.to_be_bytes());
                    if es == 16 {
                        table[at + 8..at + 16].copy_from_slice(&w1.to_be_bytes());
                    }
                    changed = true;
                }
            }
            if changed {
                self.put_l2(l2.0, table.into_boxed_slice()).await?;
            }
            let _ = cs;
        }
        Ok(())
    }

    /// Snapshot operations change refcounts and the COPIED flags that depend on them with
    /// separate writes, so a crash between them leaves flags that disagree with refcounts —
    /// a corruption to `check` (QEMU has the same window). On v3 images the operation runs
    /// with the dirty bit set: after such a crash the next read-write open rebuilds
    /// refcounts and flags, and the crash costs at most leaked clusters. Returns whether the
    /// bit was set here (and must be cleared by [`Meta::end_refcount_window`]).
    async fn begin_refcount_window(&mut self) -> Result<bool> {
        if self.hdr.header.version != qcow2_format::Version::V3 || self.marked_dirty {
            return Ok(false);
        }
        self.set_dirty_bit(true).await?;
        Ok(true)
    }

    /// Makes everything durable and clears the dirty bit set by `begin_refcount_window`.
    ///
    /// If the operation failed part-way, refcounts in memory may be higher than the
    /// references and COPIED flags may disagree with them (never the dangerous way round:
    /// increases always come first). The image is then repaired in place, best effort, so
    /// that it stays check-clean while open; the caller gets the operation's error either
    /// way, and if the repair fails too the dirty bit stays set for the next open.
    async fn end_refcount_window<T>(&mut self, set: bool, result: Result<T>) -> Result<T> {
        let value = match result {
            Ok(v) => v,
            Err(e) => {
                let size = self.hdr.header.size;
                if let Err(repair) = self.check(size, Some(crate::check::RepairMode::All)).await {
                    tracing::warn!(%repair, "repair after a failed snapshot operation failed");
                }
                return Err(e);
            }
        };
        if set {
            self.writeback().await?;
            self.write_blocks().await?;
            self.barrier.sync().await?;
            self.set_dirty_bit(false).await?;
        }
        Ok(value)
    }

    pub(crate) async fn create_snapshot(&mut self, name: &str) -> Result<SnapshotInfo> {
        let window = self.begin_refcount_window().await?;
        let r = self.create_snapshot_inner(name).await;
        self.end_refcount_window(window, r).await
    }

    pub(crate) async fn delete_snapshot(&mut self, key: &str) -> Result<()> {
        let window = self.begin_refcount_window().await?;
        let r = self.delete_snapshot_inner(key).await;
        self.end_refcount_window(window, r).await
    }

    pub(crate) async fn apply_snapshot(&mut self, key: &str) -> Result<()> {
        let window = self.begin_refcount_window().await?;
        let r = self.apply_snapshot_inner(key).await;
        self.end_refcount_window(window, r).await
    }

    async fn create_snapshot_inner(&mut self, name: &str) -> Result<SnapshotInfo> {
        if self.fmt.external_data_file {
            return Err(Error::unsupported(
                "internal snapshots with an external data file",
                "",
            ));
        }
        let mut table = self.snapshot_table().await?;
        if table.entries.len() as u64 >= u64::from(self.limits.max_snapshots) {
            return Err(Error::NoSpace("too many snapshots".into()));
        }
        self.writeback().await?;
        let l1 = self.l1.entries().to_vec();
        let refs = self.tree_refs(&l1).await?;
        self.add_tree_refs(&refs, 1).await?;
        // The snapshot's copy of the L1 table.
        let l1_bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        let l1_off = if l1_bytes.is_empty() {
            0
        } else {
            let off = self
                .alloc(self.geo.clusters_for(l1_bytes.len() as u64), Pool::Metadata)
                .await?;
            self.write(off, &l1_bytes, "snapshot L1 table").await?;
            off
        };
        self.recompute_copied().await?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let entry = SnapshotEntry {
            l1_table_offset: l1_off,
            l1_size: l1.len() as u32,
            id: table.next_id(),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            // qemu-img records microseconds.
            date_nsec: now.subsec_micros() * 1000,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.hdr.header.size),
            // A storage engine has no instruction counter: "not recorded".
            icount: Some(-1),
            unknown_extra: Vec::new(),
        };
        let info = SnapshotInfo::from_entry(&entry, self.hdr.header.size);
        table.entries.push(entry);
        self.replace_snapshot_table(table).await?;
        Ok(info)
    }

    async fn delete_snapshot_inner(&mut self, key: &str) -> Result<()> {
        let mut table = self.snapshot_table().await?;
        let idx = find(&table, key)?;
        let snap = table.entries.remove(idx);
        self.writeback().await?;
        self.replace_snapshot_table(table).await?;
        // Nothing references the snapshot's tree any more: drop its references.
        let l1 = self.read_l1(&snap).await?;
        let refs = self.tree_refs(&l1).await?;
        self.add_tree_refs(&refs, -1).await?;
        if snap.l1_size > 0 {
            self.update_refcount(snap.l1_table_offset, u64::from(snap.l1_size) * 8, -1)
                .await?;
        }
        // Refcount decrements reach the disk (phase 1 of write-back) before the COPIED
        // flags that rely on them (phase 3).
        self.recompute_copied().await?;
        self.writeback().await?;
        self.write_blocks().await?;
        self.barrier.sync().await
    }

    async fn apply_snapshot_inner(&mut self, key: &str) -> Result<()> {
        let table = self.snapshot_table().await?;
        let snap = table.entries[find(&table, key)?].clone();
        let size = self.hdr.header.size;
        // A snapshot taken before a resize: the disk takes its size back, as in QEMU.
        self.grow_l1(u64::from(snap.l1_size)).await?;
        let new_size = snap.disk_size.filter(|&s| s != size);
        self.writeback().await?;
        let mut new_l1 = self.read_l1(&snap).await?;
        new_l1.resize(self.l1.len() as usize, 0);
        // Take the snapshot's references first, make them durable, then switch.
        let new_refs = self.tree_refs(&new_l1).await?;
        self.add_tree_refs(&new_refs, 1).await?;
        self.write_blocks().await?;
        self.barrier.sync().await?;
        // Every sector is written at the write-back below.
        let old_l1 = self.l1.replace(new_l1, false);
        // Cached active tables are no longer the active ones (or are shared): forget them.
        self.drop_l2_cache();
        self.writeback().await?;
        self.barrier.sync().await?;
        let old_refs = self.tree_refs(&old_l1).await?;
        self.add_tree_refs(&old_refs, -1).await?;
        self.recompute_copied().await?;
        self.writeback().await?;
        self.write_blocks().await?;
        self.barrier.sync().await?;
        if let Some(s) = new_size {
            self.hdr.header.size = s;
            self.write_header().await?;
            self.barrier.sync().await?;
        }
        Ok(())
    }

    pub(crate) async fn read_l1(&mut self, snap: &SnapshotEntry) -> Result<Vec<u64>> {
        snap.validate(self.cs(), &self.limits)
            .map_err(Error::format("snapshot"))?;
        let b = self
            .read_bytes(snap.l1_table_offset, u64::from(snap.l1_size) * 8)
            .await?;
        Ok(b.chunks_exact(8).map(|c| be64(c, 0)).collect())
    }

    pub(crate) async fn list_snapshots(&mut self) -> Result<Vec<SnapshotInfo>> {
        let size = self.hdr.header.size;
        Ok(self
            .snapshot_table()
            .await?
            .entries
            .iter()
            .map(|e| SnapshotInfo::from_entry(e, size))
            .collect())
    }

    /// The snapshot's L1 and the entry of guest cluster `gc` in it.
    pub(crate) async fn snapshot_lookup(
        &mut self,
        l1: &[u64],
        gc: u64,
    ) -> Result<(L2Entry, qcow2_format::SubclusterBitmap)> {
        let bits = self.geo.cluster_bits();
        let pos = self.geo.locate(qcow2_format::GuestOffset(gc << bits));
        let raw = l1.get(pos.l1_index as usize).copied().unwrap_or(0);
        let e =
            L1Entry::decode(raw, bits).map_err(|e| Error::Corrupt(format!("snapshot L1: {e}")))?;
        let Some(l2) = e.l2_offset else {
            return Ok((L2Entry::Unallocated, Default::default()));
        };
        let table = self.l2_contents(l2.0).await?;
        let at = pos.l2_index * self.geo.l2_entry_size() as usize;
        let raw = be64(&table, at);
        if self.fmt.extended_l2 {
            decode_extended(raw, be64(&table, at + 8), self.fmt)
        } else {
            L2Entry::decode(raw, self.fmt).map(|e| (e, Default::default()))
        }
        .map_err(|e| Error::Corrupt(format!("snapshot L2 entry: {e}")))
    }

    pub(crate) async fn find_snapshot(&mut self, key: &str) -> Result<SnapshotEntry> {
        let t = self.snapshot_table().await?;
        Ok(t.entries[find(&t, key)?].clone())
    }
}
