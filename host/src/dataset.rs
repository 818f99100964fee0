//! Site folders as cases, for training and evaluation: `site.toml` (the
//! site's convention, the plugin that reads it, its identifier columns),
//! `cases.csv` (the site's own EMR export, one row per case, `case_id` and
//! `image_file` first; an empty `image_file`: a case without radiograph), `labels.csv` (`case_id`, `o2_level_24h`,
//! `o2_level_72h`) and the images. `oxbox synth` writes such folders; a
//! hospital can export its own the same way.
//!
//! A site's `plugin` is a plugin name, never a path: [`PluginLookup`]
//! finds its `plugin.toml` (never relative to the working directory).
//!
//! Identifier columns are dropped here, before any plugin or model sees a
//! record. A column named `field [unit]` becomes `{"value", "unit"}`, the
//! form site plugins accept for values in non-canonical units.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::PluginEntry;

/// Why a site folder cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A file cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file's content is wrong.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file (and row, where it applies).
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// No `plugin.toml` for the plugin a site folder names.
    #[error(
        "site {site}: no plugin {plugin:?} (looked in: {}); pass --plugins-dir DIR \
         (DIR/{plugin}/plugin.toml) or list it under [[plugins]] in the config",
        searched.join(", ")
    )]
    NoPlugin {
        /// The site.
        site: String,
        /// The plugin's name, from `site.toml`.
        plugin: String,
        /// Where it was looked for, in order.
        searched: Vec<String>,
    },
}

#[derive(Debug, Deserialize)]
struct SiteToml {
    site: SiteSection,
}

#[derive(Debug, Deserialize)]
struct SiteSection {
    id: String,
    plugin: String,
    #[serde(default)]
    identifier_columns: Vec<String>,
}

/// One labelled case.
#[derive(Debug, Clone)]
pub struct Case {
    /// The case id (not a patient identifier).
    pub case_id: String,
    /// The radiograph; none when `image_file` is empty (usable by
    /// EMR-only models only).
    pub image: Option<PathBuf>,
    /// The EMR record in the site's field names, identifiers removed.
    pub emr: serde_json::Value,
    /// Oxygen level within 24 h.
    pub level_24h: u8,
    /// Oxygen level within 72 h.
    pub level_72h: u8,
}

/// A site folder, read.
#[derive(Debug, Clone)]
pub struct Site {
    /// The site id.
    pub id: String,
    /// The folder.
    pub dir: PathBuf,
    /// The name of the plugin that maps its records (found by
    /// [`PluginLookup::resolve`]).
    pub plugin: String,
    /// Its cases, in `cases.csv` order.
    pub cases: Vec<Case>,
}

fn invalid(path: &Path, reason: impl Into<String>) -> DatasetError {
    DatasetError::Invalid {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn read_text(path: &Path) -> Result<String, DatasetError> {
    std::fs::read_to_string(path).map_err(|source| DatasetError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Reads a site folder.
///
/// # Errors
/// [`DatasetError`], naming the file (and row) at fault.
pub fn read_site(dir: &Path) -> Result<Site, DatasetError> {
    let toml_path = dir.join("site.toml");
    let site: SiteToml =
        toml::from_str(&read_text(&toml_path)?).map_err(|e| invalid(&toml_path, e.to_string()))?;
    if !is_plugin_name(&site.site.plugin) {
        return Err(invalid(
            &toml_path,
            "site.plugin: a plugin name (1 to 64 letters, digits, '-' or '_'), not a path",
        ));
    }
    let labels_path = dir.join("labels.csv");
    let mut labels: HashMap<String, (u8, u8)> = HashMap::new();
    let mut reader =
        csv::Reader::from_path(&labels_path).map_err(|e| invalid(&labels_path, e.to_string()))?;
    for (row, record) in reader.records().enumerate() {
        let record = record.map_err(|e| invalid(&labels_path, e.to_string()))?;
        let level = |i: usize| -> Result<u8, DatasetError> {
            record
                .get(i)
                .and_then(|v| v.trim().parse::<u8>().ok())
                .filter(|v| *v <= 4)
                .ok_or_else(|| invalid(&labels_path, format!("row {}: levels are 0 to 4", row + 2)))
        };
        let id = record.get(0).unwrap_or_default().to_owned();
        labels.insert(id, (level(1)?, level(2)?));
    }
    let cases_path = dir.join("cases.csv");
    let mut reader =
        csv::Reader::from_path(&cases_path).map_err(|e| invalid(&cases_path, e.to_string()))?;
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| invalid(&cases_path, e.to_string()))?
        .iter()
        .map(str::to_owned)
        .collect();
    if header.first().map(String::as_str) != Some("case_id")
        || header.get(1).map(String::as_str) != Some("image_file")
    {
        return Err(invalid(
            &cases_path,
            "the first columns must be case_id, image_file",
        ));
    }
    let mut cases = Vec::new();
    for (row, record) in reader.records().enumerate() {
        let record = record.map_err(|e| invalid(&cases_path, e.to_string()))?;
        let case_id = record.get(0).unwrap_or_default().to_owned();
        let image_file = record.get(1).unwrap_or_default();
        if image_file.contains("..") || Path::new(image_file).is_absolute() {
            return Err(invalid(
                &cases_path,
                format!(
                    "row {}: image_file must stay inside the site folder",
                    row + 2
                ),
            ));
        }
        let mut emr = serde_json::Map::new();
        for (column, value) in header.iter().zip(record.iter()).skip(2) {
            if site.site.identifier_columns.iter().any(|c| c == column) {
                continue;
            }
            match column.split_once(" [") {
                Some((name, unit)) => emr.insert(
                    name.to_owned(),
                    serde_json::json!({"value": value, "unit": unit.trim_end_matches(']')}),
                ),
                None => emr.insert(column.clone(), serde_json::Value::from(value)),
            };
        }
        let (level_24h, level_72h) = *labels
            .get(&case_id)
            .ok_or_else(|| invalid(&labels_path, format!("no labels for {case_id}")))?;
        cases.push(Case {
            case_id,
            image: (!image_file.is_empty()).then(|| dir.join(image_file)),
            emr: serde_json::Value::Object(emr),
            level_24h,
            level_72h,
        });
    }
    Ok(Site {
        id: site.site.id,
        dir: dir.to_path_buf(),
        plugin: site.site.plugin,
        cases,
    })
}

/// Whether `name` can be a plugin's name: 1 to 64 ASCII letters, digits,
/// `-` or `_` (so it never climbs out of a plugins folder).
fn is_plugin_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Where the plugin a site folder names (`site.toml`: `plugin = "NAME"`)
/// is found; the first that exists wins:
///
/// 1. `dir` (`--plugins-dir DIR`, when given): `DIR/NAME/plugin.toml`;
/// 2. the box's configured plugins (`[[plugins]]`, paths relative to the
///    config file): the one whose `plugin.toml` is named `NAME`;
/// 3. the site folder's own `plugins/NAME/plugin.toml` (a site folder
///    that carries its plugin);
/// 4. `installed` (the `plugins/dist` folder of the oxbox installation,
///    [`PluginLookup::installed_dir`]): `plugins/dist/NAME/plugin.toml`.
///
/// Never the working directory: a relative `dir` is the operator's own
/// argument, and the rest are anchored to the config file, the site folder
/// or the executable.
#[derive(Debug, Clone, Default)]
pub struct PluginLookup {
    /// `--plugins-dir`.
    pub dir: Option<PathBuf>,
    /// The installation's `plugins/dist`.
    pub installed: Option<PathBuf>,
}

#[derive(Deserialize)]
struct ManifestName {
    name: String,
}

/// The `name` of the plugin manifest at `path`, if it can be read.
fn manifest_name(path: &Path) -> Option<String> {
    const MAX_MANIFEST_BYTES: u64 = 64 * 1024;
    if std::fs::metadata(path).ok()?.len() > MAX_MANIFEST_BYTES {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    toml::from_str::<ManifestName>(&text).ok().map(|m| m.name)
}

impl PluginLookup {
    /// The plugins a source checkout or an installation ships: the first
    /// `plugins/dist` folder in an ancestor of the running executable's
    /// folder (an installation's `bin/oxbox` → its `plugins/dist`), else the
    /// `plugins/dist` of the source checkout the binary was built from, if
    /// it is still there (`target/` may be a link to a shared build folder,
    /// whose ancestors are not the checkout's).
    pub fn installed_dir() -> Option<PathBuf> {
        let beside_exe = std::env::current_exe().ok().and_then(|exe| {
            exe.ancestors()
                .skip(1)
                .map(|a| a.join("plugins").join("dist"))
                .find(|d| d.is_dir())
        });
        beside_exe.or_else(|| {
            let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist");
            checkout.is_dir().then_some(checkout)
        })
    }

    /// The `plugin.toml` of `site`'s plugin, looked up in the documented
    /// order ([`PluginLookup`]) among `dir`, `configured`, the site folder
    /// and `installed`.
    ///
    /// # Errors
    /// [`DatasetError::NoPlugin`], naming every place looked in.
    pub fn resolve(
        &self,
        site: &Site,
        configured: &[PluginEntry],
    ) -> Result<PathBuf, DatasetError> {
        let name = &site.plugin;
        let mut searched = Vec::new();
        let in_dir = |dir: &Path| dir.join(name).join("plugin.toml");
        if let Some(dir) = &self.dir {
            let path = in_dir(dir);
            if path.is_file() {
                return Ok(path);
            }
            searched.push(path.display().to_string());
        }
        if let Some(entry) = configured
            .iter()
            .find(|e| manifest_name(&e.path).as_deref() == Some(name.as_str()))
        {
            return Ok(entry.path.clone());
        }
        searched.push(format!("{} configured plugin(s)", configured.len()));
        for dir in [Some(site.dir.join("plugins")), self.installed.clone()]
            .into_iter()
            .flatten()
        {
            let path = in_dir(&dir);
            if path.is_file() {
                return Ok(path);
            }
            searched.push(path.display().to_string());
        }
        Err(DatasetError::NoPlugin {
            site: site.id.clone(),
            plugin: name.clone(),
            searched,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(dir: &Path, folder: &str, name: &str) -> PathBuf {
        let path = dir.join(folder).join("plugin.toml");
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, format!("name = \"{name}\"\nversion = \"0.1.0\"\n")).expect("write");
        path
    }

    fn site(dir: &Path) -> Site {
        Site {
            id: "site-1".to_owned(),
            dir: dir.to_path_buf(),
            plugin: "canonical".to_owned(),
            cases: Vec::new(),
        }
    }

    #[test]
    fn a_site_plugin_is_found_in_the_documented_order_never_in_the_working_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        let site = site(&root.join("cohort/site-1"));
        let installed = root.join("install/plugins/dist");
        let lookup = PluginLookup {
            dir: Some(root.join("explicit")),
            installed: Some(installed.clone()),
        };
        // Nothing anywhere: every place is named.
        let err = lookup.resolve(&site, &[]).expect_err("no plugin");
        let text = err.to_string();
        assert!(text.contains("explicit/canonical/plugin.toml"), "{text}");
        assert!(
            text.contains("site-1/plugins/canonical/plugin.toml"),
            "{text}"
        );
        assert!(
            text.contains("install/plugins/dist/canonical/plugin.toml"),
            "{text}"
        );

        // 4. the installation.
        let from_install = plugin(&installed, "canonical", "canonical");
        assert_eq!(lookup.resolve(&site, &[]).expect("found"), from_install);
        // 3. the site folder's own, before the installation.
        let from_site = plugin(&site.dir.join("plugins"), "canonical", "canonical");
        assert_eq!(lookup.resolve(&site, &[]).expect("found"), from_site);
        // 2. the configured plugin named so (by its manifest, whatever its
        // folder), before the site folder; others are passed over.
        let other = plugin(&root.join("conf"), "x", "example-site");
        let configured = plugin(&root.join("conf"), "renamed", "canonical");
        let entries = [
            PluginEntry { path: other },
            PluginEntry {
                path: configured.clone(),
            },
        ];
        assert_eq!(lookup.resolve(&site, &entries).expect("found"), configured);
        // 1. --plugins-dir first.
        let explicit = plugin(&root.join("explicit"), "canonical", "canonical");
        assert_eq!(lookup.resolve(&site, &entries).expect("found"), explicit);
    }

    #[test]
    fn a_site_plugin_must_be_a_name_not_a_path() {
        for bad in ["../../etc", "a/b", "", "plugins/dist/canonical"] {
            assert!(!is_plugin_name(bad), "{bad:?}");
        }
        assert!(is_plugin_name("example-site"));
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            tmp.path().join("site.toml"),
            "[site]\nid = \"s\"\nplugin = \"../evil\"\n",
        )
        .expect("write");
        let err = read_site(tmp.path()).expect_err("refused");
        assert!(err.to_string().contains("a plugin name"), "{err}");
    }
}
