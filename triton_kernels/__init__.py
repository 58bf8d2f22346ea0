"""klkern's fused Triton kernels (installed as ``klkern.triton_kernels``).

Three operations over stacks of same-shape blocks, one launch (or two) per
stack, each matching a step of docs/spec.md and tested against klkern.reference:

* :func:`rotate_project`: ``Gr = Q_a^T G Q_b`` with the rotated moment
  updates and the diagonal eigenvalue projection in the epilogue;
* :func:`factor_ema_`: ``R <- beta R + alpha X diag(w) X^T``, one triangle;
* :func:`precondition`: ``U = Q_a [P(X)] Q_b^T`` with the diagonal scaling
  in the prologue and the parameter update in the epilogue.

Importing this package needs triton; klkern imports it only when the Triton
backend is selected.
"""

from .factor_ema import factor_ema_
from .gemm import ParamTable, batched_gemm
from .precondition import precondition
from .rotate_project import rotate_project

__all__ = ["rotate_project", "factor_ema_", "precondition", "batched_gemm", "ParamTable"]
