//! Nothing of its own: this crate exists so that `scripts/cuda-check.sh` can
//! check `oxbox-model` with the `cuda` feature in a workspace of its own
//! (see Cargo.toml).

pub use oxbox_model;
