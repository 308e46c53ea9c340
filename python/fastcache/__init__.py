"""fastcache: FastCache for diffusion transformers exported to ONNX.

`inspect`, `rewrite` and `calibrate` run the `fastcache` command's code (the native extension,
imported when first called) and return its report as dicts; errors raise `FastCacheError` with the
command's message. `Host` (the state loop around an onnxruntime session, plain Python) is
imported when first used, so `import fastcache` needs neither onnxruntime nor numpy, and
`fastcache.host` also works straight from a source tree without the extension.
"""

from ._compiler import FastCacheError, FastCacheWarning, calibrate, inspect, rewrite

__all__ = ["FastCacheError", "FastCacheWarning", "Host", "SplitSession", "calibrate", "inspect", "rewrite"]


def __getattr__(name):
    if name in ("Host", "SplitSession"):
        from . import host

        return getattr(host, name)
    if name == "__version__":
        from ._native import __version__

        return __version__
    raise AttributeError(f"module 'fastcache' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__) | {"__version__"})
