//! Signed documents: one canonical JSON encoding, an Ed25519 signature
//! over its exact bytes, and the signer's public key, carried in one line
//! `ed25519 <public key hex> <signature hex>` (the `Oxbox-Signature` HTTP
//! header, the `.sig` file beside a stored document; the same line as a
//! plugin's `plugin.toml.sig`).

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::FederationError;
use oxbox_signing::SigningKey;

/// The HTTP header that carries the signature line.
pub const SIGNATURE_HEADER: &str = "oxbox-signature";

/// The one encoding a document is signed in: JSON, object keys sorted,
/// no whitespace, numbers as serde_json writes them.
///
/// # Errors
/// [`FederationError::Malformed`] when `value` does not serialise.
pub fn canonical_json(value: &impl Serialize) -> Result<Vec<u8>, FederationError> {
    let value = serde_json::to_value(value).map_err(|e| FederationError::Malformed {
        what: "document".to_string(),
        reason: e.to_string(),
    })?;
    serde_json::to_vec(&sorted(value)).map_err(|e| FederationError::Malformed {
        what: "document".to_string(),
        reason: e.to_string(),
    })
}

/// `value` with every object's keys in byte order (the workspace enables
/// serde_json's `preserve_order`, so maps keep insertion order otherwise).
fn sorted(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<(String, serde_json::Value)> = map.into_iter().collect();
            entries.sort_by(|(a, _), (b, _)| a.cmp(b));
            serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.into_iter().map(sorted).collect())
        }
        other => other,
    }
}

/// A document's bytes with its signature and signer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedDocument {
    /// The canonical bytes.
    pub body: Vec<u8>,
    /// The signer's public key.
    pub key: [u8; 32],
    /// Ed25519 over `body`.
    pub signature: [u8; 64],
}

impl SignedDocument {
    /// Encodes `value` canonically and signs it with `key`.
    ///
    /// # Errors
    /// [`FederationError::Malformed`] when it does not serialise.
    pub fn sign(value: &impl Serialize, key: &SigningKey) -> Result<Self, FederationError> {
        let body = canonical_json(value)?;
        let signature = key.sign(&body);
        Ok(Self {
            body,
            key: key.public_key(),
            signature,
        })
    }

    /// The signature line `ed25519 <key hex> <signature hex>`.
    pub fn signature_line(&self) -> String {
        format!(
            "ed25519 {} {}",
            hex::encode(self.key),
            hex::encode(self.signature)
        )
    }

    /// Parses a signature line and pairs it with `body` (not verified yet).
    ///
    /// # Errors
    /// [`FederationError::Signature`] for a malformed line.
    pub fn from_parts(body: Vec<u8>, signature_line: &str) -> Result<Self, FederationError> {
        let bad = |reason: &str| FederationError::Signature(format!("signature line: {reason}"));
        let mut parts = signature_line.split_ascii_whitespace();
        let (Some(scheme), Some(key), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected `ed25519 <public key hex> <signature hex>`"));
        };
        if scheme != "ed25519" {
            return Err(bad("the scheme must be ed25519"));
        }
        let key = oxbox_signing::parse_public_key(key).map_err(|_| bad("bad public key hex"))?;
        let signature =
            oxbox_signing::parse_signature(signature).map_err(|_| bad("bad signature hex"))?;
        Ok(Self {
            body,
            key,
            signature,
        })
    }

    /// Verifies the signature and that the signer is one of `trusted`;
    /// then parses the body, which must be in canonical encoding (so one
    /// document has one byte form).
    ///
    /// # Errors
    /// [`FederationError::Signature`] (bad signature, untrusted key) or
    /// [`FederationError::Malformed`] (not the expected document, not
    /// canonical), naming `what`.
    pub fn verify<T: DeserializeOwned + Serialize>(
        &self,
        trusted: &[[u8; 32]],
        what: &str,
    ) -> Result<T, FederationError> {
        if !trusted.contains(&self.key) {
            return Err(FederationError::Signature(format!(
                "{what}: signed by the untrusted key {}",
                hex::encode(self.key)
            )));
        }
        if !oxbox_signing::verifies(&self.body, &self.signature, &self.key) {
            return Err(FederationError::Signature(format!(
                "{what}: the signature does not verify"
            )));
        }
        let value: T =
            serde_json::from_slice(&self.body).map_err(|e| FederationError::Malformed {
                what: what.to_string(),
                reason: e.to_string(),
            })?;
        if canonical_json(&value)? != self.body {
            return Err(FederationError::Malformed {
                what: what.to_string(),
                reason: "not in canonical encoding".to_string(),
            });
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{
        Contribution, FORMAT, GlobalModelRecord, Phase, RoundTask, TrainingSettings,
    };

    fn key(dir: &std::path::Path) -> SigningKey {
        let (private, _) = oxbox_signing::generate_keypair(dir).expect("generate");
        SigningKey::load(&private).expect("load")
    }

    fn task() -> RoundTask {
        RoundTask {
            format: FORMAT,
            job: "exam-sim".into(),
            phase: Phase::Training,
            round: 2,
            rounds: 5,
            global_model: "ab".repeat(32),
            global_round: 1,
            training: TrainingSettings {
                epochs: 1,
                batch_size: 16,
                learning_rate: 0.001,
                proximal_mu: 0.0,
            },
            received: vec!["site-2".into()],
        }
    }

    #[test]
    fn canonical_json_sorts_keys_without_whitespace() {
        #[derive(Serialize)]
        struct Doc {
            zeta: u32,
            alpha: Vec<Inner>,
            map: indexmap_like::Map,
        }
        #[derive(Serialize)]
        struct Inner {
            b: f64,
            a: Option<String>,
        }
        mod indexmap_like {
            /// Insertion-ordered (serde_json's preserve_order map).
            pub type Map = serde_json::Map<String, serde_json::Value>;
        }
        let mut map = serde_json::Map::new();
        map.insert("y".into(), serde_json::json!({"d": 1, "c": [true, null]}));
        map.insert("x".into(), serde_json::json!("text with space"));
        let doc = Doc {
            zeta: 1,
            alpha: vec![Inner { b: 0.5, a: None }],
            map,
        };
        let bytes = canonical_json(&doc).expect("encode");
        assert_eq!(
            String::from_utf8(bytes).expect("utf-8"),
            r#"{"alpha":[{"a":null,"b":0.5}],"map":{"x":"text with space","y":{"c":[true,null],"d":1}},"zeta":1}"#
        );
    }

    #[test]
    fn signed_documents_verify_and_round_trip_through_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let aggregator = key(&dir.path().join("a"));
        let doc = SignedDocument::sign(&task(), &aggregator).expect("sign");
        let line = doc.signature_line();
        assert!(line.starts_with("ed25519 "));
        let parsed = SignedDocument::from_parts(doc.body.clone(), &line).expect("parse");
        assert_eq!(parsed, doc);
        let back: RoundTask = parsed
            .verify(&[aggregator.public_key()], "round task")
            .expect("verify");
        assert_eq!(back, task());
    }

    #[test]
    fn verify_refuses_forgeries_strangers_and_other_encodings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let aggregator = key(&dir.path().join("a"));
        let stranger = key(&dir.path().join("s"));
        let trusted = [aggregator.public_key()];
        let doc = SignedDocument::sign(&task(), &aggregator).expect("sign");

        // A changed body under the original signature.
        let mut tampered = doc.clone();
        tampered.body = String::from_utf8(doc.body.clone())
            .expect("utf-8")
            .replace("\"round\":2", "\"round\":3")
            .into_bytes();
        assert_ne!(tampered.body, doc.body);
        assert!(matches!(
            tampered.verify::<RoundTask>(&trusted, "round task"),
            Err(FederationError::Signature(m)) if m.contains("does not verify")
        ));
        // A flipped signature bit.
        let mut flipped = doc.clone();
        flipped.signature[10] ^= 1;
        assert!(matches!(
            flipped.verify::<RoundTask>(&trusted, "round task"),
            Err(FederationError::Signature(_))
        ));
        // A valid signature by a key that is not trusted.
        let foreign = SignedDocument::sign(&task(), &stranger).expect("sign");
        assert!(matches!(
            foreign.verify::<RoundTask>(&trusted, "round task"),
            Err(FederationError::Signature(m)) if m.contains("untrusted")
        ));
        // Another key's signature claimed for the trusted key.
        let mut claimed = foreign.clone();
        claimed.key = aggregator.public_key();
        assert!(claimed.verify::<RoundTask>(&trusted, "round task").is_err());
        // Signed, but not canonical (whitespace, key order).
        let pretty = serde_json::to_vec_pretty(&task()).expect("json");
        let signature = aggregator.sign(&pretty);
        let loose = SignedDocument {
            body: pretty,
            key: aggregator.public_key(),
            signature,
        };
        assert!(matches!(
            loose.verify::<RoundTask>(&trusted, "round task"),
            Err(FederationError::Malformed { reason, .. }) if reason.contains("canonical")
        ));
        // Signed and canonical, but another document type.
        let record = GlobalModelRecord {
            format: FORMAT,
            job: "exam-sim".into(),
            round: 1,
            digest: "00".repeat(32),
            previous: None,
            contributions: vec![Contribution {
                site: "site-1".into(),
                samples: 10,
            }],
        };
        let other = SignedDocument::sign(&record, &aggregator).expect("sign");
        assert!(matches!(
            other.verify::<RoundTask>(&trusted, "round task"),
            Err(FederationError::Malformed { what, .. }) if what == "round task"
        ));
        // A record without its optional field written out is not canonical.
        let body = String::from_utf8(other.body.clone())
            .expect("utf-8")
            .replace("\"previous\":null,", "");
        let signature = aggregator.sign(body.as_bytes());
        let short = SignedDocument {
            body: body.into_bytes(),
            key: aggregator.public_key(),
            signature,
        };
        assert!(
            short
                .verify::<GlobalModelRecord>(&trusted, "record")
                .is_err()
        );
        assert!(
            other
                .verify::<GlobalModelRecord>(&trusted, "record")
                .is_ok()
        );
    }

    #[test]
    fn malformed_signature_lines_are_refused() {
        let key = "ab".repeat(32);
        let sig = "cd".repeat(64);
        for line in [
            String::new(),
            "ed25519".to_string(),
            format!("ed25519 {key}"),
            format!("rsa {key} {sig}"),
            format!("ed25519 {key} {sig} extra"),
            format!("ed25519 {} {sig}", &key[2..]),
            format!("ed25519 {key} {}", &sig[2..]),
            format!("ed25519 zz{} {sig}", &key[2..]),
        ] {
            assert!(
                matches!(
                    SignedDocument::from_parts(b"{}".to_vec(), &line),
                    Err(FederationError::Signature(_))
                ),
                "{line:?}"
            );
        }
        assert!(
            SignedDocument::from_parts(b"{}".to_vec(), &format!("ed25519 {key} {sig}")).is_ok()
        );
    }
}
