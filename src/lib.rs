//! fastcache: runs, calibrates and measures diffusion transformers rewritten by the compiler in
//! `fastcache-passes`. Data flows file → IR → analysis → passes → file → engine → sampler → report.

pub mod bench;
pub mod calibrate;
pub mod cli;
pub mod engine;
pub mod metrics;
pub mod sampler;
