//! Quality metrics for accelerated sampling: paired fidelity against the uncached sample from the
//! same seed ([`image`]: PSNR, SSIM) and distribution distance and class accuracy from a
//! classifier's features and logits ([`frechet`]).

pub mod frechet;
pub mod image;

pub use frechet::{Gaussian, accuracy, frechet_distance};
pub use image::{Fidelity, Space, fidelity, psnr, ssim};
