"""The grading worker process: ``python -m specthink.evaluation._worker``.

JSON lines on stdin/stdout. It first writes ``{"ready": true}`` once math-verify is imported
(or ``{"fatal": ...}`` and exits), then answers each ``{"expected": ..., "given": ...}`` with
``{"correct": bool}`` or ``{"error": ...}``. It runs one comparison at a time on its main thread;
the parent bounds each one by killing the process (see :mod:`specthink.evaluation.grading`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any


def _write(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> int:
    try:
        import math_verify  # noqa: F401  (the slow import, done before saying ready)
    except ImportError as exc:
        _write({"fatal": f"math-verify is not installed ({exc}): pip install 'specthink[eval]'"})
        return 1
    # math-verify warns once that its timeouts are off; the parent bounds the work instead.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from specthink.evaluation.grading import verify_math

    _write({"ready": True})
    for line in sys.stdin:
        try:
            request = json.loads(line)
            correct = verify_math(str(request["expected"]), str(request["given"]))
        except Exception as exc:  # one bad answer must not end the worker
            _write({"error": f"{type(exc).__name__}: {exc}"[:500]})
            continue
        _write({"correct": correct})
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the parent reports it
        code = 130
    sys.stdout.flush()
    # Nothing is left to clean up, and tearing down sympy's modules takes a second or more.
    os._exit(code)
