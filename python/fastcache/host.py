"""The host side of a fastcache-rewritten model's contract, with nothing but onnxruntime and numpy.

Everything a host needs is in the model's `fastcache` metadata entry: which inputs are cross-step
state, their dtype and shape, and which output feeds each back. `Host` zero-fills the state before
the first step and feeds every state output back as the matching input at the next step. That is
all: no step counter, no special first call. It runs a rewritten model file, or the folder of its
host split (`fastcache rewrite --split DIR`), whose `If` conditions it reads here.

This file is the one place of that loop: `fastcache.Host`, examples/python_host.py and the Triton
Python backend (`fastcache triton --backend python`) all use it.
"""

import json
import os
import types

import numpy as np
import onnxruntime as ort

# The float types a model may take; the sampler below computes in float32 and the host converts
# at the model's boundary (float16 exports), as `fastcache run` does.
FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class SplitSession:
    """A host split (`fastcache rewrite --split DIR`) behind an InferenceSession's interface:
    one session per segment, run in order; at each `If` the condition is read here and only the
    chosen branch runs."""

    def __init__(self, folder, providers=("CPUExecutionProvider",)):
        with open(os.path.join(folder, "manifest.json")) as f:
            self.manifest = json.load(f)
        session = lambda file: ort.InferenceSession(  # noqa: E731
            os.path.join(folder, file), providers=list(providers))
        self.segments = [
            (s, session(s["file"])) if s["kind"] == "graph"
            else (s, session(s["then"]), session(s["else"]))
            for s in self.manifest["segments"]
        ]
        # The model's inputs as the segments that read them declare them.
        declared = {}
        for entry in self.segments:
            for sess in entry[1:]:
                for i in sess.get_inputs():
                    declared.setdefault(i.name, i)
        self.inputs = [declared[name] for name in self.manifest["inputs"] if name in declared]
        self.outputs = [types.SimpleNamespace(name=n) for n in self.manifest["outputs"]]

    def get_modelmeta(self):
        return types.SimpleNamespace(custom_metadata_map=self.manifest["metadata"])

    def get_inputs(self):
        return self.inputs

    def get_outputs(self):
        return self.outputs

    def run(self, names, feeds):
        values = dict(feeds)
        for entry in self.segments:
            if entry[0]["kind"] == "graph":
                sess = entry[1]
            else:
                sess = entry[1] if bool(values[entry[0]["cond"]].reshape(-1)[0]) else entry[2]
            wanted = [i.name for i in sess.get_inputs()]
            outs = [o.name for o in sess.get_outputs()]
            values.update(zip(outs, sess.run(outs, {n: values[n] for n in wanted})))
        return [values[n] for n in names]


class Host:
    """An onnxruntime session plus the model's cross-step state (a path to a model, or to a
    host split's folder)."""

    def __init__(self, path, providers=("CPUExecutionProvider",)):
        if os.path.isdir(path):
            self.session = SplitSession(path, providers)
        else:
            self.session = ort.InferenceSession(path, providers=list(providers))
        entry = self.session.get_modelmeta().custom_metadata_map.get("fastcache")
        self.contract = json.loads(entry) if entry else {"state": [], "stats": []}
        self.state = None
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.float_inputs = {
            i.name: FLOAT_TYPES[i.type] for i in self.session.get_inputs() if i.type in FLOAT_TYPES
        }

    def _named_sizes(self, feeds):
        # A named dim in the contract is the dim of that name on the original inputs.
        sizes = {}
        for model_input in self.session.get_inputs():
            if model_input.name in feeds:
                for dim, size in zip(model_input.shape, feeds[model_input.name].shape):
                    if isinstance(dim, str):
                        sizes[dim] = size
        return sizes

    def reset(self):
        """Forget the cached state: the next call is a first step again."""
        self.state = None

    def __call__(self, feeds):
        """One denoiser call. Returns (outputs by name, stats by name)."""
        if self.state is None:
            sizes = self._named_sizes(feeds)
            self.state = {
                pair["input"]: np.zeros(
                    [sizes[d] if isinstance(d, str) else d for d in pair["shape"]],
                    dtype=np.dtype(pair["dtype"]),
                )
                for pair in self.contract["state"]
            }
        feeds = {name: self._in_model_type(name, value) for name, value in feeds.items()}
        values = dict(zip(self.outputs, self.session.run(self.outputs, {**feeds, **self.state})))
        # State goes back as the model made it; everything else to the sampler in float32.
        for pair in self.contract["state"]:
            self.state[pair["input"]] = values.pop(pair["output"])
        stats = {name: values.pop(name) for name in self.contract["stats"]}
        values = {
            name: value.astype(np.float32) if value.dtype == np.float16 else value
            for name, value in values.items()
        }
        return values, stats

    def _in_model_type(self, name, value):
        wanted = self.float_inputs.get(name)
        if wanted is None or not np.issubdtype(value.dtype, np.floating) or value.dtype == wanted:
            return value
        return value.astype(wanted)
