//! Bad input gets exit 2, one `error:` line naming the cause, no output
//! file, and bounded time and memory. Nothing caps the binary's memory:
//! inputs built to exhaust it are in `bombs`, which measures the peak.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use dicom_dictionary_std::tags;
use dicom_object::open_file;

use crate::util::{assert_clean_refusal, corpus_file, run};

/// Runs `oxbox preprocess` on `input` with an optional config file, expects a
/// clean refusal whose message contains `cause`, and no output file.
fn refuse(input: &Path, config: Option<&Path>, cause: &str) -> String {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out.npy");
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "preprocess".as_ref(),
        "--dicom".as_ref(),
        input.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--png".as_ref(),
    ];
    let png = tmp.path().join("out.png");
    args.push(png.as_os_str());
    if let Some(c) = config {
        args.push("--config".as_ref());
        args.push(c.as_os_str());
    }
    let result = crate::util::run(&args);
    let line = assert_clean_refusal(&result, &input.display().to_string());
    assert!(
        line.to_lowercase().contains(&cause.to_lowercase()),
        "{}: expected the cause {cause:?} in {line:?}",
        input.display()
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path()).expect("list").collect();
    assert!(
        left.is_empty(),
        "{}: files left behind: {left:?}",
        input.display()
    );
    line
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write");
    p
}

fn config_with_limits(dir: &Path, limits: &str) -> PathBuf {
    write(
        dir,
        "limits.toml",
        format!("[site]\nid = \"t\"\nname = \"test\"\n[limits]\n{limits}\n").as_bytes(),
    )
}

#[test]
fn not_dicom_empty_and_missing_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    refuse(&write(tmp.path(), "empty.dcm", b""), None, "empty input");
    refuse(
        &write(
            tmp.path(),
            "notes.txt",
            b"Patient notes, definitely not DICOM.\n",
        ),
        None,
        "not a readable DICOM file",
    );
    let mut png_like = b"\x89PNG\r\n\x1a\n".to_vec();
    png_like.extend(std::iter::repeat_n(0u8, 300));
    refuse(
        &write(tmp.path(), "image.png", &png_like),
        None,
        "not a readable DICOM file",
    );
    refuse(&tmp.path().join("does-not-exist.dcm"), None, "cannot read");
}

#[test]
fn colour_images_are_refused_naming_the_tag() {
    for name in [
        "SC_rgb.dcm",
        "US1_J2KR.dcm",
        "OT-PAL-8-face.dcm",
        "SC_ybr_full_uncompressed.dcm",
    ] {
        let line = refuse(&corpus_file(name), None, "photometric interpretation");
        assert!(line.contains("(0028,0004)"), "{line}");
    }
}

#[test]
fn missing_pixel_data_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut obj = open_file(corpus_file("RG1_UNCR.dcm")).expect("open RG1");
    obj.remove_element(tags::PIXEL_DATA);
    let path = tmp.path().join("no-pixels.dcm");
    obj.write_to_file(&path).expect("write");
    let line = refuse(&path, None, "missing attribute PixelData");
    assert!(line.contains("(7FE0,0010)"), "{line}");
}

#[test]
fn unsupported_transfer_syntax_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bytes = std::fs::read(corpus_file("RG1_J2KR.dcm")).expect("read");
    // Same length, so the meta group stays consistent: JPIP Referenced.
    let from = b"1.2.840.10008.1.2.4.90";
    let to = b"1.2.840.10008.1.2.4.94";
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("TS UID in meta");
    let mut patched = bytes.clone();
    patched[at..at + to.len()].copy_from_slice(to);
    refuse(
        &write(tmp.path(), "jpip.dcm", &patched),
        None,
        "transfer syntax",
    );
}

#[test]
fn images_over_the_size_limit_are_refused_before_decoding() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = config_with_limits(tmp.path(), "max_image_megapixels = 1");
    for name in ["RG1_UNCR.dcm", "RG1_J2KR.dcm"] {
        let line = refuse(&corpus_file(name), Some(&config), "over the limit");
        assert!(line.contains("1955x1841"), "{line}");
    }
    let config = config_with_limits(tmp.path(), "max_dicom_file_mib = 1");
    refuse(
        &corpus_file("RG1_UNCR.dcm"),
        Some(&config),
        "max_dicom_file_mib",
    );
}

#[test]
fn header_sizes_that_lie_allocate_nothing() {
    // Rows × Columns claims 4.3 gigapixels; the limit is raised so only the
    // checks against the actual pixel data and stream headers stand in the way.
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = config_with_limits(tmp.path(), "max_image_megapixels = 5000");
    for (name, cause) in [
        ("RG1_UNCR.dcm", "invalid pixel data"),
        ("RG1_J2KR.dcm", "the header says"),
        ("rg1_jpegls_lossless.dcm", "the header says"),
        ("rg1_jpeg_lossless_sv1.dcm", "the header says"),
        ("rg1_rle16.dcm", "segment"),
    ] {
        let mut obj = open_file(corpus_file(name)).expect("open");
        for tag in [tags::ROWS, tags::COLUMNS] {
            obj.put_element(dicom_object::mem::InMemElement::new(
                tag,
                dicom_core::VR::US,
                dicom_core::PrimitiveValue::from(65535u16),
            ));
        }
        let path = tmp.path().join(format!("huge-{name}"));
        obj.write_to_file(&path).expect("write");
        refuse(&path, Some(&config), cause);
    }
}

#[test]
fn truncated_files_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for name in [
        "RG1_UNCR.dcm",
        "RG1_J2KR.dcm",
        "rg1_jpeg_lossless_sv1.dcm",
        "rg1_jpeg_extended12.dcm",
        "rg1_jpegls_lossless.dcm",
        "rg1_rle16.dcm",
        "rg1_deflated.dcm",
        "MR_truncated.dcm",
    ] {
        let bytes = std::fs::read(corpus_file(name)).expect("read");
        for cut in [
            100,
            700,
            bytes.len() / 2,
            bytes.len() * 9 / 10,
            bytes.len() - 2000,
        ] {
            let path = write(tmp.path(), &format!("cut-{cut}-{name}"), &bytes[..cut]);
            let tmp_out = tempfile::tempdir().expect("tempdir");
            let out = tmp_out.path().join("o.npy");
            let result = run(&[
                "preprocess".as_ref(),
                "--dicom".as_ref(),
                path.as_os_str(),
                "--out".as_ref(),
                out.as_os_str(),
            ]);
            assert_clean_refusal(&result, &format!("{name} cut at {cut}"));
            assert!(!out.exists());
        }
    }
}

#[test]
fn corrupt_compressed_streams_are_refused() {
    // Damage in the middle of a JPEG, JPEG-LS or RLE stream is detectable
    // (JPEG warnings are errors, JPEG-LS and RLE decoders check their
    // bounds). JPEG 2000 is built to decode damaged code-block data as noise
    // (every decoder does), so there the damage goes into the main header.
    let tmp = tempfile::tempdir().expect("tempdir");
    let damage = |bytes: &mut [u8], at: usize, len: usize| {
        for (i, b) in bytes[at..at + len].iter_mut().enumerate() {
            *b = if i % 7 == 0 { 0xFF } else { 0x00 };
        }
    };
    for name in [
        "rg1_jpeg_lossless_sv1.dcm",
        "rg1_jpeg_baseline.dcm",
        "rg1_jpeg_extended12.dcm",
        "rg1_jpegls_lossless.dcm",
        "rg1_jpegls_near_lossless.dcm",
    ] {
        let mut bytes = std::fs::read(corpus_file(name)).expect("read");
        let len = bytes.len();
        damage(&mut bytes, len / 2, 4096);
        refuse(&write(tmp.path(), name, &bytes), None, "corrupt");
    }
    for name in ["RG1_J2KR.dcm", "RG1_J2KI.dcm", "rg1_j2k_lossless_gdcm.dcm"] {
        let mut bytes = std::fs::read(corpus_file(name)).expect("read");
        let soc = bytes
            .windows(4)
            .position(|w| w == [0xFF, 0x4F, 0xFF, 0x51])
            .expect("codestream start");
        // Past SIZ (2 + 2 + 41 bytes for one component): COD, QCD, … gone.
        damage(&mut bytes, soc + 47, 96);
        refuse(&write(tmp.path(), name, &bytes), None, "corrupt JPEG 2000");
    }
}

#[test]
fn random_bit_flips_never_crash_or_leave_partial_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut seed: u64 = 0x0b0c_5eed;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        seed >> 33
    };
    for name in [
        "CT_small.dcm",
        "MR_small_RLE.dcm",
        "JPEG2000.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
        "JPGLosslessP14SV1_1s_1f_8b.dcm",
        "693_J2KR.dcm",
    ] {
        let original = std::fs::read(corpus_file(name)).expect("read");
        for k in 0..12 {
            let mut bytes = original.clone();
            // Half of the flips in the first 1 KiB (header), half anywhere.
            let span = if k % 2 == 0 {
                original.len().min(1024)
            } else {
                original.len()
            };
            for _ in 0..3 {
                let at = next() as usize % span;
                bytes[at] ^= 1 << (next() % 8);
            }
            let path = write(tmp.path(), &format!("flip-{k}-{name}"), &bytes);
            let out = tmp.path().join(format!("flip-{k}-{name}.npy"));
            let result = run(&[
                "preprocess".as_ref(),
                "--dicom".as_ref(),
                path.as_os_str(),
                "--out".as_ref(),
                out.as_os_str(),
            ]);
            if result.status.success() {
                let (shape, _) = crate::util::read_npy(&out);
                assert_eq!(shape, vec![1, 224, 224]);
            } else {
                assert_clean_refusal(&result, &format!("{name} flip {k}"));
                assert!(!out.exists(), "{name} flip {k}: partial output");
            }
        }
    }
}

#[test]
fn errors_never_carry_patient_identifiers() {
    let source = corpus_file("CT_small.dcm");
    let obj = open_file(&source).expect("open");
    let name = obj
        .element(tags::PATIENT_NAME)
        .expect("name")
        .to_str()
        .expect("str")
        .trim()
        .to_owned();
    let id = obj
        .element(tags::PATIENT_ID)
        .expect("id")
        .to_str()
        .expect("str")
        .trim()
        .to_owned();
    assert!(!name.is_empty() && !id.is_empty());
    let tmp = tempfile::tempdir().expect("tempdir");
    let bytes = std::fs::read(&source).expect("read");
    let path = write(tmp.path(), "ct.dcm", &bytes[..bytes.len() / 2]);
    let line = refuse(&path, None, "error");
    assert!(!line.contains(&name) && !line.contains(&id), "{line}");
}

/// Runs `oxbox preprocess --dicom /dev/stdin` with `bytes` written to its
/// stdin through a pipe (not seekable, no length), and `config` if given.
fn preprocess_from_pipe(bytes: Vec<u8>, config: Option<&Path>, out: &Path) -> Output {
    let mut command = crate::util::oxbox_command();
    command
        .args(["preprocess", "--dicom", "/dev/stdin", "--out"])
        .arg(out)
        .env_remove("OXBOX_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    let mut child = command.spawn().expect("spawn oxbox");
    let mut stdin = child.stdin.take().expect("stdin");
    // A refusal may stop reading early: a broken pipe here is expected.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&bytes);
    });
    let output = child.wait_with_output().expect("wait for oxbox");
    writer.join().expect("writer thread");
    output
}

#[test]
fn a_dicom_file_can_come_through_a_pipe() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bytes = std::fs::read(corpus_file("RG1_UNCR.dcm")).expect("RG1_UNCR");
    // Through a pipe: the same output as from the file.
    let piped = tmp.path().join("piped.npy");
    let out = preprocess_from_pipe(bytes.clone(), None, &piped);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let from_file = tmp.path().join("file.npy");
    let file = corpus_file("RG1_UNCR.dcm");
    let out = run(&[
        "preprocess".as_ref(),
        "--dicom".as_ref(),
        file.as_os_str(),
        "--out".as_ref(),
        from_file.as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(&piped).expect("piped output"),
        std::fs::read(&from_file).expect("file output")
    );
    // The size limit holds for a pipe too (RG1_UNCR is 7 MB), with no file
    // left behind.
    let config = config_with_limits(tmp.path(), "max_dicom_file_mib = 1");
    let refused = tmp.path().join("refused.npy");
    let out = preprocess_from_pipe(bytes, Some(&config), &refused);
    let line = assert_clean_refusal(&out, "a 7 MB file through a pipe, limit 1 MiB");
    assert!(line.contains("max_dicom_file_mib"), "{line}");
    assert!(!refused.exists(), "an output was written");
}
