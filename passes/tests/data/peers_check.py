"""Recomputes a peer policy's skip decisions with numpy, independently of the rewrite, and checks
the rewritten model against them step by step in ONNX Runtime.

Both models get the same inputs at every step: the fixture's inputs, with the timestep counting
down and the latent moved by the *original* model's prediction, so differences cannot compound.
The original exposes the tensors the rule reads (stack input X, block 0's output H1, the stack
output HL, TeaCache's indicator); the rewritten model exposes HL. From the original's tensors this
script decides, as the published rules say, which steps skip, what change statistic each step
sees, and what HL a skipped step must return (the cached residual of the last computed step).

usage: peers_check.py ORIGINAL REWRITTEN NPZ --policy fbcache|teacache|interval|schedule|probe
                      --x X --h1 H1 --hl HL [--indicator I] [--threshold T] [--interval N]
                      [--schedule JSON] [--probe JSON] [--warmup W] [--steps S]

For `schedule`, JSON is {"compute": [bool per step], "weights": [[w_1, ..., w_K] per step]}: a
skipped step must return X + sum_k w_k R_k, R_k the stack residual HL - X at the k-th last
computed step (FastCache's per-step forecast).
For `probe`, JSON is {"forced": [bool], "thresholds": [float], "gamma": [float], "max_run": int}
(FastCache's probe test): block 0 always runs; at a step that is not forced, after two computed
steps a > p and with fewer than max_run skips in a row, c = gamma (s - a) / (a - p) and the step
skips iff |r0 - r0(a) - c (r0(a) - r0(p))|^2 / |r0|^2 <= threshold, r0 = H1 - X; it then returns
H1 + R(a) + c (R(a) - R(p)), R = HL - H1 at the computed steps.
Prints JSON: expected and actual decisions per step, the largest relative error of the change
statistic, the largest error of HL relative to HL's largest value, and the smallest margin
between a statistic and the threshold (how close a decision came to flipping).
"""
import argparse
import json

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
from contract_state import zero_state  # noqa: E402



def relative_l1(x, ref):
    # float64, as the published rules state it: mean |x - ref| / mean |ref|
    x, ref = x.astype(np.float64), ref.astype(np.float64)
    return float(np.abs(x - ref).sum() / max(np.abs(ref).sum(), 1e-30))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("original")
    p.add_argument("rewritten")
    p.add_argument("npz")
    p.add_argument("--policy", required=True, choices=["fbcache", "teacache", "interval", "schedule", "probe"])
    p.add_argument("--x", required=True)
    p.add_argument("--h1", required=True)
    p.add_argument("--hl", required=True)
    p.add_argument("--indicator")
    p.add_argument("--e-in", help="MMDiT: the text stream where the region reads it")
    p.add_argument("--e-out", help="MMDiT: the text stream where the region writes it")
    p.add_argument("--threshold", type=float, default=0.0)
    p.add_argument("--interval", type=int, default=1)
    p.add_argument("--schedule")
    p.add_argument("--probe")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()

    # Unoptimised, both run the same kernels, so computed steps agree to the last bit.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = np.load(args.npz)
    a = ort.InferenceSession(args.original, options, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(args.rewritten, options, providers=["CPUExecutionProvider"])
    feeds = {i.name: data[i.name] for i in a.get_inputs()}
    contract, state = zero_state(b, feeds)
    a_names = [o.name for o in a.get_outputs()]
    b_names = [o.name for o in b.get_outputs()]
    first = a_names[0]
    warmup = max(args.warmup, 1)

    expected, actual = [], []
    change_error, hl_error, margin = 0.0, 0.0, float("inf")
    text_error, text_snapshots = 0.0, []  # the text stream's residuals, where the region carries it
    reference = None       # fbcache: block 0's residual at the last computed step
    previous = None        # teacache: the indicator at the previous step
    accumulated = 0.0      # teacache
    since = 0              # interval: steps since the last computed one
    cached = None          # HL minus the span input at the last computed step
    snapshots = []         # schedule: those residuals at every computed step, most recent first
    schedule = json.loads(args.schedule) if args.schedule else None
    gate = json.loads(args.probe) if args.probe else None
    computed = []          # probe: (step, r0, R) at every computed step, most recent first
    run = 0                # probe: skips in a row
    for step in range(args.steps):
        feeds["timestep"] = np.full_like(data["timestep"], 999 - 80 * step)
        ra = dict(zip(a_names, a.run(a_names, feeds)))
        rb = dict(zip(b_names, b.run(b_names, {**feeds, **state})))
        for pair in contract["state"]:
            state[pair["input"]] = rb[pair["output"]]

        x, h1, hl = (ra[n].astype(np.float64) for n in (args.x, args.h1, args.hl))
        span_input = h1 if args.policy in ("fbcache", "probe") else x
        change = None
        if args.policy == "fbcache":
            r0 = h1 - x
            change = relative_l1(r0, reference) if reference is not None else None
            skip = step >= warmup and change is not None and change < args.threshold
            if not skip:
                reference = r0
        elif args.policy == "teacache":
            ind = ra[args.indicator]
            total = accumulated + relative_l1(ind, previous) if previous is not None else None
            change = total
            skip = step >= warmup and total is not None and total < args.threshold
            accumulated = total if skip else 0.0
            previous = ind
        elif args.policy == "probe":
            r0 = h1 - x
            skip = False
            forced = gate["forced"][step] if step < len(gate["forced"]) else True
            if not forced and len(computed) >= 2 and run < gate["max_run"]:
                (last, r0a, ra_), (before, r0p, rp) = computed[0], computed[1]
                c = gate["gamma"][step] * (step - last) / (last - before)
                miss = r0 - (r0a + c * (r0a - r0p))
                change = float((miss ** 2).sum() / max((r0 ** 2).sum(), 1e-30))
                threshold = gate["thresholds"][step]
                skip = change <= threshold
                margin = min(margin, abs(change - threshold) / max(threshold, 1e-30))
                probe_forecast = ra_ + c * (ra_ - rp)
            run = run + 1 if skip else 0
        elif args.policy == "schedule":
            compute = schedule["compute"]
            skip = step >= warmup and step < len(compute) and not compute[step]
        else:
            skip = step >= warmup and since < args.interval - 1
            since = since + 1 if skip else 0
        if change is not None and step >= warmup and args.policy not in ("interval", "probe"):
            margin = min(margin, abs(change - args.threshold) / max(args.threshold, 1e-30))
        expected.append(bool(skip))

        flags = rb["fastcache.skipped"]
        actual.append(bool(flags.max() > 0.5))
        if change is not None and "fastcache.change" in rb:
            got = float(rb["fastcache.change"][0])
            change_error = max(change_error, abs(got - change) / max(abs(change), 1e-12))
        if args.policy == "schedule" and skip:
            weights = schedule["weights"][step]
            want = span_input + sum(w * r for w, r in zip(weights, snapshots))
        elif args.policy == "probe" and skip:
            want = span_input + probe_forecast
        else:
            want = span_input + cached if skip else hl
        got_hl = rb[args.hl].astype(np.float64)
        scale = max(float(np.abs(hl).max()), 1e-12)
        hl_error = max(hl_error, float(np.abs(got_hl - want).max()) / scale)
        if args.e_out:
            e_in, e_out = (ra[n].astype(np.float64) for n in (args.e_in, args.e_out))
            if skip and args.policy == "schedule":
                weights = schedule["weights"][step]
                want_text = e_in + sum(w * r for w, r in zip(weights, text_snapshots))
            else:
                want_text = e_in + text_snapshots[0] if skip else e_out
            got_text = rb[args.e_out].astype(np.float64)
            text_scale = max(float(np.abs(e_out).max()), 1e-12)
            text_error = max(text_error, float(np.abs(got_text - want_text).max()) / text_scale)
            if not skip:
                text_snapshots.insert(0, e_out - e_in)
        if not skip:
            cached = hl - span_input
            snapshots.insert(0, cached)
            if args.policy == "probe":
                computed.insert(0, (step, h1 - x, cached))

        latent = feeds["hidden_states"]
        channels = latent.shape[1]
        feeds["hidden_states"] = (latent - 0.1 * ra[first][:, :channels]).astype(latent.dtype)

    print(json.dumps({
        "expected": expected,
        "actual": actual,
        "change_max_relative_error": change_error,
        "stack_output_max_relative_error": hl_error,
        "text_output_max_relative_error": text_error,
        "threshold_margin": margin if margin != float("inf") else None,
    }))


if __name__ == "__main__":
    main()
