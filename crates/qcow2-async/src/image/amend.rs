//! Header-level changes: backing file names (`rebase -u`), `amend`, and emptying an image
//! after `commit`.

use qcow2_format::{
    CompatibleFeatures, CompressionType, IncompatibleFeatures, L2Entry, SubclusterBitmap, Version,
};
use tracing::instrument;

use super::Image;
use crate::error::{Error, Result};

/// What [`Image::amend`] changes (like `qemu-img amend -o`); `None` keeps a setting.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct AmendOptions {
    /// `compat`: `true` for 1.1 (v3), `false` for 0.10 (v2).
    pub version3: Option<bool>,
    /// `lazy_refcounts`.
    pub lazy_refcounts: Option<bool>,
    /// `backing_file`: the new name (only the name changes; see [`Image::set_backing_name`]).
    pub backing_file: Option<String>,
    /// `backing_fmt`.
    pub backing_format: Option<String>,
    /// `refcount_bits`: only the current width is accepted for now.
    pub refcount_bits: Option<u32>,
}

impl Image {
    /// Records a different backing file name and format in the header without touching
    /// any data (`qemu-img rebase -u`). This handle keeps reading from the backing file it
    /// opened; the new one is used from the next open.
    ///
    /// Cancellation: once polled, the operation runs to completion even if this future is
    /// dropped (on the runtime, and [`Image::close`] waits for it); only its result is lost.
    #[instrument(skip(self))]
    pub async fn set_backing_name(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        let (name, format) = (name.map(str::to_owned), format.map(str::to_owned));
        self.to_completion(move |img| async move {
            img.set_backing_name_now(name.as_deref(), format.as_deref())
                .await
        })
        .await
    }

    /// [`Image::set_backing_name`] in place: dropping this future stops it where it is.
    pub(crate) async fn set_backing_name_now(
        &self,
        name: Option<&str>,
        format: Option<&str>,
    ) -> Result<()> {
        self.check_writable().await?;
        let _all = self.inner.snap_lock.write().await;
        let mut meta = self.inner.meta.lock().await;
        let old = (
            meta.hdr.backing_file.clone(),
            meta.hdr.backing_format.clone(),
        );
        meta.hdr.backing_file = name.map(str::to_string);
        meta.hdr.backing_format = name.and(format).map(str::to_string);
        if let Err(e) = meta.hdr.encode() {
            (meta.hdr.backing_file, meta.hdr.backing_format) = old;
            return Err(Error::InvalidArgument(format!(
                "the backing file name does not fit in the header: {e}"
            )));
        }
        meta.write_header().await?;
        meta.barrier.sync().await
    }

    /// Changes image options in place, like `qemu-img amend`. Lazy refcounts can be turned
    /// on (v3 only) or off (refcounts are written and the dirty bit cleared first); compat
    /// 0.10 images can be upgraded to 1.1, and 1.1 images that use nothing v2 lacks can be
    /// downgraded. Changing the refcount width is refused with a typed error.
    ///
    /// Cancellation: once polled, the operation runs to completion even if this future is
    /// dropped (on the runtime, and [`Image::close`] waits for it); only its result is lost.
    #[instrument(skip(self))]
    pub async fn amend(&self, o: &AmendOptions) -> Result<()> {
        let o = o.clone();
        self.to_completion(move |img| async move { img.amend_now(&o).await })
            .await
    }

    /// [`Image::amend`] in place: dropping this future stops it where it is.
    pub(crate) async fn amend_now(&self, o: &AmendOptions) -> Result<()> {
        self.check_writable().await?;
        if let Some(bits) = o.refcount_bits {
            let cur = self.inner.meta.lock().await.order().bits();
            if bits != cur {
                return Err(Error::unsupported(
                    "changing refcount_bits",
                    format!("{cur} → {bits}"),
                ));
            }
        }
        if o.backing_file.is_some() || o.backing_format.is_some() {
            let h = self.header().await;
            let name = o.backing_file.clone().or(h.backing_file);
            let fmt = o.backing_format.clone().or(h.backing_format);
            self.set_backing_name(name.as_deref(), fmt.as_deref())
                .await?;
        }
        let downgrade = o.version3 == Some(false);
        if downgrade {
            // Zero clusters have no v2 encoding (QEMU would expand them; refused here).
            let size = self.virtual_size();
            if let Some(e) = self
                .map(0, size)
                .await?
                .iter()
                .find(|e| e.depth == 0 && e.zero && !e.data && e.present)
            {
                return Err(Error::unsupported(
                    "downgrading an image with zero clusters to compat 0.10",
                    format!("zero cluster at {:#x}", e.start),
                ));
            }
        }
        let _all = self.inner.snap_lock.write().await;
        let mut meta = self.inner.meta.lock().await;
        let lazy_now = meta
            .hdr
            .header
            .compatible
            .contains(CompatibleFeatures::LAZY_REFCOUNTS);
        let v3 = meta.hdr.header.version == Version::V3;
        let want_v3 = o.version3.unwrap_or(v3);
        let want_lazy = o.lazy_refcounts.unwrap_or(lazy_now && want_v3);
        if want_lazy && !want_v3 {
            return Err(Error::InvalidArgument(
                "lazy refcounts need compat=1.1".into(),
            ));
        }
        if lazy_now && !want_lazy {
            // Everything the dirty bit was covering goes to disk before the bit may go.
            meta.writeback().await?;
            meta.write_blocks().await?;
            meta.barrier.sync().await?;
            if meta.marked_dirty {
                meta.set_dirty_bit(false).await?;
            }
            meta.lazy = false;
        }
        let has_bitmaps = meta.hdr.bitmaps.is_some();
        let h = &mut meta.hdr.header;
        h.compatible
            .set(CompatibleFeatures::LAZY_REFCOUNTS, want_lazy);
        if !want_v3 && v3 {
            let why = if h.incompatible.0 & !IncompatibleFeatures::DIRTY.0 != 0 {
                Some("incompatible features are in use")
            } else if h.compression_type != CompressionType::Deflate {
                Some("the compression type is not zlib")
            } else if h.refcount_order.bits() != 16 {
                Some("compat 0.10 needs refcount_bits=16")
            } else if h.autoclear.0 != 0 || has_bitmaps {
                Some("the image has bitmaps or autoclear features")
            } else if h.nb_snapshots > 0 {
                Some("the image has snapshots (their zero clusters are not checked)")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(Error::unsupported("downgrading to compat 0.10", why));
            }
            let h = &mut meta.hdr.header;
            h.incompatible = IncompatibleFeatures(0);
            h.compatible = CompatibleFeatures(0);
            h.version = Version::V2;
            meta.hdr.unknown_header_fields.clear();
            meta.hdr.feature_names.clear();
        } else if want_v3 && !v3 {
            meta.hdr.header.version = Version::V3;
        }
        meta.write_header().await?;
        meta.barrier.sync().await?;
        meta.lazy = want_lazy;
        Ok(())
    }

    /// Drops every mapping of the active image so that it reads through to its backing
    /// file again (what `qemu-img commit` does to the top image afterwards).
    ///
    /// Cancellation: once polled, the operation runs to completion even if this future is
    /// dropped (on the runtime, and [`Image::close`] waits for it); only its result is lost.
    #[instrument(skip(self))]
    pub async fn make_empty(&self) -> Result<()> {
        self.to_completion(move |img| async move { img.make_empty_now().await })
            .await
    }

    /// [`Image::make_empty`] in place: dropping this future stops it where it is.
    pub(crate) async fn make_empty_now(&self) -> Result<()> {
        self.check_writable().await?;
        let _all = self.inner.snap_lock.write().await;
        let cs = self.cluster_size();
        let mut meta = self.inner.meta.lock().await;
        for gc in 0..self.virtual_size().div_ceil(cs) {
            let (entry, bm) = meta.lookup(gc).await?;
            if entry == L2Entry::Unallocated && bm == SubclusterBitmap::default() {
                continue;
            }
            meta.set_entry(gc, L2Entry::Unallocated, SubclusterBitmap::default())
                .await?;
            if !self.inner.external {
                super::release(&mut meta, entry, cs);
            }
        }
        meta.writeback().await?;
        meta.barrier.sync().await
    }
}
