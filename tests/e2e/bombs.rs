//! Parser bombs: hostile DICOM files built to kill or bloat the box, each
//! generated here, in Rust, from nothing.
//!
//! For each, `oxbox preprocess` refuses cleanly (exit 2, one `error:` line
//! naming the cause and the tag, no output file) and its peak RSS, measured
//! from outside (`ru_maxrss` from `wait4`, see `util::run_measured`; no cap
//! imposed), stays at or under [`PEAK_RSS_LIMIT`]. The server, sent 32 concurrent uploads of
//! them, answers each with 422, answers a good request with 200 during the
//! storm, stays up, and its peak RSS (`VmHWM`) stays at or under
//! [`SERVER_RSS_LIMIT`]. The figures are printed (`--nocapture`):
//!
//!     cargo test --release --locked --test e2e -- bombs:: --nocapture

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::serve::{Reply, ServerProcess, Setup, multipart, multipart_type, request, sample_case};
use crate::util::{assert_clean_refusal, run_measured, vm_hwm};

/// Most memory `oxbox preprocess` may reach on any bomb.
const PEAK_RSS_LIMIT: u64 = 300 << 20;

/// Most memory the server may reach under the concurrent bombs.
const SERVER_RSS_LIMIT: u64 = 3 << 29;

/// Concurrent bomb uploads in the server test.
const CONCURRENT_UPLOADS: usize = 32;

/// What a deflate bomb inflates to.
const INFLATED_SIZE: u64 = 3 << 29;

/// One hostile file: its name, its bytes, and what its refusal must name.
struct Bomb {
    name: &'static str,
    bytes: Vec<u8>,
    /// Substrings the one-line refusal must contain (cause and tag).
    names: &'static [&'static str],
}

/// Transfer syntaxes used below.
const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
const JPEG_2000_LOSSLESS: &str = "1.2.840.10008.1.2.4.90";
const JPEG_LS_LOSSLESS: &str = "1.2.840.10008.1.2.4.80";

/// Value representations with a 16-bit length in explicit VR (PS3.5 7.1.2).
fn short_length(vr: &[u8; 2]) -> bool {
    [
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
        b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    ]
    .contains(&vr)
}

/// An explicit VR little endian element header declaring `len` bytes.
fn header(out: &mut Vec<u8>, tag: (u16, u16), vr: &[u8; 2], len: u32) {
    out.extend_from_slice(&tag.0.to_le_bytes());
    out.extend_from_slice(&tag.1.to_le_bytes());
    out.extend_from_slice(vr);
    if short_length(vr) {
        out.extend_from_slice(&u16::try_from(len).expect("short length").to_le_bytes());
    } else {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&len.to_le_bytes());
    }
}

/// An explicit VR little endian element, its value padded to even length.
fn element(out: &mut Vec<u8>, tag: (u16, u16), vr: &[u8; 2], value: &[u8]) {
    let pad = if vr == b"UI" || vr == b"OB" { 0 } else { b' ' };
    let mut value = value.to_vec();
    if value.len() % 2 == 1 {
        value.push(pad);
    }
    header(
        out,
        tag,
        vr,
        u32::try_from(value.len()).expect("small value"),
    );
    out.extend_from_slice(&value);
}

/// An item, item delimiter or sequence delimiter (little endian).
fn item(out: &mut Vec<u8>, element: u16, len: u32) {
    out.extend_from_slice(&0xFFFEu16.to_le_bytes());
    out.extend_from_slice(&element.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
}

/// Preamble, `DICM` and a file meta group for transfer syntax `ts`.
fn part10(ts: &str) -> Vec<u8> {
    let mut meta = Vec::new();
    element(&mut meta, (0x0002, 0x0001), b"OB", &[0, 1]);
    element(
        &mut meta,
        (0x0002, 0x0002),
        b"UI",
        b"1.2.840.10008.5.1.4.1.1.1",
    );
    element(&mut meta, (0x0002, 0x0003), b"UI", b"2.25.1");
    element(&mut meta, (0x0002, 0x0010), b"UI", ts.as_bytes());
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    let group_length = u32::try_from(meta.len()).expect("small meta");
    element(
        &mut out,
        (0x0002, 0x0000),
        b"UL",
        &group_length.to_le_bytes(),
    );
    out.extend_from_slice(&meta);
    out
}

/// The image pixel module of a grayscale `rows` × `columns` frame, after
/// SOP class and instance, modality (and room for private elements in
/// group 0009, which sorts between).
fn identity(out: &mut Vec<u8>) {
    element(out, (0x0008, 0x0016), b"UI", b"1.2.840.10008.5.1.4.1.1.1");
    element(out, (0x0008, 0x0018), b"UI", b"2.25.1");
    element(out, (0x0008, 0x0060), b"CS", b"CR");
}

fn image_pixel(out: &mut Vec<u8>, rows: u16, columns: u16, bits: u16) {
    element(out, (0x0028, 0x0002), b"US", &1u16.to_le_bytes());
    element(out, (0x0028, 0x0004), b"CS", b"MONOCHROME2");
    element(out, (0x0028, 0x0010), b"US", &rows.to_le_bytes());
    element(out, (0x0028, 0x0011), b"US", &columns.to_le_bytes());
    element(out, (0x0028, 0x0100), b"US", &bits.to_le_bytes());
    element(out, (0x0028, 0x0101), b"US", &bits.to_le_bytes());
    element(out, (0x0028, 0x0102), b"US", &(bits - 1).to_le_bytes());
    element(out, (0x0028, 0x0103), b"US", &0u16.to_le_bytes());
}

/// 100,000 nested sequences of undefined length, each with one item of
/// undefined length (about 2 MB): a parser that recurses per level
/// overflows its stack.
fn nested_sequences() -> Bomb {
    let mut out = part10(EXPLICIT_VR_LE);
    identity(&mut out);
    for _ in 0..100_000 {
        header(&mut out, (0x0040, 0xA730), b"SQ", u32::MAX);
        item(&mut out, 0xE000, u32::MAX);
    }
    Bomb {
        name: "nested-sequences",
        bytes: out,
        names: &["sequence (0040,A730)", "nests deeper than the limit"],
    }
}

/// A small valid-looking image (about 420 bytes) whose last element
/// declares 0xFFFFFFF0 bytes, with 32 bytes actually following.
fn lying(
    tag: (u16, u16),
    vr: &[u8; 2],
    name: &'static str,
    names: &'static [&'static str],
) -> Bomb {
    let mut out = part10(EXPLICIT_VR_LE);
    identity(&mut out);
    if tag.0 == 0x0009 {
        element(&mut out, (0x0009, 0x0010), b"LO", b"OXBOX BOMB");
    }
    image_pixel(&mut out, 16, 16, 16);
    header(&mut out, tag, vr, 0xFFFF_FFF0);
    out.extend_from_slice(&[0u8; 32]);
    Bomb {
        name,
        bytes: out,
        names,
    }
}

/// A deflated data set that inflates to [`INFLATED_SIZE`] of zeros, in
/// `chunk`-byte private OB elements (`chunk` = the whole: one element), then
/// a small image. Written streaming: the test never holds the inflated bytes.
fn deflate_bomb(name: &'static str, chunk: u32, names: &'static [&'static str]) -> Bomb {
    deflated_zeros(name, INFLATED_SIZE, chunk, names)
}

/// A deflated DICOM file of a small image after `inflated` bytes of zeros
/// in one private OB element (slow to parse, small to send).
pub(crate) fn deflated_zeros_file(inflated: u64) -> Vec<u8> {
    deflated_zeros("deflated-zeros", inflated, u32::MAX, &[]).bytes
}

/// A deflated data set holding `inflated` bytes of zeros in `chunk`-byte
/// private OB elements, then a small image.
fn deflated_zeros(
    name: &'static str,
    inflated: u64,
    chunk: u32,
    names: &'static [&'static str],
) -> Bomb {
    let mut out = part10(DEFLATED);
    let mut encoder =
        flate2::write::DeflateEncoder::new(std::mem::take(&mut out), flate2::Compression::best());
    let mut head = Vec::new();
    identity(&mut head);
    element(&mut head, (0x0009, 0x0010), b"LO", b"OXBOX BOMB");
    encoder.write_all(&head).expect("deflate");
    let zeros = vec![0u8; 1 << 20];
    let mut written = 0u64;
    let mut next_tag = 0x1000u16;
    while written < inflated {
        let len = u64::from(chunk).min(inflated - written);
        let mut h = Vec::new();
        header(
            &mut h,
            (0x0009, next_tag),
            b"OB",
            u32::try_from(len).expect("chunk"),
        );
        encoder.write_all(&h).expect("deflate");
        let mut left = len;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            encoder.write_all(&zeros[..n]).expect("deflate");
            left -= n as u64;
        }
        written += len;
        next_tag += 1;
    }
    let mut tail = Vec::new();
    image_pixel(&mut tail, 16, 16, 16);
    element(&mut tail, (0x7FE0, 0x0010), b"OW", &[0u8; 512]);
    encoder.write_all(&tail).expect("deflate");
    let prefix_and_stream = encoder.finish().expect("deflate");
    Bomb {
        name,
        bytes: prefix_and_stream,
        names,
    }
}

/// SOC, SIZ of a one-component `width` × `height` image, EOC.
fn j2k_codestream(width: u32, height: u32) -> Vec<u8> {
    let mut s = vec![0xFF, 0x4F, 0xFF, 0x51, 0x00, 0x29, 0x00, 0x00];
    for v in [width, height, 0, 0, width, height, 0, 0] {
        s.extend_from_slice(&v.to_be_bytes());
    }
    s.extend_from_slice(&1u16.to_be_bytes()); // Csiz
    s.extend_from_slice(&[15, 1, 1]); // 16 bits, no subsampling
    s.extend_from_slice(&[0xFF, 0xD9]);
    s
}

/// A JP2 box.
fn jp2_box(out: &mut Vec<u8>, kind: &[u8; 4], content: &[u8]) {
    let len = u32::try_from(8 + content.len()).expect("small box");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(content);
}

/// Encapsulated pixel data holding one frame.
fn encapsulated(out: &mut Vec<u8>, frame: &[u8]) {
    header(out, (0x7FE0, 0x0010), b"OB", u32::MAX);
    item(out, 0xE000, 0);
    let mut frame = frame.to_vec();
    if frame.len() % 2 == 1 {
        frame.push(0);
    }
    item(
        out,
        0xE000,
        u32::try_from(frame.len()).expect("small frame"),
    );
    out.extend_from_slice(&frame);
    item(out, 0xE0DD, 0);
}

/// A 16 × 16 image whose JPEG 2000 frame is a JP2 file: a decoy codestream
/// of the right size in an XML box ahead, the real one (60000 × 60000) in
/// the codestream box the decoder reads.
fn decoy_jpeg_2000() -> Bomb {
    let mut jp2 = Vec::new();
    jp2_box(&mut jp2, b"jP  ", &[0x0D, 0x0A, 0x87, 0x0A]);
    jp2_box(&mut jp2, b"ftyp", b"jp2 \0\0\0\0jp2 ");
    jp2_box(&mut jp2, b"xml ", &j2k_codestream(16, 16));
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&60_000u32.to_be_bytes());
    ihdr.extend_from_slice(&60_000u32.to_be_bytes());
    ihdr.extend_from_slice(&1u16.to_be_bytes());
    ihdr.extend_from_slice(&[15, 7, 0, 0]);
    let mut jp2h = Vec::new();
    jp2_box(&mut jp2h, b"ihdr", &ihdr);
    jp2_box(&mut jp2h, b"colr", &[1, 0, 0, 0, 0, 0, 17]);
    jp2_box(&mut jp2, b"jp2h", &jp2h);
    jp2_box(&mut jp2, b"jp2c", &j2k_codestream(60_000, 60_000));
    let mut out = part10(JPEG_2000_LOSSLESS);
    identity(&mut out);
    image_pixel(&mut out, 16, 16, 16);
    encapsulated(&mut out, &jp2);
    Bomb {
        name: "decoy-jpeg-2000",
        bytes: out,
        names: &["JPEG 2000", "(7FE0,0010)", "60000x60000", "16x16"],
    }
}

/// A 255 × 255 JPEG 2000 image whose SIZ marker declares 1 × 1 pixel
/// tiles: 65,025 tiles, each of which OpenJPEG would give a few kilobytes of
/// coding parameters (about 490 MiB) from a file under 500 bytes. The
/// codestream is a valid main header (SIZ, COD, QCD) and no tile.
fn jpeg_2000_tile_bomb() -> Bomb {
    let side = 255u32;
    let mut codestream = vec![0xFF, 0x4F, 0xFF, 0x51, 0x00, 0x29, 0x00, 0x00];
    for v in [side, side, 0, 0, 1, 1, 0, 0] {
        codestream.extend_from_slice(&v.to_be_bytes());
    }
    codestream.extend_from_slice(&1u16.to_be_bytes()); // Csiz
    codestream.extend_from_slice(&[15, 1, 1]); // 16 bits, no subsampling
    // COD: LRCP, 1 layer, no MCT, no decomposition, 64 × 64 code blocks,
    // the reversible 5-3 wavelet.
    codestream.extend_from_slice(&[0xFF, 0x52, 0x00, 0x0C, 0, 0, 0, 1, 0, 0, 4, 4, 0, 1]);
    // QCD: no quantisation, one guard bit, one subband.
    codestream.extend_from_slice(&[0xFF, 0x5C, 0x00, 0x04, 0x20, 8 << 3]);
    codestream.extend_from_slice(&[0xFF, 0xD9]);
    let mut out = part10(JPEG_2000_LOSSLESS);
    identity(&mut out);
    image_pixel(&mut out, 255, 255, 16);
    encapsulated(&mut out, &codestream);
    Bomb {
        name: "jpeg-2000-tile-bomb",
        bytes: out,
        names: &["JPEG 2000", "(7FE0,0010)", "65025 tiles"],
    }
}

/// A JPEG-LS marker segment.
fn segment(out: &mut Vec<u8>, code: u8, body: &[u8]) {
    out.extend_from_slice(&[0xFF, code]);
    let len = u16::try_from(body.len() + 2).expect("small segment");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
}

/// A JPEG-LS frame header (SOF55) of an 8-bit one-component image.
fn sof55(rows: u16, columns: u16) -> Vec<u8> {
    let mut b = vec![8];
    b.extend_from_slice(&rows.to_be_bytes());
    b.extend_from_slice(&columns.to_be_bytes());
    b.extend_from_slice(&[1, 1, 0x11, 0]);
    b
}

/// The scan of an all-zero `rows` × `columns` image in JPEG-LS lossless:
/// every sample is in run mode, so the bit stream is all ones (T.87 A.7.1,
/// one per run of 2^J[RUNindex] samples, one per partial run at a line's
/// end), packed with a stuffed zero bit after each FF byte.
fn all_zero_scan(rows: u32, columns: u32) -> Vec<u8> {
    const J: [u32; 32] = [
        0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 9, 10, 11, 12,
        13, 14, 15,
    ];
    let mut ones = 0u64;
    let mut index = 0usize;
    for _ in 0..rows {
        let mut left = columns;
        while left >= 1 << J[index] {
            ones += 1;
            left -= 1 << J[index];
            index = (index + 1).min(31);
        }
        if left > 0 {
            ones += 1;
        }
    }
    let mut out = Vec::new();
    let mut left = ones;
    while left > 0 {
        // After FF only 7 bits fit (the top bit is stuffed).
        let room = if out.last() == Some(&0xFF) { 7 } else { 8 };
        let n = left.min(room);
        let byte = (((1u16 << n) - 1) << (room - n)) as u8;
        out.push(byte);
        left -= n;
    }
    if out.last() == Some(&0xFF) {
        out.push(0);
    }
    out
}

/// A 16 × 16 image whose JPEG-LS frame carries a decoy frame header of the
/// right size inside an APP8 segment, ahead of the real one (60000 × 60000,
/// all zeros: a few kilobytes of scan that decode to 3.6 GB).
fn decoy_jpeg_ls() -> Bomb {
    let mut stream = vec![0xFF, 0xD8];
    let mut app = b"decoy ".to_vec();
    app.extend_from_slice(&[0xFF, 0xF7, 0x00, 0x0B]);
    app.extend(sof55(16, 16));
    segment(&mut stream, 0xE8, &app);
    segment(&mut stream, 0xF7, &sof55(60_000, 60_000));
    segment(&mut stream, 0xDA, &[1, 1, 0, 0, 0, 0]);
    stream.extend(all_zero_scan(60_000, 60_000));
    stream.extend_from_slice(&[0xFF, 0xD9]);
    let mut out = part10(JPEG_LS_LOSSLESS);
    identity(&mut out);
    image_pixel(&mut out, 16, 16, 8);
    encapsulated(&mut out, &stream);
    Bomb {
        name: "decoy-jpeg-ls",
        bytes: out,
        names: &["JPEG-LS", "(7FE0,0010)", "60000x60000", "16x16"],
    }
}

/// Every bomb, built once for all the tests of this module.
fn bombs() -> &'static [Bomb] {
    static BOMBS: OnceLock<Vec<Bomb>> = OnceLock::new();
    BOMBS.get_or_init(|| {
        vec![
            nested_sequences(),
            lying(
                (0x7FE0, 0x0010),
                b"OW",
                "lying-pixel-data",
                &["element (7FE0,0010) declares 4294967280 bytes but only"],
            ),
            lying(
                (0x0009, 0x1010),
                b"OB",
                "lying-private-ob",
                &["element (0009,1010) declares 4294967280 bytes but only"],
            ),
            lying(
                (0x0040, 0xA160),
                b"UT",
                "lying-ut-text",
                &["element (0040,A160) declares 4294967280 bytes but only"],
            ),
            deflate_bomb(
                "deflate-bomb-one-element",
                u32::MAX,
                &[
                    "deflated data set (0002,0010)",
                    "limits.max_inflated_mib",
                    "element (0009,1000)",
                ],
            ),
            deflate_bomb(
                "deflate-bomb-many-elements",
                64 << 20,
                &[
                    "deflated data set (0002,0010)",
                    "limits.max_inflated_mib",
                    "element (0009,1003)",
                ],
            ),
            decoy_jpeg_2000(),
            jpeg_2000_tile_bomb(),
            decoy_jpeg_ls(),
        ]
    })
}

fn write_bomb(dir: &Path, bomb: &Bomb) -> PathBuf {
    let path = dir.join(format!("{}.dcm", bomb.name));
    std::fs::write(&path, &bomb.bytes).expect("write bomb");
    path
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

#[test]
fn preprocess_refuses_every_bomb_within_300_mib() {
    let inputs = tempfile::tempdir().expect("tempdir");
    for bomb in bombs() {
        let input = write_bomb(inputs.path(), bomb);
        let outputs = tempfile::tempdir().expect("tempdir");
        let npy = outputs.path().join("out.npy");
        let png = outputs.path().join("out.png");
        let (out, peak) = run_measured(&[
            "preprocess".as_ref(),
            "--dicom".as_ref(),
            input.as_os_str(),
            "--out".as_ref(),
            npy.as_os_str(),
            "--png".as_ref(),
            png.as_os_str(),
        ]);
        let line = assert_clean_refusal(&out, bomb.name);
        eprintln!(
            "bomb {:<28} {:>9} bytes  peak RSS {:>6.1} MiB  {line}",
            bomb.name,
            bomb.bytes.len(),
            mib(peak)
        );
        for name in bomb.names {
            assert!(
                line.contains(name),
                "{}: {name:?} not in {line:?}",
                bomb.name
            );
        }
        let left: Vec<_> = std::fs::read_dir(outputs.path()).expect("list").collect();
        assert!(
            left.is_empty(),
            "{}: files left behind: {left:?}",
            bomb.name
        );
        assert!(
            peak <= PEAK_RSS_LIMIT,
            "{}: peak RSS {:.1} MiB over {:.0} MiB",
            bomb.name,
            mib(peak),
            mib(PEAK_RSS_LIMIT)
        );
    }
}

#[test]
fn deflate_bombs_are_small_files_that_inflate_past_1_5_gib() {
    // The deflate bombs are what they claim: small on disk, 1.5 GiB inflated
    // (counted streaming, never held).
    for bomb in bombs().iter().filter(|b| b.name.starts_with("deflate")) {
        assert!(
            bomb.bytes.len() < 4 << 20,
            "{}: {} bytes",
            bomb.name,
            bomb.bytes.len()
        );
        let meta_end = bomb
            .bytes
            .windows(DEFLATED.len())
            .position(|w| w == DEFLATED.as_bytes())
            .expect("transfer syntax in the meta group")
            + DEFLATED.len();
        let mut inflated = flate2::read::DeflateDecoder::new(&bomb.bytes[meta_end..]);
        let size = std::io::copy(&mut inflated, &mut std::io::sink()).expect("inflate");
        assert!(size >= INFLATED_SIZE, "{}: inflates to {size}", bomb.name);
    }
}

#[test]
fn the_server_survives_32_concurrent_bomb_uploads_and_serves_a_good_request() {
    let bombs = bombs();
    let setup = Setup::new("listen = \"127.0.0.1:0\"");
    let mut server = ServerProcess::start(&setup.config);
    let addr = server.addr;
    let (dicom, record) = sample_case();
    let content_type = multipart_type();
    let headers = [("Content-Type", content_type.as_str())];
    let bodies: Vec<Vec<u8>> = bombs
        .iter()
        .map(|b| {
            multipart(&[
                ("dicom", "application/dicom", &b.bytes),
                ("emr", "application/json", &record),
            ])
        })
        .collect();
    let good = multipart(&[
        ("dicom", "application/dicom", &dicom),
        ("emr", "application/json", &record),
    ]);
    let good_answered = AtomicBool::new(false);
    let storm_started = std::sync::Barrier::new(CONCURRENT_UPLOADS + 1);
    let refused_per_upload = std::thread::scope(|scope| {
        let uploads: Vec<_> = (0..CONCURRENT_UPLOADS)
            .map(|i| {
                let (bomb, body) = (&bombs[i % bombs.len()], &bodies[i % bombs.len()]);
                let (headers, good_answered, storm_started) =
                    (&headers, &good_answered, &storm_started);
                scope.spawn(move || {
                    storm_started.wait();
                    // Each upload repeats until the good request has its
                    // answer, so the storm covers it; a 503 (every
                    // prediction slot busy) is retried.
                    let mut refused = 0u32;
                    let deadline = Instant::now() + Duration::from_secs(300);
                    while refused == 0 || !good_answered.load(Ordering::SeqCst) {
                        assert!(
                            Instant::now() < deadline,
                            "{}: storm never ended",
                            bomb.name
                        );
                        let reply = request(addr, "POST", "/v1/predict", headers, body);
                        match reply.status {
                            422 => {
                                assert!(
                                    reply
                                        .header("content-type")
                                        .is_some_and(|t| t.starts_with("application/problem+json")),
                                    "{}: {:?}",
                                    bomb.name,
                                    reply.headers
                                );
                                let detail = reply.json()["detail"]
                                    .as_str()
                                    .unwrap_or_default()
                                    .to_owned();
                                for name in bomb.names {
                                    assert!(
                                        detail.contains(name),
                                        "{}: {name:?} not in {detail:?}",
                                        bomb.name
                                    );
                                }
                                refused += 1;
                            }
                            503 => std::thread::sleep(Duration::from_millis(5)),
                            other => panic!(
                                "{}: status {other}: {}",
                                bomb.name,
                                String::from_utf8_lossy(&reply.body)
                            ),
                        }
                    }
                    refused
                })
            })
            .collect();
        storm_started.wait();
        std::thread::sleep(Duration::from_millis(20));
        let reply = predict_retrying_while_busy(addr, &headers, &good);
        good_answered.store(true, Ordering::SeqCst);
        assert_eq!(
            reply.status,
            200,
            "the good request during the storm: {}",
            String::from_utf8_lossy(&reply.body)
        );
        assert!(reply.json()["request_id"].is_string(), "a prediction");
        uploads
            .into_iter()
            .map(|u| u.join().expect("upload thread"))
            .collect::<Vec<u32>>()
    });
    assert_eq!(refused_per_upload.len(), CONCURRENT_UPLOADS);
    assert!(refused_per_upload.iter().all(|&n| n >= 1));
    assert!(server.is_running(), "the server died under the bombs");
    let health = request(addr, "GET", "/v1/health", &[], b"");
    assert_eq!(health.status, 200, "the server stopped answering");
    let peak = vm_hwm(server.pid());
    eprintln!(
        "server under {CONCURRENT_UPLOADS} concurrent bomb uploads ({} refused with 422): peak RSS (VmHWM) {:.1} MiB",
        refused_per_upload.iter().sum::<u32>(),
        mib(peak)
    );
    assert!(
        peak <= SERVER_RSS_LIMIT,
        "server peak RSS {:.1} MiB over {:.0} MiB",
        mib(peak),
        mib(SERVER_RSS_LIMIT)
    );
}

/// What the deflated upload below inflates to: just under the default
/// `limits.max_inflated_mib` (256), so the scan passes it.
const UNDER_THE_CAP: u64 = 250 << 20;

/// The memory budget of the server below, MiB.
const UNDER_THE_CAP_BUDGET_MIB: u64 = 1024;

#[test]
fn deflated_uploads_under_the_inflation_cap_are_admitted_by_their_inflated_size() {
    // 32 concurrent uploads of a 250 KB file that inflates to 250 MiB (one
    // OB element of zeros), under the cap: each is parsed, so each must be
    // admitted by what it inflates to, not by its compressed size; with a
    // 1 GiB budget at most four are parsed at once.
    let deflated = deflated_zeros("deflated-250-mib", UNDER_THE_CAP, u32::MAX, &[]);
    assert!(deflated.bytes.len() < 1 << 20, "{}", deflated.bytes.len());
    // The 32 scans keep a small machine's cores busy: the plugin's
    // deadline is widened so that CPU contention is not a plugin fault (this
    // test is about memory).
    let setup = Setup::new(&format!(
        "listen = \"127.0.0.1:0\"\nmemory_budget_mib = {UNDER_THE_CAP_BUDGET_MIB}\n[sandbox]\ndeadline_ms = 10000"
    ));
    let mut server = ServerProcess::start(&setup.config);
    let addr = server.addr;
    let (dicom, record) = sample_case();
    let content_type = multipart_type();
    let headers = [("Content-Type", content_type.as_str())];
    let upload = multipart(&[
        ("dicom", "application/dicom", &deflated.bytes),
        ("emr", "application/json", &record),
    ]);
    let good = multipart(&[
        ("dicom", "application/dicom", &dicom),
        ("emr", "application/json", &record),
    ]);
    let good_answered = AtomicBool::new(false);
    let started = std::sync::Barrier::new(CONCURRENT_UPLOADS + 1);
    let (answered, busy) = std::thread::scope(|scope| {
        let uploads: Vec<_> = (0..CONCURRENT_UPLOADS)
            .map(|_| {
                let (headers, upload, good_answered, started) =
                    (&headers, &upload, &good_answered, &started);
                scope.spawn(move || {
                    started.wait();
                    // Parsed (200, or 422 for what the pipeline makes of the
                    // small image after the zeros) at least once, and until
                    // the good request has its answer; 503 (the budget is in
                    // use) is retried.
                    let (mut parsed, mut busy) = (0u32, 0u32);
                    let deadline = Instant::now() + Duration::from_secs(300);
                    while parsed == 0 || !good_answered.load(Ordering::SeqCst) {
                        assert!(Instant::now() < deadline, "the uploads never ended");
                        let reply = request(addr, "POST", "/v1/predict", headers, upload);
                        match reply.status {
                            200 | 422 => parsed += 1,
                            503 => {
                                busy += 1;
                                std::thread::sleep(Duration::from_millis(200));
                            }
                            other => {
                                panic!("status {other}: {}", String::from_utf8_lossy(&reply.body))
                            }
                        }
                    }
                    (parsed, busy)
                })
            })
            .collect();
        started.wait();
        std::thread::sleep(Duration::from_millis(50));
        let reply = predict_retrying_while_busy(addr, &headers, &good);
        good_answered.store(true, Ordering::SeqCst);
        assert_eq!(
            reply.status,
            200,
            "the good request during the uploads: {}",
            String::from_utf8_lossy(&reply.body)
        );
        uploads
            .into_iter()
            .map(|u| u.join().expect("upload thread"))
            .fold((0u32, 0u32), |(a, b), (p, q)| (a + p, b + q))
    });
    assert!(answered >= CONCURRENT_UPLOADS as u32, "{answered}");
    assert!(server.is_running(), "the server died under the uploads");
    // The budget saw the inflated size: one parse reserved more than the
    // 250 MiB it inflates to, and the reservations never passed the budget.
    let metrics = request(addr, "GET", "/metrics", &[], b"");
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let gauge = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    };
    let budget_peak = gauge("oxbox_memory_budget_peak_bytes");
    assert!(
        budget_peak >= UNDER_THE_CAP as f64,
        "budget peak {budget_peak}: the inflated size was not reserved"
    );
    assert!(budget_peak <= (UNDER_THE_CAP_BUDGET_MIB << 20) as f64);
    let peak = vm_hwm(server.pid());
    eprintln!(
        "server under {CONCURRENT_UPLOADS} concurrent uploads of a {} byte file inflating to {} MiB ({answered} parsed, {busy} answered 503, budget {UNDER_THE_CAP_BUDGET_MIB} MiB, budget peak {:.1} MiB): peak RSS (VmHWM) {:.1} MiB",
        deflated.bytes.len(),
        UNDER_THE_CAP >> 20,
        budget_peak / f64::from(1u32 << 20),
        mib(peak)
    );
    assert!(
        peak <= SERVER_RSS_LIMIT,
        "server peak RSS {:.1} MiB over {:.0} MiB",
        mib(peak),
        mib(SERVER_RSS_LIMIT)
    );
}

/// The good prediction sent during a storm: retried while the server
/// answers 503 (every slot busy), for at most two minutes.
fn predict_retrying_while_busy(
    addr: std::net::SocketAddr,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let reply = request(addr, "POST", "/v1/predict", headers, body);
        if reply.status != 503 || Instant::now() > deadline {
            return reply;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
