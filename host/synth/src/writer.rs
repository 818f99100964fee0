//! Writes a synthetic radiograph as a real DICOM file (dicom-rs): CR or DX,
//! MONOCHROME1 or 2, 10–16 bits stored, with or without window tags, in
//! native, deflated, RLE or JPEG-LS transfer syntaxes — written to a
//! temporary file and renamed, never partial.

use std::path::Path;

use dicom_core::value::{PixelFragmentSequence, Value};
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

use super::SynthError;
use super::cohort::{Patient, Scanner, syntax};
use oxbox_rng::Pcg;

/// SOP classes: CR image storage, DX image storage (for presentation).
const CR_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.1";
const DX_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.1.1";

/// A UID under the UUID-derived root 2.25.
fn uid(rng: &mut Pcg) -> String {
    let value = (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64());
    format!("2.25.{}", value >> 1)
}

/// The stored values of an attenuation map: scaled to `bits`, inverted for
/// MONOCHROME1.
pub fn stored_values(image: &[f32], scanner: &Scanner) -> Vec<u16> {
    let max = f64::from((1u32 << scanner.bits_stored) - 1);
    image
        .iter()
        .map(|&a| {
            let v = (f64::from(a) * max).round();
            (if scanner.monochrome1 { max - v } else { v }) as u16
        })
        .collect()
}

/// Writes one image.
///
/// # Errors
/// [`SynthError`] when encoding or writing fails.
#[allow(clippy::too_many_arguments)]
pub fn write_image(
    path: &Path,
    patient: &Patient,
    scanner: &Scanner,
    transfer_syntax: &str,
    width: usize,
    height: usize,
    stored: &[u16],
    rng: &mut Pcg,
) -> Result<(), SynthError> {
    let sop_class = if scanner.modality == "CR" {
        CR_STORAGE
    } else {
        DX_STORAGE
    };
    let mut obj = InMemDicomObject::new_empty();
    let mut put = |tag, vr, value: PrimitiveValue| obj.put(DataElement::new(tag, vr, value));
    put(tags::SOP_CLASS_UID, VR::UI, sop_class.into());
    put(tags::SOP_INSTANCE_UID, VR::UI, uid(rng).into());
    put(tags::STUDY_INSTANCE_UID, VR::UI, uid(rng).into());
    put(tags::SERIES_INSTANCE_UID, VR::UI, uid(rng).into());
    put(tags::STUDY_DATE, VR::DA, "20200401".into());
    put(
        tags::ACCESSION_NUMBER,
        VR::SH,
        format!("FAKE{}", rng.below(1_000_000)).into(),
    );
    put(tags::MODALITY, VR::CS, scanner.modality.into());
    put(tags::MANUFACTURER, VR::LO, scanner.manufacturer.into());
    put(tags::PATIENT_NAME, VR::PN, patient.name.as_str().into());
    put(tags::PATIENT_ID, VR::LO, patient.patient_id.as_str().into());
    put(
        tags::PATIENT_BIRTH_DATE,
        VR::DA,
        patient.birth_date.as_str().into(),
    );
    let sex = match patient.emr[1] {
        Some(v) if v > 0.5 => "M",
        Some(_) => "F",
        None => "O",
    };
    put(tags::PATIENT_SEX, VR::CS, sex.into());
    put(tags::BODY_PART_EXAMINED, VR::CS, "CHEST".into());
    put(tags::VIEW_POSITION, VR::CS, "PA".into());
    put(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16));
    let photometric = if scanner.monochrome1 {
        "MONOCHROME1"
    } else {
        "MONOCHROME2"
    };
    put(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, photometric.into());
    put(tags::ROWS, VR::US, PrimitiveValue::from(height as u16));
    put(tags::COLUMNS, VR::US, PrimitiveValue::from(width as u16));
    put(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16u16));
    put(
        tags::BITS_STORED,
        VR::US,
        PrimitiveValue::from(scanner.bits_stored),
    );
    put(
        tags::HIGH_BIT,
        VR::US,
        PrimitiveValue::from(scanner.bits_stored - 1),
    );
    put(
        tags::PIXEL_REPRESENTATION,
        VR::US,
        PrimitiveValue::from(0u16),
    );
    if scanner.modality == "DX" {
        put(
            tags::PRESENTATION_INTENT_TYPE,
            VR::CS,
            "FOR PRESENTATION".into(),
        );
        put(tags::RESCALE_INTERCEPT, VR::DS, "0".into());
        put(tags::RESCALE_SLOPE, VR::DS, "1".into());
        put(tags::RESCALE_TYPE, VR::LO, "US".into());
    }
    if scanner.window_tags {
        let max = f64::from((1u32 << scanner.bits_stored) - 1);
        put(
            tags::WINDOW_CENTER,
            VR::DS,
            format!("{:.0}", max * 0.45).into(),
        );
        put(
            tags::WINDOW_WIDTH,
            VR::DS,
            format!("{:.0}", max * 0.8).into(),
        );
    }
    let pixel_data = match transfer_syntax {
        syntax::RLE => encapsulated(rle_encode(stored, width, height)),
        syntax::JPEG_LS => encapsulated(jpeg_ls_encode(stored, width, height, scanner)?),
        _ => DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::U16(stored.iter().copied().collect()),
        ),
    };
    obj.put(pixel_data);
    let file = obj
        .with_meta(FileMetaTableBuilder::new().transfer_syntax(transfer_syntax))
        .map_err(|e| SynthError::Dicom(format!("{}: {e}", path.display())))?;
    oxbox_files::write_atomically(path, |out| {
        file.write_all(out)
            .map_err(|e| oxbox_files::OutputError::Io {
                path: path.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            })
    })?;
    Ok(())
}

fn encapsulated(fragment: Vec<u8>) -> DataElement<InMemDicomObject> {
    DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        Value::PixelSequence(PixelFragmentSequence::new(
            Vec::<u32>::new(),
            vec![fragment],
        )),
    )
}

fn jpeg_ls_encode(
    stored: &[u16],
    width: usize,
    height: usize,
    scanner: &Scanner,
) -> Result<Vec<u8>, SynthError> {
    let bytes: Vec<u8> = stored.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut codec = charls::CharLS::default();
    let mut encoded = codec
        .encode(
            charls::FrameInfo {
                width: width as u32,
                height: height as u32,
                bits_per_sample: i32::from(scanner.bits_stored),
                component_count: 1,
            },
            0,
            &bytes,
        )
        .map_err(|e| SynthError::Dicom(format!("JPEG-LS encoding: {e}")))?;
    if encoded.len() % 2 == 1 {
        encoded.push(0);
    }
    Ok(encoded)
}

/// DICOM RLE (PS3.5 Annex G) of 16-bit samples: two segments, high bytes
/// then low bytes, each PackBits-encoded row by row.
pub fn rle_encode(stored: &[u16], width: usize, height: usize) -> Vec<u8> {
    let mut segments = Vec::with_capacity(2);
    for shift in [8u32, 0] {
        let mut segment = Vec::new();
        let mut row = Vec::with_capacity(width);
        for r in 0..height {
            row.clear();
            row.extend(
                stored[r * width..(r + 1) * width]
                    .iter()
                    .map(|v| (v >> shift) as u8),
            );
            pack_bits(&row, &mut segment);
        }
        if segment.len() % 2 == 1 {
            segment.push(0x80); // no-op run, pads to even length
        }
        segments.push(segment);
    }
    let mut out = vec![0u8; 64];
    out[0..4].copy_from_slice(&2u32.to_le_bytes());
    let mut offset = 64u32;
    for (i, segment) in segments.iter().enumerate() {
        out[4 + 4 * i..8 + 4 * i].copy_from_slice(&offset.to_le_bytes());
        offset += segment.len() as u32;
    }
    for segment in segments {
        out.extend(segment);
    }
    out
}

/// PackBits: runs of 2–128 equal bytes as (1 − n, byte), the rest as
/// literal groups of up to 128 bytes (n − 1, bytes…).
fn pack_bits(data: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < data.len() {
        let mut run = 1;
        while i + run < data.len() && run < 128 && data[i + run] == data[i] {
            run += 1;
        }
        if run >= 2 {
            out.push((1i16 - run as i16) as i8 as u8);
            out.push(data[i]);
            i += run;
            continue;
        }
        let start = i;
        while i < data.len() && i - start < 128 && !(i + 1 < data.len() && data[i + 1] == data[i]) {
            i += 1;
        }
        if i == start {
            i += 1;
        }
        out.push((i - start - 1) as u8);
        out.extend_from_slice(&data[start..i]);
    }
}
