"""Token selection's quality/time trade-off on one model: for each motion ratio, rewrite the model
(token selection alone, and with the block cache), sample it with `fastcache run` from the same
seeds as the original, and print the relative L2 error of the final latents against the original
run and the median per-step time (steps after the first; the first step also plans and runs the
full stack).

usage: python scripts/tokens_sweep.py MODEL [--fastcache BIN] [--engine ort] [--steps 20]
           [--seeds 1,2,3] [--batch 2] [--cfg 3] [--ratios 1,0.75,0.5,0.25]
           [--calibration CAL.json] [--repeat 3] [--threads T]
"""
import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def run(cmd):
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr}")
    return done.stdout


def step_times(report):
    """Per-step milliseconds from `fastcache run`'s table, first step left out."""
    times = []
    for line in report.splitlines():
        m = re.match(r"\s*(\d+)\s+\S+\s+([\d.]+)", line)
        if m and int(m.group(1)) > 1:
            times.append(float(m.group(2)))
    return times


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--fastcache", default="target/release/fastcache")
    p.add_argument("--engine", default="ort")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--cfg")
    p.add_argument("--ratios", default="1,0.75,0.5,0.25")
    p.add_argument("--calibration")
    p.add_argument("--repeat", type=int, default=3, help="timing runs per configuration")
    p.add_argument("--threads", help="ONNX Runtime intra-op threads (default: the available cores)")
    args = p.parse_args()
    fc = args.fastcache
    seeds = [int(s) for s in args.seeds.split(",")]
    common = ["--engine", args.engine, "--steps", str(args.steps), "--batch", str(args.batch)]
    if args.cfg:
        common += ["--cfg", args.cfg]
    if args.threads:
        common += ["--threads", args.threads]
    tmp = Path(tempfile.mkdtemp())

    def sample(model, tag):
        finals, times = [], []
        for seed in seeds:
            out = tmp / f"{tag}_{seed}.npy"
            for _ in range(args.repeat):
                times += step_times(run([fc, "run", model, "-o", str(out), "--seed", str(seed)] + common))
            finals.append(np.load(out).astype(np.float64))
        return finals, statistics.median(times)

    reference, base_ms = sample(args.model, "original")
    rows = [("original", "-", 0.0, base_ms)]
    configs = []
    for ratio in args.ratios.split(","):
        configs.append((f"tokens rho={ratio}", ["--motion-ratio", ratio, "--no-cache"]))
    configs.append(("cache (default)", []))
    for ratio in args.ratios.split(","):
        if ratio != "1":
            configs.append((f"tokens rho={ratio} + cache", ["--motion-ratio", ratio]))
    for i, (name, flags) in enumerate(configs):
        model = str(tmp / f"m{i}.onnx")
        cal = ["--calibration", args.calibration] if args.calibration else []
        said = run([fc, "rewrite", args.model, "-o", model] + flags + cal)
        k = re.search(r"(\d+) of (\d+) tokens", said)
        finals, ms = sample(model, f"m{i}")
        err = np.mean([np.linalg.norm(f - r) / np.linalg.norm(r) for f, r in zip(finals, reference)])
        rows.append((name, f"{k.group(1)}/{k.group(2)}" if k else "all", err, ms))
    print(f"model {args.model}; {args.engine}; {args.steps} steps; seeds {seeds}; batch {args.batch}"
          f"{'; cfg ' + args.cfg if args.cfg else ''}; {'calibrated' if args.calibration else 'uncalibrated'}"
          f"{'; threads ' + args.threads if args.threads else ''}")
    print(f"{'configuration':<26} {'tokens':>7} {'rel L2 err':>11} {'ms/step':>8} {'speedup':>8}")
    for name, k, err, ms in rows:
        print(f"{name:<26} {k:>7} {err:>11.4f} {ms:>8.3f} {base_ms / ms:>7.2f}x")


if __name__ == "__main__":
    main()
