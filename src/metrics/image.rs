//! Paired fidelity of a sample against the uncached sample from the same seed: PSNR and SSIM.
//!
//! PSNR = 10·log10(L² / MSE), L the data range; identical inputs give +∞, reported as such.
//!
//! SSIM (Wang et al. 2004): local statistics under an 11×11 Gaussian window, σ = 1.5, with
//! C₁ = (0.01·L)², C₂ = (0.03·L)² and population (biased) variances,
//!   SSIM = (2μₐμ_b + C₁)(2σ_ab + C₂) / ((μₐ² + μ_b² + C₁)(σₐ² + σ_b² + C₂)),
//! averaged over the positions where the whole window lies inside the image, as the reference
//! implementation does. Images smaller than the window in a dim (latents of 8×8, say) have no such
//! position: there the window is cut at the image border and renormalised, and every pixel counts.
//! Where the window fits, both readings are the same number.

use ndarray::{ArrayView2, ArrayView4, Axis};

/// Peak signal-to-noise ratio in dB; `f64::INFINITY` when the inputs are equal.
pub fn psnr(a: &[f32], b: &[f32], data_range: f64) -> f64 {
    assert_eq!(a.len(), b.len(), "psnr of inputs of different sizes");
    assert!(!a.is_empty(), "psnr of empty inputs");
    let mse = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (data_range * data_range / mse).log10()
    }
}

pub const SSIM_WINDOW: usize = 11;
pub const SSIM_SIGMA: f64 = 1.5;
const K1: f64 = 0.01;
const K2: f64 = 0.03;

/// The 1-D Gaussian the 11×11 window is the outer product of (unnormalised: every use divides by
/// the sum of the weights it covers).
fn gaussian() -> [f64; SSIM_WINDOW] {
    let half = (SSIM_WINDOW / 2) as f64;
    std::array::from_fn(|i| {
        let d = i as f64 - half;
        (-d * d / (2.0 * SSIM_SIGMA * SSIM_SIGMA)).exp()
    })
}

/// Gaussian-weighted mean around every pixel, the window cut at the borders and renormalised.
/// The window is separable and the part inside the image a rectangle, so filtering rows then
/// columns, each normalised by the weights it covered, gives exactly the 2-D weighted mean.
fn local_mean(x: &[f64], h: usize, w: usize, g: &[f64; SSIM_WINDOW]) -> Vec<f64> {
    let half = (SSIM_WINDOW / 2) as isize;
    let filter = |get: &dyn Fn(usize) -> f64, n: usize, at: usize| {
        let (mut sum, mut weight) = (0.0, 0.0);
        for (k, &gk) in g.iter().enumerate() {
            let p = at as isize + k as isize - half;
            if p >= 0 && (p as usize) < n {
                sum += gk * get(p as usize);
                weight += gk;
            }
        }
        sum / weight
    };
    let mut rows = vec![0.0; h * w];
    for i in 0..h {
        for j in 0..w {
            rows[i * w + j] = filter(&|p| x[i * w + p], w, j);
        }
    }
    let mut out = vec![0.0; h * w];
    for i in 0..h {
        for j in 0..w {
            out[i * w + j] = filter(&|p| rows[p * w + j], h, i);
        }
    }
    out
}

/// SSIM of two single-channel images of the same shape (see the module documentation).
pub fn ssim(a: ArrayView2<f32>, b: ArrayView2<f32>, data_range: f64) -> f64 {
    assert_eq!(a.shape(), b.shape(), "ssim of images of different shapes");
    let (h, w) = a.dim();
    assert!(h > 0 && w > 0, "ssim of an empty image");
    let x: Vec<f64> = a.iter().map(|&v| f64::from(v)).collect();
    let y: Vec<f64> = b.iter().map(|&v| f64::from(v)).collect();
    let xx: Vec<f64> = x.iter().map(|v| v * v).collect();
    let yy: Vec<f64> = y.iter().map(|v| v * v).collect();
    let xy: Vec<f64> = x.iter().zip(&y).map(|(p, q)| p * q).collect();
    let g = gaussian();
    let (mx, my) = (local_mean(&x, h, w, &g), local_mean(&y, h, w, &g));
    let (exx, eyy, exy) = (
        local_mean(&xx, h, w, &g),
        local_mean(&yy, h, w, &g),
        local_mean(&xy, h, w, &g),
    );
    let c1 = (K1 * data_range).powi(2);
    let c2 = (K2 * data_range).powi(2);
    let half = SSIM_WINDOW / 2;
    // Positions where the whole window fits, per axis; all positions where none does.
    let span = |n: usize| {
        if n >= SSIM_WINDOW {
            half..n - half
        } else {
            0..n
        }
    };
    let (mut total, mut count) = (0.0, 0usize);
    for i in span(h) {
        for j in span(w) {
            let k = i * w + j;
            let (ma, mb) = (mx[k], my[k]);
            let va = exx[k] - ma * ma;
            let vb = eyy[k] - mb * mb;
            let cov = exy[k] - ma * mb;
            total += ((2.0 * ma * mb + c1) * (2.0 * cov + c2))
                / ((ma * ma + mb * mb + c1) * (va + vb + c2));
            count += 1;
        }
    }
    total / count as f64
}

/// How a model's output is compared.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Space {
    /// Images in [−1, 1] (clamped there first, as they are shown), data range 2, channels
    /// averaged (SSIM) or pooled (PSNR).
    Pixels,
    /// Latents: each channel on its own, with the data range of the reference sample's channel
    /// (max − min); PSNR and SSIM averaged over channels.
    Latent,
}

impl Space {
    /// Pixel space for 1- or 3-channel outputs, latent otherwise.
    pub fn for_channels(channels: usize) -> Space {
        if channels == 1 || channels == 3 {
            Space::Pixels
        } else {
            Space::Latent
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Space::Pixels => {
                "pixels clamped to [-1, 1], data range 2; SSIM averaged over channels, PSNR over all values"
            }
            Space::Latent => {
                "latents, each channel with the data range (max - min) of the reference sample's channel; PSNR and SSIM averaged over channels"
            }
        }
    }
}

/// PSNR and SSIM of one sample against its reference.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fidelity {
    pub psnr: f64,
    pub ssim: f64,
}

/// Per sample of a batch [B, C, H, W]: fidelity of `sample` against `reference`.
pub fn fidelity(
    reference: ArrayView4<f32>,
    sample: ArrayView4<f32>,
    space: Space,
) -> Vec<Fidelity> {
    assert_eq!(
        reference.shape(),
        sample.shape(),
        "fidelity of batches of different shapes"
    );
    let mut result = Vec::with_capacity(reference.len_of(Axis(0)));
    for (r, s) in reference.outer_iter().zip(sample.outer_iter()) {
        match space {
            Space::Pixels => {
                let r = r.mapv(|v| v.clamp(-1.0, 1.0));
                let s = s.mapv(|v| v.clamp(-1.0, 1.0));
                let (rv, sv): (Vec<f32>, Vec<f32>) =
                    (r.iter().copied().collect(), s.iter().copied().collect());
                let channels = r.len_of(Axis(0));
                let ssim_mean = (0..channels)
                    .map(|c| ssim(r.index_axis(Axis(0), c), s.index_axis(Axis(0), c), 2.0))
                    .sum::<f64>()
                    / channels as f64;
                result.push(Fidelity {
                    psnr: psnr(&rv, &sv, 2.0),
                    ssim: ssim_mean,
                });
            }
            Space::Latent => {
                let channels = r.len_of(Axis(0));
                let (mut p, mut q) = (0.0, 0.0);
                for c in 0..channels {
                    let (rc, sc) = (r.index_axis(Axis(0), c), s.index_axis(Axis(0), c));
                    let (lo, hi) = rc
                        .iter()
                        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                            (lo.min(v), hi.max(v))
                        });
                    // A constant reference channel has no range; its values' own scale stands in.
                    let range = if hi > lo {
                        f64::from(hi - lo)
                    } else {
                        f64::from(hi.abs()).max(1e-12)
                    };
                    let rv: Vec<f32> = rc.iter().copied().collect();
                    let sv: Vec<f32> = sc.iter().copied().collect();
                    p += psnr(&rv, &sv, range);
                    q += ssim(rc, sc, range);
                }
                result.push(Fidelity {
                    psnr: p / channels as f64,
                    ssim: q / channels as f64,
                });
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, Array4};

    fn image(h: usize, w: usize) -> Array2<f32> {
        // A smooth pattern with structure at several scales, values in [-1, 1].
        Array2::from_shape_fn((h, w), |(i, j)| {
            ((i as f32 * 0.7).sin() * (j as f32 * 0.4).cos() * 0.8
                + 0.1 * (i + j) as f32 / (h + w) as f32)
                .clamp(-1.0, 1.0)
        })
    }

    #[test]
    fn identical_images_have_infinite_psnr_and_ssim_one() {
        for (h, w) in [(14, 14), (8, 8), (32, 20)] {
            let a = image(h, w);
            let v: Vec<f32> = a.iter().copied().collect();
            assert_eq!(psnr(&v, &v, 2.0), f64::INFINITY);
            let s = ssim(a.view(), a.view(), 2.0);
            assert!((s - 1.0).abs() < 1e-12, "{h}x{w}: {s}");
        }
    }

    #[test]
    fn psnr_of_a_constant_shift_and_of_plus_minus_noise_is_analytic() {
        let a = image(14, 14);
        let v: Vec<f32> = a.iter().copied().collect();
        for c in [0.02f32, 0.2, 0.5] {
            // MSE = c², so PSNR = 20·log10(L / c).
            let expected = 20.0 * (2.0 / f64::from(c)).log10();
            let shifted: Vec<f32> = v.iter().map(|x| x + c).collect();
            assert!((psnr(&v, &shifted, 2.0) - expected).abs() < 1e-4);
            let noisy: Vec<f32> = v
                .iter()
                .enumerate()
                .map(|(i, x)| if i % 2 == 0 { x + c } else { x - c })
                .collect();
            assert!((psnr(&v, &noisy, 2.0) - expected).abs() < 1e-4);
        }
        // 0.02 on a range of 2 is 40 dB exactly.
        let shifted: Vec<f32> = v.iter().map(|x| x + 0.02).collect();
        assert!((psnr(&v, &shifted, 2.0) - 40.0).abs() < 1e-4);
    }

    #[test]
    fn ssim_of_constant_images_is_the_luminance_term() {
        // No variance anywhere: SSIM = (2·m₁·m₂ + C₁) / (m₁² + m₂² + C₁), at every position.
        for (h, w) in [(14, 14), (8, 8)] {
            for (m1, m2) in [(0.5f32, 0.3f32), (-1.0, 1.0), (0.2, 0.2)] {
                let a = Array2::from_elem((h, w), m1);
                let b = Array2::from_elem((h, w), m2);
                let c1 = (0.01f64 * 2.0).powi(2);
                let (m1, m2) = (f64::from(m1), f64::from(m2));
                let expected = (2.0 * m1 * m2 + c1) / (m1 * m1 + m2 * m2 + c1);
                let s = ssim(a.view(), b.view(), 2.0);
                assert!((s - expected).abs() < 1e-9, "{s} vs {expected}");
            }
        }
    }

    #[test]
    fn ssim_is_symmetric_and_falls_as_noise_grows() {
        let a = image(14, 14);
        let mut last = 1.0;
        for level in [0.01f32, 0.05, 0.2, 0.5] {
            let b = Array2::from_shape_fn((14, 14), |(i, j)| {
                a[[i, j]] + level * if (i * 7 + j * 3) % 5 < 2 { 1.0 } else { -1.0 }
            });
            let s = ssim(a.view(), b.view(), 2.0);
            assert!((s - ssim(b.view(), a.view(), 2.0)).abs() < 1e-12);
            assert!(s < last && s > -1.0, "{level}: {s} after {last}");
            last = s;
        }
    }

    #[test]
    fn latent_fidelity_uses_each_channels_range() {
        let mut r = Array4::<f32>::zeros((2, 4, 8, 8));
        for ((b, c, i, j), v) in r.indexed_iter_mut() {
            *v = (c as f32 + 1.0) * 3.0 * ((i * 8 + j) as f32 / 63.0) + b as f32;
        }
        let same = fidelity(r.view(), r.view(), Space::Latent);
        assert!(
            same.iter()
                .all(|f| f.psnr.is_infinite() && (f.ssim - 1.0).abs() < 1e-12)
        );
        // A shift of 1% of each channel's range: PSNR 40 dB in every channel.
        let mut s = r.clone();
        for ((_, c, _, _), v) in s.indexed_iter_mut() {
            *v += 0.01 * 3.0 * (c as f32 + 1.0);
        }
        for f in fidelity(r.view(), s.view(), Space::Latent) {
            assert!((f.psnr - 40.0).abs() < 1e-3, "{}", f.psnr);
        }
    }

    #[test]
    fn pixel_fidelity_clamps_to_the_shown_range() {
        let r = Array4::<f32>::from_elem((1, 1, 14, 14), 1.0);
        let s = Array4::<f32>::from_elem((1, 1, 14, 14), 3.0);
        let f = fidelity(r.view(), s.view(), Space::Pixels);
        assert!(f[0].psnr.is_infinite(), "both show as white");
    }
}
