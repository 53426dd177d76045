//! Tuning of a remote file: block size, cache bound, read-ahead, retries, timeouts.

use std::time::Duration;

/// How a [`crate::RemoteFile`] reads its object.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RemoteOptions {
    /// The object is fetched and cached in aligned blocks of this many bytes (a power of
    /// two, at least 4 KiB). A random read fetches whole blocks, so they are small (a qcow2
    /// cluster); sequential and large reads still become large requests, since neighbouring
    /// missing blocks share one (up to `max_request`). Measured on loopback nginx: 4 KiB
    /// first-touch reads ran at 4100 IOPS with 64 KiB blocks, 2000 with 256 KiB, 900 with
    /// 1 MiB, and a sequential read of 1 GiB at the same speed with all three.
    pub block_size: u64,
    /// Upper bound of the in-memory block cache, in bytes; least recently used blocks go
    /// first. 0 disables caching (every read is a request).
    ///
    /// The default, 32 MiB, is twice the read-ahead window: room for what is fetched ahead
    /// of a sequential reader, for the neighbours of random reads within a block, and for
    /// the base's metadata. A larger cache only pays once reads come back to the same data
    /// (the guest keeps its own cache above this one, and the local `cache_file` keeps
    /// fetched blocks across opens); until it is full, every MiB it grows by is memory the
    /// process touches for the first time. Measured on the 2-vCPU reference VM (loopback
    /// nginx, a fresh process on a settled machine): first-touch 1 MiB reads at depth 8 ran
    /// at 1377–1587 IOPS with 32 MiB and 847–965 with 256 MiB, a sequential read of 1 GiB at
    /// 1059–1196 MiB/s against 688–989.
    pub cache_bytes: u64,
    /// How far past a sequential reader blocks are fetched ahead of it, in bytes (0: no
    /// read-ahead). A reader counts as sequential from its second request in a row that
    /// continues where the previous one ended.
    pub read_ahead: u64,
    /// Largest range one request asks for; longer runs of missing blocks are split into
    /// requests that run in parallel.
    pub max_request: u64,
    /// Attempts after the first one for a request that failed transiently (connection
    /// refused or reset, a server error, a timeout).
    pub retries: u32,
    /// Wait before the first retry; each further retry waits twice as long, up to 8 times
    /// this.
    pub backoff: Duration,
    /// How long one attempt may wait for an answer: for the response to a request, and then
    /// for each next piece of its body. A store that stops answering fails the read after
    /// `(retries + 1)` of these plus the backoff, never hangs it.
    pub timeout: Duration,
    /// A local file that keeps fetched blocks across opens (`None`: memory only). It is as
    /// long as the object (sparse: only fetched blocks take room) and comes with
    /// `PATH.state`, which records the blocks it holds and which object they belong to;
    /// a replaced object empties it. One process may use it at a time.
    pub cache_file: Option<std::path::PathBuf>,
}

impl Default for RemoteOptions {
    fn default() -> RemoteOptions {
        RemoteOptions {
            block_size: 64 << 10,
            cache_bytes: 32 << 20,
            read_ahead: 16 << 20,
            max_request: 4 << 20,
            retries: 4,
            backoff: Duration::from_millis(100),
            timeout: Duration::from_secs(30),
            cache_file: None,
        }
    }
}

impl RemoteOptions {
    /// Checks the sizes: `None` if they are usable, what is wrong otherwise.
    pub(crate) fn invalid(&self) -> Option<String> {
        if !self.block_size.is_power_of_two() || self.block_size < 4096 {
            return Some(format!(
                "block size {} is not a power of two of at least 4096",
                self.block_size
            ));
        }
        if self.max_request < self.block_size {
            return Some(format!(
                "largest request {} is smaller than a block ({})",
                self.max_request, self.block_size
            ));
        }
        None
    }
}
