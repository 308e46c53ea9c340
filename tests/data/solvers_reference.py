"""Independent second-order solver references for tests/sampler.rs.

Samples with ONNX Runtime from Python and writes, for each solver, the initial noise, the class
labels and x after every step, to an .npz (the test runs this script and compares):

    .venv/bin/python tests/data/solvers_reference.py --output OUT.npz

Written from the methods' papers, not from fastcache's code:
- Heun (the explicit trapezoidal rule) and the two-step Adams-Bashforth method on the rectified
  flow ODE dx/dsigma = v(x, sigma), sigma_k = 1 - k/steps, on the trained MNIST DiT
  (models/trained/mnist_dit.onnx: timestep input 999 sigma, null class 10), 6 steps, batch 2,
  CFG 1.5. Heun evaluates v at the end of every step, sigma = 0 included (12 calls). AB2 starts
  with one Euler step and then extrapolates the velocity linearly in sigma.
- DPM-Solver++(2M) (Lu et al. 2022, "multistep second-order solver" with data prediction) on
  the DiT fixture (models/fixtures/dit_ts.onnx, epsilon with learned sigma, DiT's linear beta
  schedule, trailing timesteps 999, 899, ...), 10 steps, batch 2, CFG 4. Written with
  sigma_t = sqrt(1 - abar) / sqrt(abar) (the "VE" form, x_hat = x / alpha), the first and the
  final step (to the clean sample) of first order.
Arithmetic in float64, x stored as float32 after every step.
"""

import argparse
import pathlib

import numpy as np
import onnxruntime as ort

ROOT = pathlib.Path(__file__).resolve().parents[2]
MNIST = ROOT / "models" / "trained" / "mnist_dit.onnx"
DIT = ROOT / "models" / "fixtures" / "dit_ts.onnx"
LABELS = np.array([3, 7], dtype=np.int64)
NULL_CLASS = 10


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def guided(sess, x, t, cfg, channels, t_dtype):
    """The guided prediction: one call on [cond, uncond] with the null class."""
    b = len(x)
    out = sess.run(["sample"], {
        "hidden_states": np.concatenate([x, x]).astype(np.float32),
        "timestep": np.full(2 * b, t, dtype=t_dtype),
        "class_labels": np.concatenate([LABELS, np.full(b, NULL_CLASS, dtype=np.int64)]),
    })[0].astype(np.float64)[:, :channels]
    return out[b:] + cfg * (out[:b] - out[b:])


def flow_velocity(sess, x, sigma, cfg):
    return guided(sess, x, sigma * 999.0, cfg, 1, np.float32)


def heun(sess, x, steps, cfg):
    sigmas = 1.0 - np.arange(steps + 1) / steps
    history = []
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        h = s_next - s
        k1 = flow_velocity(sess, x, s, cfg)
        predicted = (x.astype(np.float64) + h * k1).astype(np.float32)
        k2 = flow_velocity(sess, predicted, s_next, cfg)
        x = (x.astype(np.float64) + h * (k1 + k2) / 2.0).astype(np.float32)
        history.append(x)
    return np.stack(history)


def adams_bashforth2(sess, x, steps, cfg):
    sigmas = 1.0 - np.arange(steps + 1) / steps
    history, previous = [], None
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        h = s_next - s
        f = flow_velocity(sess, x, s, cfg)
        if previous is None:
            increment = h * f
        else:
            f_prev, h_prev = previous
            # Integrate the line through (s - h_prev, f_prev) and (s, f) over [s, s + h].
            slope = (f - f_prev) / h_prev
            increment = h * f + 0.5 * h * h * slope
        x = (x.astype(np.float64) + increment).astype(np.float32)
        previous = (f, h)
        history.append(x)
    return np.stack(history)


def dpm_solver_pp_2m(sess, x, steps, cfg):
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    timesteps = np.round(np.arange(1000, 0, -1000 / steps)).astype(np.int64) - 1
    history, previous = [], None
    for k, t in enumerate(timesteps):
        eps = guided(sess, x, t, cfg, 4, np.int64)
        a_t = abar[t]
        x0 = (x.astype(np.float64) - np.sqrt(1.0 - a_t) * eps) / np.sqrt(a_t)
        if k + 1 == len(timesteps):
            x = x0.astype(np.float32)  # to the clean sample: first order
        else:
            a_s = abar[timesteps[k + 1]]
            # VE form: x_hat = x / alpha, sigma_hat = sqrt(1 - abar) / sqrt(abar), and
            # x_hat(s) = x_hat(t) + (sigma_hat_s - sigma_hat_t)/sigma_hat_t (x_hat(t) - D).
            sig_t, sig_s = np.sqrt((1 - a_t) / a_t), np.sqrt((1 - a_s) / a_s)
            lam_t, lam_s = -np.log(sig_t), -np.log(sig_s)
            h = lam_s - lam_t
            if previous is None:
                d = x0
            else:
                x0_prev, lam_prev = previous
                r = (lam_t - lam_prev) / h
                d = x0 + (x0 - x0_prev) / (2.0 * r)
            x_hat = x.astype(np.float64) / np.sqrt(a_t)
            x_hat_next = (sig_s / sig_t) * x_hat + (1.0 - sig_s / sig_t) * d
            x = (np.sqrt(a_s) * x_hat_next).astype(np.float32)
            previous = (x0, lam_t)
        history.append(x)
    return np.stack(history)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=pathlib.Path, required=True)
    args = parser.parse_args()
    rng = np.random.default_rng(20261201)
    flow_noise = rng.standard_normal((2, 1, 14, 14)).astype(np.float32)
    dit_noise = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    mnist, dit = session(MNIST), session(DIT)
    np.savez(
        args.output,
        class_labels=LABELS,
        flow_noise=flow_noise,
        heun=heun(mnist, flow_noise, 6, 1.5),
        ab2=adams_bashforth2(mnist, flow_noise, 6, 1.5),
        dpm_noise=dit_noise,
        dpmpp2m=dpm_solver_pp_2m(dit, dit_noise, 10, 4.0),
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
