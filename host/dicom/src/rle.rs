//! RLE Lossless (PS3.5 Annex G) decoding.
//!
//! dicom-rs's RLE decoder stops at 16 bits allocated; DICOM allows 32 (RT
//! dose grids use it) and the format is small enough to decode here, with
//! every offset and run checked against the buffers: a frame is a 64-byte
//! header (segment count, then up to 15 segment offsets) and one PackBits
//! segment per byte plane of each sample, most significant plane first.

use super::DicomError;

fn corrupt(reason: String) -> DicomError {
    DicomError::CorruptStream {
        codec: "RLE",
        reason,
    }
}

/// Decodes one RLE frame of `pixels` samples of `bits_allocated` bits
/// (8, 16 or 32; one sample per pixel) into raw samples, row-major.
///
/// # Errors
/// [`DicomError::CorruptStream`] when the header, an offset or a segment is
/// inconsistent with the frame size.
pub(crate) fn decode(
    frame: &[u8],
    pixels: usize,
    bits_allocated: u16,
) -> Result<Vec<u32>, DicomError> {
    let planes = match bits_allocated {
        8 => 1,
        16 => 2,
        32 => 4,
        other => {
            return Err(corrupt(format!(
                "{other} bits allocated; RLE supports 8, 16 and 32"
            )));
        }
    };
    let header = frame.get(..64).ok_or_else(|| {
        corrupt(format!(
            "{} bytes, shorter than the 64-byte header",
            frame.len()
        ))
    })?;
    let word = |i: usize| {
        u32::from_le_bytes([
            header[i * 4],
            header[i * 4 + 1],
            header[i * 4 + 2],
            header[i * 4 + 3],
        ])
    };
    let segments = word(0) as usize;
    if segments != planes {
        return Err(corrupt(format!(
            "{segments} segments, expected {planes} for {bits_allocated}-bit grayscale"
        )));
    }
    let mut offsets: Vec<usize> = (1..=segments).map(|i| word(i) as usize).collect();
    offsets.push(frame.len());
    // PackBits expands two bytes to at most 128: a segment too short to hold
    // the frame is refused before the frame's buffers are allocated.
    for s in 0..segments {
        let len = offsets[s + 1].saturating_sub(offsets[s]);
        if len.saturating_mul(64) < pixels {
            return Err(corrupt(format!(
                "segment {} is {len} bytes, too short for {pixels} pixels",
                s + 1
            )));
        }
    }
    let mut values = vec![0u32; pixels];
    let mut plane = vec![0u8; pixels];
    for s in 0..segments {
        let (start, end) = (offsets[s], offsets[s + 1]);
        if start < 64 || start > end || end > frame.len() {
            return Err(corrupt(format!(
                "segment {} has invalid offsets {start}..{end}",
                s + 1
            )));
        }
        unpack_bits(&frame[start..end], &mut plane).map_err(|n| {
            corrupt(format!(
                "segment {} decodes to {n} bytes, expected {pixels}",
                s + 1
            ))
        })?;
        let shift = 8 * (segments - 1 - s);
        for (v, &b) in values.iter_mut().zip(&plane) {
            *v |= u32::from(b) << shift;
        }
    }
    Ok(values)
}

/// PackBits: fills `out` exactly; `Err(bytes_produced)` when the segment ends
/// early. Bytes past a full `out` (segment padding) are ignored.
fn unpack_bits(mut src: &[u8], out: &mut [u8]) -> Result<(), usize> {
    let mut at = 0;
    while at < out.len() {
        let Some((&n, rest)) = src.split_first() else {
            return Err(at);
        };
        src = rest;
        let n = n as i8;
        if n >= 0 {
            let len = n as usize + 1;
            let take = len.min(out.len() - at);
            let literal = src.get(..len).ok_or(at + src.len().min(take))?;
            out[at..at + take].copy_from_slice(&literal[..take]);
            at += take;
            src = &src[len..];
        } else if n != -128 {
            let len = (1 - i32::from(n)) as usize;
            let (&byte, rest) = src.split_first().ok_or(at)?;
            src = rest;
            let take = len.min(out.len() - at);
            out[at..at + take].fill(byte);
            at += take;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(segments: &[&[u8]]) -> Vec<u8> {
        let mut header = vec![0u8; 64];
        header[..4].copy_from_slice(&(segments.len() as u32).to_le_bytes());
        let mut body = Vec::new();
        for (i, s) in segments.iter().enumerate() {
            let offset = 64 + body.len() as u32;
            header[4 + i * 4..8 + i * 4].copy_from_slice(&offset.to_le_bytes());
            body.extend_from_slice(s);
        }
        header.extend(body);
        header
    }

    #[test]
    fn packbits_runs_and_literals() {
        // 3 literal bytes, then a run of 4 × 0x07.
        let f = frame(&[&[2, 1, 2, 3, (-3i8) as u8, 7]]);
        assert_eq!(decode(&f, 7, 8).expect("ok"), vec![1, 2, 3, 7, 7, 7, 7]);
    }

    #[test]
    fn planes_combine_msb_first() {
        let f = frame(&[&[1, 0x12, 0x34], &[1, 0x56, 0x78]]);
        assert_eq!(decode(&f, 2, 16).expect("ok"), vec![0x1256, 0x3478]);
        let f = frame(&[&[0, 1], &[0, 2], &[0, 3], &[0, 4]]);
        assert_eq!(decode(&f, 1, 32).expect("ok"), vec![0x0102_0304]);
    }

    #[test]
    fn short_or_inconsistent_frames_are_errors() {
        let f = frame(&[&[(-3i8) as u8, 7]]);
        let err = decode(&f, 10, 8).expect_err("short segment");
        assert!(
            err.to_string().contains("decodes to 4 bytes, expected 10"),
            "{err}"
        );
        assert!(decode(&f, 4, 16).is_err(), "segment count must match");
        assert!(decode(&f[..40], 4, 8).is_err(), "truncated header");
        let mut bad = f.clone();
        bad[4..8].copy_from_slice(&1000u32.to_le_bytes());
        assert!(decode(&bad, 4, 8).is_err(), "offset past the end");
    }
}
