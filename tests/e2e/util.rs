//! Helpers shared by the end-to-end tests.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// The built binary.
pub fn oxbox() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_oxbox"))
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

/// The corpus directory; the tests cannot run without it.
pub fn corpus() -> PathBuf {
    let dir = std::env::var_os("OXBOX_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("tests/.corpus"));
    assert!(
        dir.join(".complete-v2").is_file(),
        "test corpus missing at {}: run `bash tests/corpus/build.sh` (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// A file of the corpus, found by file name.
pub fn corpus_file(name: &str) -> PathBuf {
    let list = std::fs::read_to_string(corpus().join("files.txt")).expect("files.txt");
    list.lines()
        .map(PathBuf::from)
        .find(|p| p.file_name().is_some_and(|n| n == name))
        .unwrap_or_else(|| panic!("{name} not in corpus"))
}

/// `oxbox synth --max-image-side` for the tests that train, evaluate or
/// federate: they read every image, and 256-pixel ones keep them quick
/// (full-size radiographs are `synth`'s own tests' and the corpus's).
pub const QUICK_IMAGE_SIDE: &str = "256";

/// A TCP port free on loopback now (bound, then released): for a peer the
/// test starts that cannot bind port 0 and report it.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}

/// Runs oxbox with `args` and waits for its output. No address-space or
/// memory cap: bounds are measured from outside ([`run_measured`],
/// [`vm_hwm`]), never imposed on the binary.
pub fn run<S: AsRef<OsStr>>(args: &[S]) -> Output {
    command(args).output().expect("run oxbox")
}

/// `oxbox <args>` with the environment that could change its behaviour removed.
fn command<S: AsRef<OsStr>>(args: &[S]) -> Command {
    let mut command = oxbox_command();
    command.args(args);
    command
}

/// The per-user folders the tests give oxbox: `XDG_DATA_HOME` and
/// `XDG_CACHE_HOME`, under cargo's scratch folder for integration tests
/// (`target/tmp`), so a command run without `--config` writes neither
/// into the real home nor into the working directory.
pub fn user_dirs() -> (PathBuf, PathBuf) {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("oxbox-e2e-user");
    (base.join("data"), base.join("cache"))
}

/// A command for the oxbox under test, hermetic: no `OXBOX_CONFIG` or
/// `RUST_LOG` from the caller, and the per-user folders of [`user_dirs`].
pub fn oxbox_command() -> Command {
    let (data, cache) = user_dirs();
    let mut command = Command::new(oxbox());
    command
        .env_remove("OXBOX_CONFIG")
        .env_remove("RUST_LOG")
        .env("XDG_DATA_HOME", data)
        .env("XDG_CACHE_HOME", cache);
    command
}

/// Runs oxbox with `args` and measures it from outside: the output, and the
/// peak resident set size of the oxbox process in bytes.
///
/// The peak is `ru_maxrss` as `wait4` reports it to the process that forked
/// oxbox. That parent must be small: Linux folds the resident size of the
/// memory a process had before `exec` into its `ru_maxrss`, so a child
/// spawned straight from this (large, multi-threaded) test process would
/// report the test process's peak, not its own. GNU time (`/usr/bin/time`,
/// installed by `scripts/setup.sh --tests`) is that small parent: it forks,
/// execs oxbox, reaps it with `wait4`, and writes `ru_maxrss` (KiB) to a file.
pub fn run_measured<S: AsRef<OsStr>>(args: &[S]) -> (Output, u64) {
    let time = Path::new("/usr/bin/time");
    assert!(
        time.is_file(),
        "GNU time (/usr/bin/time) measures peak RSS: run scripts/setup.sh --tests"
    );
    let report = tempfile::NamedTempFile::new().expect("temp file");
    let output = Command::new(time)
        .arg("--format=%M")
        .arg("--output")
        .arg(report.path())
        .arg(oxbox())
        .args(args)
        .env_remove("OXBOX_CONFIG")
        .env_remove("RUST_LOG")
        .env("XDG_DATA_HOME", user_dirs().0)
        .env("XDG_CACHE_HOME", user_dirs().1)
        .stdin(Stdio::null())
        .output()
        .expect("run oxbox under /usr/bin/time");
    let text = std::fs::read_to_string(report.path()).expect("read the time report");
    // A command killed by a signal gets a line saying so before the figure.
    let kib: u64 = text
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no peak RSS in the time report {text:?}"));
    (output, kib * 1024)
}

/// The peak resident set size (`VmHWM` in `/proc/<pid>/status`) of a
/// running process, in bytes: how a test measures a server it keeps running.
pub fn vm_hwm(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmHWM")
}

/// The virtual size (`VmSize`) of a running process, in bytes.
pub fn vm_size(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmSize")
}

/// A `kB` field of `/proc/<pid>/status`, in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"));
    kib * 1024
}

/// stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts the documented failure shape for bad input: exit 2, and stderr is
/// exactly one line starting `error:`.
pub fn assert_clean_refusal(out: &Output, what: &str) -> String {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{what}: expected exit 2, got {:?}; stderr: {err}",
        out.status
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: stderr must be one line: {err:?}");
    assert!(lines[0].starts_with("error: "), "{what}: {err:?}");
    lines[0].to_owned()
}

/// Reads a float32 little-endian `.npy` file: (shape, data).
pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}", path.display());
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len]).expect("ascii header");
    assert!(header.contains("'descr': '<f4'"), "{header}");
    let fortran = header.contains("'fortran_order': True");
    let dims = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("shape");
    let shape: Vec<usize> = dims
        .split(',')
        .filter_map(|d| d.trim().parse().ok())
        .collect();
    let data: Vec<f32> = bytes[start + header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(data.len(), shape.iter().product::<usize>());
    if fortran {
        return (shape.clone(), fortran_to_c(&shape, &data));
    }
    (shape, data)
}

/// Reorders column-major (Fortran) data into row-major (C) order.
fn fortran_to_c(shape: &[usize], data: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(data.len());
    let mut index = vec![0usize; shape.len()];
    for _ in 0..data.len() {
        let mut f = 0;
        let mut stride = 1;
        for (i, &d) in index.iter().zip(shape) {
            f += i * stride;
            stride *= d;
        }
        out.push(data[f]);
        // Advance the C-order index (last axis fastest).
        for axis in (0..shape.len()).rev() {
            index[axis] += 1;
            if index[axis] < shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    out
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The `sha256` a plugin manifest (`plugin.toml`) pins.
pub fn manifest_sha256(manifest: &Path) -> String {
    let text = std::fs::read_to_string(manifest).expect("plugin.toml");
    let table: toml::Table = toml::from_str(&text).expect("plugin.toml is TOML");
    table["sha256"]
        .as_str()
        .unwrap_or_else(|| panic!("no sha256 in {text}"))
        .to_owned()
}

/// `oxbox model init --out OUT ARGS…`, which must succeed; its output (the
/// package's JSON description on stdout).
pub fn init_model(out: &Path, args: &[&str]) -> Output {
    let mut all: Vec<&OsStr> = vec!["model".as_ref(), "init".as_ref(), "--out".as_ref()];
    all.push(out.as_os_str());
    all.extend(args.iter().map(OsStr::new));
    let init = run(&all);
    assert!(init.status.success(), "model init: {}", stderr(&init));
    init
}

/// `oxbox plugin pack WASM --out OUT`, which must succeed; the manifest
/// (`OUT/plugin.toml`).
pub fn pack_plugin(wasm: &Path, out: &Path) -> PathBuf {
    let pack = run(&[
        "plugin".as_ref(),
        "pack".as_ref(),
        wasm.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert!(pack.status.success(), "plugin pack: {}", stderr(&pack));
    out.join("plugin.toml")
}

/// A synthetic site's identifier columns, as its `site.toml` lists them
/// (`oxbox synth` output), and its plugin's name; `None` when the folder
/// has no `site.toml`.
pub fn site_identifiers(site_dir: &Path) -> Option<(Vec<String>, String)> {
    let text = std::fs::read_to_string(site_dir.join("site.toml")).ok()?;
    let site: toml::Table = text.parse().expect("site.toml is TOML");
    let columns = site["site"]["identifier_columns"]
        .as_array()
        .expect("identifier_columns")
        .iter()
        .filter_map(|c| c.as_str().map(str::to_owned))
        .collect();
    let plugin = site["site"]["plugin"].as_str().expect("plugin").to_owned();
    Some((columns, plugin))
}

/// Every row of a CSV file, as column name → value.
pub fn csv_rows(path: &Path) -> Vec<std::collections::BTreeMap<String, String>> {
    let mut reader = csv::Reader::from_path(path).expect("csv");
    let header: Vec<String> = reader
        .headers()
        .expect("header")
        .iter()
        .map(str::to_owned)
        .collect();
    reader
        .records()
        .map(|r| {
            header
                .iter()
                .cloned()
                .zip(r.expect("record").iter().map(str::to_owned))
                .collect()
        })
        .collect()
}

/// A child process (a peer a test started) killed and reaped on drop, so a
/// failing assertion does not leave it running after the test.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
