//! Header: the attributes of a parsed file that ingest needs, checked.
//!
//! [`ImageHeader::read`] collects them as found (absent attributes are
//! `None`), failing only when a present value cannot be interpreted.
//! [`ImageHeader::accept`] then decides whether this is an image the box
//! takes — grayscale, one sample per pixel, within the size limit, with pixel
//! data — and yields the [`Geometry`] the pixel decoder relies on. No pixel
//! buffer is ever sized from a header field that has not passed `accept`.
//!
//! Patient-identifying attributes (name, ID, birth date, …) are never read.

use dicom_core::Tag;
use dicom_core::value::{PrimitiveValue, Value};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_object::mem::InMemElement;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use serde::Serialize;

use super::read::DicomFile;
use super::{DicomError, Result};
use crate::LimitsConfig;

/// The header attributes that matter for ingest, as found in the file.
///
/// Serialises to the JSON that `oxbox dicom info` prints.
#[derive(Debug, Clone, Serialize)]
pub struct ImageHeader {
    /// Transfer Syntax UID (0002,0010), or the detected one for files
    /// without a file meta group.
    pub transfer_syntax: String,
    /// The transfer syntax's name, where the registry knows it.
    pub transfer_syntax_name: Option<String>,
    /// Whether the file had a file meta group.
    pub has_file_meta: bool,
    /// SOP Class UID (0008,0016).
    pub sop_class_uid: Option<String>,
    /// Modality (0008,0060).
    pub modality: Option<String>,
    /// Manufacturer (0008,0070): vendor quirks are keyed on it.
    pub manufacturer: Option<String>,
    /// Body Part Examined (0018,0015).
    pub body_part_examined: Option<String>,
    /// View Position (0018,5101).
    pub view_position: Option<String>,
    /// Photometric Interpretation (0028,0004), trimmed and upper-cased.
    pub photometric_interpretation: Option<String>,
    /// Samples per Pixel (0028,0002).
    pub samples_per_pixel: Option<u16>,
    /// Rows (0028,0010).
    pub rows: Option<u16>,
    /// Columns (0028,0011).
    pub columns: Option<u16>,
    /// Number of Frames (0028,0008); absent means 1.
    pub number_of_frames: Option<u32>,
    /// Bits Allocated (0028,0100).
    pub bits_allocated: Option<u16>,
    /// Bits Stored (0028,0101).
    pub bits_stored: Option<u16>,
    /// High Bit (0028,0102).
    pub high_bit: Option<u16>,
    /// Pixel Representation (0028,0103): 0 unsigned, 1 two's complement.
    pub pixel_representation: Option<u16>,
    /// Rescale Slope (0028,1053).
    pub rescale_slope: Option<f64>,
    /// Rescale Intercept (0028,1052).
    pub rescale_intercept: Option<f64>,
    /// Window Center (0028,1050), every value.
    pub window_center: Vec<f64>,
    /// Window Width (0028,1051), every value.
    pub window_width: Vec<f64>,
    /// VOI LUT Function (0028,1056), trimmed and upper-cased.
    pub voi_lut_function: Option<String>,
    /// First item of the VOI LUT Sequence (0028,3010), if any.
    #[serde(serialize_with = "voi_lut_summary")]
    pub voi_lut: Option<VoiLut>,
    /// Presentation LUT Shape (2050,0020), trimmed and upper-cased.
    pub presentation_lut_shape: Option<String>,
    /// Pixel Padding Value (0028,0120).
    pub pixel_padding_value: Option<i64>,
    /// Pixel Padding Range Limit (0028,0121).
    pub pixel_padding_range_limit: Option<i64>,
    /// Whether Pixel Data (7FE0,0010) is present.
    pub has_pixel_data: bool,
    /// Whether the pixel data is encapsulated (compressed fragments).
    pub pixel_data_encapsulated: bool,
}

/// One VOI LUT (PS3.3 C.11.2): descriptor and table.
#[derive(Debug, Clone, PartialEq)]
pub struct VoiLut {
    /// Number of entries (descriptor value 1; 0 means 65536).
    pub entries: usize,
    /// First input value mapped (descriptor value 2).
    pub first_mapped: i64,
    /// Bits per entry (descriptor value 3; 16 where the descriptor said
    /// fewer but the entries are 16-bit words). Every entry of the table's
    /// first `entries` is in 0..=2^bits − 1.
    pub bits: u32,
    /// The table, at least `entries` long.
    pub data: Vec<f64>,
}

fn voi_lut_summary<S: serde::Serializer>(lut: &Option<VoiLut>, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Summary {
        entries: usize,
        first_mapped: i64,
        bits: u32,
    }
    lut.as_ref()
        .map(|l| Summary {
            entries: l.entries,
            first_mapped: l.first_mapped,
            bits: l.bits,
        })
        .serialize(s)
}

/// Validated image geometry: what the pixel decoder may rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Rows of one frame, ≥ 1.
    pub rows: u32,
    /// Columns of one frame, ≥ 1.
    pub columns: u32,
    /// Frames in the object, ≥ 1.
    pub frames: u32,
    /// Bits Allocated: 1, 8, 16 or 32.
    pub bits_allocated: u16,
    /// Bits Stored: 1 ≤ stored ≤ allocated.
    pub bits_stored: u16,
    /// High Bit: stored − 1 ≤ high < allocated.
    pub high_bit: u16,
    /// Pixel Representation is 1 (two's complement).
    pub signed: bool,
    /// MONOCHROME1: minimum value is displayed white.
    pub monochrome1: bool,
}

impl Geometry {
    /// Pixels in one frame.
    pub fn pixels(&self) -> usize {
        self.rows as usize * self.columns as usize
    }
}

impl ImageHeader {
    /// Reads the header attributes of `file`.
    ///
    /// # Errors
    /// [`DicomError::InvalidAttribute`] when a present attribute has a value
    /// that cannot be interpreted (e.g. Rows that is not a number).
    pub fn read(file: &DicomFile) -> Result<Self> {
        let obj: &InMemDicomObject = file.object();
        let ts = file.transfer_syntax().to_owned();
        let ts_name = TransferSyntaxRegistry.get(&ts).map(|t| t.name().to_owned());
        let pixel_data = obj.get(tags::PIXEL_DATA);
        Ok(Self {
            transfer_syntax_name: ts_name,
            transfer_syntax: ts,
            has_file_meta: file.has_file_meta(),
            sop_class_uid: text(obj, tags::SOP_CLASS_UID),
            modality: text(obj, tags::MODALITY),
            manufacturer: text(obj, tags::MANUFACTURER),
            body_part_examined: text(obj, tags::BODY_PART_EXAMINED),
            view_position: text(obj, tags::VIEW_POSITION),
            photometric_interpretation: text(obj, tags::PHOTOMETRIC_INTERPRETATION)
                .map(|s| s.to_ascii_uppercase()),
            samples_per_pixel: uint(
                obj,
                tags::SAMPLES_PER_PIXEL,
                "SamplesPerPixel",
                "(0028,0002)",
            )?,
            rows: uint(obj, tags::ROWS, "Rows", "(0028,0010)")?,
            columns: uint(obj, tags::COLUMNS, "Columns", "(0028,0011)")?,
            number_of_frames: uint(obj, tags::NUMBER_OF_FRAMES, "NumberOfFrames", "(0028,0008)")?,
            bits_allocated: uint(obj, tags::BITS_ALLOCATED, "BitsAllocated", "(0028,0100)")?,
            bits_stored: uint(obj, tags::BITS_STORED, "BitsStored", "(0028,0101)")?,
            high_bit: uint(obj, tags::HIGH_BIT, "HighBit", "(0028,0102)")?,
            pixel_representation: uint(
                obj,
                tags::PIXEL_REPRESENTATION,
                "PixelRepresentation",
                "(0028,0103)",
            )?,
            rescale_slope: floats(obj, tags::RESCALE_SLOPE, "RescaleSlope", "(0028,1053)")?
                .first()
                .copied(),
            rescale_intercept: floats(
                obj,
                tags::RESCALE_INTERCEPT,
                "RescaleIntercept",
                "(0028,1052)",
            )?
            .first()
            .copied(),
            window_center: floats(obj, tags::WINDOW_CENTER, "WindowCenter", "(0028,1050)")?,
            window_width: floats(obj, tags::WINDOW_WIDTH, "WindowWidth", "(0028,1051)")?,
            voi_lut_function: text(obj, tags::VOILUT_FUNCTION).map(|s| s.to_ascii_uppercase()),
            voi_lut: voi_lut(obj)?,
            presentation_lut_shape: text(obj, tags::PRESENTATION_LUT_SHAPE)
                .map(|s| s.to_ascii_uppercase()),
            pixel_padding_value: padding(
                obj,
                tags::PIXEL_PADDING_VALUE,
                "PixelPaddingValue",
                "(0028,0120)",
            )?,
            pixel_padding_range_limit: padding(
                obj,
                tags::PIXEL_PADDING_RANGE_LIMIT,
                "PixelPaddingRangeLimit",
                "(0028,0121)",
            )?,
            has_pixel_data: pixel_data.is_some(),
            pixel_data_encapsulated: matches!(
                pixel_data.map(InMemElement::value),
                Some(Value::PixelSequence(_))
            ),
        })
    }

    /// Decides whether the box takes this image, and returns its geometry.
    ///
    /// # Errors
    /// [`DicomError::NotGrayscale`] for anything but MONOCHROME1/2,
    /// [`DicomError::MissingAttribute`] / [`DicomError::InvalidAttribute`]
    /// for absent or inconsistent image attributes, [`DicomError::ImageTooLarge`]
    /// over `limits.max_image_megapixels`, and a missing Pixel Data.
    pub fn accept(&self, limits: &LimitsConfig) -> Result<Geometry> {
        let pi =
            self.photometric_interpretation
                .as_deref()
                .ok_or(DicomError::MissingAttribute {
                    keyword: "PhotometricInterpretation",
                    tag: "(0028,0004)",
                })?;
        if pi != "MONOCHROME1" && pi != "MONOCHROME2" {
            return Err(DicomError::NotGrayscale(pi.to_owned()));
        }
        let samples = self.samples_per_pixel.unwrap_or(1);
        if samples != 1 {
            return Err(DicomError::InvalidAttribute {
                keyword: "SamplesPerPixel",
                tag: "(0028,0002)",
                reason: format!("{samples} samples per pixel; a grayscale radiograph has 1"),
            });
        }
        let rows = required(self.rows, "Rows", "(0028,0010)")?;
        let columns = required(self.columns, "Columns", "(0028,0011)")?;
        if rows == 0 || columns == 0 {
            return Err(DicomError::InvalidAttribute {
                keyword: if rows == 0 { "Rows" } else { "Columns" },
                tag: if rows == 0 {
                    "(0028,0010)"
                } else {
                    "(0028,0011)"
                },
                reason: "zero".to_owned(),
            });
        }
        let pixels = u64::from(rows) * u64::from(columns);
        let limit = limits.max_image_pixels();
        if pixels > limit {
            return Err(DicomError::ImageTooLarge {
                rows: rows.into(),
                columns: columns.into(),
                pixels,
                limit,
            });
        }
        let frames = self.number_of_frames.unwrap_or(1).max(1);
        let bits_allocated = required(self.bits_allocated, "BitsAllocated", "(0028,0100)")?;
        if !matches!(bits_allocated, 1 | 8 | 16 | 32) {
            return Err(DicomError::InvalidAttribute {
                keyword: "BitsAllocated",
                tag: "(0028,0100)",
                reason: format!("{bits_allocated}; expected 1, 8, 16 or 32"),
            });
        }
        let bits_stored = self.bits_stored.unwrap_or(bits_allocated);
        if bits_stored == 0 || bits_stored > bits_allocated {
            return Err(DicomError::InvalidAttribute {
                keyword: "BitsStored",
                tag: "(0028,0101)",
                reason: format!("{bits_stored} with BitsAllocated {bits_allocated}"),
            });
        }
        let high_bit = self.high_bit.unwrap_or(bits_stored - 1);
        if high_bit + 1 < bits_stored || high_bit >= bits_allocated {
            return Err(DicomError::InvalidAttribute {
                keyword: "HighBit",
                tag: "(0028,0102)",
                reason: format!(
                    "{high_bit} with BitsStored {bits_stored} and BitsAllocated {bits_allocated}"
                ),
            });
        }
        let signed = match self.pixel_representation.unwrap_or(0) {
            0 => false,
            1 => true,
            other => {
                return Err(DicomError::InvalidAttribute {
                    keyword: "PixelRepresentation",
                    tag: "(0028,0103)",
                    reason: format!("{other}; expected 0 or 1"),
                });
            }
        };
        if !self.has_pixel_data {
            return Err(DicomError::MissingAttribute {
                keyword: "PixelData",
                tag: "(7FE0,0010)",
            });
        }
        self.check_modality_range(bits_stored)?;
        Ok(Geometry {
            rows: rows.into(),
            columns: columns.into(),
            frames,
            bits_allocated,
            bits_stored,
            high_bit,
            signed,
            monochrome1: pi == "MONOCHROME1",
        })
    }
}

impl ImageHeader {
    /// Step 4's modality LUT as (slope, intercept): the file's, with a
    /// zero slope taken as absent (as the reference does), else (1, 0).
    pub fn modality_rescale(&self) -> (f64, f64) {
        let slope = self.rescale_slope.filter(|&s| s != 0.0).unwrap_or(1.0);
        (slope, self.rescale_intercept.unwrap_or(0.0))
    }

    /// Step 4's modality values must stay finite, and so must the
    /// differences that step 5 takes between them (a percentile window
    /// from −∞ to +∞ would make every pixel NaN). Each value is finite on
    /// its own (checked when read); this bounds the product with the
    /// widest stored value the sample bits allow.
    fn check_modality_range(&self, bits_stored: u16) -> Result<()> {
        /// Far beyond any physical unit, and twice it is still finite.
        const MAX_MODALITY: f64 = 1e300;
        let (slope, intercept) = self.modality_rescale();
        let widest_stored = 2f64.powi(i32::from(bits_stored));
        if slope.abs() * widest_stored + intercept.abs() > MAX_MODALITY {
            return Err(DicomError::InvalidAttribute {
                keyword: "RescaleSlope",
                tag: "(0028,1053)",
                reason: format!(
                    "slope {slope:e} and intercept {intercept:e} put {bits_stored}-bit values \
                     past ±{MAX_MODALITY:e}"
                ),
            });
        }
        Ok(())
    }
}

fn required<T>(value: Option<T>, keyword: &'static str, tag: &'static str) -> Result<T> {
    value.ok_or(DicomError::MissingAttribute { keyword, tag })
}

/// A text attribute, trimmed of DICOM padding; `None` when absent or empty.
fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let s = obj.get(tag)?.to_str().ok()?;
    let s = s.trim_matches(['\0', ' ']);
    (!s.is_empty()).then(|| s.to_owned())
}

/// An unsigned integer attribute; `None` when absent or empty.
fn uint<T>(
    obj: &InMemDicomObject,
    tag: Tag,
    keyword: &'static str,
    tg: &'static str,
) -> Result<Option<T>>
where
    T: TryFrom<i64> + Copy,
{
    let Some(elem) = obj.get(tag) else {
        return Ok(None);
    };
    if is_blank(elem) {
        return Ok(None);
    }
    let invalid = |reason: String| DicomError::InvalidAttribute {
        keyword,
        tag: tg,
        reason,
    };
    let values: Vec<i64> = elem
        .to_multi_int::<i64>()
        .map_err(|_| invalid("not an integer".to_owned()))?;
    let Some(&first) = values.first() else {
        return Ok(None);
    };
    T::try_from(first)
        .map(Some)
        .map_err(|_| invalid(format!("{first} is out of range")))
}

/// Whether an element has no value, or only DICOM padding.
fn is_blank(elem: &InMemElement) -> bool {
    match elem.value() {
        Value::Primitive(PrimitiveValue::Empty) => true,
        Value::Primitive(PrimitiveValue::Str(_) | PrimitiveValue::Strs(_)) => elem
            .to_str()
            .is_ok_and(|s| s.trim_matches(['\0', ' ', '\\']).is_empty()),
        _ => false,
    }
}

/// Every value of a numeric (DS, FD, …) attribute; empty when absent.
fn floats(
    obj: &InMemDicomObject,
    tag: Tag,
    keyword: &'static str,
    tg: &'static str,
) -> Result<Vec<f64>> {
    let Some(elem) = obj.get(tag) else {
        return Ok(Vec::new());
    };
    if is_blank(elem) {
        return Ok(Vec::new());
    }
    let values = elem
        .to_multi_float64()
        .map_err(|_| DicomError::InvalidAttribute {
            keyword,
            tag: tg,
            reason: "not a number".to_owned(),
        })?;
    if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
        return Err(DicomError::InvalidAttribute {
            keyword,
            tag: tg,
            reason: format!("{bad} is not finite"),
        });
    }
    Ok(values)
}

/// Pixel Padding Value / Range Limit: US or SS. In implicit VR the parser
/// cannot know which; the value is then read as the 16 bits it is, and
/// reinterpreted as signed by [`Geometry`]-aware code where needed.
fn padding(
    obj: &InMemDicomObject,
    tag: Tag,
    keyword: &'static str,
    tg: &'static str,
) -> Result<Option<i64>> {
    uint::<i64>(obj, tag, keyword, tg)
}

/// The first item of the VOI LUT Sequence, checked against its descriptor.
fn voi_lut(obj: &InMemDicomObject) -> Result<Option<VoiLut>> {
    let Some(seq) = obj.get(tags::VOILUT_SEQUENCE) else {
        return Ok(None);
    };
    let Some(item) = seq.items().and_then(<[_]>::first) else {
        return Ok(None);
    };
    let invalid = |keyword, tag, reason: &str| DicomError::InvalidAttribute {
        keyword,
        tag,
        reason: reason.to_owned(),
    };
    let descriptor = item
        .get(tags::LUT_DESCRIPTOR)
        .ok_or(DicomError::MissingAttribute {
            keyword: "LUTDescriptor",
            tag: "(0028,3002)",
        })?
        .to_multi_int::<i64>()
        .map_err(|_| invalid("LUTDescriptor", "(0028,3002)", "not integers"))?;
    let [n, first, bits] = descriptor[..] else {
        return Err(invalid(
            "LUTDescriptor",
            "(0028,3002)",
            "needs three values",
        ));
    };
    let entries = if n == 0 { 65536 } else { n as usize };
    if !(1..=65536).contains(&n.max(1)) || !(1..=16).contains(&bits) {
        return Err(invalid(
            "LUTDescriptor",
            "(0028,3002)",
            "entries must be 0..=65535 and bits 1..=16",
        ));
    }
    let lut_elem = item
        .get(tags::LUT_DATA)
        .ok_or(DicomError::MissingAttribute {
            keyword: "LUTData",
            tag: "(0028,3006)",
        })?;
    let data: Vec<f64> = match lut_elem.value().primitive() {
        // OW read as bytes: little-endian 16-bit words.
        Some(PrimitiveValue::U8(bytes)) => bytes
            .chunks_exact(2)
            .map(|w| f64::from(u16::from_le_bytes([w[0], w[1]])))
            .collect(),
        _ => lut_elem
            .to_multi_int::<i64>()
            .map_err(|_| invalid("LUTData", "(0028,3006)", "not integers"))?
            .into_iter()
            .map(|v| v as f64)
            .collect(),
    };
    if data.len() < entries {
        return Err(invalid(
            "LUTData",
            "(0028,3006)",
            &format!("{} entries, descriptor says {entries}", data.len()),
        ));
    }
    // Step 5 divides by 2^bits − 1, so every entry must fit in `bits` for y
    // to stay in [0, 1]. A table whose descriptor says 8 bits but whose
    // entries are 16-bit words is a known vendor quirk that dcmtk corrects
    // the same way (DiLookupTable::checkBits); anything else is refused.
    let fits = |bits: i64| {
        let top = ((1u64 << bits) - 1) as f64;
        data[..entries].iter().all(|&v| (0.0..=top).contains(&v))
    };
    let bits = if fits(bits) {
        bits
    } else if bits < 16 && fits(16) {
        16
    } else {
        return Err(invalid(
            "LUTData",
            "(0028,3006)",
            &format!("an entry outside 0..=2^{bits} - 1 (the descriptor's bits per entry)"),
        ));
    };
    Ok(Some(VoiLut {
        entries,
        first_mapped: first,
        bits: bits as u32,
        data,
    }))
}

#[cfg(test)]
mod tests {
    use dicom_core::value::DataSetSequence;
    use dicom_core::{DataElement, VR};

    use super::*;

    /// A dataset whose VOI LUT Sequence has one item: 4 entries from 0.
    fn with_voi_lut(bits: u16, data: Vec<u16>) -> InMemDicomObject {
        let item = InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::LUT_DESCRIPTOR,
                VR::US,
                PrimitiveValue::U16(vec![data.len() as u16, 0, bits].into()),
            ),
            DataElement::new(tags::LUT_DATA, VR::US, PrimitiveValue::U16(data.into())),
        ]);
        InMemDicomObject::from_element_iter([DataElement::new(
            tags::VOILUT_SEQUENCE,
            VR::SQ,
            DataSetSequence::from(vec![item]),
        )])
    }

    #[test]
    fn voi_lut_entries_fit_the_bits_that_divide_them() {
        // Entries within the descriptor's 8 bits: kept as declared.
        let lut = voi_lut(&with_voi_lut(8, vec![0, 10, 200, 255]))
            .expect("a valid table")
            .expect("present");
        assert_eq!((lut.entries, lut.bits), (4, 8));
        // 16-bit words under an 8-bit descriptor (the vendor quirk): read as
        // 16 bits, so step 5's y stays within [0, 1].
        let lut = voi_lut(&with_voi_lut(8, vec![0, 10, 4095, 65535]))
            .expect("a valid table")
            .expect("present");
        assert_eq!(lut.bits, 16);
        // A 12-bit descriptor whose entries need 16 bits: the same rule.
        let lut = voi_lut(&with_voi_lut(12, vec![0, 4096, 8, 9]))
            .expect("a valid table")
            .expect("present");
        assert_eq!(lut.bits, 16);
    }

    #[test]
    fn modality_values_past_the_finite_range_are_refused_by_name() {
        let limits = LimitsConfig::default();
        let bytes = include_bytes!(
            "../../fuzz/regressions/dicom_ingest/window-of-all-white-63-columns.dcm"
        );
        let file = DicomFile::scan_bytes(bytes, &limits)
            .and_then(|s| s.parse())
            .expect("parsed");
        let mut header = ImageHeader::read(&file).expect("header");
        // No window: the percentiles decide, the step where ±∞ made NaN.
        header.window_center.clear();
        header.rescale_intercept = Some(-1e280);
        header.rescale_slope = Some(1e295); // 16 bits: 6.6e299, admitted
        let geometry = header.accept(&limits).expect("admitted");
        let frame = crate::pixels::decode_first_frame(&file, &geometry).expect("decoded");
        let image = crate::canonical::preprocess(&header, &geometry, &frame, 32);
        assert!(image.data.iter().all(|v| (0.0..=1.0).contains(v)));
        header.rescale_slope = Some(-1e296); // 6.6e300
        let error = header.accept(&limits).err().map(|e| e.to_string());
        let error = error.unwrap_or_default();
        assert!(
            error.contains("RescaleSlope") && error.contains("(0028,1053)"),
            "{error}"
        );
    }

    #[test]
    fn voi_lut_entries_past_16_bits_are_refused_by_name() {
        let item = InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::LUT_DESCRIPTOR,
                VR::US,
                PrimitiveValue::U16(vec![2, 0, 16].into()),
            ),
            DataElement::new(
                tags::LUT_DATA,
                VR::SL,
                PrimitiveValue::I32(vec![-1, 70_000].into()),
            ),
        ]);
        let obj = InMemDicomObject::from_element_iter([DataElement::new(
            tags::VOILUT_SEQUENCE,
            VR::SQ,
            DataSetSequence::from(vec![item]),
        )]);
        let error = voi_lut(&obj)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("LUTData"), "{error}");
        assert!(error.contains("(0028,3006)"), "{error}");
    }
}
