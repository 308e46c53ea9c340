"""The wheel against the Rust binary: it installs into a clean venv; its `fastcache` command
prints, writes and exits as target/debug/fastcache does; the module's rewrite and calibrate write
the CLI's files byte for byte and report its lines; errors raise FastCacheError with the CLI's
message; fastcache.Host samples as `fastcache run` does; the README's example runs as written."""

import json
import re
import sys

import numpy as np
import pytest

from conftest import FIXTURES, ROOT, checked, ort_env, run


def fixture(name):
    return str(FIXTURES / name)


def compare_files(a, b):
    """Every file under a equals the file of the same name under b, and the names agree."""
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert names, f"nothing written in {a}"
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs"
    return names


def module_call(venv, function, args, options, cwd):
    """fastcache.FUNCTION(*args, **options) in the venv; (result, None) or (None, message)."""
    code = """
import json, sys, warnings
import fastcache
function, args, options = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
with warnings.catch_warnings():
    warnings.simplefilter("ignore", fastcache.FastCacheWarning)
    try:
        result = getattr(fastcache, function)(*args, **options)
    except fastcache.FastCacheError as error:
        print(json.dumps([None, str(error), type(error).__name__]))
    else:
        print(json.dumps([result, None, None]))
"""
    result, message, kind = venv.python_code(
        code, function, json.dumps(args), json.dumps(options), cwd=cwd)
    assert kind in (None, "FastCacheError")
    return result, message


# The command as the binary takes it, and the same as keyword arguments.
REWRITES = [
    ("dit_ts.onnx", ["--policy", "interval", "--interval", "2"], {"policy": "interval", "interval": 2}),
    ("pixart_ts.onnx", ["--motion-ratio", "0.5"], {"motion_ratio": 0.5}),
    ("dit_dynamo.onnx", ["--merge-ratio", "0.5", "--no-cache"], {"merge_ratio": 0.5, "no_cache": True}),
    ("dit_ts_external.onnx", ["--policy", "fbcache", "--threshold", "0.1", "--weights", "external"],
     {"policy": "fbcache", "threshold": 0.1, "weights": "external"}),
    ("sd3_ts.onnx", ["--policy", "teacache", "--threshold", "0.05", "--blocks", "0-1"],
     {"policy": "teacache", "threshold": 0.05, "blocks": [0, 1]}),
    ("dit_ts.onnx", ["--forecast", "1", "--max-skips", "3", "--blocks", "1,2"],
     {"forecast": 1, "max_skips": 3, "blocks": "1,2"}),
    ("dit_ts.onnx", ["--policy", "interval", "--interval", "3", "--split", "split"],
     {"policy": "interval", "interval": 3, "split": "split"}),
]


def test_the_command_prints_and_exits_as_the_binary(wheel_venv, fastcache_cli):
    cases = [
        ["inspect", fixture("dit_ts.onnx")],
        ["inspect", fixture("sd3_ts.onnx"), "--json"],
        ["--version"],
        ["rewrite", "--help"],
        ["bogus"],
        ["rewrite", fixture("missing.onnx"), "-o", "never.onnx"],
        ["rewrite", fixture("dit_ts.onnx"), "-o", "never.onnx", "--policy", "interval"],
        ["rewrite", fixture("dit_ts.onnx"), "-o", "never.onnx", "--interval", "two"],
    ]
    for argv in cases:
        ours = run([wheel_venv.fastcache, *argv], env=wheel_venv.env())
        theirs = run([fastcache_cli, *argv])
        assert (ours.returncode, ours.stdout, ours.stderr) == (
            theirs.returncode, theirs.stdout, theirs.stderr), argv
    assert [run([fastcache_cli, *a]).returncode for a in cases] == [0, 0, 0, 0, 2, 1, 1, 2]
    assert not (ROOT / "never.onnx").exists()


def test_the_command_rewrites_and_runs_as_the_binary(wheel_venv, fastcache_cli, tmp_path):
    """A rewrite and an ONNX Runtime run through the installed command, which finds ONNX Runtime
    in the venv's onnxruntime package (ORT_DYLIB_PATH unset there)."""
    outputs = {}
    for name, exe, env in [("cli", fastcache_cli, ort_env()),
                           ("venv", wheel_venv.fastcache, wheel_venv.env())]:
        folder = tmp_path / name
        (folder / "model").mkdir(parents=True)
        checked(run([exe, "rewrite", fixture("dit_ts.onnx"), "-o", "model/interval.onnx",
                     "--policy", "interval", "--interval", "2"], cwd=folder, env=env))
        report = checked(run([exe, "run", "model/interval.onnx", "--engine", "ort", "--steps", "6",
                              "--seed", "3", "--class", "1,2", "--batch", "2", "-o", "x.npy"],
                             cwd=folder, env=env))
        assert "engine    onnxruntime " in report.stdout, report.stdout
        outputs[name] = np.load(folder / "x.npy")
    compare_files(tmp_path / "cli" / "model", tmp_path / "venv" / "model")
    np.testing.assert_allclose(outputs["venv"], outputs["cli"], rtol=0, atol=1e-6)


def test_the_command_benches_with_its_memory_probe(wheel_venv, tmp_path):
    """`bench` from the installed command measures each variant's memory in a child process:
    the interpreter running `-m fastcache memory-probe`, since no fastcache executable exists."""
    checked(run([wheel_venv.fastcache, "bench", fixture("dit_ts.onnx"), "-o", "bench",
                 "--engine", "tract", "--policies", "interval", "--intervals", "2",
                 "--steps", "4", "--samples", "2", "--batch", "2"],
                cwd=tmp_path, env=wheel_venv.env()))
    report = json.loads((tmp_path / "bench" / "report.json").read_text())
    for variant in report["variants"]:
        memory = variant["engine_memory"]
        assert memory and memory["peak"] > memory["baseline"], variant


@pytest.mark.parametrize("model,argv,options", REWRITES, ids=lambda v: str(v)[:40])
def test_rewrite_writes_what_the_cli_writes(wheel_venv, fastcache_cli, tmp_path, model, argv, options):
    (tmp_path / "cli").mkdir()
    (tmp_path / "module").mkdir()
    cli = checked(run([fastcache_cli, "rewrite", fixture(model), "-o", "out.onnx", *argv],
                      cwd=tmp_path / "cli"))
    summary, error = module_call(wheel_venv, "rewrite", [fixture(model), "out.onnx"], options,
                                 cwd=tmp_path / "module")
    assert error is None, error
    names = compare_files(tmp_path / "cli", tmp_path / "module")
    if "split" in options:
        assert any(str(n).startswith("split/") for n in names), names
        assert summary["split"] == "split"
    if options.get("weights") == "external":
        assert (tmp_path / "module" / "out.onnx.data").is_file(), names
    assert summary["report"] == cli.stdout.splitlines()
    assert summary["warnings"] == [
        line.removeprefix("warning: ") for line in cli.stderr.splitlines()
        if line.startswith("warning: ")]
    assert summary["output"] == "out.onnx"
    assert summary["contract"]["policy"]["name"] == options.get("policy", "fastcache")
    state = {pair["input"] for pair in summary["contract"]["state"]}
    assert ("fastcache.step" in state) == (not options.get("no_cache")), state


@pytest.mark.parametrize("argv,options", [
    (["--target-speedup", "1.5"], {"target_speedup": 1.5}),
    ([], {}),
    (["--target-speedup", "1.3", "--decision", "probe", "--alpha", "0.2", "--class", "3,7"],
     {"target_speedup": 1.3, "decision": "probe", "alpha": 0.2, "classes": [3, 7]}),
], ids=["schedule", "per-block", "probe"])
def test_calibrate_and_rewrite_with_it_write_what_the_cli_writes(
        wheel_venv, fastcache_cli, tmp_path, argv, options):
    common = ["--steps", "6", "--runs", "2", "--cfg", "3"]
    (tmp_path / "cli").mkdir()
    (tmp_path / "module").mkdir()
    cli = checked(run([fastcache_cli, "calibrate", fixture("dit_ts.onnx"), *common, *argv,
                       "-o", "cal.json"], cwd=tmp_path / "cli"))
    checked(run([fastcache_cli, "rewrite", fixture("dit_ts.onnx"), "-o", "out.onnx",
                 "--calibration", "cal.json"], cwd=tmp_path / "cli"))
    summary, error = module_call(wheel_venv, "calibrate", [fixture("dit_ts.onnx"), "cal.json"],
                                 {"steps": 6, "runs": 2, "cfg": 3, **options},
                                 cwd=tmp_path / "module")
    assert error is None, error
    rewritten, error = module_call(wheel_venv, "rewrite", [fixture("dit_ts.onnx"), "out.onnx"],
                                   {"calibration": "cal.json"}, cwd=tmp_path / "module")
    assert error is None, error
    names = [str(n) for n in compare_files(tmp_path / "cli", tmp_path / "module")]
    assert summary["report"] == cli.stdout.splitlines()
    assert summary["files"] == ["cal.json"] + (["cal.bin"] if "cal.bin" in names else [])
    assert ("cal.bin" in names) == (not options), names
    assert summary["calibration"] == json.loads((tmp_path / "cli" / "cal.json").read_text())
    assert rewritten["contract"]["policy"]["name"] == "fastcache"


# An error as the module raises it and the CLI line that says the same.
ERRORS = [
    ("rewrite", ["missing.onnx", "out.onnx"], {}, ["rewrite", "missing.onnx", "-o", "out.onnx"]),
    ("rewrite", [fixture("dit_ts.onnx"), "out.onnx"], {"policy": "interval"},
     ["rewrite", fixture("dit_ts.onnx"), "-o", "out.onnx", "--policy", "interval"]),
    ("rewrite", [fixture("dit_ts.onnx"), "out.onnx"], {"policy": "interval", "interval": "two"},
     ["rewrite", fixture("dit_ts.onnx"), "-o", "out.onnx", "--policy", "interval", "--interval", "two"]),
    ("rewrite", [fixture("dit_ts.onnx"), "out.onnx"], {"policy": "sometimes"},
     ["rewrite", fixture("dit_ts.onnx"), "-o", "out.onnx", "--policy", "sometimes"]),
    ("rewrite", [fixture("dit_ts.onnx"), "out.onnx"], {"motion_ratoi": 0.5},
     ["rewrite", fixture("dit_ts.onnx"), "-o", "out.onnx", "--motion-ratoi", "0.5"]),
    ("rewrite", [fixture("negative/mlp.onnx"), "out.onnx"], {},
     ["rewrite", fixture("negative/mlp.onnx"), "-o", "out.onnx"]),
    ("inspect", ["missing.onnx"], {}, ["inspect", "missing.onnx", "--json"]),
    ("calibrate", [fixture("dit_ts.onnx"), "cal.txt"], {"steps": 4},
     ["calibrate", fixture("dit_ts.onnx"), "--steps", "4", "-o", "cal.txt"]),
]


@pytest.mark.parametrize("function,args,options,argv", ERRORS, ids=lambda v: str(v)[:40])
def test_errors_raise_with_the_cli_message(wheel_venv, fastcache_cli, tmp_path,
                                           function, args, options, argv):
    result, message = module_call(wheel_venv, function, args, options, cwd=tmp_path)
    assert result is None, result
    cli = run([fastcache_cli, *argv], cwd=tmp_path)
    assert cli.returncode in (1, 2), cli
    assert cli.stderr.startswith("error: "), cli.stderr
    assert message == cli.stderr.removeprefix("error: ").rstrip()
    assert not (tmp_path / "out.onnx").exists()


def test_fastcache_error_is_importable_without_the_extension():
    """`import fastcache` from the source tree (no native module there) works, and so does Host
    (examples/python_host.py and the Rust tests rely on it)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import fastcache, json;"
        "assert issubclass(fastcache.FastCacheError, Exception);"
        "assert 'onnxruntime' not in sys.modules;"
        "from fastcache import Host;"
        "print(json.dumps([Host.__module__, 'onnxruntime' in sys.modules]))"
    )
    result = checked(run([sys.executable, "-c", code, ROOT / "python"]))
    assert json.loads(result.stdout) == ["fastcache.host", True]


DDIM = """
import json, sys
import numpy as np
import fastcache

model, noise, out = sys.argv[1:4]
train = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
steps, cfg, labels = 10, 4.0, np.array([3, 7], dtype=np.int64)
timesteps = np.round(np.arange(1000, 0, -1000 / steps)).astype(np.int64) - 1
x = np.load(noise).astype(np.float32)
host = fastcache.Host(model)
skipped = 0.0
for k, t in enumerate(timesteps):
    outputs, stats = host({
        "hidden_states": np.concatenate([x, x]),
        "timestep": np.full(4, t, dtype=np.int64),
        "class_labels": np.concatenate([labels, np.full(2, 10, dtype=np.int64)]),
    })
    skipped += float(stats["fastcache.skipped"].sum())
    eps = outputs["sample"].astype(np.float64)[:, :4]
    eps = eps[2:] + cfg * (eps[:2] - eps[2:])
    a = train[t]
    a_prev = train[timesteps[k + 1]] if k + 1 < steps else 1.0
    x0 = (x.astype(np.float64) - np.sqrt(1.0 - a) * eps) / np.sqrt(a)
    x = (np.sqrt(a_prev) * x0 + np.sqrt(1.0 - a_prev) * eps).astype(np.float32)
np.save(out, x)
print(json.dumps(skipped))
"""


def test_host_samples_as_fastcache_run_does(wheel_venv, fastcache_cli, tmp_path):
    """As tests/cache_cli.rs checks examples/python_host.py: a rewrite whose every step after
    warm-up skips, sampled by DDIM with classifier-free guidance through fastcache.Host and by
    `fastcache run` on ONNX Runtime from the same noise, single graph and host split."""
    summary, error = module_call(
        wheel_venv, "rewrite", [fixture("dit_ts.onnx"), "forced.onnx"],
        {"force_skip": True, "split": "split"}, cwd=tmp_path)
    assert error is None, error
    noise = tmp_path / "noise.npy"
    np.save(noise, np.random.default_rng(11).standard_normal((2, 4, 8, 8)).astype(np.float32))
    for name, split in [("single", []), ("split", ["--split", "split"])]:
        report = checked(run(
            [fastcache_cli, "run", "forced.onnx", "--engine", "ort", "--noise", noise,
             "-o", f"rust_{name}.npy", "--steps", "10", "--batch", "2", "--class", "3,7",
             "--cfg", "4", *split], cwd=tmp_path, env=ort_env())).stdout
        assert "fastcache.skipped=[1,1,1]" in report, report
        skipped = wheel_venv.python_code(
            DDIM, "split" if split else "forced.onnx", noise, f"py_{name}.npy", cwd=tmp_path)
        assert skipped == 3 * 8, "forced skips from step 2 of 10 in 3 blocks"
        rust, py = np.load(tmp_path / f"rust_{name}.npy"), np.load(tmp_path / f"py_{name}.npy")
        diff = np.abs(py - rust).max() / max(np.abs(rust).max(), 1.0)
        assert diff < 1e-5, f"{name}: Host and fastcache run differ by {diff} (relative)"


def readme_example():
    """The first ```python block of README.md's "Python" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "README.md's Python section has no ```python block"
    return found.group(1)


def test_the_readme_example_runs_in_the_clean_venv(wheel_venv, tmp_path):
    (tmp_path / "models").symlink_to(ROOT / "models")
    result = checked(run([wheel_venv.python, "-c", readme_example()], cwd=tmp_path,
                         env=wheel_venv.env()))
    lines = result.stdout.splitlines()
    assert lines[0] == "single-stream 3 blocks", result.stdout
    assert lines[1].startswith("interval: blocks [0, 1, 2] of 3 skipped together"), lines
    assert [line.split("skipped: ")[1] for line in lines[2:]] == [
        "[0. 0. 0.]", "[1. 1. 1.]", "[0. 0. 0.]", "[1. 1. 1.]"], lines
    assert (tmp_path / "dit_interval.onnx").is_file()
