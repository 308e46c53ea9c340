//! Closed-form fits for calibration: ridge regression for a block's linear correction, and the
//! choice of a block's change scale for a target error.

use nalgebra::{DMatrix, DVector};
use ndarray::{Array2, ArrayView2};

/// A fitted correction y ≈ x·W + b, with W of shape [D_in, D_out] and the fit's error on the data
/// it was fitted on.
#[derive(Clone, Debug)]
pub struct LinearFit {
    pub weight: Array2<f32>,
    pub bias: Vec<f32>,
    /// RMS of the targets (the error of predicting zero: no correction).
    pub rms_without: f64,
    /// RMS of the residual targets − prediction.
    pub rms_with: f64,
}

/// Sufficient statistics for a least-squares fit with intercept, so calibration can stream many
/// (rows × D) batches through a D×D accumulator instead of keeping every row.
#[derive(Clone, Debug)]
pub struct RidgeAccumulator {
    rows: f64,
    sum_x: DVector<f64>,
    sum_y: DVector<f64>,
    xtx: DMatrix<f64>,
    xty: DMatrix<f64>,
    yty: f64,
}

impl RidgeAccumulator {
    pub fn new(d_in: usize, d_out: usize) -> RidgeAccumulator {
        RidgeAccumulator {
            rows: 0.0,
            sum_x: DVector::zeros(d_in),
            sum_y: DVector::zeros(d_out),
            xtx: DMatrix::zeros(d_in, d_in),
            xty: DMatrix::zeros(d_in, d_out),
            yty: 0.0,
        }
    }

    /// Adds rows of features and matching rows of targets.
    pub fn add(&mut self, features: ArrayView2<f32>, targets: ArrayView2<f32>) {
        assert_eq!(
            features.nrows(),
            targets.nrows(),
            "one target row per feature row"
        );
        let to_na = |a: ArrayView2<f32>| {
            DMatrix::from_row_iterator(a.nrows(), a.ncols(), a.iter().map(|&v| f64::from(v)))
        };
        let x = to_na(features);
        let y = to_na(targets);
        self.rows += x.nrows() as f64;
        self.sum_x += x.row_sum().transpose();
        self.sum_y += y.row_sum().transpose();
        self.xtx += x.transpose() * &x;
        self.xty += x.transpose() * &y;
        self.yty += y.norm_squared();
    }

    /// Ridge regression with intercept; the penalty is `lambda` times the mean diagonal of the
    /// centred XᵀX, so it means the same at any scale of the features.
    pub fn solve(&self, lambda: f64) -> Result<LinearFit, String> {
        if self.rows == 0.0 {
            return Err("ridge: no data".into());
        }
        let n = self.rows;
        let (d_in, d_out) = (self.xtx.nrows(), self.xty.ncols());
        let mean_x = &self.sum_x / n;
        let mean_y = &self.sum_y / n;
        let mut gram = &self.xtx - &mean_x * mean_x.transpose() * n;
        let cross = &self.xty - &mean_x * mean_y.transpose() * n;
        let mean_diag = (0..d_in).map(|i| gram[(i, i)]).sum::<f64>() / d_in as f64;
        let penalty = lambda * mean_diag.max(f64::MIN_POSITIVE);
        for i in 0..d_in {
            gram[(i, i)] += penalty;
        }
        let w = gram
            .cholesky()
            .ok_or_else(|| {
                "ridge: the regularised normal matrix is not positive definite".to_string()
            })?
            .solve(&cross);
        let b = &mean_y - w.transpose() * &mean_x;
        // Σ‖y − xW − b‖², expanded over the accumulated sums.
        let sse = self.yty - 2.0 * (w.transpose() * &self.xty).trace() - 2.0 * b.dot(&self.sum_y)
            + (w.transpose() * &self.xtx * &w).trace()
            + 2.0 * b.dot(&(w.transpose() * &self.sum_x))
            + n * b.norm_squared();
        let elements = n * d_out as f64;
        Ok(LinearFit {
            weight: Array2::from_shape_fn((d_in, d_out), |(i, j)| w[(i, j)] as f32),
            bias: b.iter().map(|&v| v as f32).collect(),
            rms_without: (self.yty / elements).sqrt(),
            rms_with: (sse.max(0.0) / elements).sqrt(),
        })
    }
}

/// Ridge regression of `targets` on `features` (rows are samples), with an intercept.
pub fn ridge(
    features: ArrayView2<f32>,
    targets: ArrayView2<f32>,
    lambda: f64,
) -> Result<LinearFit, String> {
    if features.nrows() != targets.nrows() {
        return Err(format!(
            "ridge: {} feature rows but {} target rows",
            features.nrows(),
            targets.nrows()
        ));
    }
    let mut acc = RidgeAccumulator::new(features.ncols(), targets.ncols());
    acc.add(features, targets);
    acc.solve(lambda)
}

/// One observation for choosing a change scale: the relative squared change of a block's input
/// since its reference (what the in-graph test compares against κ) and the relative error a skip
/// would have made at that point.
#[derive(Clone, Copy, Debug)]
pub struct SkipSample {
    pub relative_change_sq: f64,
    pub relative_error: f64,
}

/// The largest κ such that every skip the test would allow (relative change² ≤ κ) stays within
/// `target_error`. Returns 0 (never skip) when even the smallest change is too costly.
pub fn kappa_for_error(samples: &[SkipSample], target_error: f64) -> f64 {
    let mut sorted: Vec<SkipSample> = samples.to_vec();
    sorted.sort_by(|a, b| a.relative_change_sq.total_cmp(&b.relative_change_sq));
    let mut kappa = 0.0;
    for (i, sample) in sorted.iter().enumerate() {
        if sample.relative_error > target_error {
            break;
        }
        // Stop below the next change, so that no costlier sample with an equal change slips in.
        let next = sorted.get(i + 1).map(|s| s.relative_change_sq);
        kappa = match next {
            Some(next) if next > sample.relative_change_sq => {
                (sample.relative_change_sq + next) / 2.0
            }
            Some(_) => sample.relative_change_sq,
            None => sample.relative_change_sq * 1.0001,
        };
    }
    kappa
}

/// The κ that allows a skip in the `rate` fraction of samples with the smallest changes.
pub fn kappa_for_rate(samples: &[SkipSample], rate: f64) -> f64 {
    let mut changes: Vec<f64> = samples.iter().map(|s| s.relative_change_sq).collect();
    changes.sort_by(f64::total_cmp);
    let count = ((rate.clamp(0.0, 1.0) * changes.len() as f64).round() as usize).min(changes.len());
    match count {
        0 => 0.0,
        n => changes[n - 1] * 1.0001,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn ridge_recovers_a_known_linear_map() {
        let mut rng = StdRng::seed_from_u64(7);
        let (rows, d) = (400, 6);
        let x = Array2::from_shape_fn((rows, d), |_| rng.random_range(-1.0f32..1.0));
        let w_true =
            Array2::from_shape_fn((d, d), |(i, j)| ((i * 7 + j * 3) % 5) as f32 * 0.1 - 0.2);
        let b_true = [0.5f32, -0.25, 0.0, 1.0, 0.1, -0.3];
        let y = x.dot(&w_true) + &ndarray::ArrayView1::from(&b_true[..]);
        let fit = ridge(x.view(), y.view(), 1e-9).unwrap();
        for (a, b) in fit.weight.iter().zip(w_true.iter()) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        for (a, b) in fit.bias.iter().zip(b_true.iter()) {
            assert!((a - b).abs() < 1e-4);
        }
        assert!(fit.rms_with < 1e-4 * fit.rms_without);
    }

    #[test]
    fn streamed_batches_fit_like_one_batch_and_report_the_true_error() {
        let mut rng = StdRng::seed_from_u64(9);
        let x = Array2::from_shape_fn((300, 5), |_| rng.random_range(-1.0f32..1.0));
        let y = Array2::from_shape_fn((300, 3), |(i, j)| {
            x[(i, j)] * 0.5 + rng.random_range(-0.1f32..0.1)
        });
        let whole = ridge(x.view(), y.view(), 1e-3).unwrap();
        let mut acc = RidgeAccumulator::new(5, 3);
        for chunk in 0..3 {
            let rows = chunk * 100..(chunk + 1) * 100;
            acc.add(
                x.slice(ndarray::s![rows.clone(), ..]),
                y.slice(ndarray::s![rows, ..]),
            );
        }
        let streamed = acc.solve(1e-3).unwrap();
        for (a, b) in whole.weight.iter().zip(streamed.weight.iter()) {
            assert!((a - b).abs() < 1e-5);
        }
        // The error from the sums equals the error computed row by row.
        let residual = &y - &(x.dot(&streamed.weight) + &ndarray::ArrayView1::from(&streamed.bias));
        let direct = (residual.iter().map(|&v| (v as f64).powi(2)).sum::<f64>()
            / residual.len() as f64)
            .sqrt();
        assert!(
            (direct - streamed.rms_with).abs() < 1e-6,
            "{direct} vs {}",
            streamed.rms_with
        );
        assert!(streamed.rms_with < streamed.rms_without);
    }

    #[test]
    fn a_strong_penalty_shrinks_the_map_to_zero() {
        let mut rng = StdRng::seed_from_u64(8);
        let x = Array2::from_shape_fn((100, 4), |_| rng.random_range(-1.0f32..1.0));
        let y = x.mapv(|v| 2.0 * v);
        let fit = ridge(x.view(), y.view(), 1e9).unwrap();
        assert!(fit.weight.iter().all(|w| w.abs() < 1e-6));
    }

    #[test]
    fn kappa_stops_before_the_first_costly_skip() {
        let samples: Vec<SkipSample> = [(0.001, 0.01), (0.002, 0.02), (0.004, 0.2), (0.003, 0.03)]
            .iter()
            .map(|&(c, e)| SkipSample {
                relative_change_sq: c,
                relative_error: e,
            })
            .collect();
        let kappa = kappa_for_error(&samples, 0.05);
        assert!(kappa > 0.003 && kappa < 0.004, "{kappa}");
        assert_eq!(kappa_for_error(&samples, 0.001), 0.0);
        let half = kappa_for_rate(&samples, 0.5);
        assert!(half >= 0.002 && half < 0.003);
    }
}
