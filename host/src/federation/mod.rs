//! Federated learning, the site's and the aggregator's shared maths and
//! formats: weight tensors as plain data, privacy filters, safetensors
//! shards, signed canonical documents, statistics and federated averaging.
//!
//! Everything here is a pure function over tensors and bytes: no network,
//! no files, no clock. HTTP is one transport ([`crate::aggregator`] on the
//! server side, [`client`] and [`site`] on the site side); a later one can
//! join an existing federation engine with the same functions.
//!
//! The way of one round's update, on the site:
//! global weights → local training → [`tensors::difference`] (Δ = local −
//! global) → [`filters::apply`] (exclude, percentile, clip, noise) →
//! [`shards::encode`] (safetensors shards ≤ `shard_mib`) →
//! [`protocol::UpdateManifest`] → [`signed::SignedDocument::sign`].
//! On the aggregator: [`signed::SignedDocument::verify`] →
//! [`shards::decode`] → [`aggregate::RunningAverage`] → new global.

pub mod aggregate;
pub mod client;
pub mod filters;
pub mod site;
pub mod stats;

pub use oxbox_federation_formats::{FederationError, protocol, shards, signed, tensors};
