"""Which cheap tensor tells best when a DiT's block stack can be skipped? The study behind
TeaCache's indicator choice in passes/src/peers.rs.

Samples a rectified-flow DiT (Euler, CFG) with ONNX Runtime, the candidate tensors exposed as
extra outputs, and compares, step by step, each candidate's relative L1 change since the previous
step with what skipping would get wrong: the relative L1 change of the stack's residual
R = H_L - X (a skip reuses the previous R). A useful indicator moves with that error; one that
stays flat says nothing.

    python scripts/indicator_study.py MODEL --x X --modulated M --h1 H1 --hl HL [--steps 50]

The value names come from `fastcache inspect MODEL` (stack input, block 0's output, the last
block's output) and `fastcache rewrite MODEL -o t.onnx --policy teacache --threshold 0.1` (the
modulated input it found). Prints a table per step and the correlations as JSON on the last line.
"""
import argparse
import json

import numpy as np
import onnx
import onnxruntime as ort


def expose(path, names):
    model = onnx.load(path)
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return model.SerializeToString()


def rel_l1(a, b):
    return float(np.abs(a - b).sum() / max(np.abs(b).sum(), 1e-30))


def ranks(v):
    order = np.argsort(v)
    r = np.empty(len(v))
    r[order] = np.arange(len(v))
    return r


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--x", required=True)
    p.add_argument("--modulated", required=True)
    p.add_argument("--h1", required=True)
    p.add_argument("--hl", required=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()

    names = [args.x, args.modulated, args.h1, args.hl]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(expose(args.model, names), options,
                                   providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map.get("fastcache.sampler", "{}"))
    scale = meta.get("timestep_scale", 1000.0)
    null = meta.get("null_class", 10)
    shape = session.get_inputs()[0].shape
    c, h, w = (int(d) for d in shape[1:])
    rng = np.random.default_rng(args.seed)
    b = args.batch
    x = rng.standard_normal((b, c, h, w)).astype(np.float32)
    labels = np.arange(b, dtype=np.int64) % null
    call_labels = np.concatenate([labels, np.full(b, null, dtype=np.int64)])
    sigmas = np.linspace(1.0, 0.0, args.steps + 1)
    outputs = [o.name for o in session.get_outputs()]
    prediction = outputs[0]

    previous = None
    rows = []
    for k in range(args.steps):
        feeds = {
            "hidden_states": np.concatenate([x, x]),
            "timestep": np.full(2 * b, sigmas[k] * scale, dtype=np.float32),
            "class_labels": call_labels,
        }
        out = dict(zip(outputs, session.run(outputs, feeds)))
        now = {
            "stack_input": out[args.x],
            "modulated_input": out[args.modulated],
            "block0_residual": out[args.h1] - out[args.x],
            "stack_residual": out[args.hl] - out[args.x],
        }
        if previous is not None:
            rows.append({name: rel_l1(now[name], previous[name]) for name in now})
            rows[-1]["step"] = k
        previous = now
        v = out[prediction]
        v = v[b:] + args.cfg * (v[:b] - v[b:])
        x = (x + (sigmas[k + 1] - sigmas[k]) * v).astype(np.float32)

    print("step  stack_input  modulated_input  block0_residual  stack_residual")
    for r in rows:
        print(f"{r['step']:>4}  {r['stack_input']:>11.4f}  {r['modulated_input']:>15.4f}  "
              f"{r['block0_residual']:>15.4f}  {r['stack_residual']:>14.4f}")
    target = np.array([r["stack_residual"] for r in rows])
    result = {}
    for name in ["stack_input", "modulated_input", "block0_residual"]:
        v = np.array([r[name] for r in rows])
        result[name] = {
            "pearson": float(np.corrcoef(v, target)[0, 1]),
            "spearman": float(np.corrcoef(ranks(v), ranks(target))[0, 1]),
            "median_change": float(np.median(v)),
            "min_change": float(v.min()),
            "max_change": float(v.max()),
        }
    result["stack_residual"] = {"median_change": float(np.median(target)),
                                "min_change": float(target.min()),
                                "max_change": float(target.max())}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
