"""Peak memory of RAIL learning and merging, estimated before anything is allocated.

Primal: the one d x d float64 matrix (G or R), W_r, B and W (the solve works in W's own memory),
phi(x) of one batch and its N x N kernel, plus the process itself. Dual: M = (K + lambda I)^-1
is N x N and its block update holds the old and the grown matrix and two products of the old
size at once. A refusal is one line naming the largest size that fits (core.memory).
"""

from __future__ import annotations

from vlm_export.core import memory
from vlm_export.runtime.rail.primal import FIRST_SOLVE_ROWS

FLOAT = 8
PROCESS_BYTES = 300 * 2**20  # interpreter, NumPy, SciPy, an ONNX Runtime session's arena
MAX_HIDDEN_DIM = 1 << 20  # search bound for the hint
PRIMAL_COLUMN_ARRAYS = 2  # W and B
DUAL_COPIES = 4  # old M, the grown M and two N x N products during a block update


def primal_peak_bytes(in_dim: int, num_classes: int, hidden_dim: int) -> int:
    """Estimated peak bytes of learning (or merging into) a primal learner of width d_h.

    One d x d matrix, W_r, B and W (d x C each, counted whole: the columns of classes never
    learned take no memory in fact), phi(x) of the largest batch taken at once and its N x N
    kernel, the process. The solves work in place (G factored in its own memory, W solved in
    its own), so nothing else of size d x d or d x C is held.
    """
    dim = hidden_dim or in_dim
    matrix = dim * dim
    rows = min(FIRST_SOLVE_ROWS, dim)
    side = in_dim * hidden_dim + PRIMAL_COLUMN_ARRAYS * dim * num_classes + rows * (dim + rows)
    return FLOAT * (matrix + side) + PROCESS_BYTES


def dual_peak_bytes(in_dim: int, num_classes: int, samples: int) -> int:
    """Estimated peak bytes of a dual learner reaching ``samples`` stored samples."""
    return FLOAT * (DUAL_COPIES * samples * samples + 2 * samples * (in_dim + num_classes)) + (
        PROCESS_BYTES
    )


def check_primal(
    what: str, in_dim: int, num_classes: int, hidden_dim: int, available: int | None = None
) -> None:
    """Refuse (UserError) a primal learner that would not fit, naming the --hidden-dim that does."""

    def cost(width: int) -> int:
        return primal_peak_bytes(in_dim, num_classes, width)

    memory.require_memory(
        f"{what} (d_h {hidden_dim}: a {hidden_dim} x {hidden_dim} float64 matrix)",
        cost(hidden_dim),
        lambda left: memory.capacity_hint("--hidden-dim", cost, left, MAX_HIDDEN_DIM),
        available,
    )


def check_dual(in_dim: int, num_classes: int, samples: int, available: int | None = None) -> None:
    """Refuse (UserError) a dual learner whose N x N kernel matrices would not fit."""

    def cost(count: int) -> int:
        return dual_peak_bytes(in_dim, num_classes, count)

    def hint(left: int) -> str:
        largest = memory.largest_fitting(cost, left, samples)
        return f"at most {largest} samples fit the dual form here: learn with --form primal"

    memory.require_memory(
        f"the dual learner ({samples} samples: {samples} x {samples} kernel matrices)",
        cost(samples),
        hint,
        available,
    )
