"""Fashion-MNIST at 16x16 for the second trained model in models/trained/ (shared by its training
scripts).

The data come from Debian's package `dataset-fashion-mnist` (Expat licence): the four idx.gz files
of the original release, 60,000 training and 10,000 test images of 28x28 with labels 0..9.
`load_fashion16(split)` uses an installed copy (/usr/share/datasets/fashion-mnist) if there is
one, else runs `apt-get download dataset-fashion-mnist` and `dpkg -x` in a temporary directory
(apt only talks to the registry), parses the files once and caches the result as an .npz outside
the repository (default /tmp/fastcache_fashion/, override with FASTCACHE_DATA_DIR).

Images are area-averaged from 28x28 to 16x16 (each output pixel is the mean of the input area it
covers, fractional pixels weighted by their overlap) and scaled to [-1, 1]: x = 2 * p / 255 - 1.
The order is the package's; callers shuffle with their own seeded generator.
"""

import gzip
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

PACKAGE = "dataset-fashion-mnist"
INSTALLED = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path(os.environ.get("FASTCACHE_DATA_DIR", "/tmp/fastcache_fashion"))
CACHE_FILE = CACHE_DIR / "fashion16_debian.npz"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000),
}
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]
SIZE = 16


def _read_idx(path, magic, count):
    raw = gzip.decompress(path.read_bytes())
    if int.from_bytes(raw[:4], "big") != magic:
        raise ValueError(f"{path.name}: not an idx file with magic {magic:#x}")
    if int.from_bytes(raw[4:8], "big") != count:
        raise ValueError(f"{path.name}: expected {count} items")
    header = 16 if magic == 0x803 else 8
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    return data.reshape(count, 28, 28) if magic == 0x803 else data.copy()


def area_matrix(src, dst):
    """[dst, src] weights: row i averages the part of [0, src) that output pixel i covers."""
    w = np.zeros((dst, src))
    scale = src / dst
    for i in range(dst):
        lo, hi = i * scale, (i + 1) * scale
        for j in range(int(np.floor(lo)), int(np.ceil(hi))):
            w[i, j] = min(hi, j + 1) - max(lo, j)
    return w / scale


def _parse(directory):
    resize = area_matrix(28, SIZE)
    out = {}
    for split, (images_file, labels_file, count) in FILES.items():
        images = _read_idx(directory / images_file, 0x803, count).astype(np.float64) / 255.0
        labels = _read_idx(directory / labels_file, 0x801, count).astype(np.int64)
        small = np.einsum("ij,njk,lk->nil", resize, images, resize)
        out[f"{split}_images"] = (2.0 * small - 1.0).astype(np.float32)[:, None]
        out[f"{split}_labels"] = labels
    return out


def _fetch_and_parse():
    if all((INSTALLED / f).exists() for spec in FILES.values() for f in spec[:2]):
        return _parse(INSTALLED), "installed"
    with tempfile.TemporaryDirectory(prefix="fashion_deb_") as tmp:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, check=True,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deb = next(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        sha1 = hashlib.sha1(deb.read_bytes()).hexdigest()
        subprocess.run(["dpkg", "-x", str(deb), tmp], check=True)
        return _parse(Path(tmp) / "usr/share/datasets/fashion-mnist"), f"{deb.name} sha1 {sha1}"


def load_fashion16(split):
    """Returns (images [N, 1, 16, 16] float32 in [-1, 1], labels [N] int64) for split "train"
    (60,000) or "test" (10,000)."""
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, not {split!r}")
    if not CACHE_FILE.exists():
        arrays, source = _fetch_and_parse()
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = CACHE_FILE.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, source=source, **arrays)
        tmp.replace(CACHE_FILE)
    with np.load(CACHE_FILE) as data:
        return data[f"{split}_images"], data[f"{split}_labels"]


if __name__ == "__main__":
    for split in FILES:
        x, y = load_fashion16(split)
        print(split, x.shape, x.dtype, float(x.min()), float(x.max()), np.bincount(y))
