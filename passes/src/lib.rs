//! fastcache-passes: the offline compiler of fastcache. ONNX in, rewritten ONNX out; no
//! execution engine. Data flows file → [`onnx`] → [`ir`] → analysis → passes → [`ir`] → file.

pub mod analysis;
pub mod contract;
pub mod error;
pub mod ir;
pub mod onnx;

pub use error::{Error, Result};
