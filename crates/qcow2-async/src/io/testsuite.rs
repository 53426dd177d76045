//! One behaviour suite for every [`BlockFile`] backend, so that the engine can treat them as
//! interchangeable. Each backend's test module calls [`block_file_suite!`] with an async
//! fixture constructor; a constructor returning `None` skips the suite (e.g. io_uring disabled
//! on the test machine), printing why.

use std::any::Any;
use std::future::{poll_fn, Future};
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use super::{BlockFile, FileOptions, IoBuf};

/// A file under test plus whatever must outlive it (a temporary file's path, say).
pub(crate) struct Fixture {
    pub file: Arc<dyn BlockFile>,
    _guard: Option<Box<dyn Any + Send>>,
}

impl Fixture {
    pub fn new(file: Arc<dyn BlockFile>) -> Fixture {
        Fixture { file, _guard: None }
    }

    pub fn with_guard(file: Arc<dyn BlockFile>, guard: impl Any + Send) -> Fixture {
        Fixture {
            file,
            _guard: Some(Box::new(guard)),
        }
    }
}

/// A directory on a real disk for O_DIRECT tests: `/tmp` is often tmpfs, `/var/tmp` rarely.
pub(crate) fn direct_io_dir() -> PathBuf {
    let var_tmp = PathBuf::from("/var/tmp");
    if var_tmp.is_dir() {
        var_tmp
    } else {
        std::env::temp_dir()
    }
}

/// A file opened with O_DIRECT on a real disk, or `None` (with the reason printed) when the
/// file system refuses O_DIRECT.
pub(crate) fn direct_file(
    open: impl FnOnce(&Path, &FileOptions) -> io::Result<Arc<dyn BlockFile>>,
) -> Option<Fixture> {
    let tmp = tempfile::NamedTempFile::new_in(direct_io_dir()).expect("temporary file");
    let opts = FileOptions {
        direct: true,
        ..FileOptions::default()
    };
    match open(tmp.path(), &opts) {
        Ok(file) => Some(Fixture::with_guard(file, tmp)),
        Err(e) if e.kind() == io::ErrorKind::Unsupported => {
            println!("skipping O_DIRECT test: {e}");
            None
        }
        Err(e) => panic!("opening {} with O_DIRECT: {e}", tmp.path().display()),
    }
}

/// Expands to one `#[tokio::test]` per behaviour, each building a fresh fixture with `$factory`
/// (an `async fn() -> Option<Fixture>` in scope of the caller).
macro_rules! block_file_suite {
    ($factory:ident) => {
        $crate::io::testsuite::block_file_suite!(
            @cases $factory;
            round_trip,
            read_past_eof_zero_fills,
            set_len,
            punch_hole_reads_zeros,
            zero_range,
            allocate,
            flush,
            concurrent_writes,
            dropped_futures,
            vectored
        );
    };
    (@cases $factory:ident; $($case:ident),*) => {
        mod suite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $case() {
                    $crate::io::testsuite::$case($factory().await).await;
                }
            )*
        }
    };
}
pub(crate) use block_file_suite;

macro_rules! fixture_or_skip {
    ($fixture:expr) => {
        match $fixture {
            Some(f) => f.file.clone(),
            None => return,
        }
    };
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn write(file: &dyn BlockFile, data: &[u8], offset: u64) {
    let buf = file
        .write_at(IoBuf::from_slice(data, 1), offset)
        .await
        .unwrap();
    assert_eq!(&buf[..], data, "write_at must hand the buffer back intact");
}

/// Reads into a buffer pre-filled with garbage, so that zero-filling is actually checked.
async fn read(file: &dyn BlockFile, len: usize, offset: u64) -> Vec<u8> {
    let buf = IoBuf::from_vec(vec![0xa5; len]);
    let buf = file.read_at(buf, offset).await.unwrap();
    assert_eq!(buf.len(), len);
    buf.into_vec()
}

pub(crate) async fn round_trip(fixture: Option<Fixture>) {
    let file = fixture_or_skip!(fixture);
    let file = &*file;
    assert_eq!(file.len().await.unwrap(), 0);
    let data = pattern(10_000, 7);
    write(file, &data, 1000).await;
    assert_eq!(file.len().await.unwrap(), 11_000);
    assert_eq!(read(file, 10_000, 1000).await, data);
    assert_eq!(
        read(file, 1000, 0).await,
        vec![0; 1000],
        "gap before the write"
    );
    // Overwrite the middle; neighbours are untouched.
    write(file, b"hello", 3000).await;
    let back = read(file, 11_000, 0).await;
    assert_eq!(&back[3000..3005], b"hello");
    assert_eq!(&back[1000..3000], &data[..2000]);
    assert_eq!(&back[3005..], &data[2005..]);
    // Empty transfers are no-ops.
    assert!(file
        .read_at(IoBuf::zeroed(0, 1), 5)
        .await
        .unwrap()
        .is_empty());
    file.write_at(IoBuf::zeroed(0, 1), 1 << 40).await.unwrap();
    assert_eq!(file.len().await.unwrap(), 11_000);
}

pub(crate) async fn read_past_eof_zero_fills(fixture: Option<Fixture>) {
    let file = fixture_or_skip!(fixture);
    let file = &*file;
    write(file, &[0xff; 10], 0).await;
    let back = read(file, 100, 5).await;
    assert_eq!(&back[..5], &[0xff; 5]);
    assert_eq!(&back[5..], &[0; 95][..]);
    assert_eq!(read(file, 4096, 1 << 30).await, vec![0; 4096]);
    assert_eq!(
        file.len().await.unwrap(),
        10,
        "reading must not extend the file"
    );
}

pub(crate) async fn set_len(fixture: Option<Fixture>) {
    let file = fixture_or_skip!(fixture);
    let file = &*file;
    write(file, &[1; 100], 0).await;
    file.set_len(1 << 20).await.unwrap();
    assert_eq!(file.len().await.unwrap(), 1 << 20);
    assert_eq!(read(file, 100, (1 << 20) - 100).await, vec![0; 100]);
    file.set_len(50).await.unwrap();
    assert_eq!(file.len().await.unwrap(), 50);
    let back = read(file, 100, 0).await;
    assert_eq!(&back[..50], &[1; 50]);
    assert_eq!(&back[50..], &[0; 50], "truncated bytes must not reappear");
    // Growing again after a truncation exposes zeros, not the old data.
    file.set_len(100).await.unwrap();
    assert_eq!(&read(file, 100, 0).await[50..], &[0; 50]);
}

pub(crate) async fn punch_hole_reads_zeros(fixture: Option<Fixture>) {
    let file = fixture_or_skip!(fixture);
    let file = &*file;
    write(file, &[0xff; 65536], 0).await;
    file.punch_hole(4096, 8192).await.unwrap();
    // An unaligned hole: the file system zeroes partial blocks.
    file.punch_hole(30_000, 1000).await.unwrap();
    assert_eq!(
        file.len().await.unwrap(),
        65536,
        "punch_hole keeps the size"
    );
    let back = read(file, 65536, 0).await;
    for (i, &b) in back.iter().enumerate() {
        let in_hole = (4096..12288).contains(&i) || (30_000..31_000).contains(&i);
        assert_eq!(b, if in_hole { 0 } else { 0xff }, "byte {i}");
    }
    // A hole past EOF changes nothing.
    file.punch_hole(1 << 20, 4096).await.unwrap();
    assert_eq!(file.len().await.unwrap(), 65536);
}

pub(crate) async fn zero_range(fixture: Option<Fixture>) {
    let file = fixture_or_skip!(fixture);
    let file = &*file;
    write(file, &[0xff; 65536], 0).await;
    file.zero_range(100, 5000).await.unwrap();
    let back = read(file, 65536, 0).await;
    for (i, &b) in back.iter().enumerate() {
        let zeroed = (100..5100).contains(&i);
        assert_eq!(b, if zeroed { 0 } else { 0xff }, "byte {i}");
    }
    // Straddling EOF grows the file.
    file.zero_range(60_000, 10_000).await.unwrap();
    assert_eq!(file.len().await.unwrap(), 70_000);
    let back = read(file, 10_000, 60_000).await;
    assert_eq!(back, vec![0; 10_000]);
    assert_eq!(read(file, 1, 59_999).await, [0xff]);
}

pub(crate) async fn allocate(fixture: Option<Fixture>) {
    let file = fixture_or_skip!(fixture);
    let file = &*file;
    file.allocate(0, 8192).await.unwrap();
    assert_eq!(file.len().await.unwrap(), 8192);
    assert_eq!(read(file, 8192, 0).await, vec![0; 8192]);
    write(file, &[3; 10], 0).await;
    // Allocating inside the file neither shrinks nor changes the data.
    file.allocate(0, 4096).await.unwrap();
    assert_eq!(file.len().await.unwrap(), 8192);
    assert_eq!(read(file, 10, 0).await, [3; 10]);
}

pub(crate) async fn flush(fixture: Option<Fixture>) {
    let file = fixture_or_skip!(fixture);
    let file = &*file;
    file.flush().await.unwrap();
    write(file, &[9; 4096], 0).await;
    file.flush().await.unwrap();
    assert_eq!(read(file, 4096, 0).await, vec![9; 4096]);
}

/// Many writes in flight at once (the io_uring backend batches them into few submissions),
/// then concurrent reads of the same ranges.
pub(crate) async fn concurrent_writes(fixture: Option<Fixture>) {
    const N: usize = 256;
    const LEN: usize = 3000; // Deliberately not a power of two.
    let file = fixture_or_skip!(fixture);
    let mut tasks = Vec::new();
    for i in 0..N {
        let file = file.clone();
        tasks.push(tokio::spawn(async move {
            let data = pattern(LEN, i as u8);
            file.write_at(IoBuf::from_vec(data), (i * LEN) as u64)
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(file.len().await.unwrap(), (N * LEN) as u64);
    let all = read(&*file, N * LEN, 0).await;
    for i in 0..N {
        assert_eq!(
            &all[i * LEN..(i + 1) * LEN],
            &pattern(LEN, i as u8)[..],
            "range {i}"
        );
    }
    let mut tasks = Vec::new();
    for i in 0..N {
        let file = file.clone();
        tasks.push(tokio::spawn(async move {
            let buf = file
                .read_at(IoBuf::zeroed(LEN, 1), (i * LEN) as u64)
                .await
                .unwrap();
            assert_eq!(buf.into_vec(), pattern(LEN, i as u8), "range {i}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Polls `fut` exactly once (so that a backend has submitted it), reporting readiness.
pub(crate) async fn poll_once<F: Future + ?Sized>(fut: &mut Pin<Box<F>>) -> bool {
    poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx).is_ready())).await
}

/// Vectored reads and writes move consecutive bytes through several buffers, and a vectored
/// read past EOF zero-fills the rest of its buffers.
pub(crate) async fn vectored(fixture: Option<Fixture>) {
    let file = fixture_or_skip!(fixture);
    let file = &*file;
    let data = pattern(300_000, 3);
    let cuts = [0usize, 1, 4096, 4097, 70_000, 200_000, 300_000];
    let bufs: Vec<IoBuf> = cuts
        .windows(2)
        .map(|w| IoBuf::from_vec(data[w[0]..w[1]].to_vec()))
        .collect();
    let back = file.write_vectored_at(bufs, 1000).await.unwrap();
    assert_eq!(back.len(), cuts.len() - 1, "the buffers come back");
    let whole = file
        .read_at(IoBuf::zeroed(data.len(), 1), 1000)
        .await
        .unwrap();
    assert!(whole[..] == data[..], "vectored write landed in order");
    // Read it back in other pieces, running 5000 bytes past EOF.
    let sizes = [10usize, 65_536, 1, 234_453, 5000];
    let bufs: Vec<IoBuf> = sizes
        .iter()
        .map(|&n| IoBuf::from_vec(vec![0xee; n]))
        .collect();
    let got = file.read_vectored_at(bufs, 1000).await.unwrap();
    let flat: Vec<u8> = got.iter().flat_map(|b| b.iter().copied()).collect();
    assert_eq!(flat.len(), data.len() + 5000);
    assert!(flat[..data.len()] == data[..], "vectored read in order");
    assert!(
        flat[data.len()..].iter().all(|&b| b == 0),
        "past EOF reads zeros"
    );
    assert!(file
        .read_vectored_at(Vec::new(), 0)
        .await
        .unwrap()
        .is_empty());
}

/// Abandoning futures mid-flight must neither crash nor wedge the backend.
pub(crate) async fn dropped_futures(fixture: Option<Fixture>) {
    let file = fixture_or_skip!(fixture);
    let file = &*file;
    let data = pattern(1 << 20, 1);
    write(file, &data, 0).await;
    for i in 0..64u64 {
        let mut fut = file.read_at(IoBuf::zeroed(1 << 20, 1), 0);
        poll_once(&mut fut).await;
        drop(fut);
        // Abandoned writes land or not, but they must not corrupt anything else: they target
        // a range of their own.
        let mut fut = file.write_at(IoBuf::from_vec(vec![0xee; 4096]), (2 << 20) + i * 4096);
        poll_once(&mut fut).await;
        drop(fut);
        let mut fut = file.flush();
        poll_once(&mut fut).await;
        drop(fut);
    }
    assert_eq!(read(file, 1 << 20, 0).await, data);
    write(file, b"still works", 0).await;
    file.flush().await.unwrap();
    assert_eq!(read(file, 11, 0).await, b"still works");
}

/// O_DIRECT semantics: aligned transfers work (including a read straddling EOF); unaligned
/// offsets, lengths and addresses are `InvalidInput`.
pub(crate) async fn direct_io(fixture: Option<Fixture>) {
    let file = fixture_or_skip!(fixture);
    let file = &*file;
    let align = file.alignment();
    assert!(align >= 512, "direct file reports alignment {align}");
    let data = pattern(2 * align, 5);
    let buf = file
        .write_at(IoBuf::from_slice(&data, align), align as u64)
        .await
        .unwrap();
    assert_eq!(&buf[..], &data[..]);
    file.flush().await.unwrap();
    assert_eq!(file.len().await.unwrap(), 3 * align as u64);
    let back = file
        .read_at(IoBuf::zeroed(4 * align, align), 0)
        .await
        .unwrap();
    assert_eq!(&back[..align], &vec![0; align][..]);
    assert_eq!(&back[align..3 * align], &data[..]);
    assert_eq!(&back[3 * align..], &vec![0; align][..], "past EOF");

    // A file whose length is not a multiple of the block size (qcow2 images often end
    // mid-cluster): the kernel returns a short read, the rest must read as zeros.
    file.set_len(3 * align as u64 - 100).await.unwrap();
    let back = file
        .read_at(IoBuf::zeroed(4 * align, align), 0)
        .await
        .unwrap();
    assert_eq!(&back[align..3 * align - 100], &data[..2 * align - 100]);
    assert!(back[3 * align - 100..].iter().all(|&b| b == 0));

    let expect_invalid = |res: io::Result<IoBuf>, what: &str| match res {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{what}: {e}"),
        Ok(_) => panic!("{what}: unaligned request accepted"),
    };
    expect_invalid(
        file.read_at(IoBuf::zeroed(align, align), 100).await,
        "read offset",
    );
    expect_invalid(
        file.write_at(IoBuf::zeroed(align, align), 100).await,
        "write offset",
    );
    expect_invalid(
        file.read_at(IoBuf::zeroed(100, align), 0).await,
        "read length",
    );
    expect_invalid(
        file.write_at(IoBuf::zeroed(align + 1, align), 0).await,
        "write length",
    );
    let vec_buf = IoBuf::from_vec(vec![0; align]);
    if vec_buf.as_ptr() as usize % align != 0 {
        expect_invalid(file.read_at(vec_buf, 0).await, "read address");
    }
    // The file still works after rejected requests.
    let back = file
        .read_at(IoBuf::zeroed(align, align), align as u64)
        .await
        .unwrap();
    assert_eq!(&back[..], &data[..align]);

    // Vectored: aligned segments go through as they are; a misaligned one is refused.
    let segs = vec![
        IoBuf::from_slice(&data[..align], align),
        IoBuf::from_slice(&data[align..], align),
    ];
    file.write_vectored_at(segs, 4 * align as u64)
        .await
        .unwrap();
    let got = file
        .read_vectored_at(
            vec![IoBuf::zeroed(align, align), IoBuf::zeroed(align, align)],
            4 * align as u64,
        )
        .await
        .unwrap();
    assert_eq!(&got[0][..], &data[..align]);
    assert_eq!(&got[1][..], &data[align..]);
    match file
        .read_vectored_at(
            vec![IoBuf::zeroed(align, align), IoBuf::zeroed(100, align)],
            0,
        )
        .await
    {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}"),
        Ok(_) => panic!("a misaligned segment was accepted"),
    }
}
