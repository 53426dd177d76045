//! The client side of the NBD handshake spoken as raw bytes, for the tests that talk to the
//! server below any client library: `hostile.rs` (plain TCP) and `qemu-interop/nbd_tls.rs`
//! (before and after STARTTLS), both of which include this file with `#[path]`.
#![allow(dead_code)]

use std::time::Duration;

use qcow2_nbd::proto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Reads exactly `n` bytes, failing the test after a few seconds.
pub async fn read_n<S: AsyncRead + Unpin>(s: &mut S, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b))
        .await
        .expect("server answered in time")
        .expect("server answered");
    b
}

pub fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes(b[i..i + 4].try_into().unwrap())
}

pub fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[i..i + 8].try_into().unwrap())
}

/// Sends one option (flushed: a TLS stream holds written bytes until then).
pub async fn send_option<S: AsyncWrite + Unpin>(s: &mut S, option: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await.unwrap();
    s.flush().await.unwrap();
}

/// One option reply: (option, type, data).
pub async fn option_reply<S: AsyncRead + Unpin>(s: &mut S) -> (u32, u32, Vec<u8>) {
    let h = read_n(s, 20).await;
    assert_eq!(u64_at(&h, 0), proto::OPT_REPLY_MAGIC);
    let len = u32_at(&h, 16) as usize;
    (u32_at(&h, 8), u32_at(&h, 12), read_n(s, len).await)
}

/// The data of `NBD_OPT_GO` / `INFO` for export `name`, asking for no information items.
pub fn go_payload(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}
