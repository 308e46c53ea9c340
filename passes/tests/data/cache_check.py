"""Steps an original model and its fastcache rewrite side by side in ONNX Runtime, feeding the
rewrite's state back as its metadata contract says, and reports how far their outputs drift.

Both models get the same inputs at every step: the fixture's inputs, with the timestep counting
down and the latent moved by the *original* model's prediction, so differences cannot compound.

usage: cache_check.py ORIGINAL REWRITTEN NPZ [--steps N] [--no-optimizations]
                      [--forced X,H0,H1,... --warmup W]

With --forced (the rewrite made with forced skips and both models exposing the listed block
boundaries; --forced-text E0,E1,... likewise for an MMDiT's text stream), also checks every skipped step against the method's approximation computed here
from the original's recorded tensors: H_l(t) = X(t) + H_l(r) - X(r), r the last computed step;
with --forecast K --damping d, X(t) + F(t), F Newton's extrapolation of the stack residual
R = H_l - X through the last K + 1 computed steps, each term past the first multiplied by d
(every block is skipped at the same steps, so the blocks' forecasts sum to the stack's).
Prints JSON: max_abs_diff, skipped_total, forced_max_abs_error.
"""
import argparse
import json

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
from contract_state import zero_state  # noqa: E402



def newton(points, values, s, damping):
    """Newton's form of the polynomial through (points[i], values[i]) at s, term k scaled by
    damping**k, from a table of divided differences."""
    table = [np.asarray(v, dtype=np.float64) for v in values]
    total = table[0].copy()
    product = 1.0
    for k in range(1, len(points)):
        table = [(table[i] - table[i + 1]) / (points[i] - points[i + k])
                 for i in range(len(table) - 1)]
        product *= (s - points[k - 1])
        total += damping ** k * product * table[0]
    return total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("original")
    parser.add_argument("rewritten")
    parser.add_argument("npz")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--forced")
    parser.add_argument("--forced-text",
                        help="E0,E1,...: the text stream of an MMDiT, checked the same way")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--forecast", type=int, default=0)
    parser.add_argument("--damping", type=float, default=1.0)
    parser.add_argument("--no-optimizations", action="store_true",
                        help="run both models unoptimised, so the same kernels run in the same order")
    args = parser.parse_args()
    options = ort.SessionOptions()
    if args.no_optimizations:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    data = np.load(args.npz)
    a = ort.InferenceSession(args.original, options, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(args.rewritten, options, providers=["CPUExecutionProvider"])
    feeds = {i.name: data[i.name] for i in a.get_inputs()}
    contract, state = zero_state(b, feeds)
    a_names = [o.name for o in a.get_outputs()]
    b_names = [o.name for o in b.get_outputs()]
    streams = [args.forced.split(",")] if args.forced else []
    if args.forced_text:
        streams.append(args.forced_text.split(","))
    boundaries = [name for stream in streams for name in stream]

    max_diff, skipped_total, forced_error = 0.0, 0.0, 0.0
    # The largest output and expected block value: float16 models are compared in units of them.
    output_scale, forced_scale = 0.0, 0.0
    recorded = []
    for step in range(args.steps):
        feeds["timestep"] = np.full_like(data["timestep"], 999 - 80 * step)
        # float16 models' tensors widened to float32, so that the independent computation below
        # rounds once, at the end, as the rewrite's float32 arithmetic does.
        ra = {n: wide(v) for n, v in zip(a_names, a.run(a_names, feeds))}
        rb = {n: wide(v) for n, v in zip(b_names, b.run(b_names, {**feeds, **state}))}
        first = a_names[0]
        max_diff = max(max_diff, float(np.max(np.abs(ra[first] - rb[first]))))
        output_scale = max(output_scale, float(np.max(np.abs(ra[first]))))
        skipped_total += float(np.sum(rb.get("fastcache.skipped", 0.0)))
        for pair in contract["state"]:
            state[pair["input"]] = rb[pair["output"]].astype(pair["dtype"])
        if boundaries:
            recorded.append({n: ra[n] for n in boundaries})
        for stream in streams:
            x = stream[0]
            for level, h in enumerate(stream[1:]):
                if step < args.warmup:
                    expected = ra[h]
                elif args.forecast:
                    points = list(range(args.warmup - 1, args.warmup - 2 - args.forecast, -1))
                    residuals = [recorded[p][h] - recorded[p][x] for p in points]
                    expected = ra[x] + newton(points, residuals, step, args.damping)
                else:
                    r = recorded[args.warmup - 1]
                    expected = ra[x] + (r[h] - r[x])
                forced_error = max(forced_error, float(np.max(np.abs(rb[h] - expected))))
                forced_scale = max(forced_scale, float(np.max(np.abs(expected))))
        latent = feeds["hidden_states"]
        channels = latent.shape[1]
        feeds["hidden_states"] = (latent - 0.1 * ra[first][:, :channels]).astype(latent.dtype)

    print(json.dumps({"max_abs_diff": max_diff, "skipped_total": skipped_total,
                      "forced_max_abs_error": forced_error, "output_scale": output_scale,
                      "forced_scale": forced_scale}))


def wide(array):
    return array.astype(np.float32) if array.dtype == np.float16 else array


if __name__ == "__main__":
    main()
