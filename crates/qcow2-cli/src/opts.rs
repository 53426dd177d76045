//! Spellings shared by the verbs: sizes, formats and `-o key=value,...` lists with
//! qemu-img's option names.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use qcow2_async::io::IoBuf;
use qcow2_async::{
    BackingFormat, CipherAlg, CipherMode, CreateOptions, Disk, EncryptionOptions, HashAlg, Image,
    IvGenAlg, KdfIterations, OpenOptions, Preallocation, RemoteBacking, RemoteOpener, Secret,
};
use qcow2_remote::{ObjectStoreOpener, RemoteOptions};

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

pub fn parse_size(s: &str) -> Result<u64> {
    let (num, mult) = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1u64 << 40,
                _ => return Err(format!("invalid size suffix in '{s}'").into()),
            };
            (&s[..s.len() - 1], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("invalid size '{s}'"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size '{s}' too large").into())
}

fn on(v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("invalid boolean '{v}' (on/off)").into()),
    }
}

/// Where the passphrase of encrypted images comes from (never the command line itself).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KeyArgs {
    /// Read the passphrase from this file (its bytes, without a trailing newline).
    #[arg(long = "key-file", global = true)]
    pub key_file: Option<std::path::PathBuf>,
    /// Read the passphrase from this environment variable.
    #[arg(long = "key-env", global = true)]
    pub key_env: Option<String>,
    /// Ask for the passphrase on the terminal.
    #[arg(long = "key-prompt", global = true)]
    pub key_prompt: bool,
}

/// How images are shared with other processes (qemu-img's `-U` and the file driver's
/// `locking`), for every verb.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ShareArgs {
    /// Open read-only images without keeping writers out, and beside them (qemu-img `-U`):
    /// for inspecting an image another process is using. Refused for writes.
    #[arg(short = 'U', long = "force-share", global = true)]
    pub force_share: bool,
    /// Image locking: auto (where the kernel has OFD locks), on, off (QEMU's
    /// `file.locking`).
    #[arg(long = "locking", global = true, default_value = "auto")]
    pub locking: String,
}

/// Images in object storage, for every verb: any file name may be a URL (`s3://bucket/key`,
/// `gs://`, `az://`, `http(s)://`; credentials and endpoints from the `AWS_*`, `GOOGLE_*`,
/// `AZURE_*` environment), read-only.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RemoteArgs {
    /// Follow backing file names that are URLs when an image names one. Off by default: a
    /// backing name is data in the image, and following it sends requests, with this
    /// process's credentials, wherever it points (an image created here with `-b URL`
    /// names one the user chose).
    #[arg(long = "allow-remote-backing", global = true)]
    pub allow_remote_backing: bool,
    // The fields below carry a `remote_` prefix: clap identifies global arguments by field
    // name, and the verbs have their own `cache`, `timeout`, ...
    /// Remote reads: block size (fetched and cached unit), e.g. 1M.
    #[arg(long = "remote-block-size", global = true, value_name = "SIZE")]
    pub remote_block_size: Option<String>,
    /// Remote reads: in-memory cache size, e.g. 256M [default: 32M] (0: no cache).
    #[arg(long = "remote-cache", global = true, value_name = "SIZE")]
    pub remote_cache: Option<String>,
    /// Remote reads: read-ahead for sequential readers, e.g. 16M (0: none).
    #[arg(long = "remote-read-ahead", global = true, value_name = "SIZE")]
    pub remote_read_ahead: Option<String>,
    /// Remote reads: seconds to wait for an answer before an attempt counts as failed.
    #[arg(long = "remote-timeout", global = true, value_name = "SECS")]
    pub remote_timeout: Option<f64>,
    /// Remote reads: attempts after the first for transient failures.
    #[arg(long = "remote-retries", global = true, value_name = "N")]
    pub remote_retries: Option<u32>,
    /// Remote reads: keep fetched blocks in a local cache file per URL in this folder,
    /// reused by later runs while the object is unchanged (sparse, at most the object's size).
    #[arg(long = "remote-cache-dir", global = true, value_name = "DIR")]
    pub remote_cache_dir: Option<std::path::PathBuf>,
}

static SECRET: OnceLock<Option<Secret>> = OnceLock::new();
static SHARE: OnceLock<(bool, qcow2_async::Locking)> = OnceLock::new();
static REMOTE: OnceLock<(Arc<dyn RemoteOpener>, RemoteBacking)> = OnceLock::new();

/// Sets up the opener of remote files, once, before any image is opened.
pub fn load_remote(a: &RemoteArgs) -> Result<()> {
    let mut o = RemoteOptions::default();
    if let Some(s) = &a.remote_block_size {
        o.block_size = parse_size(s)?;
        o.max_request = o.max_request.max(o.block_size);
    }
    if let Some(s) = &a.remote_cache {
        o.cache_bytes = parse_size(s)?;
    }
    if let Some(s) = &a.remote_read_ahead {
        o.read_ahead = parse_size(s)?;
    }
    if let Some(t) = a.remote_timeout {
        o.timeout = Duration::try_from_secs_f64(t).map_err(|e| format!("--remote-timeout: {e}"))?;
    }
    if let Some(n) = a.remote_retries {
        o.retries = n;
    }
    let policy = if a.allow_remote_backing {
        RemoteBacking::Allow
    } else {
        RemoteBacking::Refuse
    };
    let mut opener = ObjectStoreOpener::new(o);
    if let Some(dir) = &a.remote_cache_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("--remote-cache-dir {}: {e}", dir.display()))?;
        opener.cache_dir = Some(dir.clone());
    }
    let _ = REMOTE.set((Arc::new(opener), policy));
    Ok(())
}

fn with_remote(mut o: OpenOptions) -> OpenOptions {
    if let Some((opener, policy)) = REMOTE.get() {
        o.remote = Some(opener.clone());
        o.remote_backing = *policy;
    }
    o
}

/// The URL `name` is, if it is one rather than a path.
pub fn url_of(name: &Path) -> Option<&str> {
    name.to_str().filter(|s| qcow2_async::remote::is_url(s))
}

/// Opens a qcow2 image by path or URL (read-only: `opts` must say so for a URL).
pub async fn open_image(name: &Path, opts: &OpenOptions) -> Result<Image> {
    Ok(match url_of(name) {
        Some(url) => Image::open_url(url, opts).await?,
        None => Image::open(name, opts).await?,
    })
}

/// Opens a read-only disk by path or URL.
pub async fn open_disk(name: &Path, format: BackingFormat, opts: &OpenOptions) -> Result<Disk> {
    Ok(match url_of(name) {
        Some(url) => Disk::open_url(url, format, opts).await?,
        None => Disk::open(name, format, opts).await?,
    })
}

/// Records the sharing flags, once, before any image is opened.
pub fn load_share(a: &ShareArgs) -> Result<()> {
    let locking = a.locking.parse::<qcow2_async::Locking>()?;
    let _ = SHARE.set((a.force_share, locking));
    Ok(())
}

fn share() -> (bool, qcow2_async::Locking) {
    SHARE.get().copied().unwrap_or_default()
}

/// Loads the passphrase the user pointed at, once, before any image is opened.
pub fn load_secret(k: &KeyArgs) -> Result<()> {
    let s = if let Some(p) = &k.key_file {
        let mut b = std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()))?;
        while b.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
            b.pop();
        }
        Some(Secret::new(b))
    } else if let Some(v) = &k.key_env {
        let val =
            std::env::var_os(v).ok_or_else(|| format!("environment variable {v} is not set"))?;
        use std::os::unix::ffi::OsStringExt;
        Some(Secret::new(val.into_vec()))
    } else if k.key_prompt {
        Some(prompt()?)
    } else {
        None
    };
    let _ = SECRET.set(s);
    Ok(())
}

/// Reads a line from the terminal with echo off (`stty -echo`; no unsafe code needed).
fn prompt() -> Result<Secret> {
    use std::io::{BufRead, Write};
    let tty = std::fs::File::open("/dev/tty").map_err(|e| format!("no terminal to ask on: {e}"))?;
    let stty = |arg: &str| {
        std::process::Command::new("stty")
            .arg(arg)
            .stdin(tty.try_clone().expect("tty handle"))
            .status()
    };
    eprint!("Passphrase: ");
    std::io::stderr().flush()?;
    let _ = stty("-echo");
    let mut line = String::new();
    let r = std::io::BufReader::new(&tty).read_line(&mut line);
    let _ = stty("echo");
    eprintln!();
    r?;
    Ok(Secret::new(
        line.trim_end_matches(['\n', '\r']).as_bytes().to_vec(),
    ))
}

fn secret() -> Option<Secret> {
    SECRET.get().cloned().flatten()
}

/// Read-only open options carrying the user's passphrase and sharing flags.
pub fn ro() -> OpenOptions {
    let (force_share, locking) = share();
    {
        let mut o = OpenOptions::read_only();
        o.secret = secret();
        o.force_share = force_share;
        o.locking = locking;
        with_remote(o)
    }
}

/// Read-write open options carrying the user's passphrase and sharing flags (`-U` makes
/// the open fail, as in qemu-img).
pub fn rw() -> OpenOptions {
    let (force_share, locking) = share();
    {
        let mut o = OpenOptions::default();
        o.secret = secret();
        o.force_share = force_share;
        o.locking = locking;
        with_remote(o)
    }
}

/// Applies a qemu-img `-o` list to creation options.
pub fn apply_create_options(o: &mut CreateOptions, list: &str) -> Result<()> {
    for kv in list.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, "on"));
        match k {
            "size" => o.size = parse_size(v)?,
            "cluster_size" => o.cluster_size = parse_size(v)?,
            "compat" => {
                o.version3 = match v {
                    "1.1" | "v3" => true,
                    "0.10" | "v2" => false,
                    _ => return Err(format!("invalid compat level '{v}'").into()),
                }
            }
            "refcount_bits" => o.refcount_bits = v.parse()?,
            "lazy_refcounts" => o.lazy_refcounts = on(v)?,
            "preallocation" => o.preallocation = v.parse::<Preallocation>()?,
            "compression_type" => {
                o.zstd = match v {
                    "zstd" => true,
                    "zlib" => false,
                    _ => return Err(format!("invalid compression type '{v}'").into()),
                }
            }
            "extended_l2" => o.extended_l2 = on(v)?,
            "backing_file" => o.backing_file = Some(v.to_string()),
            "backing_fmt" => o.backing_format = Some(v.parse()?),
            "data_file" => o.data_file = Some(v.to_string()),
            "data_file_raw" => o.data_file_raw = on(v)?,
            "encrypt.format" | "encryption" => {
                if !(v == "luks" || (k == "encryption" && on(v)?)) {
                    return Err(format!(
                        "unsupported encryption format '{v}' (only luks is created)"
                    )
                    .into());
                }
                let s = secret().ok_or(
                    "encryption needs a passphrase: --key-file, --key-env or --key-prompt",
                )?;
                o.encryption = Some(EncryptionOptions::luks(s));
            }
            // qemu-img names a --object secret here; this tool takes the passphrase from
            // --key-file / --key-env / --key-prompt instead.
            "encrypt.key-secret" => {}
            k if k.starts_with("encrypt.") => {
                let e = o
                    .encryption
                    .as_mut()
                    .ok_or("encrypt.* options need encrypt.format=luks first")?;
                let hash = |v: &str| -> Result<HashAlg> {
                    Ok(match v {
                        "sha1" => HashAlg::Sha1,
                        "sha224" => HashAlg::Sha224,
                        "sha256" => HashAlg::Sha256,
                        "sha384" => HashAlg::Sha384,
                        "sha512" => HashAlg::Sha512,
                        _ => return Err(format!("unsupported hash '{v}'").into()),
                    })
                };
                let a = &mut e.algorithms;
                match k {
                    "encrypt.cipher-alg" => {
                        a.cipher_alg = match v {
                            "aes-128" => CipherAlg::Aes128,
                            "aes-192" => CipherAlg::Aes192,
                            "aes-256" => CipherAlg::Aes256,
                            _ => return Err(format!("unsupported cipher '{v}'").into()),
                        }
                    }
                    "encrypt.cipher-mode" => {
                        a.cipher_mode = match v {
                            "xts" => CipherMode::Xts,
                            "cbc" => CipherMode::Cbc,
                            _ => return Err(format!("unsupported cipher mode '{v}'").into()),
                        }
                    }
                    "encrypt.ivgen-alg" => {
                        a.ivgen = match v {
                            "plain" => IvGenAlg::Plain,
                            "plain64" => IvGenAlg::Plain64,
                            "essiv" => IvGenAlg::Essiv(HashAlg::Sha256),
                            _ => return Err(format!("unsupported IV generator '{v}'").into()),
                        }
                    }
                    "encrypt.ivgen-hash-alg" => {
                        if let IvGenAlg::Essiv(_) = a.ivgen {
                            a.ivgen = IvGenAlg::Essiv(hash(v)?);
                        }
                    }
                    "encrypt.hash-alg" => a.hash = hash(v)?,
                    "encrypt.iter-time" => {
                        e.iterations =
                            KdfIterations::Time(std::time::Duration::from_millis(v.parse()?))
                    }
                    _ => return Err(format!("invalid option '{k}'").into()),
                }
            }
            _ => return Err(format!("invalid option '{k}' (or not supported yet)").into()),
        }
    }
    Ok(())
}

/// `-f`/`-O`/`-F` values: qcow2 or raw.
pub fn parse_format(s: &str) -> Result<BackingFormat> {
    Ok(s.parse::<BackingFormat>()?)
}

/// The format of `path` (a file or a URL): given, or probed from its magic (qemu-img
/// probes too, with a warning for raw).
pub async fn format_of(path: &Path, given: Option<&str>) -> Result<BackingFormat> {
    if let Some(f) = given {
        return parse_format(f);
    }
    let mut magic = [0u8; 4];
    let n = match url_of(path) {
        Some(url) => {
            let opener = with_remote(OpenOptions::read_only())
                .remote
                .ok_or("no remote opener")?;
            let file = opener
                .open(url)
                .await
                .map_err(|e| format!("Could not open '{url}': {e}"))?;
            let len = file.len().await?.min(4) as usize;
            let b = file.read_at(IoBuf::zeroed(4, 1), 0).await?;
            magic.copy_from_slice(&b[..4]);
            len
        }
        None => {
            use std::io::Read;
            std::fs::File::open(path)
                .and_then(|mut f| f.read(&mut magic))
                .map_err(|e| format!("Could not open '{}': {e}", path.display()))?
        }
    };
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        BackingFormat::Qcow2
    } else {
        BackingFormat::Raw
    })
}
