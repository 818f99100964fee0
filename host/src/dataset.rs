//! Site folders as cases, for training and evaluation: `site.toml` (the
//! site's convention, the plugin that reads it, its identifier columns),
//! `cases.csv` (the site's own EMR export, one row per case, `case_id` and
//! `image_file` first), `labels.csv` (`case_id`, `o2_level_24h`,
//! `o2_level_72h`) and the images. `oxbox synth` writes such folders; a
//! hospital can export its own the same way.
//!
//! Identifier columns are dropped here, before any plugin or model sees a
//! record. A column named `field [unit]` becomes `{"value", "unit"}`, the
//! form site plugins accept for values in non-canonical units.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

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
    /// The radiograph.
    pub image: PathBuf,
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
    /// The plugin that maps its records (`plugins/dist/<plugin>`).
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
            image: dir.join(image_file),
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
