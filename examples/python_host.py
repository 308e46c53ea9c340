"""Runs a fastcache-rewritten DiT from Python with nothing but onnxruntime and numpy.

Everything the host needs is in the model's `fastcache` metadata entry (the host contract):
which inputs are cross-step state, their dtype and shape, and which output feeds each back.
The host zero-fills the state before the first step and feeds every state output back as the
matching input at the next step. That is all: no step counter, no special first call.

The host itself is `fastcache.Host` (python/fastcache/host.py), used here straight from the
source tree so that the example needs no install. `main` samples an epsilon-prediction DiT with
learned sigma (the diffusers DiT convention) by DDIM: DiT's linear beta schedule over 1000
training steps, "trailing" timesteps, eta 0, optional classifier-free guidance with the
conditional half first. With --flow it samples a rectified-flow model (SD3, Flux) by Euler
steps from sigma 1 to 0, its timestep sigma * --timestep-scale, its conditions from
--condition NAME=FILE.npy, Flux's position ids made as its pipeline makes them and its guidance
input set to --embedded-guidance. It mirrors `fastcache run` so the two can be compared:

    fastcache rewrite models/fixtures/dit_ts.onnx -o /tmp/dit_fc.onnx
    python examples/python_host.py /tmp/dit_fc.onnx --noise x_T.npy --class 3 --steps 10 -o out.npy
    fastcache rewrite models/fixtures/flux_ts.onnx -o /tmp/flux_fc.onnx --policy interval --interval 2
    python examples/python_host.py /tmp/flux_fc.onnx --flow --timestep-scale 1 --noise x.npy \
        --condition encoder_hidden_states=e.npy --condition pooled_projections=p.npy -o out.npy
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from fastcache.host import Host  # noqa: E402


def dit_alphas_cumprod(train_steps=1000):
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, train_steps, dtype=np.float64))


def trailing_timesteps(steps, train_steps=1000):
    return np.round(np.arange(train_steps, 0, -train_steps / steps)).astype(np.int64) - 1


def ddim(host, x, labels, steps, cfg=None, null_class=10):
    alpha_bar = dit_alphas_cumprod()
    timesteps = trailing_timesteps(steps)
    batch, channels = x.shape[0], x.shape[1]
    skipped = []
    host.reset()
    for k, t in enumerate(timesteps):
        latents, classes = x, labels
        if cfg is not None:
            latents = np.concatenate([x, x])
            classes = np.concatenate([labels, np.full(batch, null_class, dtype=np.int64)])
        outputs, stats = host({
            "hidden_states": latents.astype(np.float32),
            "timestep": np.full(latents.shape[0], t, dtype=np.int64),
            "class_labels": classes,
        })
        skipped.append([float(v) for v in stats.get("fastcache.skipped", [])])
        eps = next(iter(outputs.values())).astype(np.float64)[:, :channels]
        if cfg is not None:
            cond, uncond = eps[:batch], eps[batch:]
            eps = uncond + cfg * (cond - uncond)
        a = alpha_bar[t]
        a_prev = alpha_bar[timesteps[k + 1]] if k + 1 < len(timesteps) else 1.0
        x0 = (x.astype(np.float64) - np.sqrt(1.0 - a) * eps) / np.sqrt(a)
        x = (np.sqrt(a_prev) * x0 + np.sqrt(1.0 - a_prev) * eps).astype(np.float32)
    return x, skipped


def position_ids(tokens, axes, image):
    """Flux's pipeline: zeros for the text tokens; the image tokens' row and column of a square
    grid in the last two axes."""
    ids = np.zeros((tokens, axes), dtype=np.float32)
    if image:
        side = int(round(tokens ** 0.5))
        k = np.arange(tokens)
        ids[:, axes - 2] = k // side
        ids[:, axes - 1] = k % side
    return ids


def flow_inputs(host, x, conditions, embedded_guidance):
    """The inputs that stay fixed over a rectified-flow run: the conditions as given, position
    ids for the rank-2 inputs without a batch axis, the guidance input."""
    fixed = dict(conditions)
    for model_input in host.session.get_inputs():
        name, shape = model_input.name, model_input.shape
        if name in fixed or name in ("hidden_states", "timestep") or name.startswith("fastcache."):
            continue
        if len(shape) == 2 and all(isinstance(d, int) for d in shape):
            fixed[name] = position_ids(shape[0], shape[1], image=x.ndim == 3 and shape[0] == x.shape[1])
        elif name == "guidance":
            fixed[name] = np.full(x.shape[0], embedded_guidance, dtype=np.float32)
    return fixed


def euler(host, x, fixed, steps, timestep_scale):
    sigmas = 1.0 - np.arange(steps + 1, dtype=np.float64) / steps
    skipped = []
    host.reset()
    for k in range(steps):
        outputs, stats = host({
            "hidden_states": x.astype(np.float32),
            "timestep": np.full(x.shape[0], sigmas[k] * timestep_scale, dtype=np.float32),
            **fixed,
        })
        skipped.append([float(v) for v in stats.get("fastcache.skipped", [])])
        v = next(iter(outputs.values())).astype(np.float64)
        x = (x.astype(np.float64) + (sigmas[k + 1] - sigmas[k]) * v).astype(np.float32)
    return x, skipped


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a rewritten model, or the folder of its host split")
    parser.add_argument("--noise", required=True, help=".npy of the initial latents [B, C, H, W]")
    parser.add_argument("--class", dest="classes",
                        help="comma-separated class labels, one per sample (DDIM)")
    parser.add_argument("--flow", action="store_true",
                        help="a rectified-flow model (SD3, Flux): Euler steps from sigma 1 to 0")
    parser.add_argument("--timestep-scale", type=float, default=1000.0,
                        help="--flow: the timestep input is sigma times this (1 for Flux)")
    parser.add_argument("--condition", action="append", default=[],
                        help="--flow: NAME=FILE.npy, a condition input's values")
    parser.add_argument("--embedded-guidance", type=float, default=3.5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float)
    parser.add_argument("--null-class", type=int, default=10)
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()

    x = np.load(args.noise).astype(np.float32)
    host = Host(args.model)
    if args.flow:
        conditions = {}
        for spec in args.condition:
            name, path = spec.split("=", 1)
            conditions[name] = np.load(path).astype(np.float32)
        fixed = flow_inputs(host, x, conditions, args.embedded_guidance)
        latents, skipped = euler(host, x, fixed, args.steps, args.timestep_scale)
    else:
        if args.classes is None:
            parser.error("--class is needed for DDIM (or give --flow)")
        labels = np.array([int(c) for c in args.classes.split(",")], dtype=np.int64)
        if labels.size == 1:
            labels = np.repeat(labels, x.shape[0])
        latents, skipped = ddim(host, x, labels, args.steps, args.cfg, args.null_class)
    np.save(args.output, latents)
    print(json.dumps({"output": args.output, "skipped": skipped}))


if __name__ == "__main__":
    main()
