//! Compression and decompression of compressed clusters (reference §2.7), run on the
//! blocking pool by the callers, and a small cache of decompressed clusters.
//!
//! Payload lengths are only known to sector precision, so the input may run past the end of
//! the stream (into the next payload or padding): both decoders stop when the cluster is full.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use qcow2_format::CompressionType;

use crate::error::{Error, Result};

/// QEMU's deflate parameters: level 6 (`Z_DEFAULT_COMPRESSION`), raw stream, 4 KiB window.
/// A larger window would produce streams that QEMU's `inflateInit2(-12)` rejects.
const DEFLATE_LEVEL: u32 = 6;
const DEFLATE_WINDOW_BITS: u8 = 12;
/// QEMU's zstd level (`ZSTD_CCtx` defaults).
const ZSTD_LEVEL: i32 = 3;

/// Compresses one whole cluster as QEMU does. `None` when the result would not be smaller
/// than the cluster (QEMU gives the encoder `cluster_size - 1` bytes and writes the cluster
/// uncompressed when that is not enough).
pub(crate) fn compress(kind: CompressionType, input: &[u8]) -> Result<Option<Vec<u8>>> {
    let room = input.len().saturating_sub(1);
    match kind {
        CompressionType::Deflate => {
            // A fresh context per cluster: zlib-rs 0.6.8's `reset` does not rewind its
            // pending-output offset, so a context reused after refused clusters overflows
            // that buffer and panics (pinned by `a_refused_cluster_does_not_disturb_the_next_one`).
            // The setup cost did not show in an A/B of a 1 GiB convert.
            let mut out = vec![0u8; room];
            let mut c = flate2::Compress::new_with_window_bits(
                flate2::Compression::new(DEFLATE_LEVEL),
                false,
                DEFLATE_WINDOW_BITS,
            );
            let status = c
                .compress(input, &mut out, flate2::FlushCompress::Finish)
                .map_err(|e| Error::Io {
                    context: "compressing a cluster",
                    source: std::io::Error::other(e),
                })?;
            if status != flate2::Status::StreamEnd || c.total_in() as usize != input.len() {
                return Ok(None);
            }
            out.truncate(c.total_out() as usize);
            Ok(Some(out))
        }
        CompressionType::Zstd => ZSTD.with(|cell| {
            // zstd writes into spare capacity: no zero fill of a cluster-sized buffer.
            let mut out = Vec::with_capacity(room);
            let mut slot = cell.borrow_mut();
            let c = match slot.as_mut() {
                Some(c) => c,
                None => slot.insert(
                    zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(Error::io("zstd init"))?,
                ),
            };
            // (`with_capacity` may round up: anything past `room` does not count as smaller.)
            match c.compress_to_buffer(input, &mut out) {
                Ok(n) if n <= room => Ok(Some(out)),
                Ok(_) => Ok(None),
                // The only failure with valid parameters: the output did not fit.
                Err(_) => Ok(None),
            }
        }),
    }
}

// The zstd context is reused per thread: a fresh one costs an allocation and table setup
// per cluster, which showed up in convert profiles. Each one-shot call starts a new frame,
// so reuse never changes the output.
thread_local! {
    static ZSTD: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses `input` into exactly `cluster_size` bytes.
pub(crate) fn decompress(
    kind: CompressionType,
    input: &[u8],
    cluster_size: usize,
) -> Result<Vec<u8>> {
    let mut out = vec![0u8; cluster_size];
    match kind {
        CompressionType::Deflate => {
            // Raw deflate; a 32 KiB window decoder accepts QEMU's 4 KiB-window streams.
            let mut d = flate2::Decompress::new(false);
            let status = d
                .decompress(input, &mut out, flate2::FlushDecompress::Finish)
                .map_err(|e| bad(format!("deflate: {e}")))?;
            let produced = d.total_out() as usize;
            if produced != cluster_size {
                return Err(bad(format!(
                    "deflate produced {produced} of {cluster_size} bytes ({status:?})"
                )));
            }
        }
        CompressionType::Zstd => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut dec = Decoder::new().map_err(|e| bad(format!("zstd: {e}")))?;
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(&mut out[..]);
            // Several frames may follow each other; trailing bytes are ignored.
            while outb.pos() < cluster_size {
                let (in_before, out_before) = (inb.pos(), outb.pos());
                let hint = dec
                    .run(&mut inb, &mut outb)
                    .map_err(|e| bad(format!("zstd: {e}")))?;
                if inb.pos() == in_before && outb.pos() == out_before {
                    return Err(bad("zstd stream ended before the cluster was full".into()));
                }
                if hint == 0 && outb.pos() < cluster_size {
                    dec.reinit().map_err(|e| bad(format!("zstd: {e}")))?;
                }
            }
        }
    }
    Ok(out)
}

fn bad(msg: String) -> Error {
    Error::Corrupt(format!("compressed cluster: {msg}"))
}

/// Recently decompressed clusters, keyed by where their payload lies, so that a guest reading
/// a compressed cluster in small pieces decompresses it once.
///
/// An entry is only valid while its payload bytes are unchanged. They change only after the
/// host clusters holding them were freed and reused, so the metadata code calls
/// [`DecompressedCache::invalidate`] whenever a cluster's refcount drops to zero and for the
/// range of every new compressed payload.
pub(crate) struct DecompressedCache {
    entries: Mutex<VecDeque<CacheEntry>>,
    capacity: usize,
}

struct CacheEntry {
    host_offset: u64,
    sectors: u64,
    data: Arc<Vec<u8>>,
}

impl DecompressedCache {
    /// A cache of about `budget` bytes of clusters (at least two clusters, so that a reader
    /// alternating between two clusters still hits).
    pub(crate) fn new(cluster_size: u64, budget: u64) -> Self {
        DecompressedCache {
            entries: Mutex::new(VecDeque::new()),
            capacity: (budget / cluster_size).clamp(2, 64) as usize,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<CacheEntry>> {
        // The protected data is a plain list; a panic elsewhere cannot leave it inconsistent.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn get(&self, host_offset: u64, sectors: u64) -> Option<Arc<Vec<u8>>> {
        let mut e = self.lock();
        let i = e
            .iter()
            .position(|c| c.host_offset == host_offset && c.sectors == sectors)?;
        let hit = e.remove(i)?;
        let data = hit.data.clone();
        e.push_front(hit);
        Some(data)
    }

    pub(crate) fn insert(&self, host_offset: u64, sectors: u64, data: Arc<Vec<u8>>) {
        let mut e = self.lock();
        e.retain(|c| !(c.host_offset == host_offset && c.sectors == sectors));
        e.push_front(CacheEntry {
            host_offset,
            sectors,
            data,
        });
        e.truncate(self.capacity);
    }

    /// Forgets every entry whose payload overlaps `[start, start + len)`.
    pub(crate) fn invalidate(&self, start: u64, len: u64) {
        let end = start.saturating_add(len);
        self.lock().retain(|c| {
            let c_start = c.host_offset & !511;
            let c_end = c_start + c.sectors * 512;
            c_end <= start || c_start >= end
        });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(cs: usize) -> Vec<u8> {
        (0..cs).map(|i| (i / 100 % 7) as u8).collect()
    }

    #[test]
    fn both_types_round_trip_with_trailing_garbage() {
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            for cs in [512usize, 65536, 2 << 20] {
                let data = pattern(cs);
                let mut packed = compress(kind, &data).unwrap().expect("compressible");
                assert!(packed.len() < cs);
                // The reader gets the payload rounded up to whole sectors.
                packed.extend_from_slice(&[0xa5; 700]);
                assert_eq!(decompress(kind, &packed, cs).unwrap(), data);
            }
        }
    }

    /// Deterministic incompressible bytes (xorshift32).
    fn noise(seed: u32) -> impl FnMut() -> u8 {
        let mut x = seed;
        move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        }
    }

    #[test]
    fn incompressible_data_is_refused() {
        let mut next = noise(0x1234_5678);
        let noise: Vec<u8> = (0..65536).map(|_| next()).collect();
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            assert!(compress(kind, &noise).unwrap().is_none(), "{kind:?}");
        }
    }

    #[test]
    fn a_refused_cluster_does_not_disturb_the_next_one() {
        // Clusters are compressed back to back on the same threads, mixing data that fits
        // with data that does not; whatever was refused before it on that thread, each
        // compression must succeed without panicking, be smaller than the cluster and
        // decode back exactly.
        let mut next = noise(0x9e37_79b9);
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            for cs in [512usize, 4096, 16384, 65536] {
                for round in 0..64 {
                    // Refused clusters in a row, then from pure noise to mostly runs (some
                    // clusters only just fit or miss).
                    let runs = if round < 16 { 0 } else { round % 8 };
                    let data: Vec<u8> = (0..cs)
                        .map(|i| {
                            if (i / 64) % 8 < runs {
                                (i / 512) as u8
                            } else {
                                next()
                            }
                        })
                        .collect();
                    if let Some(packed) = compress(kind, &data).unwrap() {
                        assert!(packed.len() < cs, "{kind:?} {cs} round {round}");
                        assert_eq!(decompress(kind, &packed, cs).unwrap(), data);
                    }
                }
            }
        }
    }

    #[test]
    fn deflate_uses_a_4k_window_like_qemu() {
        // QEMU compresses with windowBits -12. A random block that repeats 26 KiB later can
        // be matched by a 32 KiB window (the second copy costs almost nothing) but not by a
        // 4 KiB one (both copies are stored literally): the size tells which window was used.
        let mut x = 99u32;
        let block: Vec<u8> = (0..6144)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect();
        let mut data = block.clone();
        data.resize(26 << 10, 0);
        data.extend_from_slice(&block);
        data.resize(65536, 0);
        let packed = compress(CompressionType::Deflate, &data).unwrap().unwrap();
        assert!(packed.len() > 2 * block.len(), "{} bytes", packed.len());
        let mut wide = flate2::Compress::new(flate2::Compression::new(6), false);
        let mut out = vec![0u8; 65536];
        wide.compress(&data, &mut out, flate2::FlushCompress::Finish)
            .unwrap();
        assert!((wide.total_out() as usize) < block.len() + 1024);
        let mut d = flate2::Decompress::new_with_window_bits(false, 12);
        let mut back = vec![0u8; data.len()];
        d.decompress(&packed, &mut back, flate2::FlushDecompress::Finish)
            .unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn cache_invalidation_covers_every_overlapping_payload() {
        let c = DecompressedCache::new(65536, 1 << 20);
        c.insert(0x50000, 14, Arc::new(vec![1]));
        c.insert(0x51a4f, 2, Arc::new(vec![2]));
        c.insert(0x70000, 1, Arc::new(vec![3]));
        assert!(c.get(0x50000, 14).is_some());
        assert!(
            c.get(0x50000, 13).is_none(),
            "the length is part of the key"
        );
        c.invalidate(0x50000, 0x10000);
        assert!(c.get(0x50000, 14).is_none());
        assert!(c.get(0x51a4f, 2).is_none());
        assert_eq!(c.get(0x70000, 1).unwrap()[0], 3);
        for i in 0..100 {
            c.insert(i * 512, 1, Arc::new(vec![]));
        }
        assert_eq!(c.len(), 16);
    }
}
