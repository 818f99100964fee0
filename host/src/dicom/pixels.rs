//! Pixels: frame 1 of Pixel Data (7FE0,0010) → stored values.
//!
//! Stored values are the integers the modality wrote, before the modality
//! LUT: Bits Allocated / Bits Stored / High Bit / Pixel Representation are
//! honoured (unused high bits masked off, two's complement sign-extended).
//!
//! | transfer syntax                        | decoder                              |
//! |----------------------------------------|--------------------------------------|
//! | implicit/explicit VR LE, explicit BE, deflated | read directly (dicom-object)  |
//! | RLE lossless                           | dicom-rs (`dicom-transfer-syntax-registry`) |
//! | JPEG baseline, extended 12-bit, lossless (14, SV1) | libjpeg-turbo 3 ([`super::jpeg`]) |
//! | JPEG-LS lossless and near-lossless     | CharLS, through dicom-rs             |
//! | JPEG 2000 lossless and lossy, HTJ2K    | OpenJPEG, through `jpeg2k`           |
//!
//! Compressed streams are checked before decoding: the image size a stream
//! declares must equal Rows × Columns, so a hostile stream cannot make a
//! decoder allocate more than the (size-limited) header allows.

use std::borrow::Cow;

use dicom_core::value::{PrimitiveValue, Value};
use dicom_dictionary_std::{tags, uids};
use dicom_encoding::TransferSyntaxIndex;
use dicom_encoding::adapters::PixelDataObject;
use dicom_encoding::transfer_syntax::Codec;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::header::Geometry;
use super::read::DicomFile;
use super::{DicomError, Result, jpeg};
use crate::guard::no_panic;

/// Frame 1 as stored values, row-major.
#[derive(Debug, Clone)]
pub struct StoredFrame {
    /// Rows.
    pub rows: u32,
    /// Columns.
    pub columns: u32,
    /// rows × columns stored values.
    pub values: Vec<i32>,
}

/// How a transfer syntax's pixel data is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decoder {
    Native { big_endian: bool },
    Rle,
    Jpeg,
    JpegLs,
    Jpeg2000,
}

fn decoder_for(ts: &str) -> Option<Decoder> {
    Some(match ts {
        uids::IMPLICIT_VR_LITTLE_ENDIAN
        | uids::EXPLICIT_VR_LITTLE_ENDIAN
        | uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN => Decoder::Native { big_endian: false },
        super::read::EXPLICIT_VR_BIG_ENDIAN => Decoder::Native { big_endian: true },
        uids::RLE_LOSSLESS => Decoder::Rle,
        uids::JPEG_BASELINE8_BIT
        | uids::JPEG_EXTENDED12_BIT
        | uids::JPEG_LOSSLESS
        | uids::JPEG_LOSSLESS_SV1 => Decoder::Jpeg,
        uids::JPEGLS_LOSSLESS | uids::JPEGLS_NEAR_LOSSLESS => Decoder::JpegLs,
        uids::JPEG2000_LOSSLESS
        | uids::JPEG2000
        | uids::HTJ2K_LOSSLESS
        | uids::HTJ2K_LOSSLESS_RPCL
        | uids::HTJ2K => Decoder::Jpeg2000,
        _ => return None,
    })
}

/// Whether lossy compression may have been applied under this transfer syntax.
pub fn is_lossy_transfer_syntax(ts: &str) -> bool {
    matches!(
        ts,
        uids::JPEG_BASELINE8_BIT
            | uids::JPEG_EXTENDED12_BIT
            | uids::JPEGLS_NEAR_LOSSLESS
            | uids::JPEG2000
            | uids::HTJ2K
    )
}

/// Decodes frame 1 of `file` into stored values.
///
/// # Errors
/// [`DicomError::UnsupportedTransferSyntax`], [`DicomError::InvalidPixelData`]
/// (short or misplaced pixel data), [`DicomError::CorruptStream`].
pub fn decode_first_frame(file: &DicomFile, geometry: &Geometry) -> Result<StoredFrame> {
    let ts = file.transfer_syntax();
    let decoder = decoder_for(ts).ok_or_else(|| DicomError::UnsupportedTransferSyntax {
        uid: ts.to_owned(),
        name: TransferSyntaxRegistry
            .get(ts)
            .map_or_else(|| "unknown".to_owned(), |t| t.name().to_owned()),
    })?;
    let values = match decoder {
        Decoder::Native { big_endian } => native(file, geometry, big_endian)?,
        Decoder::Jpeg => {
            let stream = encapsulated_frame(file)?;
            let decoded = no_panic("JPEG decoder", || {
                jpeg::decode(&stream, geometry.rows, geometry.columns)
            })
            .map_err(|reason| DicomError::CorruptStream {
                codec: "JPEG",
                reason,
            })??;
            let mut values = decoded;
            correct_unused_bits(&mut values, geometry);
            values
        }
        Decoder::Rle => {
            let bytes = registry_decode(file, "RLE")?;
            let mut values = from_bytes(&bytes, geometry, false, "RLE")?;
            correct_unused_bits(&mut values, geometry);
            values
        }
        Decoder::JpegLs => {
            let stream = encapsulated_frame(file)?;
            check_jpeg_ls_size(&stream, geometry)?;
            let bytes = registry_decode(file, "JPEG-LS")?;
            let mut values = from_bytes(&bytes, geometry, false, "JPEG-LS")?;
            // JPEG-LS has no notion of sign: signed data comes back unsigned.
            if geometry.signed {
                let precision = jpeg_ls_precision(&stream).unwrap_or(geometry.bits_stored.into());
                reinterpret(&mut values, precision, true);
            }
            values
        }
        Decoder::Jpeg2000 => {
            let stream = encapsulated_frame(file)?;
            jpeg2000(&stream, geometry)?
        }
    };
    Ok(StoredFrame {
        rows: geometry.rows,
        columns: geometry.columns,
        values,
    })
}

/// Native (uncompressed) pixel data: frame 1 is the first rows×columns samples.
fn native(file: &DicomFile, g: &Geometry, big_endian: bool) -> Result<Vec<i32>> {
    let element = file
        .object()
        .get(tags::PIXEL_DATA)
        .ok_or(DicomError::MissingAttribute {
            keyword: "PixelData",
            tag: "(7FE0,0010)",
        })?;
    let value = match element.value() {
        Value::Primitive(p) => p,
        Value::PixelSequence(_) => {
            return Err(DicomError::InvalidPixelData {
                reason: "encapsulated fragments under a native transfer syntax".to_owned(),
            });
        }
        Value::Sequence(_) => {
            return Err(DicomError::InvalidPixelData {
                reason: "a sequence, not pixel data".to_owned(),
            });
        }
    };
    let mut values = match (value, g.bits_allocated) {
        // OW already decoded to native 16-bit words by the parser.
        (PrimitiveValue::U16(words), 16) => {
            let n = g.pixels();
            check_len(words.len(), n, "16-bit words")?;
            words[..n]
                .iter()
                .map(|&w| {
                    if g.signed {
                        i32::from(w as i16)
                    } else {
                        i32::from(w)
                    }
                })
                .collect()
        }
        (PrimitiveValue::U8(bytes), _) => from_bytes(bytes, g, big_endian, "native")?,
        // Anything else the parser produced: its bytes in this machine's order.
        (other, _) => {
            let bytes: Cow<'_, [u8]> = other.to_bytes();
            from_bytes(&bytes, g, cfg!(target_endian = "big"), "native")?
        }
    };
    correct_unused_bits(&mut values, g);
    Ok(values)
}

fn check_len(have: usize, need: usize, unit: &str) -> Result<()> {
    if have < need {
        return Err(DicomError::InvalidPixelData {
            reason: format!("{have} {unit}, frame 1 needs {need}"),
        });
    }
    Ok(())
}

/// Reads frame 1 from a byte buffer of `bits_allocated`-sized samples.
fn from_bytes(bytes: &[u8], g: &Geometry, big_endian: bool, what: &str) -> Result<Vec<i32>> {
    let n = g.pixels();
    let unit = || format!("bytes of {what} pixel data");
    Ok(match g.bits_allocated {
        1 => {
            check_len(bytes.len(), n.div_ceil(8), &unit())?;
            (0..n)
                .map(|i| i32::from((bytes[i / 8] >> (i % 8)) & 1))
                .collect()
        }
        8 => {
            check_len(bytes.len(), n, &unit())?;
            bytes[..n]
                .iter()
                .map(|&b| {
                    if g.signed {
                        i32::from(b as i8)
                    } else {
                        i32::from(b)
                    }
                })
                .collect()
        }
        16 => {
            check_len(bytes.len(), n * 2, &unit())?;
            bytes[..n * 2]
                .chunks_exact(2)
                .map(|c| {
                    let w = if big_endian {
                        u16::from_be_bytes([c[0], c[1]])
                    } else {
                        u16::from_le_bytes([c[0], c[1]])
                    };
                    if g.signed {
                        i32::from(w as i16)
                    } else {
                        i32::from(w)
                    }
                })
                .collect()
        }
        32 => {
            check_len(bytes.len(), n * 4, &unit())?;
            bytes[..n * 4]
                .chunks_exact(4)
                .map(|c| {
                    let b = [c[0], c[1], c[2], c[3]];
                    let w = if big_endian {
                        u32::from_be_bytes(b)
                    } else {
                        u32::from_le_bytes(b)
                    };
                    if g.signed {
                        Ok(w as i32)
                    } else {
                        i32::try_from(w).map_err(|_| DicomError::InvalidPixelData {
                            reason: format!("32-bit unsigned stored value {w} is above 2^31 - 1"),
                        })
                    }
                })
                .collect::<Result<_>>()?
        }
        other => {
            return Err(DicomError::InvalidAttribute {
                keyword: "BitsAllocated",
                tag: "(0028,0100)",
                reason: format!("{other}"),
            });
        }
    })
}

/// Keeps only the Bits Stored bits ending at High Bit, sign-extended when
/// Pixel Representation is 1 (PS3.5 8.1.1: the other bits are undefined).
fn correct_unused_bits(values: &mut [i32], g: &Geometry) {
    let shift = u32::from(g.high_bit) + 1 - u32::from(g.bits_stored);
    if shift == 0 && g.bits_stored == g.bits_allocated {
        return;
    }
    let bits = u32::from(g.bits_stored);
    for v in values.iter_mut() {
        *v = ((*v as u32) >> shift) as i32;
    }
    reinterpret(values, bits, g.signed);
}

/// Reinterprets each value as a `bits`-bit integer: masked to `bits` when
/// unsigned, sign-extended from bit `bits − 1` when signed.
fn reinterpret(values: &mut [i32], bits: u32, signed: bool) {
    if bits >= 32 {
        return;
    }
    let unused = 32 - bits;
    for v in values.iter_mut() {
        *v = if signed {
            (*v << unused) >> unused
        } else {
            ((*v as u32) << unused >> unused) as i32
        };
    }
}

/// The encoded bytes of frame 1 of encapsulated pixel data.
fn encapsulated_frame(file: &DicomFile) -> Result<Cow<'_, [u8]>> {
    match file.object().get(tags::PIXEL_DATA).map(|e| e.value()) {
        Some(Value::PixelSequence(seq)) if !seq.fragments().is_empty() => {}
        Some(Value::PixelSequence(_)) => {
            return Err(DicomError::InvalidPixelData {
                reason: "encapsulated pixel data has no fragments".to_owned(),
            });
        }
        Some(_) => {
            return Err(DicomError::InvalidPixelData {
                reason: "native pixel data under a compressed transfer syntax".to_owned(),
            });
        }
        None => {
            return Err(DicomError::MissingAttribute {
                keyword: "PixelData",
                tag: "(7FE0,0010)",
            });
        }
    }
    file.object()
        .frame_pixel_data(0)
        .ok_or_else(|| DicomError::InvalidPixelData {
            reason: "frame 1 cannot be located in the fragments (offset table)".to_owned(),
        })
}

/// Decodes frame 1 with the dicom-rs codec registered for the file's transfer syntax.
fn registry_decode(file: &DicomFile, codec: &'static str) -> Result<Vec<u8>> {
    let ts = TransferSyntaxRegistry
        .get(file.transfer_syntax())
        .ok_or_else(|| DicomError::UnsupportedTransferSyntax {
            uid: file.transfer_syntax().to_owned(),
            name: "unknown".to_owned(),
        })?;
    let Codec::EncapsulatedPixelData(Some(reader), _) = ts.codec() else {
        return Err(DicomError::UnsupportedTransferSyntax {
            uid: ts.uid().to_owned(),
            name: format!("{} (no decoder in this build)", ts.name()),
        });
    };
    let mut out = Vec::new();
    no_panic(codec, || reader.decode_frame(file.object(), 0, &mut out))
        .map_err(|reason| DicomError::CorruptStream { codec, reason })?
        .map_err(|e| DicomError::CorruptStream {
            codec,
            reason: e.to_string().replace('\n', " "),
        })?;
    Ok(out)
}

/// The JPEG-LS frame header (SOF55): (precision, rows, columns).
fn jpeg_ls_sof(stream: &[u8]) -> Option<(u32, u32, u32)> {
    let at = stream.windows(2).position(|w| w == [0xFF, 0xF7])?;
    let sof = stream.get(at + 4..at + 9)?;
    Some((
        u32::from(sof[0]),
        u32::from(u16::from_be_bytes([sof[1], sof[2]])),
        u32::from(u16::from_be_bytes([sof[3], sof[4]])),
    ))
}

fn jpeg_ls_precision(stream: &[u8]) -> Option<u32> {
    jpeg_ls_sof(stream).map(|(p, _, _)| p)
}

fn check_jpeg_ls_size(stream: &[u8], g: &Geometry) -> Result<()> {
    let (_, rows, columns) = jpeg_ls_sof(stream).ok_or_else(|| DicomError::CorruptStream {
        codec: "JPEG-LS",
        reason: "no frame header (SOF55)".to_owned(),
    })?;
    if rows != g.rows || columns != g.columns {
        return Err(DicomError::CorruptStream {
            codec: "JPEG-LS",
            reason: format!(
                "stream is {columns}x{rows} pixels, the header says {}x{}",
                g.columns, g.rows
            ),
        });
    }
    Ok(())
}

/// The JPEG 2000 image and tile size marker (SIZ): (width, height, components).
fn j2k_siz(stream: &[u8]) -> Option<(u32, u32, u32)> {
    // A raw codestream starts with SOC (FF4F) then SIZ (FF51); a JP2 file
    // wraps it in boxes, so look for the pair rather than assume offset 0.
    let search = &stream[..stream.len().min(64 * 1024)];
    let at = search
        .windows(4)
        .position(|w| w == [0xFF, 0x4F, 0xFF, 0x51])?;
    // After the marker: Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz,
    // XTOsiz, YTOsiz (16/32-bit big-endian), then Csiz.
    let siz = stream.get(at + 6..at + 42)?;
    let be32 = |i: usize| u32::from_be_bytes([siz[i], siz[i + 1], siz[i + 2], siz[i + 3]]);
    let (xsiz, ysiz, x0, y0) = (be32(2), be32(6), be32(10), be32(14));
    let csiz = u32::from(u16::from_be_bytes([siz[34], siz[35]]));
    Some((xsiz.checked_sub(x0)?, ysiz.checked_sub(y0)?, csiz))
}

fn jpeg2000(stream: &[u8], g: &Geometry) -> Result<Vec<i32>> {
    let corrupt = |reason: String| DicomError::CorruptStream {
        codec: "JPEG 2000",
        reason,
    };
    let (width, height, components) =
        j2k_siz(stream).ok_or_else(|| corrupt("no SIZ marker after SOC".to_owned()))?;
    if width != g.columns || height != g.rows {
        return Err(corrupt(format!(
            "stream is {width}x{height} pixels, the header says {}x{}",
            g.columns, g.rows
        )));
    }
    if components != 1 {
        return Err(corrupt(format!(
            "{components} components; a grayscale image has 1"
        )));
    }
    let params = jpeg2k::DecodeParameters::new().strict(true);
    let image = no_panic("JPEG 2000 decoder", || {
        jpeg2k::Image::from_bytes_with(stream, params)
    })
    .map_err(corrupt)?
    .map_err(|e| corrupt(e.to_string()))?;
    let component = image
        .components()
        .first()
        .ok_or_else(|| corrupt("no image component".to_owned()))?;
    let data = component.data();
    if component.width() != g.columns || component.height() != g.rows || data.len() != g.pixels() {
        return Err(corrupt(format!(
            "decoded {}x{} samples, expected {}x{}",
            component.width(),
            component.height(),
            g.columns,
            g.rows
        )));
    }
    let mut values = data.to_vec();
    // Streams whose signedness disagrees with Pixel Representation are common
    // (encoders that ignore it): reinterpret the samples' bits as the header says.
    if component.is_signed() != g.signed {
        reinterpret(&mut values, component.precision(), g.signed);
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(bits_allocated: u16, bits_stored: u16, high_bit: u16, signed: bool) -> Geometry {
        Geometry {
            rows: 1,
            columns: 2,
            frames: 1,
            bits_allocated,
            bits_stored,
            high_bit,
            signed,
            monochrome1: false,
        }
    }

    #[test]
    fn unused_bits_are_masked_or_sign_extended() {
        // 12 bits stored in 16: an overlay bit set in bit 13 must disappear.
        let mut v = vec![0x2FFF, 0x0800];
        correct_unused_bits(&mut v, &geometry(16, 12, 11, false));
        assert_eq!(v, vec![0x0FFF, 0x0800]);
        let mut v = vec![0x0FFF, 0x0800];
        correct_unused_bits(&mut v, &geometry(16, 12, 11, true));
        assert_eq!(v, vec![-1, -2048]);
        // High bit above bits stored - 1: the stored bits are shifted down.
        let mut v = vec![0b1010_0000];
        correct_unused_bits(&mut v, &geometry(8, 4, 7, false));
        assert_eq!(v, vec![0b1010]);
    }

    #[test]
    fn bytes_respect_endianness_and_length() {
        let g = geometry(16, 16, 15, false);
        assert_eq!(
            from_bytes(&[0x01, 0x02, 0x03, 0x04], &g, false, "t").expect("ok"),
            vec![0x0201, 0x0403]
        );
        assert_eq!(
            from_bytes(&[0x01, 0x02, 0x03, 0x04], &g, true, "t").expect("ok"),
            vec![0x0102, 0x0304]
        );
        let err = from_bytes(&[0x01, 0x02, 0x03], &g, false, "t").expect_err("short");
        assert!(err.to_string().contains("frame 1 needs 4"), "{err}");
    }

    #[test]
    fn siz_marker_is_found() {
        let mut s = vec![0xFF, 0x4F, 0xFF, 0x51, 0x00, 0x29, 0x00, 0x00];
        s.extend_from_slice(&100u32.to_be_bytes()); // Xsiz
        s.extend_from_slice(&80u32.to_be_bytes()); // Ysiz
        s.extend_from_slice(&0u32.to_be_bytes());
        s.extend_from_slice(&0u32.to_be_bytes());
        s.extend_from_slice(&[0u8; 16]);
        s.extend_from_slice(&1u16.to_be_bytes()); // Csiz
        assert_eq!(j2k_siz(&s), Some((100, 80, 1)));
        assert_eq!(j2k_siz(&s[..20]), None);
    }
}
