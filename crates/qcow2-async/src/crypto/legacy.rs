//! qcow's legacy AES encryption (crypt_method 1), as QEMU really implements it (reference
//! §6.2 and §10 item 1): AES-**128**-CBC whatever the spec says, keyed by the passphrase's
//! first 16 bytes (up to a NUL, as QEMU copies a C string) zero padded, with the plain64 IV
//! of the *guest* sector number. There is no key check: a wrong passphrase reads garbage.

use zeroize::Zeroizing;

use super::cipher::{CipherAlg, CipherMode, IvGenAlg, SectorCipher};
use super::Secret;
use crate::error::Result;

/// The 16-byte key QEMU's `qcrypto_block_qcow_init` derives from a passphrase.
pub(crate) fn key(secret: &Secret) -> Zeroizing<[u8; 16]> {
    let mut k = Zeroizing::new([0u8; 16]);
    let pass = secret.expose();
    let len = pass
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(pass.len())
        .min(16);
    k[..len].copy_from_slice(&pass[..len]);
    k
}

/// The data cipher of a legacy AES image.
pub(crate) fn cipher(secret: &Secret) -> Result<SectorCipher> {
    SectorCipher::new(
        CipherAlg::Aes128,
        CipherMode::Cbc,
        IvGenAlg::Plain64,
        &key(secret)[..],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_the_first_16_bytes_zero_padded() {
        assert_eq!(*key(&Secret::new("PASS")), *b"PASS\0\0\0\0\0\0\0\0\0\0\0\0");
        assert_eq!(
            *key(&Secret::new("0123456789abcdefTRUNCATED")),
            *b"0123456789abcdef"
        );
        assert_eq!(
            *key(&Secret::new("ab\0cd")),
            *b"ab\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
        );
    }

    /// AES-128-CBC of sector 5 of 32 0x5a bytes with key "PASS" zero padded and IV
    /// le64(5) || 0*8, computed independently with OpenSSL.
    #[test]
    fn known_sector() {
        let c = cipher(&Secret::new("PASS")).unwrap();
        let mut d = [0x5au8; 32];
        c.encrypt(5, &mut d).unwrap();
        assert_eq!(
            d.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "0e714fa01cf93197aa350a8e6854aa72b0a3e88070b1c2d85931cdd877995b6e"
        );
        c.decrypt(5, &mut d).unwrap();
        assert_eq!(d, [0x5a; 32]);
    }
}
