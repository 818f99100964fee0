//! # oxbox
//!
//! The appliance a hospital runs on its radiology edge box for EXAM-style
//! federated learning: a chest radiograph plus emergency-room vital signs and
//! labs in, oxygen-need probabilities out; site knowledge in sandboxed
//! WebAssembly plugins; only signed, filtered weight shards leave the site.
//!
//! ## Map of the crate, in the order data flows
//!
//! | module        | stage                                                          |
//! |---------------|----------------------------------------------------------------|
//! | [`config`]    | the box's TOML configuration, strictly parsed and validated    |
//! | [`dicom`]     | DICOM file → checked header → stored pixels → canonical tensor |
//! |               | (crate `oxbox-dicom`, `host/dicom/`)                           |
//! | [`plugins`]   | site plugins: sandboxed WebAssembly components (wasmtime)      |
//! | [`model`]     | the EXAM-style network (candle), model packages, inference,    |
//! |               | the CPU kernels (crate `oxbox-model`, `host/model/`)           |
//! | [`pipeline`]  | one case end to end: radiograph + EMR → plugins → model        |
//! | [`sr`]        | a prediction as a DICOM Comprehensive SR (IHE AIR-like)        |
//! | [`dimse`]     | DICOM networking: C-ECHO / C-STORE SCP, C-STORE SCU (dicom-ul) |
//! | [`studies`]   | received studies: storage, EMR matching, results (SQLite)      |
//! | [`http`]      | HTTP plumbing every server shares: accept loop, limits, drain, |
//! |               | problem+json, bearer token, the predict body (`oxbox-http`)    |
//! | [`serve`]     | the local HTTP endpoint: predictions, health, metrics (hyper)  |
//! | [`store`]     | local state in SQLite: the audit log of predictions            |
//! | [`federation`]| federated learning maths and formats: filters, shards, signing |
//! | [`aggregator`]| the federation aggregator: rounds, uploads, FedAvg, HTTP API   |
//! | [`synth`]     | a multi-site synthetic cohort with known truth (`oxbox synth`; |
//! |               | crate `oxbox-synth`, `host/synth/`)                            |
//! | [`dataset`]   | site folders (EMR export, labels, images) as labelled cases    |
//! | [`cases`]     | a site's cases through its plugin, up to the model (shared)    |
//! | [`train`]     | local training: site folders → a trained model package         |
//! | [`evaluate`]  | clinical evaluation: AUC with CI, calibration, ROC charts      |
//! | [`simulate`]  | a whole federation on loopback vs local-only and pooled models |
//! | [`metrics`]   | evaluation statistics: ROC AUC, the normal distribution        |
//! |               | (crate `oxbox-metrics`, `host/metrics/`)                       |
//! | [`rng`]       | the deterministic random generator behind seeds (`oxbox-rng`)  |
//! | [`signing`]   | Ed25519 keys and signatures (`oxbox-signing`)                  |
//! | [`output`]    | tensors and previews written atomically (`oxbox-files`)        |
//! | [`guard`]     | panic containment around parsers and codecs (`oxbox-dicom`)    |
//!
//! The federation's wire formats ([`federation::tensors`], [`federation::shards`],
//! [`federation::protocol`], [`federation::signed`]) are the crate
//! `oxbox-federation-formats`, a plugin's `plugin.toml` ([`plugins::manifest`])
//! is `oxbox-plugin-manifest`: each crate under `host/` uses none of `oxbox`,
//! so the compiler keeps those stages free of the model, the plugin runtime
//! and the servers.
//!
//! The binary (`src/main.rs`, `src/cli/`) only parses arguments, calls into
//! these modules and maps errors to exit codes: 0 success, 1 failure, 2 bad
//! input or usage.

#![deny(missing_docs)]

// Stages in crates of their own (host/<name>/), under their usual paths.
pub use oxbox_dicom as dicom;
pub use oxbox_dicom::guard;
pub use oxbox_files as output;
pub use oxbox_http as http;
pub use oxbox_metrics as metrics;
pub use oxbox_model as model;
pub use oxbox_rng as rng;
pub use oxbox_signing as signing;
pub use oxbox_synth as synth;

pub mod aggregator;
pub mod cases;
pub mod config;
pub mod dataset;
pub mod dimse;
pub mod evaluate;
pub mod federation;
pub mod pipeline;
pub mod plugins;
pub mod serve;
pub mod simulate;
pub mod sr;
pub mod store;
pub mod studies;
pub mod train;
