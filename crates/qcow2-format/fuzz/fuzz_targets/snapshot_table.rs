//! `SnapshotTable::decode` on arbitrary bytes with an arbitrary count and version. Whatever
//! decodes must encode (after QEMU's defaults are filled in) to a table that decodes to the
//! same entries and is exactly `encoded_len` bytes long.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_format::snapshot::SnapshotTable;
use qcow2_format::Limits;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let version = match data[0] % 4 {
        0 => 2,
        1 => 3,
        v => u32::from(v) * 7, // invalid versions must be refused, not panic
    };
    let nb = u32::from(u16::from_be_bytes([data[1], data[2]])) << (data[3] % 4 * 4);
    let bytes = &data[4..];
    let Ok((mut table, len)) = SnapshotTable::decode(bytes, nb, version, &Limits::QEMU) else {
        return;
    };
    assert!(len <= bytes.len());
    assert_eq!(table.entries.len() as u64, u64::from(nb));
    let cluster_size = 1u64 << (9 + data[0] as u32 % 13);
    for e in &table.entries {
        let _ = e.validate(cluster_size, &Limits::QEMU);
        let _ = e.is_incomplete(version);
    }
    let _ = table.next_id();
    let _ = table.incomplete_entries(version);

    table.resolve_defaults(1 << 30);
    let enc = match table.encode(version) {
        Ok(b) => b,
        Err(e) => panic!("decoded snapshot table does not encode: {e}\n{table:?}"),
    };
    assert_eq!(enc.len() as u64, table.encoded_len());
    let (back, back_len) = SnapshotTable::decode(&enc, nb, version, &Limits::QEMU)
        .unwrap_or_else(|e| panic!("encoded table does not decode: {e}\n{table:?}"));
    assert_eq!(back_len, enc.len());
    assert_eq!(back, table);
    // Encoding is canonical: a second round trip is byte-identical.
    assert_eq!(back.encode(version).unwrap(), enc);
});
