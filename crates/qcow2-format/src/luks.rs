//! LUKS1 header layout, as embedded in qcow2 images with `crypt_method = 2` (reference §6.1).
//!
//! Only the on-disk structure lives here: no key derivation or ciphers. The header sits at
//! the start of the region named by the qcow2 crypto header extension; key-material offsets
//! are in 512-byte sectors relative to that start.

use crate::codec::{Reader, Writer};
use crate::error::{Error, Result};

/// Size of the LUKS1 partition header in bytes.
pub const LUKS_HEADER_SIZE: usize = 592;
/// LUKS1 magic: "LUKS\xba\xbe".
pub const LUKS_MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// The only LUKS version QEMU (and this crate) supports.
pub const LUKS_VERSION: u16 = 1;
/// Number of key slots.
pub const LUKS_NUM_KEY_SLOTS: usize = 8;
/// LUKS sector size; all sector counts in the header use it.
pub const LUKS_SECTOR_SIZE: u64 = 512;
/// Anti-forensic stripes per key slot; QEMU requires exactly this many.
pub const LUKS_STRIPES: u32 = 4000;
/// First sector of the key-material area (4096 bytes, leaving room for the header). Key
/// material of each slot is also rounded up to a multiple of this, following cryptsetup.
pub const LUKS_KEY_SLOT_AREA_SECTORS: u32 = 8;
/// Key slot `active` value for an enabled slot.
pub const LUKS_KEY_SLOT_ENABLED: u32 = 0x00AC_71F3;
/// Key slot `active` value for a disabled slot.
pub const LUKS_KEY_SLOT_DISABLED: u32 = 0x0000_DEAD;

const NAME_FIELD: usize = 32;
const UUID_FIELD: usize = 40;
const DIGEST_LEN: usize = 20;
const SALT_LEN: usize = 32;

/// One LUKS1 key slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySlot {
    /// Enabled (`0x00AC71F3`) or disabled (`0x0000DEAD`); other values are corrupt.
    pub active: bool,
    /// PBKDF2 iterations for this slot's passphrase.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; SALT_LEN],
    /// Start of the slot's key material, in sectors from the start of the LUKS header.
    pub key_material_offset_sectors: u32,
    /// Anti-forensic stripes.
    pub stripes: u32,
}

/// A LUKS1 partition header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksHeader {
    /// Cipher name, e.g. "aes".
    pub cipher_name: String,
    /// Cipher mode, `"<mode>-<ivgen>[:<ivhash>]"`, e.g. "xts-plain64"; see [`parse_cipher_mode`].
    pub cipher_mode: String,
    /// Hash for PBKDF2 and the AF splitter, e.g. "sha256".
    pub hash_spec: String,
    /// Start of the encrypted payload in sectors; for qcow2 this times 512 is the length of
    /// the LUKS region.
    pub payload_offset_sectors: u32,
    /// Master key length in bytes.
    pub key_bytes: u32,
    /// PBKDF2 digest of the master key, used to recognise the right key.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Salt for the master key digest.
    pub mk_digest_salt: [u8; SALT_LEN],
    /// PBKDF2 iterations for the master key digest.
    pub mk_digest_iterations: u32,
    /// Volume UUID as ASCII text.
    pub uuid: String,
    /// The eight key slots.
    pub key_slots: [KeySlot; LUKS_NUM_KEY_SLOTS],
}

/// Where QEMU places key material and payload for a given master key length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LuksLayout {
    /// Sectors of key material per slot (already rounded to a multiple of 8).
    pub key_material_sectors: u32,
    /// Key material offset of each slot, in sectors from the header start.
    pub key_slot_offsets: [u32; LUKS_NUM_KEY_SLOTS],
    /// Payload offset in sectors: the end of the last slot's key material.
    pub payload_offset_sectors: u32,
}

impl LuksLayout {
    /// Bytes of the whole LUKS region (header plus key material), which is the length QEMU
    /// records in the qcow2 crypto header extension.
    pub fn region_bytes(&self) -> u64 {
        u64::from(self.payload_offset_sectors) * LUKS_SECTOR_SIZE
    }
}

/// Sectors of key material one slot occupies: ceil(key_bytes * stripes / 512), rounded up to
/// a multiple of 8 sectors (QEMU follows cryptsetup here rather than the LUKS1 spec text).
/// Computed in 64 bits, where it cannot overflow for any 32-bit inputs.
pub fn key_material_sectors(key_bytes: u32, stripes: u32) -> u64 {
    let bytes = u64::from(key_bytes) * u64::from(stripes);
    let sectors = bytes.div_ceil(LUKS_SECTOR_SIZE);
    sectors.div_ceil(u64::from(LUKS_KEY_SLOT_AREA_SECTORS)) * u64::from(LUKS_KEY_SLOT_AREA_SECTORS)
}

/// A parsed LUKS cipher mode string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CipherMode<'a> {
    /// Block cipher mode, e.g. "xts", "cbc".
    pub mode: &'a str,
    /// IV generator, e.g. "plain64", "essiv".
    pub ivgen: &'a str,
    /// Hash for the IV generator (ESSIV), if any.
    pub ivhash: Option<&'a str>,
}

/// Splits `"<mode>-<ivgen>[:<ivhash>]"` the way QEMU does: at the first '-', then at the first
/// ':' after it. Empty components are refused, since no algorithm has an empty name.
pub fn parse_cipher_mode(s: &str) -> Result<CipherMode<'_>> {
    let bad = || Error::Unsupported {
        what: "LUKS cipher mode",
        detail: format!("unexpected format {s:?}"),
    };
    let (mode, rest) = s.split_once('-').ok_or_else(bad)?;
    let (ivgen, ivhash) = match rest.split_once(':') {
        Some((g, h)) => (g, Some(h)),
        None => (rest, None),
    };
    if mode.is_empty() || ivgen.is_empty() || ivhash == Some("") {
        return Err(bad());
    }
    Ok(CipherMode {
        mode,
        ivgen,
        ivhash,
    })
}

/// Reads a NUL-terminated string from a fixed field. `need_nul` mirrors QEMU, which insists
/// on a terminator for the algorithm names (they are used as C strings) but not the UUID.
fn read_fixed_string(field: &[u8], what: &'static str, need_nul: bool) -> Result<String> {
    let end = match field.iter().position(|&b| b == 0) {
        Some(i) => i,
        None if need_nul => return Err(Error::BadString { what }),
        None => field.len(),
    };
    String::from_utf8(field[..end].to_vec()).map_err(|_| Error::BadString { what })
}

/// Writes `s` NUL-padded into a fixed field of `N` bytes; `max` is the longest allowed text.
fn write_fixed_string<const N: usize>(
    w: &mut Writer,
    s: &str,
    what: &'static str,
    max: usize,
) -> Result<()> {
    if s.as_bytes().contains(&0) {
        return Err(Error::BadString { what });
    }
    if s.len() > max {
        return Err(Error::limit(what, s.len() as u64, max as u64));
    }
    let mut field = [0u8; N];
    field[..s.len()].copy_from_slice(s.as_bytes());
    w.bytes(&field);
    Ok(())
}

impl KeySlot {
    /// A disabled slot as QEMU creates it: no salt or iterations, but stripes and offset set.
    pub fn disabled(key_material_offset_sectors: u32) -> KeySlot {
        KeySlot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_material_offset_sectors,
            stripes: LUKS_STRIPES,
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        let active = match r.u32()? {
            LUKS_KEY_SLOT_ENABLED => true,
            LUKS_KEY_SLOT_DISABLED => false,
            other => {
                return Err(Error::invalid(
                    "LUKS key slot state",
                    other.into(),
                    "neither enabled nor disabled",
                ))
            }
        };
        Ok(KeySlot {
            active,
            iterations: r.u32()?,
            salt: r.array()?,
            key_material_offset_sectors: r.u32()?,
            stripes: r.u32()?,
        })
    }

    fn encode(&self, w: &mut Writer) {
        w.u32(if self.active {
            LUKS_KEY_SLOT_ENABLED
        } else {
            LUKS_KEY_SLOT_DISABLED
        });
        w.u32(self.iterations);
        w.bytes(&self.salt);
        w.u32(self.key_material_offset_sectors);
        w.u32(self.stripes);
    }
}

impl LuksHeader {
    /// Decodes the header from the first 592 bytes of `bytes` (more may follow).
    ///
    /// Structural problems are errors here: wrong magic, a version other than 1
    /// ([`Error::Unsupported`], as QEMU refuses LUKS2), algorithm names without a NUL
    /// terminator inside their field, non-UTF-8 text, and key slot states other than
    /// enabled/disabled. QEMU's semantic checks are in [`Self::validate_qemu`].
    pub fn decode(bytes: &[u8]) -> Result<LuksHeader> {
        let mut r = Reader::new(bytes, "LUKS header");
        let magic: [u8; 6] = r.array()?;
        if magic != LUKS_MAGIC {
            let mut wide = [0u8; 8];
            wide[2..].copy_from_slice(&magic);
            return Err(Error::BadMagic {
                what: "LUKS header",
                found: u64::from_be_bytes(wide),
            });
        }
        let version = r.u16()?;
        if version != LUKS_VERSION {
            return Err(Error::Unsupported {
                what: "LUKS version",
                detail: format!("version {version}"),
            });
        }
        // Make a short input fail as truncated before any field is interpreted further.
        if bytes.len() < LUKS_HEADER_SIZE {
            return Err(Error::truncated(
                "LUKS header",
                LUKS_HEADER_SIZE,
                bytes.len(),
            ));
        }
        let cipher_name = read_fixed_string(r.bytes(NAME_FIELD)?, "LUKS cipher name", true)?;
        let cipher_mode = read_fixed_string(r.bytes(NAME_FIELD)?, "LUKS cipher mode", true)?;
        let hash_spec = read_fixed_string(r.bytes(NAME_FIELD)?, "LUKS hash spec", true)?;
        let payload_offset_sectors = r.u32()?;
        let key_bytes = r.u32()?;
        let mk_digest = r.array()?;
        let mk_digest_salt = r.array()?;
        let mk_digest_iterations = r.u32()?;
        let uuid = read_fixed_string(r.bytes(UUID_FIELD)?, "LUKS uuid", false)?;
        let mut key_slots = [KeySlot::disabled(0); LUKS_NUM_KEY_SLOTS];
        for slot in &mut key_slots {
            *slot = KeySlot::decode(&mut r)?;
        }
        Ok(LuksHeader {
            cipher_name,
            cipher_mode,
            hash_spec,
            payload_offset_sectors,
            key_bytes,
            mk_digest,
            mk_digest_salt,
            mk_digest_iterations,
            uuid,
            key_slots,
        })
    }

    /// Encodes the 592-byte header, text fields NUL padded.
    ///
    /// Fails if a text field does not fit (algorithm names need their NUL terminator, so at
    /// most 31 bytes; the UUID at most 40) or contains NUL.
    pub fn encode(&self) -> Result<[u8; LUKS_HEADER_SIZE]> {
        let mut w = Writer::with_capacity(LUKS_HEADER_SIZE);
        w.bytes(&LUKS_MAGIC);
        w.u16(LUKS_VERSION);
        write_fixed_string::<NAME_FIELD>(&mut w, &self.cipher_name, "LUKS cipher name", 31)?;
        write_fixed_string::<NAME_FIELD>(&mut w, &self.cipher_mode, "LUKS cipher mode", 31)?;
        write_fixed_string::<NAME_FIELD>(&mut w, &self.hash_spec, "LUKS hash spec", 31)?;
        w.u32(self.payload_offset_sectors);
        w.u32(self.key_bytes);
        w.bytes(&self.mk_digest);
        w.bytes(&self.mk_digest_salt);
        w.u32(self.mk_digest_iterations);
        write_fixed_string::<UUID_FIELD>(&mut w, &self.uuid, "LUKS uuid", UUID_FIELD)?;
        for slot in &self.key_slots {
            slot.encode(&mut w);
        }
        <[u8; LUKS_HEADER_SIZE]>::try_from(w.into_inner())
            .map_err(|v| Error::invalid("LUKS header size", v.len() as u64, "internal layout"))
    }

    /// The layout QEMU creates for a master key of `key_bytes`: slots packed back to back
    /// from sector 8, each [`key_material_sectors`]`(key_bytes, 4000)` long, payload right
    /// after slot 7. For the default 64-byte key: 504 sectors per slot, slots at 8, 512, …,
    /// 3536, payload at 4040.
    pub fn qemu_layout(key_bytes: u32) -> Result<LuksLayout> {
        let per_slot = u32::try_from(key_material_sectors(key_bytes, LUKS_STRIPES))
            .map_err(|_| Error::overflow("LUKS key material size"))?;
        let mut key_slot_offsets = [0u32; LUKS_NUM_KEY_SLOTS];
        let mut next = LUKS_KEY_SLOT_AREA_SECTORS;
        for off in &mut key_slot_offsets {
            *off = next;
            next = next
                .checked_add(per_slot)
                .ok_or_else(|| Error::overflow("LUKS layout"))?;
        }
        Ok(LuksLayout {
            key_material_sectors: per_slot,
            key_slot_offsets,
            payload_offset_sectors: next,
        })
    }

    /// The parsed [`Self::cipher_mode`].
    pub fn parsed_cipher_mode(&self) -> Result<CipherMode<'_>> {
        parse_cipher_mode(&self.cipher_mode)
    }

    /// QEMU's `qcrypto_block_luks_check_header` checks for a non-detached header, in its
    /// order: payload after the key-slot area start, non-zero digest iterations, and for each
    /// slot 4000 stripes, non-zero iterations if enabled, material after the header, before
    /// the payload, and not overlapping any other slot's material.
    pub fn validate_qemu(&self) -> Result<()> {
        let area_start = u64::from(LUKS_KEY_SLOT_AREA_SECTORS);
        let payload = u64::from(self.payload_offset_sectors);
        if payload < area_start {
            return Err(Error::invalid(
                "LUKS payload offset",
                payload,
                "overlaps the LUKS header",
            ));
        }
        if self.mk_digest_iterations == 0 {
            return Err(Error::invalid(
                "LUKS master key digest iterations",
                0,
                "must be non-zero",
            ));
        }
        let extent = |s: &KeySlot| {
            let start = u64::from(s.key_material_offset_sectors);
            (
                start,
                start + key_material_sectors(self.key_bytes, s.stripes),
            )
        };
        for (i, slot) in self.key_slots.iter().enumerate() {
            if slot.stripes != LUKS_STRIPES {
                return Err(Error::invalid(
                    "LUKS key slot stripes",
                    slot.stripes.into(),
                    "QEMU requires 4000",
                ));
            }
            if slot.active && slot.iterations == 0 {
                return Err(Error::invalid(
                    "LUKS key slot iterations",
                    0,
                    "must be non-zero for an enabled slot",
                ));
            }
            let (start, end) = extent(slot);
            if start < area_start {
                return Err(Error::Overlap {
                    what: "LUKS key slot material",
                    other: "LUKS header",
                });
            }
            if end > payload {
                return Err(Error::Overlap {
                    what: "LUKS key slot material",
                    other: "LUKS payload",
                });
            }
            for other in &self.key_slots[i + 1..] {
                let (s2, e2) = extent(other);
                if end > s2 && e2 > start {
                    return Err(Error::Overlap {
                        what: "LUKS key slot material",
                        other: "another key slot's material",
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A header as QEMU creates it with default options (slot 0 active).
    fn qemu_default() -> LuksHeader {
        let layout = LuksHeader::qemu_layout(64).unwrap();
        let mut key_slots = layout.key_slot_offsets.map(KeySlot::disabled);
        key_slots[0].active = true;
        key_slots[0].iterations = 1000;
        key_slots[0].salt = [7; 32];
        LuksHeader {
            cipher_name: "aes".into(),
            cipher_mode: "xts-plain64".into(),
            hash_spec: "sha256".into(),
            payload_offset_sectors: layout.payload_offset_sectors,
            key_bytes: 64,
            mk_digest: [1; 20],
            mk_digest_salt: [2; 32],
            mk_digest_iterations: 1000,
            uuid: "01234567-89ab-cdef-0123-456789abcdef".into(),
            key_slots,
        }
    }

    #[test]
    fn default_layout_matches_reference() {
        let l = LuksHeader::qemu_layout(64).unwrap();
        assert_eq!(l.key_material_sectors, 504);
        assert_eq!(
            l.key_slot_offsets,
            [8, 512, 1016, 1520, 2024, 2528, 3032, 3536]
        );
        assert_eq!(l.payload_offset_sectors, 4040);
        // Reference §6.1 [EXP]: crypto extension length 0x1f9000.
        assert_eq!(l.region_bytes(), 0x1f9000);
        assert_eq!(key_material_sectors(32, 4000), 256);
        assert_eq!(key_material_sectors(16, 4000), 128);
        assert_eq!(key_material_sectors(1, 1), 8);
        assert_eq!(key_material_sectors(0, 4000), 0);
        assert_eq!(
            key_material_sectors(u32::MAX, u32::MAX),
            (u64::from(u32::MAX) * u64::from(u32::MAX)).div_ceil(4096) * 8
        );
        assert!(LuksHeader::qemu_layout(u32::MAX).is_err());
    }

    #[test]
    fn encode_layout_and_decode() {
        let h = qemu_default();
        let b = h.encode().unwrap();
        assert_eq!(&b[..8], b"LUKS\xba\xbe\x00\x01");
        assert_eq!(&b[8..12], b"aes\0");
        assert_eq!(&b[40..52], b"xts-plain64\0");
        assert_eq!(&b[104..108], &4040u32.to_be_bytes());
        assert_eq!(&b[108..112], &64u32.to_be_bytes());
        assert_eq!(&b[208..212], &LUKS_KEY_SLOT_ENABLED.to_be_bytes());
        assert_eq!(&b[208 + 40..208 + 48], &[0, 0, 0, 8, 0, 0, 0x0f, 0xa0]);
        assert_eq!(&b[256..260], &LUKS_KEY_SLOT_DISABLED.to_be_bytes());
        assert_eq!(LuksHeader::decode(&b).unwrap(), h);
        // Trailing key material is ignored.
        let mut long = b.to_vec();
        long.extend_from_slice(&[0xee; 100]);
        assert_eq!(LuksHeader::decode(&long).unwrap(), h);
        h.validate_qemu().unwrap();
    }

    #[test]
    fn decode_errors() {
        let good = qemu_default().encode().unwrap();
        let with = |f: &dyn Fn(&mut [u8])| {
            let mut b = good;
            f(&mut b);
            LuksHeader::decode(&b)
        };
        assert!(matches!(
            with(&|b| b[0] = b'X'),
            Err(Error::BadMagic { .. })
        ));
        assert!(matches!(
            with(&|b| b[7] = 2),
            Err(Error::Unsupported { .. })
        ));
        assert!(matches!(
            with(&|b| b[8..40].fill(b'a')),
            Err(Error::BadString { .. })
        ));
        assert!(matches!(
            with(&|b| b[72] = 0xff),
            Err(Error::BadString { .. })
        ));
        assert!(matches!(
            with(&|b| b[208 + 48 * 2 + 3] = 1),
            Err(Error::InvalidField { .. })
        ));
        // A UUID filling its whole field is accepted (QEMU does not require a NUL there).
        let h = with(&|b| b[168..208].fill(b'u')).unwrap();
        assert_eq!(h.uuid, "u".repeat(40));
        for n in 0..LUKS_HEADER_SIZE {
            assert!(LuksHeader::decode(&good[..n]).is_err());
        }
    }

    #[test]
    fn encode_errors() {
        let mut h = qemu_default();
        h.cipher_name = "a".repeat(32);
        assert!(matches!(h.encode(), Err(Error::LimitExceeded { .. })));
        h.cipher_name = "a".repeat(31);
        assert!(h.encode().is_ok());
        h.uuid = "u".repeat(41);
        assert!(h.encode().is_err());
        h.uuid = "u\0".into();
        assert!(matches!(h.encode(), Err(Error::BadString { .. })));
    }

    #[test]
    fn qemu_checks() {
        let bad = |f: &dyn Fn(&mut LuksHeader)| {
            let mut h = qemu_default();
            f(&mut h);
            h.validate_qemu()
        };
        assert!(bad(&|h| h.payload_offset_sectors = 1).is_err());
        assert!(bad(&|h| h.mk_digest_iterations = 0).is_err());
        assert!(bad(&|h| h.key_slots[3].stripes = 5).is_err());
        assert!(bad(&|h| h.key_slots[0].iterations = 0).is_err());
        assert!(bad(&|h| h.key_slots[1].iterations = 0).is_ok());
        assert!(matches!(
            bad(&|h| h.key_slots[0].key_material_offset_sectors = 1),
            Err(Error::Overlap {
                other: "LUKS header",
                ..
            })
        ));
        assert!(matches!(
            bad(&|h| h.key_slots[7].key_material_offset_sectors = 4000),
            Err(Error::Overlap {
                other: "LUKS payload",
                ..
            })
        ));
        assert!(matches!(
            bad(&|h| h.key_slots[5].key_material_offset_sectors = 2024),
            Err(Error::Overlap {
                other: "another key slot's material",
                ..
            })
        ));
    }

    #[test]
    fn cipher_modes() {
        let m = parse_cipher_mode("xts-plain64").unwrap();
        assert_eq!((m.mode, m.ivgen, m.ivhash), ("xts", "plain64", None));
        let m = parse_cipher_mode("cbc-essiv:sha256").unwrap();
        assert_eq!(
            (m.mode, m.ivgen, m.ivhash),
            ("cbc", "essiv", Some("sha256"))
        );
        // QEMU splits at the first '-' only.
        let m = parse_cipher_mode("cbc-essiv-x:sha-1").unwrap();
        assert_eq!(
            (m.mode, m.ivgen, m.ivhash),
            ("cbc", "essiv-x", Some("sha-1"))
        );
        for bad in ["", "xts", "-plain64", "xts-", "cbc-essiv:", "cbc-:sha256"] {
            assert!(parse_cipher_mode(bad).is_err(), "{bad}");
        }
        assert_eq!(
            qemu_default().parsed_cipher_mode().unwrap().ivgen,
            "plain64"
        );
    }

    fn arb_slot() -> impl Strategy<Value = KeySlot> {
        (
            any::<bool>(),
            any::<u32>(),
            any::<[u8; 32]>(),
            any::<u32>(),
            any::<u32>(),
        )
            .prop_map(
                |(active, iterations, salt, key_material_offset_sectors, stripes)| KeySlot {
                    active,
                    iterations,
                    salt,
                    key_material_offset_sectors,
                    stripes,
                },
            )
    }

    fn arb_header() -> impl Strategy<Value = LuksHeader> {
        (
            (
                "[^\u{0}]{0,10}",
                "[a-z0-9:-]{0,31}",
                "[a-z0-9]{0,31}",
                "[ -~]{0,40}",
            ),
            (
                any::<u32>(),
                any::<u32>(),
                any::<[u8; 20]>(),
                any::<[u8; 32]>(),
                any::<u32>(),
            ),
            proptest::array::uniform8(arb_slot()),
        )
            .prop_map(
                |(
                    (cipher_name, cipher_mode, hash_spec, uuid),
                    (payload_offset_sectors, key_bytes, mk_digest, mk_digest_salt, iters),
                    key_slots,
                )| LuksHeader {
                    cipher_name,
                    cipher_mode,
                    hash_spec,
                    payload_offset_sectors,
                    key_bytes,
                    mk_digest,
                    mk_digest_salt,
                    mk_digest_iterations: iters,
                    uuid,
                    key_slots,
                },
            )
            .prop_filter("cipher name fits its field", |h| h.cipher_name.len() <= 31)
    }

    proptest! {
        #[test]
        fn round_trip(h in arb_header()) {
            let b = h.encode().unwrap();
            let back = LuksHeader::decode(&b).unwrap();
            prop_assert_eq!(&back, &h);
            prop_assert_eq!(back.encode().unwrap(), b);
            let _ = back.validate_qemu();
            let _ = back.parsed_cipher_mode();
        }

        #[test]
        fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let _ = LuksHeader::decode(&bytes);
            // Also exercise the paths past the magic and version checks.
            if bytes.len() >= 8 {
                bytes[..8].copy_from_slice(b"LUKS\xba\xbe\x00\x01");
            }
            if let Ok(h) = LuksHeader::decode(&bytes) {
                let _ = h.validate_qemu();
                let _ = h.parsed_cipher_mode();
                let _ = h.encode();
            }
        }

        #[test]
        fn layout_is_consistent(key_bytes in 0u32..=4096) {
            let l = LuksHeader::qemu_layout(key_bytes).unwrap();
            prop_assert_eq!(l.key_material_sectors % 8, 0);
            prop_assert!(u64::from(l.key_material_sectors) * 512 >= u64::from(key_bytes) * 4000);
            prop_assert_eq!(
                l.payload_offset_sectors,
                l.key_slot_offsets[7] + l.key_material_sectors
            );
        }
    }
}
