//! What the device offers: its virtio feature bits and its configuration space
//! (`struct virtio_blk_config`, VIRTIO 1.2, 5.2.4), encoded without I/O.

use virtio_bindings::virtio_blk as vb;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::request::SECTOR;

/// `VHOST_USER_F_PROTOCOL_FEATURES`: without it the frontend never asks for the protocol
/// features (`CONFIG`, `MQ`, ...) that QEMU and libblkio require.
const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

/// Largest discard or write-zeroes request in sectors (32 MiB, as qemu-storage-daemon).
pub const MAX_DISCARD_SECTORS: u32 = 32 << 11;
/// Largest data segment in bytes a driver may post (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most data segments per request (`seg_max`), leaving room in a 128-entry queue for the
/// header and status descriptors, as qemu-storage-daemon.
pub const SEG_MAX: u32 = 126;

/// The feature bits the device offers.
pub fn device_features(read_only: bool) -> u64 {
    let mut bits = [
        vb::VIRTIO_BLK_F_SIZE_MAX,
        vb::VIRTIO_BLK_F_SEG_MAX,
        vb::VIRTIO_BLK_F_BLK_SIZE,
        vb::VIRTIO_BLK_F_FLUSH,
        vb::VIRTIO_BLK_F_TOPOLOGY,
        vb::VIRTIO_BLK_F_DISCARD,
        vb::VIRTIO_BLK_F_WRITE_ZEROES,
        // Always, as qemu-storage-daemon: `num_queues` is then valid even when it is 1.
        vb::VIRTIO_BLK_F_MQ,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_F_VERSION_1,
        VHOST_USER_F_PROTOCOL_FEATURES,
    ]
    .iter()
    .fold(0u64, |f, b| f | 1 << b);
    if read_only {
        bits |= 1 << vb::VIRTIO_BLK_F_RO;
    }
    bits
}

/// The device's configuration space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkConfig {
    /// Disk size in bytes (encoded in sectors, rounded down as QEMU does).
    pub capacity: u64,
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// Optimal I/O size in bytes (the image's cluster size).
    pub opt_io_size: u32,
    /// Number of request queues.
    pub num_queues: u16,
}

/// Bytes of `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding: the
/// fields of the features offered.
pub const CONFIG_LEN: usize = 60;

impl BlkConfig {
    /// The configuration space, little endian.
    pub fn encode(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        let blocks = |bytes: u32| bytes / self.blk_size.max(1);
        b[0..8].copy_from_slice(&(self.capacity / SECTOR).to_le_bytes());
        b[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        b[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        // 16..20: geometry, not offered.
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        // Topology: physical block = logical block (exponent 0), no alignment offset,
        // minimum I/O one block, optimal I/O one cluster (both in logical blocks).
        b[26..28].copy_from_slice(&1u16.to_le_bytes());
        b[28..32].copy_from_slice(&blocks(self.opt_io_size).max(1).to_le_bytes());
        // 32: writeback, 33: unused (CONFIG_WCE not offered).
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        b[40..44].copy_from_slice(&1u32.to_le_bytes());
        b[44..48].copy_from_slice(&(self.blk_size / SECTOR as u32).max(1).to_le_bytes());
        b[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        b[52..56].copy_from_slice(&1u32.to_le_bytes());
        b[56] = 1; // write_zeroes_may_unmap
        b
    }

    /// `size` bytes of the space from `offset`, zero past its end (what `GET_CONFIG`
    /// answers: the frontend may ask for more than the fields we offer).
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.encode();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_LEN);
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(CONFIG_LEN);
        out[..end - start].copy_from_slice(&space[start..end]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BlkConfig {
        BlkConfig {
            capacity: (1 << 30) + 300,
            blk_size: 512,
            opt_io_size: 65536,
            num_queues: 2,
        }
    }

    #[test]
    fn fields_sit_where_the_spec_puts_them() {
        let b = cfg().encode();
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 2 << 20);
        assert_eq!(u32_at(8), SIZE_MAX);
        assert_eq!(u32_at(12), SEG_MAX);
        assert_eq!(u32_at(20), 512);
        assert_eq!(u32_at(28), 128, "one 64 KiB cluster in 512-byte blocks");
        assert_eq!(u16::from_le_bytes([b[34], b[35]]), 2);
        assert_eq!(u32_at(36), MAX_DISCARD_SECTORS);
        assert_eq!(b[56], 1);
    }

    #[test]
    fn reads_past_the_fields_are_zero_and_never_panic() {
        let c = cfg();
        assert_eq!(c.read(0, 8), c.encode()[..8].to_vec());
        assert_eq!(c.read(56, 8), vec![1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(c.read(200, 4), vec![0; 4]);
        assert_eq!(c.read(u32::MAX, 4), vec![0; 4]);
        assert_eq!(c.read(0, 96).len(), 96);
    }

    #[test]
    fn features_follow_the_export() {
        let rw = device_features(false);
        assert_ne!(rw & (1 << VIRTIO_F_VERSION_1), 0);
        assert_ne!(rw & (1 << VHOST_USER_F_PROTOCOL_FEATURES), 0);
        assert_eq!(rw & (1 << vb::VIRTIO_BLK_F_RO), 0);
        assert_ne!(rw & (1 << vb::VIRTIO_BLK_F_MQ), 0);
        let ro = device_features(true);
        assert_ne!(ro & (1 << vb::VIRTIO_BLK_F_RO), 0);
    }
}
