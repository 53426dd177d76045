//! Spellings shared by the verbs: sizes, formats and `-o key=value,...` lists with
//! qemu-img's option names.

use std::path::Path;

use qcow2_async::{BackingFormat, CreateOptions, Preallocation};

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
            _ => return Err(format!("invalid option '{k}' (or not supported yet)").into()),
        }
    }
    Ok(())
}

/// `-f`/`-O`/`-F` values: qcow2 or raw.
pub fn parse_format(s: &str) -> Result<BackingFormat> {
    Ok(s.parse::<BackingFormat>()?)
}

/// The format of `path`: given, or probed from its magic (qemu-img probes too, with a
/// warning for raw).
pub fn format_of(path: &Path, given: Option<&str>) -> Result<BackingFormat> {
    if let Some(f) = given {
        return parse_format(f);
    }
    use std::io::Read;
    let mut magic = [0u8; 4];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(|e| format!("Could not open '{}': {e}", path.display()))?;
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        BackingFormat::Qcow2
    } else {
        BackingFormat::Raw
    })
}
