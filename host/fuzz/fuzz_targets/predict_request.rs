//! The prediction request parser `oxbox serve` runs once a body has
//! arrived (`oxbox_http::predict_body::parse_predict_request`): the media type,
//! the multipart parts (multer) or the JSON body, and the EMR record. The
//! input's first line is the `Content-Type`, the rest the body.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let content_type = String::from_utf8_lossy(&data[..split]);
    let body = data.get(split + 1..).unwrap_or_default();
    if let Ok((_dicom, emr)) = oxbox_http::predict_body::parse_predict_request(&content_type, body)
    {
        // What the server goes on with: an EMR object.
        assert!(emr.is_object());
    }
});
