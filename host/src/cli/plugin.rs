//! `oxbox plugin …`: scaffold, check, run, pack, sign and benchmark site
//! plugins.

mod scaffold;

pub use scaffold::{NewArgs, ScaffoldError, new};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use oxbox::config::{Config, ConfigError, LoadedConfig, UserDir};
use oxbox::dicom::{self, DicomFile, ImageHeader};
use oxbox::plugins::cache::ComponentCache;
use oxbox::plugins::manifest::{self, Manifest, PluginFiles, SignatureStatus, signature_path};
use oxbox::plugins::record::{features_to_json, image_frame, raw_fields_from_json};
use oxbox::plugins::{
    Frame, Hook, ImageAttributes, ImageDecision, LoadedPlugin, PixelsData, PluginEngine, PluginSet,
    RawField,
};
use oxbox::signing;

/// A plugin given on the command line: its manifest, or a bare component.
#[derive(Debug, Clone, clap::Args)]
pub struct PluginArg {
    /// plugin.toml (manifest + component), or a bare .wasm component.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// Arguments of `oxbox plugin check`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  oxbox plugin check plugins/dist/example-site/plugin.toml\n  \
oxbox plugin check my-plugin.wasm\n\n\
Prints, as JSON: name, version, site, interface version, hooks, imports, sha256, \
signature status (against sandbox.trusted_plugin_keys) and compile time. Refuses \
plugins for another interface version or that import what the sandbox does not \
provide (filesystem, sockets).\n\n\
Signature status: \"unsigned\" (no plugin.toml.sig); \"verified\" (signed by a \
trusted key); \"untrusted-key\" (a valid signature by a key this config does not \
trust: a warning on stderr, or an error under require_signed_plugins). A signature \
that does not verify under the key that made it (manifest or signature changed since \
signing) is an error: tampered."
)]
pub struct CheckArgs {
    #[command(flatten)]
    plugin: PluginArg,
}

/// Arguments of `oxbox plugin run`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
oxbox plugin run plugins/dist/example-site/plugin.toml --emr samples/example-site-record.json\n  \
oxbox plugin run plugin.toml --emr record.json --dicom chest.dcm --out chest.npy\n\n\
Runs one plugin on one case, under the same sandbox and limits as the box, and prints \
the canonical features as JSON. The host checks them as the box does: a feature outside \
EMR schema v1 (or given twice) is a plugin fault naming it, a value outside the schema's \
range refuses the case (exit 2, naming the feature). `model` says which emitted features \
the model uses, which it ignores, and which it uses that the plugin did not emit — the \
model of --model, else [model] package, else the embedded demo model, as `predict` \
chooses. With --dicom, also runs preprocess-image on the \
canonical image of the radiograph and writes the image the model would get to --out.")]
pub struct RunArgs {
    #[command(flatten)]
    plugin: PluginArg,
    /// The EMR record: a JSON object in the site's own field names.
    #[arg(long, value_name = "RECORD.json")]
    emr: PathBuf,
    /// A radiograph to run through preprocess-image.
    #[arg(long, value_name = "X.dcm")]
    dicom: Option<PathBuf>,
    /// Where to write the final image (.npy), with --dicom.
    #[arg(long, value_name = "X.npy", requires = "dicom")]
    out: Option<PathBuf>,
    /// Model package whose features to mark; default: [model] package
    /// from the config, else the embedded demo model.
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
}

/// Arguments of `oxbox plugin pack`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
oxbox plugin pack plugins/target/wasm32-wasip2/release/oxbox_plugin_my_site.wasm --out plugins/dist/my-site\n  \
oxbox plugin pack my_site.wasm --out dist/my-site --sign-key keys/signing-key.pk8\n\n\
(cargo writes crate oxbox-plugin-my-site to plugins/target/wasm32-wasip2/release/\
oxbox_plugin_my_site.wasm; scripts/build-plugins.sh my-site builds and packs in one step.) \
Checks the component, asks it to describe itself, and writes DIR/<name>.wasm and \
DIR/plugin.toml (name, version, interface, sha256, hooks), mode 0644: the folder to \
deploy and to sign. With --sign-key it also signs: DIR/plugin.toml.sig, as `oxbox plugin \
sign` writes it. Without, packing removes an old plugin.toml.sig (the new manifest pins a \
new sha256, so the old signature would read as tampered): sign again before deploying. \
Prints the manifest's path (and the signature's, when signed).")]
pub struct PackArgs {
    /// The component (.wasm) built for wasm32-wasip2.
    #[arg(value_name = "WASM")]
    wasm: PathBuf,
    /// Output directory.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Also sign the new manifest with this private key (PKCS#8, from
    /// `oxbox keys generate`).
    #[arg(long, value_name = "KEY.pk8")]
    sign_key: Option<PathBuf>,
}

/// Arguments of `oxbox plugin sign`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  \
oxbox plugin sign dist/my-site/plugin.toml --key /etc/oxbox/keys/signing-key.pk8\n\n\
Writes plugin.toml.sig, one line `ed25519 <public key hex> <signature hex>`: an \
Ed25519 signature over the manifest, which pins the component through its sha256, \
and the key that made it. Boxes that list the public key in \
sandbox.trusted_plugin_keys accept it as verified; with require_signed_plugins they \
accept nothing else. A box that does not list the key loads it with a warning \
(untrusted key) while signatures are optional. Any later change to plugin.toml \
(a re-pack too) needs a new signature: `oxbox plugin pack --sign-key` packs and \
signs in one step. Prints, as JSON, the signature file and the public key.")]
pub struct SignArgs {
    /// The plugin.toml to sign.
    #[arg(value_name = "MANIFEST")]
    manifest: PathBuf,
    /// The private key (PKCS#8, from `oxbox keys generate`).
    #[arg(long, value_name = "KEY")]
    key: PathBuf,
}

/// Arguments of `oxbox plugin bench`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  \
oxbox plugin bench plugins/dist/example-site/plugin.toml --emr samples/example-site-record.json\n\n\
Per-request plugin cost: instantiate from InstancePre (fresh store, instance, \
teardown), the map-emr call alone and a whole map-emr request, and preprocess-image \
requests on 224x224 and 2048x2048 frames (their difference is the pixel hand-over). \
Prints medians and minima in microseconds.")]
pub struct BenchArgs {
    #[command(flatten)]
    plugin: PluginArg,
    /// The EMR record for map-emr.
    #[arg(long, value_name = "RECORD.json")]
    emr: PathBuf,
    /// Timed runs per measurement.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    runs: u32,
}

/// The configuration of `plugin check/run/pack/bench`: `--config`'s, or the
/// embedded default with `storage.data_dir` moved to the per-user cache
/// folder — these commands keep nothing but the compiled-component cache,
/// so they need no data folder.
pub fn tool_config(path: Option<&Path>) -> anyhow::Result<LoadedConfig> {
    match path {
        Some(_) => super::load_config(path),
        None => Ok(LoadedConfig::embedded_with_data_dir(user_cache_dir()?)?),
    }
}

/// [`UserDir::Cache`] (`$XDG_CACHE_HOME/oxbox`, else `$HOME/.cache/oxbox`).
/// Never a shared temporary folder: another local user could create it
/// first and plant a cache key and compiled code.
fn user_cache_dir() -> Result<PathBuf, ConfigError> {
    UserDir::Cache.locate().ok_or(ConfigError::NoUserCacheDir)
}

/// The engine and compiled-component cache for a command.
fn engine_and_cache(config: &Config) -> anyhow::Result<(Arc<PluginEngine>, ComponentCache)> {
    let engine = Arc::new(PluginEngine::new(&config.sandbox.limits())?);
    let cache = ComponentCache::open(&config.storage.data_dir)?;
    Ok((engine, cache))
}

/// Loads a plugin from a manifest (checking digest and signature policy) or
/// a bare component.
fn load_plugin(
    path: &Path,
    config: &Config,
    engine: &Arc<PluginEngine>,
    cache: &ComponentCache,
) -> anyhow::Result<(LoadedPlugin, Option<SignatureStatus>)> {
    let is_manifest = path.extension().is_some_and(|e| e == "toml");
    if is_manifest {
        let files = PluginFiles::load(path)?;
        let trusted = oxbox::plugins::set::trusted_keys(config)?;
        let status = files.verify(&trusted, config.sandbox.require_signed_plugins)?;
        if let Some(warning) = status.warning(&files.manifest.name) {
            eprintln!("warning: {warning}");
        }
        let plugin = LoadedPlugin::load(
            engine,
            Some(cache),
            &files.component,
            &files.manifest.name,
            config.sandbox.limits(),
        )?;
        Ok((plugin, Some(status)))
    } else {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let label = path
            .file_stem()
            .map_or_else(|| "plugin".into(), |s| s.to_string_lossy().into_owned());
        let plugin =
            LoadedPlugin::load(engine, Some(cache), &bytes, &label, config.sandbox.limits())?;
        Ok((plugin, None))
    }
}

fn hooks_json(hooks: &[Hook]) -> Vec<&'static str> {
    hooks.iter().map(|h| h.as_str()).collect()
}

/// Runs `oxbox plugin check`.
pub fn check(args: CheckArgs, config: &LoadedConfig) -> anyhow::Result<()> {
    let config = &config.config;
    let (engine, cache) = engine_and_cache(config)?;
    let started = Instant::now();
    let (plugin, signature) = load_plugin(&args.plugin.file, config, &engine, &cache)?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let info = plugin.info();
    let report = serde_json::json!({
        "name": info.name,
        "version": info.version,
        "site": info.site,
        "interface_version": info.interface_version,
        "hooks": hooks_json(plugin.hooks()),
        "imports": plugin.imports(),
        "sha256": plugin.sha256(),
        "signature": signature.map_or_else(
            || serde_json::json!({"status": "not-applicable (bare component)"}),
            |s| serde_json::to_value(s).unwrap_or_default(),
        ),
        "compiled": match plugin.cache_outcome() {
            oxbox::plugins::cache::CacheOutcome::Compiled => "now",
            oxbox::plugins::cache::CacheOutcome::Cached => "from cache",
        },
        "load_ms": (load_ms * 10.0).round() / 10.0,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn read_record(path: &Path) -> anyhow::Result<Vec<RawField>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    raw_fields_from_json(&json).with_context(|| path.display().to_string())
}

/// Runs `oxbox plugin run`.
pub fn run(args: RunArgs, config: &LoadedConfig) -> anyhow::Result<()> {
    let config = &config.config;
    let (engine, cache) = engine_and_cache(config)?;
    let (plugin, _) = load_plugin(&args.plugin.file, config, &engine, &cache)?;
    let record = read_record(&args.emr)?;
    let name = plugin.name().to_owned();
    let version = plugin.version().to_owned();
    let set = PluginSet::from_plugins(vec![plugin]);
    let features = if set.maps_emr() {
        set.map_emr(record)?
    } else {
        Vec::new()
    };
    let mut report = serde_json::json!({
        "plugin": {"name": name, "version": version},
        "features": features_to_json(&features),
        "model": model_marks(args.model.as_deref(), config, &features)?,
    });
    if let Some(dicom_path) = &args.dicom {
        let limits = &config.limits;
        let file = DicomFile::open(dicom_path, limits)
            .with_context(|| dicom_path.display().to_string())?;
        let header = ImageHeader::read(&file).with_context(|| dicom_path.display().to_string())?;
        let geometry = header
            .accept(limits)
            .with_context(|| dicom_path.display().to_string())?;
        let frame = dicom::pixels::decode_first_frame(&file, &geometry)
            .with_context(|| dicom_path.display().to_string())?;
        let canonical =
            dicom::canonical::preprocess(&header, &geometry, &frame, config.model.input_size);
        let (decision, image) = if set.preprocesses_images() {
            let (plugin_frame, pixels) = image_frame(&header, frame, &canonical);
            match set.preprocess_image(&plugin_frame, &pixels)? {
                ImageDecision::KeepCanonical => ("keep-canonical", canonical.data.clone()),
                ImageDecision::Replace(image) => ("replace", image),
            }
        } else {
            (
                "keep-canonical (plugin has no preprocess-image hook)",
                canonical.data.clone(),
            )
        };
        if let Some(out) = &args.out {
            let s = canonical.size as usize;
            oxbox::output::write_npy(out, &[1, s, s], &image)?;
        }
        report["image"] = serde_json::json!({
            "decision": decision,
            "voi": canonical.voi.as_str(),
            "size": canonical.size,
        });
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// Which of the emitted features the model uses: the model of `explicit`
/// (`--model`; failing to load it is an error), else the configured or
/// embedded one as `predict` chooses (failing to load it is said in the
/// answer, not an error: the features are still worth seeing).
fn model_marks(
    explicit: Option<&Path>,
    config: &Config,
    features: &[oxbox::plugins::Feature],
) -> anyhow::Result<serde_json::Value> {
    let source = match (explicit, &config.model.package) {
        (Some(_), _) => "--model",
        (None, Some(_)) => "[model] package",
        (None, None) => "embedded demo model",
    };
    // As `demo::resolve`, without its warning: `source` says which it is.
    let package = match explicit.or(config.model.package.as_deref()) {
        Some(dir) => oxbox::model::promote::load_served(dir),
        None => oxbox::model::demo::materialize(&config.storage.data_dir),
    };
    let package = match package {
        Ok(package) => package,
        Err(e) if explicit.is_some() => return Err(e.into()),
        Err(e) => {
            return Ok(serde_json::json!({
                "source": source,
                "error": format!("no model to mark the features against: {e}"),
            }));
        }
    };
    let manifest = &package.manifest;
    let used = |name: &str| manifest.emr.iter().any(|f| f.name == name);
    let emitted = |name: &str| features.iter().any(|f| f.name == name);
    let (uses, ignores): (Vec<&str>, Vec<&str>) = features
        .iter()
        .map(|f| f.name.as_str())
        .partition(|name| used(name));
    let not_emitted: Vec<&str> = manifest
        .emr
        .iter()
        .map(|f| f.name.as_str())
        .filter(|name| !emitted(name))
        .collect();
    Ok(serde_json::json!({
        "source": source,
        "name": manifest.name,
        "version": manifest.version,
        "digest": package.digest,
        "uses": uses,
        "ignores": ignores,
        "not_emitted": not_emitted,
    }))
}

/// Runs `oxbox plugin pack`.
pub fn pack(args: PackArgs, config: &LoadedConfig) -> anyhow::Result<()> {
    let config = &config.config;
    // Read the key first: a bad key leaves nothing half done.
    let key = args
        .sign_key
        .as_deref()
        .map(signing::SigningKey::load)
        .transpose()?;
    let (engine, cache) = engine_and_cache(config)?;
    let bytes = std::fs::read(&args.wasm)
        .with_context(|| format!("cannot read {}", args.wasm.display()))?;
    let label = args
        .wasm
        .file_stem()
        .map_or_else(|| "plugin".into(), |s| s.to_string_lossy().into_owned());
    let plugin = LoadedPlugin::load(
        &engine,
        Some(&cache),
        &bytes,
        &label,
        config.sandbox.limits(),
    )?;
    let info = plugin.info();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let component = PathBuf::from(format!("{}.wasm", info.name));
    let target = args.out.join(&component);
    // Readable by the service user: a component and its manifest hold no secret.
    oxbox::output::write_shared_bytes(&target, &bytes)?;
    let manifest = Manifest {
        name: info.name.clone(),
        version: info.version.clone(),
        interface: info.interface_version.clone(),
        component,
        sha256: plugin.sha256().to_owned(),
        hooks: plugin.hooks().to_vec(),
    };
    let manifest_path = args.out.join("plugin.toml");
    // A new manifest invalidates any old signature: remove it first, so
    // that no failure below leaves the new manifest beside the old
    // signature (which would read as tampered).
    let old_signature = signature_path(&manifest_path);
    match std::fs::remove_file(&old_signature) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot remove the old signature {}",
                    old_signature.display()
                )
            });
        }
    }
    manifest::write_manifest(&manifest_path, &manifest)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&manifest_path, std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("cannot make {} readable", manifest_path.display()))?;
    }
    println!("{}", manifest_path.display());
    if let Some(key) = key {
        // Signed as `plugin sign` would: the files read back and checked.
        let signature = PluginFiles::load(&manifest_path)?.sign(&key)?;
        println!("{}", signature.display());
    }
    Ok(())
}

/// Runs `oxbox plugin sign`.
pub fn sign(args: SignArgs) -> anyhow::Result<()> {
    // Load fully first: never sign a manifest whose component does not match.
    let files = PluginFiles::load(&args.manifest)?;
    let key = signing::SigningKey::load(&args.key)?;
    let path = files.sign(&key)?;
    println!(
        "{}",
        serde_json::json!({"signature": path.display().to_string(), "public_key": key.public_hex()})
    );
    Ok(())
}

fn micros(mut samples: Vec<f64>) -> serde_json::Value {
    samples.sort_by(f64::total_cmp);
    let median = samples[samples.len() / 2];
    serde_json::json!({"median_us": (median * 10.0).round() / 10.0, "min_us": (samples[0] * 10.0).round() / 10.0})
}

fn synthetic_frame(side: u32, size: u32) -> (Frame, PixelsData) {
    let n = side as usize * side as usize;
    let decoded = dicom::DecodedFrame {
        rows: side,
        columns: side,
        samples: dicom::Samples::U16((0..n).map(|i| (i % 4096) as u16).collect()),
        bits: dicom::StoredBits::width(12, false),
    };
    let pixels = PixelsData::new(Arc::new(decoded), 1.0, 0.0);
    let frame = Frame {
        rows: side,
        columns: side,
        attributes: ImageAttributes {
            modality: "CR".into(),
            photometric_interpretation: "MONOCHROME2".into(),
            bits_stored: 12,
            signed: false,
            rescale_slope: 1.0,
            rescale_intercept: 0.0,
            window_center: Some(2048.0),
            window_width: Some(4096.0),
            presentation_lut_shape: None,
            manufacturer: None,
        },
        size,
        canonical: (0..size * size).map(|i| (i % 256) as f32 / 255.0).collect(),
    };
    (frame, pixels)
}

/// Runs `oxbox plugin bench`.
pub fn bench(args: BenchArgs, config: &LoadedConfig) -> anyhow::Result<()> {
    let config = &config.config;
    let (engine, cache) = engine_and_cache(config)?;
    let (plugin, _) = load_plugin(&args.plugin.file, config, &engine, &cache)?;
    let record = read_record(&args.emr)?;
    if !plugin.has_hook(Hook::MapEmr) {
        bail!("plugin {} has no map-emr hook to benchmark", plugin.name());
    }
    let time = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<serde_json::Value> {
        f()?;
        let mut samples = Vec::with_capacity(args.runs as usize);
        for _ in 0..args.runs {
            let t = Instant::now();
            f()?;
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(micros(samples))
    };
    let map_emr_call = {
        let mut samples = Vec::with_capacity(args.runs as usize);
        plugin.time_map_emr_call(&record)?;
        for _ in 0..args.runs {
            samples.push(plugin.time_map_emr_call(&record)?.as_secs_f64() * 1e6);
        }
        micros(samples)
    };
    let small = synthetic_frame(224, 224);
    let large = synthetic_frame(2048, 224);
    let report = serde_json::json!({
        "plugin": format!("{} {}", plugin.name(), plugin.version()),
        "record_fields": record.len(),
        "instantiate": time(&mut || Ok(plugin.instantiate_only()?))?,
        "map_emr_call": map_emr_call,
        "map_emr_per_request": time(&mut || Ok(plugin.map_emr(&record).map(drop)?))?,
        "preprocess_image_224": time(&mut || Ok(plugin.preprocess_image(&small.0, &small.1).map(drop)?))?,
        "preprocess_image_2048": time(&mut || Ok(plugin.preprocess_image(&large.0, &large.1).map(drop)?))?,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
