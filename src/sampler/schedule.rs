//! Noise schedules and update rules. Coefficients are computed in f64 and every element is updated
//! in f64 before it is stored back as f32, so that the sampler adds no rounding of its own beyond
//! the final store.

use anyhow::bail;

/// A discrete DDPM schedule: ᾱ_t = Π_{s≤t} (1 − β_s), t = 0..T−1.
#[derive(Clone, Debug)]
pub struct BetaSchedule {
    alphas_cumprod: Vec<f64>,
}

impl BetaSchedule {
    /// β linear from `beta_start` to `beta_end` over `train_steps` steps (DiT: 1000, 1e-4, 0.02).
    pub fn linear(train_steps: usize, beta_start: f64, beta_end: f64) -> anyhow::Result<Self> {
        if train_steps < 2 {
            bail!("the schedule needs at least 2 training timesteps, got {train_steps}");
        }
        if !(0.0 < beta_start && beta_start <= beta_end && beta_end < 1.0) {
            bail!("β must satisfy 0 < beta_start ≤ beta_end < 1, got {beta_start} and {beta_end}");
        }
        let mut alphas_cumprod = Vec::with_capacity(train_steps);
        let mut product = 1.0;
        for i in 0..train_steps {
            let beta = beta_start + (beta_end - beta_start) * i as f64 / (train_steps - 1) as f64;
            product *= 1.0 - beta;
            alphas_cumprod.push(product);
        }
        Ok(BetaSchedule { alphas_cumprod })
    }

    pub fn train_steps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// ᾱ_t; `None` (before the first step) is 1: the clean sample.
    pub fn alpha_bar(&self, t: Option<usize>) -> f64 {
        t.map_or(1.0, |t| self.alphas_cumprod[t])
    }

    /// `steps` timesteps, descending, "trailing" spacing: t_k = round(T − k·T/steps) − 1. The
    /// first step is at the last training timestep (pure noise), whatever the step count.
    pub fn timesteps(&self, steps: usize) -> anyhow::Result<Vec<usize>> {
        let train = self.train_steps();
        if steps == 0 || steps > train {
            bail!("--steps must be between 1 and {train} for this schedule, got {steps}");
        }
        Ok((0..steps)
            .map(|k| {
                let t = (train as f64 - k as f64 * train as f64 / steps as f64).round() as usize;
                t - 1
            })
            .collect())
    }
}

/// x₀ = (x − √(1−ᾱ)·ε)/√ᾱ for one element, given √ᾱ and √(1−ᾱ): what an ε model's prediction says
/// the clean sample is (DDIM, DDPM and DPM-Solver++ all start from it).
fn clean_estimate(x: f64, eps: f64, sqrt_alpha_bar: f64, sqrt_one_minus: f64) -> f64 {
    (x - sqrt_one_minus * eps) / sqrt_alpha_bar
}

/// One deterministic DDIM step (η = 0) from ᾱ_t to ᾱ_prev:
/// x₀ = (x − √(1−ᾱ_t)·ε)/√ᾱ_t, x_prev = √ᾱ_prev·x₀ + √(1−ᾱ_prev)·ε. x₀ is not clipped (latents).
pub fn ddim_step(x: &mut [f32], eps: &[f32], alpha_bar: f64, alpha_bar_prev: f64) {
    let (sa, sb) = (alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt());
    let (pa, pb) = (alpha_bar_prev.sqrt(), (1.0 - alpha_bar_prev).sqrt());
    for (x, &e) in x.iter_mut().zip(eps) {
        let (xv, ev) = (*x as f64, e as f64);
        let x0 = clean_estimate(xv, ev, sa, sb);
        *x = (pa * x0 + pb * ev) as f32;
    }
}

/// The variance of an ancestral DDPM step.
pub enum DdpmVariance<'a> {
    /// β̃_t = (1−ᾱ_prev)/(1−ᾱ_t)·β_t, the posterior variance ("fixed small").
    FixedSmall,
    /// Learned: per element v ∈ [−1, 1] from the model's variance channels interpolates
    /// log σ² = f·log β_t + (1−f)·log β̃_t with f = (v+1)/2 (improved DDPM, as DiT).
    Learned(&'a [f32]),
}

/// One ancestral DDPM step on a respaced schedule, β_t = 1 − ᾱ_t/ᾱ_prev:
/// mean = √ᾱ_prev·β_t/(1−ᾱ_t)·x₀ + √(1−β_t)·(1−ᾱ_prev)/(1−ᾱ_t)·x, plus σ·z when `noise` is given
/// (every step but the last). x₀ is not clipped.
pub fn ddpm_step(
    x: &mut [f32],
    eps: &[f32],
    variance: DdpmVariance<'_>,
    noise: Option<&[f32]>,
    alpha_bar: f64,
    alpha_bar_prev: f64,
) {
    let beta = 1.0 - alpha_bar / alpha_bar_prev;
    let posterior = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta;
    let c_x0 = alpha_bar_prev.sqrt() * beta / (1.0 - alpha_bar);
    let c_x = (1.0 - beta).sqrt() * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar);
    let (sa, sb) = (alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt());
    for i in 0..x.len() {
        let (xv, ev) = (x[i] as f64, eps[i] as f64);
        let x0 = clean_estimate(xv, ev, sa, sb);
        let mut next = c_x0 * x0 + c_x * xv;
        if let Some(noise) = noise {
            let log_var = match variance {
                DdpmVariance::FixedSmall => posterior.ln(),
                DdpmVariance::Learned(v) => {
                    let f = (v[i] as f64 + 1.0) / 2.0;
                    f * beta.ln() + (1.0 - f) * posterior.ln()
                }
            };
            next += (0.5 * log_var).exp() * noise[i] as f64;
        }
        x[i] = next as f32;
    }
}

/// Rectified-flow σ levels from 1 (noise) to 0 (data): σ_k = 1 − k/steps, k = 0..steps, then
/// shifted, σ' = shift·σ/(1 + (shift−1)·σ) (shift 1 leaves them as they are).
pub fn flow_sigmas(steps: usize, shift: f64) -> anyhow::Result<Vec<f64>> {
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    if shift <= 0.0 {
        bail!("flow_shift must be positive, got {shift}");
    }
    Ok((0..=steps)
        .map(|k| {
            let s = 1.0 - k as f64 / steps as f64;
            shift * s / (1.0 + (shift - 1.0) * s)
        })
        .collect())
}

/// One Euler step of dx/dσ = v from σ to σ_next.
pub fn euler_step(x: &mut [f32], v: &[f32], sigma: f64, sigma_next: f64) {
    let dt = sigma_next - sigma;
    for (x, &v) in x.iter_mut().zip(v) {
        *x = (*x as f64 + dt * v as f64) as f32;
    }
}

/// One step of the 2-step Adams–Bashforth method on dx/dσ = v from σ to σ_next, with
/// variable step sizes: x ← x + h·[(1 + h/(2h′))·v − h/(2h′)·v′], h = σ_next − σ, where v′ is the
/// velocity of the previous step and h′ its step size. Without a previous step it is Euler's.
pub fn ab2_step(
    x: &mut [f32],
    v: &[f32],
    previous: Option<(&[f32], f64)>,
    sigma: f64,
    sigma_next: f64,
) {
    let h = sigma_next - sigma;
    let Some((v_prev, h_prev)) = previous else {
        return euler_step(x, v, sigma, sigma_next);
    };
    let ratio = h / (2.0 * h_prev);
    for ((x, &v), &vp) in x.iter_mut().zip(v).zip(v_prev) {
        let slope = (1.0 + ratio) * v as f64 - ratio * vp as f64;
        *x = (*x as f64 + h * slope) as f32;
    }
}

/// Heun's average of the two slopes on dx/dσ = v: x ← x + h·(v + v_end)/2, where v_end is the
/// velocity at the Euler prediction x + h·v at σ_next.
pub fn heun_correct(x: &mut [f32], v: &[f32], v_end: &[f32], sigma: f64, sigma_next: f64) {
    let h = sigma_next - sigma;
    for ((x, &a), &b) in x.iter_mut().zip(v).zip(v_end) {
        *x = (*x as f64 + h * 0.5 * (a as f64 + b as f64)) as f32;
    }
}

/// λ = log(α/σ) of a point on a β schedule (α = √ᾱ, σ = √(1−ᾱ)).
fn half_log_snr(alpha_bar: f64) -> f64 {
    0.5 * (alpha_bar / (1.0 - alpha_bar)).ln()
}

/// The data prediction x₀ = (x − √(1−ᾱ)·ε)/√ᾱ of an ε model, in f64.
pub fn data_prediction(x: &[f32], eps: &[f32], alpha_bar: f64) -> Vec<f64> {
    let (sa, sb) = (alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt());
    x.iter()
        .zip(eps)
        .map(|(&x, &e)| clean_estimate(x as f64, e as f64, sa, sb))
        .collect()
}

/// One step of DPM-Solver++(2M) (Lu et al. 2022, the multistep second-order data-prediction
/// solver) from ᾱ to ᾱ_prev, given this step's x₀ and, from the second step on, the previous
/// step's x₀ and its ᾱ:
///   h = λ_prev − λ,  x ← (σ_prev/σ)·x − α_prev·(e^{−h} − 1)·D,
///   D = x₀ (first order), or (1 + 1/(2r))·x₀ − 1/(2r)·x₀′ with r = h′/h.
/// The step to the clean sample (ᾱ_prev = 1, λ = ∞) is first order and returns x₀, as the
/// solver's reference implementation does at a final σ of zero.
pub fn dpm_solver_2m_step(
    x: &mut [f32],
    x0: &[f64],
    previous: Option<(&[f64], f64)>,
    alpha_bar: f64,
    alpha_bar_prev: f64,
) {
    if alpha_bar_prev >= 1.0 {
        for (x, &d) in x.iter_mut().zip(x0) {
            *x = d as f32;
        }
        return;
    }
    let (lambda, lambda_prev) = (half_log_snr(alpha_bar), half_log_snr(alpha_bar_prev));
    let h = lambda_prev - lambda;
    let sigma_ratio = ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar)).sqrt();
    let c = -alpha_bar_prev.sqrt() * (-h).exp_m1();
    let weights = previous.map(|(x0_prev, ab_before)| {
        let r = (lambda - half_log_snr(ab_before)) / h;
        (1.0 + 0.5 / r, -0.5 / r, x0_prev)
    });
    for (i, x) in x.iter_mut().enumerate() {
        let d = match weights {
            None => x0[i],
            Some((a, b, x0_prev)) => a * x0[i] + b * x0_prev[i],
        };
        *x = (sigma_ratio * *x as f64 + c * d) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dit_schedule_ends_where_dit_says() {
        let s = BetaSchedule::linear(1000, 1e-4, 0.02).unwrap();
        assert!((s.alpha_bar(Some(0)) - (1.0 - 1e-4)).abs() < 1e-12);
        // ᾱ_999 of DiT's schedule is about 4.04e-5.
        assert!(
            (s.alpha_bar(Some(999)) - 4.035e-5).abs() < 1e-7,
            "{}",
            s.alpha_bar(Some(999))
        );
        assert_eq!(s.alpha_bar(None), 1.0);
    }

    #[test]
    fn trailing_timesteps() {
        let s = BetaSchedule::linear(1000, 1e-4, 0.02).unwrap();
        assert_eq!(
            s.timesteps(10).unwrap(),
            vec![999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
        );
        assert_eq!(s.timesteps(1).unwrap(), vec![999]);
        assert_eq!(s.timesteps(1000).unwrap().last(), Some(&0));
        assert!(s.timesteps(0).is_err());
        assert!(s.timesteps(1001).is_err());
    }

    #[test]
    fn ddim_with_the_true_noise_recovers_the_sample() {
        let (x0, eps) = (0.7f64, -1.3f64);
        let ab: f64 = 0.3;
        let mut x = [(ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps) as f32];
        ddim_step(&mut x, &[eps as f32], ab, 1.0);
        assert!((x[0] as f64 - x0).abs() < 1e-6);
    }

    #[test]
    fn ddpm_last_step_is_the_posterior_mean_at_x0() {
        let (x0, eps) = (0.25f64, 0.5f64);
        let ab: f64 = 0.9;
        let mut x = [(ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps) as f32];
        ddpm_step(
            &mut x,
            &[eps as f32],
            DdpmVariance::FixedSmall,
            None,
            ab,
            1.0,
        );
        assert!((x[0] as f64 - x0).abs() < 1e-6);
    }

    #[test]
    fn learned_variance_interpolates_between_the_bounds() {
        let (ab, abp) = (0.5, 0.8);
        let beta: f64 = 1.0 - ab / abp;
        let posterior = (1.0 - abp) / (1.0 - ab) * beta;
        for (v, var) in [(1.0f32, beta), (-1.0, posterior)] {
            let mut with_noise = [0.0f32];
            let mut without = [0.0f32];
            ddpm_step(
                &mut with_noise,
                &[0.0],
                DdpmVariance::Learned(&[v]),
                Some(&[1.0]),
                ab,
                abp,
            );
            ddpm_step(
                &mut without,
                &[0.0],
                DdpmVariance::Learned(&[v]),
                None,
                ab,
                abp,
            );
            assert!(((with_noise[0] - without[0]) as f64 - var.sqrt()).abs() < 1e-6);
        }
    }

    #[test]
    fn flow_sigmas_and_shift() {
        assert_eq!(
            flow_sigmas(4, 1.0).unwrap(),
            vec![1.0, 0.75, 0.5, 0.25, 0.0]
        );
        let shifted = flow_sigmas(2, 3.0).unwrap();
        assert_eq!(shifted[0], 1.0);
        assert!((shifted[1] - 0.75).abs() < 1e-12);
        assert_eq!(shifted[2], 0.0);
    }

    #[test]
    fn euler_with_constant_velocity_reaches_the_data() {
        let (data, noise) = (0.3f32, -0.8f32);
        let mut x = [noise];
        let sigmas = flow_sigmas(5, 1.0).unwrap();
        for w in sigmas.windows(2) {
            ddim_guard(&x);
            euler_step(&mut x, &[noise - data], w[0], w[1]);
        }
        assert!((x[0] - data).abs() < 1e-6);
    }

    #[test]
    fn ab2_is_exact_for_a_velocity_linear_in_sigma() {
        // dx/dσ = a + bσ: AB2 integrates polynomials of degree 1 in σ exactly once it has a
        // previous step (the first one, Euler, is exact for the constant part only).
        let (a, b) = (0.4f64, -1.5f64);
        let sigmas = flow_sigmas(6, 3.0).unwrap();
        let exact = |s: f64| a * s + 0.5 * b * s * s;
        let mut x = [exact(sigmas[1]) as f32];
        let mut previous: Option<(Vec<f32>, f64)> =
            Some((vec![(a + b * sigmas[0]) as f32], sigmas[1] - sigmas[0]));
        for w in sigmas[1..].windows(2) {
            let v = [(a + b * w[0]) as f32];
            ab2_step(
                &mut x,
                &v,
                previous.as_ref().map(|(p, h)| (p.as_slice(), *h)),
                w[0],
                w[1],
            );
            previous = Some((v.to_vec(), w[1] - w[0]));
        }
        assert!((x[0] as f64 - exact(0.0)).abs() < 1e-6, "{}", x[0]);
    }

    #[test]
    fn heun_is_exact_for_a_velocity_linear_in_sigma() {
        let (a, b) = (0.4f64, -1.5f64);
        let mut x = [0.0f32];
        let sigmas = flow_sigmas(3, 1.0).unwrap();
        for w in sigmas.windows(2) {
            heun_correct(
                &mut x,
                &[(a + b * w[0]) as f32],
                &[(a + b * w[1]) as f32],
                w[0],
                w[1],
            );
        }
        let exact = -(a + 0.5 * b);
        assert!((x[0] as f64 - exact).abs() < 1e-6, "{}", x[0]);
    }

    #[test]
    fn dpm_solver_first_order_is_ddim() {
        // First-order DPM-Solver++ is DDIM: same step from the same ε.
        let (ab, ab_prev) = (0.2, 0.6);
        let (x_start, eps) = ([0.9f32, -0.3], [0.5f32, 1.2]);
        let mut ddim = x_start;
        ddim_step(&mut ddim, &eps, ab, ab_prev);
        let mut dpm = x_start;
        dpm_solver_2m_step(
            &mut dpm,
            &data_prediction(&x_start, &eps, ab),
            None,
            ab,
            ab_prev,
        );
        for (a, b) in ddim.iter().zip(&dpm) {
            assert!((a - b).abs() < 1e-6, "{a} {b}");
        }
        let mut last = x_start;
        let x0 = data_prediction(&x_start, &eps, ab);
        dpm_solver_2m_step(&mut last, &x0, Some((&x0, 0.1)), ab, 1.0);
        assert_eq!(last[0], x0[0] as f32);
    }

    fn ddim_guard(x: &[f32]) {
        assert!(x.iter().all(|v| v.is_finite()));
    }
}
