//! Write barriers between data and the metadata that points at it.
//!
//! The engine never lets metadata that references a cluster reach the disk before the
//! cluster's data and its refcount: metadata write-back ([`crate::meta`]) runs in phases, and
//! between phases it awaits a [`Barrier`] — a future that resolves once everything written
//! before it is ordered (and, for `Ordered`/`Full`, durable). `BarrierMode::None` skips the
//! syncs for throughput on scratch images; a crash may then corrupt the image, exactly like
//! QEMU's `cache=unsafe`.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::io::BlockFile;

/// How strictly writes are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BarrierMode {
    /// No syncs at all, not even for `flush()`: fastest, not crash safe (`cache=unsafe`).
    None,
    /// An fdatasync between data/refcounts and the metadata that references them, and at
    /// every `flush()` (`cache=writeback`, the default).
    #[default]
    Ordered,
    /// As `Ordered`, and every write request is durable when it returns (`cache=directsync`).
    Full,
}

impl std::str::FromStr for BarrierMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "none" => BarrierMode::None,
            "ordered" => BarrierMode::Ordered,
            "full" => BarrierMode::Full,
            _ => return Err(format!("invalid barrier mode '{s}'")),
        })
    }
}

/// The barrier between two write-back phases over a set of files.
#[derive(Debug, Clone)]
pub(crate) struct Barrier {
    mode: BarrierMode,
    files: Vec<Arc<dyn BlockFile>>,
}

impl Barrier {
    pub(crate) fn new(mode: BarrierMode, files: Vec<Arc<dyn BlockFile>>) -> Self {
        Barrier { mode, files }
    }

    /// Resolves when every write completed before the call is durable (a no-op with
    /// `BarrierMode::None`).
    pub(crate) async fn order(&self) -> Result<()> {
        if self.mode == BarrierMode::None {
            return Ok(());
        }
        self.sync().await
    }

    /// The sync of `flush()` and `close()`: in every mode but `None`, where flushes are
    /// ignored as under QEMU's `cache=unsafe` (what `convert -t unsafe` relies on).
    pub(crate) async fn sync(&self) -> Result<()> {
        if self.mode == BarrierMode::None {
            return Ok(());
        }
        for f in &self.files {
            f.flush().await.map_err(Error::io("syncing"))?;
        }
        Ok(())
    }
}
