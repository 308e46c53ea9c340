#!/usr/bin/env python3
"""Reassembles the ONNX Runtime GPU libraries that scripts/gpu/stage.py cut into parts.

    python3 unstage.py PARTS_DIR... -o LIBDIR

Each PARTS_DIR is a part folder (part-NNN/ with part-NNN and manifest.json in it) or any folder
above such folders: every transfer lands in its own place, so the parts are looked for under
all of them. Then:

  1. every copy of manifest.json found must be the same manifest;
  2. every part the manifest lists must be found with its size and SHA-256 (a missing or
     corrupt part is named, and nothing is written);
  3. each library is decompressed from its parts, and its size and SHA-256 checked against the
     manifest and against the hash the wheel's RECORD gave for it;
  4. it is written to LIBDIR under a temporary name and renamed only once verified, so LIBDIR
     never holds a half-written or unverified library;
  5. `libonnxruntime.so` is made to point to the versioned library, for ORT_DYLIB_PATH.

Standard library only (lzma, no zstd), for the GPU machine's Python 3.12.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import re
import shutil
import sys
from pathlib import Path

# The staging script's own definitions (it travels in the same tree): the manifest format this
# reads must be the one it writes, and both hash files the same way.
from stage import CHUNK, MANIFEST_FORMAT, MIB, file_sha256  # noqa: E402

PART_NAME = re.compile(r"part-\d{3,}")
# Bounds how much decompressed output one call may return: the libraries are written as they
# are decompressed, never held whole in memory.
OUTPUT_CHUNK = 8 * MIB


class UnstageError(Exception):
    """A failure to report as one line and a non-zero exit, without a traceback."""


def find(dirs: list[Path]) -> tuple[dict[str, list[Path]], list[Path]]:
    """Every part file (by name) and every manifest.json under the given folders."""
    parts: dict[str, list[Path]] = {}
    manifests: list[Path] = []
    for top in dirs:
        if not top.is_dir():
            raise UnstageError(f"{top}: no such folder")
        for folder, subfolders, files in os.walk(top):
            subfolders.sort()
            for name in sorted(files):
                path = Path(folder) / name
                if PART_NAME.fullmatch(name):
                    # The same transfer given twice (or a folder and its parent) is no conflict.
                    known = parts.setdefault(name, [])
                    if all(not path.samefile(p) for p in known):
                        known.append(path)
                elif name == "manifest.json":
                    manifests.append(path)
    return parts, manifests


def load_manifest(paths: list[Path], dirs: list[Path]) -> dict:
    """The one manifest all copies agree on: copies from two different stagings mixed in the
    same run would otherwise reassemble garbage (or be caught only by the final hash)."""
    if not paths:
        raise UnstageError("no manifest.json under " + ", ".join(map(str, dirs)))
    chosen, first = None, None
    for path in paths:
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UnstageError(f"{path}: unreadable manifest: {e}") from None
        if chosen is None:
            chosen, first = manifest, path
        elif manifest != chosen:
            raise UnstageError(f"{path} and {first} are manifests of different stagings; "
                               "give the parts of one staging only")
    if chosen.get("format") != MANIFEST_FORMAT:
        raise UnstageError(f"{first}: format {chosen.get('format')!r}, this script reads "
                           f"{MANIFEST_FORMAT!r}")
    return chosen


def verify_parts(manifest: dict, found: dict[str, list[Path]], dirs: list[Path]) -> dict[str, Path]:
    """Picks, for every part in the manifest, a copy with the right size and SHA-256."""
    chosen = {}
    for part in manifest["parts"]:
        name = part["name"]
        copies = found.get(name, [])
        if not copies:
            raise UnstageError(f"{name} is missing: not found under "
                               + ", ".join(map(str, dirs))
                               + f" (expected {part['size']:,} bytes, sha256 {part['sha256']})")
        problems = []
        for path in copies:
            size = path.stat().st_size
            if size != part["size"]:
                problems.append(f"{path} has {size:,} bytes, expected {part['size']:,}")
                continue
            sha = file_sha256(path)
            if sha != part["sha256"]:
                problems.append(f"{path} has sha256 {sha}, expected {part['sha256']}")
                continue
            chosen[name] = path
            break
        else:
            raise UnstageError(f"{name} is corrupt: " + "; ".join(problems))
    extra = sorted(set(found) - set(chosen))
    if extra:
        print(f"unstage.py: warning: ignoring {', '.join(extra)}: not in the manifest",
              file=sys.stderr)
    return chosen


def compressed_bytes(library: dict, parts: dict[str, Path]):
    """Yields the library's compressed stream, chunk by chunk, from its slices of the parts."""
    for piece in library["parts"]:
        with open(parts[piece["part"]], "rb") as f:
            f.seek(piece["offset"])
            left = piece["length"]
            while left:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise UnstageError(f"{piece['part']}: ends before the bytes of "
                                       f"{library['name']} do")
                left -= len(chunk)
                yield chunk


def restore(library: dict, parts: dict[str, Path], libdir: Path) -> str:
    """Decompresses one library into libdir; returns its SHA-256 once verified."""
    name = library["name"]
    if "/" in name or name in ("", ".", ".."):
        raise UnstageError(f"manifest names a library {name!r}, which is not a file name")
    if library["sha256"] != library["record_sha256"]:
        raise UnstageError(f"{name}: the manifest's sha256 differs from the wheel's RECORD hash")
    final = libdir / name
    temporary = libdir / f".{name}.unstage-{os.getpid()}"
    digest, size = hashlib.sha256(), 0
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        with open(temporary, "wb") as out:
            for chunk in compressed_bytes(library, parts):
                if decompressor.eof:
                    raise UnstageError(f"{name}: its xz stream ends before its compressed bytes")
                data = decompressor.decompress(chunk, OUTPUT_CHUNK)
                while True:
                    out.write(data)
                    digest.update(data)
                    size += len(data)
                    if decompressor.eof or decompressor.needs_input:
                        break
                    data = decompressor.decompress(b"", OUTPUT_CHUNK)
            if not decompressor.eof or decompressor.unused_data:
                raise UnstageError(f"{name}: its xz stream is truncated or has trailing bytes")
            out.flush()
            os.fsync(out.fileno())
        sha = digest.hexdigest()
        if size != library["size"] or sha != library["sha256"]:
            raise UnstageError(f"{name}: decompressed to {size:,} bytes with sha256 {sha}, "
                               f"expected {library['size']:,} bytes with sha256 "
                               f"{library['sha256']} (the wheel's RECORD hash)")
        os.chmod(temporary, int(library.get("mode", "0755"), 8))
        os.replace(temporary, final)
    except lzma.LZMAError as e:
        raise UnstageError(f"{name}: xz data is corrupt: {e}") from None
    finally:
        if temporary.exists():
            temporary.unlink()
    return sha


def make_alias(alias: str, target: str, libdir: Path) -> str:
    """`alias` -> `target` in libdir: a relative symlink, or a copy where links are refused."""
    if "/" in alias or "/" in target:
        raise UnstageError(f"manifest alias {alias!r} -> {target!r} is not a pair of file names")
    temporary = libdir / f".{alias}.unstage-{os.getpid()}"
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    try:
        os.symlink(target, temporary)
        kind = "symlink"
    except OSError:
        shutil.copy2(libdir / target, temporary)
        kind = "copy"
    os.replace(temporary, libdir / alias)  # atomic: an older alias is never missing meanwhile
    return kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, metavar="PARTS_DIR",
                        help="part folders, or folders holding them")
    parser.add_argument("-o", "--out", type=Path, required=True, metavar="LIBDIR",
                        help="where the libraries go (created if needed)")
    args = parser.parse_args(argv)
    try:
        found, manifest_paths = find(args.dirs)
        manifest = load_manifest(manifest_paths, args.dirs)
        parts = verify_parts(manifest, found, args.dirs)
        libdir = args.out.resolve()
        libdir.mkdir(parents=True, exist_ok=True)
        wheel = manifest["wheel"]
        print(f"{len(parts)} parts verified, from {wheel['file']} ({wheel['name']} "
              f"{wheel['version']})")
        for library in manifest["libraries"]:
            sha = restore(library, parts, libdir)
            print(f"{libdir / library['name']}: {library['size']:,} bytes, sha256 {sha} "
                  "(matches the wheel's RECORD)")
        for alias, target in manifest.get("aliases", {}).items():
            kind = make_alias(alias, target, libdir)
            print(f"{libdir / alias}: {kind} of {target}")
        if "libonnxruntime.so" in manifest.get("aliases", {}) or any(
            l["name"] == "libonnxruntime.so" for l in manifest["libraries"]
        ):
            print(f"ORT_DYLIB_PATH={libdir / 'libonnxruntime.so'}")
    except UnstageError as e:
        print(f"unstage.py: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"unstage.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
