#!/usr/bin/env python3
"""FastCache's per-step policy at full model shape: what a never-skip rewrite costs per computed
step, and how much of the FLOP speedup a skipping schedule realises (ONNX Runtime CPU).

    python3 scripts/xl_speed.py [--model models/large/dit_xl_2.onnx] [--steps 12] [--rounds 3]
    python3 scripts/xl_speed.py --model models/large/flux_like.onnx --class none

Needs a model from models/export_dit_xl.py (DiT-XL/2 shape) or models/export_flux_like.py
(FLUX.1's 19 + 38 blocks at a smaller width); random weights: timing only, no fidelity; and a
release build. `--class none` for text-conditioned models, whose conditions `fastcache` draws
from the seeded noise. For each target speedup (1 = compute every step) it calibrates a schedule on
2 runs, rewrites the model, then runs the original and every rewrite `--rounds` times,
alternated, with `fastcache run`, and reads the per-step times it prints. Step 1 (which
includes the engine's first-call setup) is replaced in every run by that run's median computed
step. Prints a Markdown table.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP = re.compile(r"^\s*(\d+)\s+\S+\s+([\d.]+)(\s|$)")


def fastcache(exe, *args):
    done = subprocess.run([exe, *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"fastcache {' '.join(map(str, args))} failed:\n{done.stderr}")
    return done.stdout


def steps_of(report, compute):
    """(ms, skipped) per step of a `fastcache run` report; `compute` is the schedule's mask
    (None: the uncached model). `run` prints a 28-entry skip vector in short form, and a
    schedule's skips are fixed, so they are read from the mask."""
    rows = []
    for line in report.splitlines():
        m = STEP.match(line)
        if m and int(m.group(1)) == len(rows) + 1:
            step = len(rows)
            rows.append((float(m.group(2)), compute is not None and not compute[step]))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / "models/large/dit_xl_2.onnx")
    p.add_argument("--exe", type=Path, default=ROOT / "target/release/fastcache")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--targets", default="1,2,3")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--class", dest="label", default="207",
                   help="the class label of a class-conditional model; 'none' for SD3, Flux")
    args = p.parse_args()
    label = [] if args.label == "none" else ["--class", args.label]
    threads = [] if args.threads is None else ["--threads", args.threads]
    work = args.model.parent
    stem = args.model.name.removesuffix(".onnx")
    variants = [("uncached", args.model, 1.0, None)]
    for target in args.targets.split(","):
        calibration = work / f"{stem}_schedule_{target}_{args.steps}.json"
        rewritten = work / f"{stem}.s{target}_{args.steps}.onnx"
        # A rewrite made from this calibration by an earlier run is reused (minutes each).
        if not (rewritten.is_file() and rewritten.stat().st_mtime > calibration.stat().st_mtime
                if calibration.is_file() else False):
            fastcache(args.exe, "calibrate", args.model, "--engine", "ort", "--steps",
                      args.steps, "--runs", 2, "--batch", 1, *label,
                      "--target-speedup", target, "-o", calibration)
            fastcache(args.exe, "rewrite", args.model, "--calibration", calibration,
                      "-o", rewritten)
        schedule = json.loads(calibration.read_text())["schedule"]
        variants.append((f"schedule {target}x", rewritten, schedule["predicted_speedup"],
                         schedule["compute"]))

    runs = {name: [] for name, _, _, _ in variants}
    for _ in range(args.rounds):
        for name, model, _, compute in variants:
            out = work / f"{stem}_speed.npy"
            report = fastcache(args.exe, "run", model, "--engine", "ort", "--steps", args.steps,
                               "--seed", 0, *label, "--batch", 1, *threads, "-o", out)
            rows = steps_of(report, compute)
            if len(rows) != args.steps:
                sys.exit(f"{name}: read {len(rows)} steps from\n{report}")
            computed = [ms for ms, skipped in rows[1:] if not skipped]
            rows[0] = (statistics.median(computed), False)
            runs[name].append(rows)

    def median_of(name, skipped):
        values = [ms for run in runs[name] for ms, s in run if s == skipped]
        return statistics.median(values) if values else None

    base_step = median_of("uncached", False)
    base_run = statistics.median(sum(ms for ms, _ in run) for run in runs["uncached"])
    print(f"{args.steps} steps, batch 1, {args.rounds} alternated rounds, ONNX Runtime CPU, "
          f"{args.threads or 'all'} threads\n")
    print("| model | ms per computed step (median) | vs uncached | ms per skipped step | run speedup | FLOP speedup | realised / FLOP |")
    print("|---|---|---|---|---|---|---|")
    for name, _, predicted, _ in variants:
        step = median_of(name, False)
        skipped = median_of(name, True)
        run = statistics.median(sum(ms for ms, _ in r) for r in runs[name])
        speedup = base_run / run
        print(f"| {name} | {step:,.0f} | {100 * (step / base_step - 1):+.1f}% | "
              f"{'' if skipped is None else f'{skipped:,.0f}'} | {speedup:.2f}x | {predicted:.2f}x | "
              f"{100 * speedup / predicted:.0f}% |")


if __name__ == "__main__":
    main()
