//! JPEG decoding (ISO 10918) with libjpeg-turbo 3, through `turbojpeg-sys`.
//!
//! dicom-rs decodes JPEG with `jpeg-decoder`, which lacks the 12-bit extended
//! process (DICOM's JPEG Extended, 1.2.840.10008.1.2.4.51) that chest CR and
//! DX systems emit. libjpeg-turbo 3 decodes every JPEG process DICOM uses —
//! baseline 8-bit, extended 12-bit and lossless (process 14, any predictor,
//! 2–16 bits) — so all JPEG transfer syntaxes go through this one module.
//!
//! Hostile streams: the frame size in the JPEG header must match Rows and
//! Columns before any buffer is allocated, libjpeg-turbo's own pixel and scan
//! limits are set, and warnings (e.g. premature end of data) are errors.

use std::ffi::CStr;

use turbojpeg_sys as tj;

use std::borrow::Cow;

use super::DicomError;
use super::pixels::Samples;

/// Upper bound on progressive scans: libjpeg-turbo's guard against
/// decompression bombs that repeat scans without end.
const MAX_SCANS: i32 = 500;

/// Owns a libjpeg-turbo handle and frees it on drop.
struct Handle(tj::tjhandle);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed exactly once.
        unsafe { tj::tj3Destroy(self.0) }
    }
}

impl Handle {
    fn error(&self) -> DicomError {
        // SAFETY: the handle is valid; tj3GetErrorStr returns a NUL-terminated
        // string owned by the handle, copied before the handle can change.
        let reason = unsafe { CStr::from_ptr(tj::tj3GetErrorStr(self.0)) }
            .to_string_lossy()
            .into_owned();
        corrupt(reason)
    }

    fn get(&self, param: tj::TJPARAM) -> i32 {
        // SAFETY: valid handle, a parameter constant from the bindings.
        unsafe { tj::tj3Get(self.0, param as i32) }
    }

    fn set(&self, param: tj::TJPARAM, value: i32) -> Result<(), DicomError> {
        // SAFETY: valid handle, a parameter constant from the bindings.
        if unsafe { tj::tj3Set(self.0, param as i32, value) } != 0 {
            return Err(self.error());
        }
        Ok(())
    }
}

fn corrupt(reason: impl Into<String>) -> DicomError {
    DicomError::CorruptStream {
        codec: "JPEG",
        reason: reason.into(),
    }
}

/// Decodes one grayscale JPEG frame of `rows` × `columns` into samples,
/// row-major: 8-bit for precision ≤ 8, 16-bit words above.
///
/// # Errors
/// [`DicomError::CorruptStream`] when the stream does not decode, is not
/// grayscale, or its size differs from the DICOM header's.
pub(crate) fn decode(
    stream: &[u8],
    rows: u32,
    columns: u32,
) -> Result<Samples<'static>, DicomError> {
    // SAFETY: tj3Init has no preconditions; a null return is checked.
    let raw = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as i32) };
    if raw.is_null() {
        return Err(corrupt("libjpeg-turbo could not create a decompressor"));
    }
    let handle = Handle(raw);
    handle.set(tj::TJPARAM_TJPARAM_STOPONWARNING, 1)?;
    handle.set(tj::TJPARAM_TJPARAM_SCANLIMIT, MAX_SCANS)?;
    let max_pixels = i32::try_from(u64::from(rows) * u64::from(columns)).unwrap_or(i32::MAX);
    handle.set(tj::TJPARAM_TJPARAM_MAXPIXELS, max_pixels)?;

    // SAFETY: pointer and length describe the live `stream` slice.
    if unsafe { tj::tj3DecompressHeader(handle.0, stream.as_ptr(), stream.len() as tj::size_t) }
        != 0
    {
        return Err(handle.error());
    }
    let width = handle.get(tj::TJPARAM_TJPARAM_JPEGWIDTH);
    let height = handle.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT);
    if i64::from(width) != i64::from(columns) || i64::from(height) != i64::from(rows) {
        return Err(corrupt(format!(
            "stream is {width}x{height} pixels, the header says {columns}x{rows}"
        )));
    }
    let colorspace = handle.get(tj::TJPARAM_TJPARAM_COLORSPACE);
    if colorspace != tj::TJCS_TJCS_GRAY as i32 {
        return Err(corrupt(format!(
            "stream is not grayscale (libjpeg-turbo colour space {colorspace})"
        )));
    }
    let precision = handle.get(tj::TJPARAM_TJPARAM_PRECISION);
    let n = rows as usize * columns as usize;
    Ok(match precision {
        2..=8 => Samples::U8(Cow::Owned(handle.decompress(
            stream,
            n,
            tj::tj3Decompress8,
        )?)),
        9..=12 => {
            let out = handle.decompress(stream, n, tj::tj3Decompress12)?;
            // 12-bit samples are 0..=4095: the same bits as unsigned words.
            Samples::U16(Cow::Owned(out.into_iter().map(|v| v as u16).collect()))
        }
        13..=16 => Samples::U16(Cow::Owned(handle.decompress(
            stream,
            n,
            tj::tj3Decompress16,
        )?)),
        other => return Err(corrupt(format!("unsupported sample precision {other}"))),
    })
}

/// The signature shared by `tj3Decompress8`, `…12` and `…16`.
type Decompress<T> =
    unsafe extern "C" fn(tj::tjhandle, *const u8, tj::size_t, *mut T, i32, i32) -> i32;

impl Handle {
    /// Decompresses the stream whose header was read into `n` gray samples.
    fn decompress<T: Copy + Default>(
        &self,
        stream: &[u8],
        n: usize,
        decompress: Decompress<T>,
    ) -> Result<Vec<T>, DicomError> {
        let mut out = vec![T::default(); n];
        // SAFETY: the header was read from this stream and its width × height
        // checked to equal `n`; `out` holds `n` samples of the precision the
        // chosen function writes; pitch 0 means tightly packed rows.
        let rc = unsafe {
            decompress(
                self.0,
                stream.as_ptr(),
                stream.len() as tj::size_t,
                out.as_mut_ptr(),
                0,
                tj::TJPF_TJPF_GRAY,
            )
        };
        if rc != 0 {
            return Err(self.error());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_a_clean_error() {
        let err = decode(b"\xff\xd8\xff\xe0 this is not a jpeg", 4, 4).expect_err("must fail");
        assert!(err.to_string().starts_with("corrupt JPEG stream"), "{err}");
        let err = decode(b"", 4, 4).expect_err("must fail");
        assert!(matches!(err, DicomError::CorruptStream { .. }));
    }
}
