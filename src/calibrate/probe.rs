//! FastCache's statistical test, calibrated (design/method.md §1, "FastCache's test, made
//! meaningful"; the graph side is `fastcache_passes::cache::step::ProbeGate`).
//!
//! Block 0 (the probe) runs at every step. At a step s that may skip, the last two computed steps
//! a > p give the forecast of both the probe's residual r = h₀ − X and the rest of the stack's
//! residual R = H_L − h₀, F(s) = F(a) + c·(F(a) − F(p)), c = γ(s)·(s − a)/(a − p). The test
//! statistic is the probe's relative squared forecast error ε(s) = ‖r − r̂‖²/‖r‖².
//!
//! The hypothesis the test rejects before a skip is "the stack's forecast is bad here": its
//! relative error ‖R − R̂‖/‖R‖ exceeds the tolerance. A false skip is a skip at such a step. With
//! σ(s) the median of ε at step s over the calibration runs (its noise scale) and τ the
//! α-quantile of ε/σ over the bad steps, the test skips iff ε ≤ τ·σ(s): a share α of the bad
//! steps is let through. The tolerance is what sets the speed: it is searched so that the gate
//! reaches the target FLOP speedup on the calibration runs. Decisions change which steps are
//! computed and so the snapshots; the thresholds and γ are fitted over every history the gate
//! can meet, and the false-skip rate is measured on the histories it does meet.
//!
//! Everything is priced from per-run Gram matrices, as the schedule is (see [`super::schedule`]):
//! each run is one batch, as the rewritten model decides for one batch.

use super::schedule::Grams;

/// One recorded run: the Grams of the probe's residual and of the rest's residual.
#[derive(Clone, Debug)]
pub struct RunGrams {
    pub probe: Grams,
    pub rest: Grams,
}

/// The gate's parameters (what the graph's tables hold).
#[derive(Clone, Debug, PartialEq)]
pub struct Gate {
    pub forced: Vec<bool>,
    pub thresholds: Vec<f64>,
    pub gamma: Vec<f64>,
    pub max_run: usize,
}

/// A step the gate may skip, as one simulated run meets it.
#[derive(Clone, Copy, Debug)]
struct Instance {
    run: usize,
    step: usize,
    /// The last two computed steps.
    a: usize,
    p: usize,
    /// The probe's relative squared forecast error ε.
    epsilon: f64,
    /// The rest's relative forecast error ‖R − R̂‖/‖R‖.
    error: f64,
    skipped: bool,
}

fn extrapolation(run: &RunGrams, s: usize, a: usize, p: usize, gamma: f64) -> (f64, f64) {
    let c = gamma * (s - a) as f64 / (a - p) as f64;
    let weights = [1.0 + c, -c];
    let relative =
        |g: &Grams| g.squared_error(s, &[a, p], &weights) / g.gram[[s, s]].max(f64::MIN_POSITIVE);
    (relative(&run.probe), relative(&run.rest).sqrt())
}

/// Runs the gate over one recorded run: the steps it may skip, and per step whether it skipped.
fn simulate(index: usize, run: &RunGrams, gate: &Gate) -> (Vec<Instance>, Vec<bool>) {
    let steps = gate.forced.len();
    let (mut history, mut streak) = (Vec::<usize>::new(), 0usize);
    let mut instances = Vec::new();
    let mut skipped = vec![false; steps];
    for s in 0..steps {
        if !gate.forced[s] && history.len() >= 2 && streak < gate.max_run {
            let (a, p) = (history[0], history[1]);
            let (epsilon, error) = extrapolation(run, s, a, p, gate.gamma[s]);
            let skip = epsilon <= gate.thresholds[s];
            instances.push(Instance {
                run: index,
                step: s,
                a,
                p,
                epsilon,
                error,
                skipped: skip,
            });
            if skip {
                skipped[s] = true;
                streak += 1;
                continue;
            }
        }
        history.insert(0, s);
        streak = 0;
    }
    (instances, skipped)
}

/// γ(s) by least squares over the instances at each step: the step along the line through the
/// last two snapshots that best forecasts the rest's residual (1 where nothing was seen).
fn fit_gamma(runs: &[RunGrams], instances: &[Instance], steps: usize) -> Vec<f64> {
    let (mut num, mut den) = (vec![0.0; steps], vec![0.0; steps]);
    for i in instances {
        let g = &runs[i.run].rest.gram;
        let c = (i.step - i.a) as f64 / (i.a - i.p) as f64;
        let (s, a, p) = (i.step, i.a, i.p);
        // D = c·(R(a) − R(p)), T = R(s) − R(a).
        num[s] += c * (g[[a, s]] - g[[a, a]] - g[[p, s]] + g[[p, a]]);
        den[s] += c * c * (g[[a, a]] - 2.0 * g[[a, p]] + g[[p, p]]);
    }
    (0..steps)
        .map(|s| {
            if den[s] > 0.0 && (num[s] / den[s]).is_finite() {
                num[s] / den[s]
            } else {
                1.0
            }
        })
        .collect()
}

fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[values.len() / 2])
}

/// The threshold that lets through ⌊α·n⌋ of `values` (ε ≤ threshold passes): the ⌊α·n⌋-th
/// smallest, or just below the smallest when that is none; `None` when there are no values.
fn quantile(values: &mut [f64], alpha: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let k = ((alpha * values.len() as f64).floor() as usize).min(values.len());
    Some(match k {
        0 => values[0] * (1.0 - 1e-9) - f64::MIN_POSITIVE,
        k => values[k - 1],
    })
}

/// Re-prices every instance with `gamma` (same histories).
fn reprice(runs: &[RunGrams], instances: &mut [Instance], gamma: &[f64]) {
    for i in instances.iter_mut() {
        (i.epsilon, i.error) = extrapolation(&runs[i.run], i.step, i.a, i.p, gamma[i.step]);
    }
}

/// Every (step, last two computed steps) the gate can meet on `runs` with skip runs of at most
/// `max_run`: s − a ≤ max_run, a − p ≤ max_run + 1.
fn possible_instances(runs: &[RunGrams], forced: &[bool], max_run: usize) -> Vec<Instance> {
    let mut instances = Vec::new();
    for (index, run) in runs.iter().enumerate() {
        for s in (0..forced.len()).filter(|&s| !forced[s]) {
            for a in s.saturating_sub(max_run)..s {
                for p in a.saturating_sub(max_run + 1)..a {
                    let (epsilon, error) = extrapolation(run, s, a, p, 1.0);
                    instances.push(Instance {
                        run: index,
                        step: s,
                        a,
                        p,
                        epsilon,
                        error,
                        skipped: false,
                    });
                }
            }
        }
    }
    instances
}

/// The gate for `tolerance` at level `alpha` on `runs`. It is fitted over every history it can
/// meet (see [`possible_instances`]) rather than the ones its own decisions lead to, which would
/// make the thresholds chase themselves: strict thresholds compute often, short gaps forecast
/// well, no step looks bad, and the thresholds open again.
pub fn gate_for(
    runs: &[RunGrams],
    forced: &[bool],
    max_run: usize,
    alpha: f64,
    tolerance: f64,
) -> Gate {
    let steps = forced.len();
    let mut instances = possible_instances(runs, forced, max_run);
    let gamma = fit_gamma(runs, &instances, steps);
    reprice(runs, &mut instances, &gamma);
    let sigma: Vec<f64> = (0..steps)
        .map(|s| {
            let mut at: Vec<f64> = instances
                .iter()
                .filter(|i| i.step == s)
                .map(|i| i.epsilon)
                .collect();
            median(&mut at).unwrap_or(0.0).max(1e-12)
        })
        .collect();
    let mut bad: Vec<f64> = instances
        .iter()
        .filter(|i| i.error > tolerance)
        .map(|i| i.epsilon / sigma[i.step])
        .collect();
    let tau = quantile(&mut bad, alpha).unwrap_or(f64::INFINITY);
    Gate {
        forced: forced.to_vec(),
        thresholds: sigma.iter().map(|&sg| tau * sg).collect(),
        gamma,
        max_run,
    }
}

fn simulate_all(runs: &[RunGrams], gate: &Gate) -> (Vec<Instance>, Vec<Vec<bool>>) {
    let mut instances = Vec::new();
    let mut decisions = Vec::new();
    for (index, run) in runs.iter().enumerate() {
        let (found, skipped) = simulate(index, run, gate);
        instances.extend(found);
        decisions.push(skipped);
    }
    (instances, decisions)
}

/// What a gate does on a set of runs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Outcome {
    /// Mean FLOP speedup over the runs, as the bench counts it.
    pub speedup: f64,
    /// The test's false-skip rate: over every history the gate can meet on these runs, the
    /// (step, history) cases whose stack forecast is worse than the tolerance, and how many of
    /// them pass the test.
    pub bad_cases: usize,
    pub passed_bad_cases: usize,
    /// In the runs as the gate makes them: steps it could skip whose stack forecast was worse
    /// than the tolerance, and how many of them it skipped.
    pub bad_steps: usize,
    pub false_skips: usize,
    /// Mean relative forecast error of the rest over the skipped steps.
    pub skipped_error: f64,
    pub skip_rate: f64,
}

impl Outcome {
    /// The test's false-skip rate (what α states).
    pub fn false_skip_rate(&self) -> Option<f64> {
        (self.bad_cases > 0).then(|| self.passed_bad_cases as f64 / self.bad_cases as f64)
    }
}

/// Runs `gate` over `runs`; `speedup_of` prices one run's skipped steps.
pub fn outcome(
    runs: &[RunGrams],
    gate: &Gate,
    tolerance: f64,
    speedup_of: &dyn Fn(&[bool]) -> f64,
) -> Outcome {
    let (instances, decisions) = simulate_all(runs, gate);
    let bad: Vec<&Instance> = instances.iter().filter(|i| i.error > tolerance).collect();
    let skipped: Vec<&Instance> = instances.iter().filter(|i| i.skipped).collect();
    let steps = gate.forced.len().max(1);
    let mut cases = possible_instances(runs, &gate.forced, gate.max_run);
    reprice(runs, &mut cases, &gate.gamma);
    let bad_cases: Vec<&Instance> = cases.iter().filter(|i| i.error > tolerance).collect();
    Outcome {
        speedup: decisions.iter().map(|d| speedup_of(d)).sum::<f64>() / runs.len().max(1) as f64,
        bad_cases: bad_cases.len(),
        passed_bad_cases: bad_cases
            .iter()
            .filter(|i| i.epsilon <= gate.thresholds[i.step])
            .count(),
        bad_steps: bad.len(),
        false_skips: bad.iter().filter(|i| i.skipped).count(),
        skipped_error: skipped.iter().map(|i| i.error).sum::<f64>() / skipped.len().max(1) as f64,
        skip_rate: skipped.len() as f64 / (steps * runs.len().max(1)) as f64,
    }
}

/// The smallest tolerance whose gate reaches `target` on `runs` (a bisection in log scale over
/// the errors seen), with that gate; `None` when even skipping every allowed step falls short.
pub fn for_speedup(
    runs: &[RunGrams],
    forced: &[bool],
    max_run: usize,
    alpha: f64,
    target: f64,
    speedup_of: &dyn Fn(&[bool]) -> f64,
) -> Option<(f64, Gate)> {
    let open = gate_for(runs, forced, max_run, alpha, f64::INFINITY);
    if outcome(runs, &open, f64::INFINITY, speedup_of).speedup < target {
        return None;
    }
    let speed = |tolerance: f64| {
        let gate = gate_for(runs, forced, max_run, alpha, tolerance);
        let speedup = outcome(runs, &gate, tolerance, speedup_of).speedup;
        (speedup, gate)
    };
    let (mut low, mut high) = (1e-6f64.ln(), 10f64.ln());
    if speed(high.exp()).0 < target {
        return Some((f64::INFINITY, open));
    }
    for _ in 0..40 {
        let mid = 0.5 * (low + high);
        if speed(mid.exp()).0 >= target {
            high = mid;
        } else {
            low = mid;
        }
    }
    let tolerance = high.exp();
    Some((tolerance, speed(tolerance).1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    /// Runs whose residuals move along smooth curves with run-specific noise at some steps.
    fn runs(count: usize, steps: usize) -> Vec<RunGrams> {
        (0..count)
            .map(|r| {
                let noise = |s: usize, i: usize, j: usize| {
                    let h = (r * 7919 + s * 104729 + i * 31 + j * 17) as f64;
                    ((h.sin() * 43758.5453).fract() - 0.5) as f32
                };
                let curve = |s: usize, scale: f32, seed: usize| -> Array2<f32> {
                    Array2::from_shape_fn((6, 4), |(i, j)| {
                        let t = s as f32 / steps as f32;
                        let bumpy = f32::from(u8::from((r + s).is_multiple_of(5)));
                        (i as f32 + 1.0) * (1.0 + t * t)
                            + (j as f32) * t
                            + scale * (0.02 + 0.3 * bumpy) * noise(s, i + seed, j)
                    })
                };
                let mut probe = Grams::new(steps);
                let mut rest = Grams::new(steps);
                probe.add_run(&(0..steps).map(|s| curve(s, 1.0, 0)).collect::<Vec<_>>());
                rest.add_run(&(0..steps).map(|s| curve(s, 1.0, 3)).collect::<Vec<_>>());
                RunGrams { probe, rest }
            })
            .collect()
    }

    fn forced(steps: usize) -> Vec<bool> {
        (0..steps).map(|s| s < 2 || s + 1 == steps).collect()
    }

    #[test]
    fn the_quantile_lets_through_the_stated_share() {
        let mut values: Vec<f64> = (1..=100).map(f64::from).collect();
        let tau = quantile(&mut values, 0.1).unwrap();
        assert_eq!(values.iter().filter(|&&v| v <= tau).count(), 10);
        let tau = quantile(&mut values, 0.0).unwrap();
        assert_eq!(values.iter().filter(|&&v| v <= tau).count(), 0);
    }

    #[test]
    fn on_its_own_runs_the_gate_lets_through_alpha_of_the_bad_steps() {
        let steps = 30;
        let runs = runs(12, steps);
        let flat = |skipped: &[bool]| {
            skipped.len() as f64 / skipped.iter().filter(|&&s| !s).count().max(1) as f64
        };
        let (tolerance, gate) = for_speedup(&runs, &forced(steps), 3, 0.2, 1.6, &flat).unwrap();
        let seen = outcome(&runs, &gate, tolerance, &flat);
        assert!(seen.speedup >= 1.6, "{seen:?}");
        let rate = seen.false_skip_rate().unwrap();
        assert!((0.1..=0.3).contains(&rate), "{seen:?}");
        // A tighter α lets fewer bad steps through.
        let strict = gate_for(&runs, &forced(steps), 3, 0.05, tolerance);
        let strict = outcome(&runs, &strict, tolerance, &flat);
        assert!(
            strict.false_skips < seen.false_skips,
            "{strict:?} vs {seen:?}"
        );
        // No run is skipped more than the cap allows, and the forced steps always compute.
        let (_, decisions) = simulate_all(&runs, &gate);
        for d in decisions {
            assert!(!d[0] && !d[1] && !d[steps - 1]);
            assert!(d.split(|&s| !s).all(|skips| skips.len() <= 3));
        }
    }

    #[test]
    fn an_unreachable_speedup_is_refused() {
        let steps = 12;
        let runs = runs(4, steps);
        let flat = |skipped: &[bool]| {
            skipped.len() as f64 / skipped.iter().filter(|&&s| !s).count().max(1) as f64
        };
        assert!(for_speedup(&runs, &forced(steps), 1, 0.1, 3.0, &flat).is_none());
    }
}
