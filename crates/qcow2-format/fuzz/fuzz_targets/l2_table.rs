//! A whole L2 table of standard or extended entries with arbitrary format parameters.
//! Every entry must decode without panicking; whatever decodes must re-encode to an entry
//! that decodes to the same thing (encoding normalises ignored bits).
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_format::l2::{decode_extended, encode_extended};
use qcow2_format::{L2Entry, L2Format};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (params, table) = data.split_at(2);
    let fmt = L2Format {
        // Mostly valid cluster sizes, sometimes anything.
        cluster_bits: if params[0] & 0x80 != 0 {
            u32::from(params[0] & 0x7f)
        } else {
            9 + u32::from(params[0]) % 13
        },
        extended_l2: params[1] & 1 != 0,
        external_data_file: params[1] & 2 != 0,
        zero_flag: params[1] & 4 != 0,
    };
    let word = |c: &[u8]| u64::from_be_bytes(c.try_into().unwrap());
    if fmt.extended_l2 {
        for c in table.chunks_exact(16) {
            let (raw, bm) = (word(&c[..8]), word(&c[8..]));
            let Ok((e, b)) = decode_extended(raw, bm, fmt) else { continue };
            assert_eq!(b.0, bm);
            if let L2Entry::Zero { .. } = e {
                panic!("extended L2 decoded a zero-flag entry from {raw:#x}");
            }
            let (r2, b2) = encode_extended(&e, b, fmt)
                .unwrap_or_else(|err| panic!("{raw:#x}/{bm:#x} -> {e:?}: {err}"));
            assert_eq!(decode_extended(r2, b2, fmt).unwrap(), (e, b));
        }
    } else {
        for c in table.chunks_exact(8) {
            let raw = word(c);
            let Ok(e) = L2Entry::decode(raw, fmt) else { continue };
            let r2 = e
                .encode(fmt)
                .unwrap_or_else(|err| panic!("{raw:#x} -> {e:?}: {err}"));
            assert_eq!(L2Entry::decode(r2, fmt).unwrap(), e, "{raw:#x} -> {r2:#x}");
            let _ = (e.host_cluster(), e.is_copied());
            if let L2Entry::Compressed(d) = e {
                let _ = (d.read_len(), d.host_range(), d.sectors());
            }
        }
    }
});
