//! Encryption of guest data: LUKS1 (crypt_method 2, read and write) and qcow's legacy AES
//! (crypt_method 1, read only), as QEMU implements them (reference §6).
//!
//! * [`cipher`] — AES-XTS / AES-CBC sector ciphers with plain, plain64 and ESSIV IVs, and the
//!   hashes for PBKDF2;
//! * [`luks`] — key slots (PBKDF2, anti-forensic split, master key digest) and creation;
//! * [`legacy`] — the legacy AES key and cipher.
//!
//! Key material lives in zeroizing buffers and is never formatted: every type holding it has
//! a redacted `Debug`. Cipher work runs on Tokio's blocking pool, split across cores for
//! large buffers, so it never stalls the async workers.

pub mod cipher;
pub(crate) mod legacy;
pub mod luks;

use std::sync::Arc;

use qcow2_format::luks::{LuksHeader, LUKS_HEADER_SIZE, LUKS_SECTOR_SIZE};
use qcow2_format::{CryptMethod, EncryptionExtension, ImageHeader};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::io::{BlockFile, IoBuf};
use cipher::{SectorCipher, SECTOR_SIZE};
use luks::{KdfIterations, LuksAlgorithms};

/// A passphrase (QEMU's `secret` object). Zeroized when dropped; `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// A secret from its bytes (QEMU takes the `data=` string's UTF-8 bytes as they are).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Secret {
        Secret(Zeroizing::new(bytes.into()))
    }

    pub(crate) fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Encryption of a new image: LUKS1, the only format QEMU still creates for use (legacy AES
/// is read-only here).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EncryptionOptions {
    /// Passphrase for key slot 0 (`encrypt.key-secret`).
    pub secret: Secret,
    /// Cipher, mode, IV generator and hash (`encrypt.cipher-alg`, `cipher-mode`,
    /// `ivgen-alg`, `ivgen-hash-alg`, `hash-alg`).
    pub algorithms: LuksAlgorithms,
    /// PBKDF2 cost (`encrypt.iter-time`, or an explicit count).
    pub iterations: KdfIterations,
}

impl EncryptionOptions {
    /// QEMU's defaults (aes-256-xts-plain64, sha256, 2 s iteration time) with `secret`.
    pub fn luks(secret: Secret) -> EncryptionOptions {
        EncryptionOptions {
            secret,
            algorithms: LuksAlgorithms::default(),
            iterations: KdfIterations::default(),
        }
    }
}

/// Fills `buf` from the operating system's random source.
pub(crate) fn random_bytes(buf: &mut [u8]) -> Result<()> {
    getrandom::getrandom(buf).map_err(|e| Error::Io {
        context: "reading random bytes",
        source: std::io::Error::other(e.to_string()),
    })
}

/// Which sector number feeds the IV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IvSector {
    /// The host (file) offset / 512: LUKS (QEMU's `crypt_physical_offset`).
    Host,
    /// The guest offset / 512: legacy AES.
    Guest,
}

/// The unlocked data cipher of an open image.
#[derive(Debug)]
pub(crate) struct DataCrypto {
    cipher: SectorCipher,
    pub iv_sector: IvSector,
    /// Cores to spread one large buffer over.
    cores: usize,
}

/// Buffers shorter than twice this run as one blocking task: below it a task costs more
/// than the cipher work it would share.
const MIN_PART: usize = 64 << 10;

/// An image's encryption state.
#[derive(Debug)]
pub(crate) enum Encryption {
    /// Not encrypted.
    None,
    /// Encrypted, opened read-only without a passphrase: metadata is usable, guest data is
    /// not.
    Locked,
    /// Encrypted and unlocked.
    Unlocked(Arc<DataCrypto>),
}

impl Encryption {
    /// The cipher for guest data, or `None` for a plain image; a locked image refuses.
    pub(crate) fn data(&self) -> Result<Option<&Arc<DataCrypto>>> {
        match self {
            Encryption::None => Ok(None),
            Encryption::Locked => Err(Error::PassphraseRequired),
            Encryption::Unlocked(c) => Ok(Some(c)),
        }
    }

    pub(crate) fn is_encrypted(&self) -> bool {
        !matches!(self, Encryption::None)
    }
}

fn join_error(e: tokio::task::JoinError) -> Error {
    Error::Io {
        context: "running the cipher",
        source: std::io::Error::other(e.to_string()),
    }
}

impl DataCrypto {
    fn new(cipher: SectorCipher, iv_sector: IvSector) -> DataCrypto {
        DataCrypto {
            cipher,
            iv_sector,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// Encrypts (`enc`) or decrypts `buf`, whose first byte starts sector `sector`, on the
    /// blocking pool; large buffers are cut into sector-aligned parts processed in
    /// parallel.
    async fn run(self: &Arc<Self>, sector: u64, buf: Vec<u8>, enc: bool) -> Result<Vec<u8>> {
        let go = |c: Arc<DataCrypto>, s: u64, mut b: Vec<u8>| {
            tokio::task::spawn_blocking(move || {
                if enc {
                    c.cipher.encrypt(s, &mut b)
                } else {
                    c.cipher.decrypt(s, &mut b)
                }
                .map(|_| b)
            })
        };
        if buf.len() < 2 * MIN_PART || self.cores < 2 {
            return go(self.clone(), sector, buf).await.map_err(join_error)?;
        }
        let part = buf
            .len()
            .div_ceil(self.cores)
            .next_multiple_of(SECTOR_SIZE)
            .max(MIN_PART);
        let tasks: Vec<_> = buf
            .chunks(part)
            .enumerate()
            .map(|(i, c)| {
                go(
                    self.clone(),
                    sector + (i * part / SECTOR_SIZE) as u64,
                    c.to_vec(),
                )
            })
            .collect();
        let mut out = Vec::with_capacity(buf.len());
        for t in tasks {
            out.extend_from_slice(&t.await.map_err(join_error)??);
        }
        Ok(out)
    }

    /// Encrypts `buf` (whole sectors) starting at IV sector `sector`.
    pub(crate) async fn encrypt(self: &Arc<Self>, sector: u64, buf: Vec<u8>) -> Result<Vec<u8>> {
        self.run(sector, buf, true).await
    }

    /// Decrypts `buf` (whole sectors) starting at IV sector `sector`.
    pub(crate) async fn decrypt(self: &Arc<Self>, sector: u64, buf: Vec<u8>) -> Result<Vec<u8>> {
        self.run(sector, buf, false).await
    }
}

/// Sets up an image's encryption at open. Legacy AES needs a read-only open; without a
/// secret an encrypted image opens read-only and locked (for `info`, `check`, `map`), as
/// QEMU's metadata-only opens do.
pub(crate) async fn open(
    file: &Arc<dyn BlockFile>,
    hdr: &ImageHeader,
    secret: Option<&Secret>,
    read_only: bool,
) -> Result<Encryption> {
    let method = hdr.header.crypt_method;
    if method == CryptMethod::None {
        return Ok(Encryption::None);
    }
    let Some(secret) = secret else {
        return if read_only {
            Ok(Encryption::Locked)
        } else {
            Err(Error::PassphraseRequired)
        };
    };
    match method {
        CryptMethod::None => Ok(Encryption::None),
        CryptMethod::Aes => Ok(Encryption::Unlocked(Arc::new(DataCrypto::new(
            legacy::cipher(secret)?,
            IvSector::Guest,
        )))),
        CryptMethod::Luks => {
            let ext = hdr
                .encryption
                .ok_or_else(|| Error::Corrupt("Missing CRYPTO header for crypt method 2".into()))?;
            let cipher = unlock_luks(file, ext, secret).await?;
            Ok(Encryption::Unlocked(Arc::new(DataCrypto::new(
                cipher,
                IvSector::Host,
            ))))
        }
    }
}

/// Reads `len` bytes at `off` of the LUKS region, refusing anything past the region's
/// recorded length (QEMU: "Request for data outside of extension header").
async fn read_region(
    file: &Arc<dyn BlockFile>,
    ext: EncryptionExtension,
    off: u64,
    len: usize,
) -> Result<Vec<u8>> {
    match off.checked_add(len as u64) {
        Some(end) if end <= ext.length => {}
        _ => {
            return Err(Error::Corrupt(format!(
                "LUKS data [{off:#x}, +{len:#x}) lies outside the encryption header extension (length {:#x})",
                ext.length
            )))
        }
    }
    let b = file
        .read_at(IoBuf::zeroed(len, 1), ext.offset + off)
        .await
        .map_err(Error::io("reading the LUKS header"))?;
    Ok(b.into_vec())
}

/// Finds the key slot the passphrase opens and returns the data cipher keyed by the master
/// key. Slots are tried in order on the blocking pool (PBKDF2 is deliberately slow).
async fn unlock_luks(
    file: &Arc<dyn BlockFile>,
    ext: EncryptionExtension,
    secret: &Secret,
) -> Result<SectorCipher> {
    let raw = read_region(file, ext, 0, LUKS_HEADER_SIZE).await?;
    let header = LuksHeader::decode(&raw).map_err(Error::format("LUKS header"))?;
    header
        .validate_qemu()
        .map_err(Error::format("LUKS header"))?;
    let alg = LuksAlgorithms::from_header(&header)?;
    let header = Arc::new(header);
    for slot in header.key_slots.iter().filter(|s| s.active) {
        // `from_header` tied key_bytes to the cipher (at most 64) and `validate_qemu` fixed
        // stripes at 4000: the material is at most 256,000 bytes.
        let len = alg.key_bytes() * slot.stripes as usize;
        let off = u64::from(slot.key_material_offset_sectors) * LUKS_SECTOR_SIZE;
        let material = read_region(file, ext, off, len).await?;
        let (h, s, secret) = (header.clone(), *slot, secret.clone());
        let found =
            tokio::task::spawn_blocking(move || luks::try_slot(&alg, &h, &s, material, &secret))
                .await
                .map_err(join_error)??;
        if let Some(mk) = found {
            tracing::debug!(
                cipher = %header.cipher_name,
                mode = %header.cipher_mode,
                "LUKS key slot unlocked"
            );
            return alg.cipher(mk.bytes());
        }
    }
    Err(Error::WrongPassphrase)
}

/// A LUKS region ready to be written into a new image.
pub(crate) struct NewRegion {
    /// The bytes of the region from its start through slot 0's key material; the rest of
    /// the region is zeros.
    pub bytes: Vec<u8>,
    /// Length recorded in the header extension (the LUKS payload offset in bytes).
    pub length: u64,
}

/// Builds the LUKS region of a new image (key derivation on the blocking pool).
pub(crate) async fn new_region(o: &EncryptionOptions) -> Result<NewRegion> {
    let o = o.clone();
    tokio::task::spawn_blocking(move || {
        let v = luks::create(&o.algorithms, o.iterations, &o.secret)?;
        let off = v.header.key_slots[0].key_material_offset_sectors as usize * SECTOR_SIZE;
        let mut bytes = vec![0u8; off + v.slot0_material.len()];
        bytes[..LUKS_HEADER_SIZE]
            .copy_from_slice(&v.header.encode().map_err(Error::format("LUKS header"))?);
        bytes[off..].copy_from_slice(&v.slot0_material);
        Ok(NewRegion {
            bytes,
            length: u64::from(v.header.payload_offset_sectors) * LUKS_SECTOR_SIZE,
        })
    })
    .await
    .map_err(join_error)?
}

#[cfg(test)]
mod tests {
    use super::cipher::{CipherAlg, CipherMode, IvGenAlg};
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        let o = crate::OpenOptions {
            secret: Some(s.clone()),
            ..Default::default()
        };
        assert!(!format!("{o:?}").contains("hunter2"));
        let e = EncryptionOptions::luks(s);
        assert!(!format!("{e:?}").contains("hunter2"));
    }

    /// Splitting a buffer across blocking tasks gives the bytes one pass over it gives.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parallel_parts_match_one_pass() {
        let key = [9u8; 64];
        let mk = || SectorCipher::new(CipherAlg::Aes256, CipherMode::Xts, IvGenAlg::Plain64, &key);
        let mut c = DataCrypto::new(mk().unwrap(), IvSector::Host);
        c.cores = 3;
        let c = Arc::new(c);
        let plain: Vec<u8> = (0..(1 << 20) + 4096)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let mut expect = plain.clone();
        mk().unwrap().encrypt(77, &mut expect).unwrap();
        let got = c.encrypt(77, plain.clone()).await.unwrap();
        assert!(got == expect, "parallel encryption differs");
        assert!(c.decrypt(77, got).await.unwrap() == plain);
    }
}
