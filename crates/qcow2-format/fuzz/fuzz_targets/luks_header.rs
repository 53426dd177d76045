//! `LuksHeader::decode` on arbitrary bytes; whatever decodes must encode and decode back to
//! the same header. QEMU's checks, cipher mode parsing and layout must not panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_format::luks::{key_material_sectors, LuksHeader, LUKS_HEADER_SIZE};

fuzz_target!(|data: &[u8]| {
    let Ok(h) = LuksHeader::decode(data) else {
        if data.len() >= 112 {
            let key_bytes = u32::from_be_bytes(data[108..112].try_into().unwrap());
            let _ = LuksHeader::qemu_layout(key_bytes);
            let _ = key_material_sectors(key_bytes, u32::from_be_bytes(data[..4].try_into().unwrap()));
        }
        return;
    };
    assert!(data.len() >= LUKS_HEADER_SIZE);
    let _ = h.validate_qemu();
    let _ = h.parsed_cipher_mode();
    if let Ok(layout) = LuksHeader::qemu_layout(h.key_bytes) {
        let _ = layout.region_bytes();
    }
    let enc = match h.encode() {
        Ok(b) => b,
        Err(e) => panic!("decoded LUKS header does not encode: {e}\n{h:?}"),
    };
    let back = LuksHeader::decode(&enc)
        .unwrap_or_else(|e| panic!("encoded LUKS header does not decode: {e}\n{h:?}"));
    assert_eq!(back, h);
    assert_eq!(back.encode().unwrap(), enc);
});
