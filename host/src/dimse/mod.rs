//! DICOM networking (DIMSE over dicom-ul): the box as a service class user.
//!
//! - [`scu`]: C-STORE SCU, sending result SRs to the hospital's PACS
//!   (`[dicom.forward]`).
//!
//! The listener (C-ECHO / C-STORE SCP) lives beside it in `scp`.

pub mod scu;
