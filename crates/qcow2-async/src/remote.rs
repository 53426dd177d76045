//! Disks named by URL (`s3://bucket/base.qcow2`, `https://host/base.qcow2`, ...).
//!
//! The engine speaks no network protocol: it only knows that a name with a `scheme://`
//! prefix is not a path, and asks the [`RemoteOpener`] the caller installed in
//! [`crate::OpenOptions::remote`] for a read-only [`BlockFile`] behind it (the
//! `qcow2-remote` crate provides one over `object_store`). Keeping the HTTP stack out of
//! this crate keeps it out of every user that never reads a remote image.
//!
//! Whether an image may *name* a remote backing file is a policy of its own
//! ([`RemoteBacking`]), off by default: a backing name is data in a file that may come
//! from anyone, and following it makes this process send requests, with its credentials,
//! to wherever the name points.

use std::fmt::Debug;
use std::sync::Arc;

use crate::io::{BlockFile, IoFuture};

/// Opens URLs as read-only files: the hook through which the engine reaches remote disks.
///
/// Implementations decide which schemes they serve and where credentials come from. The
/// file they return must refuse writes (the engine never writes a remote disk, but a
/// caller holding the file might).
pub trait RemoteOpener: Send + Sync + Debug + 'static {
    /// Opens `url` for reading. Errors are I/O errors; an implementation with typed
    /// errors wraps them (`io::Error::other`) so that callers can downcast them.
    fn open<'a>(&'a self, url: &'a str) -> IoFuture<'a, Arc<dyn BlockFile>>;
}

/// Whether an image may name a remote backing file (a URL) that the engine then opens
/// through [`crate::OpenOptions::remote`].
///
/// Only names recorded in images are subject to it: a URL the caller passes itself
/// ([`crate::Image::open_url`], [`crate::Disk::open_url`], a
/// [`crate::BackingPolicy::Override`]) is the caller's choice, and so is the backing file
/// of an image the caller creates ([`crate::Image::create`] opens the new image with
/// remote backing allowed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RemoteBacking {
    /// An image that names a remote backing file is refused with
    /// [`crate::Error::Backing`]: the safe choice for images from elsewhere.
    #[default]
    Refuse,
    /// Follow remote backing names through the installed opener.
    Allow,
}

/// Whether `name` is a URL (`scheme://...`, the scheme being letters, digits, `+`, `-`,
/// `.` and starting with a letter) rather than a file name, as QEMU tells a protocol
/// prefix from a path.
pub fn is_url(name: &str) -> bool {
    let Some((scheme, _)) = name.split_once("://") else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// The backing name `name`, recorded in the image at URL `base`, as a URL: absolute URLs
/// as they are, other names relative to the base's folder (QEMU resolves a relative
/// backing name of a URL image the same way). `None` for an absolute path, which a remote
/// image may not name: it would make a remote object choose a local file to read.
pub(crate) fn join_url(base: &str, name: &str) -> Option<String> {
    if is_url(name) {
        return Some(name.to_string());
    }
    if name.starts_with('/') {
        return None;
    }
    // The folder ends at the last '/' before any query or fragment.
    let path_end = base.find(['?', '#']).unwrap_or(base.len());
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let folder = match base[scheme_end..path_end].rfind('/') {
        Some(i) => &base[..scheme_end + i + 1],
        None => return Some(format!("{}/{name}", &base[..path_end])),
    };
    Some(format!("{folder}{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths() {
        for url in [
            "s3://b/k",
            "https://h:80/x",
            "az://c/b",
            "gs://b/o",
            "x+y-z.w://a",
        ] {
            assert!(is_url(url), "{url}");
        }
        for path in [
            "base.qcow2",
            "/abs/base",
            "dir/s3:x",
            "json:{}",
            "://x",
            "1s://x",
        ] {
            assert!(!is_url(path), "{path}");
        }
    }

    #[test]
    fn relative_names_resolve_against_the_url_folder() {
        assert_eq!(
            join_url("s3://bucket/images/top.qcow2", "base.qcow2").unwrap(),
            "s3://bucket/images/base.qcow2"
        );
        assert_eq!(
            join_url("https://h/a/top?sig=1", "b/base").unwrap(),
            "https://h/a/b/base"
        );
        assert_eq!(join_url("s3://bucket", "base").unwrap(), "s3://bucket/base");
        assert_eq!(join_url("s3://b/top", "gs://x/y").unwrap(), "gs://x/y");
        assert_eq!(join_url("s3://b/top", "/etc/passwd"), None);
    }
}
