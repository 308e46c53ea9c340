//! Fréchet distance between Gaussian fits of classifier features, and the classifier's accuracy.
//!
//! FD = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2·tr (Σ₁^½ Σ₂ Σ₁^½)^½
//!
//! The cross term is usually written tr (Σ₁Σ₂)^½; Σ₁Σ₂ is not symmetric, and a general matrix
//! square root of it is where implementations lose accuracy. Σ₁Σ₂ is similar to the symmetric
//! positive semi-definite M = Σ₁^½ Σ₂ Σ₁^½ (Σ₁^½ M Σ₁^-½ = Σ₁Σ₂ when Σ₁ is invertible, and by
//! continuity otherwise), so the two have the same eigenvalues, and tr (Σ₁Σ₂)^½ = Σ √λᵢ(M).
//! Both square roots are then eigen decompositions of symmetric matrices, which are stable:
//! Σ₁^½ = V·diag(√max(λ, 0))·Vᵀ. Eigenvalues below zero are rounding of a PSD matrix and are
//! clamped to 0. Everything is in f64.

use nalgebra::{DMatrix, DVector, SymmetricEigen};

/// Mean and covariance of a set of feature vectors.
#[derive(Clone, Debug)]
pub struct Gaussian {
    pub mean: DVector<f64>,
    /// Unbiased (divided by n − 1), as numpy's `np.cov` computes the reference statistics.
    pub cov: DMatrix<f64>,
    pub count: usize,
}

impl Gaussian {
    /// Fits rows of `features` ([n, F], row-major). Needs at least two rows.
    pub fn fit(features: &[f32], dim: usize) -> Gaussian {
        assert!(
            dim > 0 && features.len().is_multiple_of(dim),
            "features are not [n, {dim}]"
        );
        let n = features.len() / dim;
        assert!(n >= 2, "a covariance needs at least two samples, got {n}");
        let rows = DMatrix::from_row_iterator(n, dim, features.iter().map(|&v| f64::from(v)));
        let mean = DVector::from_iterator(dim, rows.column_iter().map(|c| c.mean()));
        let mut centred = rows;
        for mut row in centred.row_iter_mut() {
            row -= mean.transpose();
        }
        let cov = centred.transpose() * &centred / (n as f64 - 1.0);
        Gaussian {
            mean,
            cov,
            count: n,
        }
    }
}

fn symmetrise(m: &DMatrix<f64>) -> DMatrix<f64> {
    (m + m.transpose()) * 0.5
}

/// The square root of a symmetric positive semi-definite matrix (negative eigenvalues, which
/// only rounding makes, are taken as 0).
pub fn sqrt_psd(m: &DMatrix<f64>) -> DMatrix<f64> {
    let eigen = SymmetricEigen::new(symmetrise(m));
    let roots = eigen.eigenvalues.map(|l| l.max(0.0).sqrt());
    &eigen.eigenvectors * DMatrix::from_diagonal(&roots) * eigen.eigenvectors.transpose()
}

/// Fréchet distance between two Gaussians (see the module documentation).
pub fn frechet_distance(a: &Gaussian, b: &Gaussian) -> f64 {
    assert_eq!(
        a.mean.len(),
        b.mean.len(),
        "Gaussians of different dimension"
    );
    let mean_term = (&a.mean - &b.mean).norm_squared();
    let root_a = sqrt_psd(&a.cov);
    let m = symmetrise(&(&root_a * &b.cov * &root_a));
    let cross: f64 = SymmetricEigen::new(m)
        .eigenvalues
        .iter()
        .map(|&l| l.max(0.0).sqrt())
        .sum();
    let fd = mean_term + a.cov.trace() + b.cov.trace() - 2.0 * cross;
    // The distance is ≥ 0; a negative value is rounding around an exact 0.
    fd.max(0.0)
}

/// Share of rows of `logits` ([n, classes]) whose largest entry is at the given label.
pub fn accuracy(logits: &[f32], classes: usize, labels: &[i64]) -> f64 {
    assert_eq!(
        logits.len(),
        classes * labels.len(),
        "logits are not [n, {classes}]"
    );
    if labels.is_empty() {
        return f64::NAN;
    }
    let right = logits
        .chunks_exact(classes)
        .zip(labels)
        .filter(|(row, label)| {
            let best = row
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                    if v > bv { (i, v) } else { (bi, bv) }
                })
                .0;
            best as i64 == **label
        })
        .count();
    right as f64 / labels.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian(mean: &[f64], cov: DMatrix<f64>) -> Gaussian {
        Gaussian {
            mean: DVector::from_column_slice(mean),
            cov,
            count: 0,
        }
    }

    /// An orthogonal matrix: a product of plane rotations.
    fn rotation(n: usize) -> DMatrix<f64> {
        let mut q = DMatrix::identity(n, n);
        for (i, angle) in [(0usize, 0.3f64), (1, 1.1), (2, -0.7)] {
            let j = (i + 1) % n;
            let mut r = DMatrix::identity(n, n);
            r[(i, i)] = angle.cos();
            r[(j, j)] = angle.cos();
            r[(i, j)] = -angle.sin();
            r[(j, i)] = angle.sin();
            q = r * q;
        }
        q
    }

    #[test]
    fn identical_gaussians_are_at_distance_zero() {
        let q = rotation(4);
        let cov = &q
            * DMatrix::from_diagonal(&DVector::from_column_slice(&[4.0, 1.0, 0.25, 1e-6]))
            * q.transpose();
        let g = gaussian(&[1.0, -2.0, 0.5, 3.0], cov);
        let fd = frechet_distance(&g, &g);
        assert!(fd < 1e-9, "{fd}");
    }

    #[test]
    fn diagonal_covariances_have_the_closed_form() {
        // FD = ‖μ₁ − μ₂‖² + Σᵢ (√aᵢ − √bᵢ)².
        let (a, b) = ([4.0, 1.0, 9.0, 0.0], [1.0, 1.0, 2.25, 4.0]);
        let (m1, m2) = ([0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 0.0, 3.0]);
        let expected: f64 = m1
            .iter()
            .zip(&m2)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f64>()
            + a.iter()
                .zip(&b)
                .map(|(x, y): (&f64, &f64)| (x.sqrt() - y.sqrt()).powi(2))
                .sum::<f64>();
        let g1 = gaussian(&m1, DMatrix::from_diagonal(&DVector::from_column_slice(&a)));
        let g2 = gaussian(&m2, DMatrix::from_diagonal(&DVector::from_column_slice(&b)));
        let fd = frechet_distance(&g1, &g2);
        assert!((fd - expected).abs() < 1e-9, "{fd} vs {expected}");
        // Symmetric in its arguments.
        assert!((frechet_distance(&g2, &g1) - expected).abs() < 1e-9);
        // Rotating both covariances by the same orthogonal Q (non-diagonal, commuting) and both
        // means changes nothing: the full, non-diagonal path gives the same number.
        let q = rotation(4);
        let rot = |g: &Gaussian| gaussian((&q * &g.mean).as_slice(), &q * &g.cov * q.transpose());
        // One variance is 0: the root of an eigenvalue that rounding leaves at ~1e-16 instead
        // of 0 is ~1e-8, so the rotated case agrees to that, not to 1e-12.
        let fd = frechet_distance(&rot(&g1), &rot(&g2));
        assert!((fd - expected).abs() < 1e-6, "rotated: {fd} vs {expected}");
    }

    #[test]
    fn one_dimensional_gaussians() {
        // (μ₁ − μ₂)² + (σ₁ − σ₂)².
        let g1 = gaussian(&[2.0], DMatrix::from_element(1, 1, 9.0));
        let g2 = gaussian(&[-1.0], DMatrix::from_element(1, 1, 1.0));
        assert!((frechet_distance(&g1, &g2) - (9.0 + 4.0)).abs() < 1e-12);
    }

    #[test]
    fn non_commuting_covariances_match_the_eigenvalue_form() {
        // Σ₁ = diag(1, 4), Σ₂ = [[2, 1], [1, 2]]: tr (Σ₁Σ₂)^½ from the eigenvalues of the 2×2
        // product Σ₁Σ₂ = [[2, 1], [4, 8]]: λ = 5 ± √13, so the cross term is √(5+√13) + √(5−√13).
        let g1 = gaussian(
            &[0.0, 0.0],
            DMatrix::from_row_slice(2, 2, &[1.0, 0.0, 0.0, 4.0]),
        );
        let g2 = gaussian(
            &[0.0, 0.0],
            DMatrix::from_row_slice(2, 2, &[2.0, 1.0, 1.0, 2.0]),
        );
        let s13 = 13f64.sqrt();
        let expected = 5.0 + 4.0 - 2.0 * ((5.0 + s13).sqrt() + (5.0 - s13).sqrt());
        let fd = frechet_distance(&g1, &g2);
        assert!((fd - expected).abs() < 1e-12, "{fd} vs {expected}");
    }

    #[test]
    fn fit_gives_the_mean_and_unbiased_covariance() {
        // Rows (1, 2), (3, 2), (5, 8): mean (3, 4); centred (−2, −2), (0, −2), (2, 4).
        let g = Gaussian::fit(&[1.0, 2.0, 3.0, 2.0, 5.0, 8.0], 2);
        assert_eq!(g.mean.as_slice(), &[3.0, 4.0]);
        assert_eq!(g.cov, DMatrix::from_row_slice(2, 2, &[4.0, 6.0, 6.0, 12.0]));
        assert_eq!(g.count, 3);
    }

    #[test]
    fn sqrt_of_a_psd_matrix_squares_back() {
        let q = rotation(3);
        let m = &q
            * DMatrix::from_diagonal(&DVector::from_column_slice(&[9.0, 0.5, 0.0]))
            * q.transpose();
        let r = sqrt_psd(&m);
        assert!((&r * &r - &m).abs().max() < 1e-12);
    }

    #[test]
    fn accuracy_counts_argmax_hits() {
        let logits = [0.1, 0.9, 0.0, 2.0, 1.0, 0.0, 0.0, 0.0, 5.0, 1.0, 1.5, 1.2];
        assert_eq!(accuracy(&logits, 3, &[1, 0, 2, 0]), 0.75);
    }
}
