//! `qcow2 demo`: the built-in workload the README runs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use qcow2_async::{ops, BackingFormat, CreateOptions, Disk, Image, OpenOptions};
use rand::{Rng, SeedableRng};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[derive(Args)]
pub struct DemoArgs {
    /// Where to put the scratch images (a temporary folder by default; removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Concurrent writer tasks.
    #[arg(long, default_value_t = 64)]
    tasks: u64,
    /// Writes per task.
    #[arg(long, default_value_t = 200)]
    writes: u64,
    /// Keep the scratch images.
    #[arg(long)]
    keep: bool,
}

pub async fn demo(a: DemoArgs) -> Result<u8> {
    let tmp = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => std::env::temp_dir().join(format!("qcow2-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&tmp)?;
    let result = run(&a, &tmp).await;
    if !a.keep && a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

async fn run(a: &DemoArgs, dir: &std::path::Path) -> Result<u8> {
    let size: u64 = 256 << 20;
    // A backing image with a recognisable pattern.
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    let basei = Image::create(&base, &CreateOptions::new(size), &OpenOptions::default()).await?;
    let pattern = |p: u64| (p / 4096 % 251) as u8;
    for mib in (0..size).step_by(8 << 20) {
        let chunk: Vec<u8> = (mib..mib + (1 << 20)).map(pattern).collect();
        basei.write_at(&chunk, mib).await?;
    }
    basei.close().await?;
    let mut model = vec![0u8; size as usize];
    for mib in (0..size).step_by(8 << 20) {
        for p in mib..mib + (1 << 20) {
            model[p as usize] = pattern(p);
        }
    }
    let mut o = CreateOptions::new(size);
    o.backing_file = Some("base.qcow2".into());
    o.backing_format = Some(BackingFormat::Qcow2);
    let img = Image::create(&top, &o, &OpenOptions::default()).await?;
    // A bitmap that must end up naming exactly the blocks the workload wrote.
    img.add_bitmap("since-create", &Default::default()).await?;

    let total = a.tasks * a.writes;
    let bar = Arc::new(
        ProgressBar::new(total).with_style(ProgressStyle::with_template(
            "{spinner} writes {pos}/{len} {bar:30} {per_sec}",
        )?),
    );
    if !console_is_tty() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..a.tasks {
        let (img, bar, writes, ntasks) = (img.clone(), bar.clone(), a.writes, a.tasks);
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(t);
            let mut done = Vec::new();
            for _ in 0..writes {
                // Task t owns the 4 KiB blocks b with b % tasks == t: many tasks write into
                // the same cluster at once (allocation races), yet the result is determined.
                let block = rng.gen_range(0..size / 4096 / ntasks) * ntasks + t;
                let len = 4096u64;
                let byte: u8 = rng.gen_range(1..=255);
                img.write_at(&vec![byte; len as usize], block * 4096)
                    .await?;
                done.push((block * 4096, len, byte));
                bar.inc(1);
            }
            Ok::<_, qcow2_async::Error>(done)
        }));
    }
    let mut bytes = 0u64;
    let mut writes_log = Vec::new();
    for t in tasks {
        writes_log.push(t.await??);
    }
    img.flush().await?;
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    // Blocks are owned by one task each, so replaying each task's log in order is exact.
    for log in &writes_log {
        for &(off, len, byte) in log {
            bytes += len;
            model[off as usize..(off + len) as usize].fill(byte);
        }
    }
    let mut got = vec![0u8; size as usize];
    img.read_at(&mut got, 0).await?;
    // The bitmap names exactly the 64 KiB granules that were written.
    let mut written = std::collections::BTreeSet::new();
    for log in &writes_log {
        for &(off, _, _) in log {
            written.insert(off / 65536);
        }
    }
    let mut marked = std::collections::BTreeSet::new();
    for r in img.dirty_ranges("since-create", 0..size).await? {
        marked.extend(r.start / 65536..r.end.div_ceil(65536));
    }
    let bitmap_ok = marked == written;
    // A snapshot, then a write that must not reach it.
    img.create_snapshot("after-workload").await?;
    img.write_at(&[0xee; 65536], 0).await?;
    let mut snap = vec![0u8; 65536];
    img.read_snapshot_at("after-workload", &mut snap, 0).await?;
    let snapshot_ok = snap[..] == got[..65536];
    img.close().await?;
    // A compressed copy of the whole chain, compared with it.
    let copy = dir.join("compressed.qcow2");
    let ro = OpenOptions::read_only();
    let src = Disk::open(&top, BackingFormat::Qcow2, &ro).await?;
    let mut co = ops::ConvertOptions::new(BackingFormat::Qcow2);
    co.compress = true;
    let cstart = Instant::now();
    ops::convert(&src, &copy, &co).await?;
    let ctime = cstart.elapsed();
    let dst = Disk::open(&copy, BackingFormat::Qcow2, &ro).await?;
    let copy_ok = ops::compare(&src, &dst, true).await? == ops::CompareResult::Identical;
    let csize = std::fs::metadata(&copy)?.len();
    let check = Image::open(&top, &ro).await?.check(None).await?;
    let ccheck = Image::open(&copy, &ro).await?.check(None).await?;
    let mismatches = got
        .chunks(4096)
        .zip(model.chunks(4096))
        .filter(|(g, m)| g != m)
        .count();
    let mib = bytes as f64 / (1 << 20) as f64;
    outln!(
        "qcow2 demo: {total} writes from {} tasks over a backing chain",
        a.tasks
    );
    outln!(
        "  wrote {mib:.1} MiB in {:.2} s ({:.0} IOPS, {:.1} MiB/s)",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        mib / elapsed.as_secs_f64()
    );
    if mismatches == 0 {
        outln!("  verified: every 4 KiB block of the 256 MiB disk matches the model");
    } else {
        outln!("  VERIFICATION FAILED: {mismatches} blocks differ from the model");
        return Ok(2);
    }
    let verdict = |ok: bool| if ok { "ok" } else { "FAILED" };
    outln!(
        "  bitmap since-create names exactly the {} written 64 KiB granules: {}",
        written.len(),
        verdict(bitmap_ok)
    );
    outln!(
        "  snapshot after-workload keeps its data under a later write: {}",
        verdict(snapshot_ok)
    );
    outln!(
        "  compressed copy: {:.1} MiB file in {:.2} s, identical to the chain: {}",
        csize as f64 / (1 << 20) as f64,
        ctime.as_secs_f64(),
        verdict(copy_ok)
    );
    outln!(
        "  check: image {:?}, compressed copy {:?} ({} compressed clusters)",
        check.verdict(),
        ccheck.verdict(),
        ccheck.compressed_clusters
    );
    let clean = check.exit_code() == 0 && ccheck.exit_code() == 0;
    Ok(if bitmap_ok && snapshot_ok && copy_ok && clean {
        0
    } else {
        2
    })
}

fn console_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}
