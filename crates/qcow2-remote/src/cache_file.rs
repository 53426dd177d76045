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
//! - The state file names the data file it describes (device and inode) and its length:
//!   a data file deleted or replaced behind the state's back is not trusted.
//! - After a failed `fdatasync` (whose error Linux reports once, dropping the pages) the
//!   state file is removed and the cache file is no longer used by this process.
//! - One process at a time: `PATH` is locked (`flock`) for as long as it is open; within
//!   the process, opens of the same object share one `CacheFile` ([`CacheFile::shared`]).
//!
//! The cache file is an optimisation: whenever it cannot be used (in use by another
//! process, another object under the same name in use here, an I/O error), reads go on
//! from memory and the store, with a warning.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::block::{Block, SharedBlock};

/// Start of a state file, then its format version.
const MAGIC: &[u8; 8] = b"QC2RCACH";
const VERSION: u32 = 1;
/// Longest identity a state file may carry; a longer one is not ours.
const MAX_IDENTITY: usize = 64 << 10;
/// Largest block map, in 64-bit words (64 MiB: 2^32 blocks, 256 TiB at 64 KiB blocks).
const MAX_MAP_WORDS: u64 = 8 << 20;
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
    /// A sync failed: nothing is read from or written to the file any more.
    broken: AtomicBool,
}

/// The cache files open in this process, by device and inode.
type Registry = Mutex<HashMap<(u64, u64), Weak<CacheFile>>>;

fn registry() -> &'static Registry {
    static OPEN: OnceLock<Registry> = OnceLock::new();
    OPEN.get_or_init(Registry::default)
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
    /// The cache file at `path` for this object, shared with the other opens of it in this
    /// process; `None` (with a warning) if it cannot be used.
    pub(crate) fn shared(
        path: &Path,
        identity: &str,
        block_size: u64,
        size: u64,
    ) -> Option<Arc<CacheFile>> {
        let mut open = registry().lock().unwrap_or_else(|e| e.into_inner());
        let result = Self::open_in(&mut open, path, identity, block_size, size);
        match result {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cache file not used");
                None
            }
        }
    }

    fn open_in(
        open: &mut HashMap<(u64, u64), Weak<CacheFile>>,
        path: &Path,
        identity: &str,
        block_size: u64,
        size: u64,
    ) -> io::Result<Arc<CacheFile>> {
        let file = open_data(path)?;
        let meta = file.metadata()?;
        let key = (meta.dev(), meta.ino());
        open.retain(|_, c| c.strong_count() > 0);
        if let Some(c) = open.get(&key).and_then(Weak::upgrade) {
            // (`file` is another open file description: closing it leaves `c`'s lock.)
            if c.header == header(key, block_size, size, identity) {
                return Ok(c);
            }
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "in use in this process for another object",
            ));
        }
        let c = Arc::new(CacheFile::open(file, path, identity, block_size, size)?);
        open.insert(key, Arc::downgrade(&c));
        Ok(c)
    }

    /// Takes `file` (opened at `path`) as the cache file for an object of `size` bytes read
    /// in blocks of `block_size`, known by `identity`. What it holds is kept only if its
    /// state file names this data file, the same object and block size. Fails with
    /// `WouldBlock` if another process holds it.
    pub(crate) fn open(
        file: File,
        path: &Path,
        identity: &str,
        block_size: u64,
        size: u64,
    ) -> io::Result<CacheFile> {
        lock(&file).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock => {
                io::Error::new(io::ErrorKind::WouldBlock, "in use by another process")
            }
            _ => e,
        })?;
        let meta = file.metadata()?;
        let header = header((meta.dev(), meta.ino()), block_size, size, identity);
        let words = size.div_ceil(block_size).div_ceil(64);
        if words > MAX_MAP_WORDS {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("an object of {size} bytes has too many blocks for a cache file"),
            ));
        }
        let words = words as usize;
        // The size comes from the store: a hostile one must fail here, not abort.
        let mut bits = Vec::new();
        bits.try_reserve_exact(words)
            .map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        bits.resize(words, 0);
        let cache = CacheFile {
            path: path.to_path_buf(),
            state_path: state_path(path),
            file,
            header,
            block_size,
            written: Mutex::new(Written {
                bits,
                count: 0,
                unsaved: 0,
                last_save: Instant::now(),
            }),
            saving: Mutex::new(()),
            broken: AtomicBool::new(false),
        };
        match cache.load(words, meta.len() == size)? {
            Some(bits) => {
                let mut w = cache.lock();
                w.count = bits.iter().map(|x| u64::from(x.count_ones())).sum();
                w.bits = bits;
                tracing::debug!(path = %path.display(), blocks = w.count, "cache file reused");
            }
            None => cache.reset(size)?,
        }
        Ok(cache)
    }

    /// The block bitmap of the state file, if the state file describes this object.
    fn load(&self, words: usize, data_len_right: bool) -> io::Result<Option<Vec<u64>>> {
        if !data_len_right {
            return Ok(None);
        }
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
        !self.broken.load(Ordering::Acquire) && self.lock().has(block)
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
        if self.broken.load(Ordering::Acquire) {
            return Ok(());
        }
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
        if self.broken.load(Ordering::Acquire) {
            return Ok(());
        }
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
        if let Err(e) = self.file.sync_data() {
            // The kernel reports a write-back error once and may have dropped the pages:
            // a later sync would succeed and name blocks that are not there. Give up on
            // the file instead.
            self.broken.store(true, Ordering::Release);
            let _ = std::fs::remove_file(&self.state_path);
            let mut w = self.lock();
            w.bits.fill(0);
            w.count = 0;
            return Err(e);
        }
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

/// What a state file must start with to describe the data file `(device, inode)` for
/// this object and block size.
fn header(data_file: (u64, u64), block_size: u64, size: u64, identity: &str) -> Vec<u8> {
    let mut h = Vec::with_capacity(48 + identity.len());
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&data_file.0.to_le_bytes());
    h.extend_from_slice(&data_file.1.to_le_bytes());
    h.extend_from_slice(&block_size.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h.extend_from_slice(&(identity.len() as u64).to_le_bytes());
    h.extend_from_slice(identity.as_bytes());
    h
}

/// The data file at `path`, created if missing, never truncated here.
fn open_data(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
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

    fn open(path: &Path, identity: &str, bs: u64, size: u64) -> io::Result<CacheFile> {
        CacheFile::open(open_data(path)?, path, identity, bs, size)
    }

    /// A folder (kept alive by the caller), the cache file's path in it, and a pool.
    fn fixture() -> (tempfile::TempDir, PathBuf, Arc<BlockPool>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base.cache");
        (
            dir,
            path,
            BlockPool::new(BS as usize, BS as usize * 4, false),
        )
    }

    fn block(pool: &Arc<BlockPool>, byte: u8, len: usize) -> SharedBlock {
        let mut b = pool.take();
        b.push(&vec![byte; len]);
        Arc::new(b)
    }

    fn read(c: &CacheFile, pool: &Arc<BlockPool>, first: u64, lens: &[usize]) -> Vec<Vec<u8>> {
        c.read_run(first, lens, || pool.take())
            .unwrap()
            .iter()
            .map(|b| b.bytes().to_vec())
            .collect()
    }

    #[test]
    fn blocks_survive_a_reopen_for_the_same_object_only() {
        let (_dir, path, pool) = fixture();
        let size = 10 * BS + 100;
        {
            let c = open(&path, "etag-1", BS, size).unwrap();
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
            // Another open file (another process) is refused while this one holds it.
            let e = open(&path, "etag-1", BS, size).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        } // dropped: saved
        let c = open(&path, "etag-1", BS, size).unwrap();
        assert_eq!(c.blocks(), 2);
        assert_eq!(read(&c, &pool, 10, &[100]), vec![vec![10; 100]]);
        drop(c);
        // Another object (or block size) under the same path: nothing is reused.
        let c = open(&path, "etag-2", BS, size).unwrap();
        assert_eq!(c.blocks(), 0);
        assert!(!c.has(3));
        drop(c);
        let c = open(&path, "etag-1", BS, size).unwrap();
        assert_eq!(
            c.blocks(),
            0,
            "the reset removed the first object's state for good"
        );
        drop(c);
        let c = open(&path, "etag-1", 2 * BS, size).unwrap();
        assert_eq!(c.blocks(), 0);
    }

    #[test]
    fn unsaved_blocks_are_not_claimed_and_a_damaged_state_file_is_ignored() {
        let (_dir, path, pool) = fixture();
        let size = 64 * BS;
        let c = open(&path, "v", BS, size).unwrap();
        c.write(&[(1, block(&pool, 1, BS as usize))]).unwrap();
        c.save().unwrap();
        c.write(&[(2, block(&pool, 2, BS as usize))]).unwrap();
        // A crash now leaves the state file of the last save, naming block 1 only: put it
        // back after the clean close, which saved block 2 too.
        let state = std::fs::read(state_path(&path)).unwrap();
        drop(c);
        std::fs::write(state_path(&path), &state).unwrap();
        let c = open(&path, "v", BS, size).unwrap();
        assert!(c.has(1) && !c.has(2));
        drop(c);
        // Truncated or altered state files describe nothing.
        let mut bad = state.clone();
        bad.pop();
        std::fs::write(state_path(&path), &bad).unwrap();
        assert_eq!(open(&path, "v", BS, size).unwrap().blocks(), 0);
        let mut bad = state;
        bad[0] ^= 1;
        std::fs::write(state_path(&path), &bad).unwrap();
        assert_eq!(open(&path, "v", BS, size).unwrap().blocks(), 0);
    }

    #[test]
    fn a_state_file_whose_data_file_was_replaced_is_not_trusted() {
        let (_dir, path, pool) = fixture();
        let size = 8 * BS;
        let c = open(&path, "v", BS, size).unwrap();
        c.write(&[(5, block(&pool, 5, BS as usize))]).unwrap();
        drop(c);
        // `rm base.cache` leaves `base.cache.state` behind; a new data file has holes.
        std::fs::remove_file(&path).unwrap();
        let c = open(&path, "v", BS, size).unwrap();
        assert!(!c.has(5));
        assert_eq!(c.blocks(), 0);
    }

    #[test]
    fn opens_in_one_process_share_the_file_of_their_object() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base.cache");
        let a = CacheFile::shared(&path, "v", BS, 8 * BS).unwrap();
        let b = CacheFile::shared(&path, "v", BS, 8 * BS).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        // Another object under the same name while the first is open: memory only.
        assert!(CacheFile::shared(&path, "w", BS, 8 * BS).is_none());
        drop((a, b));
        let c = CacheFile::shared(&path, "w", BS, 8 * BS).unwrap();
        assert_eq!(c.blocks(), 0);
        // A size no memory could map is refused, not an abort.
        let other = dir.path().join("huge.cache");
        assert!(CacheFile::shared(&other, "v", 4096, u64::MAX - 4096).is_none());
    }
}
