//! The bench's metrics agree with independent numpy implementations (tests/data/
//! metrics_reference.py): SSIM written with the full 2-D window instead of separable filtering,
//! the Fréchet distance through the general eigenvalues of Σ₁Σ₂ instead of symmetric eigen
//! decompositions, on images of the trained model's size and on latent-sized ones, and on
//! feature sets of the classifier's width.

mod common;

use fastcache::metrics::{Gaussian, frechet_distance, psnr, ssim};
use ndarray::{Array2, ArrayD, IxDyn};
use ndarray_npy::NpzWriter;
use rand::{Rng, SeedableRng};

#[test]
fn ssim_psnr_and_frechet_distance_match_numpy() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let dir = tempfile::tempdir().unwrap();
    for (case, (h, w, range)) in [(14usize, 14usize, 2.0f32), (8, 8, 3.5), (12, 20, 2.0)]
        .into_iter()
        .enumerate()
    {
        // A blurred digit-like blob and a noisy copy of it.
        let a = Array2::from_shape_fn((h, w), |(i, j)| {
            let (y, x) = (i as f32 - h as f32 / 2.0, j as f32 - w as f32 / 2.0);
            (1.5 * (-(x * x + y * y) / 12.0).exp() - 1.0).clamp(-1.0, 1.0)
        });
        let b = a.mapv(|v| v + rng.random_range(-0.15f32..0.15));
        // Features of two slightly different distributions, the classifier's width.
        let (n, m, f) = (300usize, 250usize, 128usize);
        let mix: Vec<f64> = (0..f * f).map(|_| rng.random_range(-0.3..0.3)).collect();
        let draw = |rng: &mut rand::rngs::StdRng, rows: usize, shift: f64| -> Vec<f64> {
            let mut out = vec![0.0; rows * f];
            for r in 0..rows {
                let z: Vec<f64> = (0..f).map(|_| rng.random_range(-1.0..1.0)).collect();
                for c in 0..f {
                    out[r * f + c] = shift * (c % 3) as f64
                        + z[c]
                        + (0..8)
                            .map(|k| mix[c * f + (c + k) % f] * z[(c + k) % f])
                            .sum::<f64>();
                }
            }
            out
        };
        // Rounded to f32, as the classifier's features are, so both sides see the same values.
        let round = |v: Vec<f64>| v.into_iter().map(|x| x as f32 as f64).collect::<Vec<f64>>();
        let f1 = round(draw(&mut rng, n, 0.0));
        let f2 = round(draw(&mut rng, m, 0.2));

        let path = dir.path().join(format!("case{case}.npz"));
        let mut npz = NpzWriter::new(std::fs::File::create(&path).unwrap());
        npz.add_array("a", &a).unwrap();
        npz.add_array("b", &b).unwrap();
        npz.add_array("range", &ArrayD::from_elem(IxDyn(&[]), range))
            .unwrap();
        npz.add_array("f1", &Array2::from_shape_vec((n, f), f1.clone()).unwrap())
            .unwrap();
        npz.add_array("f2", &Array2::from_shape_vec((m, f), f2.clone()).unwrap())
            .unwrap();
        npz.finish().unwrap();
        let reference = common::python_json(
            std::process::Command::new(common::python())
                .arg(common::root().join("tests/data/metrics_reference.py"))
                .arg(&path),
        );

        let ours = ssim(a.view(), b.view(), f64::from(range));
        let theirs = reference["ssim"].as_f64().unwrap();
        assert!(
            (ours - theirs).abs() < 1e-9,
            "case {case}: SSIM {ours} vs numpy {theirs}"
        );
        let av: Vec<f32> = a.iter().copied().collect();
        let bv: Vec<f32> = b.iter().copied().collect();
        let ours = psnr(&av, &bv, f64::from(range));
        let theirs = reference["psnr"].as_f64().unwrap();
        assert!(
            (ours - theirs).abs() < 1e-9,
            "case {case}: PSNR {ours} vs numpy {theirs}"
        );

        let to32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let g1 = Gaussian::fit(&to32(&f1), f);
        let g2 = Gaussian::fit(&to32(&f2), f);
        let ours = frechet_distance(&g1, &g2);
        let theirs = reference["fd"].as_f64().unwrap();
        assert!(
            (ours - theirs).abs() < 1e-7 * theirs.abs().max(1.0),
            "case {case}: FD {ours} vs numpy {theirs}"
        );
    }
}
