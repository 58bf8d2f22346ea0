"""A stack: blocks of one algorithm path, block shape, preconditioned modes, param group, device and
step count that step together (klkern/engine/_plan.py builds them; klkern/engine/_stacking.py fills
their buffers and views)."""

from __future__ import annotations

import torch

from ..algorithms._algorithms import ALGORITHMS

__all__ = ["Stack"]


class Stack:
    """Blocks that step together: one path, block shape, mask, group, device and step count."""

    def __init__(self, path: str, group_index: int, group: dict, shape: tuple, mask: tuple, t: int,
                 members: list, blocks: list):
        self.path = path
        self.algorithm = ALGORITHMS[path]  # what is specific to the path (klkern/algorithms/_algorithms.py)
        self.device = torch.device("cpu")
        self.group_index = group_index
        self.group = group
        self.shape = shape  # block shape (for the AdamW path: (N,), the members' sizes summed)
        self.mask = mask
        self.t_prev = t  # the members' step count before this step
        self.members = members  # [(param, block index)]
        self.blocks = blocks  # the members' state dicts
        self.sizes: list[int] = []  # AdamW path: each member's number of entries
        self.bufs: dict = {}
        self.cache: dict = {}  # views of persistent buffers, made once
        self.lo = self.hi = 0  # its columns in the per-block tables
        self.G: torch.Tensor | None = None
        self.W: torch.Tensor | None = None  # where the parameters are gathered (G, or float64)
        self.g_dst: list = []  # per member: a view of G shaped like its gradient source
        self.w_dst: list = []  # per member: a view of W shaped like its parameter target
        self.g_blocks: list = []  # per member: its block of G (for the per-block norms)
        self.targets: list = []  # per member: the parameter view written (None: copying layout)
        self.targets_version = 0  # bumped when a target is re-pointed (a parameter's new storage)
        self.sources: list = []  # per member: how its gradient is found ("grad", "extract", "local")
        self.proj: dict = {}  # KL: mode -> (B, d_k) view of the plan's projection buffer
        self.keep: torch.Tensor | None = None  # (B,) bool: the block steps (a view of the plan's table)
        self.keep_b: torch.Tensor | None = None  # the same, broadcast over a block
        self.spike = False
        self.refresh = False
        self.offsets: list | None = None  # stagger_refresh: each member's refresh offset
        self.due: list = []  # stagger_refresh: the members refreshed at this step
        self.track_kl = False
        self.U: torch.Tensor | None = None

    @property
    def B(self) -> int:
        return len(self.members)

    @property
    def adamw(self) -> bool:
        return not self.algorithm.preconditioned

    @property
    def kl(self) -> bool:
        """Whether the stack's eigenvalues are KL estimates (the flat lam tables hold them)."""
        return self.algorithm.kl_estimate

    @property
    def t(self) -> int:
        return self.t_prev + 1

    def broadcast(self, vec: torch.Tensor) -> torch.Tensor:
        """A (B,) vector shaped to broadcast over the stack's blocks (B, 1, ..., 1)."""
        return vec.view((self.B,) + (1,) * len(self.shape))

    def coef(self, name: str) -> torch.Tensor:
        """Row ``name`` of the plan's coefficient table for these blocks, broadcast over a block
        (made once)."""
        return self.cache[name]

    def zero_skipped(self) -> None:
        """The gradient of every block that does not step set to 0 (what the torch steps rely on;
        the kernels mask such blocks themselves)."""
        zero, G = self.cache["zero"], self.G
        assert G is not None  # made with the stack (klkern/engine/_stacking.py)
        if self.adamw:
            self.cache["keep_e"] = torch.repeat_interleave(self.cache["keep"], self.cache["sizes"],
                                                           output_size=self.shape[0])
            torch.where(self.cache["keep_e"], G, zero, out=G)
        else:
            assert self.keep_b is not None
            torch.where(self.keep_b, G, zero, out=G)

    def coef_matrix(self, name: str) -> torch.Tensor:
        """The same, broadcast over a (B, d, d) stack of factors."""
        return self.cache[name + ":mat"]
