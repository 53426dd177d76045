//! `ImageHeader::decode` on arbitrary bytes; whatever decodes must encode, and the encoding
//! must decode to the same header except for the fields `encode` documents as recomputed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_format::header::qemu_feature_table;
use qcow2_format::{ImageHeader, Limits, Version};

fuzz_target!(|data: &[u8]| {
    let _ = ImageHeader::cluster_size_hint(data);
    let Ok(h) = ImageHeader::decode(data, &Limits::QEMU) else { return };
    let bytes = match h.encode() {
        Ok(b) => b,
        Err(e) => panic!("decoded header does not encode: {e}\n{h:#?}"),
    };
    assert_eq!(bytes.len() as u64, h.header.cluster_size());
    let back = match ImageHeader::decode(&bytes, &Limits::QEMU) {
        Ok(b) => b,
        Err(e) => panic!("encoded header does not decode: {e}\n{h:#?}"),
    };
    // Recomputed by `encode`: header_length, backing_file_offset/size (from the name), the
    // feature name table (QEMU's own, iff v3 with clusters > 4 KiB), and the order of unknown
    // extensions (reversed on every read, as QEMU's list does).
    let mut want = h.clone();
    want.header.header_length = back.header.header_length;
    want.header.backing_file_offset = back.header.backing_file_offset;
    want.header.backing_file_size = back.header.backing_file_size;
    want.feature_names = if h.header.version == Version::V3 && h.header.cluster_size() > 4096 {
        qemu_feature_table()
    } else {
        Vec::new()
    };
    want.unknown_extensions.reverse();
    assert_eq!(back, want);
    assert_eq!(
        back.header.backing_file_size as usize,
        h.backing_file.as_ref().map_or(0, |n| n.len())
    );
    // Each decode reverses the unknown extensions (QEMU's head-inserted list), so encoding
    // is stable over two round trips: encode(decode(encode(decode(encode(h))))) == encode(h).
    let again = back.encode().expect("re-encode");
    let third = ImageHeader::decode(&again, &Limits::QEMU).expect("re-decode");
    assert_eq!(third, h_normalised(&want, &back));
    let fourth = third.encode().expect("third encode");
    if let Some(i) = (0..bytes.len()).find(|&i| bytes.get(i) != fourth.get(i)) {
        panic!("encoding is not stable at byte {i:#x}\n{back:#?}\n{third:#?}");
    }
});

/// `want` with the unknown extensions in the order of the first decode again.
fn h_normalised(want: &ImageHeader, back: &ImageHeader) -> ImageHeader {
    let mut h = back.clone();
    h.unknown_extensions = want.unknown_extensions.iter().rev().cloned().collect();
    h
}
