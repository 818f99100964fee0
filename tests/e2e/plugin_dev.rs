//! A plugin author's flow, as plugins/README.md tells it: `oxbox plugin new`,
//! the scaffold's own unit test (which catches a misspelt unit), the
//! per-plugin build (`scripts/build-plugins.sh NAME`), `plugin run`; then
//! sign, deploy, `config check`, predict, serve, change, re-sign, reload and
//! tamper; and the author-facing refusals: a bad or existing plugin name, a second `keys
//! generate`, and the modes of packed files.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::serve::{ServerProcess, multipart, multipart_type, request};
use crate::util::{assert_clean_refusal, manifest_sha256, oxbox, repo_root, stderr};

/// Copies `from` into `to` recursively (plain files and folders only).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A minimal checkout in `dir`: the plugins workspace (sources only), the
/// WIT, the build script and the toolchain pin — what a fresh clone has.
fn checkout(dir: &Path) {
    let repo = repo_root();
    for file in ["Cargo.toml", "Cargo.lock", "README.md"] {
        std::fs::create_dir_all(dir.join("plugins")).expect("mkdir");
        std::fs::copy(
            repo.join("plugins").join(file),
            dir.join("plugins").join(file),
        )
        .expect("copy plugins file");
    }
    for member in ["emr-schema", "canonical", "example-site"] {
        copy_tree(
            &repo.join("plugins").join(member),
            &dir.join("plugins").join(member),
        );
    }
    copy_tree(&repo.join("wit"), &dir.join("wit"));
    std::fs::create_dir_all(dir.join("scripts")).expect("mkdir");
    std::fs::copy(
        repo.join("scripts/build-plugins.sh"),
        dir.join("scripts/build-plugins.sh"),
    )
    .expect("copy script");
    std::fs::copy(
        repo.join("rust-toolchain.toml"),
        dir.join("rust-toolchain.toml"),
    )
    .expect("copy toolchain pin");
}

/// Runs `program` in `cwd` with HOME in `home` (so the per-user data and
/// cache folders land there), no OXBOX_CONFIG, the oxbox under test first on PATH, and the
/// plugins' build cache shared with the repository's (only the new crate
/// is compiled).
fn run_in(cwd: &Path, home: &Path, program: &Path, args: &[&str]) -> Output {
    let bin_dir = oxbox().parent().expect("bin dir").to_path_buf();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![bin_dir];
    paths.extend(std::env::split_paths(&path));
    Command::new(program)
        .args(args)
        .current_dir(cwd)
        .env("HOME", home)
        .env_remove("XDG_CACHE_HOME")
        .env_remove("XDG_DATA_HOME")
        .env_remove("OXBOX_CONFIG")
        .env_remove("RUST_LOG")
        .env("PATH", std::env::join_paths(paths).expect("PATH"))
        .env("CARGO_TARGET_DIR", repo_root().join("plugins/target"))
        .output()
        .expect("run")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn cargo() -> PathBuf {
    std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from)
}

#[test]
fn a_new_plugin_goes_from_scaffold_to_a_reloaded_signed_deployment() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (root, home) = (tmp.path().join("repo"), tmp.path().join("home"));
    checkout(&root);
    std::fs::create_dir_all(&home).expect("home");

    let out = run_in(&root, &home, &oxbox(), &["plugin", "new", "e2e-site"]);
    assert!(out.status.success(), "plugin new: {}", stderr(&out));
    let workspace = std::fs::read_to_string(root.join("plugins/Cargo.toml")).expect("workspace");
    let members: toml::Table = toml::from_str(&workspace).expect("workspace TOML");
    let members = members["workspace"]["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m.as_str())
        .collect::<Vec<_>>();
    assert_eq!(
        members,
        ["emr-schema", "canonical", "example-site", "e2e-site"]
    );
    let manifest =
        std::fs::read_to_string(root.join("plugins/e2e-site/Cargo.toml")).expect("crate");
    assert!(
        manifest.contains("name = \"oxbox-plugin-e2e-site\""),
        "{manifest}"
    );
    assert!(manifest.contains("\nversion = \"0.1.0\"\n"), "{manifest}");
    assert!(
        !manifest.lines().any(|l| l.starts_with("version.workspace")),
        "{manifest}"
    );

    // The per-plugin build: updates the lock for the new member, builds,
    // packs and signs (a key path relative to the caller's folder) only this
    // plugin, and never the host.
    let out = run_in(
        &root,
        &home,
        &oxbox(),
        &["keys", "generate", "--out", "keys"],
    );
    assert!(out.status.success(), "keys generate: {}", stderr(&out));
    let generated: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let public = generated["public_key"]
        .as_str()
        .expect("public key")
        .to_owned();
    let script = root.join("scripts/build-plugins.sh");
    let out = run_in(
        &root,
        &home,
        Path::new("bash"),
        &[
            script.to_str().expect("utf-8"),
            "e2e-site",
            "--sign-key",
            "keys/signing-key.pk8",
        ],
    );
    assert!(out.status.success(), "build-plugins.sh: {}", stderr(&out));
    assert!(
        stderr(&out).contains("plugins/Cargo.lock is out of date"),
        "{}",
        stderr(&out)
    );
    assert!(
        !stderr(&out).contains("Compiling oxbox v"),
        "built the host: {}",
        stderr(&out)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "plugins/dist/e2e-site/plugin.toml"
    );
    let lock = std::fs::read_to_string(root.join("plugins/Cargo.lock")).expect("lock");
    assert!(lock.contains("name = \"oxbox-plugin-e2e-site\""));
    let dist = root.join("plugins/dist/e2e-site");
    assert!(
        !root.join("plugins/dist/canonical").exists(),
        "packed others"
    );
    assert_eq!(mode(&dist.join("plugin.toml")), 0o644);
    assert_eq!(mode(&dist.join("e2e-site.wasm")), 0o644);
    assert_eq!(mode(&dist.join("plugin.toml.sig")), 0o644);
    let signature = std::fs::read_to_string(dist.join("plugin.toml.sig")).expect("signature");
    assert!(
        signature.starts_with(&format!("ed25519 {public} ")),
        "{signature}"
    );

    // The scaffold's unit test runs on the build machine (no wasm) and passes…
    let manifest_path = root.join("plugins/Cargo.toml");
    let manifest_path = manifest_path.to_str().expect("utf-8 path");
    let test_args = [
        "test",
        "--release",
        "--manifest-path",
        manifest_path,
        "-p",
        "oxbox-plugin-e2e-site",
    ];
    let out = run_in(&root, &home, &cargo(), &test_args);
    assert!(out.status.success(), "cargo test: {}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("sample_record_converts_through_every_column ... ok"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // …and fails on a misspelt unit.
    let lib = root.join("plugins/e2e-site/src/lib.rs");
    let source = std::fs::read_to_string(&lib).expect("lib.rs");
    let good = "Column::Number(\"creatinine_mg_dl\", \"umol/L\")";
    assert!(source.contains(good), "template changed: {good} not found");
    std::fs::write(
        &lib,
        source.replace(good, "Column::Number(\"creatinine_mg_dl\", \"umol/dl\")"),
    )
    .expect("misspell");
    let out = run_in(&root, &home, &cargo(), &test_args);
    assert!(!out.status.success(), "a misspelt unit passed cargo test");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(
        text.contains("CREAT") && text.contains("unknown unit \"umol/dl\""),
        "{text}"
    );
    std::fs::write(&lib, source).expect("restore");

    // Run it on the example site's record, without --config.
    let record = repo_root().join("samples/example-site-record.json");
    let out = run_in(
        &root,
        &home,
        &oxbox(),
        &[
            "plugin",
            "run",
            "plugins/dist/e2e-site/plugin.toml",
            "--emr",
            record.to_str().expect("utf-8"),
        ],
    );
    assert!(out.status.success(), "plugin run: {}", stderr(&out));
    // Signed by a key the embedded default does not trust, signatures
    // optional: it runs, with one warning naming the key.
    assert_eq!(
        stderr(&out),
        format!(
            "warning: plugin e2e-site is signed by key {public}, which \
             sandbox.trusted_plugin_keys does not list: loaded because signatures are \
             optional here; add the key to trusted_plugin_keys to trust it (with \
             require_signed_plugins it is refused)\n"
        )
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["plugin"]["name"], "e2e-site");
    assert_eq!(report["plugin"]["version"], "0.1.0");
    let temperature = report["features"]["temperature_c"]
        .as_f64()
        .expect("temperature");
    assert!((temperature - (100.9 - 32.0) * 5.0 / 9.0).abs() < 1e-9);
    assert_eq!(report["features"]["o2_device_at_triage"], 1.0);
    assert_eq!(report["features"]["sex"], 0.0);
    // Its compile cache went to the per-user cache, not ./oxbox-data.
    assert!(!root.join("oxbox-data").exists(), "created oxbox-data/");
    assert!(home.join(".cache/oxbox/plugin-cache").is_dir());

    deploy_serve_change_reload_and_tamper(
        &root,
        &home,
        &root.join("keys/signing-key.pk8"),
        &public,
    );
}

/// The rest of the engineer's day, continuing from a built and signed
/// `e2e-site` (`key`, whose public half is `public`): deploy under a config that requires
/// signatures, `config check`, predict, serve; change the plugin, re-sign,
/// redeploy, reload (old → new in the log); then a tampered deployment is
/// refused by `config check` and by the reload, and the box keeps serving
/// the last good plugin.
fn deploy_serve_change_reload_and_tamper(root: &Path, home: &Path, key: &Path, public: &str) {
    // Build, pack and sign in one step.
    let build_and_sign = || {
        let script = root.join("scripts/build-plugins.sh");
        let out = run_in(
            root,
            home,
            Path::new("bash"),
            &[
                script.to_str().expect("utf-8"),
                "e2e-site",
                "--sign-key",
                key.to_str().expect("utf-8"),
            ],
        );
        assert!(out.status.success(), "build-plugins.sh: {}", stderr(&out));
        let dist = root.join("plugins/dist/e2e-site");
        assert!(dist.join("plugin.toml.sig").is_file(), "not signed");
        assert_eq!(mode(&dist.join("plugin.toml.sig")), 0o644);
        dist
    };
    let dist = root.join("plugins/dist/e2e-site");

    // Signed by a key this (default) config does not trust, with
    // signatures optional: the developer's own check works, with a warning
    // that names the key — not a "does not verify" error.
    let manifest = dist.join("plugin.toml");
    let out = run_in(
        root,
        home,
        &oxbox(),
        &["plugin", "check", manifest.to_str().expect("utf-8")],
    );
    assert!(out.status.success(), "plugin check: {}", stderr(&out));
    let check: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(check["signature"]["status"], "untrusted-key", "{check}");
    assert_eq!(check["signature"]["key"], public, "{check}");

    // Deploy: the packed folder under /etc-like path, a config that trusts
    // the key and requires signatures, a model, a token for the admin route.
    let etc = home.join("etc");
    let deployed = etc.join("plugins/e2e-site");
    let deploy = |dist: &Path| {
        std::fs::create_dir_all(&deployed).expect("mkdir");
        for file in ["plugin.toml", "plugin.toml.sig", "e2e-site.wasm"] {
            std::fs::copy(dist.join(file), deployed.join(file)).expect("deploy");
        }
    };
    deploy(&dist);
    let model = home.join("model");
    let out = run_in(
        root,
        home,
        &oxbox(),
        &[
            "model",
            "init",
            "--out",
            model.to_str().expect("utf-8"),
            "--backbone",
            "tiny",
            "--seed",
            "3",
        ],
    );
    assert!(out.status.success(), "model init: {}", stderr(&out));
    let token = "5d41402abc4b2a76b9719d911017c592aaf4b2d3b1c65f5e1d8c4f1e2a3b4c5d";
    let token_file = etc.join("token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let config = etc.join("oxbox.toml");
    std::fs::write(
        &config,
        format!(
            "[site]\nid = \"e2e\"\nname = \"E2E General\"\n\
             [server]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\nreload_min_interval_s = 0\n\
             [storage]\ndata_dir = \"{}\"\n[model]\npackage = \"{}\"\n\
             [sandbox]\nrequire_signed_plugins = true\ntrusted_plugin_keys = [\"{public}\"]\n\
             [[plugins]]\npath = \"{}\"\n",
            token_file.display(),
            home.join("var/oxbox").display(),
            model.display(),
            deployed.join("plugin.toml").display(),
        ),
    )
    .expect("config");
    let config = config.to_str().expect("utf-8");
    let config_check = || {
        run_in(
            root,
            home,
            &oxbox(),
            &["--config", config, "config", "check"],
        )
    };
    let out = config_check();
    assert!(out.status.success(), "config check: {}", stderr(&out));
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(
        said.contains("e2e-site") && said.contains("verified"),
        "config check does not report the plugin it loaded: {said}"
    );

    // Predict from the command line.
    let dicom = repo_root().join("samples/chest-cr-sample.dcm");
    let record = repo_root().join("samples/example-site-record.json");
    let out = run_in(
        root,
        home,
        &oxbox(),
        &[
            "--config",
            config,
            "predict",
            "--dicom",
            dicom.to_str().expect("utf-8"),
            "--emr",
            record.to_str().expect("utf-8"),
        ],
    );
    assert!(out.status.success(), "predict: {}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        report["plugins"],
        serde_json::json!([{"name": "e2e-site", "version": "0.1.0"}])
    );

    // Serve it, logging to a file the test reads.
    let log_path = home.join("serve.log");
    let server = ServerProcess::start_logged(Path::new(config), &log_path);
    let case = multipart(&[
        (
            "dicom",
            "application/dicom",
            &std::fs::read(&dicom).expect("dicom"),
        ),
        (
            "emr",
            "application/json",
            &std::fs::read(&record).expect("record"),
        ),
    ]);
    let content_type = multipart_type();
    // With a token configured, every route asks for it.
    let authorization = format!("Bearer {token}");
    let predict = || {
        let reply = request(
            server.addr,
            "POST",
            "/v1/predict",
            &[
                ("Content-Type", &content_type),
                ("Authorization", &authorization),
            ],
            &case,
        );
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        reply.json()["plugins"][0]["version"]
            .as_str()
            .expect("plugin version")
            .to_owned()
    };
    assert_eq!(predict(), "0.1.0");

    // Change the plugin (a new version), rebuild, re-sign, redeploy, reload.
    let cargo_toml = root.join("plugins/e2e-site/Cargo.toml");
    let text = std::fs::read_to_string(&cargo_toml).expect("Cargo.toml");
    std::fs::write(
        &cargo_toml,
        text.replacen("\nversion = \"0.1.0\"\n", "\nversion = \"0.2.0\"\n", 1),
    )
    .expect("bump version");
    let dist = build_and_sign();
    deploy(&dist);
    let out = config_check();
    assert!(
        out.status.success(),
        "config check after the change: {}",
        stderr(&out)
    );
    let new_sha256 = manifest_sha256(&deployed.join("plugin.toml"));
    let reload = || {
        request(
            server.addr,
            "POST",
            "/v1/admin/plugins/reload",
            &[("Authorization", &authorization)],
            b"",
        )
    };
    let reply = reload();
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(predict(), "0.2.0");
    let log = std::fs::read_to_string(&log_path).expect("server log");
    assert!(
        log.lines().any(|l| l.contains("e2e-site")
            && l.contains("0.1.0")
            && l.contains("0.2.0")
            && l.contains(&new_sha256)),
        "the reload did not log old → new with the sha256:\n{log}"
    );

    // Tamper with the deployed component (the manifest's sha256 made to
    // match, as an intruder would): the signature no longer verifies.
    let wasm = deployed.join("e2e-site.wasm");
    let mut bytes = std::fs::read(&wasm).expect("wasm");
    bytes.extend_from_slice(b"\0");
    std::fs::write(&wasm, &bytes).expect("tamper");
    let manifest_text = std::fs::read_to_string(deployed.join("plugin.toml")).expect("manifest");
    let tampered_sha = oxbox::plugins::manifest::sha256_hex(&bytes);
    std::fs::write(
        deployed.join("plugin.toml"),
        manifest_text.replace(&new_sha256, &tampered_sha),
    )
    .expect("tamper manifest");
    let out = config_check();
    let line = assert_clean_refusal(&out, "config check of a tampered plugin");
    assert!(
        line.contains("e2e-site") && line.contains("tampered"),
        "{line}"
    );
    let reply = reload();
    assert_eq!(
        reply.status,
        422,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    // The last good plugin keeps serving.
    assert_eq!(predict(), "0.2.0");
}

#[test]
fn plugin_new_refuses_bad_and_existing_names() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let plugins = tmp.path().join("plugins");
    std::fs::create_dir_all(plugins.join("canonical")).expect("mkdir");
    let workspace = "# the plugins\n[workspace]\nmembers = [\"canonical\", \"ghost\"]\n";
    std::fs::write(plugins.join("Cargo.toml"), workspace).expect("write");
    let dir = plugins.to_str().expect("utf-8");
    for (name, why) in [
        ("My_Site", "not a valid plugin name"),
        ("2site", "not a valid plugin name"),
        ("../escape", "not a valid plugin name"),
        ("emr-schema", "not a valid plugin name"),
        ("canonical", "exists already"),
        ("ghost", "exists already"),
    ] {
        let out = run_in(
            tmp.path(),
            tmp.path(),
            &oxbox(),
            &["plugin", "new", name, "--dir", dir],
        );
        let line = assert_clean_refusal(&out, name);
        assert!(line.contains(why) && line.contains(name), "{name}: {line}");
    }
    // Nothing written: the manifest as it was, no new or staging folders.
    assert_eq!(
        std::fs::read_to_string(plugins.join("Cargo.toml")).expect("read"),
        workspace
    );
    let mut entries: Vec<_> = std::fs::read_dir(&plugins)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(entries, ["Cargo.toml", "canonical"]);
}

#[test]
fn plugin_new_adds_the_member_keeping_the_manifest_as_written() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let plugins = tmp.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("mkdir");
    let workspace = "# the plugins\n[workspace]\nresolver = \"3\"\nmembers = [\n    \"emr-schema\", # shared\n    \"canonical\",\n]\n\n[profile.release]\nlto = true\n";
    std::fs::write(plugins.join("Cargo.toml"), workspace).expect("write");
    let out = run_in(
        tmp.path(),
        tmp.path(),
        &oxbox(),
        &[
            "plugin",
            "new",
            "site-2",
            "--dir",
            plugins.to_str().expect("utf-8"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(plugins.join("Cargo.toml")).expect("read"),
        workspace.replace("\"canonical\",\n]", "\"canonical\",\n    \"site-2\",\n]")
    );
    let lib = std::fs::read_to_string(plugins.join("site-2/src/lib.rs")).expect("lib.rs");
    assert!(lib.contains("name: \"site-2\".into(),"));
    assert!(!lib.contains("example-site\".into()") && !lib.contains("ExampleSite"));
    assert!(plugins.join("site-2/README.md").is_file());
}

#[test]
fn keys_generate_twice_names_the_existing_key_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let keys = tmp.path().join("keys");
    let keys_arg = keys.to_str().expect("utf-8");
    let out = run_in(
        tmp.path(),
        tmp.path(),
        &oxbox(),
        &["keys", "generate", "--out", keys_arg],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let private = keys.join("signing-key.pk8");
    assert_eq!(mode(&private), 0o600);
    let first = std::fs::read(&private).expect("key");

    let out = run_in(
        tmp.path(),
        tmp.path(),
        &oxbox(),
        &["keys", "generate", "--out", keys_arg],
    );
    let line = assert_clean_refusal(&out, "second keys generate");
    assert!(line.contains(&private.display().to_string()), "{line}");
    assert_eq!(line.matches("exists").count(), 1, "{line}");
    assert!(out.stdout.is_empty());
    assert_eq!(std::fs::read(&private).expect("key"), first, "key replaced");
}

#[test]
fn packed_and_signed_files_are_readable_by_the_service_user() {
    let component = repo_root().join("plugins/dist/example-site/example-site.wasm");
    assert!(
        component.is_file(),
        "{} missing: run scripts/build-plugins.sh",
        component.display()
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("oxbox.toml");
    std::fs::write(
        &config,
        format!(
            "[site]\nid = \"t\"\nname = \"t\"\n[storage]\ndata_dir = \"{}\"\n",
            tmp.path().join("data").display()
        ),
    )
    .expect("config");
    let config = config.to_str().expect("utf-8");
    let out_dir = tmp.path().join("dist");
    let out = run_in(
        tmp.path(),
        tmp.path(),
        &oxbox(),
        &[
            "--config",
            config,
            "plugin",
            "pack",
            component.to_str().expect("utf-8"),
            "--out",
            out_dir.to_str().expect("utf-8"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(mode(&out_dir.join("example-site.wasm")), 0o644);
    assert_eq!(mode(&out_dir.join("plugin.toml")), 0o644);

    let keys = tmp.path().join("keys");
    let out = run_in(
        tmp.path(),
        tmp.path(),
        &oxbox(),
        &["keys", "generate", "--out", keys.to_str().expect("utf-8")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let manifest = out_dir.join("plugin.toml");
    let out = run_in(
        tmp.path(),
        tmp.path(),
        &oxbox(),
        &[
            "plugin",
            "sign",
            manifest.to_str().expect("utf-8"),
            "--key",
            keys.join("signing-key.pk8").to_str().expect("utf-8"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(mode(&out_dir.join("plugin.toml.sig")), 0o644);
    assert_eq!(mode(&keys.join("signing-key.pk8")), 0o600);
    // Signing without --config keeps no state at all in the working dir.
    assert!(!tmp.path().join("oxbox-data").exists());
}
