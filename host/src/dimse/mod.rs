//! DICOM networking (DIMSE over dicom-ul): the listener of `oxbox serve`
//! (`[dicom] enabled = true`), a C-ECHO and C-STORE service class provider,
//! and the C-STORE service class user that sends result SRs to the
//! hospital's PACS (`[dicom.forward]`).
//!
//! - [`scp`]: associations (AE titles, presentation contexts, PDU size,
//!   timeouts, the bound on concurrent associations) and the DIMSE
//!   exchanges on them;
//! - [`message`]: command sets and the file meta group, by hand;
//! - [`scu`]: C-STORE SCU (result SRs to the PACS, with retries).
//!
//! It trusts nothing a peer sends: every data set is received under the
//! server's memory budget and the ingest's file size limit, and handed as a
//! Part 10 file to an [`scp::InstanceSink`] (the studies glue of
//! [`crate::serve`]), which parses it with the same bounded parser as an
//! HTTP upload before anything is stored.

pub mod message;
pub mod scp;
pub mod scu;

use dicom_dictionary_std::uids;

/// Verification (C-ECHO).
pub const VERIFICATION: &str = uids::VERIFICATION;

/// The abstract syntaxes accepted: Verification and the image storage SOP
/// classes a chest radiograph arrives as.
pub const ABSTRACT_SYNTAXES: [&str; 5] = [
    uids::VERIFICATION,
    uids::COMPUTED_RADIOGRAPHY_IMAGE_STORAGE,
    uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION,
    uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PROCESSING,
    uids::SECONDARY_CAPTURE_IMAGE_STORAGE,
];

/// The transfer syntaxes accepted: exactly those the ingest reads
/// ([`crate::dicom::pixels::READABLE_TRANSFER_SYNTAXES`]), in its order of
/// preference.
pub const TRANSFER_SYNTAXES: [&str; 16] = crate::dicom::pixels::READABLE_TRANSFER_SYNTAXES;
