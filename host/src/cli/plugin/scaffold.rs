//! `oxbox plugin new NAME`: a new site-plugin crate in the plugins
//! workspace, copied from the example site (embedded in the binary, so it
//! works from any checkout of the same version), with its own version and a
//! unit test that converts a sample record through every column.

use std::path::{Path, PathBuf};

/// The example site's source, the template of every new plugin.
const TEMPLATE_LIB: &str = include_str!("../../../../plugins/example-site/src/lib.rs");

/// The example site's `describe()` name, replaced by the new name.
const TEMPLATE_NAME: &str = "name: \"example-site\".into(),";
/// The example site's `describe()` site text, replaced.
const TEMPLATE_SITE: &str = "site: \"St Elsewhere General (example site)\".into(),";
/// The example site's type name, replaced by a neutral one.
const TEMPLATE_TYPE: &str = "ExampleSite";

/// Longest plugin name accepted.
const MAX_NAME: usize = 48;

/// Arguments of `oxbox plugin new`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example (in the repository root):\n  \
oxbox plugin new my-site\n  \
cargo test --manifest-path plugins/Cargo.toml -p oxbox-plugin-my-site\n  \
scripts/build-plugins.sh my-site\n  \
oxbox plugin run plugins/dist/my-site/plugin.toml --emr samples/example-site-record.json\n\n\
Writes DIR/NAME/ (Cargo.toml: crate oxbox-plugin-NAME, its own version 0.1.0; \
src/lib.rs: the example site's code, describe() naming NAME, and a unit test that \
converts a sample record through every column; README.md) and adds NAME to the \
members of DIR/Cargo.toml. Everything is written or nothing. Refuses a name that is \
not lower-case letters, digits and '-' starting with a letter, and a NAME that \
exists. Then edit column(), the SAMPLE record of the test, and describe() \
(plugins/README.md walks through it).")]
pub struct NewArgs {
    /// The plugin's name: its folder, its describe() name, and the crate
    /// `oxbox-plugin-NAME`.
    #[arg(value_name = "NAME")]
    name: String,
    /// The plugins workspace (its Cargo.toml lists the members; the WIT is
    /// in ../wit from it).
    #[arg(long, value_name = "DIR", default_value = "plugins")]
    dir: PathBuf,
}

/// Why a plugin cannot be scaffolded (bad input: exit 2).
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    /// The name is not usable as a folder, crate and plugin name.
    #[error(
        "{name:?} is not a valid plugin name: use lower-case letters, digits and '-', \
         starting with a letter, at most {MAX_NAME} characters"
    )]
    BadName {
        /// The name given.
        name: String,
    },
    /// The folder or the workspace member exists already.
    #[error("plugin {name:?} exists already ({what})")]
    Exists {
        /// The name given.
        name: String,
        /// Where it was found.
        what: String,
    },
    /// The directory is not a plugins workspace.
    #[error("{path} is not a plugins workspace: {reason}")]
    NotWorkspace {
        /// The workspace's Cargo.toml.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// Whether `name` works as a folder, a crate-name suffix and a plugin name.
fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !name.is_empty()
        && name.len() <= MAX_NAME
        && bytes[0].is_ascii_lowercase()
        && !name.ends_with('-')
        && !name.contains("--")
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// The workspace's `Cargo.toml` with `name` added to `members`, keeping
/// everything else (comments included) as it is.
fn add_member(manifest: &str, path: &Path, name: &str) -> Result<String, ScaffoldError> {
    let not_workspace = |reason: &str| ScaffoldError::NotWorkspace {
        path: path.display().to_string(),
        reason: reason.to_owned(),
    };
    let parsed: toml::Table = toml::from_str(manifest).map_err(|e| not_workspace(e.message()))?;
    let members = parsed
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(toml::Value::as_array)
        .ok_or_else(|| not_workspace("no [workspace] members list"))?;
    if members.iter().any(|m| m.as_str() == Some(name)) {
        return Err(ScaffoldError::Exists {
            name: name.to_owned(),
            what: format!("a member of {}", path.display()),
        });
    }
    // The `members = [ … ]` value: from the line that starts with `members`
    // to the first `]` after it (member paths hold no ']').
    let start = manifest
        .match_indices("members")
        .map(|(i, _)| i)
        .find(|&i| i == 0 || manifest.as_bytes()[i - 1] == b'\n')
        .ok_or_else(|| not_workspace("members is not on a line of its own"))?;
    let close = manifest[start..]
        .find(']')
        .map(|i| start + i)
        .ok_or_else(|| not_workspace("members list is not closed"))?;
    let before = manifest[start..close].trim_end();
    let insert_at = start + before.len();
    let entry = if before.ends_with('[') {
        format!("\"{name}\"")
    } else if before.ends_with(',') && before.contains('\n') {
        format!("\n    \"{name}\",")
    } else if before.ends_with(',') {
        format!(" \"{name}\"")
    } else {
        format!(", \"{name}\"")
    };
    let updated = format!(
        "{}{entry}{}",
        &manifest[..insert_at],
        &manifest[insert_at..]
    );
    // Never write a manifest that does not say what we meant.
    let check: toml::Table = toml::from_str(&updated).map_err(|e| not_workspace(e.message()))?;
    let listed = check
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(toml::Value::as_array)
        .is_some_and(|m| {
            m.len() == members.len() + 1 && m.iter().any(|v| v.as_str() == Some(name))
        });
    if !listed {
        return Err(not_workspace(
            "could not add the member to the members list",
        ));
    }
    Ok(updated)
}

/// The new crate's `Cargo.toml`.
fn cargo_toml(name: &str) -> String {
    format!(
        "[package]\n\
name = \"oxbox-plugin-{name}\"\n\
description = \"oxbox site plugin {name}: maps the site's EMR export to the canonical schema\"\n\
# This plugin's own version: bump it with every change you deploy (it is in\n\
# every response and audit record, and a new version needs a new signature).\n\
version = \"0.1.0\"\n\
edition.workspace = true\n\
rust-version.workspace = true\n\
license.workspace = true\n\
\n\
[lib]\n\
crate-type = [\"cdylib\"]\n\
\n\
[dependencies]\n\
wit-bindgen.workspace = true\n\
oxbox-emr-schema.workspace = true\n"
    )
}

/// The new crate's `src/lib.rs`: the example site's code under the new name.
fn lib_rs(name: &str) -> anyhow::Result<String> {
    let body_start = TEMPLATE_LIB
        .find("\nwit_bindgen::generate!")
        .ok_or_else(|| anyhow::anyhow!("internal: the embedded template has no wit_bindgen"))?;
    for needle in [TEMPLATE_NAME, TEMPLATE_SITE] {
        if TEMPLATE_LIB.matches(needle).count() != 1 {
            anyhow::bail!("internal: the embedded template lacks {needle:?}");
        }
    }
    let header = format!(
        "//! The `{name}` site plugin: maps the site's EMR export to the canonical\n\
//! schema (oxbox-emr-schema). Scaffolded by `oxbox plugin new` from the\n\
//! example site; edit `column()`, the `SAMPLE` record of the unit test and\n\
//! `describe()` (see plugins/README.md).\n"
    );
    let body = TEMPLATE_LIB[body_start..]
        .replace(TEMPLATE_NAME, &format!("name: \"{name}\".into(),"))
        .replace(
            TEMPLATE_SITE,
            &format!("site: \"{name} (edit the site in describe())\".into(),"),
        )
        .replace(TEMPLATE_TYPE, "SitePlugin");
    Ok(header + &body)
}

/// The new crate's README.
fn readme(name: &str) -> String {
    format!(
        "# {name}\n\n\
Site plugin scaffolded by `oxbox plugin new` from `../example-site/`.\n\
Document the site's EMR export here: one row per column with its meaning,\n\
unit or codes and the canonical feature it becomes (see\n\
`../example-site/README.md` for the form, `../README.md` for the accepted\n\
units and the shared helpers).\n"
    )
}

/// Runs `oxbox plugin new`.
pub fn new(args: NewArgs) -> anyhow::Result<()> {
    let name = args.name.as_str();
    if !valid_name(name) || matches!(name, "emr-schema" | "target" | "dist") {
        return Err(ScaffoldError::BadName {
            name: name.to_owned(),
        }
        .into());
    }
    let workspace = args.dir.join("Cargo.toml");
    let manifest =
        std::fs::read_to_string(&workspace).map_err(|e| ScaffoldError::NotWorkspace {
            path: workspace.display().to_string(),
            reason: e.to_string(),
        })?;
    let crate_dir = args.dir.join(name);
    if crate_dir.symlink_metadata().is_ok() {
        return Err(ScaffoldError::Exists {
            name: name.to_owned(),
            what: format!("{} is there", crate_dir.display()),
        }
        .into());
    }
    let updated = add_member(&manifest, &workspace, name)?;

    // Write the crate into a hidden folder beside its destination, then
    // rename it into place and replace the workspace manifest atomically;
    // undo the rename if the manifest cannot be replaced.
    let staging = tempfile::Builder::new()
        .prefix(".oxbox-new-")
        .tempdir_in(&args.dir)
        .map_err(|e| anyhow::anyhow!("cannot write in {}: {e}", args.dir.display()))?;
    let write = |relative: &str, text: &str| -> anyhow::Result<()> {
        let path = staging.path().join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::write(&path, text)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
    };
    write("Cargo.toml", &cargo_toml(name))?;
    write("src/lib.rs", &lib_rs(name)?)?;
    write("README.md", &readme(name))?;
    let staged = staging.keep();
    if let Err(e) = std::fs::rename(&staged, &crate_dir) {
        let _ = std::fs::remove_dir_all(&staged);
        anyhow::bail!("cannot create {}: {e}", crate_dir.display());
    }
    if let Err(e) = oxbox::output::write_shared_bytes(&workspace, updated.as_bytes()) {
        let _ = std::fs::remove_dir_all(&crate_dir);
        return Err(e.into());
    }
    println!(
        "{}",
        serde_json::json!({
            "plugin": name,
            "crate": format!("oxbox-plugin-{name}"),
            "dir": crate_dir.display().to_string(),
            "workspace": workspace.display().to_string(),
            "next": [
                format!("cargo test --manifest-path {} -p oxbox-plugin-{name}", workspace.display()),
                format!("scripts/build-plugins.sh {name}"),
                format!("oxbox plugin run plugins/dist/{name}/plugin.toml --emr RECORD.json"),
            ],
        })
    );
    Ok(())
}
