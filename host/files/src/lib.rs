//! Output files: NumPy `.npy` tensors and 8-bit PNG previews, written
//! atomically.
//!
//! Every file is written to a temporary file in the destination directory and
//! renamed into place only when complete, so a failure (bad input, full disk,
//! a kill) never leaves a partial output behind.

use std::io::{BufWriter, Write};
use std::path::Path;

/// Errors writing an output file.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// Creating, writing or renaming the file failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The destination.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The PNG encoder failed.
    #[error("cannot encode PNG {path}: {reason}")]
    Png {
        /// The destination.
        path: String,
        /// What the encoder said.
        reason: String,
    },
}

/// Writes `path` atomically: `fill` writes into a temporary file beside it,
/// which is flushed, synced and renamed over `path` only if `fill` succeeds.
///
/// # Errors
/// [`OutputError::Io`] for any I/O failure, or the error `fill` returns.
pub fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> Result<(), OutputError>,
) -> Result<(), OutputError> {
    write_atomically_with_mode(path, None, fill)
}

/// Writes `bytes` to `path` atomically (see [`write_atomically`]), readable
/// by everyone (mode 0644 on Unix, whatever the umask): for files a service
/// user must read and that hold no secret, such as a packed plugin.
///
/// # Errors
/// [`OutputError::Io`].
pub fn write_shared_bytes(path: &Path, bytes: &[u8]) -> Result<(), OutputError> {
    write_atomically_with_mode(path, Some(0o644), |out| {
        out.write_all(bytes).map_err(|source| OutputError::Io {
            path: path.display().to_string(),
            source,
        })
    })
}

/// [`write_atomically`], setting the file's Unix mode before it is renamed
/// into place (`None`: the temporary file's 0600).
fn write_atomically_with_mode(
    path: &Path,
    #[cfg_attr(not(unix), allow(unused_variables))] mode: Option<u32>,
    fill: impl FnOnce(&mut dyn Write) -> Result<(), OutputError>,
) -> Result<(), OutputError> {
    let io = |source| OutputError::Io {
        path: path.display().to_string(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".oxbox-")
        .suffix(".part")
        .tempfile_in(dir)
        .map_err(io)?;
    {
        let mut out = BufWriter::new(tmp.as_file_mut());
        fill(&mut out)?;
        out.flush().map_err(io)?;
    }
    #[cfg(unix)]
    if let Some(mode) = mode {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io)?;
    }
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Writes `bytes` to `path` atomically (see [`write_atomically`]).
///
/// # Errors
/// [`OutputError::Io`].
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<(), OutputError> {
    write_atomically(path, |out| {
        out.write_all(bytes).map_err(|source| OutputError::Io {
            path: path.display().to_string(),
            source,
        })
    })
}

/// Creates `path` as a new file readable by its owner only (mode 0600 on
/// Unix) and writes `bytes`: for keys. Fails if the file exists.
///
/// # Errors
/// Any I/O error, including an existing file.
pub fn write_new_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// The bytes of a NumPy `.npy` (format 1.0) file holding float32,
/// little-endian, C-order data of the given shape.
pub fn npy_f32_bytes(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims = match shape {
        [one] => format!("({one},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + data.len() * 4);
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    bytes
}

/// Writes a float32 tensor as `.npy`, atomically.
///
/// # Errors
/// [`OutputError::Io`].
pub fn write_npy(path: &Path, shape: &[usize], data: &[f32]) -> Result<(), OutputError> {
    let bytes = npy_f32_bytes(shape, data);
    write_atomically(path, |out| {
        out.write_all(&bytes).map_err(|source| OutputError::Io {
            path: path.display().to_string(),
            source,
        })
    })
}

/// Writes a `size` × `size` image with values in [0, 1] as an 8-bit
/// grayscale PNG (0 black, 1 white), atomically.
///
/// # Errors
/// [`OutputError::Io`] or [`OutputError::Png`].
pub fn write_png_gray(path: &Path, size: u32, data: &[f32]) -> Result<(), OutputError> {
    let pixels: Vec<u8> = data
        .iter()
        .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    let png_err = |e: png::EncodingError| OutputError::Png {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    write_atomically(path, |out| {
        let mut encoder = png::Encoder::new(out, size, size);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(png_err)?;
        writer.write_image_data(&pixels).map_err(png_err)?;
        writer.finish().map_err(png_err)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_parsable() {
        let bytes = npy_f32_bytes(&[1, 2, 2], &[0.0, 0.25, 0.5, 1.0]);
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).expect("ascii");
        assert!(header.contains("'shape': (1, 2, 2)"), "{header}");
        assert!(header.ends_with('\n'));
        assert_eq!(bytes.len(), 10 + header_len + 16);
        assert_eq!(&bytes[bytes.len() - 4..], &1.0f32.to_le_bytes());
    }

    #[test]
    fn failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.npy");
        let result = write_atomically(&path, |out| {
            out.write_all(b"half").map_err(|source| OutputError::Io {
                path: "x".into(),
                source,
            })?;
            Err(OutputError::Png {
                path: "x".into(),
                reason: "simulated failure".into(),
            })
        });
        assert!(result.is_err());
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0);
    }
}
