"""Runs a model in ONNX Runtime (CPU) on the inputs stored in an .npz and compares its first output
with the .npz's "output" entry. A rewritten model's state inputs (its `fastcache` metadata
contract) get their first-step value, zeros, so its first call must equal the original model. Optionally runs the ONNX checker first. Prints one JSON object:
{"max_abs_diff": float, "outputs": {name: shape}}. Used by the tests as an independent host.

usage: python ort_check.py MODEL NPZ [--checker]
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort

from contract_state import zero_state


def main() -> None:
    model_path, npz_path = sys.argv[1], sys.argv[2]
    if "--checker" in sys.argv[3:]:
        # Path form so models with external data are checked too.
        onnx.checker.check_model(model_path, full_check=True)
    data = np.load(npz_path)
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    feeds = {i.name: data[i.name] for i in session.get_inputs() if i.name in data}
    if "fastcache" in session.get_modelmeta().custom_metadata_map:
        feeds.update(zero_state(session, feeds)[1])
    names = [o.name for o in session.get_outputs()]
    results = session.run(names, feeds)
    diff = float(np.max(np.abs(results[0].astype(np.float64) - data["output"])))
    print(json.dumps({"max_abs_diff": diff, "outputs": {n: list(r.shape) for n, r in zip(names, results)}}))


if __name__ == "__main__":
    main()
