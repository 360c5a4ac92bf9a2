"""Launches through Triton's interpreter, one at a time.

The interpreter (TRITON_INTERPRET=1, how the kernels run on a CPU) is not thread-safe: a launch patches
the functions of `triton.language` for its duration and restores them at its end, so two launches at
once, from threads sharing one compiled graph, undo each other's patches and fail with Triton's
InterpreterError. Every interpreted launch therefore holds one process-wide lock. A compiled kernel (a
JITFunction, as on CUDA) takes none: the check is one isinstance, and nothing probes the device.
"""

from __future__ import annotations

import contextlib
import threading

_LOCK = threading.Lock()


def launch_guard(kernel: object) -> contextlib.AbstractContextManager:
    """What to launch `kernel` in: the lock when the interpreter runs it, nothing for a compiled kernel."""
    from triton.runtime.jit import JITFunction  # here: lossgraph imports without triton

    return contextlib.nullcontext() if isinstance(kernel, JITFunction) else _LOCK
