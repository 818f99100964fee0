//! Configuration: one TOML file, read once, validated into [`Config`].
//!
//! `config/oxbox.toml` is compiled into the binary as the embedded default;
//! `--config PATH` replaces it as a whole (no merging, so what a file says is
//! all there is). Parsing is strict: unknown keys and wrong types are errors
//! that name the file, the line and the key. After parsing, [`Config::validate`]
//! collects every semantic problem (bad address, zero limits, missing plugin
//! files) and reports them together, so one run tells an operator everything
//! that needs fixing.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The embedded default configuration, `config/oxbox.toml`.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/oxbox.toml");

/// Display name used for the embedded default in messages.
pub const EMBEDDED_NAME: &str = "<embedded default config/oxbox.toml>";

/// Errors from loading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The TOML did not parse or did not match the schema.
    #[error("{origin}:{line}:{column}: {key}{message}")]
    Parse {
        /// The file (or the embedded default) being read.
        origin: String,
        /// 1-based line of the offending text.
        line: usize,
        /// 1-based column of the offending text.
        column: usize,
        /// "key `name`: " where the offending key could be told, else empty.
        key: String,
        /// What the parser said.
        message: String,
    },
    /// The file parsed but some values are not acceptable.
    #[error("{origin}: {} problem(s): {}", problems.len(), problems.join("; "))]
    Invalid {
        /// The file (or the embedded default) being read.
        origin: String,
        /// Each problem, naming the key and how to fix it.
        problems: Vec<String>,
    },
    /// The embedded default keeps its state in the per-user data directory,
    /// and there is none to be found.
    #[error(
        "{EMBEDDED_NAME}: no per-user data directory for storage.data_dir (neither XDG_DATA_HOME \
         nor HOME is set to an absolute path): pass --config FILE naming [storage] data_dir"
    )]
    NoUserDataDir,
    /// The plugin tools without `--config` keep their compile cache in the
    /// per-user cache directory, and there is none to be found. (A shared
    /// temporary folder would let another local user plant compiled code.)
    #[error(
        "no per-user cache directory for the compiled-plugin cache (neither XDG_CACHE_HOME \
         nor HOME is set to an absolute path): pass --config FILE naming [storage] data_dir"
    )]
    NoUserCacheDir,
}

/// A per-user folder of oxbox, found from the environment as the XDG Base
/// Directory specification says (relative values are ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserDir {
    /// `$XDG_DATA_HOME/oxbox`, else `$HOME/.local/share/oxbox`: the state
    /// of commands run without `--config` (audit log, plugin cache, the
    /// demo model).
    Data,
    /// `$XDG_CACHE_HOME/oxbox`, else `$HOME/.cache/oxbox`: what the plugin
    /// tools keep (compiled components), safe to delete.
    Cache,
}

impl UserDir {
    /// The folder, from the environment; `None` when neither variable is
    /// set to an absolute path.
    pub fn locate(self) -> Option<PathBuf> {
        let (xdg, _) = self.names();
        self.locate_in(std::env::var_os(xdg), std::env::var_os("HOME"))
    }

    /// The variable that names it and its place under `$HOME`.
    fn names(self) -> (&'static str, &'static [&'static str]) {
        match self {
            UserDir::Data => ("XDG_DATA_HOME", &[".local", "share"]),
            UserDir::Cache => ("XDG_CACHE_HOME", &[".cache"]),
        }
    }

    /// [`UserDir::locate`] from given values of the XDG variable and HOME.
    fn locate_in(
        self,
        xdg: Option<std::ffi::OsString>,
        home: Option<std::ffi::OsString>,
    ) -> Option<PathBuf> {
        let absolute = |value: Option<std::ffi::OsString>| {
            value.map(PathBuf::from).filter(|p| p.is_absolute())
        };
        let (_, under_home) = self.names();
        if let Some(base) = absolute(xdg) {
            return Some(base.join("oxbox"));
        }
        absolute(home).map(|home| {
            under_home
                .iter()
                .fold(home, |p, part| p.join(part))
                .join("oxbox")
        })
    }
}

/// The validated configuration of one box.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[site]`: who this box is.
    pub site: SiteConfig,
    /// `[server]`: the local HTTP endpoint.
    #[serde(default)]
    pub server: ServerConfig,
    /// `[storage]`: where state lives.
    #[serde(default)]
    pub storage: StorageConfig,
    /// `[model]`: the model and how it is fed.
    #[serde(default)]
    pub model: ModelConfig,
    /// `[limits]`: bounds on what the box accepts.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// `[sandbox]`: how site plugins run and which are trusted.
    #[serde(default)]
    pub sandbox: SandboxConfig,
    /// `[[plugins]]`: site plugins, in the order they run.
    #[serde(default)]
    pub plugins: Vec<PluginEntry>,
    /// `[federation]`: this box as a site of a federated training job
    /// (`oxbox federate`); absent = the box does not federate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federation: Option<FederationConfig>,
    /// `[dicom]`: the DICOM listener (C-ECHO / C-STORE SCP) of `oxbox
    /// serve`, and how received studies are matched to their EMR records.
    #[serde(default)]
    pub dicom: DicomConfig,
}

/// `[dicom]`: the DICOM listener (`oxbox serve`, when `enabled`) and the
/// studies it receives: which associations it accepts, what it stores and
/// for how long, which images are inferred and how long they wait for their
/// EMR record (`POST /v1/emr`, keyed by accession number).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DicomConfig {
    /// `enabled = false`: run the listener beside the HTTP endpoint.
    #[serde(default)]
    pub enabled: bool,
    /// `listen = "127.0.0.1:11112"`: address and port of the listener
    /// (11112 is DICOM's registered port).
    #[serde(default = "default_dicom_listen")]
    pub listen: String,
    /// `ae_title = "OXBOX"`: this box's AE title; associations calling
    /// another are rejected (called AE title not recognised).
    #[serde(default = "default_ae_title")]
    pub ae_title: String,
    /// `allowed_calling_ae_titles = ["PACS"]`: the peers that may
    /// associate; any other calling AE title is rejected (calling AE title
    /// not recognised). At least one when `enabled`.
    #[serde(default)]
    pub allowed_calling_ae_titles: Vec<String>,
    /// `max_pdu_length = 65536`: largest PDU this box receives (bytes,
    /// offered at association); a larger one aborts the association.
    #[serde(default = "default_max_pdu_length")]
    pub max_pdu_length: u32,
    /// `association_timeout_s = 600`: longest an association may last.
    #[serde(default = "default_association_timeout_s")]
    pub association_timeout_s: u64,
    /// `idle_timeout_s = 30`: longest wait for the peer's next PDU (the
    /// association request included); then the association is aborted.
    #[serde(default = "default_idle_timeout_s")]
    pub idle_timeout_s: u64,
    /// `max_associations = 8`: associations served at once; more are
    /// rejected (transient, local limit exceeded).
    #[serde(default = "default_max_associations")]
    pub max_associations: usize,
    /// `retention_hours = 168`: how long a received instance is kept under
    /// the data dir (`dicom/instances/`); results stay in the database.
    #[serde(default = "default_retention_hours")]
    pub retention_hours: u64,
    /// `min_free_disk_mib = 1024`: free space the data dir's file system
    /// keeps; below it associations are rejected (transient, temporary
    /// congestion) and stores refused (out of resources).
    #[serde(default = "default_min_free_disk_mib")]
    pub min_free_disk_mib: u64,
    /// `modalities = ["CR", "DX"]`: Modality (0008,0060) values of an
    /// image that is inferred; empty = any.
    #[serde(default = "default_modalities")]
    pub modalities: Vec<String>,
    /// `body_parts = ["CHEST"]`: Body Part Examined (0018,0015) values;
    /// empty = any (an image without the attribute matches only then).
    #[serde(default = "default_body_parts")]
    pub body_parts: Vec<String>,
    /// `view_positions = ["PA", "AP"]`: View Position (0018,5101) values
    /// (frontal views); empty = any.
    #[serde(default = "default_view_positions")]
    pub view_positions: Vec<String>,
    /// `emr_wait_s = 900`: how long a received image waits for its EMR
    /// record; then it is inferred image-only (`image_only`) or expires.
    #[serde(default = "default_emr_wait_s")]
    pub emr_wait_s: u64,
    /// `emr_expiry_s = 86400`: how long an EMR record waits for its image
    /// before it is deleted.
    #[serde(default = "default_emr_expiry_s")]
    pub emr_expiry_s: u64,
    /// `image_only = false`: when an image's EMR record does not come
    /// within `emr_wait_s`, infer it with an empty record (every feature
    /// missing), if the site's plugins and the model accept one; false =
    /// the study expires.
    #[serde(default)]
    pub image_only: bool,
    /// `emr_token_file = "/etc/oxbox/emr-token"`: the bearer token
    /// `POST /v1/emr` needs (loopback included); required when `enabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emr_token_file: Option<PathBuf>,
    /// `[dicom.sr]`: how result SRs are made (UID root, series number).
    #[serde(default)]
    pub sr: crate::sr::SrConfig,
    /// `[dicom.forward]`: the PACS each result SR is sent to (C-STORE).
    #[serde(default)]
    pub forward: crate::dimse::scu::ForwardConfig,
}

fn default_dicom_listen() -> String {
    "127.0.0.1:11112".to_owned()
}
fn default_ae_title() -> String {
    "OXBOX".to_owned()
}
fn default_max_pdu_length() -> u32 {
    65_536
}
fn default_association_timeout_s() -> u64 {
    600
}
fn default_idle_timeout_s() -> u64 {
    30
}
fn default_max_associations() -> usize {
    8
}
fn default_retention_hours() -> u64 {
    168
}
fn default_min_free_disk_mib() -> u64 {
    1024
}
fn default_modalities() -> Vec<String> {
    vec!["CR".to_owned(), "DX".to_owned()]
}
fn default_body_parts() -> Vec<String> {
    vec!["CHEST".to_owned()]
}
fn default_view_positions() -> Vec<String> {
    vec!["PA".to_owned(), "AP".to_owned()]
}
fn default_emr_wait_s() -> u64 {
    900
}
fn default_emr_expiry_s() -> u64 {
    86_400
}

impl Default for DicomConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: default_dicom_listen(),
            ae_title: default_ae_title(),
            allowed_calling_ae_titles: Vec::new(),
            max_pdu_length: default_max_pdu_length(),
            association_timeout_s: default_association_timeout_s(),
            idle_timeout_s: default_idle_timeout_s(),
            max_associations: default_max_associations(),
            retention_hours: default_retention_hours(),
            min_free_disk_mib: default_min_free_disk_mib(),
            modalities: default_modalities(),
            body_parts: default_body_parts(),
            view_positions: default_view_positions(),
            emr_wait_s: default_emr_wait_s(),
            emr_expiry_s: default_emr_expiry_s(),
            image_only: false,
            emr_token_file: None,
            sr: crate::sr::SrConfig::default(),
            forward: crate::dimse::scu::ForwardConfig::default(),
        }
    }
}

/// Whether `title` is a valid AE title: 1 to 16 characters of printable
/// ASCII without a backslash, not all spaces (PS3.5 6.2, AE).
pub fn is_ae_title(title: &str) -> bool {
    (1..=16).contains(&title.len())
        && title
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'\\')
        && !title.trim().is_empty()
}

impl DicomConfig {
    /// Every problem with `[dicom]`, each naming its key.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(e) = self.sr.validate() {
            problems.push(e.to_string());
        }
        if let Err(e) = self.forward.validate() {
            problems.push(e.to_string());
        }
        if !self.enabled {
            return problems;
        }
        if let Err(e) = self.listen.parse::<SocketAddr>() {
            problems.push(format!(
                "dicom.listen = {:?}: {e}; write an address and port such as \"0.0.0.0:11112\"",
                self.listen
            ));
        }
        if !is_ae_title(&self.ae_title) {
            problems.push(format!(
                "dicom.ae_title = {:?}: use 1 to 16 printable ASCII characters, no backslash",
                self.ae_title
            ));
        }
        if self.allowed_calling_ae_titles.is_empty() {
            problems.push(
                "dicom.allowed_calling_ae_titles is empty: name the AE titles of the PACS or modalities that send to this box".to_owned(),
            );
        }
        for title in &self.allowed_calling_ae_titles {
            if !is_ae_title(title) {
                problems.push(format!(
                    "dicom.allowed_calling_ae_titles: {title:?} is not an AE title (1 to 16 printable ASCII characters, no backslash)"
                ));
            }
        }
        for (key, value, range) in [
            (
                "dicom.max_pdu_length",
                u64::from(self.max_pdu_length),
                4096..=16_777_216,
            ),
            (
                "dicom.association_timeout_s",
                self.association_timeout_s,
                1..=86_400,
            ),
            ("dicom.idle_timeout_s", self.idle_timeout_s, 1..=3600),
            (
                "dicom.max_associations",
                self.max_associations as u64,
                1..=256,
            ),
            ("dicom.retention_hours", self.retention_hours, 1..=87_600),
            ("dicom.emr_wait_s", self.emr_wait_s, 1..=604_800),
            ("dicom.emr_expiry_s", self.emr_expiry_s, 1..=2_592_000),
        ] {
            if !range.contains(&value) {
                problems.push(format!(
                    "{key} = {value}: must be between {} and {}",
                    range.start(),
                    range.end()
                ));
            }
        }
        if self.emr_token_file.is_none() {
            problems.push(
                "dicom.emr_token_file is not set: name a file holding the bearer token POST /v1/emr needs (at least 32 printable characters, chmod 600)".to_owned(),
            );
        }
        problems
    }
}

/// `[federation]`: how this box takes part in a federation as a site. The
/// site id is `[site] id`, as the aggregator enrolled it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    /// `aggregator_url = "https://aggregator.example.org:7400"`: the
    /// aggregator's base URL; `http://` only for a loopback address.
    pub aggregator_url: String,
    /// `aggregator_key = "<64 hex digits>"`: the aggregator's Ed25519
    /// public key; tasks and global-model records signed by any other key
    /// are refused.
    pub aggregator_key: String,
    /// `key_file = "site/signing-key.pk8"`: this site's Ed25519 private key
    /// (PKCS#8, `oxbox keys generate`), which signs its statistics and
    /// updates.
    pub key_file: PathBuf,
    /// `tls_ca = "aggregator-ca.pem"`: the PEM certificate(s) trusted for
    /// an `https://` aggregator (required with `https://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// `data = ["/data/site-1"]`: the labelled site folders trained on
    /// (`oxbox synth` layout), each through its site's plugins.
    pub data: Vec<PathBuf>,
    /// `holdout = 0.2`: share of cases never trained on
    /// ([`crate::cases::is_held_out`]), the promotion gate's test set.
    #[serde(default = "default_holdout")]
    pub holdout: f64,
    /// `poll_interval_ms = 2000`: time between two task requests while
    /// there is nothing to do.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// `request_timeout_ms = 120000`: longest a single request to the
    /// aggregator may take (connect, send, answer).
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// `max_retries = 6`: attempts after a failed transfer (connection
    /// lost, 5xx, 429) before the round's upload gives up until the next
    /// poll; waits double from 0.5 s, at most 30 s.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// `shard_mib = 8`: largest update shard, MiB (a fraction is fine:
    /// `0.0625` = 64 KiB, the smallest).
    #[serde(default = "default_shard_mib")]
    pub shard_mib: f64,
    /// `max_upload_kib_s = 0`: average upload rate the site keeps under
    /// (KiB/s) so that a round's upload does not fill the hospital's
    /// uplink; 0 = unlimited.
    #[serde(default)]
    pub max_upload_kib_s: u64,
    /// `min_count = 10`: smallest count a statistics histogram bucket (or
    /// a feature's moments) may describe; smaller ones are not sent.
    #[serde(default = "default_min_count")]
    pub min_count: u64,
    /// `promote = false`: evaluate each new global model on the held-out
    /// cases and, when it passes the gate, make it the served model
    /// (`model.package`, which must then be set).
    #[serde(default)]
    pub promote: bool,
    /// `promote_max_auc_drop = 0.01`: the gate: the new model's held-out
    /// AUC (P(level ≥ 1) at 24 h) may be at most this much below the
    /// served model's.
    #[serde(default = "default_promote_max_auc_drop")]
    pub promote_max_auc_drop: f64,
    /// `serve_url = "http://127.0.0.1:8480"`: the local `oxbox serve` to
    /// tell (`POST /v1/admin/model/reload`, with `server.token_file`'s
    /// token) after a promotion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serve_url: Option<String>,
    /// `[[federation.filters]]`: privacy filters applied, in order, to
    /// every update before it leaves ([`crate::federation::filters`]).
    #[serde(default)]
    pub filters: Vec<crate::federation::filters::Filter>,
}

fn default_holdout() -> f64 {
    0.2
}
fn default_poll_interval_ms() -> u64 {
    2000
}
fn default_request_timeout_ms() -> u64 {
    120_000
}
fn default_max_retries() -> u32 {
    6
}
fn default_shard_mib() -> f64 {
    8.0
}
fn default_min_count() -> u64 {
    crate::federation::stats::DEFAULT_MIN_COUNT
}
fn default_promote_max_auc_drop() -> f64 {
    0.01
}

impl FederationConfig {
    /// Every problem of the section, each naming its key.
    fn problems(&self, model_package: Option<&Path>) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(reason) = crate::federation::client::AggregatorUrl::parse(&self.aggregator_url) {
            problems.push(format!(
                "federation.aggregator_url = {:?}: {reason}",
                self.aggregator_url
            ));
        } else if self.aggregator_url.starts_with("https://") && self.tls_ca.is_none() {
            problems.push(
                "federation.tls_ca: an https:// aggregator needs the PEM certificate to trust"
                    .to_owned(),
            );
        }
        if crate::signing::parse_public_key(&self.aggregator_key).is_err() {
            problems.push(
                "federation.aggregator_key: not a hex Ed25519 public key (64 hex digits)"
                    .to_owned(),
            );
        }
        if !self.key_file.is_file() {
            problems.push(format!(
                "federation.key_file = {:?}: no such file (create one with `oxbox keys generate`)",
                self.key_file.display().to_string()
            ));
        }
        if let Some(ca) = &self.tls_ca
            && !ca.is_file()
        {
            problems.push(format!(
                "federation.tls_ca = {:?}: no such file",
                ca.display().to_string()
            ));
        }
        if self.data.is_empty() {
            problems.push("federation.data: name at least one site folder".to_owned());
        }
        for (i, dir) in self.data.iter().enumerate() {
            if !dir.is_dir() {
                problems.push(format!(
                    "federation.data[{i}] = {:?}: no such folder",
                    dir.display().to_string()
                ));
            }
        }
        if !(self.holdout > 0.0 && self.holdout < 1.0) {
            problems.push(format!(
                "federation.holdout = {}: a share strictly between 0 and 1",
                self.holdout
            ));
        }
        for (key, value, range) in [
            (
                "federation.poll_interval_ms",
                self.poll_interval_ms,
                10..=3_600_000,
            ),
            (
                "federation.request_timeout_ms",
                self.request_timeout_ms,
                100..=3_600_000,
            ),
            (
                "federation.max_retries",
                u64::from(self.max_retries),
                0..=100,
            ),
            ("federation.min_count", self.min_count, 1..=1_000_000),
        ] {
            if !range.contains(&value) {
                problems.push(format!(
                    "{key} = {value}: must be between {} and {}",
                    range.start(),
                    range.end()
                ));
            }
        }
        if !(0.0625..=1024.0).contains(&self.shard_mib) {
            problems.push(format!(
                "federation.shard_mib = {}: must be between 0.0625 (64 KiB) and 1024",
                self.shard_mib
            ));
        }
        if !(0.0..=1.0).contains(&self.promote_max_auc_drop) {
            problems.push(format!(
                "federation.promote_max_auc_drop = {}: must be between 0 and 1",
                self.promote_max_auc_drop
            ));
        }
        if self.promote && model_package.is_none() {
            problems.push(
                "federation.promote = true needs model.package: the served model a passing global \
                 model replaces"
                    .to_owned(),
            );
        }
        if let Some(url) = &self.serve_url
            && let Err(reason) = crate::federation::client::AggregatorUrl::parse(url)
        {
            problems.push(format!("federation.serve_url = {url:?}: {reason}"));
        }
        if let Err(e) = crate::federation::filters::validate(&self.filters) {
            problems.push(format!("federation.filters: {e}"));
        }
        problems
    }
}

/// `[site]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// `id = "st-elsewhere"`: stable identifier of the site in the federation.
    pub id: String,
    /// `name = "St Elsewhere, Radiology"`: human-readable name.
    pub name: String,
}

/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// `listen = "127.0.0.1:8480"`: address and port of the HTTP endpoint.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// `token_file = "/etc/oxbox/token"`: a file holding the bearer token
    /// clients must send. Required when `listen` is not a loopback address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// `max_body_mib = 64`: largest request body; larger ones get 413.
    #[serde(default = "default_max_body_mib")]
    pub max_body_mib: u64,
    /// `header_timeout_ms = 10000`: time a client has to send the headers.
    #[serde(default = "default_header_timeout_ms")]
    pub header_timeout_ms: u64,
    /// `body_timeout_ms = 60000`: time a client has to send the body.
    #[serde(default = "default_body_timeout_ms")]
    pub body_timeout_ms: u64,
    /// `max_concurrent_requests = 32`: predictions in progress at once;
    /// more get 503 with Retry-After. At most the plugin sandbox pool's
    /// size (32, `plugins::engine::MAX_CONCURRENT_SANDBOXES`): each
    /// prediction may hold one sandbox at a time.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent_requests: usize,
    /// `batch_max = 8`: most cases per model forward pass (1 = no batching).
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// `batch_max_wait_ms = 0`: how long a batch waits for more cases once
    /// the model is free; 0 = take what is queued (no added latency).
    #[serde(default)]
    pub batch_max_wait_ms: u64,
    /// `batch_calibrate = true`: at start (and after a model reload) time
    /// the model at batch 1, 2, 4, … `batch_max` on a blank case and batch
    /// only as far as a larger batch costs at least 10% less per case;
    /// false = batch up to `batch_max` whatever it costs.
    #[serde(default = "default_true")]
    pub batch_calibrate: bool,
    /// `memory_budget_mib = 0`: memory that predictions in progress may
    /// hold at once, estimated per request from its body and its image
    /// header before decoding; requests beyond it get 503 with Retry-After,
    /// a single case larger than the whole budget 413. 0 = derived from the
    /// machine (half of the smaller of MemTotal and the cgroup's memory
    /// limit, at least 256 MiB).
    #[serde(default)]
    pub memory_budget_mib: u64,
    /// `max_connections = 256`: open client connections at once; further
    /// connections wait in the listen backlog until one ends.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// `reload_min_interval_s = 10`: least time between two plugin reloads
    /// over HTTP; sooner ones get 429 with Retry-After.
    #[serde(default = "default_reload_min_interval_s")]
    pub reload_min_interval_s: u64,
    /// `server_timing = false`: answer each prediction with a
    /// `Server-Timing` header, the request's stages in milliseconds
    /// (receive, parse, decode, preprocess, plugins, queue, inference,
    /// audit, total; durations only) — what `oxbox bench --url` breaks its
    /// latency down by.
    #[serde(default)]
    pub server_timing: bool,
}

fn default_listen() -> String {
    "127.0.0.1:8480".to_owned()
}
fn default_max_body_mib() -> u64 {
    64
}
fn default_header_timeout_ms() -> u64 {
    10_000
}
fn default_body_timeout_ms() -> u64 {
    60_000
}
fn default_max_concurrent() -> usize {
    32
}
fn default_batch_max() -> usize {
    8
}
fn default_true() -> bool {
    true
}
fn default_max_connections() -> usize {
    256
}
fn default_reload_min_interval_s() -> u64 {
    10
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            token_file: None,
            max_body_mib: default_max_body_mib(),
            header_timeout_ms: default_header_timeout_ms(),
            body_timeout_ms: default_body_timeout_ms(),
            max_concurrent_requests: default_max_concurrent(),
            batch_max: default_batch_max(),
            batch_max_wait_ms: 0,
            batch_calibrate: true,
            memory_budget_mib: 0,
            max_connections: default_max_connections(),
            reload_min_interval_s: default_reload_min_interval_s(),
            server_timing: false,
        }
    }
}

/// `[storage]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `data_dir = "/var/lib/oxbox"`: the box's state directory (relative:
    /// to the config file's folder; the embedded default uses
    /// [`UserDir::Data`]).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("oxbox-data")
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
        }
    }
}

/// `[model]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// `input_size = 224`: side S of the (1, S, S) model input.
    #[serde(default = "default_input_size")]
    pub input_size: u32,
    /// `device = "cpu"` or `"cuda:0"`: where inference runs.
    #[serde(default = "default_device")]
    pub device: String,
    /// `package = "/var/lib/oxbox/models/exam"`: the model package folder
    /// (model.toml + weights.safetensors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<PathBuf>,
    /// `threads = 0`: CPU threads for inference (0 = one per core).
    #[serde(default)]
    pub threads: usize,
}

fn default_input_size() -> u32 {
    224
}

fn default_device() -> String {
    "cpu".to_owned()
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            input_size: default_input_size(),
            device: default_device(),
            package: None,
            threads: 0,
        }
    }
}

pub use oxbox_dicom::LimitsConfig;

/// `[sandbox]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    /// `deadline_ms = 250`: wall-clock deadline of one plugin call.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u32,
    /// `memory_limit_mib = 128`: linear memory cap of one plugin call.
    #[serde(default = "default_memory_limit_mib")]
    pub memory_limit_mib: u32,
    /// `fault_threshold = 3`: consecutive faults that quarantine a plugin
    /// until the plugins are reloaded.
    #[serde(default = "default_fault_threshold")]
    pub fault_threshold: u32,
    /// `require_signed_plugins = false`: refuse plugins without a valid
    /// signature by a trusted key.
    #[serde(default)]
    pub require_signed_plugins: bool,
    /// `trusted_plugin_keys = ["<hex Ed25519 public key>", …]`.
    #[serde(default)]
    pub trusted_plugin_keys: Vec<String>,
}

fn default_deadline_ms() -> u32 {
    250
}

fn default_memory_limit_mib() -> u32 {
    128
}

fn default_fault_threshold() -> u32 {
    3
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            deadline_ms: default_deadline_ms(),
            memory_limit_mib: default_memory_limit_mib(),
            fault_threshold: default_fault_threshold(),
            require_signed_plugins: false,
            trusted_plugin_keys: Vec::new(),
        }
    }
}

impl SandboxConfig {
    /// The limits every plugin call runs under.
    pub fn limits(&self) -> crate::plugins::PluginLimits {
        crate::plugins::PluginLimits {
            deadline: std::time::Duration::from_millis(self.deadline_ms.into()),
            memory_bytes: self.memory_limit_mib as usize * 1024 * 1024,
            fault_threshold: self.fault_threshold,
            sandboxes: crate::plugins::engine::MAX_CONCURRENT_SANDBOXES,
        }
    }
}

/// One `[[plugins]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginEntry {
    /// `path = "plugins/dist/example-site/plugin.toml"`: the plugin's packed
    /// manifest (`scripts/build-plugins.sh` writes it).
    pub path: PathBuf,
}

/// Where a configuration came from, for messages and relative paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// The copy of `config/oxbox.toml` compiled into the binary.
    Embedded,
    /// A file named by `--config`.
    File(PathBuf),
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::Embedded => f.write_str(EMBEDDED_NAME),
            ConfigSource::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A validated configuration together with where it came from.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    /// The configuration, with relative paths resolved.
    pub config: Config,
    /// Where it came from.
    pub source: ConfigSource,
}

impl LoadedConfig {
    /// Loads `path`, or the embedded default when `path` is `None`.
    ///
    /// # Errors
    /// [`ConfigError::Read`] when the file cannot be read, [`ConfigError::Parse`]
    /// for syntax, unknown keys and wrong types, [`ConfigError::Invalid`] for
    /// values that parse but are not acceptable.
    /// The embedded default's `storage.data_dir` is the per-user data
    /// folder ([`UserDir::Data`]); [`ConfigError::NoUserDataDir`] without one.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            None => Self::from_toml(EMBEDDED_DEFAULT, ConfigSource::Embedded),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                Self::from_toml(&text, ConfigSource::File(p.to_path_buf()))
            }
        }
    }

    /// Parses and validates TOML text that came from `source`.
    ///
    /// # Errors
    /// As [`LoadedConfig::load`], without the read step.
    pub fn from_toml(text: &str, source: ConfigSource) -> Result<Self, ConfigError> {
        Self::build(text, source, || {
            UserDir::Data.locate().ok_or(ConfigError::NoUserDataDir)
        })
    }

    /// The embedded default with its `storage.data_dir` set to `data_dir`
    /// instead of the per-user data folder (the plugin tools keep only a
    /// compile cache, in [`UserDir::Cache`]).
    ///
    /// # Errors
    /// As [`LoadedConfig::load`].
    pub fn embedded_with_data_dir(data_dir: PathBuf) -> Result<Self, ConfigError> {
        Self::build(EMBEDDED_DEFAULT, ConfigSource::Embedded, || Ok(data_dir))
    }

    /// Parses, resolves and validates; `embedded_data_dir` gives the
    /// embedded default's data dir.
    fn build(
        text: &str,
        source: ConfigSource,
        embedded_data_dir: impl FnOnce() -> Result<PathBuf, ConfigError>,
    ) -> Result<Self, ConfigError> {
        let origin = source.to_string();
        let mut config: Config =
            toml::from_str(text).map_err(|e| parse_error(&origin, text, &e))?;
        let base = match &source {
            ConfigSource::Embedded => {
                config.storage.data_dir = embedded_data_dir()?;
                None
            }
            ConfigSource::File(p) => p.parent().map(Path::to_path_buf),
        };
        config.resolve_paths(base.as_deref());
        config.validate().map_err(|problems| ConfigError::Invalid {
            origin: origin.clone(),
            problems,
        })?;
        Ok(Self { config, source })
    }
}

impl Config {
    /// Makes relative paths relative to `base` (the config file's directory).
    fn resolve_paths(&mut self, base: Option<&Path>) {
        let Some(base) = base else { return };
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.storage.data_dir);
        if let Some(token_file) = &mut self.server.token_file {
            resolve(token_file);
        }
        if let Some(package) = &mut self.model.package {
            resolve(package);
        }
        for plugin in &mut self.plugins {
            resolve(&mut plugin.path);
        }
        if let Some(token_file) = &mut self.dicom.emr_token_file {
            resolve(token_file);
        }
        if let Some(token_file) = &mut self.dicom.emr_token_file {
            resolve(token_file);
        }
        if let Some(federation) = &mut self.federation {
            resolve(&mut federation.key_file);
            if let Some(ca) = &mut federation.tls_ca {
                resolve(ca);
            }
            for dir in &mut federation.data {
                resolve(dir);
            }
        }
    }

    /// Checks every value; returns all problems found, each naming its key.
    ///
    /// # Errors
    /// The list of problems, when there is at least one.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let id = &self.site.id;
        if id.is_empty()
            || id.len() > 64
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            problems.push(format!(
                "site.id = {id:?}: use 1 to 64 letters, digits, '-' or '_'"
            ));
        }
        if self.site.name.trim().is_empty() {
            problems.push("site.name is empty: give the site a readable name".to_owned());
        }
        match self.server.listen.parse::<SocketAddr>() {
            Err(e) => problems.push(format!(
                "server.listen = {:?}: {e}; write an address and port such as \"127.0.0.1:8480\"",
                self.server.listen
            )),
            Ok(addr) if !addr.ip().is_loopback() && self.server.token_file.is_none() => {
                problems.push(format!(
                    "server.listen = {:?} is reachable from the network: set server.token_file to a file holding the bearer token clients must send",
                    self.server.listen
                ));
            }
            Ok(_) => {}
        }
        let server = &self.server;
        for (key, value, range) in [
            ("server.max_body_mib", server.max_body_mib, 1..=4096),
            (
                "server.header_timeout_ms",
                server.header_timeout_ms,
                100..=600_000,
            ),
            (
                "server.body_timeout_ms",
                server.body_timeout_ms,
                100..=3_600_000,
            ),
            ("server.batch_max", server.batch_max as u64, 1..=256),
            (
                "server.batch_max_wait_ms",
                server.batch_max_wait_ms,
                0..=1000,
            ),
            (
                "server.max_connections",
                server.max_connections as u64,
                1..=65_536,
            ),
            (
                "server.reload_min_interval_s",
                server.reload_min_interval_s,
                0..=86_400,
            ),
            ("model.threads", self.model.threads as u64, 0..=1024),
        ] {
            if !range.contains(&value) {
                problems.push(format!(
                    "{key} = {value}: must be between {} and {}",
                    range.start(),
                    range.end()
                ));
            }
        }
        if server.memory_budget_mib != 0
            && !(16..=16 * 1024 * 1024).contains(&server.memory_budget_mib)
        {
            problems.push(format!(
                "server.memory_budget_mib = {}: must be 0 (derived from the machine) or between 16 and 16777216",
                server.memory_budget_mib
            ));
        }
        let sandboxes = crate::plugins::engine::MAX_CONCURRENT_SANDBOXES as usize;
        if !(1..=sandboxes).contains(&server.max_concurrent_requests) {
            problems.push(format!(
                "server.max_concurrent_requests = {}: must be between 1 and {sandboxes}, the plugin sandboxes that can run at once (each prediction may hold one)",
                server.max_concurrent_requests
            ));
        }
        if self.storage.data_dir.as_os_str().is_empty() {
            problems.push("storage.data_dir is empty: name a directory".to_owned());
        }
        if !(16..=4096).contains(&self.model.input_size) {
            problems.push(format!(
                "model.input_size = {}: must be between 16 and 4096",
                self.model.input_size
            ));
        }
        if parse_device(&self.model.device).is_none() {
            problems.push(format!(
                "model.device = {:?}: use \"cpu\" or \"cuda:N\"",
                self.model.device
            ));
        }
        if self.limits.max_image_megapixels == 0 {
            problems.push("limits.max_image_megapixels must be at least 1".to_owned());
        }
        if self.limits.max_dicom_file_mib == 0 {
            problems.push("limits.max_dicom_file_mib must be at least 1".to_owned());
        }
        if self.limits.max_inflated_mib == 0 {
            problems.push("limits.max_inflated_mib must be at least 1".to_owned());
        }
        if !(1..=60_000).contains(&self.sandbox.deadline_ms) {
            problems.push(format!(
                "sandbox.deadline_ms = {}: must be between 1 and 60000",
                self.sandbox.deadline_ms
            ));
        }
        if !(1..=4096).contains(&self.sandbox.memory_limit_mib) {
            problems.push(format!(
                "sandbox.memory_limit_mib = {}: must be between 1 and 4096",
                self.sandbox.memory_limit_mib
            ));
        }
        if self.sandbox.fault_threshold == 0 {
            problems.push("sandbox.fault_threshold must be at least 1".to_owned());
        }
        for (i, key) in self.sandbox.trusted_plugin_keys.iter().enumerate() {
            if crate::signing::parse_public_key(key).is_err() {
                problems.push(format!(
                    "sandbox.trusted_plugin_keys[{i}]: not a hex Ed25519 public key (64 hex digits)"
                ));
            }
        }
        if self.sandbox.require_signed_plugins && self.sandbox.trusted_plugin_keys.is_empty() {
            problems.push(
                "sandbox.require_signed_plugins is on but sandbox.trusted_plugin_keys is empty"
                    .to_owned(),
            );
        }
        for (i, plugin) in self.plugins.iter().enumerate() {
            if !plugin.path.is_file() {
                problems.push(format!(
                    "plugins[{i}].path = {:?}: no such file",
                    plugin.path.display().to_string()
                ));
            }
        }
        problems.extend(self.dicom.problems());
        if let Some(federation) = &self.federation {
            problems.extend(federation.problems(self.model.package.as_deref()));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The configuration as TOML, as `oxbox config check` prints it.
    ///
    /// # Errors
    /// Only if serialisation fails, which a validated config never does.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string_pretty(self)
    }
}

/// A compute device named in the config (defined beside the model, which
/// selects it).
pub use oxbox_model::DeviceSpec;

/// Parses `"cpu"` or `"cuda:N"`.
pub fn parse_device(text: &str) -> Option<DeviceSpec> {
    match text {
        "cpu" => Some(DeviceSpec::Cpu),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceSpec::Cuda),
    }
}

/// Turns a toml error into one line naming origin, line, column and key.
fn parse_error(origin: &str, text: &str, err: &toml::de::Error) -> ConfigError {
    let (line, column, key) = match err.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let before = &text[..start];
            let line = before.matches('\n').count() + 1;
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let column = text[line_start..start].chars().count() + 1;
            let line_text = text[line_start..].lines().next().unwrap_or("");
            (line, column, key_on_line(line_text))
        }
        None => (1, 1, None),
    };
    ConfigError::Parse {
        origin: origin.to_owned(),
        line,
        column,
        key: key.map(|k| format!("key `{k}`: ")).unwrap_or_default(),
        message: err.message().replace('\n', " ").trim().to_owned(),
    }
}

/// The key assigned on a TOML line (`key = value`), if any.
fn key_on_line(line: &str) -> Option<&str> {
    let (lhs, _) = line.split_once('=')?;
    let key = lhs.trim().trim_matches('"');
    (!key.is_empty() && !key.starts_with('[')).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(text: &str) -> Result<LoadedConfig, ConfigError> {
        LoadedConfig::from_toml(text, ConfigSource::File(PathBuf::from("/etc/oxbox/x.toml")))
    }

    #[test]
    fn embedded_default_is_valid() {
        let loaded = LoadedConfig::load(None).expect("embedded default must validate");
        assert_eq!(loaded.config.server.listen, "127.0.0.1:8480");
        assert_eq!(loaded.config.limits.max_image_megapixels, 100);
        assert_eq!(loaded.config.model.input_size, 224);
        assert_eq!(loaded.source, ConfigSource::Embedded);
    }

    #[test]
    fn an_enabled_dicom_listener_needs_its_peers_and_token_and_sane_limits() {
        let err = from(
            "[site]\nid = \"a\"\nname = \"b\"\n[dicom]\nenabled = true\nae_title = \"A\\\\B\"\nmax_pdu_length = 100\n",
        )
        .expect_err("must fail")
        .to_string();
        for key in [
            "dicom.ae_title",
            "dicom.allowed_calling_ae_titles",
            "dicom.max_pdu_length = 100",
            "dicom.emr_token_file",
        ] {
            assert!(err.contains(key), "{key} not named: {err}");
        }
        let loaded = from(
            "[site]\nid = \"a\"\nname = \"b\"\n[dicom]\nenabled = true\nallowed_calling_ae_titles = [\"PACS\"]\nemr_token_file = \"token\"\n",
        )
        .expect("valid");
        let dicom = &loaded.config.dicom;
        assert_eq!(dicom.listen, "127.0.0.1:11112");
        assert_eq!(dicom.max_pdu_length, 65_536);
        assert_eq!(
            dicom.emr_token_file.as_deref(),
            Some(Path::new("/etc/oxbox/token"))
        );
        // Off, nothing is checked.
        assert!(DicomConfig::default().problems().is_empty());
    }

    #[test]
    fn unknown_key_names_key_file_and_line() {
        let err = from("[site]\nid = \"a\"\nname = \"b\"\ncolour = \"red\"\n")
            .expect_err("unknown key must fail")
            .to_string();
        assert!(err.starts_with("/etc/oxbox/x.toml:4:"), "{err}");
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let err =
            from("[site]\nid = \"a\"\nname = \"b\"\n[limits]\nmax_image_megapixels = \"lots\"\n")
                .expect_err("wrong type must fail")
                .to_string();
        assert!(err.contains(":5:"), "{err}");
        assert!(err.contains("key `max_image_megapixels`"), "{err}");
    }

    #[test]
    fn validation_collects_every_problem() {
        let err = from(
            "[site]\nid = \"bad id!\"\nname = \"b\"\n[server]\nlisten = \"nowhere\"\n[model]\ndevice = \"tpu\"\n",
        )
        .expect_err("invalid values must fail");
        match err {
            ConfigError::Invalid { problems, .. } => {
                assert_eq!(problems.len(), 3, "{problems:?}");
                assert!(problems[0].starts_with("site.id"));
                assert!(problems[1].starts_with("server.listen"));
                assert!(problems[2].starts_with("model.device"));
            }
            other => panic!("expected Invalid, got {other}"),
        }
    }

    #[test]
    fn relative_paths_resolve_against_the_file() {
        let loaded = from("[site]\nid = \"a\"\nname = \"b\"\n[storage]\ndata_dir = \"state\"\n")
            .expect("valid");
        assert_eq!(
            loaded.config.storage.data_dir,
            PathBuf::from("/etc/oxbox/state")
        );
    }

    #[test]
    fn server_limits_have_defaults_and_ranges() {
        let loaded = LoadedConfig::load(None).expect("embedded default");
        let server = &loaded.config.server;
        assert_eq!(server.memory_budget_mib, 0);
        assert_eq!(server.max_connections, 256);
        assert_eq!(server.reload_min_interval_s, 10);
        let err = from(
            "[site]\nid = \"a\"\nname = \"b\"\n[server]\nmemory_budget_mib = 8\nmax_connections = 0\nreload_min_interval_s = 100000\n",
        )
        .expect_err("out of range");
        match err {
            ConfigError::Invalid { problems, .. } => {
                assert_eq!(problems.len(), 3, "{problems:?}");
                for key in [
                    "server.memory_budget_mib",
                    "server.max_connections",
                    "server.reload_min_interval_s",
                ] {
                    assert!(problems.iter().any(|p| p.starts_with(key)), "{problems:?}");
                }
            }
            other => panic!("expected Invalid, got {other}"),
        }
        let ok = from(
            "[site]\nid = \"a\"\nname = \"b\"\n[server]\nmemory_budget_mib = 512\nmax_connections = 8\nreload_min_interval_s = 0\n",
        )
        .expect("in range");
        assert_eq!(ok.config.server.memory_budget_mib, 512);
    }

    #[test]
    fn concurrency_is_refused_above_the_sandbox_pool() {
        let text = |n: usize| {
            format!("[site]\nid = \"a\"\nname = \"b\"\n[server]\nmax_concurrent_requests = {n}\n")
        };
        let pool = crate::plugins::engine::MAX_CONCURRENT_SANDBOXES as usize;
        assert!(from(&text(pool)).is_ok());
        let err = from(&text(pool + 1))
            .expect_err("above the pool")
            .to_string();
        assert!(err.contains("server.max_concurrent_requests = 33"), "{err}");
        assert!(err.contains("plugin sandboxes"), "{err}");
    }

    #[test]
    fn user_dirs_follow_xdg_then_home() {
        let os = |s: &str| Some(std::ffi::OsString::from(s));
        assert_eq!(
            UserDir::Data.locate_in(os("/x/data"), os("/home/u")),
            Some(PathBuf::from("/x/data/oxbox"))
        );
        assert_eq!(
            UserDir::Data.locate_in(None, os("/home/u")),
            Some(PathBuf::from("/home/u/.local/share/oxbox"))
        );
        // A relative XDG value is ignored, as the specification says.
        assert_eq!(
            UserDir::Cache.locate_in(os("rel"), os("/home/u")),
            Some(PathBuf::from("/home/u/.cache/oxbox"))
        );
        assert_eq!(UserDir::Cache.locate_in(os("rel"), os("home")), None);
        assert_eq!(UserDir::Data.locate_in(None, None), None);
    }

    #[test]
    fn embedded_default_keeps_state_in_the_user_data_dir() {
        let loaded = LoadedConfig::load(None).expect("embedded default");
        assert_eq!(Some(loaded.config.storage.data_dir), UserDir::Data.locate());
        let moved = LoadedConfig::embedded_with_data_dir(PathBuf::from("/tmp/c")).expect("ok");
        assert_eq!(moved.config.storage.data_dir, PathBuf::from("/tmp/c"));
        // A file without data_dir still keeps it beside the file.
        let file = from("[site]\nid = \"a\"\nname = \"b\"\n").expect("valid");
        assert_eq!(
            file.config.storage.data_dir,
            PathBuf::from("/etc/oxbox/oxbox-data")
        );
    }

    #[test]
    fn devices_parse() {
        assert_eq!(parse_device("cpu"), Some(DeviceSpec::Cpu));
        assert_eq!(parse_device("cuda:1"), Some(DeviceSpec::Cuda(1)));
        assert_eq!(parse_device("cuda:"), None);
        assert_eq!(parse_device("gpu"), None);
    }

    #[test]
    fn the_federation_section_is_resolved_and_every_problem_named_on_one_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("site-1")).expect("site folder");
        std::fs::write(dir.path().join("key.pk8"), b"k").expect("key");
        let key = "ab".repeat(32);
        let path = dir.path().join("oxbox.toml");
        let good = format!(
            "[site]\nid = \"site-1\"\nname = \"One\"\n[federation]\n\
             aggregator_url = \"http://127.0.0.1:7400\"\naggregator_key = \"{key}\"\n\
             key_file = \"key.pk8\"\ndata = [\"site-1\"]\nshard_mib = 0.5\n\
             [[federation.filters]]\nkind = \"percentile\"\npercent = 10\n"
        );
        let loaded = LoadedConfig::from_toml(&good, ConfigSource::File(path.clone()))
            .expect("a valid [federation] section");
        let federation = loaded.config.federation.expect("section");
        assert_eq!(federation.key_file, dir.path().join("key.pk8"));
        assert_eq!(federation.data, [dir.path().join("site-1")]);
        assert_eq!((federation.holdout, federation.shard_mib), (0.2, 0.5));
        assert!(!federation.promote);

        let bad = format!(
            "[site]\nid = \"site-1\"\nname = \"One\"\n[federation]\n\
             aggregator_url = \"http://10.1.2.3:7400\"\naggregator_key = \"{key}\"\n\
             key_file = \"missing.pk8\"\ndata = [\"site-1\"]\n\
             [[federation.filters]]\nkind = \"percentile\"\npercent = 150\n"
        );
        let err = LoadedConfig::from_toml(&bad, ConfigSource::File(path))
            .expect_err("three problems")
            .to_string();
        assert!(!err.contains('\n'), "one line: {err}");
        assert!(err.contains("3 problem(s)"), "{err}");
        assert!(err.contains("federation.aggregator_url"), "{err}");
        assert!(err.contains("loopback"), "{err}");
        assert!(err.contains("federation.key_file"), "{err}");
        assert!(err.contains("federation.filters"), "{err}");
    }
}
