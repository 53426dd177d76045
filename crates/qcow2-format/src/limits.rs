//! Sanity limits for everything read from an untrusted image.
//!
//! The defaults are QEMU's own (reference §7.1), so an image QEMU opens opens here and an image
//! QEMU refuses as too large is refused too. Every decoder that allocates in proportion to a
//! number read from the image checks it against these first.

/// Bounds applied while decoding an image. Start from [`Limits::QEMU`] and change fields:
/// the struct is `#[non_exhaustive]`, so that a new bound is not a breaking change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest active or snapshot L1 table in bytes (QEMU: 32 MiB).
    pub max_l1_bytes: u64,
    /// Largest refcount table in bytes (QEMU: 8 MiB).
    pub max_refcount_table_bytes: u64,
    /// Most snapshots (QEMU: 65536).
    pub max_snapshots: u32,
    /// Largest snapshot table in bytes (QEMU: 64 MiB).
    pub max_snapshot_table_bytes: u64,
    /// Largest extra data per snapshot entry (QEMU: 1024).
    pub max_snapshot_extra_data: u32,
    /// Most persistent bitmaps (QEMU: 65535).
    pub max_bitmaps: u32,
    /// Largest bitmap directory in bytes (QEMU: 1024 * 65535).
    pub max_bitmap_directory_bytes: u64,
    /// Largest bitmap table, in entries (QEMU: 0x8000000).
    pub max_bitmap_table_entries: u32,
    /// Largest bitmap name (QEMU: 1023).
    pub max_bitmap_name: u16,
    /// Largest backing file name (QEMU: 1023).
    pub max_backing_file_name: u32,
    /// Largest backing format name (QEMU: 15; the extension must be shorter than 16).
    pub max_backing_format_name: u32,
    /// Largest virtual disk size (QEMU: 2^63 - 512 with 2 MiB clusters; lower is common).
    pub max_virtual_size: u64,
    /// Highest host offset (QEMU: 2^56).
    pub max_host_offset: u64,
}

impl Limits {
    /// QEMU 10's limits.
    pub const QEMU: Limits = Limits {
        max_l1_bytes: 32 * 1024 * 1024,
        max_refcount_table_bytes: 8 * 1024 * 1024,
        max_snapshots: 65536,
        max_snapshot_table_bytes: 64 * 1024 * 1024,
        max_snapshot_extra_data: 1024,
        max_bitmaps: 65535,
        max_bitmap_directory_bytes: 1024 * 65535,
        max_bitmap_table_entries: 0x0800_0000,
        max_bitmap_name: 1023,
        max_backing_file_name: 1023,
        max_backing_format_name: 15,
        max_virtual_size: (1 << 63) - 512,
        max_host_offset: 1 << 56,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::QEMU
    }
}
