//! Decompression of compressed clusters (reference §2.7), on the blocking pool.
//!
//! Payload lengths are only known to sector precision, so the input may run past the end of
//! the stream (into the next payload or padding): both decoders stop when the cluster is full.

use qcow2_format::CompressionType;

use crate::error::{Error, Result};

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
