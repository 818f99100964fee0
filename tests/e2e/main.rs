//! End-to-end tests: drive the built `oxbox` binary on real DICOM files.
//!
//! The corpus (pydicom's test files, the NEMA WG04 set, RG1 re-encoded by
//! dcmtk and GDCM into every transfer syntax, and the reference
//! implementation's output for each) is built by `tests/corpus/build.sh`,
//! which the README's test command runs first.

mod abuse;
mod aggregator;
mod agreement;
mod bad_input;
mod batching;
mod bombs;
mod cli;
mod crash_safety;
mod dicom_listener;
mod evaluate;
mod federate;
mod hostile_plugins;
mod model_swap;
mod openapi;
mod operator_logs;
mod orthanc;
mod plugin_dev;
mod plugin_schema;
mod plugins;
mod predict;
mod serve;
mod serve_limits;
mod simulate;
mod sr;
mod synth;
mod train;
mod util;
