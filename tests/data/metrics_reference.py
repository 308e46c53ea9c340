"""Independent numpy versions of the bench's metrics, for tests/metrics_reference.rs.

Reads an .npz with images `a`, `b` [H, W] (float32), a data range `range`, and feature sets
`f1` [n, F], `f2` [m, F] (float64). Prints JSON: ssim, psnr and the Frechet distance of Gaussian
fits of f1 and f2.

SSIM here is written the direct way: for every position, the full 2-D Gaussian window (11x11,
sigma 1.5) is cut to the image, renormalised, and the weighted statistics are summed over it;
positions where the whole window fits are averaged when there are any, all positions otherwise.
The Frechet distance takes the trace of the square root of s1 s2 from its (general, non-
symmetric) eigenvalues, as models/train_mnist_classifier.py does; the Rust side goes through
symmetric eigen decompositions instead.
"""
import json
import sys

import numpy as np


def ssim(a, b, data_range):
    a, b = a.astype(np.float64), b.astype(np.float64)
    h, w = a.shape
    half = 5
    d = np.arange(-half, half + 1)
    g = np.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2 * 1.5 ** 2))
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def span(n):
        return range(half, n - half) if n >= 11 else range(n)

    values = []
    for i in span(h):
        for j in span(w):
            y0, y1 = max(0, i - half), min(h, i + half + 1)
            x0, x1 = max(0, j - half), min(w, j + half + 1)
            wt = g[y0 - i + half:y1 - i + half, x0 - j + half:x1 - j + half]
            wt = wt / wt.sum()
            pa, pb = a[y0:y1, x0:x1], b[y0:y1, x0:x1]
            ma, mb = (wt * pa).sum(), (wt * pb).sum()
            va = (wt * (pa - ma) ** 2).sum()
            vb = (wt * (pb - mb) ** 2).sum()
            cov = (wt * (pa - ma) * (pb - mb)).sum()
            values.append(((2 * ma * mb + c1) * (2 * cov + c2))
                          / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def frechet(f1, f2):
    m1, m2 = f1.mean(axis=0), f2.mean(axis=0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0.0, None)).sum()
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def main():
    data = np.load(sys.argv[1])
    a, b, data_range = data["a"], data["b"], float(data["range"])
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    print(json.dumps({
        "ssim": ssim(a, b, data_range),
        "psnr": float(10 * np.log10(data_range ** 2 / mse)),
        "fd": frechet(data["f1"], data["f2"]),
    }))


if __name__ == "__main__":
    main()
