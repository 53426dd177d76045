//! The NBD wire protocol, sans I/O: constants, decoders for everything a client sends and
//! encoders for everything the server sends. Nothing here touches a socket, so every decoder
//! can be fed arbitrary bytes (the fuzz target does).
//!
//! Both request formats are spoken: compact requests (28 bytes, 32-bit lengths) and, once
//! the client negotiated `NBD_OPT_EXTENDED_HEADERS` as QEMU's client does, extended ones
//! (32 bytes, 64-bit lengths). How replies look in each [`Mode`] is in [`crate::reply`].

use std::fmt;

/// `NBDMAGIC`, the first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: after the greeting, and in front of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// In front of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// In front of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// In front of every transmission request once extended headers are negotiated.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// In front of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// In front of every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// In front of every reply chunk once extended headers are negotiated.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Largest READ or WRITE payload the server accepts (and advertises as the maximum block
/// size): 32 MiB, the same as qemu-nbd. Larger reads get `EOVERFLOW`; larger writes get
/// `EOVERFLOW` followed by a hard disconnect, because their payload cannot be trusted to be
/// skipped.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Largest option payload during the handshake. Legitimate options hold at most a few
/// strings of up to 4 KiB each; a larger one ends the connection.
pub const MAX_OPTION: u32 = 64 << 10;
/// Largest string (export name, context query) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Size of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Largest `NBD_CMD_BLOCK_STATUS` payload (an effect length and context ids): far more ids
/// than any export offers. A larger one ends the connection, like an oversized write.
pub const MAX_STATUS_PAYLOAD: u64 = 8 + 4 * 4096;
/// Size of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;

/// Handshake flags (server → client, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// The server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (client → server, 32 bits).
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// The client does not want the 124 zero bytes.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub mod tflags {
    /// `NBD_FLAG_HAS_FLAGS`: the flags field is valid (always set).
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// `NBD_FLAG_READ_ONLY`: the export refuses writes.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`: `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`: the `FUA` command flag is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_SEND_TRIM`: `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`: `NBD_CMD_WRITE_ZEROES` is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_SEND_DF`: the `DF` (don't fragment) read flag is supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// `NBD_FLAG_CAN_MULTI_CONN`: a flush on one connection covers writes completed on all.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_FLAG_SEND_CACHE`: `NBD_CMD_CACHE` is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_FLAG_SEND_FAST_ZERO`: the `FAST_ZERO` write-zeroes flag is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    /// `NBD_FLAG_BLOCK_STAT_PAYLOAD`: `NBD_CMD_BLOCK_STATUS` may name the contexts it wants
    /// in a payload (extended headers only).
    pub const BLOCK_STAT_PAYLOAD: u16 = 1 << 12;
}

/// Option numbers.
pub mod opt {
    /// `NBD_OPT_EXPORT_NAME`: the old way to pick an export and end negotiation.
    pub const EXPORT_NAME: u32 = 1;
    /// `NBD_OPT_ABORT`: the client gives up negotiation.
    pub const ABORT: u32 = 2;
    /// `NBD_OPT_LIST`: list the exports.
    pub const LIST: u32 = 3;
    /// `NBD_OPT_STARTTLS`: switch the connection to TLS.
    pub const STARTTLS: u32 = 5;
    /// `NBD_OPT_INFO`: describe an export without entering transmission.
    pub const INFO: u32 = 6;
    /// `NBD_OPT_GO`: describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// `NBD_OPT_STRUCTURED_REPLY`: use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// `NBD_OPT_LIST_META_CONTEXT`: list the metadata contexts matching queries.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// `NBD_OPT_SET_META_CONTEXT`: select metadata contexts for block status.
    pub const SET_META_CONTEXT: u32 = 10;
    /// `NBD_OPT_EXTENDED_HEADERS`: 32-byte requests and replies with 64-bit lengths.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// `NBD_REP_ACK`: the option succeeded (or a list ended).
    pub const ACK: u32 = 1;
    /// `NBD_REP_SERVER`: one export in an `NBD_OPT_LIST` reply.
    pub const SERVER: u32 = 2;
    /// `NBD_REP_INFO`: one information item about an export.
    pub const INFO: u32 = 3;
    /// `NBD_REP_META_CONTEXT`: one metadata context and its id.
    pub const META_CONTEXT: u32 = 4;
    /// `NBD_REP_ERR_UNSUP`: the option is unknown to the server.
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    /// `NBD_REP_ERR_POLICY`: the option is forbidden by policy.
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    /// `NBD_REP_ERR_INVALID`: the option is malformed.
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    /// `NBD_REP_ERR_TLS_REQD`: the server requires TLS before this option.
    pub const ERR_TLS_REQD: u32 = (1 << 31) + 5;
    /// `NBD_REP_ERR_UNKNOWN`: no export of that name.
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    /// `NBD_REP_ERR_SHUTDOWN`: the server is shutting down.
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
    /// `NBD_REP_ERR_EXT_HEADER_REQD`: structured replies asked for after extended headers.
    pub const ERR_EXT_HEADER_REQD: u32 = (1 << 31) + 10;
}

/// `NBD_REP_INFO` item types.
pub mod info {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// `NBD_INFO_NAME`: the export's canonical name.
    pub const NAME: u16 = 1;
    /// `NBD_INFO_DESCRIPTION`: a human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types.
pub mod cmd {
    /// `NBD_CMD_READ`.
    pub const READ: u16 = 0;
    /// `NBD_CMD_WRITE`.
    pub const WRITE: u16 = 1;
    /// `NBD_CMD_DISC`: the client disconnects.
    pub const DISC: u16 = 2;
    /// `NBD_CMD_FLUSH`.
    pub const FLUSH: u16 = 3;
    /// `NBD_CMD_TRIM`: discard.
    pub const TRIM: u16 = 4;
    /// `NBD_CMD_CACHE`: read ahead into the server's caches; no data in the reply.
    pub const CACHE: u16 = 5;
    /// `NBD_CMD_WRITE_ZEROES`.
    pub const WRITE_ZEROES: u16 = 6;
    /// `NBD_CMD_BLOCK_STATUS`.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflags {
    /// `NBD_CMD_FLAG_FUA`: durable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// `NBD_CMD_FLAG_NO_HOLE`: write zeroes without deallocating.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `NBD_CMD_FLAG_DF`: reply to a read in one chunk.
    pub const DF: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_REQ_ONE`: block status of one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `NBD_CMD_FLAG_FAST_ZERO`: fail rather than write zeroes slowly.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// `NBD_CMD_FLAG_PAYLOAD_LEN`: the length field is the payload's length (extended
    /// headers only; `NBD_CMD_BLOCK_STATUS` with a context filter).
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    /// `NBD_REPLY_FLAG_DONE`: the last chunk of a reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// `NBD_REPLY_TYPE_NONE`: a reply with no payload.
    pub const NONE: u16 = 0;
    /// `NBD_REPLY_TYPE_OFFSET_DATA`: read data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: a part of a read that reads as zeros, without its bytes.
    pub const OFFSET_HOLE: u16 = 2;
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`: extents of one metadata context.
    pub const BLOCK_STATUS: u16 = 5;
    /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`: extents with 64-bit lengths (extended headers).
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// `NBD_REPLY_TYPE_ERROR`: an error for the whole request.
    pub const ERROR: u16 = (1 << 15) + 1;
}

/// Error values of the transmission phase (the protocol fixes them; they are not the host's
/// errno values).
pub mod errno {
    /// Operation not permitted (a write to a read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left (lets a VMM pause the guest, `werror=enospc`).
    pub const ENOSPC: u32 = 28;
    /// The request exceeds the export or a size limit.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported (e.g. a fast zero that would be slow).
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` flags.
pub const STATE_HOLE: u32 = 1 << 0;
/// The extent reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME`: the extent is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

/// A violation that leaves the byte stream unusable: the only answer is a hard disconnect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// A magic number was wrong, so the stream cannot be resynchronised.
    #[error("bad {what} magic {found:#x}")]
    BadMagic {
        /// Which magic.
        what: &'static str,
        /// What the client sent.
        found: u64,
    },
    /// The client flags carry bits the server did not offer, or lack fixed newstyle.
    #[error("unsupported client flags {0:#x} (fixed newstyle is required)")]
    ClientFlags(u32),
    /// An option payload is larger than [`MAX_OPTION`].
    #[error("option {option} carries {length} bytes (at most {MAX_OPTION})")]
    OptionTooLarge {
        /// The option.
        option: u32,
        /// Its announced length.
        length: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist (it cannot return errors).
    #[error("unknown export {0:?}")]
    UnknownExport(String),
}

/// Checks the client flags that follow the greeting.
pub fn decode_client_flags(raw: [u8; 4]) -> Result<u32, ProtoError> {
    let flags = u32::from_be_bytes(raw);
    if flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0
        || flags & CLIENT_FIXED_NEWSTYLE == 0
    {
        return Err(ProtoError::ClientFlags(flags));
    }
    Ok(flags)
}

/// The server's greeting: magic, `IHAVEOPT`, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// An option header: which option and how many payload bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number.
    pub option: u32,
    /// Payload length, at most [`MAX_OPTION`].
    pub length: u32,
}

/// Decodes an option header, refusing a bad magic and oversized payloads.
pub fn decode_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtoError> {
    let magic = be64(&b[0..8]);
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "option",
            found: magic,
        });
    }
    let h = OptionHeader {
        option: be32(&b[8..12]),
        length: be32(&b[12..16]),
    };
    if h.length > MAX_OPTION {
        return Err(ProtoError::OptionTooLarge {
            option: h.option,
            length: h.length,
        });
    }
    Ok(h)
}

/// A malformed option payload: answered with `NBD_REP_ERR_INVALID`, negotiation goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidOption(pub &'static str);

impl fmt::Display for InvalidOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name.
    pub name: String,
    /// Requested information items.
    pub items: Vec<u16>,
}

/// Payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    /// Export name.
    pub export: String,
    /// Queries (possibly none).
    pub queries: Vec<String>,
}

/// A cursor over an option payload that never reads past its end.
struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], InvalidOption> {
        if n > self.b.len() {
            return Err(InvalidOption("option payload is truncated"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u16(&mut self) -> Result<u16, InvalidOption> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().unwrap_or([0; 2]),
        ))
    }
    fn u32(&mut self) -> Result<u32, InvalidOption> {
        Ok(be32(self.take(4)?))
    }
    fn string(&mut self) -> Result<String, InvalidOption> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return Err(InvalidOption("string longer than 4096 bytes"));
        }
        decode_string(self.take(n)?)
    }
    fn end(&self) -> Result<(), InvalidOption> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(InvalidOption("trailing bytes after the option payload"))
        }
    }
}

/// A protocol string: UTF-8, no NUL, at most [`MAX_STRING`] bytes.
pub fn decode_string(b: &[u8]) -> Result<String, InvalidOption> {
    if b.len() > MAX_STRING {
        return Err(InvalidOption("string longer than 4096 bytes"));
    }
    if b.contains(&0) {
        return Err(InvalidOption("string contains NUL"));
    }
    String::from_utf8(b.to_vec()).map_err(|_| InvalidOption("string is not UTF-8"))
}

/// Decodes the payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn decode_info_request(data: &[u8]) -> Result<InfoRequest, InvalidOption> {
    let mut c = Cursor { b: data };
    let name = c.string()?;
    let n = c.u16()?;
    let mut items = Vec::with_capacity(usize::from(n).min(data.len() / 2));
    for _ in 0..n {
        items.push(c.u16()?);
    }
    c.end()?;
    Ok(InfoRequest { name, items })
}

/// Decodes the payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
pub fn decode_meta_request(data: &[u8]) -> Result<MetaRequest, InvalidOption> {
    let mut c = Cursor { b: data };
    let export = c.string()?;
    let n = c.u32()?;
    // Each query takes at least its 4-byte length: a count beyond that is a lie.
    if n as usize > c.b.len() / 4 {
        return Err(InvalidOption(
            "more queries announced than the payload holds",
        ));
    }
    let mut queries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        queries.push(c.string()?);
    }
    c.end()?;
    Ok(MetaRequest { export, queries })
}

/// A metadata context an export can offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaContext {
    /// `base:allocation`: holes and zeros.
    BaseAllocation,
    /// `qemu:allocation-depth`: which layer of the backing chain holds the extent (0: none,
    /// 1: the image itself, 2: its backing file, ...).
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME`: bit 0 set where the persistent bitmap is dirty.
    DirtyBitmap(String),
}

impl MetaContext {
    /// The context's name on the wire.
    pub fn name(&self) -> String {
        match self {
            MetaContext::BaseAllocation => "base:allocation".into(),
            MetaContext::AllocationDepth => "qemu:allocation-depth".into(),
            MetaContext::DirtyBitmap(n) => format!("qemu:dirty-bitmap:{n}"),
        }
    }
}

/// Indices of the contexts in `available` that `query` selects. Exact names always match;
/// for `LIST` (`list == true`) a bare namespace (`base:`, `qemu:`, `qemu:dirty-bitmap:`)
/// matches everything in it, as in qemu-nbd. Unknown namespaces select nothing.
pub fn match_query(query: &str, available: &[MetaContext], list: bool) -> Vec<usize> {
    let wildcard = |prefix: &str| list && query == prefix;
    available
        .iter()
        .enumerate()
        .filter(|(_, c)| {
            let name = c.name();
            name == query
                || match c {
                    MetaContext::BaseAllocation => wildcard("base:"),
                    MetaContext::AllocationDepth => wildcard("qemu:"),
                    MetaContext::DirtyBitmap(_) => {
                        wildcard("qemu:") || wildcard("qemu:dirty-bitmap:")
                    }
                }
        })
        .map(|(i, _)| i)
        .collect()
}

/// Which request and reply formats a connection speaks (QEMU's `NBDMode`), in the order a
/// client can upgrade during negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// Compact requests; simple replies only.
    Simple,
    /// Compact requests; structured replies (`NBD_OPT_STRUCTURED_REPLY`).
    Structured,
    /// Extended requests and replies with 64-bit lengths (`NBD_OPT_EXTENDED_HEADERS`);
    /// every reply is a chunk.
    Extended,
}

impl Mode {
    /// Bytes of a request header in this mode.
    pub fn request_len(self) -> usize {
        match self {
            Mode::Extended => EXTENDED_REQUEST_LEN,
            _ => REQUEST_LEN,
        }
    }

    /// The mode after `NBD_OPT_STRUCTURED_REPLY` (`to` structured) or
    /// `NBD_OPT_EXTENDED_HEADERS` (`to` extended), or the option error to reply with, as
    /// qemu-nbd: neither takes data or may repeat, and extended headers imply structured
    /// replies, so asking for those afterwards gets `NBD_REP_ERR_EXT_HEADER_REQD`.
    pub fn upgrade(self, to: Mode, no_data: bool) -> Result<Mode, (u32, &'static str)> {
        if !no_data {
            Err((rep::ERR_INVALID, "the option takes no data"))
        } else if self == to {
            Err((rep::ERR_INVALID, "already negotiated"))
        } else if self > to {
            Err((
                rep::ERR_EXT_HEADER_REQD,
                "extended headers already negotiated",
            ))
        } else {
            Ok(to)
        }
    }
}

/// A decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// The client's cookie (handle), echoed in the reply.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length: 32 bits in a compact request, 64 in an extended one. For a write, and for a
    /// command with `PAYLOAD_LEN`, the number of payload bytes that follow.
    pub length: u64,
}

/// Decodes a request header of `mode` (`b` holds [`Mode::request_len`] bytes); a bad magic,
/// including a compact request where extended ones were negotiated, is fatal for the
/// connection.
pub fn decode_request(b: &[u8], mode: Mode) -> Result<RequestHeader, ProtoError> {
    let (magic, len) = match mode {
        Mode::Extended => (EXTENDED_REQUEST_MAGIC, EXTENDED_REQUEST_LEN),
        _ => (REQUEST_MAGIC, REQUEST_LEN),
    };
    let b = b.get(..len).ok_or(ProtoError::BadMagic {
        what: "request",
        found: 0,
    })?;
    let found = be32(&b[0..4]);
    if found != magic {
        return Err(ProtoError::BadMagic {
            what: "request",
            found: u64::from(found),
        });
    }
    Ok(RequestHeader {
        flags: u16::from_be_bytes([b[4], b[5]]),
        kind: u16::from_be_bytes([b[6], b[7]]),
        cookie: be64(&b[8..16]),
        offset: be64(&b[16..24]),
        length: match mode {
            Mode::Extended => be64(&b[24..32]),
            _ => u64::from(be32(&b[24..28])),
        },
    })
}

/// What the transmission phase must know about the export and the session to judge a
/// request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Export size in bytes.
    pub size: u64,
    /// Writes, trims and zeroes are refused with `EPERM`.
    pub read_only: bool,
    /// The negotiated request and reply formats.
    pub mode: Mode,
    /// How many metadata contexts were selected (`BLOCK_STATUS` needs at least one). With
    /// extended headers and at least one, `NBD_FLAG_BLOCK_STAT_PAYLOAD` is advertised.
    pub contexts: usize,
}

impl Limits {
    /// Whether `NBD_CMD_BLOCK_STATUS` may carry a context filter (and the export says so).
    pub fn status_payload(&self) -> bool {
        self.mode == Mode::Extended && self.contexts > 0
    }
}

/// A validated command, ready to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes at `offset`.
    Read {
        /// Offset.
        offset: u64,
        /// Length, at most [`MAX_REQUEST`].
        len: u32,
        /// `DF`: the data goes in one chunk (no holes).
        df: bool,
    },
    /// Write the `len`-byte payload that follows at `offset`.
    Write {
        /// Offset.
        offset: u64,
        /// Length of the payload, at most [`MAX_REQUEST`].
        len: u32,
        /// Persist before replying.
        fua: bool,
    },
    /// Read `len` bytes at `offset` into the server's caches, returning no data.
    Cache {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// The client is done.
    Disconnect,
    /// Make completed writes durable.
    Flush,
    /// Discard.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Persist before replying.
        fua: bool,
    },
    /// Make the range read as zeros.
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Persist before replying.
        fua: bool,
        /// `NO_HOLE`: keep the space allocated.
        no_hole: bool,
        /// `FAST_ZERO`: fail with `ENOTSUP` rather than write zeros slowly.
        fast: bool,
    },
    /// Report the selected metadata contexts over the range.
    BlockStatus {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// `REQ_ONE`: one extent per context is enough.
        req_one: bool,
    },
    /// `BLOCK_STATUS` whose length and contexts come in a `payload`-byte payload (decode it
    /// with [`decode_status_payload`], then judge it with [`validate_status_range`]).
    BlockStatusFiltered {
        /// Offset.
        offset: u64,
        /// Bytes of payload that follow the header.
        payload: u32,
        /// `REQ_ONE`.
        req_one: bool,
    },
}

impl Command {
    /// Bytes of payload that follow the request header: a write's data, a block-status
    /// filter.
    pub fn payload_len(&self) -> u32 {
        match *self {
            Command::Write { len, .. } => len,
            Command::BlockStatusFiltered { payload, .. } => payload,
            _ => 0,
        }
    }

    /// Bytes of buffer the request holds while it runs: its payload, or a read's data.
    pub fn buffer_len(&self) -> u32 {
        match *self {
            Command::Read { len, .. } => len,
            _ => self.payload_len(),
        }
    }
}

/// A request refused before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// The error to reply with.
    pub errno: u32,
    /// Payload bytes that follow the header and must be read and dropped before the next
    /// request (a refused in-limit write or block-status filter).
    pub skip: u32,
    /// After replying, end the connection: the payload of an oversized write cannot be
    /// skipped sensibly.
    pub disconnect: bool,
    /// Why, for the error message and the log.
    pub reason: &'static str,
}

/// Judges a request against the export: flags, bounds, size and permissions. Pure, so it can
/// be fuzzed; the server runs exactly what this returns.
pub fn validate(h: &RequestHeader, l: &Limits) -> Result<Command, Rejection> {
    let extended = l.mode == Mode::Extended;
    // Bytes that follow the header, whether or not the command is accepted.
    let payload = if h.kind == cmd::WRITE || (extended && h.flags & cflags::PAYLOAD_LEN != 0) {
        h.length
    } else {
        0
    };
    let payload_cap = if h.kind == cmd::WRITE {
        u64::from(MAX_REQUEST)
    } else {
        MAX_STATUS_PAYLOAD
    };
    let reject = |errno, reason| {
        let oversized = payload > payload_cap;
        Err(Rejection {
            errno,
            skip: if oversized { 0 } else { payload as u32 },
            disconnect: oversized,
            reason,
        })
    };
    let allowed = match h.kind {
        cmd::READ if l.mode >= Mode::Structured => cflags::FUA | cflags::DF,
        cmd::READ | cmd::DISC | cmd::FLUSH | cmd::TRIM | cmd::CACHE => cflags::FUA,
        // The flag only restates that the length is the payload's.
        cmd::WRITE if extended => cflags::FUA | cflags::PAYLOAD_LEN,
        cmd::WRITE => cflags::FUA,
        cmd::WRITE_ZEROES => cflags::FUA | cflags::NO_HOLE | cflags::FAST_ZERO,
        cmd::BLOCK_STATUS if l.status_payload() => {
            cflags::FUA | cflags::REQ_ONE | cflags::PAYLOAD_LEN
        }
        cmd::BLOCK_STATUS => cflags::FUA | cflags::REQ_ONE,
        _ => return reject(errno::EINVAL, "unknown command"),
    };
    if h.flags & !allowed != 0 {
        return reject(errno::EINVAL, "flag not valid for this command");
    }
    // CACHE carries no data either way, so it is not bounded by the buffer limit (as in
    // qemu-nbd, which prefetches any in-range length); the server reads it piece by piece.
    if matches!(h.kind, cmd::READ | cmd::WRITE) && h.length > u64::from(MAX_REQUEST) {
        return reject(errno::EOVERFLOW, "request larger than the 32 MiB maximum");
    }
    let writes = matches!(h.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && l.read_only {
        return reject(errno::EPERM, "export is read-only");
    }
    let filtered = h.kind == cmd::BLOCK_STATUS && payload > 0;
    if filtered {
        if !(12..=MAX_STATUS_PAYLOAD).contains(&payload) || payload % 4 != 0 {
            return reject(errno::EINVAL, "malformed block status payload");
        }
    } else if !matches!(h.kind, cmd::DISC | cmd::FLUSH) && !in_range(h.offset, h.length, l) {
        // The NBD spec's codes: ENOSPC for writes past the end, EINVAL otherwise. (qemu-nbd
        // 10 computes the same but replies EINVAL to every request it refuses before
        // running it, oversized and read-only ones included: nbd_trip in nbd/server.c.)
        let e = if matches!(h.kind, cmd::WRITE | cmd::WRITE_ZEROES) {
            errno::ENOSPC
        } else {
            errno::EINVAL
        };
        return reject(e, "request extends past the end of the export");
    }
    let fua = h.flags & cflags::FUA != 0;
    let (offset, len) = (h.offset, h.length);
    Ok(match h.kind {
        cmd::READ => Command::Read {
            offset,
            len: len as u32,
            df: h.flags & cflags::DF != 0,
        },
        cmd::WRITE => Command::Write {
            offset,
            len: len as u32,
            fua,
        },
        cmd::DISC => Command::Disconnect,
        cmd::FLUSH => Command::Flush,
        cmd::TRIM => Command::Trim { offset, len, fua },
        cmd::CACHE => Command::Cache { offset, len },
        cmd::WRITE_ZEROES => Command::WriteZeroes {
            offset,
            len,
            fua,
            no_hole: h.flags & cflags::NO_HOLE != 0,
            fast: h.flags & cflags::FAST_ZERO != 0,
        },
        _ => {
            if l.mode == Mode::Simple || l.contexts == 0 {
                return reject(errno::EINVAL, "no metadata context was negotiated");
            }
            let req_one = h.flags & cflags::REQ_ONE != 0;
            if filtered {
                return Ok(Command::BlockStatusFiltered {
                    offset,
                    payload: payload as u32,
                    req_one,
                });
            }
            if len == 0 {
                return reject(errno::EINVAL, "block status of an empty range");
            }
            Command::BlockStatus {
                offset,
                len,
                req_one,
            }
        }
    })
}

fn in_range(offset: u64, len: u64, l: &Limits) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= l.size)
}

/// The payload of a filtered `NBD_CMD_BLOCK_STATUS`: the effect length and the ids of the
/// contexts wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusFilter {
    /// Bytes to report on.
    pub len: u64,
    /// Context ids, as the client sent them (duplicates allowed).
    pub ids: Vec<u32>,
}

/// Decodes a block-status payload whose size [`validate`] accepted (an effect length and at
/// least one 4-byte id).
pub fn decode_status_payload(b: &[u8]) -> Result<StatusFilter, InvalidOption> {
    if b.len() < 12 || b.len() % 4 != 0 || b.len() as u64 > MAX_STATUS_PAYLOAD {
        return Err(InvalidOption("malformed block status payload"));
    }
    Ok(StatusFilter {
        len: be64(&b[..8]),
        ids: b[8..].chunks_exact(4).map(be32).collect(),
    })
}

/// Judges the range of a filtered block status, as [`validate`] judges an unfiltered one.
pub fn validate_status_range(offset: u64, len: u64, l: &Limits) -> Result<(), Rejection> {
    let reason = if len == 0 {
        "block status of an empty range"
    } else if !in_range(offset, len, l) {
        "request extends past the end of the export"
    } else {
        return Ok(());
    };
    Err(Rejection {
        errno: errno::EINVAL,
        skip: 0,
        disconnect: false,
        reason,
    })
}
/// Appends an option reply.
pub fn option_reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends an `NBD_REP_INFO` / `NBD_INFO_EXPORT` item.
pub fn info_export(out: &mut Vec<u8>, option: u32, size: u64, flags: u16) {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&info::EXPORT.to_be_bytes());
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    option_reply(out, option, rep::INFO, &d);
}

/// Appends an `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE` item.
pub fn info_block_size(out: &mut Vec<u8>, option: u32, min: u32, preferred: u32, max: u32) {
    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    for v in [min, preferred, max] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    option_reply(out, option, rep::INFO, &d);
}

/// Appends an `NBD_REP_INFO` item carrying a string (`NBD_INFO_NAME`, `_DESCRIPTION`).
pub fn info_string(out: &mut Vec<u8>, option: u32, item: u16, s: &str) {
    let mut d = Vec::with_capacity(2 + s.len());
    d.extend_from_slice(&item.to_be_bytes());
    d.extend_from_slice(s.as_bytes());
    option_reply(out, option, rep::INFO, &d);
}

/// Appends an `NBD_REP_SERVER` entry of `NBD_OPT_LIST`.
pub fn rep_server(out: &mut Vec<u8>, name: &str) {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    option_reply(out, opt::LIST, rep::SERVER, &d);
}

/// Appends an `NBD_REP_META_CONTEXT` entry.
pub fn rep_meta_context(out: &mut Vec<u8>, option: u32, id: u32, name: &str) {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&id.to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    option_reply(out, option, rep::META_CONTEXT, &d);
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and (unless the client
/// negotiated `NO_ZEROES`) 124 zero bytes.
pub fn export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

pub(crate) fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

pub(crate) fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 7,
            offset,
            length: u64::from(length),
        }
    }

    const RW: Limits = Limits {
        size: 1 << 20,
        read_only: false,
        mode: Mode::Structured,
        contexts: 1,
    };

    #[test]
    fn request_header_round_trips_and_bad_magic_is_fatal() {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&cflags::FUA.to_be_bytes());
        b[6..8].copy_from_slice(&cmd::WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&0xdead_beef_u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..28].copy_from_slice(&512u32.to_be_bytes());
        assert_eq!(
            decode_request(&b, Mode::Structured).unwrap(),
            RequestHeader {
                flags: cflags::FUA,
                kind: cmd::WRITE,
                cookie: 0xdead_beef,
                offset: 4096,
                length: 512
            }
        );
        // Once extended headers are negotiated a compact request is a protocol violation.
        assert!(decode_request(&b, Mode::Extended).is_err());
        b[0] ^= 1;
        assert!(matches!(
            decode_request(&b, Mode::Simple),
            Err(ProtoError::BadMagic {
                what: "request",
                ..
            })
        ));
    }

    #[test]
    fn requests_past_the_end_are_refused_with_qemu_nbd_errors() {
        let past = validate(&req(cmd::WRITE, 0, (1 << 20) - 100, 200), &RW).unwrap_err();
        assert_eq!(
            (past.errno, past.skip, past.disconnect),
            (errno::ENOSPC, 200, false)
        );
        let past = validate(&req(cmd::READ, 0, 1 << 20, 1), &RW).unwrap_err();
        assert_eq!((past.errno, past.skip), (errno::EINVAL, 0));
        let wrap = validate(&req(cmd::TRIM, 0, u64::MAX - 1, 4), &RW).unwrap_err();
        assert_eq!(wrap.errno, errno::EINVAL);
        let z = validate(&req(cmd::WRITE_ZEROES, 0, 1 << 20, 1), &RW).unwrap_err();
        assert_eq!(z.errno, errno::ENOSPC);
        assert_eq!(
            validate(&req(cmd::READ, 0, (1 << 20) - 1, 1), &RW),
            Ok(Command::Read {
                offset: (1 << 20) - 1,
                len: 1,
                df: false
            })
        );
    }

    #[test]
    fn oversized_reads_overflow_and_oversized_writes_disconnect() {
        let big = Limits {
            size: u64::MAX,
            ..RW
        };
        let r = validate(&req(cmd::READ, 0, 0, MAX_REQUEST + 1), &big).unwrap_err();
        assert_eq!((r.errno, r.disconnect), (errno::EOVERFLOW, false));
        let w = validate(&req(cmd::WRITE, 0, 0, MAX_REQUEST + 1), &big).unwrap_err();
        assert_eq!((w.errno, w.skip, w.disconnect), (errno::EOVERFLOW, 0, true));
        assert!(validate(&req(cmd::WRITE, 0, 0, MAX_REQUEST), &big).is_ok());
        // Zeroes, trims and cache requests carry no payload: they may be as long as the
        // export.
        assert!(validate(&req(cmd::WRITE_ZEROES, 0, 0, u32::MAX), &big).is_ok());
        assert_eq!(
            validate(&req(cmd::CACHE, 0, 4096, u32::MAX), &big),
            Ok(Command::Cache {
                offset: 4096,
                len: u64::from(u32::MAX)
            })
        );
        // Read-only exports cache too; past the end is EINVAL, as for reads.
        let ro = Limits {
            read_only: true,
            ..RW
        };
        assert!(validate(&req(cmd::CACHE, 0, 0, 512), &ro).is_ok());
        let past = validate(&req(cmd::CACHE, 0, ro.size, 1), &ro).unwrap_err();
        assert_eq!((past.errno, past.skip), (errno::EINVAL, 0));
    }

    #[test]
    fn read_only_exports_refuse_every_write_with_eperm() {
        let ro = Limits {
            read_only: true,
            ..RW
        };
        for kind in [cmd::WRITE, cmd::TRIM, cmd::WRITE_ZEROES] {
            let r = validate(&req(kind, 0, 0, 512), &ro).unwrap_err();
            assert_eq!(r.errno, errno::EPERM);
            assert_eq!(r.skip, if kind == cmd::WRITE { 512 } else { 0 });
        }
        assert!(validate(&req(cmd::READ, 0, 0, 512), &ro).is_ok());
        assert_eq!(validate(&req(cmd::FLUSH, 0, 0, 0), &ro), Ok(Command::Flush));
    }

    #[test]
    fn flags_and_commands_are_checked() {
        assert_eq!(
            validate(&req(99, 0, 0, 0), &RW).unwrap_err().errno,
            errno::EINVAL
        );
        let r = validate(&req(cmd::WRITE, cflags::NO_HOLE, 0, 16), &RW).unwrap_err();
        assert_eq!((r.errno, r.skip), (errno::EINVAL, 16));
        let simple = Limits {
            mode: Mode::Simple,
            contexts: 0,
            ..RW
        };
        assert!(validate(&req(cmd::READ, cflags::DF, 0, 16), &simple).is_err());
        assert!(validate(&req(cmd::READ, cflags::DF, 0, 16), &RW).is_ok());
        assert!(validate(&req(cmd::BLOCK_STATUS, 0, 0, 16), &simple).is_err());
        assert!(validate(&req(cmd::BLOCK_STATUS, 0, 0, 0), &RW).is_err());
        assert_eq!(
            validate(
                &req(
                    cmd::WRITE_ZEROES,
                    cflags::NO_HOLE | cflags::FAST_ZERO,
                    0,
                    16
                ),
                &RW
            ),
            Ok(Command::WriteZeroes {
                offset: 0,
                len: 16,
                fua: false,
                no_hole: true,
                fast: true
            })
        );
    }

    #[test]
    fn option_payloads_are_bounded_and_exact() {
        let mut go = Vec::new();
        go.extend_from_slice(&3u32.to_be_bytes());
        go.extend_from_slice(b"abc");
        go.extend_from_slice(&2u16.to_be_bytes());
        go.extend_from_slice(&info::NAME.to_be_bytes());
        go.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            decode_info_request(&go).unwrap(),
            InfoRequest {
                name: "abc".into(),
                items: vec![info::NAME, info::BLOCK_SIZE]
            }
        );
        assert!(decode_info_request(&go[..go.len() - 1]).is_err());
        let mut trailing = go.clone();
        trailing.push(0);
        assert!(decode_info_request(&trailing).is_err());
        // A name length beyond the payload, or a lying query count, is invalid, not a panic.
        assert!(decode_info_request(&u32::MAX.to_be_bytes()).is_err());
        let mut meta = Vec::new();
        meta.extend_from_slice(&0u32.to_be_bytes());
        meta.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_meta_request(&meta).is_err());
        let mut nul = Vec::new();
        nul.extend_from_slice(&1u32.to_be_bytes());
        nul.push(0);
        nul.extend_from_slice(&0u16.to_be_bytes());
        assert!(decode_info_request(&nul).is_err());
    }

    #[test]
    fn option_headers_refuse_bad_magic_and_huge_payloads() {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&opt::GO.to_be_bytes());
        b[12..16].copy_from_slice(&(MAX_OPTION + 1).to_be_bytes());
        assert!(matches!(
            decode_option_header(&b),
            Err(ProtoError::OptionTooLarge { .. })
        ));
        b[12..16].copy_from_slice(&10u32.to_be_bytes());
        assert_eq!(
            decode_option_header(&b),
            Ok(OptionHeader {
                option: opt::GO,
                length: 10
            })
        );
        b[0] = 0;
        assert!(decode_option_header(&b).is_err());
    }

    #[test]
    fn client_flags_require_fixed_newstyle_and_nothing_unknown() {
        assert!(decode_client_flags(0u32.to_be_bytes()).is_err());
        assert!(decode_client_flags(4u32.to_be_bytes()).is_err());
        assert_eq!(decode_client_flags(3u32.to_be_bytes()), Ok(3));
    }

    #[test]
    fn meta_context_queries_match_like_qemu_nbd() {
        let avail = [
            MetaContext::BaseAllocation,
            MetaContext::DirtyBitmap("b0".into()),
            MetaContext::DirtyBitmap("b1".into()),
        ];
        assert_eq!(match_query("base:allocation", &avail, false), vec![0]);
        assert_eq!(match_query("qemu:dirty-bitmap:b1", &avail, false), vec![2]);
        assert_eq!(match_query("qemu:", &avail, true), vec![1, 2]);
        assert_eq!(match_query("qemu:", &avail, false), Vec::<usize>::new());
        assert_eq!(match_query("base:", &avail, true), vec![0]);
        assert_eq!(match_query("nope:x", &avail, true), Vec::<usize>::new());
    }

    fn ext(kind: u16, flags: u16, offset: u64, length: u64) -> RequestHeader {
        RequestHeader {
            length,
            ..req(kind, flags, offset, 0)
        }
    }

    const EXT: Limits = Limits {
        size: 1 << 40,
        mode: Mode::Extended,
        ..RW
    };

    #[test]
    fn extended_requests_carry_64_bit_lengths() {
        let mut b = [0u8; EXTENDED_REQUEST_LEN];
        b[..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        b[6..8].copy_from_slice(&cmd::TRIM.to_be_bytes());
        b[16..24].copy_from_slice(&(1u64 << 32).to_be_bytes());
        b[24..32].copy_from_slice(&(5u64 << 32).to_be_bytes());
        let h = decode_request(&b, Mode::Extended).unwrap();
        assert_eq!((h.kind, h.offset, h.length), (cmd::TRIM, 1 << 32, 5 << 32));
        assert!(decode_request(&b, Mode::Structured).is_err(), "wrong magic");
        assert!(decode_request(&b[..31], Mode::Extended).is_err(), "short");
        assert_eq!(
            validate(&h, &EXT),
            Ok(Command::Trim {
                offset: 1 << 32,
                len: 5 << 32,
                fua: false
            })
        );
        // Reads and writes stay bounded by the advertised maximum block size.
        let big = validate(&ext(cmd::READ, 0, 0, 1 << 32), &EXT).unwrap_err();
        assert_eq!(big.errno, errno::EOVERFLOW);
        let w = validate(&ext(cmd::WRITE, 0, 0, 1 << 32), &EXT).unwrap_err();
        assert!(w.disconnect);
    }

    #[test]
    fn payload_len_is_extended_only_and_its_payload_is_skipped_when_refused() {
        let pl = cflags::PAYLOAD_LEN;
        // Writes may restate their payload length.
        assert!(validate(&ext(cmd::WRITE, pl, 0, 512), &EXT).is_ok());
        assert!(validate(&req(cmd::WRITE, pl, 0, 512), &RW).is_err());
        // A command that defines no payload: refused, its payload skipped.
        let r = validate(&ext(cmd::FLUSH, pl, 0, 24), &EXT).unwrap_err();
        assert_eq!((r.errno, r.skip, r.disconnect), (errno::EINVAL, 24, false));
        let r = validate(&ext(cmd::TRIM, pl, 0, 1 << 40), &EXT).unwrap_err();
        assert!(r.disconnect, "an absurd payload cannot be skipped");
        // Block status filters need at least one selected context.
        let none = Limits { contexts: 0, ..EXT };
        let r = validate(&ext(cmd::BLOCK_STATUS, pl, 0, 12), &none).unwrap_err();
        assert_eq!((r.errno, r.skip), (errno::EINVAL, 12));
        assert_eq!(
            validate(&ext(cmd::BLOCK_STATUS, pl, 4096, 16), &EXT),
            Ok(Command::BlockStatusFiltered {
                offset: 4096,
                payload: 16,
                req_one: false
            })
        );
        for bad in [8, 14, MAX_STATUS_PAYLOAD + 4] {
            let r = validate(&ext(cmd::BLOCK_STATUS, pl, 0, bad), &EXT).unwrap_err();
            assert_eq!(r.errno, errno::EINVAL);
        }
    }

    #[test]
    fn modes_upgrade_once_and_extended_implies_structured() {
        let (s, e) = (Mode::Structured, Mode::Extended);
        assert_eq!(Mode::Simple.upgrade(s, true), Ok(s));
        assert_eq!(Mode::Simple.upgrade(e, true), Ok(e));
        assert_eq!(s.upgrade(e, true), Ok(e));
        assert_eq!(s.upgrade(s, true).unwrap_err().0, rep::ERR_INVALID);
        assert_eq!(e.upgrade(e, true).unwrap_err().0, rep::ERR_INVALID);
        assert_eq!(e.upgrade(s, true).unwrap_err().0, rep::ERR_EXT_HEADER_REQD);
        assert_eq!(
            Mode::Simple.upgrade(s, false).unwrap_err().0,
            rep::ERR_INVALID
        );
    }

    #[test]
    fn status_payloads_decode_and_their_range_is_judged() {
        let mut p = (1u64 << 20).to_be_bytes().to_vec();
        p.extend_from_slice(&1u32.to_be_bytes());
        p.extend_from_slice(&3u32.to_be_bytes());
        let f = decode_status_payload(&p).unwrap();
        assert_eq!((f.len, f.ids), (1 << 20, vec![1, 3]));
        assert!(decode_status_payload(&p[..10]).is_err());
        assert!(validate_status_range(0, 1 << 20, &RW).is_ok());
        assert!(validate_status_range(1, 1 << 20, &RW).is_err());
        assert!(validate_status_range(0, 0, &RW).is_err());
    }
}
