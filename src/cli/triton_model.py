"""Triton Python-backend model written by `fastcache triton --backend python`.

Serves a fastcache-rewritten model (model.onnx beside this file) under Triton's sequence batcher.
The cross-step state stays here: one state per correlation id, run by `Host` (fastcache_host.py,
the same loop as `fastcache.Host`) on one shared onnxruntime session. The batcher's control
inputs say which sequence a request belongs to (CORRID), that it starts one (START: the state
is zero-filled again, so the call is a first step) or ends it (END: the state is dropped). A
sequence idle longer than the config's max_sequence_idle_microseconds is dropped here too, as
Triton drops it; its next request without START gets an error. A request that fails (a bad
shape, a sequence without state) gets its own error and leaves every state as it was.
"""

import json
import os
import sys
import time

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from fastcache_host import Host  # noqa: E402

CONTROLS = ("START", "END", "CORRID")


class RequestError(Exception):
    """A request this model refuses; the message goes back to its client."""


class Sequence:
    def __init__(self, sizes):
        self.state = None  # None: the next call is a first step (Host zero-fills it)
        self.sizes = sizes  # the named dims the state was made for
        self.last = time.monotonic()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.host = Host(os.path.join(HERE, "model.onnx"))
        self.inputs = [i["name"] for i in config["input"] if i["name"] not in CONTROLS]
        self.outputs = {
            o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]
        }
        micros = int(config.get("sequence_batching", {}).get("max_sequence_idle_microseconds", 0))
        self.idle_seconds = micros / 1e6 if micros > 0 else None
        self.declared = {i.name: i.shape for i in self.host.session.get_inputs()}
        self.sequences = {}

    def execute(self, requests):
        self._drop_idle(time.monotonic())
        responses = []
        for request in requests:
            try:
                responses.append(self._run(request))
            except RequestError as error:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error))))
            except Exception as error:  # the model itself failed on this request's inputs
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{type(error).__name__}: {error}")))
        return responses

    def finalize(self):
        self.sequences.clear()

    def _drop_idle(self, now):
        if self.idle_seconds is None:
            return
        for corrid in [c for c, s in self.sequences.items() if now - s.last > self.idle_seconds]:
            del self.sequences[corrid]

    def _control(self, request, name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise RequestError(f"no {name} control input: send the request with a sequence id")
        return tensor.as_numpy().reshape(-1)[0]

    def _sizes(self, feeds):
        """The named dims of this request's inputs; refuses ranks and fixed dims the model does
        not take and a named dim given two sizes."""
        sizes = {}
        for name, value in feeds.items():
            declared = self.declared[name]
            if value.ndim != len(declared):
                raise RequestError(
                    f"input '{name}' has shape {list(value.shape)}; the model takes rank "
                    f"{len(declared)} ({declared})")
            for axis, (dim, size) in enumerate(zip(declared, value.shape)):
                if isinstance(dim, int) and dim != size:
                    raise RequestError(
                        f"input '{name}' has shape {list(value.shape)}; the model takes "
                        f"{declared} (axis {axis} must be {dim})")
                if isinstance(dim, str):
                    if sizes.setdefault(dim, size) != size:
                        raise RequestError(
                            f"input '{name}' has shape {list(value.shape)}: dim '{dim}' is "
                            f"{size} here and {sizes[dim]} on another input")
        return sizes

    def _run(self, request):
        corrid = int(self._control(request, "CORRID"))
        start = bool(self._control(request, "START"))
        end = bool(self._control(request, "END"))
        feeds = {}
        for name in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise RequestError(f"input '{name}' is missing")
            feeds[name] = tensor.as_numpy()
        sizes = self._sizes(feeds)
        if start:
            self.sequences.pop(corrid, None)  # a new sequence under this id: forget the old one
            sequence = Sequence(sizes)
        elif corrid in self.sequences:
            sequence = self.sequences[corrid]
            if sequence.sizes != sizes:
                raise RequestError(
                    f"sequence {corrid}: the inputs' dims {sizes} differ from those its state "
                    f"was made for {sequence.sizes}; start a new sequence for them")
        else:
            raise RequestError(
                f"sequence {corrid} has no state here: it was never started, or it ended, or it "
                f"was idle longer than {self.idle_seconds} s; start it again with the START flag")
        self.host.state = sequence.state
        try:
            values, stats = self.host(feeds)
            sequence.state = self.host.state
        finally:
            self.host.state = None
        sequence.last = time.monotonic()
        if end:
            self.sequences.pop(corrid, None)
        else:
            self.sequences[corrid] = sequence
        values.update(stats)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, np.ascontiguousarray(values[name], dtype=dtype))
            for name, dtype in self.outputs.items()
        ])
