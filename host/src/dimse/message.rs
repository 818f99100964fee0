//! DIMSE command sets (PS3.7 section 9.3, always Implicit VR Little Endian)
//! and the file meta group written in front of a received data set (PS3.10
//! section 7.1): the few elements the listener reads and writes, encoded
//! by hand. A command set from the peer is parsed under a size bound and
//! never trusted beyond it: an element that runs past the end is an error.

/// Largest command set accepted from a peer, bytes (a C-STORE-RQ is a few
/// hundred bytes; the bound keeps a hostile peer from growing the buffer).
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// Command Field (0000,0100) of C-STORE-RQ.
pub const C_STORE_RQ: u16 = 0x0001;
/// Command Field of C-STORE-RSP.
pub const C_STORE_RSP: u16 = 0x8001;
/// Command Field of C-ECHO-RQ.
pub const C_ECHO_RQ: u16 = 0x0030;
/// Command Field of C-ECHO-RSP.
pub const C_ECHO_RSP: u16 = 0x8030;
/// Command Data Set Type (0000,0800) meaning "no data set follows".
pub const NO_DATA_SET: u16 = 0x0101;

/// DIMSE status codes this listener answers with (PS3.4 annex B.2.3, PS3.7
/// annex C).
pub mod status {
    /// Success.
    pub const SUCCESS: u16 = 0x0000;
    /// Refused: out of resources (memory budget, disk reserve, shutdown).
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Error: data set does not match SOP class.
    pub const DATA_SET_MISMATCH: u16 = 0xA900;
    /// Error: cannot understand (the data set does not parse, or breaks a
    /// limit of the ingest).
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    /// Refused: SOP class not supported.
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Unrecognized operation.
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
}

/// Why a command set could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// An element header or value runs past the end of the command set.
    #[error("truncated command set: element ({group:04X},{element:04X}) runs past its end")]
    Truncated {
        /// The element's group.
        group: u16,
        /// The element's number.
        element: u16,
    },
    /// The command set is over [`MAX_COMMAND_BYTES`].
    #[error("command set of {0} bytes, over the {MAX_COMMAND_BYTES}-byte bound")]
    TooLarge(usize),
    /// A required element is absent.
    #[error("command set without {0}")]
    Missing(&'static str),
}

/// The elements of a request command set the listener uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Command {
    /// Command Field (0000,0100).
    pub field: u16,
    /// Message ID (0000,0110).
    pub message_id: u16,
    /// Affected SOP Class UID (0000,0002), padding trimmed.
    pub sop_class_uid: String,
    /// Affected SOP Instance UID (0000,1000), padding trimmed.
    pub sop_instance_uid: String,
    /// Command Data Set Type (0000,0800).
    pub data_set_type: u16,
}

impl Command {
    /// Whether a data set follows the command.
    pub fn has_data_set(&self) -> bool {
        self.data_set_type != NO_DATA_SET
    }

    /// Parses an Implicit VR Little Endian command set.
    ///
    /// # Errors
    /// [`CommandError`] when it is too large, truncated, or lacks the
    /// Command Field.
    pub fn parse(bytes: &[u8]) -> Result<Self, CommandError> {
        if bytes.len() > MAX_COMMAND_BYTES {
            return Err(CommandError::TooLarge(bytes.len()));
        }
        let mut command = Command {
            data_set_type: NO_DATA_SET,
            ..Command::default()
        };
        let mut field = None;
        let mut at = 0usize;
        while at < bytes.len() {
            let header = bytes.get(at..at + 8).ok_or(CommandError::Truncated {
                group: 0,
                element: 0,
            })?;
            let group = u16::from_le_bytes([header[0], header[1]]);
            let element = u16::from_le_bytes([header[2], header[3]]);
            let length = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
            let start = at + 8;
            let value = start
                .checked_add(length)
                .and_then(|end| bytes.get(start..end))
                .ok_or(CommandError::Truncated { group, element })?;
            let us = || value.get(..2).map(|v| u16::from_le_bytes([v[0], v[1]]));
            match (group, element) {
                (0x0000, 0x0100) => field = us(),
                (0x0000, 0x0110) => command.message_id = us().unwrap_or(0),
                (0x0000, 0x0800) => command.data_set_type = us().unwrap_or(NO_DATA_SET),
                (0x0000, 0x0002) => command.sop_class_uid = uid_text(value),
                (0x0000, 0x1000) => command.sop_instance_uid = uid_text(value),
                _ => {}
            }
            at = start + length;
        }
        command.field = field.ok_or(CommandError::Missing("Command Field (0000,0100)"))?;
        Ok(command)
    }
}

/// A UID value without its padding (NUL or space), lossily as text.
fn uid_text(value: &[u8]) -> String {
    String::from_utf8_lossy(value)
        .trim_end_matches(['\0', ' '])
        .to_owned()
}

/// Whether `uid` is a well-formed UID: 1 to 64 characters of digits and
/// dots, no empty component (PS3.5 section 9.1). Received UIDs name files,
/// so nothing else is let through.
pub fn is_uid(uid: &str) -> bool {
    (1..=64).contains(&uid.len())
        && uid.split('.').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_digit())
                && (c == "0" || !c.starts_with('0'))
        })
}

/// A response command set: `field` (C-ECHO-RSP or C-STORE-RSP) answering
/// `request`, with `status`; no data set follows.
pub fn response(field: u16, request: &Command, status: u16) -> Vec<u8> {
    let mut body = Vec::with_capacity(160);
    push_uid(&mut body, 0x0002, &request.sop_class_uid);
    push_us(&mut body, 0x0100, field);
    push_us(&mut body, 0x0120, request.message_id);
    push_us(&mut body, 0x0800, NO_DATA_SET);
    push_us(&mut body, 0x0900, status);
    if !request.sop_instance_uid.is_empty() {
        push_uid(&mut body, 0x1000, &request.sop_instance_uid);
    }
    let mut out = Vec::with_capacity(body.len() + 12);
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&4u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn push_us(out: &mut Vec<u8>, element: u16, value: u16) {
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&element.to_le_bytes());
    out.extend_from_slice(&2u32.to_le_bytes());
    out.extend_from_slice(&value.to_le_bytes());
}

fn push_uid(out: &mut Vec<u8>, element: u16, uid: &str) {
    let padded = padded(uid, 0);
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&element.to_le_bytes());
    out.extend_from_slice(&(padded.len() as u32).to_le_bytes());
    out.extend_from_slice(&padded);
}

/// `text`'s bytes padded to even length with `pad`.
fn padded(text: &str, pad: u8) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    if !bytes.len().is_multiple_of(2) {
        bytes.push(pad);
    }
    bytes
}

/// The Implementation Class UID written in file meta groups (under the
/// 2.25 root: a UUID-derived UID, PS3.5 annex B.2).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.170309223171829283931417457640392310517";

/// The preamble, `DICM` and the file meta group of a Part 10 file holding a
/// data set of `sop_class_uid` / `sop_instance_uid` in `transfer_syntax`,
/// received from `source_ae`. The data set's bytes, as received, follow.
pub fn file_meta(
    sop_class_uid: &str,
    sop_instance_uid: &str,
    transfer_syntax: &str,
    source_ae: &str,
) -> Vec<u8> {
    let mut group = Vec::with_capacity(256);
    explicit(&mut group, 0x0001, b"OB", &[0, 1]);
    explicit(&mut group, 0x0002, b"UI", &padded(sop_class_uid, 0));
    explicit(&mut group, 0x0003, b"UI", &padded(sop_instance_uid, 0));
    explicit(&mut group, 0x0010, b"UI", &padded(transfer_syntax, 0));
    explicit(
        &mut group,
        0x0012,
        b"UI",
        &padded(IMPLEMENTATION_CLASS_UID, 0),
    );
    explicit(
        &mut group,
        0x0013,
        b"SH",
        &padded(concat!("OXBOX_", env!("CARGO_PKG_VERSION")), b' '),
    );
    if !source_ae.is_empty() {
        explicit(&mut group, 0x0016, b"AE", &padded(source_ae.trim(), b' '));
    }
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    explicit(&mut out, 0x0000, b"UL", &(group.len() as u32).to_le_bytes());
    out.extend_from_slice(&group);
    out
}

/// One explicit VR little-endian element of group 0002.
fn explicit(out: &mut Vec<u8>, element: u16, vr: &[u8; 2], value: &[u8]) {
    out.extend_from_slice(&0x0002u16.to_le_bytes());
    out.extend_from_slice(&element.to_le_bytes());
    out.extend_from_slice(vr);
    if vr == b"OB" {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    }
    out.extend_from_slice(value);
}

/// The name of a PDU's type, for errors and logs.
pub fn pdu_name(pdu: &dicom_ul::Pdu) -> &'static str {
    use dicom_ul::Pdu;
    match pdu {
        Pdu::Unknown { .. } => "unknown",
        Pdu::AssociationRQ(_) => "A-ASSOCIATE-RQ",
        Pdu::AssociationAC(_) => "A-ASSOCIATE-AC",
        Pdu::AssociationRJ(_) => "A-ASSOCIATE-RJ",
        Pdu::PData { .. } => "P-DATA-TF",
        Pdu::ReleaseRQ => "A-RELEASE-RQ",
        Pdu::ReleaseRP => "A-RELEASE-RP",
        Pdu::AbortRQ { .. } => "A-ABORT",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_parses_back_with_its_fields() {
        let request = Command {
            field: C_STORE_RQ,
            message_id: 7,
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.1".to_owned(),
            sop_instance_uid: "1.2.3.4.5".to_owned(),
            data_set_type: 0,
        };
        let bytes = response(C_STORE_RSP, &request, status::SUCCESS);
        let parsed = Command::parse(&bytes).expect("parses");
        assert_eq!(parsed.field, C_STORE_RSP);
        assert_eq!(parsed.sop_class_uid, request.sop_class_uid);
        assert_eq!(parsed.sop_instance_uid, request.sop_instance_uid);
        assert!(!parsed.has_data_set());
        // The group length counts exactly the elements after it.
        let length = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
        assert_eq!(length, bytes.len() - 12);
    }

    #[test]
    fn truncated_and_oversized_command_sets_are_errors() {
        let request = Command {
            field: C_ECHO_RQ,
            message_id: 1,
            sop_class_uid: "1.2.840.10008.1.1".to_owned(),
            ..Command::default()
        };
        let bytes = response(C_ECHO_RSP, &request, status::SUCCESS);
        for cut in [3, 9, bytes.len() - 1] {
            assert!(Command::parse(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // A length that points far past the end.
        let mut lying = bytes.clone();
        lying[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Command::parse(&lying),
            Err(CommandError::Truncated { .. })
        ));
        assert_eq!(
            Command::parse(&vec![0; MAX_COMMAND_BYTES + 1]),
            Err(CommandError::TooLarge(MAX_COMMAND_BYTES + 1))
        );
        assert_eq!(
            Command::parse(&[]),
            Err(CommandError::Missing("Command Field (0000,0100)"))
        );
    }

    #[test]
    fn uids_that_could_escape_a_folder_are_not_uids() {
        assert!(is_uid("1.2.840.10008.5.1.4.1.1.1"));
        assert!(is_uid("2.25.0"));
        for bad in [
            "",
            "../etc",
            "1..2",
            "1.2.",
            "1.02",
            "1.2/3",
            &"1".repeat(65),
        ] {
            assert!(!is_uid(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_file_meta_group_is_read_back_by_the_ingest() {
        let meta = file_meta(
            "1.2.840.10008.5.1.4.1.1.7",
            "1.2.3",
            "1.2.840.10008.1.2.1",
            "PACS",
        );
        assert_eq!(&meta[128..132], b"DICM");
        // Group length = bytes after the group length element.
        let length = u32::from_le_bytes([meta[140], meta[141], meta[142], meta[143]]) as usize;
        assert_eq!(length, meta.len() - 144);
        assert!(meta.len().is_multiple_of(2));
    }
}
