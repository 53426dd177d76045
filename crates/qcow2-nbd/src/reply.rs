//! Reply encoding, sans I/O: what the server sends back for one request in each [`Mode`].
//!
//! A [`Reply`] knows the request it answers (cookie and offset) and the connection's mode, so
//! callers say *what* to reply (done, an error, read data, a hole, extents) and never pick a
//! header format: a simple reply where the mode allows one, a structured chunk (20-byte
//! header, 32-bit length), or an extended chunk (32-byte header echoing the request's
//! offset, 64-bit length; every reply is a chunk, and block status uses 64-bit extents).

use crate::proto::EXTENDED_REPLY_MAGIC;
use crate::proto::{chunk, Mode, MAX_STRING, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};

/// The reply to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    mode: Mode,
    cookie: u64,
    offset: u64,
}

/// One metadata extent: its length and its context-specific status flags.
pub type Extent = (u64, u32);

impl Reply {
    /// The reply to the request with `cookie` at `offset`, in `mode`.
    pub fn new(mode: Mode, cookie: u64, offset: u64) -> Self {
        Reply {
            mode,
            cookie,
            offset,
        }
    }

    /// Success without data: a simple reply, or (extended headers) a final empty chunk.
    pub fn done(&self, out: &mut Vec<u8>) {
        match self.mode {
            Mode::Extended => self.chunk(out, chunk::FLAG_DONE, chunk::NONE, 0),
            _ => self.simple(out, 0),
        }
    }

    /// Failure with `errno` (an NBD error value) and a message where the mode carries one.
    pub fn error(&self, out: &mut Vec<u8>, errno: u32, msg: &str) {
        if self.mode == Mode::Simple {
            return self.simple(out, errno);
        }
        // The message length field is 16 bits and strings are capped anyway.
        let mut end = msg.len().min(MAX_STRING);
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        let msg = &msg.as_bytes()[..end];
        self.chunk(out, chunk::FLAG_DONE, chunk::ERROR, 6 + msg.len() as u64);
        out.extend_from_slice(&errno.to_be_bytes());
        out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        out.extend_from_slice(msg);
    }

    /// The header of a complete read of `len` bytes; the data follows it. Simple mode: a
    /// simple reply; otherwise one final data chunk (or an empty final chunk for `len == 0`).
    pub fn read(&self, out: &mut Vec<u8>, len: u32) {
        match self.mode {
            Mode::Simple => self.simple(out, 0),
            _ if len == 0 => self.chunk(out, chunk::FLAG_DONE, chunk::NONE, 0),
            _ => self.data(out, true, self.offset, len),
        }
    }

    /// The header of an `OFFSET_DATA` chunk of `len` bytes at guest offset `at`; the data
    /// follows it. Not for simple mode.
    pub fn data(&self, out: &mut Vec<u8>, done: bool, at: u64, len: u32) {
        debug_assert!(self.mode != Mode::Simple);
        self.chunk(out, done_flag(done), chunk::OFFSET_DATA, 8 + u64::from(len));
        out.extend_from_slice(&at.to_be_bytes());
    }

    /// An `OFFSET_HOLE` chunk: `len` bytes at `at` read as zeros. Not for simple mode.
    pub fn hole(&self, out: &mut Vec<u8>, done: bool, at: u64, len: u32) {
        debug_assert!(self.mode != Mode::Simple);
        self.chunk(out, done_flag(done), chunk::OFFSET_HOLE, 12);
        out.extend_from_slice(&at.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    }

    /// The extents of one metadata context (at least one). Compact chunks split extents
    /// longer than 32 bits; extended chunks carry them whole.
    pub fn block_status(&self, out: &mut Vec<u8>, done: bool, context: u32, extents: &[Extent]) {
        debug_assert!(self.mode != Mode::Simple);
        if self.mode == Mode::Extended {
            let len = 8 + 16 * extents.len() as u64;
            self.chunk(out, done_flag(done), chunk::BLOCK_STATUS_EXT, len);
            out.extend_from_slice(&context.to_be_bytes());
            out.extend_from_slice(&(extents.len() as u32).to_be_bytes());
            for &(length, status) in extents {
                out.extend_from_slice(&length.to_be_bytes());
                out.extend_from_slice(&u64::from(status).to_be_bytes());
            }
            return;
        }
        let pieces = |l: u64| l.div_ceil(u64::from(u32::MAX));
        let count: u64 = extents.iter().map(|e| pieces(e.0)).sum();
        self.chunk(out, done_flag(done), chunk::BLOCK_STATUS, 4 + 8 * count);
        out.extend_from_slice(&context.to_be_bytes());
        for &(mut length, status) in extents {
            while length > 0 {
                let n = length.min(u64::from(u32::MAX));
                out.extend_from_slice(&(n as u32).to_be_bytes());
                out.extend_from_slice(&status.to_be_bytes());
                length -= n;
            }
        }
    }

    fn simple(&self, out: &mut Vec<u8>, errno: u32) {
        out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&errno.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
    }

    fn chunk(&self, out: &mut Vec<u8>, flags: u16, kind: u16, length: u64) {
        let extended = self.mode == Mode::Extended;
        let magic = if extended {
            EXTENDED_REPLY_MAGIC
        } else {
            STRUCTURED_REPLY_MAGIC
        };
        out.extend_from_slice(&magic.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        if extended {
            out.extend_from_slice(&self.offset.to_be_bytes());
            out.extend_from_slice(&length.to_be_bytes());
        } else {
            // Compact chunks carry at most a 32 MiB read plus its offset.
            out.extend_from_slice(&(length as u32).to_be_bytes());
        }
    }
}

fn done_flag(done: bool) -> u16 {
    if done {
        chunk::FLAG_DONE
    } else {
        0
    }
}

/// Appends `(length, flags)` to an extent list, merging with the previous extent when the
/// flags are equal.
pub fn push_extent(out: &mut Vec<Extent>, length: u64, flags: u32) {
    if length == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.1 == flags => last.0 = last.0.saturating_add(length),
        _ => out.push((length, flags)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{be32, be64, STATE_HOLE};

    #[test]
    fn simple_mode_replies_are_16_bytes_and_carry_only_errno() {
        let r = Reply::new(Mode::Simple, 9, 4096);
        let mut out = Vec::new();
        r.error(&mut out, 5, "ignored");
        r.done(&mut out);
        r.read(&mut out, 512);
        assert_eq!(out.len(), 48);
        assert_eq!(be32(&out[4..8]), 5);
        assert_eq!(be64(&out[8..16]), 9);
        assert_eq!(be32(&out[20..24]), 0);
    }

    #[test]
    fn structured_and_extended_chunks_differ_in_header_only() {
        for (mode, head) in [(Mode::Structured, 20), (Mode::Extended, 32)] {
            let r = Reply::new(mode, 7, 1 << 33);
            let mut out = Vec::new();
            r.hole(&mut out, true, 1 << 33, 4096);
            assert_eq!(out.len(), head + 12);
            assert_eq!(u16::from_be_bytes([out[4], out[5]]), chunk::FLAG_DONE);
            assert_eq!(u16::from_be_bytes([out[6], out[7]]), chunk::OFFSET_HOLE);
            assert_eq!(be64(&out[head..]), 1 << 33);
            assert_eq!(be32(&out[head + 8..]), 4096);
            if mode == Mode::Extended {
                assert_eq!(be32(&out[..4]), EXTENDED_REPLY_MAGIC);
                assert_eq!(
                    be64(&out[16..24]),
                    1 << 33,
                    "the request's offset is echoed"
                );
                assert_eq!(be64(&out[24..32]), 12);
            } else {
                assert_eq!(be32(&out[16..20]), 12);
            }
        }
    }

    #[test]
    fn extended_success_is_a_final_empty_chunk() {
        let mut out = Vec::new();
        Reply::new(Mode::Extended, 1, 0).done(&mut out);
        assert_eq!(out.len(), 32);
        assert_eq!(u16::from_be_bytes([out[6], out[7]]), chunk::NONE);
        let mut s = Vec::new();
        Reply::new(Mode::Structured, 1, 0).done(&mut s);
        assert_eq!(
            be32(&s[..4]),
            SIMPLE_REPLY_MAGIC,
            "as qemu-nbd: simple when allowed"
        );
    }

    #[test]
    fn error_messages_are_capped_on_a_char_boundary() {
        let msg = "é".repeat(3000);
        let mut out = Vec::new();
        Reply::new(Mode::Structured, 1, 0).error(&mut out, 22, &msg);
        let n = u16::from_be_bytes([out[24], out[25]]) as usize;
        assert!(n <= MAX_STRING && n % 2 == 0);
        assert_eq!(out.len(), 26 + n);
        assert_eq!(be32(&out[16..20]) as usize, 6 + n);
    }

    #[test]
    fn extents_merge_and_compact_chunks_split_them_at_32_bits() {
        let mut v = Vec::new();
        push_extent(&mut v, 4096, 0);
        push_extent(&mut v, 4096, 0);
        push_extent(&mut v, 0, 9);
        push_extent(&mut v, 512, STATE_HOLE);
        assert_eq!(v, vec![(8192, 0), (512, STATE_HOLE)]);
        let big = [((1u64 << 33) + 5, 3)];
        let mut out = Vec::new();
        Reply::new(Mode::Structured, 1, 0).block_status(&mut out, true, 4, &big);
        let descs: Vec<(u32, u32)> = out[24..]
            .chunks(8)
            .map(|c| (be32(c), be32(&c[4..])))
            .collect();
        assert_eq!(descs.len(), 3);
        assert_eq!(descs.iter().map(|d| u64::from(d.0)).sum::<u64>(), big[0].0);
        assert!(descs.iter().all(|d| d.0 > 0 && d.1 == 3));
        assert_eq!(be32(&out[16..20]) as usize, out.len() - 20);
        let mut ext = Vec::new();
        Reply::new(Mode::Extended, 1, 0).block_status(&mut ext, true, 4, &big);
        assert_eq!(ext.len(), 32 + 8 + 16);
        assert_eq!(be32(&ext[36..40]), 1, "one descriptor, 64 bits long");
        assert_eq!(be64(&ext[40..48]), big[0].0);
    }
}
