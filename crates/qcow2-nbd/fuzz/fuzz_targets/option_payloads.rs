//! Handshake decoders on arbitrary bytes: option headers, `NBD_OPT_GO`/`INFO` and
//! `*_META_CONTEXT` payloads, and context queries. Whatever decodes re-encodes to the same
//! bytes; nothing panics or allocates beyond the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_nbd::proto::{self, MetaContext, MAX_OPTION, MAX_STRING, OPTION_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Some(h) = data.get(..OPTION_HEADER_LEN) {
        if let Ok(h) = proto::decode_option_header(h.try_into().unwrap()) {
            assert!(h.length <= MAX_OPTION);
        }
    }
    let _ = proto::decode_client_flags(data.get(..4).map_or([0; 4], |b| b.try_into().unwrap()));
    if let Ok(r) = proto::decode_info_request(data) {
        assert!(r.name.len() <= MAX_STRING);
        let mut enc = (r.name.len() as u32).to_be_bytes().to_vec();
        enc.extend_from_slice(r.name.as_bytes());
        enc.extend_from_slice(&(r.items.len() as u16).to_be_bytes());
        for i in &r.items {
            enc.extend_from_slice(&i.to_be_bytes());
        }
        assert_eq!(enc, data);
    }
    if let Ok(r) = proto::decode_meta_request(data) {
        let mut enc = (r.export.len() as u32).to_be_bytes().to_vec();
        enc.extend_from_slice(r.export.as_bytes());
        enc.extend_from_slice(&(r.queries.len() as u32).to_be_bytes());
        let avail = [
            MetaContext::BaseAllocation,
            MetaContext::AllocationDepth,
            MetaContext::DirtyBitmap(r.export.clone()),
        ];
        for q in &r.queries {
            assert!(q.len() <= MAX_STRING);
            enc.extend_from_slice(&(q.len() as u32).to_be_bytes());
            enc.extend_from_slice(q.as_bytes());
            for list in [false, true] {
                let hits = proto::match_query(q, &avail, list);
                assert!(hits.iter().all(|&i| i < avail.len()));
                if !list {
                    assert!(hits.iter().all(|&i| avail[i].name() == *q));
                }
            }
        }
        assert_eq!(enc, data);
    }
});
