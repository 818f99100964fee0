//! The aggregator's configuration: its own TOML file (not the box's
//! `oxbox.toml`), strictly parsed (`deny_unknown_fields`) and validated as
//! a whole, every problem named with its key. Relative paths resolve
//! against the file's directory. See `config/aggregator.example.toml`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::federation::protocol::TrainingSettings;
use crate::federation::stats::DEFAULT_MIN_COUNT;

/// Why an aggregator configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorConfigError {
    /// The file could not be read.
    #[error("cannot read aggregator config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The TOML did not parse or did not match the schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (with line and column).
        message: String,
    },
    /// The file parsed but some values are not acceptable.
    #[error("{path}: {} problem(s): {}", problems.len(), problems.join("; "))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Each problem, naming the key and how to fix it.
        problems: Vec<String>,
    },
}

fn default_max_upload_mib() -> u64 {
    256
}
fn default_max_connections() -> usize {
    64
}
fn default_true() -> bool {
    true
}
fn default_min_count() -> u64 {
    DEFAULT_MIN_COUNT
}
fn default_max_wait_s() -> u64 {
    600
}

/// `[aggregator]`: where and how the aggregator listens and keeps state.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AggregatorSection {
    listen: String,
    data_dir: PathBuf,
    key_file: PathBuf,
    #[serde(default)]
    tls_certificate: Option<PathBuf>,
    #[serde(default)]
    tls_private_key: Option<PathBuf>,
    #[serde(default = "default_max_upload_mib")]
    max_upload_mib_per_site_round: u64,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default)]
    keep_uploads: bool,
}

/// `[job]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobSection {
    id: String,
    start_model: PathBuf,
    rounds: u64,
    min_sites: usize,
    #[serde(default = "default_max_wait_s")]
    max_wait_s: u64,
    #[serde(default = "default_true")]
    statistics: bool,
    #[serde(default = "default_min_count")]
    min_count: u64,
    training: TrainingSettings,
}

/// `[[sites]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SiteSection {
    id: String,
    public_key: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSchema {
    aggregator: AggregatorSection,
    job: JobSection,
    #[serde(default)]
    sites: Vec<SiteSection>,
}

/// One enrolled site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolledSite {
    /// `[[sites]] id`: the site id its documents must carry.
    pub id: String,
    /// `[[sites]] public_key` (hex): the only key its documents may be
    /// signed with.
    pub public_key: [u8; 32],
}

/// The federation job the aggregator runs (`[job]`).
#[derive(Debug, Clone, PartialEq)]
pub struct JobConfig {
    /// `id = "exam-sim"`: the job every document must name (letters,
    /// digits, `-`, `_`, `.`).
    pub id: String,
    /// `start_model = "DIR"`: the model package the job starts from (a
    /// model pre-trained at one site, or `oxbox model init` output).
    pub start_model: PathBuf,
    /// `rounds = 5`: training rounds (≥ 1).
    pub rounds: u64,
    /// `min_sites = 3`: complete updates a round needs to close after
    /// `max_wait_s` (1 ≤ min_sites ≤ enrolled sites).
    pub min_sites: usize,
    /// `max_wait_s = 600`: a round closes when every enrolled site sent,
    /// or when `min_sites` sent and this long passed since it opened.
    pub max_wait: Duration,
    /// `statistics = true`: a statistics round (global EMR normalisation)
    /// before round 1.
    pub statistics: bool,
    /// `min_count = 10`: the smallest count a statistics bucket may carry;
    /// documents that claim a lower one are refused.
    pub min_count: u64,
    /// `[job.training]`: epochs, batch_size, learning_rate, proximal_mu.
    pub training: TrainingSettings,
}

/// The validated aggregator configuration, paths resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregatorConfig {
    /// The file it came from.
    pub path: PathBuf,
    /// `listen = "127.0.0.1:7400"`: IP address and port (port 0: any
    /// free one). Plain HTTP only on a loopback address; any other needs
    /// `tls_certificate` and `tls_private_key`.
    pub listen: SocketAddr,
    /// `data_dir = "/var/lib/oxbox-aggregator"`: the state (SQLite),
    /// uploaded shards and published models.
    pub data_dir: PathBuf,
    /// `key_file = "signing-key.pk8"`: the aggregator's Ed25519 key
    /// (`oxbox keys generate`), which signs tasks and global models.
    pub key_file: PathBuf,
    /// `tls_certificate = "cert.pem"` and `tls_private_key = "key.pem"`:
    /// serve HTTPS with this certificate chain (PEM, leaf first) and key.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// `max_upload_mib_per_site_round = 256`: the most one site may send
    /// in one round (manifest's declared shard bytes); over it, the
    /// manifest is refused before anything is stored.
    pub max_upload_bytes: u64,
    /// `max_connections = 64`: open connections at once.
    pub max_connections: usize,
    /// `keep_uploads = false`: keep every round's shard files after the
    /// round closed (an audit of what sites sent); by default they are
    /// deleted once the new global model is committed.
    pub keep_uploads: bool,
    /// `[job]`.
    pub job: JobConfig,
    /// `[[sites]]`, in file order.
    pub sites: Vec<EnrolledSite>,
}

/// Whether `id` is usable as a job or site id: 1–64 letters, digits, `-`,
/// `_` or `.`, not starting with `.`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl AggregatorConfig {
    /// Reads and validates the file at `path`.
    ///
    /// # Errors
    /// [`AggregatorConfigError`]: unreadable, unparsable, or every problem
    /// found at once.
    pub fn load(path: &Path) -> Result<Self, AggregatorConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| AggregatorConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates `text`, read from `path` (relative paths in it
    /// resolve against `path`'s directory).
    ///
    /// # Errors
    /// As [`AggregatorConfig::load`], without the read step.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, AggregatorConfigError> {
        let file: FileSchema = toml::from_str(text).map_err(|e| AggregatorConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| {
            if p.is_relative() {
                base.join(p)
            } else {
                p.to_path_buf()
            }
        };
        let mut problems = Vec::new();
        let a = &file.aggregator;
        let listen = match a.listen.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                problems.push(format!(
                    "aggregator.listen {:?} is not IP:PORT (for example \"127.0.0.1:7400\")",
                    a.listen
                ));
                None
            }
        };
        let tls = match (&a.tls_certificate, &a.tls_private_key) {
            (Some(c), Some(k)) => Some((resolve(c), resolve(k))),
            (None, None) => None,
            _ => {
                problems.push(
                    "aggregator.tls_certificate and aggregator.tls_private_key go together: set both or neither"
                        .to_owned(),
                );
                None
            }
        };
        if let Some(addr) = listen
            && !addr.ip().is_loopback()
            && tls.is_none()
            && a.tls_certificate.is_none()
        {
            problems.push(format!(
                "aggregator.listen {addr} is not a loopback address: plain HTTP is only allowed on loopback; set aggregator.tls_certificate and aggregator.tls_private_key"
            ));
        }
        if a.max_upload_mib_per_site_round == 0 || a.max_upload_mib_per_site_round > 1 << 20 {
            problems
                .push("aggregator.max_upload_mib_per_site_round must be 1..=1048576".to_owned());
        }
        if a.max_connections == 0 || a.max_connections > 10_000 {
            problems.push("aggregator.max_connections must be 1..=10000".to_owned());
        }
        let j = &file.job;
        if !valid_id(&j.id) {
            problems.push(format!(
                "job.id {:?} must be 1-64 letters, digits, '-', '_' or '.'",
                j.id
            ));
        }
        if j.rounds == 0 || j.rounds > 100_000 {
            problems.push("job.rounds must be 1..=100000".to_owned());
        }
        if j.min_sites == 0 || j.min_sites > file.sites.len() {
            problems.push(format!(
                "job.min_sites = {} must be at least 1 and at most the {} enrolled site(s) ([[sites]])",
                j.min_sites,
                file.sites.len()
            ));
        }
        if j.min_count == 0 {
            problems.push("job.min_count must be at least 1".to_owned());
        }
        let t = &j.training;
        if t.epochs == 0 || t.epochs > 10_000 {
            problems.push("job.training.epochs must be 1..=10000".to_owned());
        }
        if t.batch_size == 0 || t.batch_size > 65_536 {
            problems.push("job.training.batch_size must be 1..=65536".to_owned());
        }
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            problems.push("job.training.learning_rate must be a finite number > 0".to_owned());
        }
        if !(t.proximal_mu.is_finite() && t.proximal_mu >= 0.0) {
            problems.push("job.training.proximal_mu must be a finite number >= 0".to_owned());
        }
        let mut ids = BTreeSet::new();
        let mut keys = BTreeSet::new();
        let mut sites = Vec::new();
        for (i, s) in file.sites.iter().enumerate() {
            if !valid_id(&s.id) {
                problems.push(format!(
                    "sites[{i}].id {:?} must be 1-64 letters, digits, '-', '_' or '.'",
                    s.id
                ));
            }
            if !ids.insert(s.id.clone()) {
                problems.push(format!("sites[{i}].id {:?} is enrolled twice", s.id));
            }
            match crate::signing::parse_public_key(s.public_key.trim()) {
                Ok(key) => {
                    if !keys.insert(key) {
                        problems.push(format!(
                            "sites[{i}].public_key of {:?} is another site's key too: each site needs its own",
                            s.id
                        ));
                    }
                    sites.push(EnrolledSite {
                        id: s.id.clone(),
                        public_key: key,
                    });
                }
                Err(_) => problems.push(format!(
                    "sites[{i}].public_key of {:?} is not 64 hex digits (the .pub file of `oxbox keys generate`)",
                    s.id
                )),
            }
        }
        if file.sites.is_empty() {
            problems.push("no [[sites]] enrolled: add each site's id and public_key".to_owned());
        }
        if !problems.is_empty() {
            return Err(AggregatorConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            });
        }
        let Some(listen) = listen else {
            return Err(AggregatorConfigError::Invalid {
                path: path.to_path_buf(),
                problems: vec!["aggregator.listen".to_owned()],
            });
        };
        Ok(Self {
            path: path.to_path_buf(),
            listen,
            data_dir: resolve(&a.data_dir),
            key_file: resolve(&a.key_file),
            tls,
            max_upload_bytes: a.max_upload_mib_per_site_round * 1024 * 1024,
            max_connections: a.max_connections,
            keep_uploads: a.keep_uploads,
            job: JobConfig {
                id: j.id.clone(),
                start_model: resolve(&j.start_model),
                rounds: j.rounds,
                min_sites: j.min_sites,
                max_wait: Duration::from_secs(j.max_wait_s),
                statistics: j.statistics,
                min_count: j.min_count,
                training: j.training.clone(),
            },
            sites,
        })
    }

    /// The enrolled site with this public key.
    pub fn site_by_key(&self, key: &[u8; 32]) -> Option<&EnrolledSite> {
        self.sites.iter().find(|s| &s.public_key == key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "0101010101010101010101010101010101010101010101010101010101010101";
    const KEY_B: &str = "0202020202020202020202020202020202020202020202020202020202020202";

    fn text(listen: &str, extra: &str) -> String {
        format!(
            r#"
[aggregator]
listen = "{listen}"
data_dir = "state"
key_file = "keys/signing-key.pk8"
{extra}
[job]
id = "exam-sim"
start_model = "/models/start"
rounds = 3
min_sites = 2
[job.training]
epochs = 1
batch_size = 16
learning_rate = 0.001

[[sites]]
id = "site-1"
public_key = "{KEY_A}"
[[sites]]
id = "site-2"
public_key = "{KEY_B}"
"#
        )
    }

    #[test]
    fn a_loopback_config_loads_with_paths_resolved_against_the_file() {
        let c =
            AggregatorConfig::from_toml(&text("127.0.0.1:7400", ""), Path::new("/etc/a/a.toml"))
                .expect("valid");
        assert_eq!(c.data_dir, PathBuf::from("/etc/a/state"));
        assert_eq!(c.key_file, PathBuf::from("/etc/a/keys/signing-key.pk8"));
        assert_eq!(c.job.start_model, PathBuf::from("/models/start"));
        assert_eq!(c.max_upload_bytes, 256 * 1024 * 1024);
        assert!(c.job.statistics);
        assert_eq!(c.job.min_count, 10);
        assert_eq!(c.sites.len(), 2);
        assert_eq!(
            c.site_by_key(&[2; 32]).map(|s| s.id.as_str()),
            Some("site-2")
        );
    }

    #[test]
    fn plain_http_on_a_non_loopback_address_is_refused() {
        let err = AggregatorConfig::from_toml(&text("0.0.0.0:7400", ""), Path::new("a.toml"))
            .expect_err("plain HTTP on every interface");
        let msg = err.to_string();
        assert!(
            msg.contains("plain HTTP is only allowed on loopback"),
            "{msg}"
        );
        let with_tls = text(
            "0.0.0.0:7400",
            "tls_certificate = \"cert.pem\"\ntls_private_key = \"key.pem\"",
        );
        let c = AggregatorConfig::from_toml(&with_tls, Path::new("/a/a.toml")).expect("TLS");
        assert_eq!(
            c.tls,
            Some((PathBuf::from("/a/cert.pem"), PathBuf::from("/a/key.pem")))
        );
    }

    #[test]
    fn every_problem_is_named_at_once() {
        let bad = text("localhost", "tls_certificate = \"cert.pem\"")
            .replace("min_sites = 2", "min_sites = 3")
            .replace(KEY_B, KEY_A)
            .replace("id = \"site-2\"", "id = \"site/2\"");
        let err = AggregatorConfig::from_toml(&bad, Path::new("a.toml")).expect_err("invalid");
        let msg = err.to_string();
        for expected in [
            "aggregator.listen",
            "go together",
            "job.min_sites = 3",
            "another site's key",
            "sites[1].id",
        ] {
            assert!(msg.contains(expected), "{expected} missing from {msg}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let bad = text("127.0.0.1:0", "colour = \"blue\"");
        let err = AggregatorConfig::from_toml(&bad, Path::new("a.toml")).expect_err("unknown");
        assert!(err.to_string().contains("colour"), "{err}");
    }
}
