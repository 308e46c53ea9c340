"""Session fixtures for the Python package's tests: the wheel (built once by maturin), a clean venv
it is installed into (with pip, its dependencies from PyPI), and the Rust binary built by cargo
that the package must agree with.

Run from the repository root: `.venv/bin/python -m pytest python/tests -q` (scripts/test.sh does
so after the Rust tests). The Python running pytest needs maturin, pytest and numpy
(scripts/requirements-test.txt)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "models" / "fixtures"


def run(argv, cwd=ROOT, env=None, timeout=600):
    """Runs argv, capturing text output; never raises on a non-zero status."""
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def checked(result):
    assert result.returncode == 0, (
        f"{result.args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return result


def ort_env():
    """The environment with ORT_DYLIB_PATH set (as scripts/test.sh sets it) for the binary."""
    env = dict(os.environ)
    if not env.get("ORT_DYLIB_PATH"):
        env["ORT_DYLIB_PATH"] = str(ROOT / ".ort" / "libonnxruntime.so")
    assert Path(env["ORT_DYLIB_PATH"]).is_file(), (
        f"ONNX Runtime's library {env['ORT_DYLIB_PATH']} is missing: run scripts/setup.sh"
    )
    return env


class Venv:
    """A virtual environment with the wheel installed."""

    def __init__(self, path):
        self.path = path
        self.bin = path / ("Scripts" if os.name == "nt" else "bin")
        self.python = self.bin / "python"
        self.fastcache = self.bin / "fastcache"

    def env(self):
        # Nothing of the outer environment's Python leaks in; ORT_DYLIB_PATH is left unset so
        # that the package finds the library of the onnxruntime it installed.
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "ORT_DYLIB_PATH")}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        return env

    def python_code(self, code, *args, cwd=ROOT):
        """Runs a Python snippet in the venv; returns the JSON it prints last."""
        result = checked(run([self.python, "-c", code, *args], cwd=cwd, env=self.env()))
        return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def fastcache_cli():
    """target/debug/fastcache, brought up to date by cargo (the same code the wheel builds)."""
    checked(run(["cargo", "build", "--locked", "-p", "fastcache", "--bin", "fastcache"]))
    exe = ROOT / "target" / "debug" / ("fastcache.exe" if os.name == "nt" else "fastcache")
    assert exe.is_file(), exe
    return exe


@pytest.fixture(scope="session")
def fastcache_wheel(tmp_path_factory):
    """The wheel, built once per session by `maturin build` (debug, stripped)."""
    out = tmp_path_factory.mktemp("wheel")
    start = time.monotonic()
    checked(run(
        [sys.executable, "-m", "maturin", "build", "--strip", "--locked",
         "--interpreter", sys.executable, "--out", out],
        cwd=ROOT / "python",
    ))
    wheels = sorted(out.glob("fastcache-*.whl"))
    assert len(wheels) == 1, wheels
    print(f"\nbuilt {wheels[0].name} in {time.monotonic() - start:.0f} s", file=sys.stderr)
    return wheels[0]


@pytest.fixture(scope="session")
def wheel_venv(fastcache_wheel, tmp_path_factory):
    """A fresh venv (python -m venv) with `pip install WHEEL[onnxruntime]`."""
    path = tmp_path_factory.mktemp("venv") / "venv"
    checked(run([sys.executable, "-m", "venv", path]))
    venv = Venv(path)
    checked(run(
        [venv.python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         f"{fastcache_wheel}[onnxruntime]"],
        env=venv.env(),
    ))
    assert shutil.which("fastcache", path=str(venv.bin)), "the wheel installed no fastcache command"
    return venv
