"""Independent DDIM reference for tests/sampler.rs.

Samples the DiT fixture models/fixtures/dit_ts.onnx for 10 DDIM steps (eta 0) with ONNX Runtime
from Python, written from the DDIM paper's update rather than from fastcache's code, and saves the
initial noise, the class labels and x after every step:

    .venv/bin/python tests/data/ddim_reference.py [--output tests/data/ddim_reference.npz]

Two trajectories share one initial noise: without guidance, and with classifier-free guidance
(scale 4, null class 10: the conditional half first, then the null half, in one call).

Conventions (what fastcache's sampler must match):
- DiT's schedule: beta linear from 1e-4 to 0.02 over 1000 steps, alpha_bar = cumprod(1 - beta).
- "trailing" timesteps: round(arange(1000, 0, -1000 / steps)) - 1, i.e. 999, 899, ..., 99;
  after the last step alpha_bar_prev = 1.
- The model's output has 8 channels (learned sigma): the first 4 are epsilon.
- x0 = (x - sqrt(1 - a) eps) / sqrt(a); x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps,
  in float64, stored as float32 after every step (the model takes float32).

Only numpy and onnxruntime (scripts/requirements-test.txt). Deterministic: the same versions give
the same file.
"""

import argparse
import pathlib

import numpy as np
import onnxruntime as ort

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "fixtures" / "dit_ts.onnx"
STEPS = 10
TRAIN_STEPS = 1000
BATCH = 2
CLASS_LABELS = np.array([3, 7], dtype=np.int64)
NULL_CLASS = 10
CFG_SCALE = 4.0
NOISE_SEED = 20240607


def alphas_cumprod():
    betas = np.linspace(1e-4, 0.02, TRAIN_STEPS, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def trailing_timesteps(steps):
    return np.round(np.arange(TRAIN_STEPS, 0, -TRAIN_STEPS / steps)).astype(np.int64) - 1


def ddim(session, x_t, cfg_scale):
    alpha_bar = alphas_cumprod()
    timesteps = trailing_timesteps(STEPS)
    x = x_t.copy()
    history = []
    for k, t in enumerate(timesteps):
        if cfg_scale is None:
            latents, labels = x, CLASS_LABELS
        else:
            latents = np.concatenate([x, x])
            labels = np.concatenate([CLASS_LABELS, np.full(BATCH, NULL_CLASS, dtype=np.int64)])
        out = session.run(
            ["sample"],
            {
                "hidden_states": latents.astype(np.float32),
                "timestep": np.full(latents.shape[0], t, dtype=np.int64),
                "class_labels": labels,
            },
        )[0].astype(np.float64)
        eps = out[:, :4]
        if cfg_scale is not None:
            cond, uncond = eps[:BATCH], eps[BATCH:]
            eps = uncond + cfg_scale * (cond - uncond)
        a = alpha_bar[t]
        a_prev = alpha_bar[timesteps[k + 1]] if k + 1 < len(timesteps) else 1.0
        x0 = (x.astype(np.float64) - np.sqrt(1.0 - a) * eps) / np.sqrt(a)
        x = (np.sqrt(a_prev) * x0 + np.sqrt(1.0 - a_prev) * eps).astype(np.float32)
        history.append(x)
    return np.stack(history)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output", type=pathlib.Path, default=pathlib.Path(__file__).with_suffix(".npz")
    )
    args = parser.parse_args()

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(MODEL), options, providers=["CPUExecutionProvider"])
    x_t = np.random.default_rng(NOISE_SEED).standard_normal((BATCH, 4, 8, 8)).astype(np.float32)
    plain = ddim(session, x_t, None)
    guided = ddim(session, x_t, CFG_SCALE)
    np.savez(
        args.output,
        x_t=x_t,
        class_labels=CLASS_LABELS,
        null_class=np.array(NULL_CLASS, dtype=np.int64),
        cfg_scale=np.array(CFG_SCALE, dtype=np.float32),
        timesteps=trailing_timesteps(STEPS),
        plain_history=plain,
        cfg_history=guided,
    )
    print(f"wrote {args.output}: {STEPS} steps, batch {BATCH}, plain and CFG {CFG_SCALE}")


if __name__ == "__main__":
    main()
