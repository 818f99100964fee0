//! The body of a prediction request (`POST /v1/predict`): its media type,
//! then either `multipart/form-data` with a `dicom` and an `emr` part, or
//! `application/json` `{"emr": {...}}`; the EMR record must be a JSON
//! object. Only syntax is checked here: the radiograph's bytes go on
//! unparsed, and the record's fields are the site plugin's business.
//!
//! The server reads the body under its limits and memory budget
//! (`oxbox::serve`) and calls [`body_kind`], [`parse_json`] or
//! [`parse_multipart`], then [`split_case`]; [`parse_predict_request`] runs
//! the same steps on a body in memory (the fuzz target `predict_request`).

use bytes::Bytes;

use crate::body::Body;
use crate::problem::Problem;

/// The two ways a prediction request can carry its case.
pub enum CaseBody {
    /// `multipart/form-data`: a `dicom` part and an `emr` part.
    Multipart {
        /// The `dicom` part's bytes (not parsed yet), if there was one.
        dicom: Option<Bytes>,
        /// The `emr` part's bytes.
        emr: Bytes,
    },
    /// `application/json`: `{"emr": {...}}`.
    Json(serde_json::Value),
}

/// A JSON body, parsed (400 when it is not JSON).
///
/// # Errors
/// [`Problem::malformed`] naming the parser's complaint.
pub fn parse_json(bytes: &[u8]) -> Result<CaseBody, Box<Problem>> {
    serde_json::from_slice(bytes)
        .map(CaseBody::Json)
        .map_err(|e| Box::new(Problem::malformed(format!("the body is not JSON: {e}"))))
}

/// The radiograph (if any) and the EMR record of a parsed body: the `emr`
/// part parsed as JSON, or the `emr` member of a JSON body (its only
/// key); the record must be a JSON object.
pub fn split_case(body: CaseBody) -> Result<(Option<Bytes>, serde_json::Value), Box<Problem>> {
    let (dicom, emr) = match body {
        CaseBody::Multipart { dicom, emr } => {
            let emr: serde_json::Value = serde_json::from_slice(&emr).map_err(|e| {
                Box::new(Problem::malformed(format!("the emr part is not JSON: {e}")))
            })?;
            (dicom, emr)
        }
        CaseBody::Json(mut value) => {
            let Some(object) = value.as_object_mut() else {
                return Err(Box::new(Problem::malformed(
                    "the JSON body must be an object {\"emr\": {...}}",
                )));
            };
            if let Some(key) = object.keys().find(|k| k.as_str() != "emr") {
                return Err(Box::new(Problem::malformed(format!(
                    "unknown key {key:?} in the JSON body; it takes {{\"emr\": {{...}}}} (send a radiograph as multipart/form-data)"
                ))));
            }
            let Some(emr) = object.remove("emr") else {
                return Err(Box::new(Problem::malformed(
                    "the JSON body has no \"emr\" object",
                )));
            };
            (None, emr)
        }
    };
    if !emr.is_object() {
        return Err(Box::new(Problem::malformed(
            "the EMR record must be a JSON object of the site's fields",
        )));
    }
    Ok((dicom, emr))
}

/// What a prediction's `Content-Type` says the body is: `Some(boundary)`
/// for `multipart/form-data`, `None` for `application/json`; 415 for any
/// other media type, 400 for multipart without a boundary.
pub fn body_kind(content_type: &str) -> Result<Option<String>, Box<Problem>> {
    let mime: mime::Mime = content_type.parse().map_err(|_| {
        Box::new(Problem::unsupported_media_type(format!(
            "Content-Type {content_type:?}: send multipart/form-data (dicom + emr parts) or application/json"
        )))
    })?;
    match (mime.type_(), mime.subtype()) {
        (mime::MULTIPART, mime::FORM_DATA) => mime
            .get_param(mime::BOUNDARY)
            .map(|b| Some(b.as_str().to_owned()))
            .ok_or_else(|| Box::new(Problem::malformed("multipart/form-data without a boundary"))),
        (mime::APPLICATION, mime::JSON) => Ok(None),
        _ => Err(Box::new(Problem::unsupported_media_type(format!(
            "Content-Type {}: send multipart/form-data (dicom + emr parts) or application/json",
            mime.essence_str()
        )))),
    }
}

/// Parses a whole prediction request body as `POST /v1/predict` does once the body
/// has arrived — the media type, the multipart parts or the JSON body, the
/// EMR record — without the network, the limits or the memory budget: the
/// radiograph's bytes (not parsed yet) and the EMR record. The fuzz target
/// `predict_request` (`host/fuzz/`) drives the server's parser through it.
///
/// # Errors
/// The [`Problem`] the server answers with (400 malformed, 415 media type).
pub fn parse_predict_request(
    content_type: &str,
    body: &[u8],
) -> Result<(Option<Bytes>, serde_json::Value), Box<Problem>> {
    use futures_util::FutureExt;
    let body = Body {
        chunks: if body.is_empty() {
            Vec::new()
        } else {
            vec![Bytes::copy_from_slice(body)]
        },
        len: body.len(),
    };
    let case = match body_kind(content_type)? {
        None => parse_json(&body.into_contiguous())?,
        // The body is in memory: the parser never waits.
        Some(boundary) => parse_multipart(body, boundary)
            .now_or_never()
            .ok_or_else(|| {
                Box::new(Problem::internal(
                    "the multipart parser waited on a body in memory",
                ))
            })?
            .map_err(Box::new)?,
    };
    split_case(case)
}

/// The parts of a `multipart/form-data` body: at most one `dicom` part
/// (`application/dicom` or `application/octet-stream` when typed) and
/// exactly one `emr` part (`application/json` when typed); no other part.
///
/// # Errors
/// 400 for a malformed body, a missing `emr` part, a repeated or unknown
/// part; 415 for a part of another media type.
pub async fn parse_multipart(body: Body, boundary: String) -> Result<CaseBody, Problem> {
    let stream =
        futures_util::stream::iter(body.chunks.into_iter().map(Ok::<Bytes, std::io::Error>));
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut dicom = None;
    let mut emr = None;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return Err(Problem::malformed(format!("multipart body: {e}"))),
        };
        let name = field.name().unwrap_or("").to_owned();
        let media = field.content_type().map(|m| m.essence_str().to_owned());
        let slot = match name.as_str() {
            "dicom" => {
                if let Some(m) = media.as_deref()
                    && m != "application/dicom"
                    && m != "application/octet-stream"
                {
                    return Err(Problem::unsupported_media_type(format!(
                        "the dicom part is {m}; send application/dicom"
                    )));
                }
                &mut dicom
            }
            "emr" => {
                if let Some(m) = media.as_deref()
                    && m != "application/json"
                {
                    return Err(Problem::unsupported_media_type(format!(
                        "the emr part is {m}; send application/json"
                    )));
                }
                &mut emr
            }
            other => {
                return Err(Problem::malformed(format!(
                    "unexpected multipart part {other:?}; send \"dicom\" and \"emr\""
                )));
            }
        };
        if slot.is_some() {
            return Err(Problem::malformed(format!("the {name} part appears twice")));
        }
        let bytes = field
            .bytes()
            .await
            .map_err(|e| Problem::malformed(format!("multipart part {name}: {e}")))?;
        *slot = Some(bytes);
    }
    let emr = emr.ok_or_else(|| Problem::malformed("the multipart body has no emr part"))?;
    Ok(CaseBody::Multipart { dicom, emr })
}
