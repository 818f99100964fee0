//! Structural pre-scan: the element structure of an input, walked before
//! dicom-rs parses anything, so that parsing allocates no more than the
//! input holds.
//!
//! dicom-rs 0.10 sizes each value buffer from the length its element
//! declares (reserve, zero-fill, then read), builds nested sequences by
//! recursion, and inflates a deflated data set without limit. Unchecked, a
//! 420-byte file whose Pixel Data declares 0xFFFFFFF0 bytes costs 4 GB of
//! memory, 100,000 nested sequences overflow the parsing thread's stack, and
//! 1.5 MB of deflated zeros become 1.5 GB.
//!
//! This module reads the input once, as a stream, holding no value (values
//! are copied into [`io::sink`], a few kilobytes at a time), and refuses it
//! with the element named when:
//! - an element, item or fragment declares more bytes than remain in the
//!   input, or than remain in the item or sequence of defined length that
//!   encloses it;
//! - sequences nest deeper than [`MAX_SEQUENCE_DEPTH`] (the walk itself is a
//!   loop over an explicit stack, so no input deepens this stack);
//! - the data set holds more than [`MAX_DATA_SET_NODES`] elements, items,
//!   fragments and string values (each costs the parsed tree about a hundred
//!   bytes, whatever it takes in the file);
//! - a deflated data set (Deflated Explicit VR Little Endian) inflates past
//!   `limits.max_inflated_mib`: it is inflated while it is walked and the
//!   walk stops at the cap, so a deflate bomb never reaches memory;
//! - the structure is one dicom-rs would refuse or read in more than one way
//!   (a truncated header, an item tag where an element is expected, a
//!   fragment of undefined length, content that overruns its container).
//!
//! The walk follows dicom-rs's reading rules step for step (which elements
//! open a sequence, how the file meta group's length is counted, where a
//! container of defined length closes, which end of input is a graceful
//! end), so the structure that passes here is the structure dicom-rs then
//! builds, and each of its allocations is bounded by bytes that are present:
//! by the input's size for a plain file, by `limits.max_inflated_mib` for a
//! deflated one. Only then does [`super::read`] let dicom-rs parse.

use std::fmt;
use std::io::{self, Read, Write};

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;
use dicom_encoding::TransferSyntaxIndex;
use dicom_encoding::transfer_syntax::{Codec, Endianness};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::{DicomError, Result};
use crate::LimitsConfig;

/// Deepest nesting of sequences accepted: a sequence in an item of a
/// sequence is at depth 2 (items add no level); encapsulated pixel data and
/// other elements of undefined length count as sequences, as dicom-rs reads
/// them.
///
/// dicom-rs builds nested sequences by recursion, about 1.2 KiB of stack per
/// level (measured: an 8 MiB main-thread stack overflows at about 7,300
/// levels); 16 levels take some 20 KiB, far inside the smallest thread stack
/// the box parses on (the 2 MiB of Tokio's blocking pool), while real images
/// nest three or four levels (a referenced-image or procedure code sequence
/// inside a request attributes item). Fixed rather than configurable:
/// raising it far enough would bring the stack overflow back.
pub const MAX_SEQUENCE_DEPTH: usize = 16;

/// Most elements, items, fragments and string values (the parts of a
/// multi-valued string) a data set may hold.
///
/// Each becomes a node of the parsed tree of about a hundred bytes, so a
/// file of empty elements or of backslashes would otherwise cost some twenty
/// times its size. A chest radiograph holds a few hundred; 100,000 bounds the
/// tree to some tens of MiB.
pub const MAX_DATA_SET_NODES: u64 = 100_000;

/// The value of an undefined length.
const UNDEFINED: u32 = u32::MAX;

const ITEM: Tag = Tag(0xFFFE, 0xE000);
const ITEM_DELIMITER: Tag = Tag(0xFFFE, 0xE00D);
const SEQUENCE_DELIMITER: Tag = Tag(0xFFFE, 0xE0DD);
const PIXEL_DATA: Tag = Tag(0x7FE0, 0x0010);
const GROUP_LENGTH: Tag = Tag(0x0002, 0x0000);
const TRANSFER_SYNTAX: Tag = Tag(0x0002, 0x0010);

/// Longest Transfer Syntax UID read from the file meta group (a UID has at
/// most 64 characters).
const MAX_UID_LEN: u32 = 64;

/// How a data set is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Encoding {
    explicit_vr: bool,
    big_endian: bool,
}

impl Encoding {
    /// The file meta group's encoding (PS3.10 7.1).
    const EXPLICIT_LE: Encoding = Encoding {
        explicit_vr: true,
        big_endian: false,
    };

    fn u16(self, b: [u8; 2]) -> u16 {
        if self.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    }

    fn u32(self, b: [u8; 4]) -> u32 {
        if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    }

    fn tag(self, b: [u8; 4]) -> Tag {
        Tag(self.u16([b[0], b[1]]), self.u16([b[2], b[3]]))
    }
}

/// How the data set of a transfer syntax is read.
enum DataSetCoding {
    Plain(Encoding),
    Deflated,
}

fn coding_for(uid: &str) -> Result<DataSetCoding> {
    let uid = uid.trim_end_matches(['\0', ' ']);
    let ts =
        TransferSyntaxRegistry
            .get(uid)
            .ok_or_else(|| DicomError::UnsupportedTransferSyntax {
                uid: uid.to_owned(),
                name: "unknown".to_owned(),
            })?;
    match ts.codec() {
        Codec::Dataset(Some(_)) => Ok(DataSetCoding::Deflated),
        Codec::Dataset(None) => Err(DicomError::UnsupportedTransferSyntax {
            uid: ts.uid().to_owned(),
            name: format!("{} (no data set decoder in this build)", ts.name()),
        }),
        _ => Ok(DataSetCoding::Plain(Encoding {
            // Implicit VR Little Endian is the one implicit transfer syntax.
            explicit_vr: ts.uid() != dicom_dictionary_std::uids::IMPLICIT_VR_LITTLE_ENDIAN,
            big_endian: ts.endianness() == Endianness::Big,
        })),
    }
}

/// What the data set a scan passed will cost dicom-rs to hold: the bytes it
/// reads values from and the nodes of the tree it builds. The server admits
/// a parse against its memory budget from this, before parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// Bytes of the data set as dicom-rs reads it: the input's (from the
    /// file meta group on) for a plain encoding, the inflated stream's
    /// (file meta group included) for a deflated one.
    pub data_set_bytes: u64,
    /// Elements, items, fragments and string values (at most
    /// [`MAX_DATA_SET_NODES`]).
    pub nodes: u64,
}

impl Footprint {
    /// What the parsed tree costs per node beyond its values, bytes, at
    /// most (dicom-rs's element header, value enum and map entry).
    pub const BYTES_PER_NODE: u64 = 128;

    /// The memory the parsed data set holds, at most: its bytes plus
    /// [`Footprint::BYTES_PER_NODE`] per node.
    pub fn parsed_bytes(&self) -> u64 {
        self.data_set_bytes
            .saturating_add(self.nodes.saturating_mul(Self::BYTES_PER_NODE))
    }
}

/// Scans a Part 10 input from its file meta group (the bytes after `DICM`)
/// to the end of its data set. `len` is the number of bytes `input` holds.
///
/// # Errors
/// [`DicomError::LengthBeyondInput`], [`DicomError::NestingTooDeep`],
/// [`DicomError::TooManyElements`], [`DicomError::InflatedTooLarge`],
/// [`DicomError::Malformed`], [`DicomError::UnsupportedTransferSyntax`] (a
/// UID dicom-rs does not know), [`DicomError::Io`] (named `name`).
pub(crate) fn scan_part10(
    input: impl Read,
    len: u64,
    limits: &LimitsConfig,
    name: &str,
) -> Result<Footprint> {
    let mut source = Source::new(input, len, None, name);
    let uid = scan_meta(&mut source)?;
    match coding_for(&uid)? {
        DataSetCoding::Plain(encoding) => {
            walk(&mut source, encoding)?;
            Ok(source.footprint())
        }
        DataSetCoding::Deflated => {
            // PS3.5 A.5: the data set after the meta group is a raw deflate
            // stream, as dicom-rs reads it.
            let meta_bytes = source.pos;
            let inflated = flate2::read::DeflateDecoder::new(&mut source.reader);
            let mut inflated = Source::new(
                inflated,
                limits.max_inflated_bytes(),
                Some(uid.clone()),
                name,
            );
            inflated.nodes = source.nodes;
            walk(&mut inflated, Encoding::EXPLICIT_LE)?;
            let mut footprint = inflated.footprint();
            footprint.data_set_bytes = footprint.data_set_bytes.saturating_add(meta_bytes);
            Ok(footprint)
        }
    }
}

/// Scans a bare data set (no file meta group) in the transfer syntax `uid`.
///
/// # Errors
/// As [`scan_part10`].
pub(crate) fn scan_data_set(
    input: impl Read,
    len: u64,
    uid: &str,
    name: &str,
) -> Result<Footprint> {
    let mut source = Source::new(input, len, None, name);
    match coding_for(uid)? {
        DataSetCoding::Plain(encoding) => {
            walk(&mut source, encoding)?;
            Ok(source.footprint())
        }
        // Bare data sets are detected as plain encodings only.
        DataSetCoding::Deflated => Err(DicomError::UnsupportedTransferSyntax {
            uid: uid.to_owned(),
            name: "deflated data set without a file meta group".to_owned(),
        }),
    }
}

/// Where in the structure the walk is, for error messages.
#[derive(Debug, Clone, Copy)]
enum At {
    Element(Tag),
    /// The header that follows an element (or the data set's start).
    HeaderAfter(Option<Tag>),
    Item(Tag),
    Fragment,
    Sequence(Tag),
    MetaGroup,
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = |t: &Tag| format!("({:04X},{:04X})", t.0, t.1);
        match self {
            At::Element(t) => write!(f, "element {}", tag(t)),
            At::HeaderAfter(Some(t)) => write!(f, "the element header after {}", tag(t)),
            At::HeaderAfter(None) => f.write_str("the first element header"),
            At::Item(t) => write!(f, "an item of sequence {}", tag(t)),
            At::Fragment => write!(f, "a fragment of pixel data {}", tag(&PIXEL_DATA)),
            At::Sequence(t) => write!(f, "sequence {}", tag(t)),
            At::MetaGroup => f.write_str("the file meta group (0002,xxxx)"),
        }
    }
}

/// The input as the walk reads it: a position, the most bytes it may hold,
/// and the count of nodes so far.
struct Source<'n, R> {
    reader: R,
    pos: u64,
    /// Bytes the input holds (plain), or the inflation cap (deflated).
    limit: u64,
    /// `Some(transfer syntax)` when `limit` is the inflation cap.
    deflated: Option<String>,
    nodes: u64,
    /// How I/O errors name the input.
    name: &'n str,
}

impl<'n, R: Read> Source<'n, R> {
    fn new(reader: R, limit: u64, deflated: Option<String>, name: &'n str) -> Self {
        Self {
            reader,
            pos: 0,
            limit,
            deflated,
            nodes: 0,
            name,
        }
    }

    /// The bytes read and nodes counted so far.
    fn footprint(&self) -> Footprint {
        Footprint {
            data_set_bytes: self.pos,
            nodes: self.nodes,
        }
    }

    fn io_error(&self, source: io::Error) -> DicomError {
        match &self.deflated {
            Some(_) => DicomError::Malformed {
                at: "the deflated data set (0002,0010)".to_owned(),
                reason: format!("the deflate stream does not inflate: {source}"),
            },
            None => DicomError::Io {
                path: self.name.to_owned(),
                source,
            },
        }
    }

    fn too_large(&self, at: At, end: u64) -> DicomError {
        DicomError::InflatedTooLarge {
            uid: self.deflated.clone().unwrap_or_default(),
            at: at.to_string(),
            end,
            limit: self.limit,
        }
    }

    /// Reads up to `buf.len()` bytes; fewer only at the end of the input.
    fn fill(&mut self, buf: &mut [u8], at: At) -> Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match self.reader.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_error(e)),
            }
        }
        self.pos += n as u64;
        if self.deflated.is_some() && self.pos > self.limit {
            return Err(self.too_large(at, self.pos));
        }
        Ok(n)
    }

    /// Reads exactly `N` bytes of a header; the input ending inside is malformed.
    fn exact<const N: usize>(&mut self, at: At) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        let n = self.fill(&mut buf, at)?;
        if n < N {
            return Err(DicomError::Malformed {
                at: at.to_string(),
                reason: "the input ends inside its header".to_owned(),
            });
        }
        Ok(buf)
    }

    /// Checks that a value of `len` bytes fits in the input and before
    /// `container_end`; returns where it ends.
    fn fits(&self, len: u32, at: At, container_end: Option<u64>) -> Result<u64> {
        let len = u64::from(len);
        let end = self.pos + len;
        if end > self.limit {
            if self.deflated.is_some() {
                return Err(self.too_large(at, end));
            }
            return Err(DicomError::LengthBeyondInput {
                at: at.to_string(),
                declared: len,
                remaining: self.limit.saturating_sub(self.pos),
            });
        }
        if let Some(container) = container_end
            && end > container
        {
            return Err(DicomError::Malformed {
                at: at.to_string(),
                reason: format!(
                    "its {len} bytes overrun the item or sequence that encloses it by {} bytes",
                    end - container
                ),
            });
        }
        Ok(end)
    }

    /// Skips a value of `len` bytes (already checked by [`Source::fits`]),
    /// counting its string values when `multi_valued`.
    fn skip(&mut self, len: u32, at: At, multi_valued: bool) -> Result<()> {
        let mut sink = ValueSink {
            multi_valued,
            backslashes: 0,
        };
        let copied = io::copy(&mut (&mut self.reader).take(u64::from(len)), &mut sink);
        let copied = copied.map_err(|e| self.io_error(e))?;
        self.pos += copied;
        if copied < u64::from(len) {
            return Err(DicomError::Malformed {
                at: at.to_string(),
                reason: format!("declares {len} bytes but the input ends after {copied}"),
            });
        }
        self.count(sink.backslashes, at)
    }

    /// Counts `n` more nodes of the parsed tree.
    fn count(&mut self, n: u64, at: At) -> Result<()> {
        self.nodes += n;
        if self.nodes > MAX_DATA_SET_NODES {
            return Err(DicomError::TooManyElements {
                at: at.to_string(),
                limit: MAX_DATA_SET_NODES,
            });
        }
        Ok(())
    }
}

/// Where skipped values go: nowhere, but the separators of multi-valued
/// strings are counted.
struct ValueSink {
    multi_valued: bool,
    backslashes: u64,
}

impl Write for ValueSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.multi_valued {
            self.backslashes += buf.iter().filter(|&&b| b == b'\\').count() as u64;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Value representations whose values dicom-rs splits at each backslash
/// into a string of its own.
fn is_multi_valued_string(vr: VR) -> bool {
    matches!(
        vr,
        VR::AE
            | VR::AS
            | VR::CS
            | VR::DA
            | VR::DS
            | VR::DT
            | VR::IS
            | VR::LO
            | VR::PN
            | VR::SH
            | VR::TM
            | VR::UC
            | VR::UI
    )
}

/// The size of one value of the VRs dicom-rs reads as binary numbers (or
/// tags); `None` for every other VR.
fn binary_value_size(vr: VR) -> Option<u32> {
    match vr {
        VR::US | VR::SS | VR::OW => Some(2),
        VR::UL | VR::SL | VR::FL | VR::AT | VR::OF | VR::OL => Some(4),
        VR::FD | VR::OD | VR::SV | VR::UV | VR::OV => Some(8),
        _ => None,
    }
}

/// Refuses a binary value whose length is not a whole number of values.
/// dicom-rs reads the whole values and counts the declared length, so the
/// next element's header would be read from inside this value: the
/// structural walk and the parse would frame the input differently, and
/// a length the walk never saw could reach the parser (found by the
/// `dicom_ingest` fuzz target: a 2.5 KB data set with a 6-byte group
/// length, UL, made dicom-rs read a header declaring 4 GiB and fill it).
fn whole_values(header: &Header, at: At) -> Result<()> {
    match binary_value_size(header.vr) {
        Some(size) if !header.len.is_multiple_of(size) => Err(DicomError::Malformed {
            at: at.to_string(),
            reason: format!(
                "{} bytes of {:?} values, not a multiple of {size}",
                header.len, header.vr
            ),
        }),
        _ => Ok(()),
    }
}

/// Value representations whose explicit-VR length field is 16 bits (PS3.5
/// 7.1.2); every other VR, and any unknown code (read as UN), has 2
/// reserved bytes and a 32-bit length.
fn has_short_length(vr: VR) -> bool {
    matches!(
        vr,
        VR::AE
            | VR::AS
            | VR::AT
            | VR::CS
            | VR::DA
            | VR::DS
            | VR::DT
            | VR::FL
            | VR::FD
            | VR::IS
            | VR::LO
            | VR::LT
            | VR::PN
            | VR::SH
            | VR::SL
            | VR::SS
            | VR::ST
            | VR::TM
            | VR::UI
            | VR::UL
            | VR::US
    )
}

/// An element header as dicom-rs decodes it.
#[derive(Debug, Clone, Copy)]
struct Header {
    tag: Tag,
    vr: VR,
    len: u32,
}

/// Reads an element header; `None` when the input ends before a whole tag,
/// which dicom-rs takes as the end of the data set.
fn element_header<R: Read>(
    source: &mut Source<'_, R>,
    encoding: Encoding,
    after: Option<Tag>,
) -> Result<Option<Header>> {
    let at = At::HeaderAfter(after);
    let mut tag = [0u8; 4];
    if source.fill(&mut tag, at)? < 4 {
        return Ok(None);
    }
    let tag = encoding.tag(tag);
    let at = At::Element(tag);
    if !encoding.explicit_vr {
        let len = encoding.u32(source.exact::<4>(at)?);
        // As dicom-rs's implicit VR decoder: Pixel Data and Overlay Data are
        // OW, every other VR comes from the standard dictionary.
        let vr = if tag == PIXEL_DATA || (tag.0 >> 8 == 0x60 && tag.1 == 0x3000) {
            VR::OW
        } else {
            StandardDataDictionary
                .by_tag(tag)
                .map_or(VR::UN, |entry| entry.vr().relaxed())
        };
        return Ok(Some(Header { tag, vr, len }));
    }
    if tag.0 == 0xFFFE {
        // Items and delimiters have no VR.
        let len = encoding.u32(source.exact::<4>(at)?);
        return Ok(Some(Header {
            tag,
            vr: VR::UN,
            len,
        }));
    }
    let code = source.exact::<2>(at)?;
    let vr = VR::from_binary(code).unwrap_or(VR::UN);
    let len = if has_short_length(vr) {
        u32::from(encoding.u16(source.exact::<2>(at)?))
    } else {
        let field = source.exact::<6>(at)?;
        encoding.u32([field[2], field[3], field[4], field[5]])
    };
    Ok(Some(Header { tag, vr, len }))
}

/// Walks the file meta group (explicit VR little endian, as long as its
/// group length says); returns the Transfer Syntax UID.
fn scan_meta<R: Read>(source: &mut Source<'_, R>) -> Result<String> {
    let malformed = |reason: &str| DicomError::Malformed {
        at: At::MetaGroup.to_string(),
        reason: reason.to_owned(),
    };
    let first = element_header(source, Encoding::EXPLICIT_LE, None)?
        .ok_or_else(|| malformed("the input ends before the file meta group"))?;
    if first.tag != GROUP_LENGTH || first.len != 4 {
        return Err(malformed(
            "it must open with its 4-byte group length (0002,0000)",
        ));
    }
    let group_length = u64::from(u32::from_le_bytes(
        source.exact::<4>(At::Element(GROUP_LENGTH))?,
    ));
    let start = source.pos;
    let mut transfer_syntax = None;
    let mut last = GROUP_LENGTH;
    // As dicom-rs: elements are read while fewer than the group length's
    // bytes have been, whatever their group.
    while source.pos - start < group_length {
        let header = element_header(source, Encoding::EXPLICIT_LE, Some(last))?
            .ok_or_else(|| malformed("the input ends inside the file meta group"))?;
        let at = At::Element(header.tag);
        source.count(1, at)?;
        if header.len == UNDEFINED {
            return Err(DicomError::Malformed {
                at: at.to_string(),
                reason: "an undefined length in the file meta group".to_owned(),
            });
        }
        source.fits(header.len, at, None)?;
        if header.tag == TRANSFER_SYNTAX {
            if header.len > MAX_UID_LEN {
                return Err(DicomError::InvalidAttribute {
                    keyword: "TransferSyntaxUID",
                    tag: "(0002,0010)",
                    reason: format!("{} bytes, a UID has at most {MAX_UID_LEN}", header.len),
                });
            }
            let mut uid = vec![0u8; header.len as usize];
            if source.fill(&mut uid, at)? < uid.len() {
                return Err(malformed("the input ends inside the Transfer Syntax UID"));
            }
            transfer_syntax = Some(String::from_utf8_lossy(&uid).into_owned());
        } else {
            source.skip(header.len, at, false)?;
        }
        last = header.tag;
    }
    transfer_syntax.ok_or(DicomError::MissingAttribute {
        keyword: "TransferSyntaxUID",
        tag: "(0002,0010)",
    })
}

/// What an open container expects next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A sequence: item headers or its delimiter.
    Sequence,
    /// Encapsulated pixel data: fragments (items of defined length) or its
    /// delimiter.
    PixelSequence,
    /// An item: element headers, or its delimiter.
    Item,
}

/// An open sequence or item.
#[derive(Debug, Clone, Copy)]
struct Frame {
    kind: Kind,
    /// The sequence's tag (for an item, its sequence's).
    tag: Tag,
    /// Where it ends, when its length is defined.
    end: Option<u64>,
    /// The nearest end of it or of any container around it.
    bound: Option<u64>,
}

/// The nearer of two optional ends.
fn nearer(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// Walks a data set to its end, iteratively, with dicom-rs's reading rules
/// (`dicom_parser::dataset::read::DataSetReader`).
fn walk<R: Read>(source: &mut Source<'_, R>, encoding: Encoding) -> Result<()> {
    // Open containers, innermost last; empty: the top-level data set.
    let mut stack: Vec<Frame> = Vec::new();
    let mut depth = 0usize;
    let mut last: Option<Tag> = None;
    loop {
        // Close the containers of defined length that end here.
        while let Some(frame) = stack.last().copied() {
            let Some(end) = frame.end else { break };
            if source.pos < end {
                break;
            }
            if source.pos > end {
                let at = match frame.kind {
                    Kind::Item => At::Item(frame.tag),
                    _ => At::Sequence(frame.tag),
                };
                return Err(DicomError::Malformed {
                    at: at.to_string(),
                    reason: format!(
                        "its content runs {} bytes past its declared length",
                        source.pos - end
                    ),
                });
            }
            if frame.kind != Kind::Item {
                depth -= 1;
            }
            stack.pop();
        }
        let top = stack.last().copied();
        let bound = top.and_then(|f| f.bound);
        match top {
            Some(frame) if frame.kind != Kind::Item => {
                let at = if frame.kind == Kind::PixelSequence {
                    At::Fragment
                } else {
                    At::Item(frame.tag)
                };
                let mut header = [0u8; 8];
                if source.fill(&mut header, at)? < 8 {
                    if frame.kind == Kind::PixelSequence {
                        // dicom-rs takes the end of the input inside pixel
                        // data as the end of the object.
                        return Ok(());
                    }
                    return Err(DicomError::Malformed {
                        at: At::Sequence(frame.tag).to_string(),
                        reason: "the input ends inside the sequence".to_owned(),
                    });
                }
                let tag = encoding.tag([header[0], header[1], header[2], header[3]]);
                let len = encoding.u32([header[4], header[5], header[6], header[7]]);
                match tag {
                    ITEM => {
                        source.count(1, at)?;
                        if frame.kind == Kind::PixelSequence {
                            if len == UNDEFINED {
                                return Err(DicomError::Malformed {
                                    at: at.to_string(),
                                    reason: "a fragment of undefined length".to_owned(),
                                });
                            }
                            source.fits(len, at, bound)?;
                            source.skip(len, at, false)?;
                        } else {
                            let end = if len == UNDEFINED {
                                None
                            } else {
                                Some(source.fits(len, at, bound)?)
                            };
                            stack.push(Frame {
                                kind: Kind::Item,
                                tag: frame.tag,
                                end,
                                bound: nearer(end, bound),
                            });
                        }
                    }
                    SEQUENCE_DELIMITER => {
                        stack.pop();
                        depth -= 1;
                    }
                    other => {
                        return Err(DicomError::Malformed {
                            at: At::Sequence(frame.tag).to_string(),
                            reason: format!(
                                "({:04X},{:04X}) where an item or the sequence delimiter belongs",
                                other.0, other.1
                            ),
                        });
                    }
                }
            }
            _ => {
                let Some(header) = element_header(source, encoding, last)? else {
                    // dicom-rs takes the end of the input at an element
                    // boundary as the end of the data set.
                    return Ok(());
                };
                let at = At::Element(header.tag);
                last = Some(header.tag);
                source.count(1, at)?;
                let opens = if header.vr == VR::SQ {
                    Some(Kind::Sequence)
                } else if header.tag == ITEM_DELIMITER {
                    // Closes the item; ignored outside any sequence.
                    if top.is_some() {
                        stack.pop();
                    }
                    continue;
                } else if header.len == UNDEFINED {
                    // dicom-rs: encapsulated pixel data, or any other element
                    // of undefined length read as a sequence.
                    Some(if header.tag == PIXEL_DATA {
                        Kind::PixelSequence
                    } else {
                        Kind::Sequence
                    })
                } else {
                    None
                };
                match opens {
                    Some(kind) => {
                        depth += 1;
                        if depth > MAX_SEQUENCE_DEPTH {
                            return Err(DicomError::NestingTooDeep {
                                at: At::Sequence(header.tag).to_string(),
                                limit: MAX_SEQUENCE_DEPTH,
                            });
                        }
                        let end = if header.len == UNDEFINED {
                            None
                        } else {
                            Some(source.fits(header.len, at, bound)?)
                        };
                        stack.push(Frame {
                            kind,
                            tag: header.tag,
                            end,
                            bound: nearer(end, bound),
                        });
                    }
                    None => {
                        whole_values(&header, at)?;
                        source.fits(header.len, at, bound)?;
                        source.skip(header.len, at, is_multi_valued_string(header.vr))?;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
    const IMPLICIT_LE: &str = "1.2.840.10008.1.2";

    fn element(out: &mut Vec<u8>, tag: (u16, u16), vr: &[u8; 2], value: &[u8]) {
        out.extend_from_slice(&tag.0.to_le_bytes());
        out.extend_from_slice(&tag.1.to_le_bytes());
        out.extend_from_slice(vr);
        if has_short_length(VR::from_binary(*vr).unwrap_or(VR::UN)) {
            out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        } else {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(value);
    }

    fn header(out: &mut Vec<u8>, tag: (u16, u16), vr: &[u8; 2], len: u32) {
        out.extend_from_slice(&tag.0.to_le_bytes());
        out.extend_from_slice(&tag.1.to_le_bytes());
        out.extend_from_slice(vr);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&len.to_le_bytes());
    }

    fn item(out: &mut Vec<u8>, tag: u16, len: u32) {
        out.extend_from_slice(&0xFFFEu16.to_le_bytes());
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    }

    fn scan(bytes: &[u8], uid: &str) -> Result<()> {
        scan_data_set(bytes, bytes.len() as u64, uid, "test").map(|_| ())
    }

    #[test]
    fn a_binary_value_of_a_partial_value_length_is_refused() {
        // Implicit VR: a group length (UL) of 6 bytes. dicom-rs would read
        // 4 and take the next header from the last 2 plus what follows.
        let implicit = |len: u32| {
            let mut d = Vec::new();
            d.extend_from_slice(&[0x08, 0, 0, 0]);
            d.extend_from_slice(&len.to_le_bytes());
            d.extend(std::iter::repeat_n(b'1', len as usize));
            d.extend_from_slice(&[0x08, 0, 0x16, 0]);
            d.extend_from_slice(&4u32.to_le_bytes());
            d.extend_from_slice(b"1.2\0");
            d
        };
        assert!(scan(&implicit(4), IMPLICIT_LE).is_ok());
        let refused = scan(&implicit(6), IMPLICIT_LE);
        assert!(
            matches!(&refused, Err(DicomError::Malformed { reason, .. }) if reason.contains("not a multiple of 4")),
            "{refused:?}"
        );
        // Explicit VR: Rows (US) of 3 bytes.
        let mut d = Vec::new();
        element(&mut d, (0x0028, 0x0010), b"US", &[1, 0, 0]);
        assert!(matches!(
            scan(&d, EXPLICIT_LE),
            Err(DicomError::Malformed { .. })
        ));
    }

    #[test]
    fn a_well_formed_data_set_passes() {
        let mut d = Vec::new();
        element(&mut d, (0x0008, 0x0060), b"CS", b"CR");
        header(&mut d, (0x0008, 0x1140), b"SQ", UNDEFINED);
        item(&mut d, 0xE000, UNDEFINED);
        element(&mut d, (0x0008, 0x1150), b"UI", b"1.2.3\0");
        item(&mut d, 0xE00D, 0);
        item(&mut d, 0xE0DD, 0);
        header(&mut d, (0x7FE0, 0x0010), b"OB", UNDEFINED);
        item(&mut d, 0xE000, 0);
        item(&mut d, 0xE000, 4);
        d.extend_from_slice(&[1, 2, 3, 4]);
        item(&mut d, 0xE0DD, 0);
        scan(&d, EXPLICIT_LE).expect("well formed");
    }

    #[test]
    fn a_length_beyond_the_input_names_the_element() {
        let mut d = Vec::new();
        element(&mut d, (0x0028, 0x0010), b"US", &[4, 0]);
        header(&mut d, (0x7FE0, 0x0010), b"OW", 0xFFFF_FFF0);
        d.extend_from_slice(&[0; 300]);
        let err = scan(&d, EXPLICIT_LE).expect_err("lying length");
        assert_eq!(
            err.to_string(),
            "element (7FE0,0010) declares 4294967280 bytes but only 300 remain"
        );
    }

    #[test]
    fn lengths_are_checked_against_their_container() {
        let mut d = Vec::new();
        header(&mut d, (0x0008, 0x1140), b"SQ", 20);
        item(&mut d, 0xE000, 12);
        element(&mut d, (0x0008, 0x1150), b"UI", &[b'1'; 10]);
        d.extend_from_slice(&[0; 64]);
        let err = scan(&d, EXPLICIT_LE).expect_err("overrun");
        assert!(err.to_string().contains("element (0008,1150)"), "{err}");
        assert!(err.to_string().contains("overrun"), "{err}");
    }

    #[test]
    fn nesting_is_bounded_without_recursion() {
        // Far deeper than any stack would survive if the walk recursed.
        let mut d = Vec::new();
        for _ in 0..100_000 {
            header(&mut d, (0x0040, 0xA730), b"SQ", UNDEFINED);
            item(&mut d, 0xE000, UNDEFINED);
        }
        let err = scan(&d, EXPLICIT_LE).expect_err("too deep");
        assert!(matches!(err, DicomError::NestingTooDeep { .. }), "{err}");
        assert!(err.to_string().contains("(0040,A730)"), "{err}");
        // Exactly at the limit passes.
        let mut d = Vec::new();
        for _ in 0..MAX_SEQUENCE_DEPTH {
            header(&mut d, (0x0040, 0xA730), b"SQ", UNDEFINED);
            item(&mut d, 0xE000, UNDEFINED);
        }
        for _ in 0..MAX_SEQUENCE_DEPTH {
            item(&mut d, 0xE00D, 0);
            item(&mut d, 0xE0DD, 0);
        }
        scan(&d, EXPLICIT_LE).expect("at the limit");
    }

    #[test]
    fn implicit_vr_sequences_come_from_the_dictionary() {
        // (0008,1140) is SQ in the dictionary; its defined length is walked
        // into, and the lying length inside is found.
        let mut d = Vec::new();
        d.extend_from_slice(&0x0008u16.to_le_bytes());
        d.extend_from_slice(&0x1140u16.to_le_bytes());
        d.extend_from_slice(&24u32.to_le_bytes());
        item(&mut d, 0xE000, 16);
        d.extend_from_slice(&0x0008u16.to_le_bytes());
        d.extend_from_slice(&0x1150u16.to_le_bytes());
        d.extend_from_slice(&0x7FFF_FFFFu32.to_le_bytes());
        d.extend_from_slice(&[0; 8]);
        let err = scan(&d, IMPLICIT_LE).expect_err("lying inner length");
        assert!(err.to_string().contains("(0008,1150)"), "{err}");
    }

    #[test]
    fn multi_valued_strings_count_towards_the_node_limit() {
        let mut d = Vec::new();
        let many = vec![b'\\'; MAX_DATA_SET_NODES as usize + 1];
        element(&mut d, (0x0018, 0x1164), b"UN", &[]);
        header(&mut d, (0x0020, 0x0037), b"UC", many.len() as u32);
        d.extend_from_slice(&many);
        let err = scan(&d, EXPLICIT_LE).expect_err("too many values");
        assert!(matches!(err, DicomError::TooManyElements { .. }), "{err}");
        assert!(err.to_string().contains("(0020,0037)"), "{err}");
    }

    #[test]
    fn fragments_of_undefined_length_and_stray_tags_are_refused() {
        let mut d = Vec::new();
        header(&mut d, (0x7FE0, 0x0010), b"OB", UNDEFINED);
        item(&mut d, 0xE000, UNDEFINED);
        let err = scan(&d, EXPLICIT_LE).expect_err("undefined fragment");
        assert!(err.to_string().contains("undefined length"), "{err}");
        let mut d = Vec::new();
        header(&mut d, (0x0008, 0x1140), b"SQ", UNDEFINED);
        element(&mut d, (0x0008, 0x1150), b"UI", b"1.2\0");
        let err = scan(&d, EXPLICIT_LE).expect_err("element in sequence");
        assert!(err.to_string().contains("sequence (0008,1140)"), "{err}");
    }

    #[test]
    fn deflated_data_sets_are_capped_while_inflating() {
        use std::io::Write as _;
        let mut meta_value = Vec::new();
        let uid = b"1.2.840.10008.1.2.1.99";
        element(&mut meta_value, (0x0002, 0x0010), b"UI", uid);
        let mut file = Vec::new();
        element(
            &mut file,
            (0x0002, 0x0000),
            b"UL",
            &(meta_value.len() as u32).to_le_bytes(),
        );
        file.extend_from_slice(&meta_value);
        // 3 MiB of zeros in a private OB element, with a 1 MiB cap.
        let mut data = Vec::new();
        header(&mut data, (0x0009, 0x1010), b"OB", 3 << 20);
        let mut encoder =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&data).expect("deflate");
        encoder.write_all(&vec![0u8; 3 << 20]).expect("deflate");
        file.extend_from_slice(&encoder.finish().expect("deflate"));
        let limits = LimitsConfig {
            max_inflated_mib: 1,
            ..LimitsConfig::default()
        };
        let err = scan_part10(&file[..], file.len() as u64, &limits, "t").expect_err("cap");
        assert!(matches!(err, DicomError::InflatedTooLarge { .. }), "{err}");
        assert!(err.to_string().contains("(0009,1010)"), "{err}");
        let roomy = LimitsConfig {
            max_inflated_mib: 4,
            ..LimitsConfig::default()
        };
        let footprint =
            scan_part10(&file[..], file.len() as u64, &roomy, "t").expect("under the cap");
        // The inflated length, not the file's: the meta group, the OB
        // header and its 3 MiB; one node for each element.
        assert_eq!(
            footprint.data_set_bytes,
            (12 + meta_value.len() + 12 + (3 << 20)) as u64
        );
        assert!((1..=3).contains(&footprint.nodes), "{footprint:?}");
        assert!(footprint.parsed_bytes() > 3 << 20);
    }
}
