"""The primal solve's LAPACK calls take a Ctrl-C at once (rail/released.py): they compute what
SciPy's wrappers compute, the main thread's wait is interruptible, and a learner whose solve was
interrupted refuses to be used instead of handing out half-written statistics."""

from __future__ import annotations

import _thread
import signal
import threading

import numpy as np
import pytest
from scipy.linalg import lapack

from vlm_export.runtime.rail import released
from vlm_export.runtime.rail.inputs import RailError
from vlm_export.runtime.rail.primal import PrimalAdapter


def _spd(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((size, size))
    return np.asfortranarray(a @ a.T + size * np.eye(size))


def test_potrf_and_potrs_equal_scipys_lapack_bit_for_bit() -> None:
    matrix, rhs = _spd(300), np.asfortranarray(np.random.default_rng(1).standard_normal((300, 7)))
    want_factor, info = lapack.dpotrf(matrix.copy(order="F"), lower=1, clean=0)
    assert info == 0
    want_solution, info = lapack.dpotrs(want_factor, rhs.copy(order="F"), lower=1)
    assert info == 0

    factor = matrix.copy(order="F")
    assert released.potrf_lower(factor) == 0
    np.testing.assert_array_equal(np.tril(factor), np.tril(want_factor))
    np.testing.assert_array_equal(np.triu(factor, 1), np.triu(matrix, 1))  # upper left alone
    solution = rhs.copy(order="F")
    assert released.potrs_lower(factor, solution) == 0
    np.testing.assert_array_equal(solution, want_solution)


def test_a_matrix_that_is_not_positive_definite_gives_lapacks_info() -> None:
    matrix = -_spd(20)
    assert released.potrf_lower(matrix) > 0


def test_what_lapack_cannot_take_is_refused_before_the_call() -> None:
    with pytest.raises(ValueError, match="Fortran-contiguous float64"):
        released.potrf_lower(np.ascontiguousarray(_spd(5)) + np.arange(5.0))  # C order
    with pytest.raises(ValueError, match="square"):
        released.potrf_lower(np.zeros((4, 3), order="F"))
    with pytest.raises(ValueError, match="right-hand side"):
        released.potrs_lower(_spd(4), np.zeros((3, 2), order="F"))


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="main only")
def test_a_ctrl_c_stops_the_wait_while_the_work_goes_on() -> None:
    """The worker blocks until told: the interrupt can only have come through the wait."""
    release, started, finished = threading.Event(), threading.Event(), threading.Event()

    def work() -> None:
        started.set()
        release.wait(30)
        finished.set()

    def interrupt() -> None:
        started.wait(30)
        _thread.interrupt_main(signal.SIGINT)  # as a Ctrl-C: Python's SIGINT handler runs

    # a test worker process (pytest-xdist) may not take SIGINT as Python does by default
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    sender = threading.Thread(target=interrupt)
    sender.start()
    try:
        with pytest.raises(released.Interrupted):
            released._run(work)
        assert not finished.is_set()  # the wait ended, the work had not
    finally:
        release.set()
        sender.join()
        signal.signal(signal.SIGINT, previous)
    assert finished.wait(30)  # and it goes on to its end


def test_off_the_main_thread_the_routine_runs_on_the_calling_thread() -> None:
    seen: list[threading.Thread] = []
    caller = threading.Thread(
        target=lambda: released._run(lambda: seen.append(threading.current_thread()))
    )
    caller.start()
    caller.join()
    assert seen == [caller]


def test_a_learner_interrupted_while_solving_refuses_to_be_used(monkeypatch) -> None:
    learner = PrimalAdapter(8, 3, hidden_dim=16, ridge=0.5)
    rng = np.random.default_rng(2)
    learner.accumulate(rng.standard_normal((40, 8)), rng.integers(0, 3, 40))

    def interrupted(factor: np.ndarray, rhs: np.ndarray) -> int:
        raise released.Interrupted

    monkeypatch.setattr(released, "potrs_lower", interrupted)
    with pytest.raises(KeyboardInterrupt):
        learner.finalize()
    monkeypatch.undo()
    for use in (
        learner.finalize,
        lambda: learner.predict(np.zeros((1, 8))),
        lambda: learner.gram,
        lambda: learner.accumulate(np.zeros((1, 8)), np.zeros(1, int)),
        learner.to_inference,
    ):
        with pytest.raises(RailError, match=r"interrupted \(Ctrl-C\) while it learned or solved"):
            use()


@pytest.mark.parametrize("where", ["potrf_lower", "potrs_lower"])
def test_a_ctrl_c_anywhere_in_a_solve_leaves_the_learner_refusing_use(monkeypatch, where) -> None:
    """Not only while LAPACK runs: a KeyboardInterrupt just before it starts or after it ended
    (while G is rebuilt) stops a change half-way just the same."""
    learner = PrimalAdapter(8, 3, hidden_dim=16, ridge=0.5)
    rng = np.random.default_rng(3)
    learner.accumulate(rng.standard_normal((40, 8)), rng.integers(0, 3, 40))

    def ctrl_c(*args: np.ndarray) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(released, where, ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        learner.finalize()
    monkeypatch.undo()
    with pytest.raises(RailError, match="load its state file again"):
        learner.predict(np.zeros((1, 8)))


def test_a_ctrl_c_during_an_update_leaves_the_learner_refusing_use(monkeypatch) -> None:
    from vlm_export.runtime.rail import primal

    learner = PrimalAdapter(8, 3, hidden_dim=16, ridge=0.5)
    rng = np.random.default_rng(4)
    learner.accumulate(rng.standard_normal((10, 8)), rng.integers(0, 3, 10))

    def ctrl_c(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(primal, "rank_update", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        learner.accumulate(rng.standard_normal((10, 8)), rng.integers(0, 3, 10))
    monkeypatch.undo()
    with pytest.raises(RailError, match="load its state file again"):
        learner.accumulate(rng.standard_normal((10, 8)), rng.integers(0, 3, 10))


def test_factored_rebuilds_the_matrix_after_a_ctrl_c_that_came_before_lapack(monkeypatch):
    from vlm_export.runtime.rail import linalg

    matrix = np.ascontiguousarray(_spd(30, 5))
    original = matrix.copy()

    def ctrl_c(view: np.ndarray) -> int:
        raise KeyboardInterrupt  # plain: LAPACK never ran

    monkeypatch.setattr(released, "potrf_lower", ctrl_c)
    with pytest.raises(KeyboardInterrupt), linalg.factored(matrix, 0.1, "G"):
        pass
    np.testing.assert_array_equal(matrix, original)


def test_empty_systems_need_no_lapack() -> None:
    assert released.potrf_lower(np.zeros((0, 0), order="F")) == 0
    assert released.potrs_lower(_spd(3), np.zeros((3, 0), order="F")) == 0
