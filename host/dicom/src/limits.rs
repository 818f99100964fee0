//! The input limits every DICOM file is checked against (`[limits]` in
//! the configuration): they bound what a hostile file can make the box
//! allocate before any pixel is decoded.

use serde::{Deserialize, Serialize};

/// `[limits]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// `max_image_megapixels = 100`: largest frame accepted (rows × columns).
    #[serde(default = "default_max_image_megapixels")]
    pub max_image_megapixels: u32,
    /// `max_dicom_file_mib = 1024`: largest DICOM file accepted.
    #[serde(default = "default_max_dicom_file_mib")]
    pub max_dicom_file_mib: u32,
    /// `max_inflated_mib = 256`: largest data set a file in the Deflated
    /// Explicit VR Little Endian transfer syntax may inflate to; beyond it
    /// the file is refused while it is being inflated (a deflate bomb never
    /// reaches memory).
    #[serde(default = "default_max_inflated_mib")]
    pub max_inflated_mib: u32,
}

fn default_max_image_megapixels() -> u32 {
    100
}

fn default_max_dicom_file_mib() -> u32 {
    1024
}

fn default_max_inflated_mib() -> u32 {
    256
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_image_megapixels: default_max_image_megapixels(),
            max_dicom_file_mib: default_max_dicom_file_mib(),
            max_inflated_mib: default_max_inflated_mib(),
        }
    }
}

impl LimitsConfig {
    /// The largest accepted frame, in pixels.
    pub fn max_image_pixels(&self) -> u64 {
        u64::from(self.max_image_megapixels) * 1_000_000
    }

    /// The largest accepted DICOM file, in bytes.
    pub fn max_dicom_file_bytes(&self) -> u64 {
        u64::from(self.max_dicom_file_mib) * 1024 * 1024
    }

    /// The largest data set a deflated file may inflate to, in bytes.
    pub fn max_inflated_bytes(&self) -> u64 {
        u64::from(self.max_inflated_mib) * 1024 * 1024
    }
}
