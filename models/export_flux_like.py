#!/usr/bin/env python3
"""Export a random-weight Flux transformer with FLUX.1's block layout (never committed).

FLUX.1 has 19 double-stream and 38 single-stream blocks at hidden size 3072 (24 heads of 128),
12 B parameters. This keeps the layout (19 + 38 blocks, guidance embedding, 3-axis rotary
positions, packed 16*2*2 = 64-channel latent tokens) and shrinks the width to hidden 256 (4 heads
of 64), so the graph has FLUX.1's structure and node count per block but runs in well under a
second on two CPU cores. The weights are random: the model is for structure and timing, not for
quality.

    /work/torchenv/bin/python models/export_flux_like.py [--out-dir models/large] [--seed 0]

Needs the pinned torch and diffusers (0.42.1) of models/requirements.txt. Exports with the
TorchScript exporter at opset 17, with the two export-time patches of the `flux` fixture
(export_fixtures.py), batch axis dynamic, and writes OUT/flux_like.onnx with every initializer in
OUT/flux_like.onnx.data, plus OUT/flux_like.npz: the batch-1 inputs (keys = the ONNX input names)
and PyTorch's output (key `output`). It then checks with ONNX Runtime (CPU) that the file
reproduces PyTorch at batches 1 and 2 and times a batch-1 call on 2 intra-op threads.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import diffusers
import numpy as np
import onnx
import onnxruntime as ort
import torch
from diffusers import FluxTransformer2DModel

from export_fixtures import (
    PINNED_DIFFUSERS,
    InputSpec,
    _flux_forward,
    _positional,
    decompose_rms_norm,
    export_torchscript,
    flux_guidance,
    make_inputs,
    max_diff,
    normal,
    redraw_by_name,
    save_npz,
    save_with_external_data,
    unflatten_as_reshape,
    unit_timesteps,
)

# export_fixtures pins torch to one thread on import; this script may use both cores.
torch.set_num_threads(2)

# FLUX.1's layout at a small width.
CONFIG = dict(
    patch_size=1,
    in_channels=64,  # a 16-channel latent packed 2x2, as FLUX.1
    out_channels=None,  # = in_channels
    num_layers=19,  # double-stream blocks
    num_single_layers=38,  # single-stream blocks
    attention_head_dim=64,
    num_attention_heads=4,  # hidden 256
    joint_attention_dim=512,
    pooled_projection_dim=128,
    guidance_embeds=True,
    axes_dims_rope=(8, 28, 28),  # sums to the head dim
)

# A 16x32x32 latent packed 2x2 -> 16x16 = 256 image tokens (a 64x64-pixel-equivalent latent
# grid), and 64 text tokens.
GRID = 16
IMAGE_TOKENS = GRID * GRID
TEXT_TOKENS = 64

EXPORT_BATCH = 2  # traced at 2, checked at 1 and 2: a batch baked into the graph shows up
CHECK_BATCHES = (1, 2)
SAVED_BATCH = 1  # the batch of the .npz and of the timing
TIMED_CALLS = 5
ORT_THREADS = 2


def img_ids(b, g):
    # As FluxPipeline._prepare_latent_image_ids: (0, row, col) per packed token, row-major.
    ids = torch.zeros(GRID, GRID, 3)
    ids[..., 1] = torch.arange(GRID)[:, None]
    ids[..., 2] = torch.arange(GRID)[None, :]
    return ids.reshape(IMAGE_TOKENS, 3)


def txt_ids(b, g):
    return torch.zeros(TEXT_TOKENS, 3)


INPUTS = [
    InputSpec("hidden_states", normal(IMAGE_TOKENS, CONFIG["in_channels"])),  # packed latent
    InputSpec("encoder_hidden_states", normal(TEXT_TOKENS, CONFIG["joint_attention_dim"])),
    InputSpec("pooled_projections", normal(CONFIG["pooled_projection_dim"])),
    InputSpec("timestep", unit_timesteps),
    InputSpec("img_ids", img_ids, batched=False),
    InputSpec("txt_ids", txt_ids, batched=False),
    InputSpec("guidance", flux_guidance),
]
OUTPUT_NAME = "sample"


def session(path, threads):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "large")
    parser.add_argument("--seed", type=int, default=0, help="weights and inputs (default 0)")
    args = parser.parse_args()
    if diffusers.__version__ != PINNED_DIFFUSERS:
        raise SystemExit(f"needs diffusers {PINNED_DIFFUSERS} (the single blocks' layout changes "
                         f"between versions); {diffusers.__version__} is imported")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    torch.manual_seed(args.seed)
    model = FluxTransformer2DModel(**CONFIG)
    model = _positional(redraw_by_name(model, args.seed), _flux_forward)
    params = sum(p.numel() for p in model.parameters())
    print(f"FluxTransformer2DModel (diffusers {diffusers.__version__}), 19 + 38 blocks, hidden 256: "
          f"{params:,d} parameters ({params * 4 / 1e6:.0f} MB in fp32)")

    names = [s.name for s in INPUTS]
    # References before the export, as export_dit_xl.py does (it saw a module changed by the
    # TorchScript export).
    cases = {}
    for batch in sorted({EXPORT_BATCH, *CHECK_BATCHES}):
        inputs = make_inputs(INPUTS, batch, args.seed * 1000 + batch)
        with torch.no_grad():
            cases[batch] = (inputs, model(*inputs).numpy())
    for batch, (_, out) in cases.items():
        if not np.isfinite(out).all():
            raise SystemExit(f"PyTorch output at batch {batch} is not finite")
    print(f"PyTorch output at batch {SAVED_BATCH}: shape {list(cases[SAVED_BATCH][1].shape)}, "
          f"max |x| {np.abs(cases[SAVED_BATCH][1]).max():.3g}, std {cases[SAVED_BATCH][1].std():.3g}")

    target = args.out_dir / "flux_like.onnx"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.out_dir) as scratch:
        raw = Path(scratch) / "raw.onnx"
        with contextlib.ExitStack() as patches, torch.no_grad():
            patches.enter_context(decompose_rms_norm())
            patches.enter_context(unflatten_as_reshape())
            export_torchscript(model, cases[EXPORT_BATCH][0], INPUTS, OUTPUT_NAME, raw)
        data = save_with_external_data(raw, target)
    print(f"TorchScript export (opset 17) and re-save: {time.perf_counter() - t0:.1f} s")
    onnx.checker.check_model(str(target))
    graph = onnx.load(str(target), load_external_data=False).graph
    print(f"{len(graph.node)} nodes, {len(graph.initializer)} initializers (all in {data.name})")

    npz = target.with_suffix(".npz")
    saved_inputs, saved_out = cases[SAVED_BATCH]
    save_npz(npz, {**{n: a.numpy() for n, a in zip(names, saved_inputs)}, "output": saved_out})

    sess = session(target, ORT_THREADS)
    got = [i.name for i in sess.get_inputs()]
    if got != names:
        raise SystemExit(f"ONNX inputs {got}, expected {names}")
    diffs = {}
    for batch in CHECK_BATCHES:
        inputs, ref = cases[batch]
        out = sess.run(None, {n: a.numpy() for n, a in zip(names, inputs)})[0]
        diffs[batch] = max_diff(out, ref)
    print("ONNX Runtime vs PyTorch: max |diff| "
          + ", ".join(f"batch {b} = {d:.2e}" for b, d in diffs.items()))

    feeds = {n: a.numpy() for n, a in zip(names, saved_inputs)}
    sess.run(None, feeds)  # warm-up
    times = []
    for _ in range(TIMED_CALLS):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    print(f"ONNX Runtime CPU, batch {SAVED_BATCH}, {ORT_THREADS} intra-op threads: "
          f"median {statistics.median(times):.1f} ms per call "
          f"(min {min(times):.1f}, max {max(times):.1f}, {TIMED_CALLS} calls after a warm-up)")

    print("files:")
    for path in (target, data, npz):
        print(f"  {path}  {path.stat().st_size:,d} B")
    print(f"done in {time.perf_counter() - started:.0f} s")
    if max(diffs.values()) > 1e-3:
        raise SystemExit("ONNX Runtime does not reproduce PyTorch")


if __name__ == "__main__":
    sys.exit(main())
