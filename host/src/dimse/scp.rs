//! The association acceptor: one thread accepts TCP connections, one
//! thread serves each association (at most `max_associations`; beyond,
//! the request is answered with a transient rejection), on dicom-ul's
//! synchronous upper layer.
//!
//! What a peer can do and what it gets:
//! - a calling AE title not in the allowed list, or another called AE
//!   title than the box's: A-ASSOCIATE-RJ, permanent, service user,
//!   "calling (called) AE title not recognised";
//! - too many associations at once: A-ASSOCIATE-RJ, transient, service
//!   provider (presentation), "local limit exceeded"; free disk below the
//!   reserve: the same with "temporary congestion";
//! - presentation contexts: accepted for Verification and the storage SOP
//!   classes of [`super::ABSTRACT_SYNTAXES`] in the transfer syntaxes of
//!   [`super::TRANSFER_SYNTAXES`] (what the ingest decodes); any other
//!   abstract or transfer syntax is refused in the A-ASSOCIATE-AC;
//! - a PDU longer than `max_pdu_length`, a malformed PDU, a PDV on an
//!   unnegotiated context, a malformed command set: A-ABORT and the
//!   connection closed; silence for `idle_timeout` or an association older
//!   than `association_timeout`: the same.
//!
//! A data set is received into one buffer (the Part 10 file: file meta,
//! then the data set's bytes as they come), its memory reserved from the
//! server's budget as it grows; refused at admission or over the file size
//! limit, the rest of the data set is read and dropped and the peer gets
//! "out of resources". A complete data set goes to the [`InstanceSink`].
//! Nothing from a peer is logged but AE titles, addresses and sizes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dicom_ul::association::Association;
use dicom_ul::association::server::AccessControl;
use dicom_ul::pdu::{
    AbortRQSource, AssociationRJ, AssociationRJResult,
    AssociationRJServiceProviderPresentationReason, AssociationRJServiceUserReason,
    AssociationRJSource, PDataValue, PDataValueType, PresentationContextResultReason, UserIdentity,
};
use dicom_ul::{Pdu, ServerAssociation, ServerAssociationOptions};

use super::message::{self, Command, status};
use crate::serve::admission::{MemoryBudget, Reservation};

/// The listener's settings, from `[dicom]` and `[limits]`.
#[derive(Debug, Clone)]
pub struct ScpSettings {
    /// This box's AE title.
    pub ae_title: String,
    /// Calling AE titles that may associate.
    pub allowed_calling_ae_titles: Vec<String>,
    /// Largest PDU received, bytes.
    pub max_pdu_length: u32,
    /// Longest an association may last.
    pub association_timeout: Duration,
    /// Longest wait for the peer's next PDU.
    pub idle_timeout: Duration,
    /// Associations served at once.
    pub max_associations: usize,
    /// Largest data set (with its file meta) received, bytes
    /// (`limits.max_dicom_file_mib`).
    pub max_instance_bytes: u64,
}

/// Why the sink does not take associations now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    /// Free disk is below the reserve.
    DiskReserve,
}

/// A complete data set received by C-STORE, with its memory reservation.
#[derive(Debug)]
pub struct ReceivedInstance {
    /// The Part 10 file: preamble, file meta, the data set as received.
    pub bytes: Vec<u8>,
    /// The memory budget held for `bytes`; grows as the sink parses.
    pub reservation: Reservation,
    /// Affected SOP Class UID (the negotiated abstract syntax).
    pub sop_class_uid: String,
    /// Affected SOP Instance UID.
    pub sop_instance_uid: String,
    /// The negotiated transfer syntax.
    pub transfer_syntax: String,
    /// The calling AE title.
    pub calling_ae_title: String,
}

/// Where received instances go, and who counts what the listener sees.
pub trait InstanceSink: Send + Sync + 'static {
    /// Whether a new association may be accepted now.
    ///
    /// # Errors
    /// [`Congestion`] refuses it (transiently).
    fn accepting(&self) -> Result<(), Congestion>;
    /// Stores (or declines) a complete instance; answers the DIMSE status.
    fn store(&self, instance: ReceivedInstance) -> u16;
    /// Counts an association by outcome: `accepted`, `rejected` (AE
    /// title), `limit`, `congestion`, `failed` (protocol or I/O error
    /// before acceptance), `aborted` (after acceptance).
    fn association(&self, outcome: &'static str);
    /// Counts an instance refused before the sink saw it: `memory`,
    /// `too_large`, `shutdown`, `sop_class`.
    fn refused(&self, reason: &'static str);
}

/// The running listener.
#[derive(Debug)]
pub struct Listener {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
    accept_thread: Option<JoinHandle<()>>,
}

/// Binds the listener's socket.
///
/// # Errors
/// The address does not parse or cannot be bound.
pub fn bind(listen: &str) -> std::io::Result<TcpListener> {
    let addr: SocketAddr = listen.parse().map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("dicom.listen = {listen:?}: {e}"),
        )
    })?;
    TcpListener::bind(addr)
}

impl Listener {
    /// Starts accepting on `listener`.
    ///
    /// # Errors
    /// The accept thread cannot be started or the socket's address read.
    pub fn start(
        listener: TcpListener,
        settings: ScpSettings,
        budget: Arc<MemoryBudget>,
        sink: Arc<dyn InstanceSink>,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let active = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new(Shared {
            settings,
            budget,
            sink,
            stop: Arc::clone(&stop),
            active: Arc::clone(&active),
            rejecting: AtomicUsize::new(0),
        });
        let accept_thread = std::thread::Builder::new()
            .name("dicom-accept".to_owned())
            .spawn(move || accept_loop(&listener, &shared))?;
        Ok(Self {
            addr,
            stop,
            active,
            accept_thread: Some(accept_thread),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Associations served now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Stops accepting, lets each association finish the data set it is
    /// receiving (later C-STOREs are refused with "out of resources"), and
    /// waits up to `grace` for them to end. Returns the associations still
    /// open after it (their partial data sets are in memory only: nothing
    /// is half-written).
    pub fn shutdown(mut self, grace: Duration) -> usize {
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&wake_address(self.addr), Duration::from_secs(1));
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
        }
        let deadline = Instant::now() + grace;
        while self.active() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.active()
    }
}

/// Where to connect to wake an accept on `addr` (an unspecified address
/// is reached on loopback).
fn wake_address(addr: SocketAddr) -> SocketAddr {
    let mut wake = addr;
    if addr.ip().is_unspecified() {
        wake.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    wake
}

struct Shared {
    settings: ScpSettings,
    budget: Arc<MemoryBudget>,
    sink: Arc<dyn InstanceSink>,
    stop: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
    /// Connections being answered with a rejection (bounded as the
    /// associations are; beyond, the connection is closed unanswered).
    rejecting: AtomicUsize,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

/// What a [`Slot`] counts: both are bounded by `max_associations`.
#[derive(Debug, Clone, Copy)]
enum Bound {
    /// Associations being served ([`Shared::active`]).
    Associations,
    /// Requests being answered with a rejection ([`Shared::rejecting`]).
    Rejections,
}

impl Shared {
    fn counter(&self, bound: Bound) -> &AtomicUsize {
        match bound {
            Bound::Associations => &self.active,
            Bound::Rejections => &self.rejecting,
        }
    }
}

/// One of a [`Bound`]'s `max_associations` slots, given back when dropped.
struct Slot {
    shared: Arc<Shared>,
    bound: Bound,
}

impl Slot {
    /// Takes a slot, unless all are held.
    fn take(shared: &Arc<Shared>, bound: Bound) -> Option<Self> {
        let counter = shared.counter(bound);
        if counter.fetch_add(1, Ordering::AcqRel) >= shared.settings.max_associations {
            counter.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Self {
            shared: Arc::clone(shared),
            bound,
        })
    }

    /// Runs `work` on a thread of its own, which holds the slot until it
    /// ends; a thread that cannot start gives the slot back at once.
    fn spawn(self, name: &str, work: impl FnOnce(&Shared) + Send + 'static) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let slot = self;
                work(&slot.shared);
            })
            .map(drop)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared
            .counter(self.bound)
            .fetch_sub(1, Ordering::AcqRel);
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.stopping() {
            return;
        }
        let (socket, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!("dicom: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let (reason, outcome) = match Slot::take(shared, Bound::Associations) {
            None => (
                AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
                "limit",
            ),
            Some(slot) => match shared.sink.accepting() {
                Err(Congestion::DiskReserve) => (
                    AssociationRJServiceProviderPresentationReason::TemporaryCongestion,
                    "congestion",
                ),
                Ok(()) => {
                    let spawned = slot.spawn("dicom-association", move |shared| {
                        serve_association(shared, socket, peer);
                    });
                    if let Err(e) = spawned {
                        tracing::warn!("dicom: cannot start an association thread: {e}");
                    }
                    continue;
                }
            },
        };
        shared.sink.association(outcome);
        reject_transient(shared, socket, peer, reason);
    }
}

/// Answers an association request with a transient rejection, on a thread
/// of its own (bounded; beyond the bound the connection is just closed).
fn reject_transient(
    shared: &Arc<Shared>,
    socket: TcpStream,
    peer: SocketAddr,
    reason: AssociationRJServiceProviderPresentationReason,
) {
    let Some(slot) = Slot::take(shared, Bound::Rejections) else {
        tracing::debug!("dicom: {peer}: closed unanswered (too many rejections in progress)");
        return;
    };
    let _ = slot.spawn("dicom-reject", move |shared| {
        let timeout = shared.settings.idle_timeout.min(Duration::from_secs(5));
        tracing::info!("dicom: association from {peer} rejected (transient): {reason}");
        let _ = answer_rejection(socket, timeout, reason);
    });
}

/// Reads the A-ASSOCIATE-RQ (bounded: 64 KiB, `timeout`) and answers the
/// rejection.
fn answer_rejection(
    mut socket: TcpStream,
    timeout: Duration,
    reason: AssociationRJServiceProviderPresentationReason,
) -> std::io::Result<()> {
    socket.set_read_timeout(Some(timeout))?;
    socket.set_write_timeout(Some(timeout))?;
    let mut header = [0u8; 6];
    socket.read_exact(&mut header)?;
    let length = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
    if header[0] == 0x01 && length <= 64 * 1024 {
        std::io::copy(
            &mut (&mut socket).take(u64::from(length)),
            &mut std::io::sink(),
        )?;
    }
    let pdu = Pdu::AssociationRJ(AssociationRJ {
        result: AssociationRJResult::Transient,
        source: AssociationRJSource::ServiceProviderPresentation(reason),
    });
    let mut bytes = Vec::new();
    dicom_ul::pdu::write_pdu(&mut bytes, &pdu).map_err(|e| std::io::Error::other(e.to_string()))?;
    socket.write_all(&bytes)?;
    socket.flush()
}

/// The AE title rules: the called AE title must be the box's, the calling
/// one in the allowed list (AE titles compared without their padding).
struct AeTitles {
    allowed: Vec<String>,
}

impl AccessControl for AeTitles {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        if called_ae_title.trim() != this_ae_title.trim() {
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        if !self
            .allowed
            .iter()
            .any(|allowed| allowed.trim() == calling_ae_title.trim())
        {
            return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
        }
        Ok(())
    }
}

fn serve_association(shared: &Shared, socket: TcpStream, peer: SocketAddr) {
    let settings = &shared.settings;
    let mut options = ServerAssociationOptions::new()
        .ae_access_control(AeTitles {
            allowed: settings.allowed_calling_ae_titles.clone(),
        })
        .ae_title(settings.ae_title.clone())
        .max_pdu_length(settings.max_pdu_length)
        .strict(true)
        .read_timeout(settings.idle_timeout)
        .write_timeout(settings.idle_timeout);
    for uid in super::ABSTRACT_SYNTAXES {
        options = options.with_abstract_syntax(uid);
    }
    for uid in super::TRANSFER_SYNTAXES {
        options = options.with_transfer_syntax(uid);
    }
    let association = match options.establish(socket) {
        Ok(association) => association,
        Err(e) => {
            let outcome = if matches!(e, dicom_ul::association::Error::Rejected { .. }) {
                tracing::info!("dicom: association from {peer} {e}");
                "rejected"
            } else {
                tracing::info!("dicom: association request from {peer} failed: {e}");
                "failed"
            };
            shared.sink.association(outcome);
            return;
        }
    };
    shared.sink.association("accepted");
    tracing::debug!(
        "dicom: association from {peer} ({}) accepted",
        association.peer_ae_title()
    );
    let mut session = Session {
        shared,
        association,
        peer,
        deadline: Instant::now() + settings.association_timeout,
        command: Vec::new(),
        pending: None,
    };
    match session.run() {
        Ok(()) => tracing::debug!("dicom: association from {peer} released"),
        Err(reason) => {
            shared.sink.association("aborted");
            tracing::info!("dicom: association from {peer} aborted: {reason}");
            let _ = session.association.send(&Pdu::AbortRQ {
                source: AbortRQSource::ServiceProvider(
                    dicom_ul::pdu::AbortRQServiceProviderReason::UnexpectedPdu,
                ),
            });
        }
    }
}

/// A data set being received after its C-STORE-RQ.
struct Pending {
    command: Command,
    context_id: u8,
    /// The file being assembled; `None` once refused (the rest is drained).
    buffer: Option<Vec<u8>>,
    reservation: Reservation,
    /// The status to answer when the data set ends, if already decided.
    refusal: Option<u16>,
    transfer_syntax: String,
    /// When the command came (the data set's reception is timed from it).
    since: Instant,
}

struct Session<'a> {
    shared: &'a Shared,
    association: ServerAssociation<TcpStream>,
    peer: SocketAddr,
    deadline: Instant,
    command: Vec<u8>,
    pending: Option<Pending>,
}

impl Session<'_> {
    /// Serves PDUs until release (Ok) or a reason to abort (Err).
    fn run(&mut self) -> Result<(), String> {
        loop {
            let now = Instant::now();
            let Some(left) = self
                .deadline
                .checked_duration_since(now)
                .filter(|d| !d.is_zero())
            else {
                return Err("dicom.association_timeout_s passed".to_owned());
            };
            let wait = left.min(self.shared.settings.idle_timeout);
            let _ = self.association.inner_stream().set_read_timeout(Some(wait));
            let pdu = self.association.receive().map_err(|e| e.to_string())?;
            match pdu {
                Pdu::PData { data } => {
                    for pdv in data {
                        self.on_pdv(pdv)?;
                    }
                }
                Pdu::ReleaseRQ => {
                    let _ = self.association.send(&Pdu::ReleaseRP);
                    return Ok(());
                }
                Pdu::AbortRQ { .. } => return Ok(()),
                other => {
                    return Err(format!("unexpected {} PDU", message::pdu_name(&other)));
                }
            }
        }
    }

    fn context(&self, id: u8) -> Option<(String, String)> {
        self.association
            .presentation_contexts()
            .iter()
            .find(|pc| pc.id == id && pc.reason == PresentationContextResultReason::Acceptance)
            .map(|pc| (pc.abstract_syntax.clone(), pc.transfer_syntax.clone()))
    }

    fn on_pdv(&mut self, pdv: PDataValue) -> Result<(), String> {
        let Some((abstract_syntax, transfer_syntax)) = self.context(pdv.presentation_context_id)
        else {
            return Err(format!(
                "PDV on presentation context {} that was not accepted",
                pdv.presentation_context_id
            ));
        };
        match pdv.value_type {
            PDataValueType::Command => {
                if self.pending.is_some() {
                    return Err("a command PDV while a data set was expected".to_owned());
                }
                if self.command.len() + pdv.data.len() > message::MAX_COMMAND_BYTES {
                    return Err("command set over its bound".to_owned());
                }
                self.command.extend_from_slice(&pdv.data);
                if pdv.is_last {
                    let bytes = std::mem::take(&mut self.command);
                    let command = Command::parse(&bytes).map_err(|e| e.to_string())?;
                    self.on_command(
                        command,
                        pdv.presentation_context_id,
                        &abstract_syntax,
                        transfer_syntax,
                    )?;
                }
                Ok(())
            }
            PDataValueType::Data => {
                let Some(pending) = self.pending.as_mut() else {
                    return Err("a data PDV without a command".to_owned());
                };
                if pending.context_id != pdv.presentation_context_id {
                    return Err("a data PDV on another presentation context".to_owned());
                }
                append(self.shared, pending, &pdv.data);
                if pdv.is_last {
                    let Some(pending) = self.pending.take() else {
                        return Ok(());
                    };
                    self.finish(pending)?;
                }
                Ok(())
            }
        }
    }

    fn on_command(
        &mut self,
        command: Command,
        context_id: u8,
        abstract_syntax: &str,
        transfer_syntax: String,
    ) -> Result<(), String> {
        match command.field {
            message::C_ECHO_RQ => {
                if command.has_data_set() {
                    return Err("C-ECHO-RQ with a data set".to_owned());
                }
                self.respond(context_id, message::C_ECHO_RSP, &command, status::SUCCESS)
            }
            message::C_STORE_RQ if command.has_data_set() => {
                let mut refusal = None;
                if abstract_syntax == super::VERIFICATION {
                    refusal = Some((status::SOP_CLASS_NOT_SUPPORTED, "sop_class"));
                } else if !message::is_uid(&command.sop_instance_uid) {
                    refusal = Some((status::CANNOT_UNDERSTAND, "invalid"));
                } else if self.shared.stopping() {
                    refusal = Some((status::OUT_OF_RESOURCES, "shutdown"));
                }
                let mut reservation = self.shared.budget.reservation();
                let mut buffer = None;
                if refusal.is_none() {
                    let meta = message::file_meta(
                        abstract_syntax,
                        &command.sop_instance_uid,
                        &transfer_syntax,
                        self.association.peer_ae_title(),
                    );
                    match reservation.grow(meta.len() as u64) {
                        Ok(()) => buffer = Some(meta),
                        Err(_) => refusal = Some((status::OUT_OF_RESOURCES, "memory")),
                    }
                }
                let refusal = refusal.map(|(code, reason)| {
                    self.shared.sink.refused(reason);
                    code
                });
                self.pending = Some(Pending {
                    command,
                    context_id,
                    buffer,
                    reservation,
                    refusal,
                    transfer_syntax,
                    since: Instant::now(),
                });
                Ok(())
            }
            _ if command.has_data_set() => {
                // An operation this box does not perform: its data set is
                // drained, then answered.
                self.pending = Some(Pending {
                    command,
                    context_id,
                    buffer: None,
                    reservation: self.shared.budget.reservation(),
                    refusal: Some(status::UNRECOGNIZED_OPERATION),
                    transfer_syntax,
                    since: Instant::now(),
                });
                Ok(())
            }
            field => self.respond(
                context_id,
                field | 0x8000,
                &command,
                status::UNRECOGNIZED_OPERATION,
            ),
        }
    }

    fn finish(&mut self, pending: Pending) -> Result<(), String> {
        let Pending {
            command,
            context_id,
            buffer,
            reservation,
            refusal,
            transfer_syntax,
            since,
        } = pending;
        let response_field = command.field | 0x8000;
        let code = match (refusal, buffer) {
            (Some(code), _) => code,
            (None, None) => status::OUT_OF_RESOURCES,
            (None, Some(bytes)) => {
                let started = Instant::now();
                tracing::debug!(
                    "dicom: {}: data set of {} bytes received in {:.1} ms",
                    self.peer,
                    bytes.len(),
                    started.duration_since(since).as_secs_f64() * 1e3
                );
                let code = self.shared.sink.store(ReceivedInstance {
                    bytes,
                    reservation,
                    sop_class_uid: command.sop_class_uid.clone(),
                    sop_instance_uid: command.sop_instance_uid.clone(),
                    transfer_syntax,
                    calling_ae_title: self.association.peer_ae_title().to_owned(),
                });
                tracing::debug!(
                    "dicom: {}: instance handled in {:.1} ms, status {code:#06x}",
                    self.peer,
                    started.elapsed().as_secs_f64() * 1e3
                );
                code
            }
        };
        self.respond(context_id, response_field, &command, code)
    }

    fn respond(
        &mut self,
        context_id: u8,
        field: u16,
        request: &Command,
        code: u16,
    ) -> Result<(), String> {
        let data = message::response(field, request, code);
        self.association
            .send(&Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: context_id,
                    value_type: PDataValueType::Command,
                    is_last: true,
                    data,
                }],
            })
            .map_err(|e| e.to_string())
    }
}

/// Appends a data PDV's bytes to the file being assembled, reserving
/// memory for what the buffer allocates; refuses (and frees the buffer)
/// when the budget or the size limit says no.
fn append(shared: &Shared, pending: &mut Pending, data: &[u8]) {
    let Some(buffer) = pending.buffer.as_mut() else {
        return;
    };
    let needed = buffer.len() + data.len();
    if needed as u64 > shared.settings.max_instance_bytes {
        pending.buffer = None;
        pending.refusal = Some(status::OUT_OF_RESOURCES);
        shared.sink.refused("too_large");
        return;
    }
    if needed > buffer.capacity() {
        let target = (buffer.capacity() * 2)
            .max(needed)
            .min(shared.settings.max_instance_bytes as usize);
        let more = (target - buffer.capacity()) as u64;
        if pending.reservation.grow(more).is_err() {
            pending.buffer = None;
            pending.refusal = Some(status::OUT_OF_RESOURCES);
            shared.sink.refused("memory");
            return;
        }
        buffer.reserve_exact(target - buffer.len());
    }
    buffer.extend_from_slice(data);
}
