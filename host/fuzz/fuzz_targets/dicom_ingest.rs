//! DICOM ingest, bytes to canonical tensor, through the entry point
//! `oxbox serve` uses for an uploaded radiograph: the size check and the
//! structural scan (`DicomFile::scan_bytes`), the parse, the image header
//! and its limits, the first frame's decode (every codec: native, RLE,
//! JPEG baseline/lossless, JPEG-LS, JPEG 2000, deflate) and the canonical
//! preprocessing. A refusal is an `Err`; a panic, an abort, a hang, an
//! allocation past libFuzzer's limit or a canonical value outside [0, 1] is
//! a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oxbox_dicom::LimitsConfig;
use oxbox_dicom::{DicomFile, ImageHeader, canonical, pixels};

/// Tighter than the shipped defaults (100 MP, 256 MiB inflated) so that an
/// input the limits admit decodes within libFuzzer's time and memory
/// limits; the same checks run, only the numbers differ.
fn limits() -> LimitsConfig {
    LimitsConfig {
        max_image_megapixels: 4,
        max_dicom_file_mib: 16,
        max_inflated_mib: 32,
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = limits();
    let Ok(scanned) = DicomFile::scan_bytes(data, &limits) else {
        return;
    };
    let _ = scanned.footprint().parsed_bytes();
    let Ok(file) = scanned.parse() else {
        return;
    };
    let _ = file.transfer_syntax();
    let Ok(header) = ImageHeader::read(&file) else {
        return;
    };
    let Ok(geometry) = header.accept(&limits) else {
        return;
    };
    let Ok(frame) = pixels::decode_first_frame(&file, &geometry) else {
        return;
    };
    let image = canonical::preprocess(&header, &geometry, &frame, 32);
    // What the model gets: 32 × 32 values in [0, 1], whatever the file
    // said (a NaN or infinite rescale or window must not reach the model).
    assert_eq!(image.data.len(), 32 * 32);
    assert!(
        image.data.iter().all(|v| (0.0..=1.0).contains(v)),
        "canonical values outside [0, 1]"
    );
});
