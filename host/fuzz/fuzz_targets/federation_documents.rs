//! The federation's signed documents, as the aggregator and the sites read
//! them: the signature line (`SignedDocument::from_parts`) and the body,
//! which must be one of the protocol's documents in canonical JSON. The
//! input's first byte picks the document (update manifest, round task,
//! global model record), the rest up to the first newline is the signature
//! line, the rest the body. The body is also signed with a key made at
//! start-up and verified, so the parse-and-canonical check behind a valid
//! signature runs on every input; a document that verifies must encode
//! back to exactly its bytes.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use oxbox_federation_formats::protocol::{GlobalModelRecord, RoundTask, UpdateManifest};
use oxbox_federation_formats::signed::{SignedDocument, canonical_json};
use oxbox_signing::SigningKey;
use serde::Serialize;
use serde::de::DeserializeOwned;

fn key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("oxbox-fuzz-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("key dir");
        let (private, _) = oxbox_signing::generate_keypair(&dir).expect("key pair");
        let key = SigningKey::load(&private).expect("load key");
        let _ = std::fs::remove_dir_all(&dir);
        key
    })
}

fn check<T: DeserializeOwned + Serialize>(line: &str, body: &[u8], what: &str) {
    let key = key();
    // A hostile signature line and body: refused or verified, never a panic.
    if let Ok(signed) = SignedDocument::from_parts(body.to_vec(), line) {
        let _ = signed.verify::<T>(&[signed.key], what);
    }
    // The same body behind a valid signature: the document checks run.
    let signed = SignedDocument {
        body: body.to_vec(),
        key: key.public_key(),
        signature: key.sign(body),
    };
    let reparsed = SignedDocument::from_parts(body.to_vec(), &signed.signature_line())
        .expect("a signature line made here parses");
    if let Ok(value) = reparsed.verify::<T>(&[key.public_key()], what) {
        assert_eq!(canonical_json(&value).ok().as_deref(), Some(body));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let split = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let line = String::from_utf8_lossy(&rest[..split]);
    let body = rest.get(split + 1..).unwrap_or_default();
    match which % 3 {
        0 => check::<UpdateManifest>(&line, body, "update manifest"),
        1 => check::<RoundTask>(&line, body, "round task"),
        _ => check::<GlobalModelRecord>(&line, body, "global model record"),
    }
});
