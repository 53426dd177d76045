//! Engine errors as NBD error values, the way qemu-nbd reports them.
//!
//! qemu-nbd passes the errno of QEMU's block layer through `system_errno_to_nbd_errno`
//! (nbd/server.c). The engine keeps the OS error of a failed read or write inside
//! [`qcow2_async::Error::Io`], so the same table applies to it: a write on a full file
//! system is `NBD_ENOSPC`, which lets a VMM pause the guest (`werror=enospc`) instead of
//! failing the guest's I/O. The engine's own errors get the errno QEMU's qcow2 driver
//! returns for the same condition (corruption and metadata failures are `EIO`).

use std::io;

use qcow2_async::Error as E;

use crate::proto::errno;

/// The NBD error value for an engine error.
pub(crate) fn nbd_errno(e: &E) -> u32 {
    match e {
        E::Io { source, .. } => io_errno(source),
        E::ReadOnly => errno::EPERM,
        // QEMU: ENOSPC for a full host file system, EFBIG (also NBD_ENOSPC) when the image
        // cannot address more clusters or a table would exceed its limit.
        E::NoSpace(_) => errno::ENOSPC,
        E::OutOfRange { .. } | E::InvalidArgument(_) => errno::EINVAL,
        E::Unsupported { .. } => errno::ENOTSUP,
        // Corruption, a halted image, unreadable metadata, a broken backing chain and the
        // rest: QEMU's qcow2 driver fails the request with EIO.
        _ => errno::EIO,
    }
}

/// qemu-nbd's `system_errno_to_nbd_errno` for an OS error; errors the engine made up itself
/// (no OS errno) go by their kind, and are `EIO` when the kind says nothing more.
fn io_errno(e: &io::Error) -> u32 {
    if let Some(code) = e.raw_os_error() {
        return match code {
            0 => errno::EIO,
            libc::EPERM | libc::EROFS => errno::EPERM,
            libc::EIO => errno::EIO,
            libc::ENOMEM => errno::ENOMEM,
            libc::EDQUOT | libc::EFBIG | libc::ENOSPC => errno::ENOSPC,
            libc::EOVERFLOW => errno::EOVERFLOW,
            libc::ENOTSUP => errno::ENOTSUP,
            libc::ESHUTDOWN => errno::ESHUTDOWN,
            // qemu-nbd's default, EINVAL included.
            _ => errno::EINVAL,
        };
    }
    match e.kind() {
        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => errno::EINVAL,
        io::ErrorKind::OutOfMemory => errno::ENOMEM,
        io::ErrorKind::Unsupported => errno::ENOTSUP,
        io::ErrorKind::PermissionDenied => errno::EPERM,
        _ => errno::EIO,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn os(code: i32) -> E {
        E::Io {
            context: "writing data",
            source: io::Error::from_raw_os_error(code),
        }
    }

    #[test]
    fn a_full_file_system_is_enospc() {
        assert_eq!(nbd_errno(&os(libc::ENOSPC)), errno::ENOSPC);
    }

    #[test]
    fn quota_and_file_size_limits_are_enospc_as_in_qemu_nbd() {
        assert_eq!(nbd_errno(&os(libc::EDQUOT)), errno::ENOSPC);
        assert_eq!(nbd_errno(&os(libc::EFBIG)), errno::ENOSPC);
    }

    #[test]
    fn the_image_running_out_of_clusters_is_enospc() {
        assert_eq!(nbd_errno(&E::NoSpace("host offsets".into())), errno::ENOSPC);
    }

    #[test]
    fn read_only_is_eperm() {
        assert_eq!(nbd_errno(&E::ReadOnly), errno::EPERM);
        assert_eq!(nbd_errno(&os(libc::EROFS)), errno::EPERM);
        assert_eq!(nbd_errno(&os(libc::EPERM)), errno::EPERM);
    }

    #[test]
    fn bad_requests_are_einval() {
        let past = E::OutOfRange {
            offset: 1 << 20,
            len: 512,
            size: 1 << 20,
        };
        assert_eq!(nbd_errno(&past), errno::EINVAL);
        assert_eq!(nbd_errno(&E::InvalidArgument("x".into())), errno::EINVAL);
        assert_eq!(nbd_errno(&os(libc::EINVAL)), errno::EINVAL);
        let synthetic = io::Error::new(io::ErrorKind::InvalidInput, "unaligned");
        let e = E::Io {
            context: "reading data",
            source: synthetic,
        };
        assert_eq!(nbd_errno(&e), errno::EINVAL);
    }

    #[test]
    fn eoverflow_enomem_enotsup_eshutdown_pass_through() {
        assert_eq!(nbd_errno(&os(libc::EOVERFLOW)), errno::EOVERFLOW);
        assert_eq!(nbd_errno(&os(libc::ENOMEM)), errno::ENOMEM);
        assert_eq!(nbd_errno(&os(libc::ENOTSUP)), errno::ENOTSUP);
        assert_eq!(nbd_errno(&os(libc::ESHUTDOWN)), errno::ESHUTDOWN);
        let u = E::Unsupported {
            feature: "external data file",
            detail: String::new(),
        };
        assert_eq!(nbd_errno(&u), errno::ENOTSUP);
    }

    #[test]
    fn other_os_errors_are_einval_as_in_qemu_nbd() {
        assert_eq!(nbd_errno(&os(libc::EACCES)), errno::EINVAL);
        assert_eq!(nbd_errno(&os(libc::ENXIO)), errno::EINVAL);
    }

    #[test]
    fn device_errors_corruption_and_halted_writes_are_eio() {
        assert_eq!(nbd_errno(&os(libc::EIO)), errno::EIO);
        let other = E::Io {
            context: "blocking task",
            source: io::Error::other("task failed"),
        };
        assert_eq!(nbd_errno(&other), errno::EIO);
        assert_eq!(nbd_errno(&E::Corrupt("L2 entry".into())), errno::EIO);
        assert_eq!(nbd_errno(&E::Halted("refcount table".into())), errno::EIO);
        let backing = E::Backing {
            path: PathBuf::from("base.qcow2"),
            reason: "missing".into(),
        };
        assert_eq!(nbd_errno(&backing), errno::EIO);
        assert_eq!(nbd_errno(&E::PassphraseRequired), errno::EIO);
    }
}
