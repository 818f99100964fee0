//! The plugin sandbox under attack: every hostile test plugin
//! (tests/guests/) is contained — refused, or failed with its named cause
//! within 2× the deadline — while the host's memory stays bounded and a good
//! plugin keeps working. A test binary of its own, its tests serialised, so
//! that timings and memory measurements are not disturbed by other tests.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oxbox::plugins::{FaultCause, LoadedPlugin, PluginEngine, PluginError, PluginLimits, RawField};

/// Serialises this binary's tests.
static SERIAL: Mutex<()> = Mutex::new(());

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A built site plugin's manifest (scripts/build-plugins.sh).
fn dist(name: &str) -> PathBuf {
    let manifest = repo_root()
        .join("plugins/dist")
        .join(name)
        .join("plugin.toml");
    assert!(
        manifest.is_file(),
        "{} missing: run scripts/build-plugins.sh",
        manifest.display()
    );
    manifest
}

/// A built hostile guest component.
fn guest(name: &str) -> Vec<u8> {
    let path = repo_root()
        .join("tests/guests/target/wasm32-wasip2/release")
        .join(format!("hostile_{}.wasm", name.replace('-', "_")));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: run scripts/build-plugins.sh --guests (scripts/test.sh does)",
            path.display()
        )
    })
}

/// Resident set size of this process, bytes.
fn rss() -> u64 {
    proc_status_bytes("VmRSS:")
}

/// Peak resident set size of this process so far, bytes.
fn peak_rss() -> u64 {
    proc_status_bytes("VmHWM:")
}

fn proc_status_bytes(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("{key} in /proc/self/status"))
}

fn record(fields: &[(&str, &str)]) -> Vec<RawField> {
    fields
        .iter()
        .map(|(n, v)| RawField {
            name: (*n).to_owned(),
            value: (*v).to_owned(),
            unit: None,
        })
        .collect()
}

#[test]
fn hostile_plugins_are_contained() {
    let _alone = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let limits = PluginLimits::default();
    let deadline = limits.deadline;
    let engine = Arc::new(PluginEngine::new(&limits).expect("engine"));
    let good_files =
        oxbox::plugins::manifest::PluginFiles::load(&dist("example-site")).expect("good plugin");
    let good = LoadedPlugin::load(
        &engine,
        None,
        &good_files.component,
        "example-site",
        limits.clone(),
    )
    .expect("load good plugin");
    let good_record = record(&[("AGE", "70"), ("O2SAT", "93")]);
    let baseline = rss();
    // Memory a contained plugin may leave the host using, beyond the cap it
    // had while running: the pooling allocator returns slots to the OS.
    let rss_bound = baseline + limits.memory_bytes as u64 + 96 * 1024 * 1024;

    // Refused before instantiation, naming the cause.
    let load = |name: &str| LoadedPlugin::load(&engine, None, &guest(name), name, limits.clone());
    match load("wrong-interface") {
        Err(PluginError::UnsupportedInterface {
            found, supported, ..
        }) => {
            assert_eq!(found, "0.2.0");
            assert_eq!(supported, "0.1.0");
        }
        other => panic!("wrong-interface: expected UnsupportedInterface, got {other:?}"),
    }
    match load("wasi-snoop") {
        Err(PluginError::ForbiddenImport { import, .. }) => {
            assert!(
                import.starts_with("wasi:filesystem") || import.starts_with("wasi:sockets"),
                "{import}"
            );
        }
        other => panic!("wasi-snoop: expected ForbiddenImport, got {other:?}"),
    }

    // Linked but empty: no environment, no arguments, no clock.
    let env = load("env-snoop").expect("env-snoop loads");
    match env.map_emr(&good_record) {
        Err(PluginError::Rejected { message, .. }) => assert_eq!(message, "env=0 args=0 clock=0"),
        other => panic!("env-snoop: expected its report, got {other:?}"),
    }

    // Fail with the named cause, within 2× the deadline; the host carries on.
    type Expect = fn(&FaultCause) -> bool;
    let cases: [(&str, Expect); 6] = [
        ("infinite-loop", |c| matches!(c, FaultCause::Timeout(_))),
        ("memory-grower", |c| {
            matches!(c, FaultCause::MemoryLimit { .. })
        }),
        ("deep-recursion", |c| matches!(c, FaultCause::StackOverflow)),
        (
            "panics",
            |c| matches!(c, FaultCause::Trap(t) if t.contains("panicked")),
        ),
        ("huge-output", |c| {
            matches!(c, FaultCause::MemoryLimit { .. })
        }),
        (
            "stdout-flood",
            |c| matches!(c, FaultCause::Trap(t) if t.contains("stdout or stderr")),
        ),
    ];
    for (name, expected) in cases {
        let plugin = load(name).unwrap_or_else(|e| panic!("{name} should load: {e}"));
        let started = Instant::now();
        let result = plugin.map_emr(&good_record);
        let elapsed = started.elapsed();
        match &result {
            Err(PluginError::Fault { plugin: who, cause }) => {
                assert!(who.starts_with(name), "{name}: error names {who}");
                assert!(expected(cause), "{name}: unexpected cause {cause}");
            }
            other => panic!("{name}: expected a fault, got {other:?}"),
        }
        assert!(
            elapsed < deadline * 2,
            "{name}: took {elapsed:?}, deadline {deadline:?}"
        );
        let now = rss();
        eprintln!(
            "{name}: {} in {:.1} ms; host RSS {} MiB, peak {} MiB (baseline {} MiB, bound {} MiB)",
            result
                .as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default(),
            elapsed.as_secs_f64() * 1e3,
            now >> 20,
            peak_rss() >> 20,
            baseline >> 20,
            rss_bound >> 20
        );
        assert!(
            now < rss_bound,
            "{name}: RSS {} MiB over bound {} MiB",
            now >> 20,
            rss_bound >> 20
        );
        let peak = peak_rss();
        assert!(
            peak < rss_bound,
            "{name}: peak RSS {} MiB over bound {} MiB",
            peak >> 20,
            rss_bound >> 20
        );
        let features = good
            .map_emr(&good_record)
            .unwrap_or_else(|e| panic!("good plugin after {name}: {e}"));
        assert_eq!(features.len(), 21);
    }

    // Repeated faults quarantine the plugin; a reload (a fresh load) lifts it.
    let looping = load("panics").expect("load");
    for _ in 0..limits.fault_threshold {
        assert!(matches!(
            looping.map_emr(&good_record),
            Err(PluginError::Fault { .. })
        ));
    }
    assert!(matches!(
        looping.map_emr(&good_record),
        Err(PluginError::Quarantined { .. })
    ));
}

#[test]
fn slow_but_legal_plugin_just_under_the_deadline_succeeds() {
    let _alone = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Calibrate on this machine: how many rounds of work fill 60 % of the
    // default deadline? Then run exactly that under the default deadline.
    let limits = PluginLimits::default();
    let generous = PluginLimits {
        deadline: Duration::from_secs(30),
        ..limits.clone()
    };
    let engine = Arc::new(PluginEngine::new(&generous).expect("engine"));
    let bytes = guest("slow-but-legal");
    let calibrating = LoadedPlugin::load(&engine, None, &bytes, "slow", generous).expect("load");
    let probe_rounds = 10_000_000u64;
    let probe = record(&[("rounds", &probe_rounds.to_string())]);
    calibrating.map_emr(&probe).expect("warm-up");
    let fastest = (0..3)
        .map(|_| {
            let started = Instant::now();
            calibrating.map_emr(&probe).expect("calibration");
            started.elapsed()
        })
        .min()
        .expect("three runs");
    let rounds = (probe_rounds as f64 * (limits.deadline.as_secs_f64() * 0.6)
        / fastest.as_secs_f64()) as u64;
    let plugin = LoadedPlugin::load(&engine, None, &bytes, "slow", limits.clone()).expect("load");
    let started = Instant::now();
    plugin
        .map_emr(&record(&[("rounds", &rounds.to_string())]))
        .unwrap_or_else(|e| panic!("{rounds} rounds (~60 % of the deadline) must succeed: {e}"));
    let took = started.elapsed();
    assert!(took < limits.deadline, "took {took:?}");
    // Three times the work does not fit: a timeout, within 2× the deadline.
    let started = Instant::now();
    assert!(matches!(
        plugin.map_emr(&record(&[("rounds", &(rounds * 3).to_string())])),
        Err(PluginError::Fault {
            cause: FaultCause::Timeout(_),
            ..
        })
    ));
    assert!(started.elapsed() < limits.deadline * 2);
}

#[test]
fn plugins_read_pixels_through_the_resource() {
    let _alone = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    use oxbox::config::LimitsConfig;
    use oxbox::dicom::{DicomFile, ImageHeader, canonical, pixels};
    let limits = LimitsConfig::default();
    let file =
        DicomFile::open(&repo_root().join("samples/chest-cr-sample.dcm"), &limits).expect("sample");
    let header = ImageHeader::read(&file).expect("header");
    let geometry = header.accept(&limits).expect("accept");
    let frame = pixels::decode_first_frame(&file, &geometry).expect("decode");
    let image = canonical::preprocess(&header, &geometry, &frame, 224);
    let (plugin_frame, pixels) = oxbox::plugins::record::image_frame(&header, &frame, &image);

    let plugin_limits = PluginLimits::default();
    let engine = Arc::new(PluginEngine::new(&plugin_limits).expect("engine"));
    let reader = LoadedPlugin::load(
        &engine,
        None,
        &guest("pixel-reader"),
        "pixel-reader",
        plugin_limits,
    )
    .expect("load");
    let expected_sum: f64 = pixels.values.iter().map(|&v| f64::from(v)).sum();
    match reader.preprocess_image(&plugin_frame, &pixels) {
        Err(PluginError::Rejected { message, .. }) => {
            let field = |key: &str| -> f64 {
                message
                    .split(' ')
                    .find_map(|kv| kv.strip_prefix(key))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{key} in {message}"))
            };
            assert_eq!(field("count=") as usize, pixels.values.len());
            assert!((field("sum=") - expected_sum).abs() <= 1e-6 * expected_sum.abs());
            assert_eq!(field("oob="), 0.0, "reads past the last row return nothing");
        }
        other => panic!("expected the reader's report, got {other:?}"),
    }
}
