"""Runs a model with token merging (design/method.md section 3) in ONNX Runtime and recomputes, in
numpy (float64) and from the method's definitions alone, everything the merge exposes:

- U = H / |H| per token; S = U U^T within each sample;
- density rho_i = mean of the K largest S_ij over j != i;
- importance w_i = max((1 + rho_i)/2 * (1 + lambda * s_i / max s), 1e-6) (s: saliency, if any);
- separation d_i = 1 - max S_ij over the tokens j ranked above i (denser, or as dense and
  earlier); 2 for the top token;
- centres: the M largest w_i * d_i, in ascending token order;
- assignment: each token to its most similar centre (first on exact ties); a centre to itself;
- merged: the w-weighted mean of each cluster's H;
- unmerge: copy, out_i = Y[a_i]; residual, out_i = H_i + Y[a_i] - merged[a_i].

Where float32 rounding may decide (a density order, a score at the M-th place, a token as similar
to two centres to within --eps), the pass's choice is counted as a near-tie, not held against it,
provided it is one the definitions allow with every such quantity moved by at most --eps. The later
stages are recomputed from the pass's centres and assignment, so one near-tie cannot cascade.

usage:
  merge_check.py subgraph MODEL --m M --k K --unmerge copy|residual [--lambda L] [--seed S]
      [--clusters C]
    MODEL has input h [B, T, D] (and optionally saliency [T]) and exposes density, importance,
    centres, assignment, merged, span_out (= tanh(merged) * 1.5 + 0.25, the stand-in span) and
    out (and, optionally, direct = the stand-in span of h itself). Inputs are made here: standard
    normal, or with --clusters C, C tight clusters around well-separated random unit directions
    (sizes 2 to 12, noise 0.02 to 0.1, random per-token scale, tokens shuffled), and the
    assignment is compared with the generating partition.
  merge_check.py fixture MODEL NPZ --x X --y Y --m M --k K --unmerge copy|residual
      [--reference REF --ref-x NAME --ref-y NAME [--ref-log-sizes NAME]] [--stack-input X0 --selected SEL --lambda L]
    MODEL is a rewritten fixture exposing the span input X, the span output Y and the merge's
    values; runs it on the NPZ's inputs (state inputs zero: the first step). With --reference,
    REF (the original's span alone, on [batch, M, D]) is run on the merged stream and compared
    with Y. With --stack-input (token selection before the merge; the model exposes the stack
    input and the selected indices), the saliency is the first step's: the squared stack input
    summed over batch and hidden, at the selected tokens.
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

DENSITY = "fastcache.merge.density"
IMPORTANCE = "fastcache.merge.importance"
CENTRES = "fastcache.merge.centres"
ASSIGNMENT = "fastcache.merge.assignment"
MERGED = "fastcache.merge.stream"
UNMERGED = "fastcache.merge.unmerged"



def exposed(outs, span, out):
    """The merge's exposed values, keyed as the checks read them."""
    return {
        "density": outs[DENSITY],
        "importance": outs[IMPORTANCE],
        "centres": outs[CENTRES],
        "assignment": outs[ASSIGNMENT],
        "merged": outs[MERGED],
        "span": span,
        "out": out,
    }

def stand_in_span(x):
    return np.tanh(x) * 1.5 + 0.25


def session(path):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def run_all(sess, feeds):
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


class Report:
    def __init__(self):
        self.data = {
            "samples": 0,
            "density_max_abs_diff": 0.0,
            "importance_max_abs_diff": 0.0,
            "centre_mismatches": 0,
            "centre_near_ties": 0,
            "centres_not_ascending": 0,
            "assignment_mismatches": 0,
            "assignment_near_ties": 0,
            "centre_not_own_cluster": 0,
            "empty_clusters": 0,
            "merged_max_abs_diff": 0.0,
            "out_max_abs_diff": 0.0,
            "out_scale": 0.0,
        }

    def max(self, key, value):
        self.data[key] = max(self.data[key], float(value))

    def add(self, key, value):
        self.data[key] += int(value)


def similarity(h):
    u = h / np.linalg.norm(h, axis=-1, keepdims=True)
    return u @ u.T


def check_merge(report, h, out, m, k, lam, saliency, eps):
    """One sample: h [T, D] float64, out the pass's values for it. Returns the numpy density,
    importance and merged stream (from the pass's centres and assignment) and the assignment."""
    t = h.shape[0]
    s = similarity(h)
    others = np.where(np.eye(t, dtype=bool), -np.inf, s)
    rho = np.sort(others, axis=1)[:, -k:].mean(axis=1)
    w = (1.0 + rho) / 2.0
    if saliency is not None:
        w = w * (1.0 + lam * saliency / saliency.max())
    w = np.maximum(w, 1e-6)
    report.max("density_max_abs_diff", np.max(np.abs(out["density"] - rho)))
    report.max("importance_max_abs_diff", np.max(np.abs(out["importance"] - w)))

    idx = np.arange(t)
    # above[i, j]: j is ranked above i.
    above = (rho[None, :] > rho[:, None]) | ((rho[None, :] == rho[:, None]) & (idx[None, :] < idx[:, None]))

    def separation(mask):
        closest = np.where(mask, s, -np.inf).max(axis=1)
        return np.where(np.isfinite(closest), 1.0 - closest, 2.0)

    score = w * separation(above)
    order = np.argsort(-score, kind="stable")
    expected = np.sort(order[:m])
    centres = np.asarray(out["centres"], dtype=np.int64)
    if not (np.all(np.diff(centres) > 0) and len(centres) == m):
        report.add("centres_not_ascending", 1)
    if not np.array_equal(centres, expected):
        # Allowed if some ranking within eps of the computed one picks these centres.
        not_self = ~np.eye(t, dtype=bool)
        certain = rho[None, :] > rho[:, None] + eps
        possible = (rho[None, :] >= rho[:, None] - eps) & not_self
        high = w * separation(certain) + eps
        low = w * separation(possible) - eps
        rest = np.setdiff1d(idx, centres)
        if len(np.unique(centres)) == m and (len(rest) == 0 or high[centres].min() >= low[rest].max()):
            report.add("centre_near_ties", 1)
        else:
            report.add("centre_mismatches", 1)

    assignment = np.asarray(out["assignment"], dtype=np.int64)
    to_centres = s[:, centres]  # [T, M]
    for i in range(t):
        own = np.nonzero(centres == i)[0]
        if len(own):
            if assignment[i] != own[0]:
                report.add("centre_not_own_cluster", 1)
            continue
        best = int(np.argmax(to_centres[i]))
        got = int(assignment[i])
        if got != best:
            if 0 <= got < m and to_centres[i, got] >= to_centres[i, best] - eps:
                report.add("assignment_near_ties", 1)
            else:
                report.add("assignment_mismatches", 1)

    merged = np.zeros((m, h.shape[1]))
    for c in range(m):
        members = assignment == c
        if not members.any():
            report.add("empty_clusters", 1)
            continue
        merged[c] = (w[members, None] * h[members]).sum(axis=0) / w[members].sum()
    report.max("merged_max_abs_diff", np.max(np.abs(out["merged"] - merged)))
    return rho, w, merged, assignment


def unmerge(mode, h, y, merged, assignment):
    if mode == "copy":
        return y[assignment]
    return h + (y - merged)[assignment]


def per_sample(values, b):
    return {key: value[b].astype(np.float64) if value.dtype.kind == "f" else value[b] for key, value in values.items()}


def clustered(rng, t, d, clusters):
    """h [T, D] made of `clusters` clusters, and each token's generating cluster."""
    sizes = np.full(clusters, 2)
    while sizes.sum() < t:
        c = rng.integers(clusters)
        if sizes[c] < 12:
            sizes[c] += 1
    assert sizes.sum() == t, "T must lie in [2C, 12C]"
    while True:
        directions = rng.standard_normal((clusters, d))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        cos = directions @ directions.T
        if np.max(np.abs(cos - np.eye(clusters))) < 0.5:
            break
    labels = np.repeat(np.arange(clusters), sizes)
    noise = rng.uniform(0.02, 0.1, clusters)
    h = directions[labels] + noise[labels, None] * rng.standard_normal((t, d))
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    h *= rng.uniform(0.5, 3.0, (t, 1))
    perm = rng.permutation(t)
    return h[perm], labels[perm], sizes


def subgraph(args):
    sess = session(args.model)
    spec = {i.name: i for i in sess.get_inputs()}
    rng = np.random.default_rng(args.seed)
    batch = 3
    _, t, d = spec["h"].shape
    if args.clusters:
        made = [clustered(rng, t, d, args.clusters) for _ in range(batch)]
        h = np.stack([x for x, _, _ in made]).astype(np.float32)
        labels = [lab for _, lab, _ in made]
    else:
        h = rng.standard_normal((batch, t, d)).astype(np.float32)
    feeds = {"h": h}
    saliency = None
    if "saliency" in spec:
        saliency = rng.uniform(0.0, 1.0, t).astype(np.float32)
        feeds["saliency"] = saliency
        saliency = saliency.astype(np.float64)
    outs = run_all(sess, feeds)
    values = exposed(outs, outs["span_out"], outs["out"])
    report = Report()
    data = report.data
    data["span_max_abs_diff"] = 0.0
    data.update({
        "tokens": int(t),
        "merged": int(outs[CENTRES].shape[1]),
        "assignment_is_identity": True,
        "centres": outs[CENTRES].tolist(),
    })
    if args.clusters:
        data.update({
            "cluster_sizes": [sorted(s.tolist()) for _, _, s in made],
            "partition_equal": True,
            "clusters_mixing_labels": 0,
            "labels_without_centre": 0,
            "cluster_mean_max_abs_diff": 0.0,
        })
    for b in range(batch):
        out = per_sample(values, b)
        hb = h[b].astype(np.float64)
        _, w, merged, assignment = check_merge(report, hb, out, args.m, args.k, args.lam, saliency, args.eps)
        y = stand_in_span(merged)
        report.max("span_max_abs_diff", np.max(np.abs(out["span"] - stand_in_span(out["merged"]))))
        expected = unmerge(args.unmerge, hb, y, merged, assignment)
        report.max("out_max_abs_diff", np.max(np.abs(out["out"] - expected)))
        report.max("out_scale", np.max(np.abs(expected)))
        if not np.array_equal(out["assignment"], np.arange(t)):
            data["assignment_is_identity"] = False
        report.add("samples", 1)
        if args.clusters:
            lab = labels[b]
            centres = out["centres"]
            # The partitions as sets of frozensets of token indices.
            mine = {frozenset(np.nonzero(assignment == c)[0].tolist()) for c in range(args.m)}
            truth = {frozenset(np.nonzero(lab == c)[0].tolist()) for c in range(args.clusters)}
            if mine != truth:
                data["partition_equal"] = False
            for c in range(args.m):
                if len(set(lab[assignment == c].tolist())) > 1:
                    data["clusters_mixing_labels"] += 1
            data["labels_without_centre"] += args.clusters - len(set(lab[centres].tolist()))
            if args.m == args.clusters:
                # Each merged token against the weighted mean of the generating cluster its
                # centre belongs to (independent of the assignment).
                for c in range(args.m):
                    members = lab == lab[centres[c]]
                    mean = (w[members, None] * hb[members]).sum(axis=0) / w[members].sum()
                    report.max("cluster_mean_max_abs_diff", np.max(np.abs(out["merged"][c] - mean)))
    if "direct" in outs:
        direct = outs["direct"]
        data["direct_max_abs_diff"] = float(np.max(np.abs(values["out"] - direct)))
        data["direct_bitwise"] = bool(np.array_equal(values["out"].view(np.uint32), direct.view(np.uint32)))
    print(json.dumps(data))


def fixture(args):
    sess = session(args.model)
    data = np.load(args.npz)
    feeds = {i.name: data[i.name] for i in sess.get_inputs() if i.name in data}
    if "fastcache" in sess.get_modelmeta().custom_metadata_map:
        feeds.update(zero_state(sess, feeds)[1])
    outs = run_all(sess, feeds)
    x = outs[args.x]
    y = outs[args.y]
    values = exposed(outs, y, outs[UNMERGED])
    saliency = None
    if args.stack_input:
        # Token selection's saliency on the first step (its reference R_x is zero there): each
        # token's squared stack input summed over batch and hidden, at the selected tokens.
        stack_input = outs[args.stack_input].astype(np.float64)
        saliency = (stack_input ** 2).sum(axis=(0, 2))[outs[args.selected]]
    report = Report()
    report.data.update({
        "x_shape": list(x.shape),
        "y_shape": list(y.shape),
        "merged_shape": list(outs[MERGED].shape),
        "centres": outs[CENTRES].tolist(),
    })
    for b in range(x.shape[0]):
        out = per_sample(values, b)
        hb = x[b].astype(np.float64)
        _, _, merged, assignment = check_merge(report, hb, out, args.m, args.k, args.lam, saliency, args.eps)
        expected = unmerge(args.unmerge, hb, out["span"], merged, assignment)
        report.max("out_max_abs_diff", np.max(np.abs(out["out"] - expected)))
        report.max("out_scale", np.max(np.abs(expected)))
        report.add("samples", 1)
    if args.reference:
        ref = session(args.reference)
        ref_feeds = {i.name: feeds[i.name] for i in ref.get_inputs() if i.name in feeds}
        ref_feeds[args.ref_x] = outs[MERGED]
        if args.ref_log_sizes:
            # Proportional attention: each merged key's logit + log(its cluster's size).
            assignment = outs[ASSIGNMENT]
            sizes = np.stack([np.bincount(a, minlength=args.m) for a in assignment])
            ref_feeds[args.ref_log_sizes] = np.log(sizes.astype(np.float32))[:, None, None, :]
        (ref_y,) = ref.run([args.ref_y], ref_feeds)
        report.data["span_vs_reference_max_abs_diff"] = float(np.max(np.abs(y - ref_y)))
    print(json.dumps(report.data))


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ["subgraph", "fixture"]:
        p = sub.add_parser(name)
        p.add_argument("model")
        if name == "fixture":
            p.add_argument("npz")
            p.add_argument("--x", required=True)
            p.add_argument("--y", required=True)
            p.add_argument("--reference")
            p.add_argument("--ref-x")
            p.add_argument("--ref-y")
            p.add_argument("--ref-log-sizes")
            p.add_argument("--stack-input")
            p.add_argument("--selected")
        else:
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--clusters", type=int, default=0)
        p.add_argument("--lambda", dest="lam", type=float, default=0.0)
        p.add_argument("--m", type=int, required=True)
        p.add_argument("--k", type=int, required=True)
        p.add_argument("--unmerge", choices=["copy", "residual"], required=True)
        p.add_argument("--eps", type=float, default=1e-5)
    args = parser.parse_args()
    subgraph(args) if args.mode == "subgraph" else fixture(args)


if __name__ == "__main__":
    main()
