//! `RefcountOrder::get`/`set` over an arbitrary block at every width, plus reftable entries.
//! Reads inside the block succeed, reads past it fail; a write changes exactly its entry.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_format::{RefcountOrder, ReftableEntry};

fuzz_target!(|data: &[u8]| {
    if data.len() < 18 {
        return;
    }
    let order = RefcountOrder::new(u32::from(data[0]) % 7).unwrap();
    let cluster_bits = 9 + u32::from(data[1]) % 13;
    let index = u64::from_be_bytes(data[2..10].try_into().unwrap());
    let value = u64::from_be_bytes(data[10..18].try_into().unwrap());
    let mut block = data[18..].to_vec();
    let bits = u64::from(order.bits());
    let entries = block.len() as u64 * 8 / bits;

    let before: Vec<u64> = (0..entries).map(|i| order.get(&block, i).unwrap()).collect();
    assert!(before.iter().all(|&v| v <= order.max()));
    assert!(order.get(&block, entries).is_err());
    let _ = order.get(&block, index);

    // Writes: a small index (in range most of the time) and the arbitrary one.
    for i in [index % (entries + 1), index] {
        match order.set(&mut block, i, value) {
            Ok(()) => {
                assert!(i < entries && value <= order.max());
                assert_eq!(order.get(&block, i).unwrap(), value);
                for (j, &old) in before.iter().enumerate() {
                    if j as u64 != i {
                        assert_eq!(order.get(&block, j as u64).unwrap(), old, "entry {j}");
                    }
                }
                order.set(&mut block, i, before[i as usize]).unwrap();
            }
            Err(_) => assert!(i >= entries || value > order.max()),
        }
    }
    let masked = value & order.max();
    if entries > 0 {
        let i = index % entries;
        order.set(&mut block, i, masked).unwrap();
        assert_eq!(order.get(&block, i).unwrap(), masked);
    }

    for c in data[18..].chunks_exact(8) {
        let raw = u64::from_be_bytes(c.try_into().unwrap());
        if let Ok(e) = ReftableEntry::decode(raw, cluster_bits) {
            assert_eq!(e.encode(), raw);
        }
    }
    let _ = ReftableEntry::decode(value, u32::from(data[1]));
    let _ = order.entries_per_block(cluster_bits);
});
