"""inspect, rewrite and calibrate: the `fastcache` command's own code, called with keyword
arguments for its flags. Each call builds the command line the CLI would get and runs it in the
native extension with the report captured instead of printed, so files written here equal the
CLI's byte for byte and errors carry the CLI's message."""

import glob
import importlib.util
import json
import os
import warnings

__all__ = ["FastCacheError", "FastCacheWarning", "calibrate", "inspect", "rewrite"]


class FastCacheError(Exception):
    """A fastcache command failed; the message is what the CLI prints after `error: `."""


class FastCacheWarning(UserWarning):
    """A warning of a fastcache command (the CLI prints it after `warning: `)."""


# Keyword arguments whose flag is not their name with `_` as `-`.
ALIASES = {"classes": "class", "class_": "class"}


def flags(options):
    """The command-line flags for keyword arguments: `motion_ratio=0.5` is `--motion-ratio 0.5`,
    True a bare flag, False and None nothing, a list or tuple its items joined by commas."""
    argv = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + ALIASES.get(key, key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(str(v) for v in value)]
        else:
            argv += [flag, os.fspath(value) if isinstance(value, os.PathLike) else str(value)]
    return argv


def ensure_ort_library():
    """Points ORT_DYLIB_PATH (where `--engine ort` loads ONNX Runtime from) at the library of the
    installed onnxruntime package (or onnxruntime-gpu) when it is not set already."""
    if os.environ.get("ORT_DYLIB_PATH"):
        return
    try:
        spec = importlib.util.find_spec("onnxruntime")
    except (ImportError, ValueError):
        return
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for pattern in ("libonnxruntime.so*", "libonnxruntime*.dylib", "onnxruntime.dll"):
            found = sorted(glob.glob(os.path.join(folder, "capi", pattern)))
            if found:
                os.environ["ORT_DYLIB_PATH"] = found[0]
                return


def run(command, *args, **options):
    """Runs `fastcache COMMAND ARGS... FLAGS...` captured; returns (report lines, warnings)."""
    from ._native import run as native_run

    argv = ["fastcache", command, *(os.fspath(a) for a in args), *flags(options)]
    error, stdout, raised = native_run(argv)
    if error is not None:
        raise FastCacheError(error)
    for text in raised:
        warnings.warn(text, FastCacheWarning, stacklevel=3)
    return stdout.splitlines(), list(raised)


def inspect(path):
    """What `fastcache inspect PATH --json` prints, as a dict: inputs, outputs, opsets, operators,
    parameters, external data, metadata and the DiT structure."""
    lines, _ = run("inspect", path, json=True)
    return json.loads("\n".join(lines))


def rewrite(path, out, **options):
    """`fastcache rewrite PATH -o OUT` with the flags as keyword arguments (`policy="interval",
    interval=2`, `motion_ratio=0.5`, `calibration="cal.json"`, `split="DIR"`, ...). Writes what the
    CLI writes and returns a dict: `output`, `report` (the lines the CLI prints), `warnings`, and
    `contract`, the written model's `fastcache` metadata entry (state, stats, policy)."""
    if "output" in options:
        raise TypeError("rewrite() takes the output path as its second argument, not output=")
    lines, raised = run("rewrite", path, output=out, **options)
    from ._native import metadata

    error, entries = metadata(os.fspath(out))
    if error is not None:
        raise FastCacheError(error)
    contract = entries.get("fastcache")
    return {
        "output": os.fspath(out),
        "split": os.fspath(options["split"]) if options.get("split") else None,
        "report": lines,
        "warnings": raised,
        "contract": json.loads(contract) if contract else None,
    }


def calibrate(path, out, **options):
    """`fastcache calibrate PATH -o OUT` (OUT a .json) with the flags as keyword arguments
    (`steps=10, runs=2, target_speedup=2.0`, `decision="probe", alpha=0.1`, `target_psnr=30`,
    `engine="ort"`, `classes=[3, 7]`, sampler options, ...). Writes what the CLI writes and returns
    a dict: `output`, `files` (the .json and, for the per-block calibration, its .bin), `report`
    (the lines the CLI prints), `warnings`, and `calibration`, the written JSON."""
    if "output" in options:
        raise TypeError("calibrate() takes the output path as its second argument, not output=")
    if options.get("engine") == "ort":
        ensure_ort_library()
    lines, raised = run("calibrate", path, output=out, **options)
    out = os.fspath(out)
    weights = os.path.splitext(out)[0] + ".bin"
    with open(out) as f:
        calibration = json.load(f)
    return {
        "output": out,
        # The per-block calibration's tensors, which it says it wrote.
        "files": [out] + ([weights] if any(l.endswith(f"(+ {weights})") for l in lines) else []),
        "report": lines,
        "warnings": raised,
        "calibration": calibration,
    }
