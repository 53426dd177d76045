//! The engine's remote hook with remote files over the in-memory store: a local overlay
//! on a remote qcow2 base, the backing policy (no opener, refused, allowed), relative
//! backing names inside a remote chain, and remote images opened directly.

mod support;

use std::sync::Arc;

use object_store::path::Path;
use object_store::ObjectStore;
use qcow2_async::io::{BlockFile, IoFuture};
use qcow2_async::{
    BackingFormat, BackingPolicy, CreateOptions, Disk, Error, Image, OpenOptions, RemoteBacking,
    RemoteOpener,
};
use qcow2_remote::{RemoteFile, RemoteOptions};
use support::{pattern, Counting};

/// Opens `mem://KEY` as KEY of the test's store.
#[derive(Debug)]
struct MemOpener(Arc<Counting>);

impl RemoteOpener for MemOpener {
    fn open<'a>(&'a self, url: &'a str) -> IoFuture<'a, Arc<dyn BlockFile>> {
        Box::pin(async move {
            let key = url.strip_prefix("mem://").expect("mem:// URL");
            let f = RemoteFile::open(
                self.0.clone() as Arc<dyn ObjectStore>,
                Path::from(key),
                url,
                RemoteOptions::default(),
            )
            .await?;
            Ok(Arc::new(f) as Arc<dyn BlockFile>)
        })
    }
}

const SIZE: u64 = 4 << 20;

/// A local qcow2 image of SIZE with `data` at 0 (backing name `backing`, not opened),
/// uploaded to the store as `key`.
async fn upload_image(
    store: &Counting,
    dir: &std::path::Path,
    key: &str,
    data: &[u8],
    backing: Option<&str>,
) {
    let path = dir.join(key.replace('/', "_"));
    let mut c = CreateOptions::new(SIZE);
    c.backing_file = backing.map(str::to_string);
    c.backing_format = backing.map(|_| BackingFormat::Qcow2);
    let mut o = OpenOptions::default();
    o.backing = BackingPolicy::Ignore;
    let img = Image::create(&path, &c, &o).await.unwrap();
    img.write_at(data, 0).await.unwrap();
    img.close().await.unwrap();
    store.put_bytes(key, std::fs::read(&path).unwrap()).await;
}

fn with_opener(store: &Arc<Counting>, policy: RemoteBacking) -> OpenOptions {
    let mut o = OpenOptions::default();
    o.remote = Some(Arc::new(MemOpener(store.clone())));
    o.remote_backing = policy;
    o
}

async fn read(img: &Image, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    img.read_at(&mut b, off).await.unwrap();
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_overlay_on_a_remote_base_and_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let store = Counting::new();
    let base = pattern(1 << 20, 3);
    upload_image(&store, dir.path(), "bases/base.qcow2", &base, None).await;

    // Creating an overlay on a URL is the caller's choice: allowed under the default policy.
    let top = dir.path().join("top.qcow2");
    let mut c = CreateOptions::new(SIZE);
    c.backing_file = Some("mem://bases/base.qcow2".into());
    c.backing_format = Some(BackingFormat::Qcow2);
    let img = Image::create(&top, &c, &with_opener(&store, RemoteBacking::Refuse))
        .await
        .unwrap();
    assert_eq!(
        img.header().await.backing_file.as_deref(),
        Some("mem://bases/base.qcow2")
    );
    img.write_at(&[0xAB; 4096], 8192).await.unwrap();
    let mut want = base[..65536].to_vec();
    want[8192..12288].fill(0xAB);
    assert!(read(&img, 0, 65536).await == want);
    img.close().await.unwrap();

    // Reopened, the image names a URL: no opener, refused, allowed.
    let e = Image::open(&top, &OpenOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    let e = Image::open(&top, &with_opener(&store, RemoteBacking::Refuse))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Backing { .. }), "{e}");
    let img = Image::open(&top, &with_opener(&store, RemoteBacking::Allow))
        .await
        .unwrap();
    assert!(read(&img, 0, 65536).await == want);
    assert!(read(&img, 65536, (1 << 20) - 65536).await[..] == base[65536..]);
    img.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_chains_resolve_relative_names_and_refuse_local_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = Counting::new();
    let base = pattern(1 << 20, 5);
    upload_image(&store, dir.path(), "b/base.qcow2", &base, None).await;
    upload_image(
        &store,
        dir.path(),
        "b/mid.qcow2",
        &[0x11; 4096],
        Some("base.qcow2"),
    )
    .await;
    upload_image(
        &store,
        dir.path(),
        "b/evil.qcow2",
        &[0x22; 4096],
        Some("/etc/passwd"),
    )
    .await;

    // Opened directly: read-only only.
    let e = Image::open_url(
        "mem://b/mid.qcow2",
        &with_opener(&store, RemoteBacking::Allow),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    let mut ro = with_opener(&store, RemoteBacking::Allow);
    ro.read_only = true;
    let mid = Image::open_url("mem://b/mid.qcow2", &ro).await.unwrap();
    let got = read(&mid, 0, 1 << 20).await;
    assert!(got[..4096].iter().all(|&b| b == 0x11));
    // mid was written without its backing file open: the rest of its first cluster is
    // zeros; everything after comes from base.
    assert!(got[4096..65536].iter().all(|&b| b == 0));
    assert!(got[65536..] == base[65536..]);
    // The relative name is a URL too, subject to the policy.
    ro.remote_backing = RemoteBacking::Refuse;
    let e = Image::open_url("mem://b/mid.qcow2", &ro).await.unwrap_err();
    assert!(matches!(e, Error::Backing { .. }), "{e}");
    // ... which the caller may waive for the top image like for a local one.
    ro.backing = BackingPolicy::Ignore;
    Image::open_url("mem://b/mid.qcow2", &ro).await.unwrap();
    // A remote image never picks a local file.
    ro.backing = BackingPolicy::FromImage;
    ro.remote_backing = RemoteBacking::Allow;
    let e = Image::open_url("mem://b/evil.qcow2", &ro)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Backing { .. }), "{e}");

    // A raw view of the same object, and a comparison through the engine.
    let raw = Disk::open_url("mem://b/base.qcow2", BackingFormat::Raw, &ro)
        .await
        .unwrap();
    assert_eq!(
        raw.size(),
        store
            .inner
            .head(&Path::from("b/base.qcow2"))
            .await
            .unwrap()
            .size
    );
}
