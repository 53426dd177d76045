//! Criterion micro-benchmarks of the engine's hot paths: a mapping lookup on a metadata
//! cache hit, a 4 KiB read of an allocated cluster from memory, and lease acquire/release.
//! (Codec benchmarks — L2 entry and compressed descriptor decode, refcount updates — are in
//! `format_codecs.rs`.)

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qcow2_async::io::{BlockFile, MemFile};
use qcow2_async::{CreateOptions, Image, OpenOptions};

fn image(rt: &tokio::runtime::Runtime) -> Image {
    rt.block_on(async {
        let file: Arc<dyn BlockFile> = Arc::new(MemFile::from_bytes(Vec::new()));
        Image::format_file(file.clone(), &CreateOptions::new(64 << 20))
            .await
            .unwrap();
        let img = Image::open_file(file, None, &OpenOptions::default(), None)
            .await
            .unwrap();
        img.write_at(&vec![7u8; 4 << 20], 0).await.unwrap();
        img
    })
}

fn lookups(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let img = image(&rt);
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(1));
    g.bench_function("mapping lookup, cache hit (map of 4 KiB)", |b| {
        let mut off = 0u64;
        b.iter(|| {
            off = (off + 69632) % (4 << 20);
            rt.block_on(img.map(off / 4096 * 4096, 4096)).unwrap()
        })
    });
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("4 KiB read of an allocated cluster (in-memory file)", |b| {
        let mut buf = vec![0u8; 4096];
        let mut off = 0u64;
        b.iter(|| {
            off = (off + 69632) % (4 << 20);
            rt.block_on(img.read_at(&mut buf, off / 4096 * 4096))
                .unwrap()
        })
    });
    g.finish();
}

fn leases(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let leases = qcow2_async::__bench::ClusterLeases::default();
    let mut g = c.benchmark_group("lease");
    g.throughput(Throughput::Elements(1));
    g.bench_function("shared acquire + release", |b| {
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            rt.block_on(async { drop(leases.shared(n % 64).await) })
        })
    });
    g.bench_function("exclusive acquire + release", |b| {
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            rt.block_on(async { drop(leases.exclusive(n % 64).await) })
        })
    });
    g.finish();
}

criterion_group!(benches, lookups, leases);
criterion_main!(benches);
