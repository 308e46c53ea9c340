"""`fastcache triton` on a real Triton Inference Server, and its configs against Triton's schema.

What it needs is in its own venv, made by scripts/setup_triton.sh (.venv-triton/, or where
FASTCACHE_TRITON_VENV points): nvidia-pytriton 0.7.0 (a `tritonserver` binary with the Python
backend and its stubs), tritonclient, protobuf, numpy < 2, onnxruntime. Run from an interpreter
that lacks tritonclient (the repository's .venv), this file runs itself in that venv and fails
with the reason when the venv or the server is missing: it never skips. It also needs the debug
binary (`cargo build --bin fastcache`, or FASTCACHE_BIN) and ONNX Runtime's library for the
`fastcache run` references (ORT_DYLIB_PATH, default .ort/libonnxruntime.so).

The server runs the Python-backend repository of an interval-2 rewrite of the DiT fixture, so
that every other step reuses the cached residual and a lost state shows. It is started on free
loopback ports with the stub of this interpreter's Python version, which finds this venv's
packages through PATH (its embedded interpreter ignores PYTHONPATH), and killed at the end.
"""

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("FASTCACHE_TRITON_VENV", ROOT / ".venv-triton"))
if not VENV.is_absolute():
    VENV = ROOT / VENV

try:
    import numpy as np
    import tritonclient.grpc as grpcclient
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    from tritonclient.utils import InferenceServerException
except ImportError:
    grpcclient = None


if grpcclient is None:

    def test_triton_in_its_own_venv():
        """This interpreter lacks the Triton client: run this file in the Triton venv."""
        python = VENV / "bin" / "python"
        assert python.is_file(), (
            f"no Triton test venv at {VENV}: run scripts/setup_triton.sh "
            "(or point FASTCACHE_TRITON_VENV at one)")
        result = subprocess.run(
            [str(python), "-m", "pytest", "-q", "-s", "--noconftest", "-p", "no:cacheprovider",
             str(Path(__file__).resolve())],
            cwd=ROOT, capture_output=True, text=True, timeout=900)
        print(result.stdout[-6000:])
        assert result.returncode == 0, (
            f"the Triton tests failed in {VENV}:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}")

else:
    STEPS = 6
    IDLE_SECONDS = 1.5  # the repository's max_sequence_idle_microseconds
    MODEL = "dit"
    SEQUENCES = 8

    def _fastcache_bin():
        path = Path(os.environ.get("FASTCACHE_BIN", ROOT / "target" / "debug" / "fastcache"))
        assert path.is_file(), f"{path} is missing: build it with `cargo build --bin fastcache`"
        return path

    def _fastcache(*args, timeout=300):
        env = dict(os.environ)
        env.setdefault("ORT_DYLIB_PATH", str(ROOT / ".ort" / "libonnxruntime.so"))
        result = subprocess.run([str(_fastcache_bin()), *map(str, args)], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"fastcache {' '.join(map(str, args))}:\n{result.stderr}"
        return result.stdout

    def _example():
        spec = importlib.util.spec_from_file_location(
            "python_host_example", ROOT / "examples" / "python_host.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    @pytest.fixture(scope="module")
    def work(tmp_path_factory):
        return tmp_path_factory.mktemp("triton")

    @pytest.fixture(scope="module")
    def rewritten(work):
        out = work / "dit_fc.onnx"
        _fastcache("rewrite", ROOT / "models/fixtures/dit_ts.onnx", "-o", out,
                   "--policy", "interval", "--interval", "2")
        return out

    def _free_port():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def _server_parts():
        """The tritonserver binary, its libraries, and a backend folder whose Python stub is
        this interpreter's version."""
        import pytriton

        base = Path(pytriton.__file__).parent / "tritonserver"
        server = base / "bin" / "tritonserver"
        libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = base / "python_backend_stubs" / version / "triton_python_backend_stub"
        for path in (server, libs, stub, base / "backends/python/libtriton_python.so"):
            assert path.exists(), f"nvidia-pytriton lacks {path}"
        return server, libs, stub, base / "backends" / "python"

    @pytest.fixture(scope="module")
    def server(work, rewritten):
        repo = work / "repo"
        _fastcache("triton", rewritten, "-o", repo, "--backend", "python", "--name", MODEL,
                   "--stats", "--instances", SEQUENCES + 2,
                   "--max-sequence-idle-microseconds", int(IDLE_SECONDS * 1e6))
        binary, libs, stub, python_backend = _server_parts()
        backends = work / "backends" / "python"
        backends.mkdir(parents=True)
        for file in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(python_backend / file, backends / file)
        shutil.copy2(stub, backends / "triton_python_backend_stub")
        env = dict(os.environ)
        # The stub's embedded Python takes its prefix from the `python3` on PATH: this venv's.
        env["PATH"] = f"{Path(sys.prefix) / 'bin'}:{env.get('PATH', '')}"
        lib_path = [str(Path(sys.base_prefix) / "lib"), str(libs)]
        if env.get("LD_LIBRARY_PATH"):
            lib_path.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(lib_path)
        env.pop("PYTHONHOME", None)
        http, grpc, metrics = _free_port(), _free_port(), _free_port()
        log = open(work / "tritonserver.log", "w")
        started = time.monotonic()
        process = subprocess.Popen(
            [str(binary), f"--model-repository={repo}", f"--backend-directory={work / 'backends'}",
             "--http-address=127.0.0.1", f"--http-port={http}",
             "--grpc-address=127.0.0.1", f"--grpc-port={grpc}",
             "--allow-metrics=false", f"--metrics-port={metrics}", "--exit-timeout-secs=5"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")

        def log_tail():
            log.flush()
            return (work / "tritonserver.log").read_text()[-4000:]

        try:
            deadline = started + 120
            while True:
                assert process.poll() is None, (
                    f"tritonserver exited with {process.returncode}:\n{log_tail()}")
                try:
                    if client.is_model_ready(MODEL, client_timeout=2):
                        break
                except InferenceServerException:
                    pass
                assert time.monotonic() < deadline, f"tritonserver not ready in 120 s:\n{log_tail()}"
                time.sleep(0.2)
            ready = time.monotonic() - started
            print(f"\ntritonserver ready in {ready:.1f} s ({SEQUENCES + 2} Python instances)")
            yield {"grpc": f"127.0.0.1:{grpc}", "log": log_tail}
        finally:
            stopping = time.monotonic()
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=10)
            print(f"tritonserver stopped in {time.monotonic() - stopping:.1f} s")
            client.close()
            log.close()

    class TritonSequence:
        """One sequence on the server behind the interface of `fastcache.Host` (reset, call):
        the example's DDIM sampler drives it unchanged. `before_call` may hold a call back
        (a barrier) or change its inputs."""

        def __init__(self, url, sequence_id, steps, before_call=None):
            self.client = grpcclient.InferenceServerClient(url)
            self.sequence_id = sequence_id
            self.steps = steps
            self.calls = 0
            self.before_call = before_call

        def reset(self):
            self.calls = 0

        def infer(self, feeds, start, end):
            inputs = []
            for name, value in feeds.items():
                value = np.ascontiguousarray(value)
                tensor = grpcclient.InferInput(
                    name, list(value.shape), "FP32" if value.dtype == np.float32 else "INT64")
                tensor.set_data_from_numpy(value)
                inputs.append(tensor)
            result = self.client.infer(
                MODEL, inputs, sequence_id=self.sequence_id, sequence_start=start,
                sequence_end=end, client_timeout=60)
            return result.as_numpy("sample"), result.as_numpy("fastcache.skipped")

        def __call__(self, feeds):
            if self.before_call is not None:
                self.before_call(self, feeds)
            sample, skipped = self.infer(feeds, self.calls == 0, self.calls == self.steps - 1)
            self.calls += 1
            return {"sample": sample}, {"fastcache.skipped": skipped}

    def _noise(seed):
        return np.random.default_rng(seed).standard_normal((1, 4, 8, 8)).astype(np.float32)

    @pytest.fixture(scope="module")
    def references(work, rewritten):
        """`fastcache run` of each sequence's noise and class: seed k, class k."""
        refs = {}
        for k in range(12):
            noise, out = work / f"noise{k}.npy", work / f"ref{k}.npy"
            np.save(noise, _noise(k))
            _fastcache("run", rewritten, "--engine", "ort", "--noise", noise, "--class", k % 10,
                       "--batch", 1, "--steps", STEPS, "-o", out)
            refs[k] = np.load(out)
        return refs

    def _sample(example, host, k):
        return example.ddim(host, _noise(k), np.array([k % 10], dtype=np.int64), STEPS)

    def _close(a, b):
        return float(np.max(np.abs(a - b))) <= 1e-5 * max(1.0, float(np.max(np.abs(b))))

    def _in_threads(functions, timeout=180):
        results, errors = [None] * len(functions), []

        def body(i, fn):
            try:
                results[i] = fn()
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append((i, error))

        threads = [threading.Thread(target=body, args=(i, fn), daemon=True)
                   for i, fn in enumerate(functions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
            assert not t.is_alive(), "a client thread hung"
        assert not errors, errors
        return results

    def test_the_onnxruntime_config_parses_against_model_config_proto(work, rewritten):
        for fixture, extra in [("dit_ts", ["--batch", "2"]), ("dit_ts_b2", [])]:
            model = rewritten if fixture == "dit_ts" else work / "b2_fc.onnx"
            if fixture != "dit_ts":
                _fastcache("rewrite", ROOT / f"models/fixtures/{fixture}.onnx", "-o", model,
                           "--policy", "interval", "--interval", "2")
            repo = work / f"ort_{fixture}"
            _fastcache("triton", model, "-o", repo, "--name", "m", "--kind", "gpu",
                       "--instances", 3, *extra)
            config = text_format.Parse((repo / "m/config.pbtxt").read_text(),
                                       model_config_pb2.ModelConfig())
            assert config.backend == "onnxruntime" and config.max_batch_size == 0
            assert [i.name for i in config.input] == ["hidden_states", "timestep", "class_labels"]
            assert [o.name for o in config.output] == ["sample"]
            assert list(config.input[0].dims) == [2, 4, 8, 8]
            assert config.input[0].data_type == model_config_pb2.TYPE_FP32
            batcher = config.sequence_batching
            assert batcher.WhichOneof("strategy_choice") == "direct"
            assert batcher.max_sequence_idle_microseconds == 60_000_000
            states = {s.input_name: s for s in batcher.state}
            assert set(states) == {"fastcache.step", "fastcache.cached_residual",
                                   "fastcache.since_full"}
            residual = states["fastcache.cached_residual"]
            assert residual.output_name == "fastcache.cached_residual.next"
            assert list(residual.dims) == [2, 16, 16]
            assert residual.initial_state[0].zero_data is True
            assert list(residual.initial_state[0].dims) == [2, 16, 16]
            assert states["fastcache.step"].data_type == model_config_pb2.TYPE_INT64
            group = config.instance_group[0]
            assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and group.count == 3
            assert (repo / "m/1/model.onnx").is_file()

    def test_the_python_config_parses_against_model_config_proto(server, work):
        config = text_format.Parse((work / "repo" / MODEL / "config.pbtxt").read_text(),
                                   model_config_pb2.ModelConfig())
        assert config.backend == "python"
        controls = {c.name: c.control[0].kind for c in config.sequence_batching.control_input}
        kinds = model_config_pb2.ModelSequenceBatching.Control
        assert controls == {"START": kinds.CONTROL_SEQUENCE_START,
                            "END": kinds.CONTROL_SEQUENCE_END,
                            "CORRID": kinds.CONTROL_SEQUENCE_CORRID}
        assert [o.name for o in config.output] == ["sample", "fastcache.skipped"]

    def test_the_in_process_host_matches_fastcache_run(rewritten, references):
        example = _example()
        host = example.Host(str(rewritten))
        for k in (0, 5):
            latents, skipped = _sample(example, host, k)
            assert _close(latents, references[k]), np.max(np.abs(latents - references[k]))
            assert any(any(s) for s in skipped), skipped

    def test_eight_interleaved_sequences_match_eight_runs(server, references):
        example = _example()
        barrier = threading.Barrier(SEQUENCES, timeout=60)
        started = time.monotonic()
        runs = _in_threads([
            (lambda k=k: _sample(example, TritonSequence(
                server["grpc"], 1000 + k, STEPS, before_call=lambda *_: barrier.wait()), k))
            for k in range(SEQUENCES)
        ])
        print(f"\n{SEQUENCES} sequences x {STEPS} steps, interleaved: "
              f"{time.monotonic() - started:.2f} s")
        for k, (latents, skipped) in enumerate(runs):
            assert _close(latents, references[k]), (k, np.max(np.abs(latents - references[k])))
            # Interval 2: the stack is skipped at every other step, which only the carried state
            # (the step counter, the cached residual) can make happen.
            assert [bool(any(s)) for s in skipped] == [j % 2 == 1 for j in range(STEPS)], skipped
        # The sequences differ from one another (each its own noise and class).
        assert not _close(runs[0][0], runs[1][0])

    def test_a_timed_out_sequence_loses_only_its_own_state(server, references):
        example = _example()
        url = server["grpc"]
        late = TritonSequence(url, 2000, STEPS)
        x, label = _noise(9), np.array([9], dtype=np.int64)
        timesteps = example.trailing_timesteps(STEPS)

        def feeds(step):
            return {"hidden_states": x, "timestep": np.array([timesteps[step]]),
                    "class_labels": label}

        def timed_out():
            late.infer(feeds(0), start=True, end=False)
            late.infer(feeds(1), start=False, end=False)
            time.sleep(IDLE_SECONDS * 2.5)
            with pytest.raises(InferenceServerException) as raised:
                late.infer(feeds(2), start=False, end=False)
            # Then it starts again cleanly, as a first step, and samples what it should.
            return str(raised.value), _sample(example, TritonSequence(url, 2000, STEPS), 9)

        def steady(k):
            def pause(*_):
                time.sleep(IDLE_SECONDS * 0.4)  # busy across the other's idle time
            return _sample(example, TritonSequence(url, 2100 + k, STEPS, before_call=pause), k)

        message, (restarted, _) = None, (None, None)
        results = _in_threads([timed_out, lambda: steady(3), lambda: steady(4)])
        message, (restarted, _) = results[0]
        assert "START" in message, message
        assert _close(restarted, references[9])
        for k, (latents, _) in zip((3, 4), results[1:]):
            assert _close(latents, references[k]), k

    def test_a_request_of_the_wrong_shape_gets_an_error_and_the_others_go_on(server, references):
        example = _example()
        url = server["grpc"]
        errors = []

        def bad_call(sequence, feeds):
            # Before step 2: a request of another batch in this sequence (the model refuses it:
            # its state was made for batch 1) and one that Triton refuses (a wrong fixed dim).
            if sequence.calls != 2:
                return
            for x in (np.concatenate([feeds["hidden_states"]] * 2),
                      np.zeros((1, 4, 9, 9), np.float32)):
                wrong = dict(feeds, hidden_states=x,
                             timestep=np.repeat(feeds["timestep"], x.shape[0]),
                             class_labels=np.repeat(feeds["class_labels"], x.shape[0]))
                try:
                    sequence.infer(wrong, start=False, end=False)
                    errors.append(None)
                except InferenceServerException as error:
                    errors.append(str(error))

        results = _in_threads([
            lambda: _sample(example, TritonSequence(url, 3000, STEPS, before_call=bad_call), 6),
            lambda: _sample(example, TritonSequence(url, 3001, STEPS), 7),
        ])
        assert len(errors) == 2 and None not in errors, errors
        assert "state was made for" in errors[0], errors[0]
        assert "unexpected shape" in errors[1], errors[1]
        # The failed requests changed no state: both sequences end where `fastcache run` does.
        for k, (latents, _) in zip((6, 7), results):
            assert _close(latents, references[k]), k
