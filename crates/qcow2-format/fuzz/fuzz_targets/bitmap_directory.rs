//! `BitmapDirectory::decode` on arbitrary bytes, QEMU's entry checks with arbitrary image
//! parameters, bitmap tables, and the bitmap size/bit helpers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_format::bitmap::{
    bitmap_bits, bitmap_data_size, bitmap_table_size, decode_bitmap_table, set_bit, test_bit,
    BitmapDirectory, BitmapTableEntry,
};
use qcow2_format::Limits;

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let nb = u32::from(u16::from_be_bytes([data[0], data[1]]));
    let cluster_size = 1u64 << (data[2] % 64);
    let virtual_size = u64::from_be_bytes(data[4..12].try_into().unwrap()) >> (data[3] % 64);
    let bytes = &data[12..];

    if let Ok(dir) = BitmapDirectory::decode(bytes, nb, &Limits::QEMU) {
        assert_eq!(dir.entries.len() as u64, u64::from(nb));
        assert_eq!(dir.encoded_len(), bytes.len() as u64, "entries fill the directory");
        let _ = dir.validate_qemu(cluster_size, virtual_size, &Limits::QEMU);
        let enc = match dir.encode() {
            Ok(b) => b,
            Err(e) => panic!("decoded directory does not encode: {e}\n{dir:?}"),
        };
        assert_eq!(enc.len() as u64, dir.encoded_len());
        let back = BitmapDirectory::decode(&enc, nb, &Limits::QEMU)
            .unwrap_or_else(|e| panic!("encoded directory does not decode: {e}\n{dir:?}"));
        assert_eq!(back, dir);
        for e in &dir.entries {
            let _ = bitmap_table_size(virtual_size, e.granularity_bits, cluster_size);
        }
    }

    // The same bytes as a bitmap table.
    let table_size = u32::from(data[3]) * 3;
    if let Ok(t) = decode_bitmap_table(bytes, table_size, cluster_size, &Limits::QEMU) {
        assert_eq!(t.len(), table_size as usize);
        for (e, c) in t.iter().zip(bytes.chunks_exact(8)) {
            assert_eq!(e.encode(), u64::from_be_bytes(c.try_into().unwrap()));
            assert_eq!(BitmapTableEntry::decode(e.encode()).unwrap(), *e);
        }
    }

    // Size helpers and bit access.
    let gran = data[2];
    let bits = bitmap_bits(virtual_size, gran);
    let size = bitmap_data_size(virtual_size, gran);
    assert_eq!(size, bits.div_ceil(8));
    let _ = bitmap_table_size(virtual_size, gran, cluster_size);
    let mut buf = bytes.to_vec();
    let n = virtual_size % (buf.len() as u64 * 8 + 8);
    let old = test_bit(&buf, n);
    assert_eq!(old.is_some(), n < buf.len() as u64 * 8);
    if set_bit(&mut buf, n, true) {
        assert_eq!(test_bit(&buf, n), Some(true));
        assert!(set_bit(&mut buf, n, false));
        assert_eq!(test_bit(&buf, n), Some(false));
    } else {
        assert!(old.is_none());
    }
});
