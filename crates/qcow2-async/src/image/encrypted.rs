//! Where guest data meets the host file: the only two places bytes of a data cluster are read
//! or written, so that encrypted images decrypt and encrypt exactly there (reference §6).
//!
//! Encryption works on whole 512-byte sectors. A request that does not cover whole sectors
//! reads the enclosing sectors, decrypts them, patches them and encrypts them again; callers
//! hold the cluster's exclusive lease for such writes (see [`Image::write_align`]), so two of
//! them never interleave on one sector.

use std::sync::Arc;

use super::Image;
use crate::crypto::cipher::SECTOR_SIZE;
use crate::crypto::{DataCrypto, IvSector};
use crate::error::{Error, Result};
use crate::io::IoBuf;

const SECTOR: u64 = SECTOR_SIZE as u64;

impl Image {
    /// The granularity below which a data write is a read-modify-write of the host file
    /// and so needs the cluster's exclusive lease: the O_DIRECT block, or the encryption
    /// sector.
    pub(super) fn write_align(&self) -> u64 {
        if self.inner.crypto.is_encrypted() {
            self.inner.direct_align.max(SECTOR)
        } else {
            self.inner.direct_align
        }
    }

    /// The IV sector number of host offset `host` (sector aligned) holding guest offset
    /// `guest`.
    fn iv_sector(c: &DataCrypto, host: u64, guest: u64) -> u64 {
        match c.iv_sector {
            IvSector::Host => host / SECTOR,
            IvSector::Guest => guest / SECTOR,
        }
    }

    /// Reads guest data stored at `host` (guest offset `guest`) into `out`, decrypting it.
    pub(super) async fn read_data(&self, host: u64, guest: u64, out: &mut [u8]) -> Result<()> {
        let Some(c) = self.inner.crypto.data()? else {
            let b = self
                .inner
                .data
                .read_at(IoBuf::zeroed(out.len(), 1), host)
                .await
                .map_err(Error::io("reading guest data"))?;
            out.copy_from_slice(&b);
            return Ok(());
        };
        let (start, end) = sector_span(host, out.len());
        let head = (host - start) as usize;
        let raw = self
            .read_sectors(c, start, guest - head as u64, end)
            .await?;
        out.copy_from_slice(&raw[head..head + out.len()]);
        Ok(())
    }

    /// Decrypted contents of host sectors `[start, end)`, whose first byte is guest
    /// offset `guest`.
    async fn read_sectors(
        &self,
        c: &Arc<DataCrypto>,
        start: u64,
        guest: u64,
        end: u64,
    ) -> Result<Vec<u8>> {
        let b = self
            .inner
            .data
            .read_at(IoBuf::zeroed((end - start) as usize, 1), start)
            .await
            .map_err(Error::io("reading guest data"))?;
        c.decrypt(Self::iv_sector(c, start, guest), b.into_vec())
            .await
    }

    /// Writes guest data `data` at `host`, encrypting it. For an encrypted image a write
    /// that does not cover whole sectors completes them from their current contents.
    pub(super) async fn write_data(&self, host: u64, data: &[u8]) -> Result<()> {
        let buf = match self.inner.crypto.data()? {
            // Aligned for O_DIRECT already, so the byte-granular view passes it through
            // instead of copying it a second time.
            None => IoBuf::from_slice(data, self.inner.direct_align as usize),
            Some(c) => {
                if c.iv_sector == IvSector::Guest {
                    // Legacy AES images open read-only (`check_features`); keep it so.
                    return Err(Error::ReadOnly);
                }
                let (start, end) = sector_span(host, data.len());
                let head = (host - start) as usize;
                let plain = if head == 0 && end - start == data.len() as u64 {
                    data.to_vec()
                } else {
                    // Legacy AES never gets here, so the guest offset does not matter.
                    let mut p = self.read_sectors(c, start, 0, end).await?;
                    p[head..head + data.len()].copy_from_slice(data);
                    p
                };
                let enc = c.encrypt(start / SECTOR, plain).await?;
                return self
                    .inner
                    .data
                    .write_at(IoBuf::from_vec(enc), start)
                    .await
                    .map(|_| ())
                    .map_err(Error::io("writing guest data"));
            }
        };
        self.inner
            .data
            .write_at(buf, host)
            .await
            .map(|_| ())
            .map_err(Error::io("writing guest data"))
    }
}

/// The sector-aligned host range `[start, end)` around `len` bytes at `host`.
fn sector_span(host: u64, len: usize) -> (u64, u64) {
    let start = host / SECTOR * SECTOR;
    let end = (host + len as u64).div_ceil(SECTOR) * SECTOR;
    (start, end)
}
