//! `qemu-img compare`.

use tracing::instrument;

use super::{disk_map, read_disk};
use crate::backing::Disk;
use crate::error::Result;

/// The outcome of [`compare`], with `qemu-img compare`'s exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareResult {
    /// Same content ("Images are identical.").
    Identical,
    /// First differing byte, rounded down to its 512-byte sector as qemu-img reports it.
    Mismatch(u64),
    /// Sizes differ and `strict` was asked for ("Image size mismatch!").
    SizeMismatch,
}

impl CompareResult {
    /// `qemu-img compare`'s exit code: 0 identical, 1 different.
    pub fn exit_code(self) -> u8 {
        match self {
            CompareResult::Identical => 0,
            _ => 1,
        }
    }
}

/// Compares the guest view of two disks. Without `strict`, a size difference is fine when
/// the larger disk reads zeros past the smaller one's end, as with `qemu-img compare`.
///
/// Cancellation: safe to drop at any point; it only reads.
#[instrument(skip_all)]
pub async fn compare(a: &Disk, b: &Disk, strict: bool) -> Result<CompareResult> {
    let (sa, sb) = (a.size(), b.size());
    if strict && sa != sb {
        return Ok(CompareResult::SizeMismatch);
    }
    let end = sa.max(sb);
    // Ranges where both read zeros without data need no reading.
    let zero_a = zero_ranges(a).await?;
    let zero_b = zero_ranges(b).await?;
    const CHUNK: u64 = 1 << 20;
    let mut pos = 0;
    let (mut ba, mut bb) = (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize]);
    while pos < end {
        let n = CHUNK.min(end - pos);
        if covered(&zero_a, pos, n, sa) && covered(&zero_b, pos, n, sb) {
            pos += n;
            continue;
        }
        let (x, y) = (&mut ba[..n as usize], &mut bb[..n as usize]);
        read_disk(a, x, pos).await?;
        read_disk(b, y, pos).await?;
        if let Some(i) = x.iter().zip(y.iter()).position(|(p, q)| p != q) {
            return Ok(CompareResult::Mismatch((pos + i as u64) / 512 * 512));
        }
        pos += n;
    }
    Ok(CompareResult::Identical)
}

async fn zero_ranges(d: &Disk) -> Result<Vec<(u64, u64)>> {
    Ok(disk_map(d)
        .await?
        .into_iter()
        .filter(|e| e.zero)
        .map(|e| (e.start, e.start + e.length))
        .collect())
}

/// Whether `[pos, pos + n)` reads zeros: inside the zero ranges or past the disk's end.
fn covered(zeros: &[(u64, u64)], pos: u64, n: u64, size: u64) -> bool {
    let mut at = pos;
    let end = pos + n;
    for &(s, e) in zeros {
        if e <= at {
            continue;
        }
        if s > at {
            break;
        }
        at = e;
        if at >= end {
            return true;
        }
    }
    at >= end.min(size) || at >= end
}
