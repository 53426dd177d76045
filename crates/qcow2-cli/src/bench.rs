//! `qcow2 bench`: qemu-img bench's knobs, plus random offsets, a read/write mix, latency
//! percentiles and CPU time per request.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use qcow2_async::io::{Aio, IoBuf, RingOptions};
use qcow2_async::BackingPolicy;
use serde_json::json;

use crate::opts::{parse_size, Result};

#[derive(Args)]
pub struct BenchArgs {
    /// Number of requests.
    #[arg(short = 'c', default_value_t = 75000)]
    count: u64,
    /// Requests in flight.
    #[arg(short = 'd', default_value_t = 64)]
    depth: u64,
    /// Request size.
    #[arg(short = 's', default_value = "4K")]
    size: String,
    /// Distance between consecutive requests (default: the request size), wrapping at the
    /// end of the disk as qemu-img 10.0 does.
    #[arg(short = 'S')]
    step: Option<String>,
    /// First offset.
    #[arg(short = 'o', default_value = "0")]
    offset: String,
    /// Write instead of read.
    #[arg(short = 'w')]
    write: bool,
    /// Byte written by write requests.
    #[arg(long = "pattern", default_value = "0xa5")]
    pattern: String,
    /// `none` (O_DIRECT) or `writeback`.
    #[arg(short = 't', default_value = "writeback")]
    cache: String,
    /// `io_uring` or `threads`.
    #[arg(short = 'i', default_value = "io_uring")]
    aio: String,
    /// Image format (only qcow2).
    #[arg(short = 'f', default_value = "qcow2")]
    format: String,
    /// Random block-aligned offsets (seeded, reproducible) instead of the stride.
    #[arg(long)]
    random: bool,
    /// Read every offset of the run once before timing it (reads only): the cached-read
    /// numbers of a remote image, whose first reads go to the store.
    #[arg(long)]
    warmup: bool,
    /// Mixed mode: this percentage of requests read, the rest write.
    #[arg(long = "read-percent")]
    read_percent: Option<u8>,
    /// Flush every N write requests.
    #[arg(long = "flush-interval", default_value_t = 0)]
    flush_interval: u64,
    /// Metadata cache size in clusters per cache (L2 tables, refcount blocks).
    #[arg(long = "cache-clusters")]
    cache_clusters: Option<usize>,
    /// `human` or `json`.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// io_uring setup, comma separated: `reactor` or `thread` (who reaps completions),
    /// `sqpoll[=IDLE_MS]`, `fixed-file`, `coop-taskrun`, `nowait`/`no-nowait`; `default` for
    /// the defaults.
    #[arg(long = "ring", default_value = "default")]
    ring: String,
    /// Tokio worker threads (default: one per core).
    #[arg(long = "workers")]
    pub workers: Option<usize>,
    /// `owned`: each task hands its buffer to the engine (`read_buf`/`write_buf`, zero-copy);
    /// `slice`: the borrowed-slice API (`read_at`/`write_at`).
    #[arg(long = "buffers", default_value = "owned")]
    buffers: String,
    filename: PathBuf,
}

/// SplitMix64: a reproducible hash of the request index.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Peak resident set size of this process in KiB (`VmHWM`).
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// This process's user + system CPU seconds (from /proc, no unsafe needed).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start after ')'.
    let rest = stat.rsplit_once(')').map_or("", |r| r.1);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ')'.
    (ticks(11) + ticks(12)) / 100.0
}

pub async fn bench(a: BenchArgs) -> Result<u8> {
    if a.format != "qcow2" {
        return Err("bench runs on qcow2 images".into());
    }
    let bs = parse_size(&a.size)?;
    let step = a.step.as_deref().map(parse_size).transpose()?.unwrap_or(bs);
    let start_off = parse_size(&a.offset)?;
    let pattern = u8::from_str_radix(a.pattern.trim_start_matches("0x"), 16)
        .or_else(|_| a.pattern.parse())?;
    let aio = match a.aio.as_str() {
        "io_uring" => Aio::IoUring,
        "threads" => Aio::Threads,
        o => return Err(format!("invalid aio '{o}' (io_uring or threads)").into()),
    };
    let direct = match a.cache.as_str() {
        "none" | "directsync" => true,
        "writeback" | "writethrough" | "unsafe" => false,
        o => return Err(format!("invalid cache mode '{o}'").into()),
    };
    let writes = a.write || a.read_percent.is_some_and(|p| p < 100);
    let ring: RingOptions = a.ring.parse()?;
    let owned = match a.buffers.as_str() {
        "owned" => true,
        "slice" => false,
        o => return Err(format!("invalid buffers '{o}' (owned or slice)").into()),
    };
    let opts = {
        let mut o = crate::opts::rw();
        o.read_only = !writes;
        o.aio = Some(aio);
        o.ring = ring;
        o.direct = direct;
        o.backing = BackingPolicy::FromImage;
        o.cache_clusters = a.cache_clusters.unwrap_or(crate::opts::rw().cache_clusters);
        o
    };
    let img = crate::opts::open_image(&a.filename, &opts).await?;
    let size = img.virtual_size();
    if bs == 0 || bs > size {
        return Err("request size must be between 1 and the disk size".into());
    }
    let blocks = size / bs;
    if a.output != "json" {
        outln!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
            a.count,
            match (a.write, a.read_percent) {
                (_, Some(p)) => format!("mixed ({p}% read)"),
                (true, None) => "write".into(),
                (false, None) => "read".into(),
            },
            bs,
            a.depth,
            start_off,
            if a.random { "random".into() } else { step.to_string() }
        );
    }
    let (count, random) = (a.count, a.random);
    // Request i's offset, for the warm-up pass and the timed one alike.
    let offset_of = move |i: u64| -> u64 {
        let off = if random {
            mix(i) % blocks * bs
        } else {
            // qemu-img 10.0: offset += step, modulo the image size.
            ((start_off as u128 + i as u128 * step as u128) % size as u128) as u64
        };
        off.min(size - bs)
    };
    if a.warmup {
        if writes {
            return Err("--warmup is for read benchmarks".into());
        }
        let mut buf = vec![0u8; bs as usize];
        for i in 0..count {
            img.read_at(&mut buf, offset_of(i)).await?;
        }
    }
    let depth = a.depth.max(1);
    let written = Arc::new(AtomicU64::new(0));
    let (bar, cb) = crate::progress::bar(a.progress);
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..depth {
        let (img, written, cb) = (img.clone(), written.clone(), cb.clone());
        let (read_pct, write, flush_every) = (a.read_percent, a.write, a.flush_interval);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut buf = vec![pattern; bs as usize];
            // Aligned for O_DIRECT, so that the owned path needs no bounce buffer.
            let mut owned_buf = Some({
                let mut b = IoBuf::zeroed(bs as usize, if direct { 4096 } else { 1 });
                b.fill(pattern);
                b
            });
            // Task `t` issues requests t, t + depth, t + 2 * depth, ...: the same set of
            // requests as a shared counter hands out, without a counter that every request
            // on every core would write (that cache line alone limited multi-core runs).
            let mut next = task;
            loop {
                let i = next;
                if i >= count {
                    break;
                }
                next += depth;
                let off = offset_of(i);
                let is_write = match read_pct {
                    Some(p) => mix(i ^ 0x5555) % 100 >= u64::from(p),
                    None => write,
                };
                let t = Instant::now();
                if owned {
                    let b = owned_buf
                        .take()
                        .expect("the buffer comes back after each request");
                    owned_buf = Some(if is_write {
                        img.write_buf(b, off).await?
                    } else {
                        img.read_buf(b, off).await?
                    });
                    if is_write {
                        let n = written.fetch_add(1, Ordering::Relaxed) + 1;
                        if flush_every > 0 && n % flush_every == 0 {
                            img.flush().await?;
                        }
                    }
                } else if is_write {
                    img.write_at(&buf, off).await?;
                    let n = written.fetch_add(1, Ordering::Relaxed) + 1;
                    if flush_every > 0 && n % flush_every == 0 {
                        img.flush().await?;
                    }
                } else {
                    img.read_at(&mut buf, off).await?;
                }
                lat.push(t.elapsed().as_nanos() as u64);
                if let Some(cb) = &cb {
                    if i % 1024 == 0 {
                        cb(i, count);
                    }
                }
            }
            Ok::<_, qcow2_async::Error>(lat)
        }));
    }
    let mut lat = Vec::with_capacity(a.count as usize);
    for t in tasks {
        lat.extend(t.await??);
    }
    let run = t0.elapsed().as_secs_f64();
    let cpu_run = cpu_seconds() - cpu0;
    img.close().await?;
    let total = t0.elapsed().as_secs_f64();
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i] as f64 / 1000.0
    };
    let iops = a.count as f64 / run;
    let mibs = iops * bs as f64 / (1 << 20) as f64;
    let cpu_us = cpu_run * 1e6 / a.count.max(1) as f64;
    if a.output == "json" {
        let v = json!({
            "requests": a.count, "request-size": bs, "depth": a.depth,
            "seconds": run, "seconds-incl-close": total,
            "iops": iops, "mib-per-second": mibs,
            "latency-us": {"p50": pct(0.50), "p99": pct(0.99), "p99.9": pct(0.999), "max": pct(1.0)},
            "cpu-seconds": cpu_run, "cpu-us-per-request": cpu_us,
            "peak-rss-kib": peak_rss_kib(),
        });
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        outln!("Run completed in {run:.3} seconds.");
        outln!(
            "{iops:.0} IOPS, {mibs:.1} MiB/s; latency p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs; CPU {cpu_us:.1} µs per request; {total:.3} s including close; peak RSS {} KiB",
            pct(0.5),
            pct(0.99),
            pct(0.999),
            peak_rss_kib()
        );
    }
    Ok(0)
}
