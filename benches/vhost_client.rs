//! The libblkio load generator of `benches/vhost.sh`: drives any vhost-user-blk backend
//! (`qcow2 serve --vhost-user-blk`, `qemu-storage-daemon --export type=vhost-user-blk`)
//! through libblkio's `virtio-blk-vhost-user` driver, the same client for both, and prints
//! one JSON line: `{"ops": N, "secs": S, "iops": I}`.
//!
//! ```text
//! vhost_client --socket PATH [--rw read|write] [--qd 32] [--bs 4096] [--secs 10]
//!              [--pattern random|stride] [--stride BYTES] [--seed N] [--queues 1]
//! ```
//!
//! With `--queues N`, N threads each drive a queue of their own at depth `--qd` (a guest
//! with a queue per vCPU).
//!
//! `random` picks block-aligned offsets uniformly over the disk; `stride` visits offsets
//! 0, STRIDE, 2·STRIDE, ... once each (with STRIDE the cluster size on a fresh image, every
//! write allocates) and stops at the end of the disk. Writes end with a flush inside the
//! timed part, so that both backends are timed to the same durability.
//!
//! Built and run by `benches/vhost.sh`; not a criterion benchmark (harness = false).

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

struct Args {
    socket: String,
    write: bool,
    qd: usize,
    bs: usize,
    secs: f64,
    stride: Option<u64>,
    seed: u64,
    queues: usize,
}

fn parse() -> Args {
    let mut a = Args {
        socket: String::new(),
        write: false,
        qd: 32,
        bs: 4096,
        secs: 10.0,
        stride: None,
        seed: 1,
        queues: 1,
    };
    let mut stride = 65536;
    let mut pattern = "random".to_owned();
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--bench" {
            continue; // what `cargo bench` adds
        }
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--socket" => a.socket = v,
            "--rw" => a.write = v == "write",
            "--qd" => a.qd = v.parse().expect("--qd"),
            "--bs" => a.bs = v.parse().expect("--bs"),
            "--secs" => a.secs = v.parse().expect("--secs"),
            "--pattern" => pattern = v,
            "--stride" => stride = v.parse().expect("--stride"),
            "--seed" => a.seed = v.parse().expect("--seed"),
            "--queues" => a.queues = v.parse().expect("--queues"),
            _ => panic!("unknown option {k}"),
        }
    }
    assert!(!a.socket.is_empty(), "--socket PATH is required");
    match pattern.as_str() {
        "random" => {}
        "stride" => a.stride = Some(stride),
        p => panic!("unknown pattern {p}"),
    }
    a
}

/// xorshift64*: cheap enough that the client's offsets cost nothing beside a request.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn main() -> blkio::Result<()> {
    let a = parse();
    let mut b = Blkio::new("virtio-blk-vhost-user")?;
    b.set_str("path", &a.socket)?;
    b.connect()?;
    b.set_i32("num-queues", a.queues as i32)?;
    let capacity = b.get_u64("capacity")?;
    let started = b.start()?;
    let region = b.alloc_mem_region(a.queues * a.qd * a.bs)?;
    b.map_mem_region(&region)?;
    // SAFETY: the region is mapped until the end of main, and only libblkio's requests
    // touch it (slot i of queue q is buffer q·qd + i, in flight at most once).
    let mem = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
    for (i, byte) in mem.iter_mut().enumerate() {
        *byte = (i as u8) ^ 0x5a;
    }
    let next_stride = AtomicU64::new(0);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(a.secs);
    let ops: u64 = std::thread::scope(|s| {
        let drivers: Vec<_> = started
            .queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| {
                let (a, next_stride) = (&a, &next_stride);
                let base = region.addr + i * a.qd * a.bs;
                s.spawn(move || drive(a, q, base, capacity, i as u64, next_stride, deadline))
            })
            .collect();
        drivers
            .into_iter()
            .map(|d| d.join().expect("driver thread").expect("driver"))
            .sum()
    });
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"ops\": {ops}, \"secs\": {secs:.3}, \"iops\": {:.0}}}",
        ops as f64 / secs
    );
    b.unmap_mem_region(&region);
    b.free_mem_region(&region);
    Ok(())
}

/// Keeps `a.qd` requests in flight on queue `q` (buffers from `base`) until `deadline`,
/// then (for writes) flushes; returns the requests completed.
fn drive(
    a: &Args,
    mut q: Blkioq,
    base: usize,
    capacity: u64,
    index: u64,
    next_stride: &AtomicU64,
    deadline: Instant,
) -> blkio::Result<u64> {
    let q = &mut q;
    let blocks = capacity / a.bs as u64;
    let mut rng = Rng(a.seed.max(1).wrapping_add(index.wrapping_mul(0x9e37_79b9)));
    let offset = |rng: &mut Rng| -> Option<u64> {
        match a.stride {
            Some(s) => {
                let o = next_stride.fetch_add(s, Ordering::Relaxed);
                (o + a.bs as u64 <= capacity).then_some(o)
            }
            None => Some(rng.next() % blocks * a.bs as u64),
        }
    };
    let submit = |q: &mut Blkioq, slot: usize, off: u64| {
        let p = base + slot * a.bs;
        if a.write {
            q.write(off, p as *const u8, a.bs, slot, ReqFlags::empty());
        } else {
            q.read(off, p as *mut u8, a.bs, slot, ReqFlags::empty());
        }
    };
    let mut inflight = 0;
    for slot in 0..a.qd {
        let Some(off) = offset(&mut rng) else { break };
        submit(q, slot, off);
        inflight += 1;
    }
    let mut ops = 0u64;
    let mut done: Vec<MaybeUninit<Completion>> = (0..a.qd).map(|_| MaybeUninit::uninit()).collect();
    let mut stopping = false;
    while inflight > 0 {
        let mut timeout = Duration::from_secs(30);
        let n = q.do_io(&mut done, 1, Some(&mut timeout), None)?;
        assert!(n > 0, "no completion within 30 s");
        if !stopping && Instant::now() >= deadline {
            stopping = true;
        }
        for c in &done[..n] {
            // SAFETY: do_io initialised the first n entries.
            let c = unsafe { c.assume_init_read() };
            assert_eq!(c.ret, 0, "request failed: {}", c.ret);
            inflight -= 1;
            ops += 1;
            if !stopping {
                if let Some(off) = offset(&mut rng) {
                    submit(q, c.user_data, off);
                    inflight += 1;
                }
            }
        }
    }
    if a.write {
        q.flush(0, ReqFlags::empty());
        let mut timeout = Duration::from_secs(60);
        let n = q.do_io(&mut done[..1], 1, Some(&mut timeout), None)?;
        assert_eq!(n, 1, "flush did not complete");
        // SAFETY: do_io initialised the first entry.
        assert_eq!(unsafe { done[0].assume_init_read() }.ret, 0, "flush failed");
    }
    Ok(ops)
}
