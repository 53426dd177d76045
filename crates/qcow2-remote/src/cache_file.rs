//! The optional local cache file: blocks of the object kept on local disk across opens,
//! so that a host serving many VMs from one remote base fetches each block once, not
//! once per process.
//!
//! The cache is two files:
//! - `PATH`, sparse, as long as the object, each block at the object's own offset (so it
//!   is bounded by the object's size, and a block is one positional read or write);
//! - `PATH.state`, the blocks `PATH` holds and which object they came from: URL, size,
//!   ETag, version, modification time, block size.
//!
//! # Invariants
//!
//! - A block is read from `PATH` only once its write there has completed (`written`).
//! - `PATH.state` never names a block whose data is not durable: a save takes the set of
//!   written blocks *before* `fdatasync`ing `PATH`, and then replaces `PATH.state`
//!   atomically (a temporary file, synced, renamed over it, the folder synced). A crash
//!   loses at most the blocks written since the last save; they are fetched again.
//! - `PATH.state` of another object (a replaced object, another URL, another block size)
//!   is removed, durably, before `PATH` is touched: no crash can leave a state file next
//!   to data it does not describe.
//! - One process at a time: `PATH` is locked (`flock`) for as long as it is open.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::block::{Block, SharedBlock};
use crate::error::RemoteError;

/// Start of a state file, then its format version.
const MAGIC: &[u8; 8] = b"QC2RCACH";
const VERSION: u32 = 1;
/// Longest identity a state file may carry; a longer one is not ours.
const MAX_IDENTITY: usize = 64 << 10;
/// Written blocks are recorded in the state file at most this often (and when the file
/// is closed).
const SAVE_EVERY: Duration = Duration::from_secs(30);

/// The local cache file of one remote object. Its methods do blocking I/O: call them from
/// `spawn_blocking`.
#[derive(Debug)]
pub(crate) struct CacheFile {
    path: PathBuf,
    state_path: PathBuf,
    file: File,
    /// The state file's contents before the block bitmap: magic, version, block size,
    /// object size, identity. A state file that starts otherwise describes something else.
    header: Vec<u8>,
    block_size: u64,
    written: Mutex<Written>,
    /// Serialises saves, so that one waits for another instead of repeating it.
    saving: Mutex<()>,
}

/// Which blocks `PATH` holds.
#[derive(Debug)]
struct Written {
    bits: Vec<u64>,
    count: u64,
    /// Blocks written since the last save began.
    unsaved: u64,
    last_save: Instant,
}

impl Written {
    fn has(&self, block: u64) -> bool {
        let (w, b) = ((block / 64) as usize, block % 64);
        self.bits.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    fn set(&mut self, block: u64) {
        let (w, b) = ((block / 64) as usize, block % 64);
        if let Some(x) = self.bits.get_mut(w) {
            if *x & (1 << b) == 0 {
                *x |= 1 << b;
                self.count += 1;
                self.unsaved += 1;
            }
        }
    }
}

impl CacheFile {
    /// Opens (or creates) the cache file at `path` for an object of `size` bytes read in
    /// blocks of `block_size`, known by `identity`. What the file holds is kept only if its
    /// state file names the same object and block size.
    pub(crate) fn open(
        path: &Path,
        identity: &str,
        block_size: u64,
        size: u64,
    ) -> Result<CacheFile, RemoteError> {
        let err = |op: &'static str| {
            let path = path.to_path_buf();
            move |source: io::Error| RemoteError::CacheFile {
                path,
                op,
                source: Arc::new(source),
            }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(err("open"))?;
        lock(&file).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock => RemoteError::CacheInUse {
                path: path.to_path_buf(),
            },
            _ => err("lock")(e),
        })?;
        let mut header = Vec::new();
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&block_size.to_le_bytes());
        header.extend_from_slice(&size.to_le_bytes());
        header.extend_from_slice(&(identity.len() as u64).to_le_bytes());
        header.extend_from_slice(identity.as_bytes());
        let words = size.div_ceil(block_size).div_ceil(64) as usize;
        let state_path = state_path(path);
        let cache = CacheFile {
            path: path.to_path_buf(),
            state_path,
            file,
            header,
            block_size,
            written: Mutex::new(Written {
                bits: vec![0; words],
                count: 0,
                unsaved: 0,
                last_save: Instant::now(),
            }),
            saving: Mutex::new(()),
        };
        match cache.load(words).map_err(err("read the state of"))? {
            Some(bits) => {
                let mut w = cache.lock();
                w.count = bits.iter().map(|x| u64::from(x.count_ones())).sum();
                w.bits = bits;
                tracing::debug!(path = %path.display(), blocks = w.count, "cache file reused");
            }
            None => cache.reset(size).map_err(err("reset"))?,
        }
        Ok(cache)
    }

    /// The block bitmap of the state file, if the state file describes this object.
    fn load(&self, words: usize) -> io::Result<Option<Vec<u64>>> {
        let mut f = match File::open(&self.state_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let want = self.header.len() as u64 + 8 * words as u64;
        if self.header.len() > MAX_IDENTITY + 64 || f.metadata()?.len() != want {
            return Ok(None);
        }
        let mut buf = vec![0; want as usize];
        f.read_exact(&mut buf)?;
        let (head, bits) = buf.split_at(self.header.len());
        if head != self.header {
            return Ok(None);
        }
        Ok(Some(
            bits.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        ))
    }

    /// Empties the cache for a new object: the old state file goes first (durably), then
    /// the old data.
    fn reset(&self, size: u64) -> io::Result<()> {
        match std::fs::remove_file(&self.state_path) {
            Ok(()) => sync_parent(&self.state_path)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.file.set_len(0)?;
        self.file.set_len(size)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The file holds `block`.
    pub(crate) fn has(&self, block: u64) -> bool {
        self.lock().has(block)
    }

    /// Blocks the file holds.
    pub(crate) fn blocks(&self) -> u64 {
        self.lock().count
    }

    /// Reads `lens.len()` blocks from `first` on, of the given lengths, into blocks taken
    /// from `take`.
    pub(crate) fn read_run(
        &self,
        first: u64,
        lens: &[usize],
        mut take: impl FnMut() -> Block,
    ) -> io::Result<Vec<Block>> {
        let mut out = Vec::with_capacity(lens.len());
        for (i, &len) in lens.iter().enumerate() {
            let mut block = take();
            let at = (first + i as u64) * self.block_size;
            block.fill_with(len, |buf| self.file.read_exact_at(buf, at))?;
            out.push(block);
        }
        Ok(out)
    }

    /// Writes fetched blocks into the file and records them; saves the record if the last
    /// save is long enough ago.
    pub(crate) fn write(&self, blocks: &[(u64, SharedBlock)]) -> io::Result<()> {
        for (block, data) in blocks {
            self.file
                .write_all_at(data.bytes(), block * self.block_size)?;
            self.lock().set(*block);
        }
        let due = {
            let w = self.lock();
            w.unsaved > 0 && w.last_save.elapsed() >= SAVE_EVERY
        };
        if due {
            self.save()?;
        }
        Ok(())
    }

    /// Makes the written blocks durable and records them in the state file.
    pub(crate) fn save(&self) -> io::Result<()> {
        let _one = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        // Taken before the sync: every block named here was written before it.
        let bits = {
            let mut w = self.lock();
            if w.unsaved == 0 {
                return Ok(());
            }
            w.unsaved = 0;
            w.last_save = Instant::now();
            w.bits.clone()
        };
        self.file.sync_data()?;
        let mut tmp_name = self.state_path.clone().into_os_string();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let mut out = Vec::with_capacity(self.header.len() + 8 * bits.len());
        out.extend_from_slice(&self.header);
        for x in &bits {
            out.extend_from_slice(&x.to_le_bytes());
        }
        let mut f = File::create(&tmp)?;
        f.write_all(&out)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &self.state_path)?;
        sync_parent(&self.state_path)
    }

    fn lock(&self) -> MutexGuard<'_, Written> {
        self.written.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for CacheFile {
    fn drop(&mut self) {
        if let Err(e) = self.save() {
            tracing::warn!(path = %self.path.display(), error = %e, "cache file not saved");
        }
    }
}

/// `PATH.state`.
fn state_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".state");
    PathBuf::from(name)
}

/// Syncs the folder holding `path`, so that a rename or removal there is durable.
fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// An exclusive `flock` on `file`, failing with `WouldBlock` if another open file holds it.
fn lock(file: &File) -> io::Result<()> {
    // SAFETY: `flock` only takes a descriptor, which `file` keeps open for the call; it
    // touches no memory. (std's `File::try_lock` is newer than this crate's rust-version.)
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::BlockPool;

    const BS: u64 = 4096;

    fn block(pool: &Arc<BlockPool>, byte: u8, len: usize) -> SharedBlock {
        let mut b = pool.take();
        b.push(&vec![byte; len]);
        Arc::new(b)
    }

    fn read(c: &CacheFile, pool: &Arc<BlockPool>, first: u64, lens: &[usize]) -> Vec<Vec<u8>> {
        c.read_run(first, lens, || pool.take())
            .unwrap()
            .iter()
            .map(|b| {
                let mut v = vec![0; b.len()];
                b.copy_to(0, &mut v);
                v
            })
            .collect()
    }

    #[test]
    fn blocks_survive_a_reopen_for_the_same_object_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base.cache");
        let pool = BlockPool::new(BS as usize, BS as usize * 4);
        let size = 10 * BS + 100;
        {
            let c = CacheFile::open(&path, "etag-1", BS, size).unwrap();
            assert!(!c.has(3));
            c.write(&[
                (3, block(&pool, 3, BS as usize)),
                (10, block(&pool, 10, 100)),
            ])
            .unwrap();
            assert!(c.has(3) && c.has(10) && !c.has(4));
            assert_eq!(
                read(&c, &pool, 3, &[BS as usize]),
                vec![vec![3; BS as usize]]
            );
            // A second opener is refused while this one holds the file.
            assert!(matches!(
                CacheFile::open(&path, "etag-1", BS, size),
                Err(RemoteError::CacheInUse { .. })
            ));
        } // dropped: saved
        let c = CacheFile::open(&path, "etag-1", BS, size).unwrap();
        assert_eq!(c.blocks(), 2);
        assert_eq!(read(&c, &pool, 10, &[100]), vec![vec![10; 100]]);
        drop(c);
        // Another object (or block size) under the same path: nothing is reused.
        let c = CacheFile::open(&path, "etag-2", BS, size).unwrap();
        assert_eq!(c.blocks(), 0);
        assert!(!c.has(3));
        drop(c);
        let c = CacheFile::open(&path, "etag-1", BS, size).unwrap();
        assert_eq!(
            c.blocks(),
            0,
            "the reset removed the first object's state for good"
        );
        drop(c);
        let c = CacheFile::open(&path, "etag-1", 2 * BS, size).unwrap();
        assert_eq!(c.blocks(), 0);
    }

    #[test]
    fn unsaved_blocks_are_not_claimed_and_a_damaged_state_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base.cache");
        let pool = BlockPool::new(BS as usize, BS as usize * 4);
        let size = 64 * BS;
        let c = CacheFile::open(&path, "v", BS, size).unwrap();
        c.write(&[(1, block(&pool, 1, BS as usize))]).unwrap();
        c.save().unwrap();
        c.write(&[(2, block(&pool, 2, BS as usize))]).unwrap();
        // A crash now leaves the state file of the last save, naming block 1 only: put it
        // back after the clean close, which saved block 2 too.
        let state = std::fs::read(state_path(&path)).unwrap();
        drop(c);
        std::fs::write(state_path(&path), &state).unwrap();
        let c = CacheFile::open(&path, "v", BS, size).unwrap();
        assert!(c.has(1) && !c.has(2));
        drop(c);
        // Truncated or altered state files describe nothing.
        let mut bad = state.clone();
        bad.pop();
        std::fs::write(state_path(&path), &bad).unwrap();
        assert_eq!(CacheFile::open(&path, "v", BS, size).unwrap().blocks(), 0);
        let mut bad = state;
        bad[0] ^= 1;
        std::fs::write(state_path(&path), &bad).unwrap();
        assert_eq!(CacheFile::open(&path, "v", BS, size).unwrap().blocks(), 0);
    }
}
