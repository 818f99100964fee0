//! Plugin manifests and their signature files, as `oxbox` loads them
//! (`Manifest::parse`, `SignatureFile::parse`): the input is the manifest's
//! bytes, then a line `--sig--`, then the signature file's bytes. A
//! signature that parses is verified over the manifest bytes (it never
//! verifies for a fuzzed one: the point is that verifying hostile bytes
//! does not fail otherwise), and a parsed signature file must write back
//! to a text that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oxbox_plugin_manifest::{Manifest, SignatureFile};

const SEPARATOR: &[u8] = b"\n--sig--\n";

fuzz_target!(|data: &[u8]| {
    let (manifest, signature) = match data.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
        Some(at) => (&data[..at], Some(&data[at + SEPARATOR.len()..])),
        None => (data, None),
    };
    let _ = Manifest::parse(manifest);
    if let Some(Ok(parsed)) = signature.map(SignatureFile::parse) {
        if let SignatureFile::Ed25519 { key, signature } = &parsed {
            let _ = oxbox_signing::verifies(manifest, signature, key);
        }
        let again = SignatureFile::parse(parsed.to_text().as_bytes());
        assert_eq!(again.as_ref(), Ok(&parsed));
    }
});
