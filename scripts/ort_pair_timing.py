#!/usr/bin/env python3
"""Times two models through Python's onnxruntime, calls alternated, to tell what a graph costs
from what a host's call path costs (`fastcache run` binds state with IoBinding; this uses plain
`run` with all-zero state, which for a rewritten model is its first step: every block computed).

    .venv/bin/python scripts/ort_pair_timing.py ORIGINAL REWRITTEN INPUTS.npz [--threads 2]
        [--spinning 0] [--rounds 6] [--calls 3]

INPUTS.npz holds the original's inputs (keys = input names), as models/export_*.py write them.
Prints each model's median and fastest call in ms.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contract_state import zero_state  # noqa: E402


def session(path, data, threads, spinning):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: data[i.name] for i in s.get_inputs() if i.name in data}
    if len(feeds) < len(s.get_inputs()):
        _, state = zero_state(s, feeds)
        feeds.update(state)
    names = [o.name for o in s.get_outputs()]
    s.run(names, feeds)  # the first call sets up
    return s, feeds, names


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("original", type=Path)
    p.add_argument("rewritten", type=Path)
    p.add_argument("inputs", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--spinning", default="0", choices=["0", "1"])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--calls", type=int, default=3)
    args = p.parse_args()
    data = np.load(args.inputs)
    sessions = {path.name: session(path, data, args.threads, args.spinning)
                for path in (args.original, args.rewritten)}
    times = {name: [] for name in sessions}
    for _ in range(args.rounds):
        for name, (s, feeds, names) in sessions.items():
            for _ in range(args.calls):
                start = time.perf_counter()
                s.run(names, feeds)
                times[name].append(1000 * (time.perf_counter() - start))
    for name, values in times.items():
        print(f"{name}: median {np.median(values):.0f} ms, fastest {min(values):.0f} ms "
              f"({len(values)} calls, {args.threads} threads, spinning {args.spinning})")


if __name__ == "__main__":
    main()
