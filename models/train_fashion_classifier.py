#!/usr/bin/env python3
"""Train the Fashion-MNIST (16x16) classifier used for the second model's quality metrics, export
it to ONNX.

One-off, offline tool (CPU; about ten minutes). Not run by CI or cargo. Writes, under
models/trained/ (or --out-dir):

  fashion_classifier.onnx   dynamo exporter, opset 18; input `image` [B, 1, 16, 16] float32 in
                            [-1, 1] (the DiT's data range); outputs `logits` [B, 10] and
                            `features` [B, 128] (the penultimate layer, post-ReLU)
  fashion_reference.npz     real-data feature statistics for a Frechet distance (float64):
                            mu, sigma, count over the 10,000 test images (the reference);
                            mu_all, sigma_all, count_all over the 60,000 training images;
                            val_accuracy (on the 10,000 test images); fd_real_floor =
                            FD(1,000 training images, the reference), the distance real images
                            reach at the bench's sample count

    python models/train_fashion_classifier.py

Data: the same Fashion-MNIST as the DiT (models/fashion_data.py): trained on the 60,000 training
images with random shifts of up to one pixel and horizontal flips, evaluated on the 10,000 test
images, which no model here was trained on. The helpers (shift, statistics, Frechet distance,
evaluation) are the MNIST classifier's.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_data import load_fashion16  # noqa: E402
from train_mnist_classifier import (  # noqa: E402
    check_export, frechet_distance, random_shift, run_eval, stats,
)

MODELS_DIR = Path(__file__).resolve().parent
OPSET = 18
FEATURES = 128
FLOOR_COUNT = 1000


class FashionClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 96, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(96)
        self.conv4 = nn.Conv2d(96, 128, 3, padding=1)
        self.bn4 = nn.BatchNorm2d(128)
        self.fc1 = nn.Linear(128 * 4 * 4, 256)
        self.fc2 = nn.Linear(256, FEATURES)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURES, 10)

    def forward(self, image):
        x = F.relu(self.bn1(self.conv1(image)))          # 16x16
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.max_pool2d(x, 2)                            # 8x8
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.relu(self.bn4(self.conv4(x)))
        x = F.max_pool2d(x, 2)                            # 4x4
        x = F.relu(self.fc1(self.dropout(x.flatten(1))))
        features = F.relu(self.fc2(self.dropout(x)))
        logits = self.head(self.dropout(features))
        return logits, features


def augment(x, gen):
    """Random shifts of up to one pixel, then a horizontal flip of half the images."""
    x = random_shift(x, gen)
    flip = torch.rand(len(x), generator=gen) < 0.5
    x[flip] = x[flip].flip(-1)
    return x


def export(model, example, path, accuracy):
    import onnx

    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        model, (example,), dynamo=True, opset_version=OPSET, input_names=["image"],
        output_names=["logits", "features"], dynamic_shapes=({0: batch},),
    )
    program.save(str(path), external_data=False)
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key = "fastcache.classifier"
    entry.value = json.dumps({
        "data": "Debian dataset-fashion-mnist area-averaged to 16x16, pixels scaled to [-1, 1]",
        "features": "penultimate layer (post-ReLU), reference statistics in fashion_reference.npz",
        "val_accuracy": round(accuracy, 4),
    }, separators=(",", ":"))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", type=Path, default=MODELS_DIR / "trained")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    train_x, train_y = (torch.from_numpy(a) for a in load_fashion16("train"))
    test_x, test_y = (torch.from_numpy(a) for a in load_fashion16("test"))
    model = FashionClassifier()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"classifier: {n_params} parameters; train {len(train_x)}, test {len(test_x)}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    total = args.epochs * math.ceil(len(train_x) / args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total,
                                                pct_start=0.15)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train_x), generator=gen)
        total_loss = 0.0
        for i in range(0, len(train_x), args.batch):
            idx = perm[i:i + args.batch]
            logits, _ = model(augment(train_x[idx], gen))
            loss = F.cross_entropy(logits, train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
        test_logits, _ = run_eval(model, test_x)
        acc = float((test_logits.argmax(1) == test_y.numpy()).mean())
        print(f"epoch {epoch + 1:2d}  train loss {total_loss / len(train_x):.4f}  "
              f"test acc {acc:.4f}  {time.time() - start:6.1f} s", flush=True)
    train_s = time.time() - start

    model.eval()
    test_logits, test_feats = run_eval(model, test_x)
    test_acc = float((test_logits.argmax(1) == test_y.numpy()).mean())
    _, train_feats = run_eval(model, train_x)
    mu, sigma = stats(test_feats)
    mu_all, sigma_all = stats(train_feats)
    floor_idx = np.random.default_rng(args.seed + 1).choice(len(train_x), FLOOR_COUNT,
                                                            replace=False)
    fd_floor = frechet_distance(*stats(train_feats[floor_idx]), mu, sigma)
    dead = int((test_feats.max(axis=0) <= 0).sum())
    print(f"test accuracy {test_acc:.4f}; trained in {train_s:.1f} s; FD floor "
          f"({FLOOR_COUNT} training images vs the 10,000 test images) {fd_floor:.2f}; "
          f"feature units never active on test data: {dead}/{FEATURES}")
    np.savez(
        args.out_dir / "fashion_reference.npz",
        mu=mu, sigma=sigma, count=np.int64(len(test_feats)),
        mu_all=mu_all, sigma_all=sigma_all, count_all=np.int64(len(train_feats)),
        val_accuracy=np.float64(test_acc), fd_real_floor=np.float64(fd_floor),
    )

    onnx_path = args.out_dir / "fashion_classifier.onnx"
    export(model, test_x[:2], onnx_path, test_acc)
    check_export(model, onnx_path, test_x, test_y, mu, sigma, args.threads)


if __name__ == "__main__":
    main()
