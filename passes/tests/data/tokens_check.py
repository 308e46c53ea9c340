"""Steps an original model and its token-selection rewrite side by side in ONNX Runtime and checks,
step by step, that the rewrite computes what design/method.md section 2 defines, recomputing the
selection independently in numpy.

Both models expose the stack input X and the stack output H_L (the rewrite: its token-order
stack output and the selected indices). Both get the same inputs at every step: the fixture's, with
the timestep counting down and the latent moved by the *original* model's prediction, so that
differences cannot compound.

Checked, per step t, with R_x / R_out each token's X / H_L when it last ran (kept here in numpy):
- first step: H_L and the output equal the original's (every token runs);
- later steps: the selected indices are the K largest S_i = sum over batch and hidden of
  (X_t - R_x)^2, in ascending order (near-ties, where float32 rounding may decide, are counted
  and not held against the rewrite);
- static rows of H_L equal R_out exactly (or R_out + (X_t - R_x) W + b with --correction);
- motion rows equal the original blocks run on the gathered tokens alone (--reference: a model
  made from the original, taking [batch, K, D] and giving its stack output), and differ from R_out;
- the state outputs equal R_x, R_out as recomputed here; tokens_run is N, then K.

usage: tokens_check.py ORIGINAL REWRITTEN NPZ --x X --y Y --capacity K [--steps N]
           [--reference REF --ref-x NAME --ref-y NAME] [--correction W_B.npz]
           [--extra NAME=AXIS ...] [--no-optimizations]
--extra names model inputs missing from the npz (made here from a seeded generator) that carry
the token axis at AXIS: the reference gets them gathered.
Prints JSON.
"""
import argparse
import json

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
from contract_state import zero_state  # noqa: E402

SELECTED = "fastcache.tokens.selected"
STACK_OUTPUT = "fastcache.tokens.stack_output"
TOKENS_RUN = "fastcache.tokens_run"




def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("original")
    parser.add_argument("rewritten")
    parser.add_argument("npz")
    parser.add_argument("--x", required=True)
    parser.add_argument("--y", required=True)
    parser.add_argument("--capacity", type=int, required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--reference")
    parser.add_argument("--ref-x")
    parser.add_argument("--ref-y")
    parser.add_argument("--correction")
    parser.add_argument("--extra", action="append", default=[])
    parser.add_argument("--no-optimizations", action="store_true")
    args = parser.parse_args()
    options = ort.SessionOptions()
    if args.no_optimizations:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    cpu = ["CPUExecutionProvider"]
    data = np.load(args.npz)
    a = ort.InferenceSession(args.original, options, providers=cpu)
    b = ort.InferenceSession(args.rewritten, options, providers=cpu)
    ref = ort.InferenceSession(args.reference, options, providers=cpu) if args.reference else None

    feeds = {i.name: data[i.name] for i in a.get_inputs() if i.name in data}
    batch = data["hidden_states"].shape[0]
    extra_axes = {}
    rng = np.random.default_rng(7)
    for item in args.extra:
        name, axis = item.split("=")
        extra_axes[name] = int(axis)
        spec = next(i for i in a.get_inputs() if i.name == name)
        shape = [batch if isinstance(d, str) else d for d in spec.shape]
        feeds[name] = (1.0 + 0.5 * rng.standard_normal(shape)).astype(np.float32)
    contract, state = zero_state(b, feeds)
    correction = np.load(args.correction) if args.correction else None
    a_names = [o.name for o in a.get_outputs()]
    b_names = [o.name for o in b.get_outputs()]
    first = a_names[0]
    k = args.capacity

    report = {
        "steps": args.steps,
        "first_step_max_abs_diff": 0.0,
        "selection_mismatches": 0,
        "near_ties": 0,
        "static_max_abs_diff": 0.0,
        "motion_max_abs_diff": None,
        "motion_unchanged_rows": 0,
        "state_max_abs_diff": 0.0,
        "tokens_run": [],
        "output_max_rel_diff": [],
        "selected": [],
    }
    r_x = r_out = None
    # Timesteps from 999 down, on the model's own scale: a model that takes σ in [0, 1] (Flux,
    # which multiplies by 1000 itself) gets them divided by 1000, as its pipeline would give them.
    timestep_scale = 1e-3 if float(np.max(data["timestep"])) <= 1.0 else 1.0
    for step in range(args.steps):
        feeds["timestep"] = np.full_like(data["timestep"], (999 - 80 * step) * timestep_scale)
        ra = dict(zip(a_names, a.run(a_names, feeds)))
        rb = dict(zip(b_names, b.run(b_names, {**feeds, **state})))
        x = rb[args.x].astype(np.float32)
        h = rb[STACK_OUTPUT].astype(np.float32)
        n = x.shape[1]
        report["tokens_run"].append(int(rb[TOKENS_RUN][0]))
        scale = max(float(np.max(np.abs(ra[first]))), 1e-12)
        report["output_max_rel_diff"].append(float(np.max(np.abs(ra[first] - rb[first]))) / scale)
        if step == 0:
            report["first_step_max_abs_diff"] = max(
                float(np.max(np.abs(h - ra[args.y]))), float(np.max(np.abs(ra[first] - rb[first]))))
            r_x, r_out = x.copy(), h.copy()
        else:
            saliency = ((x - r_x) ** 2).sum(axis=(0, 2))
            order = np.argsort(-saliency, kind="stable")
            expected = np.sort(order[:k])
            selected = rb[SELECTED]
            report["selected"].append(selected.tolist())
            if not np.array_equal(selected, expected):
                gap = abs(saliency[order[k - 1]] - saliency[order[k]])
                if gap <= 1e-5 * max(float(saliency.max()), 1e-30):
                    report["near_ties"] += 1
                else:
                    report["selection_mismatches"] += 1
            static = np.setdiff1d(np.arange(n), selected)
            expected_static = r_out[:, static]
            if correction is not None:
                moved = x[:, static] - r_x[:, static]
                expected_static = expected_static + moved @ correction["w"] + correction["b"]
            report["static_max_abs_diff"] = max(
                report["static_max_abs_diff"], float(np.max(np.abs(h[:, static] - expected_static))))
            same = np.all(h[:, selected] == r_out[:, selected], axis=(0, 2))
            report["motion_unchanged_rows"] += int(np.sum(same))
            if ref is not None:
                ref_feeds = {i.name: feeds[i.name] for i in ref.get_inputs() if i.name in feeds}
                ref_feeds[args.ref_x] = rb[args.x][:, selected]
                for name, axis in extra_axes.items():
                    ref_feeds[name] = np.take(feeds[name], selected, axis=axis)
                (ref_y,) = ref.run([args.ref_y], ref_feeds)
                diff = float(np.max(np.abs(h[:, selected] - ref_y)))
                report["motion_max_abs_diff"] = max(report["motion_max_abs_diff"] or 0.0, diff)
            r_x[:, selected] = x[:, selected]
            r_out[:, selected] = h[:, selected]
        for pair, mine in [("fastcache.tokens.ref_x", r_x), ("fastcache.tokens.ref_out", r_out)]:
            report["state_max_abs_diff"] = max(
                report["state_max_abs_diff"], float(np.max(np.abs(rb[pair + ".next"] - mine))))
        for pair in contract["state"]:
            state[pair["input"]] = rb[pair["output"]]
        latent = feeds["hidden_states"]
        channels = latent.shape[1]
        feeds["hidden_states"] = (latent - 0.1 * ra[first][:, :channels]).astype(latent.dtype)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
