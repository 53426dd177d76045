//! `qcow2 serve --vhost-user-blk` under a real Linux guest: `qemu-system-x86_64` (software
//! emulation) boots Debian's kernel with a small initramfs, whose virtio-blk driver sees the
//! export as `/dev/vda`. The guest reads what qemu-io wrote, writes with O_DIRECT and through
//! its page cache, discards, flushes, drops its caches and reads everything back; then it
//! powers off, `qcow2 serve` is stopped with SIGTERM, and the image must be check-clean and
//! `qemu-img compare` equal to a raw model of what the guest meant.
//!
//! Needs `scripts/guest-assets.sh` (run by `scripts/test.sh`), which installs
//! qemu-system-x86 and puts the kernel, modules and busybox in `target/guest`. Fails loudly
//! without them.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{assert_check_clean, qemu_create, qemu_ok, wait_for};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
/// Written by qemu-io before boot; the guest reads it.
const QEMU_WROTE: u64 = MIB;
/// Written by the guest with O_DIRECT, 64 KiB at a time.
const GUEST_DIRECT: u64 = 4 * MIB;
/// Three sectors written by the guest through its page cache: the kernel turns them into a
/// read-modify-write of a 4 KiB page, so the export sees a read and a sub-cluster write.
const GUEST_SECTORS: u64 = 6 * MIB + 512;
const GUEST_SECTORS_LEN: usize = 1536;
/// Written by qemu-io, then discarded by the guest (`blkdiscard`): reads back as zeroes.
const DISCARDED: u64 = 8 * MIB;
const SERIAL: &str = "guest-disk-1";
/// Generous: the boot takes about 10 s under software emulation here.
const GUEST_TIMEOUT: Duration = Duration::from_secs(240);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Where `scripts/guest-assets.sh` put the kernel, modules and busybox.
fn assets() -> PathBuf {
    let dir = std::env::var_os("QCOW2_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"));
    assert!(
        dir.join("ready").exists(),
        "no guest kernel in {dir:?}: run `bash scripts/guest-assets.sh` (scripts/test.sh does)"
    );
    dir
}

/// 1 MiB of bytes that no two offsets of the disk share by accident.
fn pattern() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..MIB)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A `newc` cpio archive, the format the kernel unpacks as its initramfs.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100000 | mode, (0, 0), data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

/// What the guest runs as PID 1. Each check prints `GUEST <name> ok|FAIL`, each reading of
/// the device's sysfs attributes `FACT <name>=<value>`; the host asserts on both.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
check() {
    name=$1; shift
    if sh -c "$*"; then echo "GUEST $name ok"; else echo "GUEST $name FAIL"; fi
}
for m in $(cat /lib/modules.order); do
    insmod /lib/$m.ko || echo "GUEST insmod-$m FAIL"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
check found-vda "[ -b /dev/vda ]"
q=/sys/block/vda/queue
echo "FACT size=$(blockdev --getsize64 /dev/vda)"
echo "FACT ro=$(cat /sys/block/vda/ro)"
echo "FACT serial=$(cat /sys/block/vda/serial)"
echo "FACT logical_block_size=$(cat $q/logical_block_size)"
echo "FACT optimal_io_size=$(cat $q/optimal_io_size)"
echo "FACT discard_max_bytes=$(cat $q/discard_max_bytes)"
echo "FACT write_zeroes_max_bytes=$(cat $q/write_zeroes_max_bytes)"
echo "FACT write_cache=$(cat $q/write_cache)"
echo "FACT queues=$(ls /sys/block/vda/mq | wc -l)"
head -c 1536 /pattern > /tmp/sectors
head -c 1048576 /dev/zero > /tmp/zero
check read-qemu-data "dd if=/dev/vda bs=64k skip=16 count=16 iflag=direct status=none | cmp - /pattern"
check write-direct "dd if=/pattern of=/dev/vda bs=64k seek=64 oflag=direct conv=notrunc,fsync status=none"
check write-cached "dd if=/tmp/sectors of=/dev/vda bs=512 seek=12289 conv=notrunc,fsync status=none"
check discard "blkdiscard -o 8388608 -l 1048576 /dev/vda"
sync
echo 3 > /proc/sys/vm/drop_caches
check reread-direct "dd if=/dev/vda bs=64k skip=64 count=16 iflag=direct status=none | cmp - /pattern"
check reread-cached "dd if=/dev/vda bs=512 skip=12289 count=3 status=none | cmp - /tmp/sectors"
check reread-discarded "dd if=/dev/vda bs=64k skip=128 count=16 iflag=direct status=none | cmp - /tmp/zero"
check reread-qemu-data "dd if=/dev/vda bs=1M skip=1 count=1 status=none | cmp - /pattern"
echo "GUEST done"
poweroff -f
"#;

fn initramfs(assets: &Path, pattern: &[u8]) -> Vec<u8> {
    let mut c = Cpio::default();
    for d in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "lib",
    ] {
        c.dir(d);
    }
    // The kernel opens /dev/console for PID 1's stdio before anything can mount devtmpfs.
    c.entry("dev/console", 0o020600, (5, 1), &[]);
    c.file("init", 0o755, INIT.as_bytes());
    c.file(
        "bin/busybox",
        0o755,
        &std::fs::read(assets.join("busybox")).unwrap(),
    );
    c.file("pattern", 0o644, pattern);
    let modules = assets.join("modules");
    let order = std::fs::read_to_string(modules.join("modules.order")).unwrap();
    c.file("lib/modules.order", 0o644, order.as_bytes());
    for m in order.lines() {
        let ko = std::fs::read(modules.join(format!("{m}.ko"))).unwrap();
        c.file(&format!("lib/{m}.ko"), 0o644, &ko);
    }
    c.finish()
}

/// Kills the child when a failed assertion unwinds past it.
struct Reaped(Option<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn a_linux_guest_reads_writes_discards_and_flushes_through_the_vhost_user_blk_export() {
    let assets = assets();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let sock = dir.path().join("vhost.sock");
    let pat = pattern();
    let pat_file = dir.path().join("pattern");
    std::fs::write(&pat_file, &pat).unwrap();

    // QEMU writes the data the guest will read, and the range it will discard.
    qemu_create(&img, &["-o", "cluster_size=65536"], &SIZE.to_string());
    let w = format!("write -s {} {QEMU_WROTE} {MIB}", s(&pat_file));
    let z = format!("write -P 0x5a {DISCARDED} {MIB}");
    qemu_ok("qemu-io", &["-f", "qcow2", "-c", &w, "-c", &z, s(&img)]);

    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, initramfs(&assets, &pat)).unwrap();

    let serve = Command::new(env!("CARGO_BIN_EXE_qcow2"))
        .arg("serve")
        .args([s(&img), "--vhost-user-blk", s(&sock)])
        .args(["--num-queues", "2", "--serial", SERIAL])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qcow2 binary");
    let mut serve = Reaped(Some(serve));
    wait_for("the vhost-user socket", || sock.exists());

    let started = Instant::now();
    let kernel = assets.join("vmlinuz");
    let chardev = format!("socket,id=vub,path={}", s(&sock));
    let guest = Command::new("qemu-system-x86_64")
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .args([
            "-machine",
            "q35,accel=tcg,memory-backend=mem",
            "-cpu",
            "max",
        ])
        .args(["-smp", "2", "-m", "256M"])
        // vhost-user needs guest RAM the backend can map: a shared memfd.
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .args(["-chardev", &chardev])
        .args(["-device", "vhost-user-blk-pci,chardev=vub,num-queues=2"])
        .args(["-kernel", s(&kernel), "-initrd", s(&initrd)])
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .args(["-serial", "stdio"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("qemu-system-x86_64 not found ({e}): run `bash scripts/guest-assets.sh`")
        });
    let mut guest = Reaped(Some(guest));
    let console = Arc::new(Mutex::new(String::new()));
    let reader = {
        let out = guest.0.as_mut().unwrap().stdout.take().unwrap();
        let console = console.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let mut c = console.lock().unwrap();
                c.push_str(&line);
                c.push('\n');
            }
        })
    };
    let status = loop {
        if let Some(st) = guest.0.as_mut().unwrap().try_wait().unwrap() {
            break st;
        }
        if started.elapsed() > GUEST_TIMEOUT {
            panic!(
                "the guest did not power off in {GUEST_TIMEOUT:?}; its console:\n{}",
                console.lock().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    reader.join().unwrap();
    let mut qemu_err = String::new();
    // Already exited (try_wait reaped it); only its stderr is left to read.
    let stderr = guest.0.as_mut().unwrap().stderr.as_mut().unwrap();
    std::io::Read::read_to_string(stderr, &mut qemu_err).unwrap();
    let console = console.lock().unwrap().clone();
    eprintln!("guest ran {:?}:\n{console}", started.elapsed());
    assert!(
        status.success(),
        "qemu-system-x86_64 failed: {qemu_err}\n{console}"
    );

    let fact = |name: &str| -> String {
        let key = format!("FACT {name}=");
        console
            .lines()
            .find_map(|l| l.trim().strip_prefix(&key).map(str::to_owned))
            .unwrap_or_else(|| panic!("the guest printed no {name}:\n{console}"))
    };
    for check in [
        "found-vda",
        "read-qemu-data",
        "write-direct",
        "write-cached",
        "discard",
        "reread-direct",
        "reread-cached",
        "reread-discarded",
        "reread-qemu-data",
    ] {
        let ok = format!("GUEST {check} ok");
        assert!(
            console.lines().any(|l| l.trim() == ok),
            "guest check {check} did not pass:\n{console}"
        );
    }
    assert!(!console.contains("FAIL"), "{console}");
    assert!(console.contains("GUEST done"), "{console}");
    // What the guest's virtio-blk driver made of the device's config space.
    assert_eq!(fact("size"), SIZE.to_string());
    assert_eq!(fact("ro"), "0");
    assert_eq!(fact("serial"), SERIAL);
    assert_eq!(fact("logical_block_size"), "512");
    assert_eq!(
        fact("optimal_io_size"),
        "65536",
        "TOPOLOGY: the cluster size"
    );
    assert_ne!(fact("discard_max_bytes"), "0", "DISCARD");
    assert_ne!(fact("write_zeroes_max_bytes"), "0", "WRITE_ZEROES");
    assert_eq!(fact("write_cache"), "write back", "FLUSH");
    assert_eq!(fact("queues"), "2", "MQ");

    // The export closes the image cleanly on SIGTERM.
    let pid = serve.0.as_ref().unwrap().id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut serve = serve.0.take().unwrap();
    let st = serve.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(serve.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(st.success() && err.contains("closed cleanly"), "{err}");

    assert_check_clean(&img);
    let model = dir.path().join("model.raw");
    let mut m = std::fs::File::create(&model).unwrap();
    m.set_len(SIZE).unwrap();
    for (off, data) in [
        (QEMU_WROTE, &pat[..]),
        (GUEST_DIRECT, &pat[..]),
        (GUEST_SECTORS, &pat[..GUEST_SECTORS_LEN]),
    ] {
        std::os::unix::fs::FileExt::write_all_at(&m, data, off).unwrap();
    }
    m.flush().unwrap();
    qemu_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", s(&model), s(&img)],
    );
}
