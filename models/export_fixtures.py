#!/usr/bin/env python3
"""Regenerate the ONNX test fixtures under models/fixtures/.

One-off, offline tool: it is not run by CI or by cargo. The Rust tests only
read the files this script wrote. See models/README.md for what each file is.

    pip install -r models/requirements.txt
    python models/export_fixtures.py

One family (flux034) needs an older diffusers, installed aside and put in
front of the pinned one for that run only:

    pip install --no-deps --target /work/diffusers034 diffusers==0.34.0
    PYTHONPATH=/work/diffusers034 python models/export_fixtures.py flux034

A plain run exports every family whose diffusers version is the imported one;
naming a family whose version differs refuses with the command to use.

Every model is tiny and randomly initialised from a fixed seed. For each
exported file the script checks, with ONNX Runtime on CPU, that the graph
reproduces PyTorch's float32 output at batch 2 (the saved reference) and at
batches 1 and 3 (to prove the batch dimension really is dynamic). Any mismatch,
or any file of 1 MiB or more, aborts.
"""

import os

# Set before torch/onnxruntime are imported so their thread pools see them:
# nothing is downloaded (models are built from configs) and the machine is
# shared, so spinning OpenMP workers would only steal cycles from others.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib
import io
import sys
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import diffusers
import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
)

torch.set_num_threads(1)

OUT_DIR = Path(__file__).resolve().parent / "fixtures"
NEG_DIR = OUT_DIR / "negative"

TOLERANCE = 1e-4
# float16 has 11 significant bits: ORT and PyTorch round differently along the way.
HALF_TOLERANCE = 2e-2
MAX_FILE_BYTES = 1 << 20
REFERENCE_BATCH = 2
CHECK_BATCHES = (1, 3)  # differ from the export batch, so a baked-in batch shows up

# Sizes shared by the three diffusers models: hidden size 16, 8x8 latent,
# 2x2 patches -> 16 tokens. Three layers so that "all blocks look alike" is
# observable (two would be the degenerate first/last pair).
LATENT_CHANNELS = 4
LATENT_SIZE = 8
NUM_LAYERS = 3
TEXT_TOKENS = 6
TEXT_CHANNELS = 32
DIT_NUM_CLASSES = 10  # class id 10 is then the CFG "null" class

# Flux takes the latent already packed: each 2x2 patch of the 4x8x8 latent
# becomes one token of 4*2*2 = 16 channels, so 4x4 = 16 image tokens.
FLUX_GRID = LATENT_SIZE // 2
FLUX_TOKENS = FLUX_GRID * FLUX_GRID
FLUX_CHANNELS = LATENT_CHANNELS * 4
FLUX_GUIDANCE = 3.5

# diffusers version every family is exported with unless it says otherwise
# (requirements.txt pins it); flux034 records its own.
PINNED_DIFFUSERS = "0.42.1"
DIFFUSERS_034_DIR = "/work/diffusers034"

TORCHSCRIPT_OPSET = 17
# Dynamo at opset 17 leaves an opset-18 style Split (num_outputs) that ONNX
# Runtime rejects, so the dynamo exports use 18.
DYNAMO_OPSET = 18


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------

@dataclass
class InputSpec:
    name: str
    make: Callable[[int, torch.Generator], torch.Tensor]  # (batch, rng) -> tensor
    # False for inputs without a batch axis (Flux's position ids): exported
    # with static shapes, and `make` ignores the batch it is given.
    batched: bool = True


def normal(*tail):
    return lambda b, g: torch.randn(b, *tail, generator=g)


def int_timesteps(b, g):
    # DDIM/DPM-Solver schedulers hand the DiT and PixArt pipelines int64
    # timesteps in [0, 1000); matching that dtype keeps the graph's leading
    # Cast, as a real pipeline export would have it.
    return torch.randint(0, 1000, (b,), generator=g, dtype=torch.int64)


def float_timesteps(b, g):
    # SD3's flow-matching scheduler passes sigma * 1000 as float.
    return torch.rand(b, generator=g) * 1000.0


def unit_timesteps(b, g):
    # The Flux pipelines pass the scheduler's sigma (t / 1000) in (0, 1);
    # the model multiplies it by 1000 itself.
    return torch.rand(b, generator=g) * 0.98 + 0.01


def flux_guidance(b, g):
    # Guidance-distilled Flux (dev) takes the guidance scale as an input,
    # the same value for every sample (its pipeline runs no CFG batch).
    return torch.full((b,), FLUX_GUIDANCE)


def flux_img_ids(b, g):
    # As FluxPipeline._prepare_latent_image_ids: (0, row, col) of each packed
    # token on the 4x4 grid, row-major, float32, no batch axis.
    ids = torch.zeros(FLUX_GRID, FLUX_GRID, 3)
    ids[..., 1] = torch.arange(FLUX_GRID)[:, None]
    ids[..., 2] = torch.arange(FLUX_GRID)[None, :]
    return ids.reshape(FLUX_TOKENS, 3)


def flux_txt_ids(b, g):
    # The pipelines give all text tokens position (0, 0, 0).
    return torch.zeros(TEXT_TOKENS, 3)


def dit_class_labels(b, g):
    # Last sample is the null class, as in the unconditional half of a CFG batch.
    labels = torch.randint(0, DIT_NUM_CLASSES, (b,), generator=g, dtype=torch.int64)
    labels[-1] = DIT_NUM_CLASSES
    return labels


def make_inputs(specs, batch, seed):
    g = torch.Generator().manual_seed(seed)
    return [s.make(batch, g) for s in specs]


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------
# The diffusers models take keyword arguments and return a dataclass. Both
# exporters want positional tensors in and a tensor out. Rather than wrapping
# the model in another nn.Module (which would prefix every initialiser and
# name scope with the wrapper's attribute name, unlike a real export), the
# instance's own forward is replaced by a thin positional one.

def _dit_forward(self, hidden_states, timestep, class_labels):
    return DiTTransformer2DModel.forward(
        self, hidden_states, timestep=timestep, class_labels=class_labels, return_dict=False
    )[0]


def _pixart_forward(self, hidden_states, encoder_hidden_states, timestep):
    return PixArtTransformer2DModel.forward(
        self,
        hidden_states,
        encoder_hidden_states=encoder_hidden_states,
        timestep=timestep,
        return_dict=False,
    )[0]


def _sd3_forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
    return SD3Transformer2DModel.forward(
        self,
        hidden_states,
        encoder_hidden_states=encoder_hidden_states,
        pooled_projections=pooled_projections,
        timestep=timestep,
        return_dict=False,
    )[0]


def _flux_forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep,
                  img_ids, txt_ids, guidance):
    # Same body for diffusers 0.42.1 and 0.34.0: FluxTransformer2DModel is
    # whichever of the two was imported.
    return FluxTransformer2DModel.forward(
        self,
        hidden_states,
        encoder_hidden_states=encoder_hidden_states,
        pooled_projections=pooled_projections,
        timestep=timestep,
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=guidance,
        return_dict=False,
    )[0]


def _positional(model, forward):
    model.forward = types.MethodType(forward, model)
    return model.eval()


def build_dit():
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS,  # learned sigma: [epsilon | variance]
        num_layers=NUM_LAYERS,
        sample_size=LATENT_SIZE,
        patch_size=2,
        num_embeds_ada_norm=DIT_NUM_CLASSES,
    )
    return _positional(model, _dit_forward)


def build_pixart():
    model = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS,  # learned sigma, as in PixArt-alpha
        num_layers=NUM_LAYERS,
        sample_size=LATENT_SIZE,
        patch_size=2,
        num_embeds_ada_norm=DIT_NUM_CLASSES,
        cross_attention_dim=16,
        caption_channels=TEXT_CHANNELS,
        use_additional_conditions=False,
    )
    return _positional(model, _pixart_forward)


def build_sd3():
    model = SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_layers=NUM_LAYERS,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_CHANNELS,
        caption_projection_dim=16,  # must equal the hidden size (2 heads x 8)
        pooled_projection_dim=TEXT_CHANNELS,
        out_channels=LATENT_CHANNELS,  # flow matching: no learned variance
        pos_embed_max_size=LATENT_SIZE,  # larger than the 4x4 grid, so the crop is real
    )
    return _positional(model, _sd3_forward)


def build_sd35():
    # SD3.5-style (Medium): layer 0 also runs an image-only self-attention
    # (attn2) beside the joint attention, and q/k are RMS-normalised.
    model = SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_layers=NUM_LAYERS,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_CHANNELS,
        caption_projection_dim=16,
        pooled_projection_dim=TEXT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        pos_embed_max_size=LATENT_SIZE,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    return _positional(model, _sd3_forward)


FLUX_WEIGHT_SEED = 8


@torch.no_grad()
def redraw_by_name(model, seed):
    """Re-initialise every parameter in sorted-name order from one generator.

    diffusers 0.34 and 0.42 give FluxTransformer2DModel the same parameter
    names and shapes but register them in another order, so a seeded default
    init differs between them. Drawing each Linear weight and bias from
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), nn.Linear's own default
    distribution, by name makes flux and flux034 the same function with the
    same weights. 1-D `.weight`s (the RMSNorm scales) stay at their ones.
    """
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    for name in sorted(params):
        p = params[name]
        if name.endswith(".weight") and p.dim() == 2:
            fan_in = p.shape[1]
        elif name.endswith(".bias"):
            fan_in = params[name[: -len("bias")] + "weight"].shape[1]
        else:
            assert name.endswith(".weight") and p.dim() == 1, name
            continue
        bound = fan_in ** -0.5
        p.copy_(torch.rand(p.shape, generator=g) * (2 * bound) - bound)
    return model


def build_flux():
    # Hidden size 16 (2 heads x 8); the rotary axes (2, 2, 4) sum to the head
    # dim. Two double-stream and two single-stream blocks.
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=FLUX_CHANNELS,
        out_channels=None,  # = in_channels
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_CHANNELS,
        pooled_projection_dim=TEXT_CHANNELS,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )
    return _positional(redraw_by_name(model, FLUX_WEIGHT_SEED), _flux_forward)


# Negative fixtures: graphs that are not diffusion transformers. Kept
# self-written and small; what matters is their shape, not their weights.

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, stride=2)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.head(x.mean(dim=(2, 3)))


class PlainAttentionLayer(nn.Module):
    """Pre-norm attention + MLP, but each sub-block *replaces* its input.

    A transformer layer without `x = x + f(x)`: the repeated-block pattern is
    there, the residual chain that caching relies on is not.
    """

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        x = self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class TransformerNoResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([PlainAttentionLayer() for _ in range(NUM_LAYERS)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


# ---------------------------------------------------------------------------
# Export helpers
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def squeeze_only_unit_dims():
    """Make `t.squeeze(dim)` a no-op in Python when that dim is not size 1.

    PixArt ends with `hidden_states.squeeze(1)` on a [B, tokens, C] tensor,
    which eager PyTorch silently ignores. Both exporters keep it as a real
    Squeeze on axis 1 (TorchScript inside an If, dynamo bare), and ONNX
    Runtime refuses to load either graph: shape inference finds 16 tokens on
    that axis, not 1. Resolving the no-op while tracing yields the graph eager
    mode actually executes.
    """
    original = torch.Tensor.squeeze

    def squeeze(self, *args, **kwargs):
        dim = args[0] if args else kwargs.get("dim")
        if isinstance(dim, int):
            # Under the TorchScript tracer sizes come back as 0-d tensors, so
            # int() them; a symbolic (dynamic) size is left to the exporter.
            size = self.shape[dim]
            if not isinstance(size, torch.SymInt) and int(size) != 1:
                return self
        return original(self, *args, **kwargs)

    torch.Tensor.squeeze = squeeze
    try:
        yield
    finally:
        torch.Tensor.squeeze = original


@contextlib.contextmanager
def decompose_rms_norm():
    """Trace `F.rms_norm` as its formula rather than as `aten::rms_norm`.

    diffusers >= 0.35 gives FluxAttention `torch.nn.RMSNorm` q/k norms. The
    TorchScript exporter has no symbolic for `aten::rms_norm` (ONNX has
    RMSNormalization only from opset 23) and refuses the model. Tracing the
    same computation written out, as diffusers' own RMSNorm class does it
    (the one SD3.5 and diffusers 0.34's Flux use), gives Pow, ReduceMean,
    Add, Sqrt, Div and Mul under the norm's name scope. The dynamo exporter
    decomposes it by itself and is not patched.
    """
    original = torch.nn.functional.rms_norm

    def rms_norm(input, normalized_shape, weight=None, eps=None):
        if eps is None:
            eps = torch.finfo(input.dtype).eps
        dims = tuple(range(-len(normalized_shape), 0))
        out = input * torch.rsqrt(input.pow(2).mean(dims, keepdim=True) + eps)
        return out if weight is None else out * weight

    torch.nn.functional.rms_norm = rms_norm
    try:
        yield
    finally:
        torch.nn.functional.rms_norm = original


@contextlib.contextmanager
def unflatten_as_reshape():
    """Trace `t.unflatten(dim, sizes)` as a reshape to sizes read off `t`.

    diffusers >= 0.35's FluxAttnProcessor splits heads with `unflatten`. The
    TorchScript exporter's unflatten computes its target shape with a Mod and
    dynamic Slices that its shape inference cannot follow, so it keeps the
    traced (batch 2) shape for the result; the `x.reshape(*x.shape[:-1], -1,
    2)` of the rotary embedding right after then becomes a constant
    [2, 22, 2, -1, 2] and ONNX Runtime fails at batches 1 and 3. (Without
    constant folding the shape stays dynamic, but the whole graph changes.) A
    reshape to `t.shape[:dim] + sizes + t.shape[dim+1:]` is the same
    computation with the batch read at run time, as the `view(batch, -1,
    heads, head_dim)` of diffusers 0.34 and SD3 does. Dynamo is not patched.
    """
    original = torch.Tensor.unflatten

    def unflatten(self, dim, sizes):
        dim = dim % self.dim()
        return self.reshape(*self.shape[:dim], *sizes, *self.shape[dim + 1:])

    torch.Tensor.unflatten = unflatten
    try:
        yield
    finally:
        torch.Tensor.unflatten = original


def export_torchscript(model, args, specs, output_name, path, fixed_batch=False):
    input_names = [s.name for s in specs]
    batched = [s.name for s in specs if s.batched]
    torch.onnx.export(
        model,
        tuple(args),
        str(path),
        dynamo=False,
        opset_version=TORCHSCRIPT_OPSET,
        input_names=input_names,
        output_names=[output_name],
        dynamic_axes=None if fixed_batch else
        {name: {0: "batch"} for name in [*batched, output_name]},
    )


STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def export_dynamo(model, args, specs, output_name, path, fixed_batch=False, drop_stack_traces=False):
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        model,
        tuple(args),
        dynamo=True,
        opset_version=DYNAMO_OPSET,
        input_names=[s.name for s in specs],
        output_names=[output_name],
        dynamic_shapes=None if fixed_batch else
        tuple({0: batch} if s.batched else None for s in specs),
    )
    if drop_stack_traces:
        # Only to fit MAX_FILE_BYTES: in the Flux graphs this one key is about a
        # third of the file. The other metadata (name_scopes, ...) stays.
        for node in program.model.graph.all_nodes():
            node.metadata_props.pop(STACK_TRACE_KEY, None)
    # Saved explicitly so the weights end up inside the .onnx file rather
    # than beside it, whatever the exporter's default for external data is.
    program.save(str(path), external_data=False)


def save_with_external_data(src, dst):
    """Copy `src` to `dst`, moving every initializer into one `<dst>.data`."""
    location = dst.name + ".data"
    # onnx appends to an existing data file, so a stale one would corrupt offsets.
    (dst.parent / location).unlink(missing_ok=True)
    model = onnx.load(str(src))
    onnx.save_model(
        model,
        str(dst),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return dst.parent / location


def save_npz(path, arrays):
    """Like np.savez, but byte-reproducible.

    np.savez stamps each member with the current time, so every rerun would
    show all .npz fixtures as changed. A fixed timestamp avoids that churn;
    np.load reads the result as usual.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())


def ort_run(path, input_names, args):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got_names = [i.name for i in session.get_inputs()]
    if got_names != input_names:
        raise SystemExit(f"{path.name}: ONNX inputs {got_names}, expected {input_names}")
    feeds = {n: a.numpy() for n, a in zip(input_names, args)}
    return session.run(None, feeds)[0]


def max_diff(a, b):
    if a.shape != b.shape:
        raise SystemExit(f"shape mismatch: ORT {a.shape} vs torch {b.shape}")
    return float(np.abs(a - b).max())


def describe(path):
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(str(path))  # path form so external data is checked too

    def fmt(vi):
        t = vi.type.tensor_type
        dims = [d.dim_param or str(d.dim_value) for d in t.shape.dim]
        return f"{vi.name}: {onnx.TensorProto.DataType.Name(t.elem_type).lower()}[{', '.join(dims)}]"

    scoped = sum(
        any(p.key == "pkg.torch.onnx.name_scopes" for p in n.metadata_props) for n in model.graph.node
    )
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {
        "inputs": [fmt(i) for i in model.graph.input],
        "outputs": [fmt(o) for o in model.graph.output],
        "nodes": len(model.graph.node),
        "name_scoped_nodes": scoped,
        "opset": opset,
    }


# ---------------------------------------------------------------------------
# Fixture table
# ---------------------------------------------------------------------------

DIT_INPUTS = [
    InputSpec("hidden_states", normal(LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)),
    InputSpec("timestep", int_timesteps),
    InputSpec("class_labels", dit_class_labels),
]
PIXART_INPUTS = [
    InputSpec("hidden_states", normal(LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)),
    InputSpec("encoder_hidden_states", normal(TEXT_TOKENS, TEXT_CHANNELS)),
    InputSpec("timestep", int_timesteps),
]
SD3_INPUTS = [
    InputSpec("hidden_states", normal(LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)),
    InputSpec("encoder_hidden_states", normal(TEXT_TOKENS, TEXT_CHANNELS)),
    InputSpec("pooled_projections", normal(TEXT_CHANNELS)),
    InputSpec("timestep", float_timesteps),
]
FLUX_INPUTS = [
    InputSpec("hidden_states", normal(FLUX_TOKENS, FLUX_CHANNELS)),  # packed latent
    InputSpec("encoder_hidden_states", normal(TEXT_TOKENS, TEXT_CHANNELS)),
    InputSpec("pooled_projections", normal(TEXT_CHANNELS)),
    InputSpec("timestep", unit_timesteps),
    InputSpec("img_ids", flux_img_ids, batched=False),
    InputSpec("txt_ids", flux_txt_ids, batched=False),
    InputSpec("guidance", flux_guidance),
]


@dataclass
class Family:
    stem: str
    build: Callable[[], nn.Module]
    inputs: list
    seed: int
    exporters: tuple  # subset of ("ts", "dynamo")
    out_dir: Path = OUT_DIR
    output_name: str = "sample"  # diffusers' Transformer2DModelOutput field
    patch: Callable = contextlib.nullcontext
    ts_patches: tuple = ()  # more context managers, entered for the TorchScript export only
    # Dynamo export only: remove every node's pkg.torch.onnx.stack_trace
    # metadata (the one way the Flux graphs stay under MAX_FILE_BYTES).
    drop_stack_traces: bool = False
    # Exported at the reference batch (the CFG pair) with no dynamic axis, as users often do;
    # the exporters then fold batch x heads into one constant axis in attention's reshapes.
    fixed_batch: bool = False
    # Weights, float inputs and output in float16, as GPU deployments export them; the model runs
    # in float16 in PyTorch too, so the check against ORT has float16's tolerance.
    half: bool = False
    # The diffusers version the graph is exported with; main() refuses to
    # export the family under any other (the layout changes between them).
    diffusers_version: str = PINNED_DIFFUSERS
    how_to_run: str = ""  # command shown when the imported diffusers differs

    @property
    def suffix(self):
        return (f"_b{REFERENCE_BATCH}" if self.fixed_batch else "") + ("_f16" if self.half else "")

    @property
    def key(self):
        return self.stem + self.suffix


FAMILIES = [
    Family("dit", build_dit, DIT_INPUTS, seed=1, exporters=("ts", "dynamo")),
    Family("pixart", build_pixart, PIXART_INPUTS, seed=2, exporters=("ts", "dynamo"),
           patch=squeeze_only_unit_dims),
    Family("sd3", build_sd3, SD3_INPUTS, seed=3, exporters=("ts", "dynamo")),
    Family("sd35", build_sd35, SD3_INPUTS, seed=7, exporters=("ts", "dynamo")),
    Family("flux", build_flux, FLUX_INPUTS, seed=8, exporters=("ts", "dynamo"),
           ts_patches=(decompose_rms_norm, unflatten_as_reshape), drop_stack_traces=True),
    # Same model, config, seed and inputs as flux, built by diffusers 0.34.0,
    # whose single-stream blocks run on one stream concatenated once.
    Family("flux034", build_flux, FLUX_INPUTS, seed=8, exporters=("ts", "dynamo"),
           diffusers_version="0.34.0", drop_stack_traces=True,
           how_to_run=f"pip install --no-deps --target {DIFFUSERS_034_DIR} diffusers==0.34.0; "
                      f"PYTHONPATH={DIFFUSERS_034_DIR} python models/export_fixtures.py flux034"),
    Family("dit", build_dit, DIT_INPUTS, seed=1, exporters=("ts", "dynamo"), fixed_batch=True),
    Family("dit", build_dit, DIT_INPUTS, seed=1, exporters=("ts", "dynamo"), half=True),
    Family("pixart", build_pixart, PIXART_INPUTS, seed=2, exporters=("ts", "dynamo"),
           patch=squeeze_only_unit_dims, fixed_batch=True),
    Family("mlp", MLP, [InputSpec("x", normal(32))], seed=4, exporters=("ts",),
           out_dir=NEG_DIR, output_name="output"),
    Family("cnn", CNN, [InputSpec("x", normal(3, 16, 16))], seed=5, exporters=("ts",),
           out_dir=NEG_DIR, output_name="output"),
    Family("transformer_no_residual", TransformerNoResidual, [InputSpec("x", normal(16, 16))],
           seed=6, exporters=("ts",), out_dir=NEG_DIR, output_name="output"),
]

EXPORTERS = {"ts": export_torchscript, "dynamo": export_dynamo}


def file_name(family, exporter):
    # Negative fixtures have a single (TorchScript) export, so no suffix.
    if family.out_dir == NEG_DIR:
        return f"{family.stem}.onnx"
    return f"{family.stem}_{exporter}{family.suffix}.onnx"


def main():
    # `export_fixtures.py [KEY ...]`: only those families (dit, pixart, sd3, dit_b2, ...).
    wanted = set(sys.argv[1:])
    unknown = wanted - {f.key for f in FAMILIES}
    if unknown:
        raise SystemExit(f"unknown families {sorted(unknown)}; known: {[f.key for f in FAMILIES]}")
    have = diffusers.__version__
    mismatched = [f for f in FAMILIES if f.key in wanted and f.diffusers_version != have]
    if mismatched:
        lines = [f"  {f.key}: needs diffusers {f.diffusers_version}"
                 + (f"; run: {f.how_to_run}" if f.how_to_run else
                    f" (requirements.txt), without PYTHONPATH={DIFFUSERS_034_DIR}")
                 for f in mismatched]
        raise SystemExit(f"diffusers {have} is imported (from {Path(diffusers.__file__).parent}), "
                         "but:\n" + "\n".join(lines))
    NEG_DIR.mkdir(parents=True, exist_ok=True)
    failures = []
    report = []

    def verify(path, names, cases, tolerance):
        diffs = {batch: max_diff(ort_run(path, names, args), out) for batch, (args, out) in cases.items()}
        ok = all(d < tolerance for d in diffs.values())
        shown = ", ".join(f"batch {b} = {d:.3e}" for b, d in diffs.items())
        print(f"  {path.name}: max|ORT - torch| {shown} {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(path.name)
        report.append((path, describe(path)))

    for fam in FAMILIES:
        if wanted and fam.key not in wanted:
            continue
        if fam.diffusers_version != have:  # only in a plain run: named ones were checked above
            print(f"{fam.key}: skipped, needs diffusers {fam.diffusers_version} (have {have})"
                  + (f"; run: {fam.how_to_run}" if fam.how_to_run else ""))
            continue
        print(f"{fam.key}:")
        torch.manual_seed(fam.seed)
        model = fam.build()
        if fam.half:
            model = model.half()
        n_params = sum(p.numel() for p in model.parameters())
        print(f"  {type(model).__name__} (diffusers {have}), {n_params} parameters")

        names = [s.name for s in fam.inputs]
        # batch -> (inputs, torch output); the reference batch is listed first
        # and is the one saved beside the model.
        cases = {}
        for batch in (REFERENCE_BATCH, *(() if fam.fixed_batch else CHECK_BATCHES)):
            args = make_inputs(fam.inputs, batch, fam.seed * 1000 + batch)
            if fam.half:
                args = [a.half() if a.is_floating_point() else a for a in args]
            with torch.no_grad():
                cases[batch] = (args, model(*args).numpy())
        ref_args, ref_out = cases[REFERENCE_BATCH]
        reference = {**{n: a.numpy() for n, a in zip(names, ref_args)}, "output": ref_out}

        for exporter in fam.exporters:
            path = fam.out_dir / file_name(fam, exporter)
            with contextlib.ExitStack() as patches:
                patches.enter_context(fam.patch())
                for ts_patch in fam.ts_patches if exporter == "ts" else ():
                    patches.enter_context(ts_patch())
                extra = {"drop_stack_traces": True} if exporter == "dynamo" and fam.drop_stack_traces else {}
                EXPORTERS[exporter](model, ref_args, fam.inputs, fam.output_name, path,
                                    fixed_batch=fam.fixed_batch, **extra)
            save_npz(path.with_suffix(".npz"), reference)
            verify(path, names, cases, HALF_TOLERANCE if fam.half else TOLERANCE)

            if fam.key == "dit" and exporter == "ts":
                ext = OUT_DIR / "dit_ts_external.onnx"
                save_with_external_data(path, ext)
                save_npz(ext.with_suffix(".npz"), reference)
                verify(ext, names, cases, TOLERANCE)

    print("\nfiles:")
    for path in sorted(p for p in OUT_DIR.rglob("*") if p.is_file()):
        size = path.stat().st_size
        flag = "" if size < MAX_FILE_BYTES else "  TOO LARGE"
        if flag:
            failures.append(path.name)
        print(f"  {path.relative_to(OUT_DIR.parent)}  {size:>9,d} B{flag}")

    print("\ngraphs:")
    for path, info in report:
        print(f"  {path.relative_to(OUT_DIR.parent)}: opset {info['opset']}, {info['nodes']} nodes, "
              f"{info['name_scoped_nodes']} with name_scopes metadata")
        print(f"    in : {'; '.join(info['inputs'])}")
        print(f"    out: {'; '.join(info['outputs'])}")

    if failures:
        raise SystemExit(f"\nFAILED: {', '.join(failures)}")
    print("\nall fixtures verified")


if __name__ == "__main__":
    sys.exit(main())
