//! LUKS1 key handling as QEMU's `crypto/block-luks.c` does it (reference §6.1): PBKDF2 key
//! slots, the anti-forensic splitter, the master key digest, and creating slot 0.
//!
//! The on-disk layout is `qcow2_format::luks`; this module only adds the cryptography.

use std::time::{Duration, Instant};

use qcow2_format::luks::{parse_cipher_mode, KeySlot, LuksHeader, LUKS_STRIPES};
use zeroize::Zeroizing;

use super::cipher::{CipherAlg, CipherMode, HashAlg, IvGenAlg, SectorCipher};
use super::{random_bytes, Secret};
use crate::error::{Error, Result};

/// Length of the master key digest in the LUKS1 header.
const DIGEST_LEN: usize = 20;
/// QEMU's and cryptsetup's floor for PBKDF2 iterations chosen by timing.
const MIN_ITERATIONS: u64 = 1000;
/// The master key digest gets an eighth of a slot's time (cryptsetup's choice, which QEMU
/// copies: with all eight slots in use, trying them costs about one iteration time).
const MK_ITER_FRACTION: u64 = 8;

/// The master key: zeroized when dropped, never printed.
pub(crate) struct MasterKey(Zeroizing<Vec<u8>>);

impl MasterKey {
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// How many PBKDF2 iterations new key slots get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KdfIterations {
    /// Measure this machine's PBKDF2 speed and spend about this long per unlock (QEMU's
    /// `encrypt.iter-time`, default 2 s); at least 1000 iterations, as QEMU.
    Time(Duration),
    /// Exactly this many iterations for the key slot and for the master key digest
    /// (reproducible, and fast for tests).
    Count(u32),
}

impl Default for KdfIterations {
    fn default() -> Self {
        KdfIterations::Time(Duration::from_millis(2000))
    }
}

/// The algorithms of a LUKS volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LuksAlgorithms {
    /// Data cipher.
    pub cipher_alg: CipherAlg,
    /// Block mode.
    pub cipher_mode: CipherMode,
    /// IV generator.
    pub ivgen: IvGenAlg,
    /// Hash for PBKDF2 and the anti-forensic splitter.
    pub hash: HashAlg,
}

impl Default for LuksAlgorithms {
    /// QEMU's defaults: aes-256, xts, plain64, sha256.
    fn default() -> Self {
        LuksAlgorithms {
            cipher_alg: CipherAlg::Aes256,
            cipher_mode: CipherMode::Xts,
            ivgen: IvGenAlg::Plain64,
            hash: HashAlg::Sha256,
        }
    }
}

impl LuksAlgorithms {
    /// Reads the algorithms a header names, refusing what this engine does not implement.
    /// The master key length must be the one the cipher needs (which also bounds every
    /// allocation made from it).
    pub(crate) fn from_header(h: &LuksHeader) -> Result<Self> {
        let unsupported = |what: &'static str, v: &str| Error::unsupported(what, v.to_string());
        if h.cipher_name != "aes" {
            return Err(unsupported("LUKS cipher", &h.cipher_name));
        }
        let m = parse_cipher_mode(&h.cipher_mode).map_err(Error::format("LUKS cipher mode"))?;
        let cipher_mode =
            CipherMode::parse(m.mode).ok_or_else(|| unsupported("LUKS cipher mode", m.mode))?;
        let ivgen = match (m.ivgen, m.ivhash) {
            ("plain", None) => IvGenAlg::Plain,
            ("plain64", None) => IvGenAlg::Plain64,
            ("essiv", Some(hash)) => IvGenAlg::Essiv(
                HashAlg::parse(hash).ok_or_else(|| unsupported("LUKS ESSIV hash", hash))?,
            ),
            _ => return Err(unsupported("LUKS IV generator", &h.cipher_mode)),
        };
        let hash =
            HashAlg::parse(&h.hash_spec).ok_or_else(|| unsupported("LUKS hash", &h.hash_spec))?;
        let key_bytes = h.key_bytes as usize;
        let cipher_alg = [CipherAlg::Aes128, CipherAlg::Aes192, CipherAlg::Aes256]
            .into_iter()
            .find(|a| cipher_mode.key_len(*a) == key_bytes)
            .ok_or_else(|| {
                Error::unsupported(
                    "LUKS master key length",
                    format!("{key_bytes} bytes for aes-{}", cipher_mode.name()),
                )
            })?;
        Ok(LuksAlgorithms {
            cipher_alg,
            cipher_mode,
            ivgen,
            hash,
        })
    }

    /// Master key length in bytes.
    pub fn key_bytes(&self) -> usize {
        self.cipher_mode.key_len(self.cipher_alg)
    }

    /// The header's `cipher_mode` string, e.g. "xts-plain64" or "cbc-essiv:sha256".
    pub(crate) fn mode_string(&self) -> String {
        match self.ivgen {
            IvGenAlg::Essiv(h) => format!("{}-essiv:{}", self.cipher_mode.name(), h.name()),
            g => format!("{}-{}", self.cipher_mode.name(), g.name()),
        }
    }

    /// Refuses combinations no key can make work (ESSIV with a digest that is no AES key
    /// size), before anything is written.
    pub(crate) fn check(&self) -> Result<()> {
        self.cipher(&vec![0u8; self.key_bytes()]).map(|_| ())
    }

    /// The sector cipher keyed by `key` (a slot key or the master key).
    pub(crate) fn cipher(&self, key: &[u8]) -> Result<SectorCipher> {
        SectorCipher::new(self.cipher_alg, self.cipher_mode, self.ivgen, key)
    }
}

/// The hash-based diffusion of the anti-forensic splitter (cryptsetup's `diffuse`): each
/// digest-sized chunk j becomes the first bytes of hash(be32(j) || chunk).
fn diffuse(hash: HashAlg, buf: &mut [u8]) {
    let n = hash.digest_len();
    for (j, chunk) in buf.chunks_mut(n).enumerate() {
        let d = Zeroizing::new(hash.digest(&[&(j as u32).to_be_bytes(), chunk]));
        let len = chunk.len();
        chunk.copy_from_slice(&d[..len]);
    }
}

fn xor_into(acc: &mut [u8], other: &[u8]) {
    for (a, b) in acc.iter_mut().zip(other) {
        *a ^= b;
    }
}

/// Recovers the key from `stripes` stripes of `key_len` bytes.
pub(crate) fn af_merge(hash: HashAlg, split: &[u8], key_len: usize) -> Zeroizing<Vec<u8>> {
    let mut d = Zeroizing::new(vec![0u8; key_len]);
    let stripes = split.len() / key_len.max(1);
    if key_len == 0 || stripes == 0 {
        return d;
    }
    for stripe in split.chunks_exact(key_len).take(stripes - 1) {
        xor_into(&mut d, stripe);
        diffuse(hash, &mut d);
    }
    xor_into(&mut d, &split[(stripes - 1) * key_len..stripes * key_len]);
    d
}

/// Splits `key` into `stripes` stripes: all but the last random, the last chosen so that
/// [`af_merge`] gives `key` back.
pub(crate) fn af_split(hash: HashAlg, key: &[u8], stripes: u32) -> Result<Zeroizing<Vec<u8>>> {
    let n = key.len();
    let stripes = stripes as usize;
    let mut out = Zeroizing::new(vec![0u8; n * stripes]);
    if stripes == 0 {
        return Ok(out);
    }
    random_bytes(&mut out[..n * (stripes - 1)])?;
    let mut d = Zeroizing::new(vec![0u8; n]);
    for stripe in out[..n * (stripes - 1)].chunks_exact(n) {
        xor_into(&mut d, stripe);
        diffuse(hash, &mut d);
    }
    let last = &mut out[n * (stripes - 1)..];
    last.copy_from_slice(key);
    xor_into(last, &d);
    Ok(out)
}

/// Whether `key` matches the header's master key digest. Compared without early exit.
pub(crate) fn check_master_key(alg: &LuksAlgorithms, h: &LuksHeader, key: &[u8]) -> bool {
    let mut digest = [0u8; DIGEST_LEN];
    alg.hash
        .pbkdf2(key, &h.mk_digest_salt, h.mk_digest_iterations, &mut digest);
    digest
        .iter()
        .zip(&h.mk_digest)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// Tries one key slot: derives the slot key from the passphrase, decrypts the slot's key
/// material (`material`, exactly key_bytes × stripes bytes, sectors numbered from 0),
/// merges the stripes and checks the result against the master key digest.
pub(crate) fn try_slot(
    alg: &LuksAlgorithms,
    h: &LuksHeader,
    slot: &KeySlot,
    mut material: Vec<u8>,
    secret: &Secret,
) -> Result<Option<MasterKey>> {
    let n = alg.key_bytes();
    if material.len() != n * slot.stripes as usize {
        return Err(Error::InvalidArgument(
            "LUKS key material of the wrong length".into(),
        ));
    }
    let mut slot_key = Zeroizing::new(vec![0u8; n]);
    alg.hash
        .pbkdf2(secret.expose(), &slot.salt, slot.iterations, &mut slot_key);
    alg.cipher(&slot_key)?.decrypt(0, &mut material)?;
    let material = Zeroizing::new(material);
    let key = af_merge(alg.hash, &material, n);
    Ok(check_master_key(alg, h, &key).then(|| MasterKey(key)))
}

/// PBKDF2 iterations per second with `hash` on this machine, measured by running growing
/// batches until one takes long enough to time reliably.
fn iterations_per_second(hash: HashAlg, key_len: usize) -> u64 {
    let salt = [0x5au8; 32];
    let mut out = vec![0u8; key_len];
    let mut iters: u32 = 1 << 10;
    loop {
        let t = Instant::now();
        hash.pbkdf2(b"benchmark passphrase", &salt, iters, &mut out);
        let spent = t.elapsed();
        if spent >= Duration::from_millis(100) || iters >= 1 << 30 {
            return (u128::from(iters) * 1_000_000 / spent.as_micros().max(1)) as u64;
        }
        iters *= 2;
    }
}

fn timed_iterations(per_second: u64, time: Duration, divisor: u64) -> Result<u32> {
    let n = (u128::from(per_second) * time.as_millis() / 1000 / u128::from(divisor)) as u64;
    u32::try_from(n.max(MIN_ITERATIONS)).map_err(|_| {
        Error::InvalidArgument(format!(
            "PBKDF2 iteration count {n} for an iteration time of {time:?} does not fit 32 bits"
        ))
    })
}

/// A version 4 UUID as text.
fn random_uuid() -> Result<String> {
    let mut b = [0u8; 16];
    random_bytes(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

/// A new LUKS volume: its header and slot 0's encrypted key material.
pub(crate) struct NewVolume {
    pub header: LuksHeader,
    /// Key material of slot 0, to be written at its offset (relative to the header).
    pub slot0_material: Vec<u8>,
}

/// Creates a volume as `qcrypto_block_luks_create` does: a random master key and salts, the
/// digest, slot 0 keyed by `secret`, slots 1-7 disabled, QEMU's key-material layout.
pub(crate) fn create(
    alg: &LuksAlgorithms,
    iterations: KdfIterations,
    secret: &Secret,
) -> Result<NewVolume> {
    let n = alg.key_bytes();
    // Refuse combinations that cannot work before spending any time on them.
    alg.check()?;
    let mut master = Zeroizing::new(vec![0u8; n]);
    random_bytes(&mut master)?;
    let (slot_iters, mk_iters) = match iterations {
        KdfIterations::Count(0) => {
            return Err(Error::InvalidArgument(
                "PBKDF2 iteration count must be positive".into(),
            ))
        }
        KdfIterations::Count(c) => (c, c),
        KdfIterations::Time(t) => {
            let rate = iterations_per_second(alg.hash, n);
            (
                timed_iterations(rate, t, 1)?,
                timed_iterations(rate, t, MK_ITER_FRACTION)?,
            )
        }
    };
    let layout = LuksHeader::qemu_layout(n as u32).map_err(Error::format("LUKS layout"))?;
    let mut mk_digest_salt = [0u8; 32];
    random_bytes(&mut mk_digest_salt)?;
    let mut mk_digest = [0u8; DIGEST_LEN];
    alg.hash
        .pbkdf2(&master, &mk_digest_salt, mk_iters, &mut mk_digest);

    let mut key_slots = layout.key_slot_offsets.map(KeySlot::disabled);
    let slot = &mut key_slots[0];
    slot.active = true;
    slot.iterations = slot_iters;
    random_bytes(&mut slot.salt)?;
    let mut slot_key = Zeroizing::new(vec![0u8; n]);
    alg.hash
        .pbkdf2(secret.expose(), &slot.salt, slot_iters, &mut slot_key);
    let split = af_split(alg.hash, &master, LUKS_STRIPES)?;
    let mut material = split.to_vec();
    alg.cipher(&slot_key)?.encrypt(0, &mut material)?;

    let header = LuksHeader {
        cipher_name: "aes".into(),
        cipher_mode: alg.mode_string(),
        hash_spec: alg.hash.name().into(),
        payload_offset_sectors: layout.payload_offset_sectors,
        key_bytes: n as u32,
        mk_digest,
        mk_digest_salt,
        mk_digest_iterations: mk_iters,
        uuid: random_uuid()?,
        key_slots,
    };
    Ok(NewVolume {
        header,
        slot0_material: material,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 6070 PBKDF2-HMAC-SHA1 vectors (the 16,777,216-iteration one is left out for time).
    #[test]
    fn pbkdf2_sha1_rfc6070() {
        let cases: [(&[u8], &[u8], u32, &str); 5] = [
            (
                b"password",
                b"salt",
                1,
                "0c60c80f961f0e71f3a9b524af6012062fe037a6",
            ),
            (
                b"password",
                b"salt",
                2,
                "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957",
            ),
            (
                b"password",
                b"salt",
                4096,
                "4b007901b765489abead49d926f721d065a429c1",
            ),
            (
                b"passwordPASSWORDpassword",
                b"saltSALTsaltSALTsaltSALTsaltSALTsalt",
                4096,
                "3d2eec4fe41c849b80c8d83662c0e44a8b291a964cf2f07038",
            ),
            (
                b"pass\0word",
                b"sa\0lt",
                4096,
                "56fa6aa75548099dcc37d7f03425e0c3",
            ),
        ];
        for (p, s, c, want) in cases {
            let want = hex(want);
            let mut out = vec![0u8; want.len()];
            HashAlg::Sha1.pbkdf2(p, s, c, &mut out);
            assert_eq!(out, want, "{c} iterations");
        }
    }

    /// The widely published PBKDF2-HMAC-SHA256 vectors (RFC 7914 §11 and the RFC 6070-style
    /// set for SHA-256).
    #[test]
    fn pbkdf2_sha256_vectors() {
        let cases: [(&[u8], &[u8], u32, &str); 4] = [
            (
                b"passwd",
                b"salt",
                1,
                "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783",
            ),
            (
                b"Password",
                b"NaCl",
                80000,
                "4ddcd8f60b98be21830cee5ef22701f9641a4418d04c0414aeff08876b34ab56a1d425a1225833549adb841b51c9b3176a272bdebba1d078478f62b397f33c8d",
            ),
            (
                b"password",
                b"salt",
                1,
                "120fb6cffcf8b32c43e7225256c4f837a86548c92ccc35480805987cb70be17b",
            ),
            (
                b"password",
                b"salt",
                4096,
                "c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a",
            ),
        ];
        for (p, s, c, want) in cases {
            let want = hex(want);
            let mut out = vec![0u8; want.len()];
            HashAlg::Sha256.pbkdf2(p, s, c, &mut out);
            assert_eq!(out, want, "{c} iterations");
        }
    }

    /// The splitter round-trips, the result depends on every stripe, and a two-stripe merge
    /// spelled out by hand matches (the diffusion chunks by digest size, the last chunk
    /// short). Compatibility with QEMU's splitter is proven by the qemu-img image tests.
    #[test]
    fn anti_forensic_split_and_merge() {
        for hash in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            let key: Vec<u8> = (0..64).map(|i| (i * 3) as u8).collect();
            let split = af_split(hash, &key, 4000).unwrap();
            assert_eq!(split.len(), 64 * 4000);
            assert_eq!(*af_merge(hash, &split, 64), key);
            let mut bad = split.to_vec();
            bad[64 * 17] ^= 1;
            assert_ne!(*af_merge(hash, &bad, 64), key);
        }
        // d = diffuse(0 ^ s0); key = d ^ s1, with diffuse over 32-byte chunks of a 40-byte
        // key: chunk 0 = sha256(be32(0) || 01*32), chunk 1 = sha256(be32(1) || 01*8)[..8].
        let mut split = vec![1u8; 40];
        split.extend_from_slice(&[2u8; 40]);
        let mut expect = HashAlg::Sha256.digest(&[&[0, 0, 0, 0], &[1u8; 32]]);
        expect.extend_from_slice(&HashAlg::Sha256.digest(&[&[0, 0, 0, 1], &[1u8; 8]])[..8]);
        for b in &mut expect {
            *b ^= 2;
        }
        assert_eq!(*af_merge(HashAlg::Sha256, &split, 40), expect);
    }

    #[test]
    fn create_then_unlock() {
        let secret = Secret::new("correct horse");
        for alg in [
            LuksAlgorithms::default(),
            LuksAlgorithms {
                cipher_alg: CipherAlg::Aes128,
                cipher_mode: CipherMode::Cbc,
                ivgen: IvGenAlg::Essiv(HashAlg::Sha256),
                hash: HashAlg::Sha1,
            },
            LuksAlgorithms {
                cipher_alg: CipherAlg::Aes192,
                cipher_mode: CipherMode::Cbc,
                ivgen: IvGenAlg::Plain,
                hash: HashAlg::Sha256,
            },
        ] {
            let v = create(&alg, KdfIterations::Count(100), &secret).unwrap();
            let h = &v.header;
            h.validate_qemu().unwrap();
            assert_eq!(LuksAlgorithms::from_header(h).unwrap(), alg);
            assert_eq!(h.key_slots[0].iterations, 100);
            assert!(h.key_slots[1..].iter().all(|s| !s.active));
            let back = LuksHeader::decode(&h.encode().unwrap()).unwrap();
            let mk = try_slot(
                &alg,
                &back,
                &back.key_slots[0],
                v.slot0_material.clone(),
                &secret,
            )
            .unwrap()
            .expect("the passphrase unlocks slot 0");
            assert_eq!(mk.bytes().len(), alg.key_bytes());
            assert!(check_master_key(&alg, &back, mk.bytes()));
            let mut other = mk.bytes().to_vec();
            other[0] ^= 1;
            assert!(!check_master_key(&alg, &back, &other));
            let wrong = try_slot(
                &alg,
                &back,
                &back.key_slots[0],
                v.slot0_material.clone(),
                &Secret::new("correct horsf"),
            )
            .unwrap();
            assert!(wrong.is_none());
        }
        assert_eq!(
            LuksAlgorithms::default().mode_string(),
            "xts-plain64".to_string()
        );
        let uuid = random_uuid().unwrap();
        assert_eq!(uuid.len(), 36);
        assert_eq!(&uuid[14..15], "4");
    }

    #[test]
    fn timed_iterations_have_qemus_floor() {
        assert_eq!(
            timed_iterations(10, Duration::from_millis(10), 1).unwrap(),
            1000
        );
        assert_eq!(
            timed_iterations(1_000_000, Duration::from_millis(2000), 8).unwrap(),
            250_000
        );
        assert!(timed_iterations(u64::MAX / 2, Duration::from_secs(100), 1).is_err());
        assert!(iterations_per_second(HashAlg::Sha256, 32) > 0);
    }

    #[test]
    fn header_algorithms_refused() {
        let v = create(
            &LuksAlgorithms::default(),
            KdfIterations::Count(10),
            &Secret::new("x"),
        )
        .unwrap();
        let with = |f: &dyn Fn(&mut LuksHeader)| {
            let mut h = v.header.clone();
            f(&mut h);
            LuksAlgorithms::from_header(&h)
        };
        assert!(with(&|h| h.cipher_name = "serpent".into()).is_err());
        assert!(with(&|h| h.cipher_mode = "ctr-plain64".into()).is_err());
        assert!(with(&|h| h.cipher_mode = "xts-essiv".into()).is_err());
        assert!(with(&|h| h.cipher_mode = "xts-plain64:sha256".into()).is_err());
        assert!(with(&|h| h.hash_spec = "md5".into()).is_err());
        assert!(with(&|h| h.key_bytes = 1 << 30).is_err());
        assert_eq!(
            with(&|h| h.key_bytes = 32).unwrap().cipher_alg,
            CipherAlg::Aes128
        );
    }
}
