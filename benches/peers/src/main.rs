//! `qcow2-peer-bench`: the request loop of `qemu-img bench` / `qcow2 bench` run on the Rust
//! peer engines, each in the mode its own documentation and tools use, so that
//! `benches/compare.sh` can put them beside QEMU and ours on the same images:
//!
//! * **imago** 0.2.6: `FormatAccess` over `imago::file::File`, `depth` request loops polled
//!   by one `FuturesUnordered` on a current-thread Tokio runtime (imago's futures borrow the
//!   image and its file does blocking `preadv`/`pwritev`, so one thread is its natural shape).
//! * **qcow2-rs** 0.1.6: `Qcow2Dev<Qcow2IoUring>` on `tokio_uring::start`, `depth` local
//!   tasks (its device is `!Send`), as its `rqcow2` tool runs it.
//!
//! Usage: `qcow2-peer-bench imago|qcow2-rs IMAGE -c COUNT -d DEPTH -s SIZE [-S STEP]
//! [-o OFFSET] [-w] [--pattern 0xNN] [-t none|writeback]`. Prints one JSON object with
//! `iops` and `cpu-us-per-request` (user + system CPU of the process during the run).
//! Request `i` goes to `(offset + i * step) % virtual size`, as in qemu-img 10.0.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use futures::stream::{FuturesUnordered, StreamExt};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Args {
    engine: String,
    image: PathBuf,
    count: u64,
    depth: u64,
    size: u64,
    step: u64,
    offset: u64,
    write: bool,
    pattern: u8,
    direct: bool,
}

fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_lowercase() {
                'k' => 1u64 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                _ => return Err(format!("bad size suffix in '{s}'").into()),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    Ok(num.parse::<u64>()? * mult)
}

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let engine = it.next().ok_or("engine (imago or qcow2-rs) missing")?;
    let image = PathBuf::from(it.next().ok_or("image missing")?);
    let mut a = Args {
        engine,
        image,
        count: 75000,
        depth: 64,
        size: 4096,
        step: 0,
        offset: 0,
        write: false,
        pattern: 0xa5,
        direct: true,
    };
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "-c" => a.count = val()?.parse()?,
            "-d" => a.depth = val()?.parse::<u64>()?.max(1),
            "-s" => a.size = parse_size(&val()?)?,
            "-S" => a.step = parse_size(&val()?)?,
            "-o" => a.offset = parse_size(&val()?)?,
            "-w" => a.write = true,
            "--pattern" => {
                let v = val()?;
                a.pattern = u8::from_str_radix(v.trim_start_matches("0x"), 16)?;
            }
            "-t" => {
                a.direct = match val()?.as_str() {
                    "none" => true,
                    "writeback" => false,
                    o => return Err(format!("cache mode '{o}' (none or writeback)").into()),
                }
            }
            o => return Err(format!("unknown option '{o}'").into()),
        }
    }
    if a.step == 0 {
        a.step = a.size;
    }
    Ok(a)
}

/// User + system CPU seconds of this process.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |r| r.1);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn offset_of(a: &Args, i: u64, virtual_size: u64) -> u64 {
    let off = ((a.offset as u128 + i as u128 * a.step as u128) % virtual_size as u128) as u64;
    off.min(virtual_size - a.size)
}

fn report(a: &Args, seconds: f64, cpu: f64) {
    let v = serde_json::json!({
        "engine": a.engine, "requests": a.count, "request-size": a.size, "depth": a.depth,
        "seconds": seconds, "iops": a.count as f64 / seconds,
        "cpu-seconds": cpu, "cpu-us-per-request": cpu * 1e6 / a.count.max(1) as f64,
    });
    println!("{v}");
}

fn run_imago(a: &Args) -> Result<()> {
    use imago::io_buffers::IoBuffer;
    use imago::qcow2::Qcow2;
    use imago::{
        FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate, StorageOpenOptions,
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let qcow2 = Qcow2::<imago::file::File>::builder_path(&a.image)
            .storage_open_options(StorageOpenOptions::new().direct(a.direct))
            .write(a.write)
            .open(PermissiveImplicitOpenGate::default())
            .await?;
        let img = FormatAccess::new(qcow2);
        let vsize = img.size();
        let align = img.mem_align().max(1);
        let (cpu0, t0) = (cpu_seconds(), Instant::now());
        let mut loops: FuturesUnordered<_> = (0..a.depth)
            .map(|task| {
                let img = &img;
                async move {
                    let mut buf = IoBuffer::new(a.size as usize, align)?;
                    buf.as_mut().into_slice().fill(a.pattern);
                    let mut i = task;
                    while i < a.count {
                        let off = offset_of(a, i, vsize);
                        if a.write {
                            img.write(&buf, off).await?;
                        } else {
                            img.read(&mut buf, off).await?;
                        }
                        i += a.depth;
                    }
                    Ok::<_, std::io::Error>(())
                }
            })
            .collect();
        while let Some(r) = loops.next().await {
            r?;
        }
        let (secs, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
        if a.write {
            img.flush().await?;
        }
        report(a, secs, cpu);
        Ok(())
    })
}

fn run_qcow2_rs(a: &Args) -> Result<()> {
    use qcow2_rs::dev::Qcow2DevParams;
    use qcow2_rs::helpers::Qcow2IoBuf;

    let path: &Path = &a.image;
    tokio_uring::start(async {
        // As `qcow2_default_params!`: 512-byte sectors, default cache sizes.
        let p = Qcow2DevParams::new(9, None, None, !a.write, a.direct);
        let dev = Rc::new(
            qcow2_rs::utils::qcow2_setup_dev_uring(path, &p)
                .await
                .map_err(|e| format!("qcow2-rs open: {e:?}"))?,
        );
        let vsize = dev.info.virtual_size();
        let (cpu0, t0) = (cpu_seconds(), Instant::now());
        let (count, depth, size, write, pattern) = (a.count, a.depth, a.size, a.write, a.pattern);
        let offs: Rc<Vec<u64>> = Rc::new((0..count).map(|i| offset_of(a, i, vsize)).collect());
        let tasks: Vec<_> = (0..depth)
            .map(|task| {
                let (dev, offs) = (dev.clone(), offs.clone());
                tokio_uring::spawn(async move {
                    let mut buf = Qcow2IoBuf::<u8>::new(size as usize);
                    buf.fill(pattern);
                    let mut i = task;
                    while i < count {
                        let off = offs[i as usize];
                        if write {
                            dev.write_at(&buf, off).await?;
                        } else {
                            dev.read_at(&mut buf, off).await?;
                        }
                        i += depth;
                    }
                    Ok::<_, qcow2_rs::error::Qcow2Error>(())
                })
            })
            .collect();
        for t in tasks {
            t.await?.map_err(|e| format!("qcow2-rs request: {e:?}"))?;
        }
        let (secs, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
        if write {
            dev.flush_meta()
                .await
                .map_err(|e| format!("qcow2-rs flush: {e:?}"))?;
        }
        report(a, secs, cpu);
        Ok(())
    })
}

fn main() {
    let r = parse_args().and_then(|a| match a.engine.as_str() {
        "imago" => run_imago(&a),
        "qcow2-rs" => run_qcow2_rs(&a),
        o => Err(format!("unknown engine '{o}' (imago or qcow2-rs)").into()),
    });
    if let Err(e) = r {
        eprintln!("qcow2-peer-bench: {e}");
        std::process::exit(1);
    }
}
