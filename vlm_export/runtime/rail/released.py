"""The long in-place LAPACK calls of the primal solve, made so that a Ctrl-C stops the wait at once.

SciPy's LAPACK wrappers hold the GIL for the whole call, and Python runs a signal handler only
between bytecodes: a Ctrl-C during the Cholesky factorisation of a 15,000 x 15,000 G waited for
its end (tens of seconds here, minutes on a small board). The same LAPACK routines, reached
through SciPy's Cython function pointers and called with ctypes (which releases the GIL), run
on a worker thread while the main thread waits in short joins, so a KeyboardInterrupt is raised
there at once. The routine itself cannot be stopped: it runs on, on memory the caller must then
give up (``Interrupted``). Off the main thread (the service) there is no Ctrl-C to wait for and
the routine runs on the calling thread.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from functools import cache

import numpy as np
from scipy.linalg import cython_lapack

#: how often the waiting main thread looks up (a Ctrl-C is taken within this many seconds)
POLL_S = 0.1

_INT = ctypes.POINTER(ctypes.c_int)


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C while LAPACK ran on a worker thread: the arrays it works on are being written."""


@cache
def _routine(name: str, *argtypes: object) -> Callable[..., None]:
    """SciPy's LAPACK routine ``name`` as a ctypes function (it releases the GIL when called)."""
    capsule = cython_lapack.__pyx_capi__[name]
    get_name, get_pointer = (
        ctypes.pythonapi.PyCapsule_GetName,
        ctypes.pythonapi.PyCapsule_GetPointer,
    )
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer.restype = ctypes.c_void_p
    get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    address = get_pointer(capsule, get_name(capsule))
    return ctypes.CFUNCTYPE(None, *argtypes)(address)


def _run(call: Callable[[], None], *arrays: np.ndarray) -> None:
    """``call()`` on a worker thread, waited for in short joins (main thread only). The worker
    holds ``arrays`` (the memory LAPACK writes) until it ends, interrupted or not."""
    if threading.current_thread() is not threading.main_thread():
        call()
        return
    failure: list[BaseException] = []
    held = list(arrays)  # freed by the worker only when LAPACK is done with them
    done = threading.Event()

    def work() -> None:
        try:
            call()
        except BaseException as exc:  # handed to the waiting thread
            failure.append(exc)
        finally:
            held.clear()
            done.set()

    worker = threading.Thread(target=work, name="lapack", daemon=True)
    try:
        worker.start()  # waits for the thread to start: a Ctrl-C may come in here too
        while not done.wait(POLL_S):
            pass
    except KeyboardInterrupt:
        if done.is_set():  # LAPACK had finished: nothing writes the arrays any more
            raise
        raise Interrupted from None
    if failure:
        raise failure[0]


def _fortran_square(array: np.ndarray) -> int:
    if array.dtype != np.float64 or not array.flags.f_contiguous or array.ndim != 2:
        raise ValueError("expected a Fortran-contiguous float64 matrix")
    if array.shape[0] != array.shape[1]:
        raise ValueError("expected a square matrix")
    return array.shape[0]


def potrf_lower(matrix: np.ndarray) -> int:
    """Cholesky factor of ``matrix`` (Fortran float64, lower triangle read) written over its lower
    triangle, in place; returns LAPACK's info (0: done; > 0: not positive definite)."""
    n, info = ctypes.c_int(_fortran_square(matrix)), ctypes.c_int(0)
    if not n.value:
        return 0  # nothing to factor (and LAPACK wants a leading dimension of at least 1)
    potrf = _routine("dpotrf", ctypes.c_char_p, _INT, ctypes.c_void_p, _INT, _INT)
    address = matrix.ctypes.data
    _run(lambda: potrf(b"L", ctypes.byref(n), address, ctypes.byref(n), ctypes.byref(info)), matrix)
    return info.value


def potrs_lower(factor: np.ndarray, rhs: np.ndarray) -> int:
    """Solve (L L.T) X = rhs with the lower factor L; X is written over ``rhs`` (Fortran float64
    [d, k]) in place; returns LAPACK's info."""
    size = _fortran_square(factor)
    if rhs.dtype != np.float64 or not rhs.flags.f_contiguous or rhs.shape[0] != size:
        raise ValueError("expected a Fortran-contiguous float64 right-hand side of matching rows")
    n, columns, info = ctypes.c_int(size), ctypes.c_int(rhs.shape[1]), ctypes.c_int(0)
    if not (n.value and columns.value):
        return 0
    potrs = _routine(
        "dpotrs", ctypes.c_char_p, _INT, _INT, ctypes.c_void_p, _INT, ctypes.c_void_p, _INT, _INT
    )
    a, b = factor.ctypes.data, rhs.ctypes.data
    args = (ctypes.byref(n), ctypes.byref(columns), a, ctypes.byref(n), b, ctypes.byref(n))
    _run(lambda: potrs(b"L", *args, ctypes.byref(info)), factor, rhs)
    return info.value
