"""The `fastcache` console script: the command line of the Rust binary, run in this process."""

import os
import signal
import sys

from ._compiler import ensure_ort_library


def main():
    # The command runs in native code with the interpreter lock released, where Python's own
    # SIGINT handler would only set a flag: let Ctrl-C end the process as it ends the binary.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    ensure_ort_library()
    # `bench` measures each variant's memory in a child process of this command: here that is
    # this interpreter running `-m fastcache`, not the executable the Rust code would look for.
    os.environ["FASTCACHE_PROBE_PYTHON"] = sys.executable
    from ._native import main as native_main

    sys.stdout.flush()
    sys.stderr.flush()
    return native_main(["fastcache", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
