//! FastCache's per-step policy, calibrated (design/method.md §1): which steps compute the block
//! stack, and how a skipped step forecasts the stack's residual R = H_L − X from the last
//! computed ones.
//!
//! Everything here works on Gram matrices of the recorded residuals, G[s][t] = Σ ⟨R(s), R(t)⟩
//! over the runs: the squared error of any linear forecast R̂(s) = Σ_k w_k R(τ_k) is a quadratic
//! form in G, so every (skipped step, snapshots, forecaster) is priced without touching a tensor
//! again, and the search over schedules is a dynamic programme over those prices.
//!
//! The schedule is searched on half of the runs and its forecast error measured on the other
//! half, for each forecaster (reuse, Lagrange extrapolation in the step index, least squares);
//! the forecaster with the lowest held-out error wins and the schedule is searched again on all
//! runs with it.

use ndarray::Array2;

/// Σ over runs of ⟨R(s), R(t)⟩, and the number of elements summed.
#[derive(Clone, Debug)]
pub struct Grams {
    pub gram: Array2<f64>,
    pub elements: f64,
}

impl Grams {
    pub fn new(steps: usize) -> Grams {
        Grams {
            gram: Array2::zeros((steps, steps)),
            elements: 0.0,
        }
    }

    /// Adds one run's residuals, one [rows, D] tensor per step.
    pub fn add_run(&mut self, residuals: &[Array2<f32>]) {
        let steps = residuals.len();
        for s in 0..steps {
            for t in s..steps {
                let dot: f64 = residuals[s]
                    .iter()
                    .zip(residuals[t].iter())
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                self.gram[[s, t]] += dot;
                self.gram[[t, s]] = self.gram[[s, t]];
            }
        }
        self.elements += residuals.first().map_or(0, |r| r.len()) as f64;
    }

    pub fn sum(&self, other: &Grams) -> Grams {
        Grams {
            gram: &self.gram + &other.gram,
            elements: self.elements + other.elements,
        }
    }

    fn steps(&self) -> usize {
        self.gram.nrows()
    }

    /// ‖R(s) − Σ_k w_k R(τ_k)‖², summed over the runs.
    pub(crate) fn squared_error(&self, s: usize, snapshots: &[usize], weights: &[f64]) -> f64 {
        let g = &self.gram;
        let mut error = g[[s, s]];
        for (k, (&tk, &wk)) in snapshots.iter().zip(weights).enumerate() {
            error -= 2.0 * wk * g[[s, tk]];
            for (&tl, &wl) in snapshots.iter().zip(weights).skip(k) {
                let both = if tl == tk { 1.0 } else { 2.0 };
                error += both * wk * wl * g[[tk, tl]];
            }
        }
        error.max(0.0)
    }

    /// The RMS error per element of a forecast (what the search adds up).
    fn rms_error(&self, s: usize, snapshots: &[usize], weights: &[f64]) -> f64 {
        (self.squared_error(s, snapshots, weights) / self.elements.max(1.0)).sqrt()
    }

    /// The error relative to the residual's own size, ‖R − R̂‖ / ‖R‖ (what the report states).
    fn relative_error(&self, s: usize, snapshots: &[usize], weights: &[f64]) -> f64 {
        (self.squared_error(s, snapshots, weights) / self.gram[[s, s]].max(f64::MIN_POSITIVE))
            .sqrt()
    }
}

/// How a skipped step's residual is made from the snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Forecaster {
    /// R̂(s) = R(a), a the last computed step (FORA, the peers' approximation).
    Reuse,
    /// The line through R(p) and R(a), the last two computed steps, evaluated at s.
    Lagrange,
    /// R̂(s) = R(a) + γ·(R(a) − R(p)) with γ fitted by least squares per step on the
    /// calibration runs: FastCache's learnable linear approximation, applied along time.
    LeastSquares,
    /// The same with a second difference: R(a) + γ₁·(R(a) − R(p)) + γ₂·(R(p) − R(q)), q the
    /// third last computed step (two fitted weights per step; where only two steps have been
    /// computed, the one-weight fit). Its schedule is the one-weight fit's.
    LeastSquares3,
}

impl Forecaster {
    pub const ALL: [Forecaster; 4] = [
        Forecaster::Reuse,
        Forecaster::Lagrange,
        Forecaster::LeastSquares,
        Forecaster::LeastSquares3,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Forecaster::Reuse => "reuse",
            Forecaster::Lagrange => "lagrange",
            Forecaster::LeastSquares => "least_squares",
            Forecaster::LeastSquares3 => "least_squares_3",
        }
    }

    /// Snapshots it reads.
    pub fn order(self) -> usize {
        match self {
            Forecaster::Reuse => 1,
            Forecaster::Lagrange | Forecaster::LeastSquares => 2,
            Forecaster::LeastSquares3 => 3,
        }
    }

    /// The forecaster whose prices the schedule search uses (the search's state holds the last
    /// two computed steps).
    fn searched_as(self) -> Forecaster {
        match self {
            Forecaster::LeastSquares3 => Forecaster::LeastSquares,
            other => other,
        }
    }

    /// The snapshots (computed steps, most recent first) and their weights at step s, given the
    /// computed steps before it, most recent first (at least two); `fit` supplies the Gram the
    /// least-squares weights are fitted on.
    fn forecast(self, history: &[usize], s: usize, fit: &Grams) -> (Vec<usize>, Vec<f64>) {
        let (a, p) = (history[0], history[1]);
        match self {
            Forecaster::Reuse => (vec![a], vec![1.0]),
            Forecaster::Lagrange => {
                let h = (s - a) as f64 / (a - p) as f64;
                (vec![a, p], vec![1.0 + h, -h])
            }
            Forecaster::LeastSquares => {
                let g = fit.differences(s, &[a, p]);
                let gamma = solve_normal(&g.0, &g.1);
                (vec![a, p], vec![1.0 + gamma[0], -gamma[0]])
            }
            Forecaster::LeastSquares3 => {
                let Some(&q) = history.get(2) else {
                    return Forecaster::LeastSquares.forecast(history, s, fit);
                };
                let g = fit.differences(s, &[a, p, q]);
                let gamma = solve_normal(&g.0, &g.1);
                (
                    vec![a, p, q],
                    vec![1.0 + gamma[0], gamma[1] - gamma[0], -gamma[1]],
                )
            }
        }
    }
}

impl Grams {
    /// The normal equations of fitting R(s) − R(τ₀) by the differences D_i = R(τ_i) − R(τ_{i+1})
    /// of consecutive snapshots: (⟨D_i, D_j⟩, ⟨D_i, R(s) − R(τ₀)⟩).
    fn differences(&self, s: usize, snapshots: &[usize]) -> (Vec<Vec<f64>>, Vec<f64>) {
        let g = &self.gram;
        let dot = |a: (usize, usize), b: (usize, usize)| {
            g[[a.0, b.0]] - g[[a.0, b.1]] - g[[a.1, b.0]] + g[[a.1, b.1]]
        };
        let diffs: Vec<(usize, usize)> = snapshots.windows(2).map(|w| (w[0], w[1])).collect();
        let target = (s, snapshots[0]);
        let matrix = diffs
            .iter()
            .map(|&d| diffs.iter().map(|&e| dot(d, e)).collect())
            .collect();
        let rhs = diffs.iter().map(|&d| dot(d, target)).collect();
        (matrix, rhs)
    }
}

/// Solves a 1×1 or 2×2 system, with a ridge of 1e-9 of the trace so that a degenerate one (two
/// equal snapshots) gives small weights rather than none.
fn solve_normal(matrix: &[Vec<f64>], rhs: &[f64]) -> Vec<f64> {
    let trace: f64 = (0..rhs.len()).map(|i| matrix[i][i]).sum();
    let ridge = 1e-9 * trace.max(f64::MIN_POSITIVE);
    match rhs.len() {
        1 => vec![rhs[0] / (matrix[0][0] + ridge)],
        _ => {
            let (a, b, c, d) = (
                matrix[0][0] + ridge,
                matrix[0][1],
                matrix[1][0],
                matrix[1][1] + ridge,
            );
            let det = a * d - b * c;
            if det.abs() <= f64::MIN_POSITIVE {
                return vec![0.0, 0.0];
            }
            vec![
                (d * rhs[0] - b * rhs[1]) / det,
                (a * rhs[1] - c * rhs[0]) / det,
            ]
        }
    }
}

/// What the search must respect.
#[derive(Clone, Copy, Debug)]
pub struct Constraints {
    /// Steps computed in all.
    pub budget: usize,
    /// The first `warmup` steps compute (at least 2: a forecast needs two snapshots).
    pub warmup: usize,
    /// The last `cooldown` steps compute.
    pub cooldown: usize,
    /// Most consecutive skipped steps.
    pub max_run: usize,
}

/// The cheapest compute mask under `constraints`, `cost(p, a, s)` the price of forecasting step s
/// from the computed steps p < a; `None` when no mask meets them.
fn search(
    steps: usize,
    constraints: Constraints,
    cost: &dyn Fn(usize, usize, usize) -> f64,
) -> Option<Vec<bool>> {
    let Constraints {
        budget,
        warmup,
        cooldown,
        max_run,
    } = constraints;
    let warmup = warmup.max(2);
    if budget >= steps {
        return Some(vec![true; steps]);
    }
    if budget < warmup + cooldown.max(1) || warmup >= steps {
        return None;
    }
    // best[c][a][p]: least cost with c steps computed, the last two p < a.
    let index = |c: usize, a: usize, p: usize| (c * steps + a) * steps + p;
    let mut best = vec![f64::INFINITY; (budget + 1) * steps * steps];
    let mut back = vec![usize::MAX; best.len()];
    best[index(warmup, warmup - 1, warmup - 2)] = 0.0;
    let protected = steps - cooldown.max(1);
    for c in warmup..budget {
        for a in warmup - 1..steps - 1 {
            for p in 0..a {
                let here = best[index(c, a, p)];
                if !here.is_finite() {
                    continue;
                }
                let mut segment = 0.0;
                let last = if a + 1 >= protected {
                    a + 1
                } else {
                    (a + 1 + max_run).min(steps - 1)
                };
                for b in a + 1..=last {
                    let next = index(c + 1, b, a);
                    if here + segment < best[next] {
                        best[next] = here + segment;
                        back[next] = p;
                    }
                    if b >= protected {
                        break;
                    }
                    segment += cost(p, a, b);
                }
            }
        }
    }
    let (mut a, mut p) = (steps - 1, None);
    let mut least = f64::INFINITY;
    for q in 0..steps - 1 {
        if best[index(budget, a, q)] < least {
            least = best[index(budget, a, q)];
            p = Some(q);
        }
    }
    let mut p = p?;
    let mut compute = vec![false; steps];
    compute[..warmup].fill(true);
    let mut c = budget;
    while c > warmup {
        compute[a] = true;
        let before = back[index(c, a, p)];
        (a, p, c) = (p, before, c - 1);
    }
    Some(compute)
}

/// The computed steps before each step, most recent first, where there are at least two.
fn histories(compute: &[bool]) -> Vec<Option<Vec<usize>>> {
    let mut history: Vec<usize> = Vec::new();
    compute
        .iter()
        .enumerate()
        .map(|(s, &c)| {
            let before = (history.len() >= 2).then(|| history.iter().rev().copied().collect());
            if c {
                history.push(s);
            }
            before
        })
        .collect()
}

/// The forecast weights of every step of a mask (computed steps: zeros), fitted on `fit`, each
/// row as long as the forecaster's order.
pub fn weights_of(compute: &[bool], forecaster: Forecaster, fit: &Grams) -> Vec<Vec<f32>> {
    histories(compute)
        .into_iter()
        .zip(compute)
        .enumerate()
        .map(|(s, (history, &c))| {
            let mut row = vec![0.0; forecaster.order()];
            if let (false, Some(history)) = (c, history) {
                let (_, weights) = forecaster.forecast(&history, s, fit);
                for (slot, w) in row.iter_mut().zip(weights) {
                    *slot = w as f32;
                }
            }
            row
        })
        .collect()
}

/// Σ over skipped steps of the RMS forecast error on `eval`, and the mean relative error, with
/// weights fitted on `fit`.
fn mask_error(compute: &[bool], forecaster: Forecaster, fit: &Grams, eval: &Grams) -> (f64, f64) {
    let (mut total, mut relative, mut count) = (0.0, 0.0, 0usize);
    for (s, history) in histories(compute).into_iter().enumerate() {
        if let (false, Some(history)) = (compute[s], history) {
            let (snapshots, weights) = forecaster.forecast(&history, s, fit);
            total += eval.rms_error(s, &snapshots, &weights);
            relative += eval.relative_error(s, &snapshots, &weights);
            count += 1;
        }
    }
    (total, relative / count.max(1) as f64)
}

/// One forecaster's showing in the held-out comparison.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Candidate {
    pub forecaster: Forecaster,
    /// Mean relative forecast error ‖R − R̂‖/‖R‖ over the skipped steps of the schedule it chose
    /// on the fitting half, measured on the held-out half.
    pub held_out_relative_error: f64,
    /// The sum the search minimises, on the held-out half.
    pub held_out_cost: f64,
}

/// The calibrated schedule.
#[derive(Clone, Debug)]
pub struct Choice {
    pub compute: Vec<bool>,
    pub weights: Vec<Vec<f32>>,
    pub forecaster: Forecaster,
    pub candidates: Vec<Candidate>,
    /// Mean relative forecast error over the skipped steps, on all runs (in sample).
    pub relative_error: f64,
}

fn cost_of<'a>(forecaster: Forecaster, fit: &'a Grams) -> impl Fn(usize, usize, usize) -> f64 + 'a {
    let forecaster = forecaster.searched_as();
    move |p, a, s| {
        let (snapshots, weights) = forecaster.forecast(&[a, p], s, fit);
        fit.rms_error(s, &snapshots, &weights)
    }
}

/// Chooses the forecaster on held-out runs, then the schedule on all of them.
/// `halves`: the Grams of two disjoint sets of runs.
pub fn choose(halves: [&Grams; 2], constraints: Constraints) -> Result<Choice, String> {
    let steps = halves[0].steps();
    let all = halves[0].sum(halves[1]);
    let infeasible = || {
        format!(
            "no schedule of {steps} steps computes {} of them with the first {} and the last {} computed and at most {} skipped in a row",
            constraints.budget,
            constraints.warmup.max(2),
            constraints.cooldown.max(1),
            constraints.max_run
        )
    };
    let mut candidates = Vec::new();
    for forecaster in Forecaster::ALL {
        // Fit on one half, measure on the other, both ways round.
        let (mut cost, mut relative) = (0.0, 0.0);
        for (fit, eval) in [(halves[0], halves[1]), (halves[1], halves[0])] {
            let mask =
                search(steps, constraints, &cost_of(forecaster, fit)).ok_or_else(infeasible)?;
            let (c, r) = mask_error(&mask, forecaster, fit, eval);
            cost += c / 2.0;
            relative += r / 2.0;
        }
        candidates.push(Candidate {
            forecaster,
            held_out_relative_error: relative,
            held_out_cost: cost,
        });
    }
    let forecaster = candidates
        .iter()
        .min_by(|a, b| a.held_out_cost.total_cmp(&b.held_out_cost))
        .expect("every forecaster is a candidate")
        .forecaster;
    let compute = search(steps, constraints, &cost_of(forecaster, &all)).ok_or_else(infeasible)?;
    let weights = weights_of(&compute, forecaster, &all);
    let (_, relative_error) = mask_error(&compute, forecaster, &all, &all);
    Ok(Choice {
        compute,
        weights,
        forecaster,
        candidates,
        relative_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Grams of residuals that move along a straight line in time, R(s) = A + s·B, plus a kink.
    fn line_grams(steps: usize) -> Grams {
        let mut grams = Grams::new(steps);
        let residuals: Vec<Array2<f32>> = (0..steps)
            .map(|s| {
                Array2::from_shape_fn((4, 3), |(i, j)| {
                    let s = s as f32;
                    (i as f32 + 1.0) + s * (j as f32 - 1.0) * 0.1
                })
            })
            .collect();
        grams.add_run(&residuals);
        grams
    }

    #[test]
    fn a_straight_line_is_forecast_exactly_and_reuse_is_not() {
        let grams = line_grams(10);
        let (snapshots, lagrange) = Forecaster::Lagrange.forecast(&[4, 2], 7, &grams);
        assert!(grams.rms_error(7, &snapshots, &lagrange) < 1e-6);
        let (_, fitted) = Forecaster::LeastSquares.forecast(&[4, 2], 7, &grams);
        assert!(
            (fitted[0] - lagrange[0]).abs() < 1e-6,
            "{fitted:?} vs {lagrange:?}"
        );
        let (snapshots, fitted) = Forecaster::LeastSquares3.forecast(&[4, 2, 1], 7, &grams);
        assert!(grams.rms_error(7, &snapshots, &fitted) < 1e-6, "{fitted:?}");
        assert!((fitted.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(grams.rms_error(7, &[4], &[1.0]) > 0.1);
    }

    #[test]
    fn the_search_meets_its_constraints_and_protects_the_ends() {
        let grams = line_grams(20);
        let constraints = Constraints {
            budget: 8,
            warmup: 3,
            cooldown: 2,
            max_run: 4,
        };
        let mask = search(20, constraints, &cost_of(Forecaster::Reuse, &grams)).unwrap();
        assert_eq!(mask.iter().filter(|&&c| c).count(), 8, "{mask:?}");
        assert!(
            mask[..3].iter().all(|&c| c) && mask[18..].iter().all(|&c| c),
            "{mask:?}"
        );
        let mut run = 0;
        for &c in &mask {
            run = if c { 0 } else { run + 1 };
            assert!(run <= 4, "{mask:?}");
        }
        // Too small a budget for the cap is refused, not stretched.
        let tight = Constraints {
            budget: 5,
            max_run: 2,
            ..constraints
        };
        assert!(search(20, tight, &cost_of(Forecaster::Reuse, &grams)).is_none());
    }

    #[test]
    fn the_search_finds_the_cheapest_mask_by_brute_force() {
        // Costs that prefer skipping late steps, checked against every mask of 10 steps.
        let steps = 10;
        let cost = |p: usize, a: usize, s: usize| ((s - a) * (a - p)) as f64 / (s as f64 + 1.0);
        let constraints = Constraints {
            budget: 5,
            warmup: 2,
            cooldown: 1,
            max_run: 3,
        };
        let found = search(steps, constraints, &cost).unwrap();
        let price = |mask: &[bool]| -> f64 {
            histories(mask)
                .iter()
                .enumerate()
                .filter(|(s, _)| !mask[*s])
                .map(|(s, history)| {
                    let history = history.as_ref().unwrap();
                    cost(history[1], history[0], s)
                })
                .sum()
        };
        let mut least = f64::INFINITY;
        for bits in 0u32..(1 << steps) {
            let mask: Vec<bool> = (0..steps).map(|i| bits >> i & 1 == 1).collect();
            let run_ok = mask
                .split(|&c| c)
                .all(|gap| gap.len() <= constraints.max_run);
            if mask.iter().filter(|&&c| c).count() == 5 && mask[0] && mask[1] && mask[9] && run_ok {
                least = least.min(price(&mask));
            }
        }
        assert!(
            (price(&found) - least).abs() < 1e-12,
            "{found:?}: {} vs {least}",
            price(&found)
        );
    }
}
