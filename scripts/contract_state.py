"""The host contract's first-step state, for the Python test tools: read a rewritten model's
`fastcache` metadata entry and make every state input's zeros, named dims resolved from the
feeds of the model's own inputs. (examples/python_host.py does the same on its own, on purpose:
an example a reader can copy must stand alone.)"""
import json

import numpy as np


def zero_state(session, feeds):
    """Returns (contract, state) for an onnxruntime session and the feeds of its own inputs."""
    contract = json.loads(session.get_modelmeta().custom_metadata_map["fastcache"])
    sizes = {}
    for model_input in session.get_inputs():
        if model_input.name in feeds:
            for dim, size in zip(model_input.shape, feeds[model_input.name].shape):
                if isinstance(dim, str):
                    sizes[dim] = size
    state = {}
    for pair in contract["state"]:
        shape = [sizes[d] if isinstance(d, str) else d for d in pair["shape"]]
        state[pair["input"]] = np.zeros(shape, dtype=np.dtype(pair["dtype"]))
    return contract, state
