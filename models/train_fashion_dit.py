#!/usr/bin/env python3
"""Train the second bench model: a deeper class-conditional DiT on Fashion-MNIST (16x16) with
rectified flow, exported with the dynamo exporter.

One-off, offline tool (CPU; at most an hour on 2 shared cores). Not run by CI or cargo. It differs
from the first model (train_mnist_dit.py, whose model, training loop and sampler it reuses) where
caching methods differ: twice the blocks (12), more tokens (64), other data (60,000 images) and
the other PyTorch exporter (torch.export, opset 18). Writes, under models/trained/ (or --out-dir):

  fashion_dit.onnx        dynamo exporter, opset 18, EMA weights, `fastcache.sampler` metadata
  fashion_train_log.txt   configuration, loss every --log-every steps, wall time
  fashion_samples.png     10 rows (classes 0..9) x 8 samples, 50-step Euler with CFG, sampled from
                          the exported ONNX file with ONNX Runtime

    python models/train_fashion_dit.py                      # the committed model
    python models/train_fashion_dit.py --steps 50 --time-budget 120 --out-dir /tmp/fashion_smoke

Model: patch 2 on 1x16x16 -> 64 tokens, hidden 96, 12 adaLN-Zero blocks, 4 heads, MLP ratio 4
(tanh GELU); conditioning c = timestep embedding + class embedding (11 classes, 10 = null).
Objective as the first model's: rectified flow, logit-normal s, timestep = 999 s, velocity target.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spin-waiting triples step time when shared

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_data import load_fashion16  # noqa: E402
from train_mnist_dit import (  # noqa: E402
    MnistDiT, NULL_CLASS, SAMPLER_META, add_training_arguments, check_against_torch, ort_session,
    train_loop, write_samples,
)

MODELS_DIR = Path(__file__).resolve().parent
OPSET = 18  # dynamo at 17 leaves an opset-18 Split attribute that ONNX Runtime refuses
IMAGE_SHAPE = (1, 16, 16)
MAX_ONNX_BYTES = 10 * 1000 * 1000
MODEL_CONFIG = {"image_size": 16, "in_channels": 1, "patch": 2, "hidden": 96, "depth": 12,
                "heads": 4, "mlp_ratio": 4}


def export_onnx(model, path):
    """torch.export with a dynamic batch on every input and the output, then the sampler
    metadata entry."""
    import onnx

    model.eval()
    args = (torch.zeros(2, *IMAGE_SHAPE), torch.tensor([999.0, 500.0]),
            torch.tensor([3, NULL_CLASS]))
    names = ["hidden_states", "timestep", "class_labels"]
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        model, args, dynamo=True, opset_version=OPSET, input_names=names,
        output_names=["sample"], dynamic_shapes=tuple({0: batch} for _ in names),
    )
    program.save(str(path), external_data=False)
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key = "fastcache.sampler"
    entry.value = json.dumps(SAMPLER_META, separators=(",", ":"))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    size = path.stat().st_size
    if size > MAX_ONNX_BYTES:
        raise SystemExit(f"{path} is {size} bytes, over the {MAX_ONNX_BYTES} limit")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(ap, steps=6000, time_budget=55 * 60, samples="fashion_samples.png")
    ap.add_argument("--out-dir", type=Path, default=MODELS_DIR / "trained")
    ap.add_argument("--sample-only", action="store_true",
                    help="no training: redraw fashion_samples.png from the existing "
                         "fashion_dit.onnx (appends a line to fashion_train_log.txt)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(args.out_dir / "fashion_train_log.txt", "a" if args.sample_only else "w")
    onnx_path = args.out_dir / "fashion_dit.onnx"

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    if args.sample_only:
        write_samples(ort_session(onnx_path, args.threads), args, log, IMAGE_SHAPE,
                      "fashion_samples.png")
        log_file.close()
        return

    start = time.time()
    images, labels = load_fashion16("train")
    data_x = torch.from_numpy(images)
    data_y = torch.from_numpy(labels)

    model = MnistDiT(**MODEL_CONFIG)
    ema = MnistDiT(**MODEL_CONFIG)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999),
                            weight_decay=args.weight_decay)
    config = {
        "data": "Debian dataset-fashion-mnist, 60000 training images, 28x28 area-averaged to "
                "16x16, scaled to [-1, 1]",
        "model": "DiT adaLN-Zero " + json.dumps(MODEL_CONFIG) + ", 64 tokens, gelu tanh, "
                 "classes 10 + null 10",
        "parameters": n_params,
        "objective": "rectified flow: x_s = (1-s) x0 + s noise, target v = noise - x0, "
                     "s = sigmoid(N(0,1)), timestep = 999 s",
        "steps": args.steps, "time_budget_s": args.time_budget, "batch": args.batch,
        "optimizer": f"AdamW lr {args.lr} betas (0.9, 0.999) weight decay {args.weight_decay}, "
                     f"linear warm-up {args.warmup} steps then cosine to 0",
        "ema": args.ema, "label_dropout": args.label_dropout, "seed": args.seed,
        "threads": args.threads,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__},
    }
    log("# config " + json.dumps(config))
    log("# step  loss(mean over last log window)  lr  elapsed_s")
    train_loop(model, ema, opt, data_x, data_y, args, rng, log)

    ema.eval()
    export_onnx(ema, onnx_path)
    log(f"# exported {onnx_path.name}: {onnx_path.stat().st_size} bytes, opset {OPSET}, "
        f"dynamo exporter, metadata fastcache.sampler = {json.dumps(SAMPLER_META)}")
    worst = check_against_torch(ema, ort_session(onnx_path, args.threads), args.seed + 1,
                                IMAGE_SHAPE)
    log(f"# ONNX Runtime vs torch (EMA model), batches 1, 2, 3: max |diff| = {worst:.3g}")
    write_samples(ort_session(onnx_path, args.threads), args, log, IMAGE_SHAPE,
                  "fashion_samples.png")
    log(f"# total wall time {time.time() - start:.1f} s")
    log_file.close()


if __name__ == "__main__":
    main()
