//! Create an image and write and read it from many tasks at once.
//!
//! `cargo run --example concurrent -p qcow2-async -- /tmp/example.qcow2`

use qcow2_async::{CreateOptions, Image, OpenOptions};

#[tokio::main]
async fn main() -> qcow2_async::Result<()> {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        std::env::temp_dir()
            .join("example.qcow2")
            .display()
            .to_string()
    });
    let img = Image::create(&path, &CreateOptions::new(1 << 30), &OpenOptions::default()).await?;

    // 32 tasks, each writing its own 64 KiB stripes; clones share one image.
    let writers: Vec<_> = (0..32u64)
        .map(|t| {
            let img = img.clone();
            tokio::spawn(async move {
                for i in 0..16u64 {
                    img.write_at(&[t as u8 + 1; 65536], (i * 32 + t) * 65536)
                        .await?;
                }
                Ok::<_, qcow2_async::Error>(())
            })
        })
        .collect();
    for w in writers {
        w.await.expect("task panicked")?;
    }
    img.flush().await?;

    let mut buf = vec![0u8; 65536];
    img.read_at(&mut buf, 5 * 65536).await?;
    assert!(buf.iter().all(|&b| b == 6));
    img.close().await?;
    println!("wrote and verified 32 MiB from 32 tasks into {path}");
    Ok(())
}
