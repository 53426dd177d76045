//! The transmission-phase parser on an arbitrary byte stream, driven the way the server
//! reads it: decode a header, validate it against the export, consume the payload a valid
//! write or a refused in-limit write carries, stop at a bad magic or a disconnect. Whatever
//! `validate` accepts must be safe to run; whatever it refuses must say how to resync.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_nbd::proto::{self, Command, Limits, MAX_REQUEST, REQUEST_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, mut rest)) = data.split_first() else { return };
    let limits = Limits {
        size: [0, 512, 1 << 20, (1 << 40) + 3, u64::MAX][usize::from(sel % 5)],
        read_only: sel & 0x08 != 0,
        structured: sel & 0x10 != 0,
        contexts: usize::from(sel >> 5),
    };
    while rest.len() >= REQUEST_LEN {
        let (head, tail) = rest.split_at(REQUEST_LEN);
        rest = tail;
        let Ok(h) = proto::decode_request(head.try_into().unwrap()) else { return };
        let end = h.offset.checked_add(u64::from(h.length));
        match proto::validate(&h, &limits) {
            Ok(c) => {
                let payload = match c {
                    Command::Disconnect => return,
                    Command::Flush => 0,
                    Command::Read { len, .. } | Command::Write { len, .. } => {
                        assert!(len <= MAX_REQUEST);
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
                        assert!(limits.structured && limits.contexts > 0 && len > 0);
                        assert!(end.is_some_and(|e| e <= limits.size));
                        0
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
                    assert_eq!((h.kind, r.skip), (proto::cmd::WRITE, h.length));
                }
                let mut reply = Vec::new();
                proto::error_chunk(&mut reply, h.cookie, r.errno, r.reason);
                assert_eq!(reply.len(), 20 + 6 + r.reason.len());
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
