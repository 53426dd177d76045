//! The transmission-phase parser on an arbitrary byte stream, driven the way the server
//! reads it, in every mode (compact and extended headers): decode a header, validate it
//! against the export, consume the payload a valid write, a block-status filter or a refused
//! in-limit payload carries, stop at a bad magic or a disconnect. Whatever `validate`
//! accepts must be safe to run; whatever it refuses must say how to resync.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_nbd::proto::{self, Command, Limits, Mode, MAX_REQUEST, MAX_STATUS_PAYLOAD};
use qcow2_nbd::reply::Reply;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, mut rest)) = data.split_first() else { return };
    let limits = Limits {
        size: [0, 512, 1 << 20, (1 << 40) + 3, u64::MAX][usize::from(sel % 5)],
        read_only: sel & 0x08 != 0,
        mode: [Mode::Simple, Mode::Structured, Mode::Extended, Mode::Extended]
            [usize::from((sel >> 4) & 3)],
        contexts: usize::from(sel >> 6),
    };
    let hl = limits.mode.request_len();
    while rest.len() >= hl {
        let (head, tail) = rest.split_at(hl);
        rest = tail;
        let Ok(h) = proto::decode_request(head, limits.mode) else { return };
        if limits.mode != Mode::Extended {
            assert!(h.length <= u64::from(u32::MAX));
        }
        let end = h.offset.checked_add(h.length);
        match proto::validate(&h, &limits) {
            Ok(c) => {
                let payload = match c {
                    Command::Disconnect => return,
                    Command::Flush => 0,
                    Command::Read { len, .. } | Command::Write { len, .. } => {
                        assert!(len <= MAX_REQUEST && u64::from(len) == h.length);
                        assert!(end.is_some_and(|e| e <= limits.size));
                        if matches!(c, Command::Write { .. }) {
                            assert!(!limits.read_only);
                            len as usize
                        } else {
                            0
                        }
                    }
                    Command::Trim { .. } | Command::WriteZeroes { .. } => {
                        assert!(!limits.read_only);
                        assert!(end.is_some_and(|e| e <= limits.size));
                        0
                    }
                    Command::Cache { .. } => {
                        assert!(end.is_some_and(|e| e <= limits.size));
                        0
                    }
                    Command::BlockStatus { len, .. } => {
                        assert!(limits.mode != Mode::Simple && limits.contexts > 0 && len > 0);
                        assert!(end.is_some_and(|e| e <= limits.size));
                        0
                    }
                    Command::BlockStatusFiltered { payload, offset, .. } => {
                        assert!(limits.status_payload());
                        assert!(u64::from(payload) <= MAX_STATUS_PAYLOAD);
                        let p = rest.get(..payload as usize).unwrap_or(&[]);
                        if let Ok(f) = proto::decode_status_payload(p) {
                            assert!(!f.ids.is_empty());
                            if proto::validate_status_range(offset, f.len, &limits).is_ok() {
                                assert!(offset + f.len <= limits.size && f.len > 0);
                            }
                        }
                        payload as usize
                    }
                };
                if payload > rest.len() {
                    return;
                }
                rest = &rest[payload..];
            }
            Err(r) => {
                assert_ne!(r.errno, 0);
                assert!(r.skip <= MAX_REQUEST);
                assert!(!(r.disconnect && r.skip > 0));
                if r.skip > 0 {
                    assert_eq!(u64::from(r.skip), h.length);
                }
                let mut reply = Vec::new();
                Reply::new(limits.mode, h.cookie, h.offset).error(&mut reply, r.errno, r.reason);
                let expected = match limits.mode {
                    Mode::Simple => 16,
                    Mode::Structured => 20 + 6 + r.reason.len(),
                    Mode::Extended => 32 + 6 + r.reason.len(),
                };
                assert_eq!(reply.len(), expected);
                if r.disconnect {
                    return;
                }
                let skip = r.skip as usize;
                if skip > rest.len() {
                    return;
                }
                rest = &rest[skip..];
            }
        }
    }
});
