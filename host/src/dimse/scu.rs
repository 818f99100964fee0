//! C-STORE SCU: sends a Part 10 file (the result SR) to a configured PACS
//! (AE title, host, port), with timeouts, retries and backoff.
//!
//! One association per attempt, one presentation context: the file's SOP
//! class with the file's transfer syntax, then Explicit and Implicit VR
//! Little Endian. A file in a native (uncompressed) transfer syntax is
//! re-encoded into whichever of these the peer accepts; a compressed one is
//! proposed in its own transfer syntax only (pixel data is never transcoded).
//!
//! Every failure is an [`ScuError`] that says what happened: the connection,
//! a rejection with its reason, no accepted presentation context, a timeout
//! (and at which stage), an abort, a protocol violation by the peer, or a
//! C-STORE failure status with its meaning. Transient failures (connection,
//! timeout, abort, transient rejection, "out of resources") are retried
//! after `retry_backoff_s`, doubling each time; permanent ones are not.
//!
//! The calls block (socket I/O and the backoff sleeps): an async caller runs
//! them under `tokio::task::spawn_blocking`. Nothing here logs or returns a
//! value of the data set (the SOP Instance UID is not quoted either).

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::{FileDicomObject, InMemDicomObject, OpenFileOptions};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::association::Error as UlError;
use dicom_ul::pdu::{
    AssociationRJResult, PDataValue, PDataValueType, Pdu, PresentationContextNegotiated,
};
use dicom_ul::{ClientAssociation, ClientAssociationOptions};
use serde::{Deserialize, Serialize};

/// `[dicom.forward]`: where result SRs are sent (the `forward` field of
/// [`crate::config::DicomConfig`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForwardConfig {
    /// Send each result SR to the PACS.
    pub enabled: bool,
    /// The PACS's host name or address.
    pub host: String,
    /// The PACS's DICOM port.
    pub port: u16,
    /// The PACS's AE title (Called AE Title).
    pub called_ae_title: String,
    /// The box's AE title when it calls (Calling AE Title).
    pub calling_ae_title: String,
    /// Attempts after the first one, for transient failures.
    pub retries: u32,
    /// Seconds before the first retry; doubled for each further one (at
    /// most 300 s between two attempts).
    pub retry_backoff_s: f64,
    /// Seconds allowed for the connection, and for each read and write on
    /// the association.
    pub timeout_s: f64,
    /// Largest PDU the box accepts from the PACS (bytes).
    pub max_pdu_length: u32,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            host: String::new(),
            port: 104,
            called_ae_title: String::new(),
            calling_ae_title: "OXBOX".into(),
            retries: 3,
            retry_backoff_s: 5.0,
            timeout_s: 30.0,
            max_pdu_length: 65_536,
        }
    }
}

impl ForwardConfig {
    /// Checks the settings (all of them when `enabled`, only their shape
    /// otherwise).
    ///
    /// # Errors
    /// [`ScuError::Config`] naming the key.
    pub fn validate(&self) -> Result<(), ScuError> {
        let bad = |key: &'static str, reason: &str| ScuError::Config {
            key,
            reason: reason.to_owned(),
        };
        if self.enabled {
            if self.host.trim().is_empty() {
                return Err(bad("dicom.forward.host", "is empty"));
            }
            if self.port == 0 {
                return Err(bad("dicom.forward.port", "is 0"));
            }
            check_ae_title("dicom.forward.called_ae_title", &self.called_ae_title)?;
        }
        check_ae_title("dicom.forward.calling_ae_title", &self.calling_ae_title)?;
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0 && self.timeout_s <= 3600.0) {
            return Err(bad("dicom.forward.timeout_s", "must be in (0, 3600]"));
        }
        if !(self.retry_backoff_s.is_finite() && (0.0..=300.0).contains(&self.retry_backoff_s)) {
            return Err(bad("dicom.forward.retry_backoff_s", "must be in [0, 300]"));
        }
        if self.retries > 100 {
            return Err(bad("dicom.forward.retries", "must be at most 100"));
        }
        if !(4096..=16 * 1024 * 1024).contains(&self.max_pdu_length) {
            return Err(bad(
                "dicom.forward.max_pdu_length",
                "must be in [4096, 16777216]",
            ));
        }
        Ok(())
    }

    /// The peer to send to.
    pub fn target(&self) -> StoreTarget {
        StoreTarget {
            host: self.host.clone(),
            port: self.port,
            called_ae_title: self.called_ae_title.clone(),
            calling_ae_title: self.calling_ae_title.clone(),
            timeout: Duration::from_secs_f64(self.timeout_s.max(0.001)),
            max_pdu_length: self.max_pdu_length,
        }
    }

    /// How failures are retried.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            retries: self.retries,
            backoff: Duration::from_secs_f64(self.retry_backoff_s.max(0.0)),
        }
    }
}

/// An AE title: 1 to 16 characters of printable ASCII but backslash, not
/// only spaces (PS3.5 AE).
fn check_ae_title(key: &'static str, title: &str) -> Result<(), ScuError> {
    let ok = !title.trim().is_empty()
        && title.len() <= 16
        && title
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'\\');
    if ok {
        Ok(())
    } else {
        Err(ScuError::Config {
            key,
            reason: "must be 1 to 16 printable ASCII characters (no backslash), not only spaces"
                .into(),
        })
    }
}

/// A Storage SCP to send to.
#[derive(Debug, Clone)]
pub struct StoreTarget {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Called AE title.
    pub called_ae_title: String,
    /// Calling AE title.
    pub calling_ae_title: String,
    /// Connection timeout, and the timeout of every read and write.
    pub timeout: Duration,
    /// Largest PDU accepted from the peer.
    pub max_pdu_length: u32,
}

/// How transient failures are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts after the first.
    pub retries: u32,
    /// Wait before the first retry, doubled for each further one (capped at
    /// [`MAX_BACKOFF`]).
    pub backoff: Duration,
}

/// The longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

impl RetryPolicy {
    /// The wait before retry number `retry` (1-based).
    pub fn delay(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.saturating_sub(1).min(16));
        self.backoff.saturating_mul(factor).min(MAX_BACKOFF)
    }
}

/// A completed store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOutcome {
    /// Attempts made (1 when the first succeeded).
    pub attempts: u32,
    /// The C-STORE status: 0x0000, or a warning (0xB000, 0xB006, 0xB007).
    pub status: u16,
    /// The transfer syntax the data set was sent in.
    pub transfer_syntax: String,
}

/// Why a store failed.
#[derive(Debug, thiserror::Error)]
pub enum ScuError {
    /// A setting is invalid.
    #[error("{key}: {reason}")]
    Config {
        /// The configuration key.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The file could not be read as DICOM.
    #[error("cannot read {path} as a DICOM file: {reason}")]
    Read {
        /// The file.
        path: String,
        /// What the parser said.
        reason: String,
    },
    /// The object lacks what a C-STORE needs.
    #[error("the object has no {keyword}")]
    MissingAttribute {
        /// DICOM keyword.
        keyword: &'static str,
    },
    /// The object could not be encoded for sending.
    #[error("cannot encode the data set in {transfer_syntax}: {reason}")]
    Encode {
        /// The transfer syntax.
        transfer_syntax: String,
        /// What dicom-rs said.
        reason: String,
    },
    /// The PACS could not be reached.
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// host:port.
        address: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The PACS did not answer in time.
    #[error("{address}: no answer within {timeout_s} s ({stage})")]
    Timeout {
        /// host:port.
        address: String,
        /// What was being waited for.
        stage: &'static str,
        /// The timeout.
        timeout_s: f64,
    },
    /// The PACS rejected the association.
    #[error("{address}: association rejected ({kind}): {reason}")]
    Rejected {
        /// host:port.
        address: String,
        /// `permanent` or `transient`.
        kind: &'static str,
        /// The reason the PACS gave (source and reason of A-ASSOCIATE-RJ).
        reason: String,
    },
    /// The PACS accepted none of the proposed transfer syntaxes for the SOP
    /// class.
    #[error(
        "{address}: no presentation context accepted for SOP class {sop_class} \
         in transfer syntaxes {transfer_syntaxes}"
    )]
    NoPresentationContext {
        /// host:port.
        address: String,
        /// The SOP class UID.
        sop_class: String,
        /// The proposed transfer syntaxes.
        transfer_syntaxes: String,
    },
    /// The PACS aborted the association.
    #[error("{address}: association aborted by the peer ({stage})")]
    Aborted {
        /// host:port.
        address: String,
        /// What was going on.
        stage: &'static str,
    },
    /// The PACS broke the protocol or closed the connection.
    #[error("{address}: {reason}")]
    Protocol {
        /// host:port.
        address: String,
        /// What happened.
        reason: String,
    },
    /// The PACS answered the C-STORE with a failure status.
    #[error(
        "{address}: C-STORE failed with status 0x{status:04X} ({meaning}){}",
        comment_suffix(.comment)
    )]
    StoreFailed {
        /// host:port.
        address: String,
        /// The DIMSE status.
        status: u16,
        /// Its meaning (PS3.4 Annex B, PS3.7 Annex C).
        meaning: &'static str,
        /// The peer's Error Comment, if any.
        comment: Option<String>,
    },
}

impl ScuError {
    /// Whether another attempt may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            ScuError::Connect { .. }
            | ScuError::Timeout { .. }
            | ScuError::Aborted { .. }
            | ScuError::Protocol { .. } => true,
            ScuError::Rejected { kind, .. } => *kind == "transient",
            ScuError::StoreFailed { status, .. } => {
                (0xA700..=0xA7FF).contains(status) || *status == 0x0110
            }
            ScuError::Config { .. }
            | ScuError::Read { .. }
            | ScuError::MissingAttribute { .. }
            | ScuError::Encode { .. }
            | ScuError::NoPresentationContext { .. } => false,
        }
    }
}

fn comment_suffix(comment: &Option<String>) -> String {
    comment
        .as_deref()
        .map(|c| format!(": {c}"))
        .unwrap_or_default()
}

/// What a C-STORE status means.
pub fn status_meaning(status: u16) -> &'static str {
    match status {
        0x0000 => "success",
        0xB000 => "warning: coercion of data elements",
        0xB006 => "warning: elements discarded",
        0xB007 => "warning: data set does not match SOP class",
        0x0110 => "processing failure",
        0x0117 => "invalid SOP instance",
        0x0122 => "refused: SOP class not supported",
        0x0124 => "refused: not authorized",
        0x0210 => "duplicate invocation",
        0x0211 => "unrecognized operation",
        0x0212 => "mistyped argument",
        0xA700..=0xA7FF => "refused: out of resources",
        0xA900..=0xA9FF => "error: data set does not match SOP class",
        0xC000..=0xCFFF => "error: cannot understand",
        _ => "unknown failure status",
    }
}

fn is_success_or_warning(status: u16) -> bool {
    matches!(status, 0x0000 | 0xB000 | 0xB006 | 0xB007)
}

/// A store that failed: the last attempt's error (or the first permanent
/// one) and how many attempts were made.
#[derive(Debug, thiserror::Error)]
#[error("after {attempts} attempt(s): {error}")]
pub struct StoreFailure {
    /// Attempts made.
    pub attempts: u32,
    /// Why the last one failed.
    pub error: ScuError,
}

/// Sends the Part 10 file at `path` to `target`, retrying transient
/// failures under `policy`.
///
/// # Errors
/// [`StoreFailure`]: the last attempt's failure, or the first permanent one.
pub fn store_file(
    path: &Path,
    target: &StoreTarget,
    policy: &RetryPolicy,
) -> Result<StoreOutcome, StoreFailure> {
    let object = OpenFileOptions::new()
        .open_file(path)
        .map_err(|e| StoreFailure {
            attempts: 0,
            error: ScuError::Read {
                path: path.display().to_string(),
                reason: e.to_string(),
            },
        })?;
    store(&object, target, policy)
}

/// Sends `object` to `target`, retrying transient failures under `policy`.
///
/// # Errors
/// [`StoreFailure`]: the last attempt's failure, or the first permanent one.
pub fn store(
    object: &FileDicomObject<InMemDicomObject>,
    target: &StoreTarget,
    policy: &RetryPolicy,
) -> Result<StoreOutcome, StoreFailure> {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match store_once(object, target) {
            Ok((status, transfer_syntax)) => {
                return Ok(StoreOutcome {
                    attempts: attempt,
                    status,
                    transfer_syntax,
                });
            }
            Err(e) if e.is_transient() && attempt <= policy.retries => {
                let delay = policy.delay(attempt);
                tracing::warn!(
                    attempt,
                    retry_in_s = delay.as_secs_f64(),
                    "C-STORE to the PACS failed, retrying: {e}"
                );
                std::thread::sleep(delay);
            }
            Err(error) => {
                return Err(StoreFailure {
                    attempts: attempt,
                    error,
                });
            }
        }
    }
}

/// The SOP class and instance of `object` (data set first, then file meta).
fn sop_identity(object: &FileDicomObject<InMemDicomObject>) -> Result<(String, String), ScuError> {
    let get = |tag, meta: &str, keyword| {
        object
            .element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_str().ok().map(|s| s.into_owned()))
            .or_else(|| Some(meta.to_owned()))
            .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
            .filter(|s| !s.is_empty())
            .ok_or(ScuError::MissingAttribute { keyword })
    };
    Ok((
        get(
            tags::SOP_CLASS_UID,
            object.meta().media_storage_sop_class_uid(),
            "SOPClassUID",
        )?,
        get(
            tags::SOP_INSTANCE_UID,
            object.meta().media_storage_sop_instance_uid(),
            "SOPInstanceUID",
        )?,
    ))
}

/// The transfer syntaxes to propose for `object`.
fn proposed_transfer_syntaxes(object: &FileDicomObject<InMemDicomObject>) -> Vec<String> {
    let own = object
        .meta()
        .transfer_syntax()
        .trim_end_matches(['\0', ' '])
        .to_owned();
    let native = TransferSyntaxRegistry
        .get(&own)
        .is_some_and(|ts| !ts.is_encapsulated_pixel_data());
    let mut list = vec![own];
    if native {
        for ts in [
            uids::EXPLICIT_VR_LITTLE_ENDIAN,
            uids::IMPLICIT_VR_LITTLE_ENDIAN,
        ] {
            if !list.iter().any(|t| t == ts) {
                list.push(ts.to_owned());
            }
        }
    }
    list
}

/// One association: negotiate, C-STORE, release. Returns the status and
/// the transfer syntax used.
fn store_once(
    object: &FileDicomObject<InMemDicomObject>,
    target: &StoreTarget,
) -> Result<(u16, String), ScuError> {
    let address = format!("{}:{}", target.host, target.port);
    let (sop_class, sop_instance) = sop_identity(object)?;
    let proposed = proposed_transfer_syntaxes(object);
    let timeout_s = target.timeout.as_secs_f64();

    let options = ClientAssociationOptions::new()
        .calling_ae_title(target.calling_ae_title.as_str())
        .called_ae_title(target.called_ae_title.as_str())
        .with_presentation_context(sop_class.clone(), proposed.clone())
        .max_pdu_length(target.max_pdu_length)
        .connection_timeout(target.timeout)
        .read_timeout(target.timeout)
        .write_timeout(target.timeout);
    let mut association = options
        .establish((target.host.as_str(), target.port))
        .map_err(|e| match e {
            UlError::NoAcceptedPresentationContexts { .. } => ScuError::NoPresentationContext {
                address: address.clone(),
                sop_class: sop_class.clone(),
                transfer_syntaxes: proposed.join(", "),
            },
            e => ul_error(e, &address, "association", timeout_s),
        })?;
    let context = association
        .presentation_contexts()
        .first()
        .cloned()
        .ok_or_else(|| ScuError::NoPresentationContext {
            address: address.clone(),
            sop_class: sop_class.clone(),
            transfer_syntaxes: proposed.join(", "),
        })?;
    let ts_uid = context
        .transfer_syntax
        .trim_end_matches(['\0', ' '])
        .to_owned();

    let result = exchange(
        &mut association,
        object,
        &context,
        &proposed,
        (&sop_class, &sop_instance),
        &address,
        timeout_s,
    );
    match result {
        Ok(status) => {
            // The store is done; a failed release changes nothing for it.
            if let Err(e) = association.release() {
                tracing::debug!("A-RELEASE with the PACS failed after the store: {e}");
            }
            Ok((status, ts_uid))
        }
        Err(e) => {
            let _ = association.abort();
            Err(e)
        }
    }
}

/// The C-STORE exchange on an established association: the request, the
/// data set in the negotiated transfer syntax, the response's status.
fn exchange(
    association: &mut ClientAssociation<TcpStream>,
    object: &FileDicomObject<InMemDicomObject>,
    context: &PresentationContextNegotiated,
    proposed: &[String],
    (sop_class, sop_instance): (&str, &str),
    address: &str,
    timeout_s: f64,
) -> Result<u16, ScuError> {
    let ts_uid = context.transfer_syntax.trim_end_matches(['\0', ' ']);
    let ts = TransferSyntaxRegistry
        .get(ts_uid)
        .filter(|_| proposed.iter().any(|p| p == ts_uid))
        .ok_or_else(|| ScuError::Protocol {
            address: address.into(),
            reason: format!("the peer accepted transfer syntax {ts_uid}, which was not proposed"),
        })?;
    let mut data = Vec::new();
    object
        .write_dataset_with_ts(&mut data, ts)
        .map_err(|e| ScuError::Encode {
            transfer_syntax: ts_uid.to_owned(),
            reason: e.to_string(),
        })?;
    let command = store_command(sop_class, sop_instance)?;
    association
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: context.id,
                value_type: PDataValueType::Command,
                is_last: true,
                data: command,
            }],
        })
        .map_err(|e| ul_error(e, address, "sending the C-STORE request", timeout_s))?;
    {
        let mut writer = association.send_pdata(context.id);
        writer
            .write_all(&data)
            .and_then(|()| writer.finish())
            .map_err(|e| io_error(e, address, "sending the data set", timeout_s))?;
    }
    let response = receive_command(association, address, timeout_s)?;
    check_response(&response, address)
}

/// The C-STORE-RQ command set, encoded in Implicit VR Little Endian.
fn store_command(sop_class: &str, sop_instance: &str) -> Result<Vec<u8>, ScuError> {
    encode_command(InMemDicomObject::from_element_iter([
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(sop_class),
        ),
        DataElement::new(tags::COMMAND_FIELD, VR::US, PrimitiveValue::from(0x0001u16)),
        DataElement::new(tags::MESSAGE_ID, VR::US, PrimitiveValue::from(1u16)),
        DataElement::new(tags::PRIORITY, VR::US, PrimitiveValue::from(0u16)),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(0x0000u16),
        ),
        DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(sop_instance),
        ),
    ]))
}

/// A command set with its Command Group Length, in Implicit VR Little
/// Endian (PS3.7 §6.3.1).
fn encode_command(mut command: InMemDicomObject) -> Result<Vec<u8>, ScuError> {
    let ts = TransferSyntaxRegistry
        .get(uids::IMPLICIT_VR_LITTLE_ENDIAN)
        .ok_or_else(|| ScuError::Encode {
            transfer_syntax: uids::IMPLICIT_VR_LITTLE_ENDIAN.into(),
            reason: "not in the registry".into(),
        })?;
    let encode = |obj: &InMemDicomObject| {
        let mut bytes = Vec::new();
        obj.write_dataset_with_ts(&mut bytes, ts)
            .map_err(|e| ScuError::Encode {
                transfer_syntax: uids::IMPLICIT_VR_LITTLE_ENDIAN.into(),
                reason: e.to_string(),
            })?;
        Ok::<_, ScuError>(bytes)
    };
    command.remove_element(tags::COMMAND_GROUP_LENGTH);
    let length = u32::try_from(encode(&command)?.len()).map_err(|_| ScuError::Encode {
        transfer_syntax: uids::IMPLICIT_VR_LITTLE_ENDIAN.into(),
        reason: "command set over 4 GiB".into(),
    })?;
    command.put(DataElement::new(
        tags::COMMAND_GROUP_LENGTH,
        VR::UL,
        PrimitiveValue::from(length),
    ));
    encode(&command)
}

/// Reads P-DATA PDUs until a whole command set has arrived, and parses it.
fn receive_command(
    association: &mut ClientAssociation<TcpStream>,
    address: &str,
    timeout_s: f64,
) -> Result<InMemDicomObject, ScuError> {
    const MAX_COMMAND: usize = 64 * 1024;
    let mut command = Vec::new();
    loop {
        let pdu = association
            .receive()
            .map_err(|e| ul_error(e, address, "waiting for the C-STORE response", timeout_s))?;
        match pdu {
            Pdu::PData { data } => {
                for value in data {
                    if value.value_type != PDataValueType::Command {
                        continue;
                    }
                    command.extend_from_slice(&value.data);
                    if command.len() > MAX_COMMAND {
                        return Err(ScuError::Protocol {
                            address: address.into(),
                            reason: "C-STORE response command set over 64 KiB".into(),
                        });
                    }
                    if value.is_last {
                        let ts = TransferSyntaxRegistry
                            .get(uids::IMPLICIT_VR_LITTLE_ENDIAN)
                            .ok_or_else(|| ScuError::Protocol {
                                address: address.into(),
                                reason: "implicit VR little endian missing from the registry"
                                    .into(),
                            })?;
                        return InMemDicomObject::read_dataset_with_ts(&command[..], ts).map_err(
                            |e| ScuError::Protocol {
                                address: address.into(),
                                reason: format!("malformed C-STORE response: {e}"),
                            },
                        );
                    }
                }
            }
            Pdu::AbortRQ { .. } => {
                return Err(ScuError::Aborted {
                    address: address.into(),
                    stage: "waiting for the C-STORE response",
                });
            }
            other => {
                return Err(ScuError::Protocol {
                    address: address.into(),
                    reason: format!(
                        "unexpected {} while waiting for the C-STORE response",
                        super::message::pdu_name(&other)
                    ),
                });
            }
        }
    }
}

/// The status of a C-STORE-RSP (success or warning), or the failure.
fn check_response(response: &InMemDicomObject, address: &str) -> Result<u16, ScuError> {
    let uint = |tag| {
        response
            .element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_int::<u16>().ok())
    };
    let protocol = |reason: &str| ScuError::Protocol {
        address: address.into(),
        reason: reason.into(),
    };
    if uint(tags::COMMAND_FIELD) != Some(0x8001) {
        return Err(protocol("the response is not a C-STORE-RSP"));
    }
    if uint(tags::MESSAGE_ID_BEING_RESPONDED_TO) != Some(1) {
        return Err(protocol("the C-STORE-RSP answers another message"));
    }
    let status = uint(tags::STATUS).ok_or_else(|| protocol("the C-STORE-RSP has no Status"))?;
    if is_success_or_warning(status) {
        if status != 0 {
            tracing::warn!(
                status = format!("0x{status:04X}"),
                "the PACS stored the SR with a warning: {}",
                status_meaning(status)
            );
        }
        return Ok(status);
    }
    let comment = response
        .element_opt(tags::ERROR_COMMENT)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|s| {
            s.trim_end_matches(['\0', ' '])
                .chars()
                .filter(|c| !c.is_control())
                .take(64)
                .collect::<String>()
        })
        .filter(|s| !s.is_empty());
    Err(ScuError::StoreFailed {
        address: address.into(),
        status,
        meaning: status_meaning(status),
        comment,
    })
}

fn io_error(e: std::io::Error, address: &str, stage: &'static str, timeout_s: f64) -> ScuError {
    if matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    ) {
        ScuError::Timeout {
            address: address.into(),
            stage,
            timeout_s,
        }
    } else {
        ScuError::Protocol {
            address: address.into(),
            reason: format!("{stage}: {e}"),
        }
    }
}

/// The I/O error at the bottom of `e`'s chain, if any.
fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        current = err.source();
    }
    None
}

fn ul_error(e: UlError, address: &str, stage: &'static str, timeout_s: f64) -> ScuError {
    let timed_out = matches!(
        io_kind(&e),
        Some(std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock)
    );
    match e {
        UlError::Connect { source, .. } | UlError::ToAddress { source, .. } => {
            if timed_out {
                ScuError::Timeout {
                    address: address.into(),
                    stage: "connecting",
                    timeout_s,
                }
            } else {
                ScuError::Connect {
                    address: address.into(),
                    source,
                }
            }
        }
        UlError::Rejected { association_rj, .. } => ScuError::Rejected {
            address: address.into(),
            kind: match association_rj.result {
                AssociationRJResult::Permanent => "permanent",
                AssociationRJResult::Transient => "transient",
            },
            reason: association_rj.source.to_string(),
        },
        UlError::Aborted { .. } => ScuError::Aborted {
            address: address.into(),
            stage,
        },
        UlError::UnexpectedPdu { pdu, .. } if matches!(*pdu, Pdu::AbortRQ { .. }) => {
            ScuError::Aborted {
                address: address.into(),
                stage,
            }
        }
        _ if timed_out => ScuError::Timeout {
            address: address.into(),
            stage,
            timeout_s,
        },
        UlError::ConnectionClosed { .. } => ScuError::Protocol {
            address: address.into(),
            reason: format!("{stage}: the peer closed the connection"),
        },
        e => ScuError::Protocol {
            address: address.into(),
            reason: format!("{stage}: {}", snafu_chain(&e)),
        },
    }
}

/// `e` and its sources, joined (dicom-ul's messages are terse alone).
fn snafu_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut current = e.source();
    while let Some(err) = current {
        out.push_str(": ");
        out.push_str(&err.to_string());
        current = err.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitsConfig;
    use crate::dicom::DicomFile;
    use crate::model::{HorizonPrediction, Prediction};
    use crate::pipeline::ModelIdentity;
    use std::net::{TcpListener, TcpStream};
    use std::process::{Child, Command, Stdio};

    fn sample_path() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/chest-cr-sample.dcm")
    }

    /// A result SR built from the bundled sample radiograph.
    fn result_sr() -> FileDicomObject<InMemDicomObject> {
        let source = DicomFile::open(&sample_path(), &LimitsConfig::default()).expect("sample");
        let h = HorizonPrediction {
            p_o2_any: 0.5,
            p_o2_high_flow_or_niv: 0.25,
            p_ventilation_or_death: 0.125,
            exam_score: 0.3,
        };
        let model = ModelIdentity {
            name: "exam-demo".into(),
            version: "1".into(),
            digest: "ab".repeat(32),
            trained: true,
        };
        crate::sr::build_from(
            source.object(),
            &model,
            &Prediction { h24: h, h72: h },
            &crate::sr::SrOptions::default(),
        )
        .expect("SR")
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    }

    fn target(port: u16, timeout: Duration) -> StoreTarget {
        StoreTarget {
            host: "127.0.0.1".into(),
            port,
            called_ae_title: "PACS".into(),
            calling_ae_title: "OXBOX".into(),
            timeout,
            max_pdu_length: 16_384,
        }
    }

    fn no_retry() -> RetryPolicy {
        RetryPolicy {
            retries: 0,
            backoff: Duration::ZERO,
        }
    }

    /// dcmtk's storescp on loopback, killed on drop.
    struct StoreScp {
        child: Child,
        port: u16,
        dir: tempfile::TempDir,
    }

    impl StoreScp {
        fn start(extra: &[&str]) -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let port = free_port();
            let child = Command::new("storescp")
                .args(["-aet", "PACS", "-od"])
                .arg(dir.path())
                .args(extra)
                .arg(port.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("storescp (dcmtk: scripts/setup.sh --tests) runs");
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "storescp never listened"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            Self { child, port, dir }
        }

        fn stored(&self) -> Vec<std::path::PathBuf> {
            std::fs::read_dir(self.dir.path())
                .expect("output dir")
                .map(|e| e.expect("entry").path())
                .collect()
        }
    }

    impl Drop for StoreScp {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn text(obj: &InMemDicomObject, tag: dicom_core::Tag) -> String {
        obj.element(tag)
            .expect("present")
            .to_str()
            .expect("text")
            .trim_end_matches(['\0', ' '])
            .to_owned()
    }

    #[test]
    fn the_sr_reaches_storescp_intact() {
        let scp = StoreScp::start(&[]);
        let sr = result_sr();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sr.dcm");
        crate::sr::write(&path, &sr).expect("write");
        let outcome = store_file(
            &path,
            &target(scp.port, Duration::from_secs(10)),
            &no_retry(),
        )
        .expect("stored");
        assert_eq!(outcome.attempts, 1);
        assert_eq!(outcome.status, 0);
        assert_eq!(outcome.transfer_syntax, uids::EXPLICIT_VR_LITTLE_ENDIAN);
        let stored = scp.stored();
        assert_eq!(stored.len(), 1, "{stored:?}");
        let back = dicom_object::open_file(&stored[0]).expect("storescp's file");
        for tag in [
            tags::SOP_INSTANCE_UID,
            tags::SOP_CLASS_UID,
            tags::PATIENT_ID,
            tags::STUDY_INSTANCE_UID,
            tags::VERIFICATION_FLAG,
            tags::SERIES_DESCRIPTION,
        ] {
            assert_eq!(text(&back, tag), text(&sr, tag), "{tag}");
        }
        assert_eq!(
            back.element(tags::CONTENT_SEQUENCE)
                .expect("content")
                .items()
                .map(<[_]>::len),
            sr.element(tags::CONTENT_SEQUENCE)
                .expect("content")
                .items()
                .map(<[_]>::len)
        );
    }

    #[test]
    fn a_compressed_file_is_proposed_in_its_own_transfer_syntax_only() {
        let sample = sample_path();
        // storescp's default accepts uncompressed syntaxes only.
        let plain = StoreScp::start(&[]);
        let failure = store_file(
            &sample,
            &target(plain.port, Duration::from_secs(10)),
            &no_retry(),
        )
        .expect_err("JPEG 2000 not accepted");
        assert_eq!(failure.attempts, 1, "not retried");
        assert!(
            matches!(failure.error, ScuError::NoPresentationContext { .. }),
            "{failure}"
        );
        let message = failure.to_string();
        assert!(message.contains("1.2.840.10008.1.2.4.90"), "{message}");
        assert!(
            !message.contains(uids::EXPLICIT_VR_LITTLE_ENDIAN),
            "{message}"
        );
        assert!(plain.stored().is_empty());
        // With every syntax accepted, it goes as it is.
        let all = StoreScp::start(&["+xa"]);
        let outcome = store_file(
            &sample,
            &target(all.port, Duration::from_secs(10)),
            &no_retry(),
        )
        .expect("stored");
        assert_eq!(outcome.transfer_syntax, "1.2.840.10008.1.2.4.90");
        assert_eq!(all.stored().len(), 1);
    }

    #[test]
    fn a_refusing_peer_is_reported_with_its_reason_and_not_retried() {
        let scp = StoreScp::start(&["--refuse"]);
        let policy = RetryPolicy {
            retries: 3,
            backoff: Duration::from_millis(10),
        };
        let failure = store(
            &result_sr(),
            &target(scp.port, Duration::from_secs(10)),
            &policy,
        )
        .expect_err("refused");
        assert_eq!(failure.attempts, 1, "a permanent rejection is not retried");
        match &failure.error {
            ScuError::Rejected { kind, reason, .. } => {
                assert_eq!(*kind, "permanent");
                assert!(!reason.is_empty());
            }
            other => panic!("expected a rejection, got {other}"),
        }
        assert!(
            failure.to_string().contains("association rejected"),
            "{failure}"
        );
    }

    #[test]
    fn a_silent_peer_times_out_and_is_retried() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = accepted.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().flatten() {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(stream); // never answers
            }
        });
        let policy = RetryPolicy {
            retries: 2,
            backoff: Duration::from_millis(10),
        };
        let failure = store(
            &result_sr(),
            &target(port, Duration::from_millis(300)),
            &policy,
        )
        .expect_err("no answer");
        assert_eq!(failure.attempts, 3);
        assert!(
            matches!(failure.error, ScuError::Timeout { .. }),
            "{failure}"
        );
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert!(
            failure.to_string().contains("no answer within"),
            "{failure}"
        );
    }

    #[test]
    fn a_closed_port_is_a_connection_error_retried() {
        let port = free_port();
        let policy = RetryPolicy {
            retries: 1,
            backoff: Duration::ZERO,
        };
        let failure = store(&result_sr(), &target(port, Duration::from_secs(2)), &policy)
            .expect_err("nothing listens");
        assert_eq!(failure.attempts, 2);
        assert!(
            matches!(failure.error, ScuError::Connect { .. }),
            "{failure}"
        );
    }

    /// A one-association SCP (dicom-ul) answering the C-STORE with `status`.
    fn failing_scp(status: u16, associations: u32) -> (u16, std::thread::JoinHandle<u32>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let handle = std::thread::spawn(move || {
            let mut served = 0;
            for stream in listener.incoming().take(associations as usize) {
                let stream = stream.expect("accept");
                let options = dicom_ul::ServerAssociationOptions::new()
                    .accept_any()
                    .with_abstract_syntax(uids::COMPREHENSIVE_SR_STORAGE)
                    .with_transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN);
                let mut association = options.establish(stream).expect("association");
                let pc = association.presentation_contexts()[0].id;
                // Read until the data set's last fragment.
                loop {
                    match association.receive().expect("PDU") {
                        Pdu::PData { data } => {
                            if data
                                .iter()
                                .any(|v| v.value_type == PDataValueType::Data && v.is_last)
                            {
                                break;
                            }
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                let response = encode_command(InMemDicomObject::from_element_iter([
                    DataElement::new(
                        tags::AFFECTED_SOP_CLASS_UID,
                        VR::UI,
                        PrimitiveValue::from(uids::COMPREHENSIVE_SR_STORAGE),
                    ),
                    DataElement::new(tags::COMMAND_FIELD, VR::US, PrimitiveValue::from(0x8001u16)),
                    DataElement::new(
                        tags::MESSAGE_ID_BEING_RESPONDED_TO,
                        VR::US,
                        PrimitiveValue::from(1u16),
                    ),
                    DataElement::new(
                        tags::COMMAND_DATA_SET_TYPE,
                        VR::US,
                        PrimitiveValue::from(0x0101u16),
                    ),
                    DataElement::new(tags::STATUS, VR::US, PrimitiveValue::from(status)),
                    DataElement::new(
                        tags::ERROR_COMMENT,
                        VR::LO,
                        PrimitiveValue::from("test peer says no"),
                    ),
                ]))
                .expect("response");
                association
                    .send(&Pdu::PData {
                        data: vec![PDataValue {
                            presentation_context_id: pc,
                            value_type: PDataValueType::Command,
                            is_last: true,
                            data: response,
                        }],
                    })
                    .expect("send response");
                // The SCU aborts after a failure.
                let _ = association.receive();
                served += 1;
            }
            served
        });
        (port, handle)
    }

    #[test]
    fn failure_statuses_are_named_and_only_out_of_resources_is_retried() {
        let (port, scp) = failing_scp(0xA900, 1);
        let failure = store(
            &result_sr(),
            &target(port, Duration::from_secs(10)),
            &RetryPolicy {
                retries: 3,
                backoff: Duration::ZERO,
            },
        )
        .expect_err("A900");
        assert_eq!(failure.attempts, 1);
        let message = failure.to_string();
        assert!(
            message.contains(
                "status 0xA900 (error: data set does not match SOP class): test peer says no"
            ),
            "{message}"
        );
        assert_eq!(scp.join().expect("scp"), 1);

        let (port, scp) = failing_scp(0xA702, 2);
        let failure = store(
            &result_sr(),
            &target(port, Duration::from_secs(10)),
            &RetryPolicy {
                retries: 1,
                backoff: Duration::ZERO,
            },
        )
        .expect_err("A702");
        assert_eq!(failure.attempts, 2, "out of resources is retried");
        assert!(
            matches!(failure.error, ScuError::StoreFailed { status: 0xA702, .. }),
            "{failure}"
        );
        assert_eq!(scp.join().expect("scp"), 2);
    }

    #[test]
    fn forward_config_is_checked_key_by_key() {
        let ok = ForwardConfig {
            enabled: true,
            host: "pacs.local".into(),
            called_ae_title: "PACS".into(),
            ..ForwardConfig::default()
        };
        ok.validate().expect("valid");
        assert!(
            ForwardConfig::default().validate().is_ok(),
            "disabled: host may be empty"
        );
        let cases = [
            (
                ForwardConfig {
                    host: String::new(),
                    ..ok.clone()
                },
                "dicom.forward.host",
            ),
            (
                ForwardConfig {
                    called_ae_title: "A\\B".into(),
                    ..ok.clone()
                },
                "dicom.forward.called_ae_title",
            ),
            (
                ForwardConfig {
                    calling_ae_title: "X".repeat(17),
                    ..ok.clone()
                },
                "dicom.forward.calling_ae_title",
            ),
            (
                ForwardConfig {
                    timeout_s: 0.0,
                    ..ok.clone()
                },
                "dicom.forward.timeout_s",
            ),
            (
                ForwardConfig {
                    retry_backoff_s: f64::NAN,
                    ..ok.clone()
                },
                "dicom.forward.retry_backoff_s",
            ),
        ];
        for (config, key) in cases {
            let err = config.validate().expect_err(key);
            assert!(err.to_string().starts_with(key), "{err}");
        }
        let policy = ok.retry_policy();
        assert_eq!(policy.delay(1), Duration::from_secs(5));
        assert_eq!(policy.delay(3), Duration::from_secs(20));
        assert_eq!(policy.delay(30), MAX_BACKOFF);
    }
}
