//! The image header, its extensions and the backing file name: everything in cluster 0.
//!
//! [`ImageHeader::decode`] takes the first cluster of the file (or the whole file when it is
//! shorter), validates it against QEMU's rules (reference §1, §7.1) and [`Limits`], and keeps
//! whatever it does not understand (unknown header fields, unknown extensions, compatible
//! bits) so that [`ImageHeader::encode`] can write it back as QEMU would.

use crate::codec::{Reader, Writer};
use crate::error::{Error, Result};
use crate::features::{AutoclearFeatures, CompatibleFeatures, IncompatibleFeatures};
use crate::geometry::Geometry;
use crate::limits::Limits;
use crate::refcount::RefcountOrder;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Size of the v2 header.
pub const V2_HEADER_LEN: usize = 72;
/// Smallest v3 header.
pub const V3_MIN_HEADER_LEN: usize = 104;
/// The v3 header QEMU writes: 104 bytes, the compression type and 7 bytes of padding.
pub const V3_QEMU_HEADER_LEN: usize = 112;

/// Extension magic numbers (reference §1.3).
pub mod ext_magic {
    /// End of the extension area.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    /// Persistent bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer.
    pub const CRYPTO: u32 = 0x0537_be77;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// The qcow2 version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// Version 2 (`compat=0.10`).
    V2,
    /// Version 3 (`compat=1.1`).
    V3,
}

impl Version {
    /// The number in the header.
    pub fn number(self) -> u32 {
        match self {
            Version::V2 => 2,
            Version::V3 => 3,
        }
    }
}

/// How guest data is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CryptMethod {
    /// Not encrypted.
    None,
    /// Legacy AES-128-CBC (read-only in QEMU's system emulators).
    Aes,
    /// LUKS1, header in the image (full disk encryption extension).
    Luks,
}

/// Compression algorithm of compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CompressionType {
    /// Raw deflate with a 4 KiB window ("zlib").
    #[default]
    Deflate,
    /// Zstandard frames.
    Zstd,
}

/// The fixed header fields (v2 fields plus the v3 additions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Format version.
    pub version: Version,
    /// Offset of the backing file name in cluster 0, 0 for none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Encryption method.
    pub crypt_method: CryptMethod,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters occupied by the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible: IncompatibleFeatures,
    /// Compatible feature bits (v3).
    pub compatible: CompatibleFeatures,
    /// Autoclear feature bits (v3).
    pub autoclear: AutoclearFeatures,
    /// Refcount width (4 = 16 bits for v2).
    pub refcount_order: RefcountOrder,
    /// Header length as read (72 for v2).
    pub header_length: u32,
    /// Compression type (v3 with header_length > 104).
    pub compression_type: CompressionType,
}

impl Header {
    /// Geometry implied by the header.
    pub fn geometry(&self) -> Result<Geometry> {
        Geometry::new(
            self.cluster_bits,
            self.incompatible
                .contains(IncompatibleFeatures::EXTENDED_L2),
        )
    }

    /// Cluster size in bytes (the header's `cluster_bits` is validated on decode).
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits.min(63)
    }

    /// Checks the header against QEMU's open-time rules and `limits` (reference §7.1).
    pub fn validate(&self, limits: &Limits) -> Result<()> {
        let geo = self.geometry()?;
        let cs = geo.cluster_size();
        if self.version == Version::V3 {
            if (self.header_length as usize) < V3_MIN_HEADER_LEN {
                return Err(Error::invalid(
                    "header_length",
                    self.header_length.into(),
                    "qcow2 header too short",
                ));
            }
            if u64::from(self.header_length) > cs {
                return Err(Error::invalid(
                    "header_length",
                    self.header_length.into(),
                    "qcow2 header exceeds cluster size",
                ));
            }
        }
        let unknown = self.incompatible.unknown();
        if unknown != 0 {
            return Err(Error::Unsupported {
                what: "incompatible feature bits",
                detail: format!("unknown incompatible feature: {unknown:x}"),
            });
        }
        if self.size > limits.max_virtual_size {
            return Err(Error::limit(
                "virtual size",
                self.size,
                limits.max_virtual_size,
            ));
        }
        if self.backing_file_offset != 0 {
            if self.backing_file_offset > cs {
                return Err(Error::invalid(
                    "backing_file_offset",
                    self.backing_file_offset,
                    "invalid backing file offset",
                ));
            }
            let room = (cs - self.backing_file_offset).min(u64::from(limits.max_backing_file_name));
            if u64::from(self.backing_file_size) > room {
                return Err(Error::limit(
                    "backing file name",
                    self.backing_file_size.into(),
                    room,
                ));
            }
        }
        // L1: size limit, alignment, and enough entries for the virtual size.
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > limits.max_l1_bytes {
            return Err(Error::limit(
                "active L1 table",
                l1_bytes,
                limits.max_l1_bytes,
            ));
        }
        let needed = geo.l1_entries_for(self.size);
        if needed > i32::MAX as u64 {
            return Err(Error::limit("virtual size", self.size, i32::MAX as u64));
        }
        if u64::from(self.l1_size) < needed {
            return Err(Error::invalid(
                "l1_size",
                self.l1_size.into(),
                "L1 table is too small",
            ));
        }
        check_table(
            "active L1 table",
            self.l1_table_offset,
            l1_bytes,
            cs,
            limits,
        )?;
        if self.l1_size > 0 && self.l1_table_offset == 0 {
            return Err(Error::invalid("l1_table_offset", 0, "L1 table at offset 0"));
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes > limits.max_refcount_table_bytes {
            return Err(Error::limit(
                "refcount table",
                rt_bytes,
                limits.max_refcount_table_bytes,
            ));
        }
        check_table(
            "refcount table",
            self.refcount_table_offset,
            rt_bytes,
            cs,
            limits,
        )?;
        if self.nb_snapshots > limits.max_snapshots {
            return Err(Error::limit(
                "snapshot table",
                self.nb_snapshots.into(),
                limits.max_snapshots.into(),
            ));
        }
        check_table(
            "snapshot table",
            self.snapshots_offset,
            u64::from(self.nb_snapshots) * 40,
            cs,
            limits,
        )?;
        if self.version == Version::V2 && self.refcount_order != RefcountOrder::DEFAULT {
            return Err(Error::invalid(
                "refcount_order",
                self.refcount_order.order().into(),
                "v2 images have 16-bit refcounts",
            ));
        }
        if self
            .incompatible
            .contains(IncompatibleFeatures::EXTENDED_L2)
            && self.version == Version::V2
        {
            return Err(Error::invalid(
                "incompatible_features",
                self.incompatible.0,
                "extended L2 entries need a v3 image",
            ));
        }
        Ok(())
    }
}

fn check_table(
    what: &'static str,
    offset: u64,
    bytes: u64,
    cs: u64,
    limits: &Limits,
) -> Result<()> {
    if offset % cs != 0 {
        return Err(Error::Unaligned {
            what,
            offset,
            alignment: cs,
        });
    }
    let end = offset
        .checked_add(bytes)
        .ok_or_else(|| Error::overflow(what))?;
    if end > i64::MAX as u64 || offset >= limits.max_host_offset {
        return Err(Error::invalid(what, offset, "offset invalid"));
    }
    Ok(())
}

/// Kind of a feature in the feature name table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FeatureType {
    /// Incompatible feature.
    Incompatible,
    /// Compatible feature.
    Compatible,
    /// Autoclear feature.
    Autoclear,
    /// A type this implementation does not know (kept for error messages).
    Other(u8),
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FeatureName {
    /// Which bit field.
    pub kind: FeatureType,
    /// Bit number.
    pub bit: u8,
    /// Human-readable name (at most 46 bytes).
    pub name: String,
}

/// The table QEMU writes into every v3 image with clusters larger than 4 KiB.
pub fn qemu_feature_table() -> Vec<FeatureName> {
    use FeatureType::*;
    [
        (Incompatible, 0, "dirty bit"),
        (Incompatible, 1, "corrupt bit"),
        (Incompatible, 2, "external data file"),
        (Incompatible, 3, "compression type"),
        (Incompatible, 4, "extended L2 entries"),
        (Compatible, 0, "lazy refcounts"),
        (Autoclear, 0, "bitmaps"),
        (Autoclear, 1, "raw external data"),
    ]
    .into_iter()
    .map(|(kind, bit, name)| FeatureName {
        kind,
        bit,
        name: name.to_string(),
    })
    .collect()
}

/// Payload of the bitmaps extension (reference §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BitmapsExtension {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Directory size in bytes.
    pub directory_size: u64,
    /// Directory host offset.
    pub directory_offset: u64,
}

/// Payload of the full disk encryption extension (reference §6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EncryptionExtension {
    /// Host offset of the LUKS header.
    pub offset: u64,
    /// Length of the LUKS header and key material.
    pub length: u64,
}

/// One header extension as found in the file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HeaderExtension {
    /// Backing file format name.
    BackingFormat(String),
    /// Feature name table.
    FeatureNameTable(Vec<FeatureName>),
    /// Persistent bitmaps.
    Bitmaps(BitmapsExtension),
    /// LUKS header pointer.
    Encryption(EncryptionExtension),
    /// External data file name.
    ExternalDataFile(String),
    /// Anything else, kept byte for byte.
    Unknown {
        /// Extension magic.
        magic: u32,
        /// Payload without padding.
        data: Vec<u8>,
    },
}

/// Everything in cluster 0: fixed header, extensions and backing file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageHeader {
    /// Fixed fields.
    pub header: Header,
    /// Header bytes past the 112 QEMU knows (v3), rewritten verbatim.
    pub unknown_header_fields: Vec<u8>,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing file format (extension `0xE2792ACA`).
    pub backing_format: Option<String>,
    /// External data file name (extension "DATA").
    pub data_file: Option<String>,
    /// LUKS header location.
    pub encryption: Option<EncryptionExtension>,
    /// Bitmaps extension.
    pub bitmaps: Option<BitmapsExtension>,
    /// The feature name table as read (only used to name unknown features).
    pub feature_names: Vec<FeatureName>,
    /// Unknown extensions in QEMU's list order: the reverse of the order they were read in,
    /// which is the order [`ImageHeader::encode`] writes them, as QEMU does.
    pub unknown_extensions: Vec<(u32, Vec<u8>)>,
}

impl ImageHeader {
    /// Reads magic and cluster size from the first 24 bytes, so that a caller knows how much
    /// to read for [`ImageHeader::decode`].
    pub fn cluster_size_hint(prefix: &[u8]) -> Result<u64> {
        let mut r = Reader::new(prefix, "qcow2 header");
        let magic = r.u32()?;
        if magic != MAGIC {
            return Err(Error::BadMagic {
                what: "qcow2 header",
                found: magic.into(),
            });
        }
        r.skip(16)?;
        let bits = r.u32()?;
        Ok(Geometry::new(bits, false)?.cluster_size())
    }

    /// Decodes and validates cluster 0. `bytes` is the first cluster, or the whole file if it
    /// is shorter.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Self> {
        let mut r = Reader::new(bytes, "qcow2 header");
        let magic = r.u32()?;
        if magic != MAGIC {
            return Err(Error::BadMagic {
                what: "qcow2 header",
                found: magic.into(),
            });
        }
        let version = match r.u32()? {
            2 => Version::V2,
            3 => Version::V3,
            v => {
                return Err(Error::Unsupported {
                    what: "qcow2 version",
                    detail: format!("unsupported qcow2 version {v}"),
                })
            }
        };
        let backing_file_offset = r.u64()?;
        let backing_file_size = r.u32()?;
        let cluster_bits = r.u32()?;
        let geo = Geometry::new(cluster_bits, false)?;
        let cs = geo.cluster_size() as usize;
        let size = r.u64()?;
        let crypt_method = match r.u32()? {
            0 => CryptMethod::None,
            1 => CryptMethod::Aes,
            2 => CryptMethod::Luks,
            m => {
                return Err(Error::Unsupported {
                    what: "encryption method",
                    detail: format!("unsupported encryption method {m}"),
                })
            }
        };
        let l1_size = r.u32()?;
        let l1_table_offset = r.u64()?;
        let refcount_table_offset = r.u64()?;
        let refcount_table_clusters = r.u32()?;
        let nb_snapshots = r.u32()?;
        let snapshots_offset = r.u64()?;

        let mut header = Header {
            version,
            backing_file_offset,
            backing_file_size,
            cluster_bits,
            size,
            crypt_method,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
            incompatible: IncompatibleFeatures::empty(),
            compatible: CompatibleFeatures::empty(),
            autoclear: AutoclearFeatures::empty(),
            refcount_order: RefcountOrder::DEFAULT,
            header_length: V2_HEADER_LEN as u32,
            compression_type: CompressionType::Deflate,
        };
        let mut unknown_header_fields = Vec::new();
        if version == Version::V3 {
            header.incompatible = IncompatibleFeatures(r.u64()?);
            header.compatible = CompatibleFeatures(r.u64()?);
            header.autoclear = AutoclearFeatures(r.u64()?);
            header.refcount_order = RefcountOrder::new(r.u32()?)?;
            header.header_length = r.u32()?;
            let hl = header.header_length as usize;
            if hl < V3_MIN_HEADER_LEN {
                return Err(Error::invalid(
                    "header_length",
                    hl as u64,
                    "qcow2 header too short",
                ));
            }
            if hl > cs {
                return Err(Error::invalid(
                    "header_length",
                    hl as u64,
                    "qcow2 header exceeds cluster size",
                ));
            }
            if hl > V3_MIN_HEADER_LEN {
                let ct = r.u8()?;
                header.compression_type = match ct {
                    0 => CompressionType::Deflate,
                    1 => CompressionType::Zstd,
                    t => {
                        return Err(Error::invalid(
                            "compression_type",
                            t.into(),
                            "unknown compression type",
                        ))
                    }
                };
            }
            if hl > V3_QEMU_HEADER_LEN {
                r.skip(V3_QEMU_HEADER_LEN - r.pos())?;
                unknown_header_fields = r.bytes(hl - V3_QEMU_HEADER_LEN)?.to_vec();
            }
            let bit = header
                .incompatible
                .contains(IncompatibleFeatures::COMPRESSION_TYPE);
            match (header.compression_type, bit) {
                (CompressionType::Deflate, true) => {
                    return Err(Error::invalid(
                        "incompatible_features",
                        header.incompatible.0,
                        "compression type bit must not be set for deflate",
                    ))
                }
                (CompressionType::Zstd, false) => {
                    return Err(Error::invalid(
                        "incompatible_features",
                        header.incompatible.0,
                        "compression type bit must be set for zstd",
                    ))
                }
                _ => {}
            }
        }

        let mut image = ImageHeader {
            header,
            unknown_header_fields,
            backing_file: None,
            backing_format: None,
            data_file: None,
            encryption: None,
            bitmaps: None,
            feature_names: Vec::new(),
            unknown_extensions: Vec::new(),
        };
        image.decode_extensions(bytes, cs, limits)?;
        image.decode_backing_name(bytes, limits)?;

        let h = &image.header;
        if h.incompatible.unknown() != 0 {
            return Err(image.unknown_feature_error());
        }
        if h.crypt_method == CryptMethod::Luks && image.encryption.is_none() {
            return Err(Error::invalid(
                "crypt_method",
                2,
                "missing CRYPTO header for crypt method 2",
            ));
        }
        image.header.validate(limits)?;
        Ok(image)
    }

    fn decode_extensions(&mut self, bytes: &[u8], cs: usize, limits: &Limits) -> Result<()> {
        let start = self.header.header_length as usize;
        let end = if self.header.backing_file_offset != 0 {
            usize::try_from(self.header.backing_file_offset).unwrap_or(usize::MAX)
        } else {
            cs
        };
        if end > cs {
            return Err(Error::invalid(
                "backing_file_offset",
                self.header.backing_file_offset,
                "invalid backing file offset",
            ));
        }
        let area = bytes
            .get(start..end.min(bytes.len()).max(start))
            .unwrap_or(&[]);
        let mut r = Reader::new(area, "header extension");
        let avail = end.saturating_sub(start);
        let mut read_order: Vec<(u32, Vec<u8>)> = Vec::new();
        while r.pos() < avail {
            let magic = r.u32()?;
            let len = r.u32()? as usize;
            if len > avail - r.pos() {
                return Err(Error::invalid(
                    "header extension",
                    len as u64,
                    "header extension too large",
                ));
            }
            let data = r.bytes(len)?;
            r.align_to(8).or_else(|e| {
                // Padding past the end of the area is tolerated only at its very end.
                if r.remaining() == 0 {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
            match magic {
                ext_magic::END => return self.finish_extensions(read_order),
                ext_magic::BACKING_FORMAT => {
                    if len > limits.max_backing_format_name as usize {
                        return Err(Error::limit(
                            "backing format extension",
                            len as u64,
                            limits.max_backing_format_name.into(),
                        ));
                    }
                    self.backing_format = Some(string("backing format", data)?);
                }
                ext_magic::FEATURE_TABLE => {
                    self.feature_names = data
                        .chunks_exact(48)
                        .map(|c| FeatureName {
                            kind: match c[0] {
                                0 => FeatureType::Incompatible,
                                1 => FeatureType::Compatible,
                                2 => FeatureType::Autoclear,
                                o => FeatureType::Other(o),
                            },
                            bit: c[1],
                            name: {
                                let n = &c[2..];
                                let n = &n[..n.iter().position(|&b| b == 0).unwrap_or(n.len())];
                                String::from_utf8_lossy(n).into_owned()
                            },
                        })
                        .collect();
                }
                ext_magic::BITMAPS => {
                    if len != 24 {
                        return Err(Error::invalid(
                            "bitmaps extension",
                            len as u64,
                            "must be 24 bytes",
                        ));
                    }
                    let mut b = Reader::new(data, "bitmaps extension");
                    let nb_bitmaps = b.u32()?;
                    let reserved = b.u32()?;
                    let directory_size = b.u64()?;
                    let directory_offset = b.u64()?;
                    if reserved != 0 {
                        return Err(Error::ReservedBits {
                            what: "bitmaps extension",
                            value: reserved.into(),
                        });
                    }
                    if nb_bitmaps == 0 || nb_bitmaps > limits.max_bitmaps {
                        return Err(Error::limit(
                            "bitmaps",
                            nb_bitmaps.into(),
                            limits.max_bitmaps.into(),
                        ));
                    }
                    if directory_size > limits.max_bitmap_directory_bytes {
                        return Err(Error::limit(
                            "bitmap directory",
                            directory_size,
                            limits.max_bitmap_directory_bytes,
                        ));
                    }
                    if directory_offset % cs as u64 != 0 {
                        return Err(Error::Unaligned {
                            what: "bitmap directory",
                            offset: directory_offset,
                            alignment: cs as u64,
                        });
                    }
                    self.bitmaps = Some(BitmapsExtension {
                        nb_bitmaps,
                        directory_size,
                        directory_offset,
                    });
                }
                ext_magic::CRYPTO => {
                    if self.header.crypt_method != CryptMethod::Luks {
                        return Err(Error::invalid(
                            "crypto extension",
                            magic.into(),
                            "only valid with crypt method 2",
                        ));
                    }
                    if len != 16 {
                        return Err(Error::invalid(
                            "crypto extension",
                            len as u64,
                            "must be 16 bytes",
                        ));
                    }
                    let mut b = Reader::new(data, "crypto extension");
                    let offset = b.u64()?;
                    let length = b.u64()?;
                    if offset % cs as u64 != 0 {
                        return Err(Error::Unaligned {
                            what: "encryption header",
                            offset,
                            alignment: cs as u64,
                        });
                    }
                    offset
                        .checked_add(length)
                        .filter(|e| *e <= limits.max_host_offset)
                        .ok_or_else(|| {
                            Error::invalid("crypto extension", offset, "out of range")
                        })?;
                    self.encryption = Some(EncryptionExtension { offset, length });
                }
                ext_magic::DATA_FILE => {
                    self.data_file = Some(string("data file name", data)?);
                }
                _ => read_order.push((magic, data.to_vec())),
            }
        }
        self.finish_extensions(read_order)
    }

    fn finish_extensions(&mut self, mut read_order: Vec<(u32, Vec<u8>)>) -> Result<()> {
        read_order.reverse();
        self.unknown_extensions = read_order;
        Ok(())
    }

    fn decode_backing_name(&mut self, bytes: &[u8], limits: &Limits) -> Result<()> {
        let h = &self.header;
        // An empty name means no backing file, as in QEMU (which checks `backing_file[0]`);
        // keeping `Some("")` would not survive `encode`, which writes no name and offset 0.
        if h.backing_file_offset == 0 || h.backing_file_size == 0 {
            return Ok(());
        }
        if h.backing_file_size > limits.max_backing_file_name {
            return Err(Error::limit(
                "backing file name",
                h.backing_file_size.into(),
                limits.max_backing_file_name.into(),
            ));
        }
        let start = h.backing_file_offset as usize;
        let end = start
            .checked_add(h.backing_file_size as usize)
            .filter(|&e| e as u64 <= h.cluster_size())
            .ok_or_else(|| {
                Error::invalid(
                    "backing file name",
                    h.backing_file_size.into(),
                    "backing file name too long",
                )
            })?;
        let name = bytes
            .get(start..end)
            .ok_or_else(|| Error::truncated("backing file name", end, bytes.len()))?;
        self.backing_file = Some(string("backing file name", name)?);
        Ok(())
    }

    fn unknown_feature_error(&self) -> Error {
        let unknown = self.header.incompatible.unknown();
        let mut names: Vec<String> = self
            .feature_names
            .iter()
            .filter(|f| {
                f.kind == FeatureType::Incompatible && f.bit < 64 && unknown & (1 << f.bit) != 0
            })
            .map(|f| f.name.clone())
            .collect();
        let named: u64 = self
            .feature_names
            .iter()
            .filter(|f| f.kind == FeatureType::Incompatible && f.bit < 64)
            .fold(0, |m, f| m | (1 << f.bit));
        if unknown & !named != 0 {
            names.push(format!(
                "Unknown incompatible feature: {:x}",
                unknown & !named
            ));
        }
        Error::Unsupported {
            what: "qcow2 feature(s)",
            detail: names.join(", "),
        }
    }

    /// Encodes cluster 0 exactly as QEMU's `qcow2_update_header` does: fixed header,
    /// unknown header fields, extensions in QEMU's order, END, backing file name, zero fill.
    /// `backing_file_offset`/`backing_file_size` and `header_length` are recomputed.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let cs = self.header.geometry()?.cluster_size() as usize;
        let h = &self.header;
        let mut w = Writer::with_capacity(cs);
        let header_len = match h.version {
            Version::V2 => V2_HEADER_LEN,
            Version::V3 => V3_QEMU_HEADER_LEN + self.unknown_header_fields.len(),
        };
        let backing_name = self.backing_file.as_deref().unwrap_or("");
        w.u32(MAGIC);
        w.u32(h.version.number());
        w.u64(0); // backing_file_offset, patched below
        w.u32(backing_name.len() as u32);
        w.u32(h.cluster_bits);
        w.u64(h.size);
        w.u32(match h.crypt_method {
            CryptMethod::None => 0,
            CryptMethod::Aes => 1,
            CryptMethod::Luks => 2,
        });
        w.u32(h.l1_size);
        w.u64(h.l1_table_offset);
        w.u64(h.refcount_table_offset);
        w.u32(h.refcount_table_clusters);
        w.u32(h.nb_snapshots);
        w.u64(h.snapshots_offset);
        if h.version == Version::V3 {
            let mut incompat = h.incompatible;
            incompat.set(
                IncompatibleFeatures::COMPRESSION_TYPE,
                h.compression_type != CompressionType::Deflate,
            );
            w.u64(incompat.0);
            w.u64(h.compatible.0);
            w.u64(h.autoclear.0);
            w.u32(h.refcount_order.order());
            w.u32(header_len as u32);
            w.u8(match h.compression_type {
                CompressionType::Deflate => 0,
                CompressionType::Zstd => 1,
            });
            w.bytes(&[0; 7]);
            w.bytes(&self.unknown_header_fields);
        } else {
            let v3_only = h.incompatible.0 | h.compatible.0 | h.autoclear.0;
            if v3_only != 0 || h.compression_type != CompressionType::Deflate {
                return Err(Error::invalid(
                    "feature bits",
                    v3_only,
                    "v2 images have no feature bits",
                ));
            }
        }
        // Padding is relative to the start of the extension area, as in QEMU's
        // `header_ext_add` (and as `decode` reads it): with a header_length that is not a
        // multiple of 8 (the spec asks for one, QEMU does not check) absolute padding would
        // shift every following extension.
        let ext = |w: &mut Writer, magic: u32, data: &[u8]| {
            w.u32(magic);
            w.u32(data.len() as u32);
            w.bytes(data);
            w.bytes(&[0; 7][..data.len().next_multiple_of(8) - data.len()]);
        };
        if let Some(f) = &self.backing_format {
            ext(&mut w, ext_magic::BACKING_FORMAT, f.as_bytes());
        }
        if let Some(f) = &self.data_file {
            ext(&mut w, ext_magic::DATA_FILE, f.as_bytes());
        }
        if let Some(e) = &self.encryption {
            let mut d = Writer::with_capacity(16);
            d.u64(e.offset);
            d.u64(e.length);
            ext(&mut w, ext_magic::CRYPTO, &d.buf);
        }
        if h.version == Version::V3 && cs > 4096 {
            let mut d = Writer::with_capacity(8 * 48);
            for f in qemu_feature_table() {
                d.u8(match f.kind {
                    FeatureType::Incompatible => 0,
                    FeatureType::Compatible => 1,
                    FeatureType::Autoclear => 2,
                    FeatureType::Other(o) => o,
                });
                d.u8(f.bit);
                let mut name = [0u8; 46];
                name[..f.name.len()].copy_from_slice(f.name.as_bytes());
                d.bytes(&name);
            }
            ext(&mut w, ext_magic::FEATURE_TABLE, &d.buf);
        }
        if let Some(b) = &self.bitmaps {
            let mut d = Writer::with_capacity(24);
            d.u32(b.nb_bitmaps);
            d.u32(0);
            d.u64(b.directory_size);
            d.u64(b.directory_offset);
            ext(&mut w, ext_magic::BITMAPS, &d.buf);
        }
        for (magic, data) in &self.unknown_extensions {
            ext(&mut w, *magic, data);
        }
        ext(&mut w, ext_magic::END, &[]);
        let mut out = w.into_inner();
        if !backing_name.is_empty() {
            let off = out.len();
            out.extend_from_slice(backing_name.as_bytes());
            out[8..16].copy_from_slice(&(off as u64).to_be_bytes());
        }
        if out.len() > cs {
            return Err(Error::limit("header cluster", out.len() as u64, cs as u64));
        }
        out.resize(cs, 0);
        Ok(out)
    }
}

fn string(what: &'static str, data: &[u8]) -> Result<String> {
    String::from_utf8(data.to_vec()).map_err(|_| Error::BadString { what })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The header `qemu-img create -f qcow2 x 1G` writes (reference §1.4).
    pub(crate) fn fresh_1g() -> ImageHeader {
        ImageHeader {
            header: Header {
                version: Version::V3,
                backing_file_offset: 0,
                backing_file_size: 0,
                cluster_bits: 16,
                size: 1 << 30,
                crypt_method: CryptMethod::None,
                l1_size: 2,
                l1_table_offset: 0x30000,
                refcount_table_offset: 0x10000,
                refcount_table_clusters: 1,
                nb_snapshots: 0,
                snapshots_offset: 0,
                incompatible: IncompatibleFeatures::empty(),
                compatible: CompatibleFeatures::empty(),
                autoclear: AutoclearFeatures::empty(),
                refcount_order: RefcountOrder::DEFAULT,
                header_length: 112,
                compression_type: CompressionType::Deflate,
            },
            unknown_header_fields: vec![],
            backing_file: None,
            backing_format: None,
            data_file: None,
            encryption: None,
            bitmaps: None,
            feature_names: vec![],
            unknown_extensions: vec![],
        }
    }

    #[test]
    fn encodes_the_qemu_layout() {
        let bytes = fresh_1g().encode().unwrap();
        assert_eq!(bytes.len(), 65536);
        assert_eq!(&bytes[0..4], b"QFI\xfb");
        assert_eq!(u32::from_be_bytes(bytes[100..104].try_into().unwrap()), 112);
        // Feature table at 0x70, 384 bytes; END at 0x1f8.
        assert_eq!(&bytes[0x70..0x78], &[0x68, 0x03, 0xf8, 0x57, 0, 0, 1, 0x80]);
        assert_eq!(&bytes[0x1f8..0x200], &[0u8; 8]);
        let back = ImageHeader::decode(&bytes, &Limits::QEMU).unwrap();
        assert_eq!(back.feature_names, qemu_feature_table());
        assert_eq!(back.header, fresh_1g().header);
    }

    #[test]
    fn backing_name_follows_end_marker() {
        let mut h = fresh_1g();
        h.backing_file = Some("base.qcow2".into());
        h.backing_format = Some("qcow2".into());
        let bytes = h.encode().unwrap();
        // Reference experiment 19: backing fmt ext at 0x70, feature table at 0x80,
        // END at 0x208, name at 0x210.
        assert_eq!(&bytes[0x70..0x74], &[0xe2, 0x79, 0x2a, 0xca]);
        assert_eq!(&bytes[0x80..0x84], &[0x68, 0x03, 0xf8, 0x57]);
        assert_eq!(u64::from_be_bytes(bytes[8..16].try_into().unwrap()), 0x210);
        assert_eq!(&bytes[0x210..0x21a], b"base.qcow2");
        let back = ImageHeader::decode(&bytes, &Limits::QEMU).unwrap();
        assert_eq!(back.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(back.backing_format.as_deref(), Some("qcow2"));
    }

    #[test]
    fn small_clusters_have_no_feature_table() {
        let mut h = fresh_1g();
        h.header.cluster_bits = 12;
        h.header.l1_size = 0x200;
        h.header.l1_table_offset = 0x3000;
        h.header.refcount_table_offset = 0x1000;
        let bytes = h.encode().unwrap();
        assert_eq!(&bytes[0x70..0x78], &[0u8; 8]);
    }

    #[test]
    fn unknown_extensions_are_kept_and_reversed_like_qemu() {
        let mut h = fresh_1g();
        h.unknown_extensions = vec![(0x1234_5678, b"A".to_vec()), (0x9abc_def0, b"BB".to_vec())];
        let once = ImageHeader::decode(&h.encode().unwrap(), &Limits::QEMU).unwrap();
        assert_eq!(
            once.unknown_extensions,
            vec![(0x9abc_def0, b"BB".to_vec()), (0x1234_5678, b"A".to_vec())]
        );
    }

    #[test]
    fn rejects_what_qemu_rejects() {
        let good = fresh_1g().encode().unwrap();
        let patch = |off: usize, val: &[u8]| {
            let mut b = good.clone();
            b[off..off + val.len()].copy_from_slice(val);
            ImageHeader::decode(&b, &Limits::QEMU)
        };
        assert!(matches!(patch(0, b"QFI\0"), Err(Error::BadMagic { .. })));
        assert!(patch(4, &4u32.to_be_bytes()).is_err()); // version
        assert!(patch(20, &8u32.to_be_bytes()).is_err()); // cluster_bits
        assert!(patch(20, &22u32.to_be_bytes()).is_err());
        assert!(patch(20, &u32::MAX.to_be_bytes()).is_err());
        assert!(patch(32, &3u32.to_be_bytes()).is_err()); // crypt method
        assert!(patch(36, &1u32.to_be_bytes()).is_err()); // l1 too small
        assert!(patch(36, &0x0400_0001u32.to_be_bytes()).is_err()); // l1 too large
        assert!(patch(40, &0x30200u64.to_be_bytes()).is_err()); // l1 unaligned
        assert!(patch(56, &129u32.to_be_bytes()).is_err()); // reftable > 8 MiB
        assert!(patch(60, &65537u32.to_be_bytes()).is_err()); // nb_snapshots
        assert!(patch(72, &0x20u64.to_be_bytes()).is_err()); // unknown incompat bit
        assert!(patch(96, &7u32.to_be_bytes()).is_err()); // refcount order
        assert!(patch(100, &96u32.to_be_bytes()).is_err()); // header too short
        assert!(patch(100, &0x20000u32.to_be_bytes()).is_err()); // header > cluster
        assert!(patch(104, &[2]).is_err()); // compression type
        assert!(patch(72, &8u64.to_be_bytes()).is_err()); // zstd bit with deflate
        assert!(patch(0x74, &0xffffu32.to_be_bytes()).is_err()); // extension too large
        assert!(ImageHeader::decode(&good[..50], &Limits::QEMU).is_err());
    }

    #[test]
    fn unknown_incompatible_bits_are_named_from_the_table() {
        let mut b = fresh_1g().encode().unwrap();
        b[72..80].copy_from_slice(&0x20u64.to_be_bytes());
        let e = ImageHeader::decode(&b, &Limits::QEMU).unwrap_err();
        assert!(
            e.to_string().contains("Unknown incompatible feature: 20"),
            "{e}"
        );
    }

    #[test]
    fn empty_backing_name_is_no_backing_file() {
        // Fuzz regression (target `header`): backing_file_offset 6 with size 0 decoded as
        // `Some("")`, which encodes as no backing file at all.
        let mut b = fresh_1g().encode().unwrap();
        b[8..16].copy_from_slice(&6u64.to_be_bytes());
        let h = ImageHeader::decode(&b, &Limits::QEMU).unwrap();
        assert_eq!(h.backing_file, None);
        let back = ImageHeader::decode(&h.encode().unwrap(), &Limits::QEMU).unwrap();
        assert_eq!(back.backing_file, None);
        // The minimized fuzzer input itself (106 bytes, truncated header).
        let crash: &[u8] = &[
            0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0x10,
            0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0,
            1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 0x70, 0, 0,
        ];
        let h = ImageHeader::decode(crash, &Limits::QEMU).unwrap();
        assert_eq!(h.backing_file, None);
        let back = ImageHeader::decode(&h.encode().unwrap(), &Limits::QEMU).unwrap();
        assert_eq!(back.backing_file, h.backing_file);
    }

    #[test]
    fn extensions_are_padded_relative_to_an_unaligned_header_length() {
        // Fuzz regression (target `header`): header_length 134 (22 unknown header bytes) and
        // an unknown extension; absolute padding moved the extension on re-encode.
        let mut h = fresh_1g();
        h.unknown_header_fields = vec![0xaa; 22];
        h.unknown_extensions = vec![(0xd500, vec![]), (0x1234_5678, vec![1, 2, 3])];
        h.backing_file = Some("b".into());
        let bytes = h.encode().unwrap();
        assert_eq!(u32::from_be_bytes(bytes[100..104].try_into().unwrap()), 134);
        // Feature table at 134 (8 + 384 bytes), then 0xd500 at 526, 0x12345678 at 534 with
        // its 3 data bytes padded to 8, END at 550, backing name at 558.
        assert_eq!(&bytes[526..534], &[0, 0, 0xd5, 0, 0, 0, 0, 0]);
        assert_eq!(&bytes[534..542], &[0x12, 0x34, 0x56, 0x78, 0, 0, 0, 3]);
        assert_eq!(&bytes[542..550], &[1, 2, 3, 0, 0, 0, 0, 0]);
        assert_eq!(&bytes[550..558], &[0; 8]);
        assert_eq!(&bytes[558..559], b"b");
        let back = ImageHeader::decode(&bytes, &Limits::QEMU).unwrap();
        assert_eq!(back.unknown_header_fields, h.unknown_header_fields);
        assert_eq!(
            back.unknown_extensions,
            vec![(0x1234_5678, vec![1, 2, 3]), (0xd500, vec![])]
        );
        assert_eq!(back.backing_file.as_deref(), Some("b"));
        // The minimized fuzzer input.
        let crash: &[u8] = &[
            0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
            0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0,
            1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0x86, 0, 0, 0, 0, 0, 0,
            0, 0, 0x6d, 0, 0, 0, 0, 0xd5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x67, 0, 0x6d, 0, 0, 0, 0,
            0xd5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        let h = ImageHeader::decode(crash, &Limits::QEMU).unwrap();
        assert_eq!(h.header.header_length, 134);
        let back = ImageHeader::decode(&h.encode().unwrap(), &Limits::QEMU).unwrap();
        let mut want = h.unknown_extensions.clone();
        want.reverse();
        assert_eq!(back.unknown_extensions, want);
        assert_eq!(back.unknown_header_fields, h.unknown_header_fields);
    }

    #[test]
    fn v2_headers_round_trip() {
        let mut h = fresh_1g();
        h.header.version = Version::V2;
        h.header.header_length = 72;
        let bytes = h.encode().unwrap();
        assert_eq!(&bytes[72..80], &[0u8; 8]); // END right after the v2 header
        assert_eq!(
            ImageHeader::decode(&bytes, &Limits::QEMU).unwrap().header,
            h.header
        );
    }

    fn arb_header() -> impl Strategy<Value = ImageHeader> {
        (
            (
                12u32..=21,
                any::<bool>(),
                0u64..(1 << 40),
                0u32..=6,
                any::<bool>(),
            ),
            (
                proptest::option::of("[a-z./]{1,40}"),
                proptest::option::of("[a-z]{1,15}"),
            ),
            proptest::collection::vec(
                (
                    1u32..u32::MAX,
                    proptest::collection::vec(any::<u8>(), 0..20),
                ),
                0..3,
            ),
            (
                any::<bool>(),
                any::<bool>(),
                proptest::collection::vec(any::<u8>(), 0..3),
            ),
        )
            .prop_map(
                |((bits, v3, size, order, zstd), (backing, fmt), unknown, (lazy, bm, extra))| {
                    let mut h = fresh_1g();
                    let geo = Geometry::new(bits, false).unwrap();
                    h.header.cluster_bits = bits;
                    h.header.size = size & !511;
                    h.header.l1_size = geo.l1_entries_for(h.header.size) as u32;
                    h.header.l1_table_offset = 3 << bits;
                    h.header.refcount_table_offset = 1 << bits;
                    if v3 {
                        h.header.refcount_order = RefcountOrder::new(order).unwrap();
                        if zstd {
                            h.header.compression_type = CompressionType::Zstd;
                            h.header.incompatible = IncompatibleFeatures::COMPRESSION_TYPE;
                        }
                        h.header
                            .compatible
                            .set(CompatibleFeatures::LAZY_REFCOUNTS, lazy);
                        if bm {
                            h.header.autoclear = AutoclearFeatures::BITMAPS;
                            h.bitmaps = Some(BitmapsExtension {
                                nb_bitmaps: 1,
                                directory_size: 40,
                                directory_offset: 5 << bits,
                            });
                        }
                        h.unknown_header_fields = extra.iter().flat_map(|b| [*b; 8]).collect();
                        h.unknown_extensions = unknown
                            .into_iter()
                            .filter(|(m, _)| {
                                ![
                                    0xe279_2aca,
                                    0x6803_f857,
                                    0x2385_2875,
                                    0x0537_be77,
                                    0x4441_5441,
                                ]
                                .contains(m)
                            })
                            .collect();
                    } else {
                        h.header.version = Version::V2;
                        h.header.header_length = 72;
                    }
                    h.header.backing_file_size = backing.as_ref().map_or(0, |b| b.len() as u32);
                    h.backing_file = backing;
                    h.backing_format = fmt;
                    h
                },
            )
    }

    proptest! {
        #[test]
        fn round_trips(h in arb_header()) {
            let bytes = h.encode().unwrap();
            let mut back = ImageHeader::decode(&bytes, &Limits::QEMU).unwrap();
            // Fields recomputed by the encoder.
            let mut want = h.clone();
            want.header.header_length = back.header.header_length;
            want.header.backing_file_offset = back.header.backing_file_offset;
            if h.header.version == Version::V3 && h.header.cluster_size() > 4096 {
                want.feature_names = qemu_feature_table();
            }
            want.unknown_extensions.reverse();
            back.header.backing_file_offset = want.header.backing_file_offset;
            prop_assert_eq!(&back, &want);
            // Encoding twice is QEMU's double reversal: back to the original order.
            let twice = ImageHeader::decode(&back.encode().unwrap(), &Limits::QEMU).unwrap();
            prop_assert_eq!(twice.unknown_extensions, h.unknown_extensions);
        }

        #[test]
        fn decode_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..700), magic: bool) {
            if magic && bytes.len() >= 24 {
                bytes[0..4].copy_from_slice(b"QFI\xfb");
                bytes[20..24].copy_from_slice(&9u32.to_be_bytes());
            }
            let _ = ImageHeader::decode(&bytes, &Limits::QEMU);
        }
    }
}
