//! Micro-benchmarks of the hot decoders: L2 entries, compressed descriptors, refcounts.
//! `cargo bench -p qcow2-format`

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use qcow2_format::{CompressedDescriptor, L2Entry, L2Format, RefcountOrder};

fn l2_decode(c: &mut Criterion) {
    let fmt = L2Format::default();
    let table: Vec<u64> = (0..8192u64).map(|i| (1 << 63) | ((i + 5) << 16)).collect();
    let mut g = c.benchmark_group("l2");
    g.throughput(Throughput::Elements(table.len() as u64));
    g.bench_function("decode 8192 standard entries", |b| {
        b.iter(|| {
            for &e in &table {
                black_box(L2Entry::decode(black_box(e), fmt).unwrap());
            }
        })
    });
    g.finish();
}

fn compressed(c: &mut Criterion) {
    let raw = 0x4340_0000_0005_0000u64 & !(3 << 62);
    c.bench_function("compressed descriptor decode", |b| {
        b.iter(|| black_box(CompressedDescriptor::decode(black_box(raw), 16).unwrap()))
    });
}

fn refcounts(c: &mut Criterion) {
    let mut g = c.benchmark_group("refcount block");
    for order in [0u32, 4, 6] {
        let o = RefcountOrder::new(order).unwrap();
        let mut block = vec![0u8; 65536];
        let n = o.entries_per_block(16);
        g.throughput(Throughput::Elements(n));
        g.bench_function(format!("set+get all, {} bits", o.bits()), |b| {
            b.iter(|| {
                for i in 0..n {
                    o.set(&mut block, i, i & 1).unwrap();
                    black_box(o.get(&block, i).unwrap());
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, l2_decode, compressed, refcounts);
criterion_main!(benches);
