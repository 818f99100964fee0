//! The plugin sandbox under attack: every hostile test plugin
//! (tests/guests/) is contained — refused, or failed with its named cause
//! within 2× the deadline — while the host's memory stays bounded and a good
//! plugin keeps working; and what a plugin returns is checked against EMR
//! schema v1 (unknown or doubled features are faults, implausible values
//! refusals that never quarantine). A test binary of its own, its tests
//! serialised, so that timings and memory measurements are not disturbed by
//! other tests.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oxbox::plugins::cache::{CacheOutcome, ComponentCache};
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
        ("stdout-flood", |c| {
            matches!(c, FaultCause::StdioLimit { .. })
        }),
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
    let (plugin_frame, pixels) = oxbox::plugins::record::image_frame(&header, frame, &image);

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
    let all = pixels.read_rows(0, pixels.rows());
    assert_eq!(all.len(), (pixels.rows() * pixels.columns()) as usize);
    let expected_sum: f64 = all.iter().map(|&v| f64::from(v)).sum();
    match reader.preprocess_image(&plugin_frame, &pixels) {
        Err(PluginError::Rejected { message, .. }) => {
            let field = |key: &str| -> f64 {
                message
                    .split(' ')
                    .find_map(|kv| kv.strip_prefix(key))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{key} in {message}"))
            };
            assert_eq!(field("count=") as usize, all.len());
            assert!((field("sum=") - expected_sum).abs() <= 1e-6 * expected_sum.abs());
            assert_eq!(field("oob="), 0.0, "reads past the last row return nothing");
        }
        other => panic!("expected the reader's report, got {other:?}"),
    }
}

/// The sample radiograph as a `preprocess-image` plugin gets it.
fn sample_image() -> (oxbox::plugins::Frame, oxbox::plugins::PixelsData) {
    use oxbox::config::LimitsConfig;
    use oxbox::dicom::{DicomFile, ImageHeader, canonical, pixels};
    let limits = LimitsConfig::default();
    let file =
        DicomFile::open(&repo_root().join("samples/chest-cr-sample.dcm"), &limits).expect("sample");
    let header = ImageHeader::read(&file).expect("header");
    let geometry = header.accept(&limits).expect("accept");
    let frame = pixels::decode_first_frame(&file, &geometry).expect("decode");
    let image = canonical::preprocess(&header, &geometry, &frame, 224);
    oxbox::plugins::record::image_frame(&header, frame, &image)
}

#[test]
fn a_plugin_sleeping_20_s_returns_within_the_deadline_in_both_hooks() {
    let _alone = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let limits = PluginLimits::default();
    let deadline = limits.deadline;
    let engine = Arc::new(PluginEngine::new(&limits).expect("engine"));
    let sleeper = LoadedPlugin::load(&engine, None, &guest("sleeper"), "sleeper", limits.clone())
        .expect("load");
    let (frame, pixels) = sample_image();
    for round in 0..3 {
        // `std::thread::sleep(20 s)`: a monotonic-clock pollable, which the
        // sandbox makes ready at once, so the call just returns.
        let started = Instant::now();
        let features = sleeper.map_emr(&record(&[("AGE", "70")]));
        let map_emr = started.elapsed();
        let started = Instant::now();
        let decision = sleeper.preprocess_image(&frame, &pixels);
        let preprocess = started.elapsed();
        eprintln!(
            "sleeper round {round}: map-emr returned in {:.2} ms, preprocess-image in {:.2} ms (20 s asked; bound {} ms)",
            map_emr.as_secs_f64() * 1e3,
            preprocess.as_secs_f64() * 1e3,
            (deadline * 2).as_millis()
        );
        assert!(features.is_ok(), "{features:?}");
        assert!(decision.is_ok(), "{decision:?}");
        assert!(map_emr < deadline * 2, "map-emr took {map_emr:?}");
        assert!(
            preprocess < deadline * 2,
            "preprocess-image took {preprocess:?}"
        );
    }
    assert_eq!(sleeper.consecutive_faults(), 0);
}

#[test]
fn more_calls_than_sandboxes_wait_or_are_refused_as_load_never_as_faults() {
    let _alone = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let bytes = guest("slow-but-legal");
    let threads = 64;
    for sandboxes in [4, oxbox::plugins::engine::MAX_CONCURRENT_SANDBOXES] {
        let limits = PluginLimits {
            sandboxes,
            ..PluginLimits::default()
        };
        let deadline = limits.deadline;
        let engine = Arc::new(PluginEngine::new(&limits).expect("engine"));
        let plugin =
            Arc::new(LoadedPlugin::load(&engine, None, &bytes, "slow", limits).expect("load"));
        // Calibrate: rounds for about 3 ms of work per call on this machine,
        // so that 64 calls on a few cores fit in the deadline: healthy.
        let probe = 1_000_000u64;
        plugin
            .map_emr(&record(&[("rounds", &probe.to_string())]))
            .expect("warm-up");
        let started = Instant::now();
        plugin
            .map_emr(&record(&[("rounds", &probe.to_string())]))
            .expect("probe");
        let per_round = started.elapsed().as_secs_f64() / probe as f64;
        let rounds = ((0.003 / per_round) as u64).max(1);
        let work = record(&[("rounds", &rounds.to_string())]);
        let barrier = Arc::new(std::sync::Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (plugin, barrier, work) =
                    (Arc::clone(&plugin), Arc::clone(&barrier), work.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let started = Instant::now();
                    let result = plugin.map_emr(&work);
                    (result, started.elapsed())
                })
            })
            .collect();
        let (mut ok, mut busy, mut faults, mut slowest) = (0, 0, 0, Duration::ZERO);
        for handle in handles {
            let (result, took) = handle.join().expect("thread");
            slowest = slowest.max(took);
            match result {
                Ok(_) => ok += 1,
                Err(PluginError::Busy { .. }) => busy += 1,
                Err(e) => {
                    eprintln!("unexpected: {e}");
                    faults += 1;
                }
            }
        }
        eprintln!(
            "{threads} concurrent calls on {sandboxes} sandboxes (~3 ms of work each): {ok} ok, {busy} busy (503), {faults} faults; slowest {:.0} ms; quarantined: {}",
            slowest.as_secs_f64() * 1e3,
            plugin.is_quarantined()
        );
        assert_eq!(faults, 0, "load must never be a fault");
        assert_eq!(ok + busy, threads);
        assert!(ok > 0);
        assert_eq!(plugin.consecutive_faults(), 0);
        assert!(!plugin.is_quarantined());
        // A call waits at most its deadline for a slot, then runs within
        // its deadline.
        assert!(
            slowest < deadline * 2 + Duration::from_millis(100),
            "{slowest:?}"
        );
        plugin.map_emr(&work).expect("healthy afterwards");
    }

    // Every slot held past a call's whole wait: that call is refused as
    // load (Busy), and nothing counts towards quarantine.
    let one = PluginLimits {
        sandboxes: 1,
        ..PluginLimits::default()
    };
    let engine = Arc::new(PluginEngine::new(&one).expect("engine"));
    let patient = PluginLimits {
        deadline: Duration::from_secs(5),
        ..one.clone()
    };
    let holder =
        Arc::new(LoadedPlugin::load(&engine, None, &bytes, "slow", patient).expect("load"));
    let waiter = LoadedPlugin::load(&engine, None, &bytes, "slow", one.clone()).expect("load");
    let probe = 1_000_000u64;
    let started = Instant::now();
    holder
        .map_emr(&record(&[("rounds", &probe.to_string())]))
        .expect("probe");
    let per_round = started.elapsed().as_secs_f64() / probe as f64;
    let long = record(&[("rounds", &((1.5 / per_round) as u64).to_string())]);
    let running = {
        let holder = Arc::clone(&holder);
        std::thread::spawn(move || holder.map_emr(&long))
    };
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    let refused = waiter.map_emr(&record(&[("rounds", "1")]));
    let waited = started.elapsed();
    eprintln!(
        "1 sandbox held for ~1.5 s: a concurrent call {} after {:.0} ms; its faults: {}",
        refused
            .as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_else(|| "succeeded".to_owned()),
        waited.as_secs_f64() * 1e3,
        waiter.consecutive_faults()
    );
    assert!(
        matches!(refused, Err(PluginError::Busy { .. })),
        "{refused:?}"
    );
    assert!(
        waited >= one.deadline && waited < one.deadline * 2,
        "{waited:?}"
    );
    assert_eq!(waiter.consecutive_faults(), 0);
    running
        .join()
        .expect("holder thread")
        .expect("the slot holder finishes normally");
    waiter
        .map_emr(&record(&[("rounds", "1")]))
        .expect("served once the slot is free");
    // The server answers it as overload: 503 with Retry-After, not a fault.
    use oxbox::serve::problem::ServeProblems;
    let problem = oxbox::serve::problem::Problem::from_pipeline(
        &oxbox::pipeline::PipelineError::Plugin(refused.expect_err("busy")),
    );
    assert_eq!(problem.status, 503);
    assert_eq!(problem.kind, "urn:oxbox:problem:overloaded");
    assert_eq!(problem.retry_after, Some(1));
}

#[test]
fn a_cache_artifact_renamed_onto_another_plugin_is_recompiled() {
    let _alone = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let data = tempfile::tempdir().expect("tempdir");
    let cache = ComponentCache::open(data.path()).expect("cache");
    let limits = PluginLimits::default();
    let engine = Arc::new(PluginEngine::new(&limits).expect("engine"));
    let component = |name: &str| {
        oxbox::plugins::manifest::PluginFiles::load(&dist(name))
            .expect("plugin files")
            .component
    };
    let (a_bytes, b_bytes) = (component("example-site"), component("canonical"));
    let load = |bytes: &[u8], label: &str| {
        LoadedPlugin::load(&engine, Some(&cache), bytes, label, limits.clone()).expect("load")
    };
    let a = load(&a_bytes, "example-site");
    let b = load(&b_bytes, "canonical");
    assert_eq!(a.cache_outcome(), CacheOutcome::Compiled);
    assert_eq!(b.cache_outcome(), CacheOutcome::Compiled);
    assert_eq!(
        load(&b_bytes, "canonical").cache_outcome(),
        CacheOutcome::Cached
    );

    // Copy A's artifact and tag onto B's entry.
    let dir = data.path().join("plugin-cache");
    let entry = |p: &LoadedPlugin, ext: &str| {
        dir.join(format!(
            "{}-{}.{ext}",
            p.sha256(),
            engine.compatibility_hash()
        ))
    };
    for ext in ["cwasm", "tag"] {
        assert!(entry(&a, ext).is_file(), "{}", entry(&a, ext).display());
        std::fs::copy(entry(&a, ext), entry(&b, ext)).expect("swap");
    }
    let swapped = load(&b_bytes, "canonical");
    eprintln!(
        "B's cache entry holding A's artifact: {:?}; B describes itself as {}",
        swapped.cache_outcome(),
        swapped.name()
    );
    assert_eq!(swapped.cache_outcome(), CacheOutcome::Compiled);
    assert_eq!(swapped.name(), "canonical");
    let canonical = record(&[("age_years", "70"), ("spo2_pct", "93")]);
    let features = swapped.map_emr(&canonical).expect("B behaves as B");
    assert!(
        features
            .iter()
            .any(|f| f.name == "spo2_pct" && f.value == Some(93.0))
    );
    // The entry was rewritten with B's own artifact: cached from now on.
    assert_eq!(
        load(&b_bytes, "canonical").cache_outcome(),
        CacheOutcome::Cached
    );
    assert_eq!(
        load(&a_bytes, "example-site").cache_outcome(),
        CacheOutcome::Cached
    );
}

#[test]
fn wasi_random_is_deterministic_and_bounded() {
    let _alone = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let limits = PluginLimits::default();
    let engine = Arc::new(PluginEngine::new(&limits).expect("engine"));
    let bytes = guest("random-probe");
    let report = |plugin: &LoadedPlugin, len: u64| match plugin
        .map_emr(&record(&[("bytes", &len.to_string())]))
    {
        Err(PluginError::Rejected { message, .. }) => message,
        other => panic!("expected the probe's report, got {other:?}"),
    };
    let first =
        LoadedPlugin::load(&engine, None, &bytes, "random-probe", limits.clone()).expect("load");
    let second =
        LoadedPlugin::load(&engine, None, &bytes, "random-probe", limits.clone()).expect("load");
    let a = report(&first, 64);
    let b = report(&second, 64);
    eprintln!("random-probe, two loads: {a} | {b}");
    assert!(a.starts_with("len=64 "), "{a}");
    assert_eq!(a, b, "the same bytes on every run");
    assert_eq!(report(&first, 64), a, "and on every call");

    let before = peak_rss();
    let started = Instant::now();
    let huge = first.map_emr(&record(&[("bytes", &(64u64 << 20).to_string())]));
    let took = started.elapsed();
    let grew = peak_rss().saturating_sub(before);
    eprintln!(
        "get-random-bytes(64 MiB): {} in {:.2} ms; peak RSS grew {} KiB",
        huge.as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_default(),
        took.as_secs_f64() * 1e3,
        grew >> 10
    );
    assert!(
        matches!(
            &huge,
            Err(PluginError::Fault {
                cause: FaultCause::HostCallLimit(_),
                ..
            })
        ),
        "{huge:?}"
    );
    assert!(grew < 16 << 20, "the host allocated {grew} bytes");
}

#[test]
fn plugin_logs_are_capped_per_call_and_per_minute() {
    let _alone = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let limits = PluginLimits::default();
    let engine = Arc::new(PluginEngine::new(&limits).expect("engine"));
    let forger = LoadedPlugin::load(
        &engine,
        None,
        &guest("log-forger"),
        "log-forger",
        limits.clone(),
    )
    .expect("load");
    let good_record = record(&[("AGE", "70")]);
    forger.map_emr(&good_record).expect("one call");
    let one = forger.log_counts();
    // 201 messages and two stdio streams: at most 64 messages + 2 lines.
    assert!(
        one.emitted <= u64::from(oxbox::plugins::MAX_LOG_MESSAGES) + 2,
        "{one:?}"
    );
    let calls = 2 * oxbox::plugins::MAX_LOG_LINES_PER_MINUTE / oxbox::plugins::MAX_LOG_MESSAGES;
    for _ in 0..calls {
        forger.map_emr(&good_record).expect("call");
    }
    let many = forger.log_counts();
    eprintln!(
        "log-forger: one call wrote {} lines; {} calls wrote {} and dropped {} (cap {} per minute)",
        one.emitted,
        calls + 1,
        many.emitted,
        many.dropped,
        oxbox::plugins::MAX_LOG_LINES_PER_MINUTE
    );
    assert_eq!(
        many.emitted,
        u64::from(oxbox::plugins::MAX_LOG_LINES_PER_MINUTE)
    );
    assert!(many.dropped > 0);
}

#[test]
fn plugin_output_is_checked_against_the_emr_schema() {
    let _alone = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let limits = PluginLimits::default();
    let engine = Arc::new(PluginEngine::new(&limits).expect("engine"));
    let echo = || {
        LoadedPlugin::load(
            &engine,
            None,
            &guest("feature-echo"),
            "feature-echo",
            limits.clone(),
        )
        .expect("feature-echo loads")
    };
    let malformed = |result: Result<_, PluginError>| match result {
        Err(PluginError::Fault {
            cause: FaultCause::MalformedOutput(what),
            ..
        }) => what,
        other => panic!("expected a malformed-output fault, got {other:?}"),
    };

    // Schema features, a subset, one missing: accepted as they are.
    let plugin = echo();
    let features = plugin
        .map_emr(&record(&[("spo2_pct", "95"), ("age_years", "")]))
        .expect("schema features");
    assert_eq!(features.len(), 2);
    assert_eq!(
        (features[1].name.as_str(), features[1].value),
        ("age_years", None)
    );

    // A rejection whose `field` is not a name of the record (here it holds
    // the value): the field is not kept as a name — logs and audit rows
    // carry only names — and the text stays in the message, for the caller.
    match plugin.map_emr(&record(&[("spo2_pct", "ninety")])) {
        Err(PluginError::Rejected { field, message, .. }) => {
            assert_eq!(field, None);
            assert!(message.contains("spo2_pct=ninety"), "{message}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    let redacted = oxbox::pipeline::PipelineError::Plugin(
        plugin
            .map_emr(&record(&[("spo2_pct", "ninety")]))
            .expect_err("rejected"),
    )
    .redacted();
    assert!(!redacted.contains("ninety"), "{redacted}");

    // A lab outside the schema: a fault naming it, no suggestion.
    let what = malformed(plugin.map_emr(&record(&[("spo2_pct", "95"), ("il6_pg_ml", "12")])));
    assert!(
        what.contains("\"il6_pg_ml\" is not in EMR schema v1"),
        "{what}"
    );
    assert!(!what.contains("did you mean"), "{what}");
    // A typo: the schema name it is closest to.
    let what = malformed(plugin.map_emr(&record(&[("spo2_pc", "95")])));
    assert!(
        what.contains("feature \"spo2_pc\" is not in EMR schema v1 (did you mean \"spo2_pct\"?)"),
        "{what}"
    );
    let what = malformed(plugin.map_emr(&record(&[("Heart_Rate_BPM", "80")])));
    assert!(what.contains("did you mean \"heart_rate_bpm\"?"), "{what}");
    // Three deterministic plugin bugs in a row: quarantined.
    assert_eq!(plugin.consecutive_faults(), 3);
    assert!(plugin.is_quarantined());

    // A feature given twice.
    let plugin = echo();
    let what = malformed(plugin.map_emr(&record(&[("spo2_pct", "95"), ("spo2_pct", "96")])));
    assert!(what.contains("\"spo2_pct\" given twice"), "{what}");

    // A value outside the schema's range is the input's fault: refused,
    // naming the feature and not the value, and never a fault — however
    // often hostile input sends it, the plugin stays in service.
    let plugin = echo();
    for _ in 0..limits.fault_threshold + 2 {
        match plugin.map_emr(&record(&[("spo2_pct", "917.25")])) {
            Err(e @ PluginError::Implausible { .. }) => {
                let text = e.to_string();
                assert!(e.is_bad_input() && e.is_rejection());
                assert!(text.contains("spo2_pct"), "{text}");
                assert!(text.contains("30..=100"), "{text}");
                assert!(!text.contains("917"), "the value leaked: {text}");
            }
            other => panic!("expected Implausible, got {other:?}"),
        }
    }
    match plugin.map_emr(&record(&[("sex", "0.5")])) {
        Err(PluginError::Implausible {
            feature, reason, ..
        }) => {
            assert_eq!(feature, "sex");
            assert!(reason.contains("whole-number code"), "{reason}");
            assert!(!reason.contains("0.5"), "{reason}");
        }
        other => panic!("expected Implausible, got {other:?}"),
    }
    assert_eq!(plugin.consecutive_faults(), 0);
    assert!(!plugin.is_quarantined());
    plugin
        .map_emr(&record(&[("spo2_pct", "95")]))
        .expect("still in service");
}
