"""klkern's fused Triton kernels (installed as ``klkern.triton_kernels``).

The operations of a steady step over stacks of same-shape blocks, each a file with its launcher,
its kernel and its torch reference (``reference_*``), tested against the reference and float64
(tests/test_triton.py) and timed against it (bench/test_kernel_bench.py):

* :func:`rotate` (rotate.py): ``Gr = Q_a^T G Q_b`` with the guard's mask, the eigenvalue
  projections of SPEC step 5, the moment updates and the preconditioned direction in its
  epilogue; :func:`scaled_moments_`, the moments from ``s Gr`` under ``spike_threshold``;
* :func:`factor_ema_` (factor_ema.py): ``R <- beta R + alpha X diag(w) X^T``, per-block beta,
  one triangle;
* :func:`precondition` (precondition.py): ``U = Q_a X Q_b^T`` with the unseen directions masked
  and the parameter update (SPEC step 8) written in its epilogue;
* :func:`adamw_` (adamw.py): the AdamW path's step, written into the parameters;
* :func:`batched_product` (product.py): the product with nothing fused, at every precision,
  "highest" by 3xTF32 on tensor cores (_product.py).

Importing this package needs triton; klkern imports it only when the Triton backend is selected.
"""

from .adamw import FlatMembers, adamw_
from .factor_ema import factor_ema_
from .precondition import precondition
from .product import ParamTable, batched_product
from .rotate import rotate, scaled_moments_

__all__ = ["rotate", "scaled_moments_", "factor_ema_", "precondition", "adamw_", "batched_product", "ParamTable",
           "FlatMembers"]
