//! fastcache-passes: the offline compiler of fastcache. ONNX in, rewritten ONNX out; no
//! execution engine. Data flows file → [`onnx`] → [`ir`] → analysis → passes → [`ir`] → file.

pub mod analysis;
pub mod builder;
pub mod cache;
pub mod calibration;
pub mod contract;
pub mod error;
pub mod expose;
pub mod fuzzing;
pub mod ir;
pub mod merge;
pub mod onnx;
pub mod pass;
pub mod rewrite;
pub mod split;
pub mod token_axis;
pub mod tokens;

pub use error::{Error, Result};
