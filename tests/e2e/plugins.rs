//! Site plugins: the two real plugins through the CLI, signing and trust,
//! and every hostile plugin contained (in-process, so the host's memory can
//! be measured).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use oxbox::plugins::PluginSet;

use crate::util::{assert_clean_refusal, corpus_file, repo_root, run, stderr};

/// A built plugin folder (scripts/build-plugins.sh).
fn dist(name: &str) -> PathBuf {
    let manifest = repo_root()
        .join("plugins/dist")
        .join(name)
        .join("plugin.toml");
    assert!(
        manifest.is_file(),
        "{} missing: run scripts/build-plugins.sh (scripts/test.sh does)",
        manifest.display()
    );
    manifest
}

fn sample(name: &str) -> PathBuf {
    repo_root().join("samples").join(name)
}

/// A config whose data dir is `dir`, with extra TOML appended.
fn config_in(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("oxbox.toml");
    std::fs::write(
        &path,
        format!(
            "[site]\nid = \"test\"\nname = \"test site\"\n[storage]\ndata_dir = \"{}\"\n{extra}",
            dir.join("data").display()
        ),
    )
    .expect("write config");
    path
}

fn plugin_run(
    manifest: &Path,
    record: &Path,
    config: &Path,
    extra: &[&std::ffi::OsStr],
) -> std::process::Output {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "--config".as_ref(),
        config.as_os_str(),
        "plugin".as_ref(),
        "run".as_ref(),
        manifest.as_os_str(),
        "--emr".as_ref(),
        record.as_os_str(),
    ];
    args.extend_from_slice(extra);
    crate::util::oxbox_command()
        .args(&args)
        .env_remove("OXBOX_CONFIG")
        .output()
        .expect("run oxbox")
}

/// Asserts that canonical feature `name` in a `plugin run` report is `want`.
fn assert_feature(report: &serde_json::Value, name: &str, want: f64) {
    let got = report["features"][name]
        .as_f64()
        .unwrap_or_else(|| panic!("{name} missing in {report}"));
    assert!(
        (got - want).abs() < 1e-6 * want.abs().max(1.0),
        "{name}: {got} != {want}"
    );
}

#[test]
fn example_site_record_becomes_canonical() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = config_in(tmp.path(), "");
    let out = plugin_run(
        &dist("example-site"),
        &sample("example-site-record.json"),
        &config,
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let close = |name: &str, want: f64| assert_feature(&report, name, want);
    close("age_years", 59.0);
    close("sex", 0.0);
    close("temperature_c", (100.9 - 32.0) * 5.0 / 9.0);
    close("systolic_bp_mmhg", 128.0);
    close("diastolic_bp_mmhg", 76.0);
    close("spo2_pct", 91.0);
    close("o2_device_at_triage", 1.0);
    close("crp_mg_l", 87.0);
    close("d_dimer_ng_ml_feu", 1240.0);
    close("troponin_t_ng_l", 12.0);
    close("lymphocytes_e9_l", 0.12 * 6.8);
    close("neutrophils_e9_l", 0.79 * 6.8);
    close("creatinine_mg_dl", 97.0 / 88.42);
    close("glucose_mg_dl", 7.4 * 18.016);
    close("sodium_mmol_l", 136.0);
    assert_eq!(report["features"].as_object().expect("object").len(), 21);
    // The export's identifiers never come out.
    for identifier in ["FAKE-000123", "DOE", "1961-04-02", "E-55501"] {
        assert!(!text.contains(identifier), "{identifier} leaked: {text}");
        assert!(
            !stderr(&out).contains(identifier),
            "{identifier} leaked to stderr"
        );
    }
}

#[test]
fn canonical_plugin_normalises_units_and_rejects_impossible_values() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = config_in(tmp.path(), "");
    let out = plugin_run(
        &dist("canonical"),
        &sample("canonical-record.json"),
        &config,
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let close = |name: &str, want: f64| assert_feature(&report, name, want);
    close("temperature_c", (101.3 - 32.0) * 5.0 / 9.0);
    close("crp_mg_l", 142.0);
    close("d_dimer_ng_ml_feu", 1800.0);
    close("lymphocytes_e9_l", 0.08 * 9.1);
    close("creatinine_mg_dl", 132.0 / 88.42);
    close("glucose_mg_dl", 8.1 * 18.016);
    close("spo2_pct", 88.0);

    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, r#"{"spo2_pct": 150, "age_years": 40}"#).expect("write");
    let out = plugin_run(&dist("canonical"), &bad, &config, &[]);
    let line = assert_clean_refusal(&out, "impossible SpO2");
    assert!(line.contains("spo2_pct") && line.contains("150"), "{line}");
    assert!(line.contains("rejected"), "{line}");
}

#[test]
fn example_site_fixes_mislabelled_monochrome1() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = config_in(tmp.path(), "");
    let source = corpus_file("RG1_UNCR.dcm");
    // The same film, relabelled MONOCHROME2 as the site's reader does.
    let mut obj = dicom_object::open_file(&source).expect("open");
    obj.put_element(dicom_object::mem::InMemElement::new(
        dicom_dictionary_std::tags::PHOTOMETRIC_INTERPRETATION,
        dicom_core::VR::CS,
        dicom_core::PrimitiveValue::from("MONOCHROME2"),
    ));
    let relabelled = tmp.path().join("mislabelled.dcm");
    obj.write_to_file(&relabelled).expect("write");
    // Runs the example site's plugin on `film`; returns its image decision.
    let decide = |film: &Path, out: &Path| -> String {
        let result = plugin_run(
            &dist("example-site"),
            &sample("example-site-record.json"),
            &config,
            &[
                "--dicom".as_ref(),
                film.as_os_str(),
                "--out".as_ref(),
                out.as_os_str(),
            ],
        );
        assert!(result.status.success(), "{}", stderr(&result));
        let report: serde_json::Value = serde_json::from_slice(&result.stdout).expect("JSON");
        report["image"]["decision"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let (fixed, kept) = (tmp.path().join("fixed.npy"), tmp.path().join("kept.npy"));
    assert_eq!(decide(&relabelled, &fixed), "replace");
    // The correctly labelled film is left alone, and both give the same image.
    assert_eq!(decide(&source, &kept), "keep-canonical");
    let (_, a) = crate::util::read_npy(&fixed);
    let (_, b) = crate::util::read_npy(&kept);
    assert!(crate::util::max_abs_diff(&a, &b) < 1e-5);
}

#[test]
fn check_reports_interface_hooks_imports_and_digest() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = config_in(tmp.path(), "");
    let manifest = dist("example-site");
    let out = run(&[
        "--config".as_ref(),
        config.as_os_str(),
        "plugin".as_ref(),
        "check".as_ref(),
        manifest.as_os_str(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["name"], "example-site");
    assert_eq!(report["interface_version"], "0.1.0");
    assert_eq!(
        report["hooks"],
        serde_json::json!(["map-emr", "preprocess-image"])
    );
    assert_eq!(report["signature"]["status"], "unsigned");
    let wasm = std::fs::read(manifest.with_file_name("example-site.wasm")).expect("wasm");
    assert_eq!(
        report["sha256"],
        oxbox::plugins::manifest::sha256_hex(&wasm)
    );
    let imports: Vec<String> = serde_json::from_value(report["imports"].clone()).expect("imports");
    assert!(
        imports.iter().any(|i| i == "oxbox:plugin/host@0.1.0"),
        "{imports:?}"
    );
    assert!(
        imports
            .iter()
            .all(|i| !i.starts_with("wasi:filesystem") && !i.starts_with("wasi:sockets"))
    );
    // Second load comes from the authenticated cache.
    let out = run(&[
        "--config".as_ref(),
        config.as_os_str(),
        "plugin".as_ref(),
        "check".as_ref(),
        manifest.as_os_str(),
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["compiled"], "from cache");
}

#[test]
fn tampered_cache_artifacts_are_never_loaded() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = config_in(tmp.path(), "");
    let manifest = dist("canonical");
    let check = || {
        run(&[
            "--config".as_ref(),
            config.as_os_str(),
            "plugin".as_ref(),
            "check".as_ref(),
            manifest.as_os_str(),
        ])
    };
    assert!(check().status.success());
    let cache = tmp.path().join("data/plugin-cache");
    let artifact = std::fs::read_dir(&cache)
        .expect("cache dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .expect("a compiled artifact");
    let mut bytes = std::fs::read(&artifact).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xFF;
    std::fs::write(&artifact, bytes).expect("tamper");
    let out = check();
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        report["compiled"], "now",
        "a tampered artifact must be recompiled, not loaded"
    );
}

/// Generates a key pair into `dir`; returns its public key (hex).
fn generate_key(dir: &Path) -> String {
    let out = run(&[
        "keys".as_ref(),
        "generate".as_ref(),
        "--out".as_ref(),
        dir.as_os_str(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let generated: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    generated["public_key"]
        .as_str()
        .expect("public key")
        .to_owned()
}

/// A private copy of the example site's packed folder, to sign and tamper
/// with; returns its manifest.
fn example_site_copy(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    for name in ["plugin.toml", "example-site.wasm"] {
        std::fs::copy(dist("example-site").with_file_name(name), dir.join(name)).expect("copy");
    }
    dir.join("plugin.toml")
}

/// A config file `name` in `dir` (data dir `dir/data`) with `sandbox` as
/// its `[sandbox]` table and `plugins` as `[[plugins]]` entries.
fn config_named(dir: &Path, name: &str, sandbox: &str, plugins: &[&Path]) -> PathBuf {
    let path = dir.join(name);
    let mut text = format!(
        "[site]\nid = \"test\"\nname = \"test site\"\n[storage]\ndata_dir = \"{}\"\n[sandbox]\n{sandbox}\n",
        dir.join("data").display()
    );
    for plugin in plugins {
        text.push_str(&format!("[[plugins]]\npath = \"{}\"\n", plugin.display()));
    }
    std::fs::write(&path, text).expect("write config");
    path
}

fn sign(manifest: &Path, key: &Path) {
    let out = run(&[
        "plugin".as_ref(),
        "sign".as_ref(),
        manifest.as_os_str(),
        "--key".as_ref(),
        key.as_os_str(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Changes the last hex digit of a signature file.
fn flip_last_digit(sig: &Path) {
    let text = std::fs::read_to_string(sig).expect("sig");
    let body = text.trim_end();
    let last = if body.ends_with('0') { "1" } else { "0" };
    std::fs::write(sig, format!("{}{last}\n", &body[..body.len() - 1])).expect("write");
}

#[test]
fn signed_plugins_and_trust() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let keys = tmp.path().join("keys");
    let public = generate_key(&keys);
    let other = generate_key(&tmp.path().join("other-keys"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(keys.join("signing-key.pk8"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let folder = tmp.path().join("example-site");
    let manifest = example_site_copy(&folder);
    let trusting = format!("trusted_plugin_keys = [\"{public}\"]");
    let untrusting = format!("trusted_plugin_keys = [\"{other}\"]");
    // (config, signatures required?) for each trust × policy.
    let optional = config_named(tmp.path(), "optional.toml", &trusting, &[]);
    let strict = config_named(
        tmp.path(),
        "strict.toml",
        &format!("require_signed_plugins = true\n{trusting}"),
        &[],
    );
    let untrusting_optional = config_named(tmp.path(), "untrusting.toml", "", &[]);
    let untrusting_strict = config_named(
        tmp.path(),
        "untrusting-strict.toml",
        &format!("require_signed_plugins = true\n{untrusting}"),
        &[],
    );
    let tool = |command: &str, config: &Path| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--config".as_ref(),
            config.as_os_str(),
            "plugin".as_ref(),
            command.as_ref(),
            manifest.as_os_str(),
        ];
        let record = sample("example-site-record.json");
        if command == "run" {
            args.extend(["--emr".as_ref(), record.as_os_str()]);
        }
        run(&args)
    };
    let check = |config: &Path| tool("check", config);
    let status_of = |config: &Path| {
        let out = check(config);
        assert!(out.status.success(), "{}", stderr(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        (report["signature"].clone(), stderr(&out))
    };

    // 1. Unsigned: fine where optional, refused where required.
    for config in [&optional, &untrusting_optional] {
        let (status, err) = status_of(config);
        assert_eq!(status, serde_json::json!({"status": "unsigned"}));
        assert!(err.is_empty(), "{err}");
    }
    for config in [&strict, &untrusting_strict] {
        let line = assert_clean_refusal(&check(config), "unsigned under require_signed_plugins");
        assert!(line.contains("require_signed_plugins"), "{line}");
    }

    // 2. Signed by a trusted key: verified under both policies.
    let key = keys.join("signing-key.pk8");
    sign(&manifest, &key);
    let sig = folder.join("plugin.toml.sig");
    let sig_text = std::fs::read_to_string(&sig).expect("sig");
    assert!(
        sig_text.starts_with(&format!("ed25519 {public} ")),
        "{sig_text}"
    );
    for config in [&optional, &strict] {
        let (status, err) = status_of(config);
        assert_eq!(
            status,
            serde_json::json!({"status": "verified", "key": public})
        );
        assert!(err.is_empty(), "{err}");
    }

    // 3. Signed by a key this config does not trust: a warning where
    // signatures are optional (check and run succeed), an error naming the
    // key where they are required.
    let (status, err) = status_of(&untrusting_optional);
    assert_eq!(
        status,
        serde_json::json!({"status": "untrusted-key", "key": public})
    );
    assert!(
        err.starts_with("warning: ")
            && err.contains(&public)
            && err.contains("trusted_plugin_keys"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = tool("run", &untrusting_optional);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("warning: "), "{}", stderr(&out));
    let line = assert_clean_refusal(&check(&untrusting_strict), "untrusted key, required");
    assert!(
        line.contains(&format!("signed by key {public}"))
            && line.contains("add it to sandbox.trusted_plugin_keys")
            && !line.contains("tampered"),
        "{line}"
    );

    // 4. Tampered: an edited manifest, under every config.
    let original = std::fs::read_to_string(&manifest).expect("read");
    std::fs::write(
        &manifest,
        original.replace("\"\ninterface", "-edited\"\ninterface"),
    )
    .expect("edit");
    for config in [&optional, &strict, &untrusting_optional, &untrusting_strict] {
        let line = assert_clean_refusal(&check(config), "edited manifest");
        assert!(line.contains("signature: tampered"), "{line}");
    }
    std::fs::write(&manifest, &original).expect("restore");
    assert!(check(&strict).status.success());
    // …and an edited signature file.
    flip_last_digit(&sig);
    for config in [&optional, &strict, &untrusting_optional, &untrusting_strict] {
        let line = assert_clean_refusal(&check(config), "edited signature");
        assert!(line.contains("signature: tampered"), "{line}");
    }
    // A signature file that is not one at all.
    std::fs::write(&sig, "not a signature\n").expect("write");
    let line = assert_clean_refusal(&check(&optional), "garbage signature");
    assert!(line.contains("not an oxbox signature file"), "{line}");

    // A legacy bare-hex signature: verifies against a trusted key; else it
    // cannot tell untrusted from tampered, and says so.
    let legacy = keys.join("legacy");
    sign(&manifest, &key);
    let words: Vec<String> = std::fs::read_to_string(&sig)
        .expect("sig")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    std::fs::write(&legacy, format!("{}\n", words[2])).expect("legacy");
    std::fs::copy(&legacy, &sig).expect("legacy sig");
    let (status, _) = status_of(&strict);
    assert_eq!(status["status"], "verified");
    let line = assert_clean_refusal(&check(&untrusting_optional), "legacy, unknown key");
    assert!(
        line.contains("signed by an unknown key or changed since signing; re-sign to tell which"),
        "{line}"
    );

    // A signed manifest whose component was swapped: the digest check fails.
    sign(&manifest, &key);
    let wasm = folder.join("example-site.wasm");
    let component = std::fs::read(&wasm).expect("wasm");
    std::fs::copy(dist("canonical").with_file_name("canonical.wasm"), &wasm).expect("swap");
    let line = assert_clean_refusal(&check(&strict), "swapped component");
    assert!(line.contains("sha256"), "{line}");
    std::fs::write(&wasm, component).expect("restore");
    assert!(check(&strict).status.success());
}

#[test]
fn pack_signs_in_one_step_and_a_plain_repack_drops_the_signature() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let keys = tmp.path().join("keys");
    let public = generate_key(&keys);
    let strict = config_named(
        tmp.path(),
        "strict.toml",
        &format!("require_signed_plugins = true\ntrusted_plugin_keys = [\"{public}\"]"),
        &[],
    );
    let wasm = dist("example-site").with_file_name("example-site.wasm");
    let out_dir = tmp.path().join("dist");
    let pack = |sign_key: Option<&Path>| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--config".as_ref(),
            strict.as_os_str(),
            "plugin".as_ref(),
            "pack".as_ref(),
            wasm.as_os_str(),
            "--out".as_ref(),
            out_dir.as_os_str(),
        ];
        if let Some(key) = sign_key {
            args.extend(["--sign-key".as_ref(), key.as_os_str()]);
        }
        run(&args)
    };
    let manifest = out_dir.join("plugin.toml");
    let check = || {
        run(&[
            "--config".as_ref(),
            strict.as_os_str(),
            "plugin".as_ref(),
            "check".as_ref(),
            manifest.as_os_str(),
        ])
    };
    // A bad key: refused before anything is written.
    let out = pack(Some(&wasm));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("PKCS#8"), "{}", stderr(&out));
    assert!(!out_dir.exists(), "wrote before the key was read");

    let out = pack(Some(&keys.join("signing-key.pk8")));
    assert!(out.status.success(), "{}", stderr(&out));
    let sig = out_dir.join("plugin.toml.sig");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}\n{}\n", manifest.display(), sig.display())
    );
    let out = check();
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        report["signature"],
        serde_json::json!({"status": "verified", "key": public})
    );
    // Packing again without a key: the old signature goes, so the box
    // refuses an unsigned plugin rather than reporting tampering.
    let out = pack(None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!sig.exists());
    let line = assert_clean_refusal(&check(), "re-packed, not re-signed");
    assert!(line.contains("require_signed_plugins"), "{line}");
}

#[test]
fn config_check_loads_the_plugins_as_serve_would() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let keys = tmp.path().join("keys");
    let public = generate_key(&keys);
    let manifest = example_site_copy(&tmp.path().join("example-site"));
    let trusting = format!("trusted_plugin_keys = [\"{public}\"]");
    let strict_policy = format!("require_signed_plugins = true\n{trusting}");
    let config_check = |config: &Path| {
        run(&[
            "--config".as_ref(),
            config.as_os_str(),
            "config".as_ref(),
            "check".as_ref(),
        ])
    };
    let strict = config_named(tmp.path(), "strict.toml", &strict_policy, &[&manifest]);
    let untrusting = config_named(tmp.path(), "untrusting.toml", "", &[&manifest]);

    // Unsigned under require_signed_plugins: refused, naming the plugin.
    let line = assert_clean_refusal(&config_check(&strict), "unsigned, required");
    assert!(
        line.contains("example-site") && line.contains("require_signed_plugins"),
        "{line}"
    );
    assert!(line.contains("strict.toml"), "{line}");

    // Signed by the trusted key: passes and says what would be loaded.
    sign(&manifest, &keys.join("signing-key.pk8"));
    let out = config_check(&strict);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let sha256 = oxbox::plugins::manifest::sha256_hex(
        &std::fs::read(manifest.with_file_name("example-site.wasm")).expect("wasm"),
    );
    let line = text
        .lines()
        .find(|l| l.starts_with("# plugin: example-site "))
        .unwrap_or_else(|| panic!("no plugin line in {text}"));
    assert!(
        line.contains(&format!("sha256 {sha256}"))
            && line.contains(&format!("signature verified (key {public})")),
        "{line}"
    );
    assert!(text.contains("# model: none configured"), "{text}");
    // Nothing left behind: no compile cache, no data dir.
    assert!(
        !tmp.path().join("data").exists(),
        "config check wrote state"
    );

    // Signed by a key this config does not trust, signatures optional:
    // passes, with a warning.
    let out = config_check(&untrusting);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("warning: plugin example-site is signed by key"),
        "{}",
        stderr(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("signature untrusted-key (key {public}")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A tampered signature.
    let sig = manifest.with_file_name("plugin.toml.sig");
    let good_sig = std::fs::read(&sig).expect("sig");
    flip_last_digit(&sig);
    for config in [&strict, &untrusting] {
        let line = assert_clean_refusal(&config_check(config), "tampered signature");
        assert!(
            line.contains("example-site") && line.contains("tampered"),
            "{line}"
        );
    }
    std::fs::write(&sig, good_sig).expect("restore");

    // A wrong sha256 in the manifest (signatures optional, so the digest
    // check is what fails).
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    std::fs::write(&manifest, text.replace(&sha256, &"0".repeat(64))).expect("edit");
    let line = assert_clean_refusal(&config_check(&untrusting), "wrong sha256");
    assert!(
        line.contains("sha256") && line.contains("example-site"),
        "{line}"
    );
}

#[test]
fn plugin_sets_chain_and_reload_atomically() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let one = format!(
        "[[plugins]]\npath = \"{}\"\n",
        dist("example-site").display()
    );
    let two = format!(
        "{one}[[plugins]]\npath = \"{}\"\n",
        dist("canonical").display()
    );
    let config_path = config_in(tmp.path(), &one);
    let loaded = oxbox::config::LoadedConfig::load(Some(&config_path)).expect("config");
    let registry = Arc::new(oxbox::plugins::PluginRegistry::new(&loaded).expect("registry"));
    let fields = oxbox::plugins::record::raw_fields_from_json(
        &serde_json::from_str(
            &std::fs::read_to_string(sample("example-site-record.json")).expect("record"),
        )
        .expect("json"),
    )
    .expect("fields");
    let before: Arc<PluginSet> = registry.current();
    assert_eq!(before.plugins().len(), 1);
    let single = before.map_emr(fields.clone()).expect("map");

    // example-site → canonical: the second plugin re-checks the first's output.
    std::fs::write(
        &config_path,
        std::fs::read_to_string(&config_path)
            .expect("read")
            .replace(&one, &two),
    )
    .expect("write");
    assert_eq!(registry.reload().expect("reload"), 2);
    let chained = registry.current().map_emr(fields.clone()).expect("chain");
    assert_eq!(chained.len(), single.len());
    for (a, b) in single.iter().zip(&chained) {
        assert_eq!(a.name, b.name);
        match (a.value, b.value) {
            (Some(x), Some(y)) => assert!((x - y).abs() < 1e-9 * x.abs().max(1.0), "{}", a.name),
            (x, y) => assert_eq!(x, y, "{}", a.name),
        }
    }
    // The request that took the old set finishes on it.
    assert_eq!(before.plugins().len(), 1);
    assert!(before.map_emr(fields.clone()).is_ok());

    // A broken set leaves the running one in place.
    std::fs::write(
        &config_path,
        std::fs::read_to_string(&config_path)
            .expect("read")
            .replace("canonical/plugin.toml", "missing/plugin.toml"),
    )
    .expect("write");
    assert!(registry.reload().is_err());
    assert_eq!(registry.current().plugins().len(), 2);
}

#[test]
fn serve_logs_untrusted_signers_at_start_and_reload_and_lists_their_status() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;

    use crate::serve::{Setup, assert_conforms, openapi, request, wait_for_admin_events};

    let setup = Setup::new("listen = \"127.0.0.1:0\"");
    let public = generate_key(&setup.dir.path().join("keys"));
    let manifest = example_site_copy(&setup.dir.path().join("example-site"));
    sign(&manifest, &setup.dir.path().join("keys/signing-key.pk8"));
    // The config trusts no key and signatures are optional.
    let text = std::fs::read_to_string(&setup.config).expect("config");
    let packed = dist("example-site").display().to_string();
    assert!(text.contains(&packed), "{text}");
    std::fs::write(
        &setup.config,
        text.replace(&packed, &manifest.display().to_string()),
    )
    .expect("config");

    let mut child = crate::util::oxbox_command()
        .args([
            "--config".as_ref(),
            setup.config.as_os_str(),
            "serve".as_ref(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn oxbox serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the listening line");
    let addr: std::net::SocketAddr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .expect("address");
    let reply = request(addr, "GET", "/v1/plugins", &[], b"");
    assert_eq!(reply.status, 200);
    assert_conforms(&openapi(), "GET", "/v1/plugins", &reply);
    let plugin = reply.json()["plugins"][0].clone();
    assert_eq!(
        plugin["signature"],
        serde_json::json!({"status": "untrusted-key", "key": public})
    );
    assert_eq!(plugin["signed_by"], serde_json::Value::Null);

    let hup = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    assert_eq!(wait_for_admin_events(&setup, 1)[0].outcome, "ok");
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(term.success());
    let mut log = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut log)
        .expect("read the log");
    assert!(child.wait().expect("wait").success(), "{log}");
    // Logged when the set was loaded at start and again on the reload.
    let warning = format!("plugin example-site is signed by key {public}");
    assert_eq!(log.matches(&warning).count(), 2, "{log}");
}
