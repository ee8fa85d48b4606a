"""TokenLoader: batches of packed windows from a token stream, shuffled per epoch, with a
position small enough to live in a checkpoint and exact enough to resume on the same batch.

Windows: window i is tokens[i * T : i * T + T + 1] (T = seq_len), so consecutive windows share one
token and every token after the first is a target exactly once per epoch; input_ids is the window
without its last token and labels without its first (labels[b, t] is the next token of
input_ids[b, t]: the shift is done here, the model takes labels aligned with positions). The tail
of the stream that does not fill a window is unused.

Order: each epoch is a permutation of the windows drawn from a generator seeded by (seed, epoch)
alone, so batch (epoch, index) is a pure function of the loader's arguments and needs no stored
RNG state; resuming = setting (epoch, position). Iteration never ends: after the last batch of an
epoch comes the first of the next.

Distributed: a global batch is batch_size * world_size consecutive windows of the permutation and
rank r takes the r-th block of batch_size, so the ranks' batches are disjoint and their
concatenation in rank order is the batch a single process with batch_size * world_size would get.
Every rank steps through the same (epoch, position), so rank 0's state_dict resumes all of them.
drop_last=False keeps a last, smaller global batch, split as evenly as possible across ranks
(kept only when each rank gets at least one window, so all ranks run the same number of steps).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"perfml-token-loader:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class TokenLoader:
    """Yields (input_ids [B, T], labels [B, T]) int64 CPU tensors forever; len() is the number of
    batches per epoch. See the module docstring for windows, order and sharding."""

    def __init__(
        self,
        tokens: Tensor,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TokenLoader: {name} must be a positive int, got {value!r}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"TokenLoader: world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"TokenLoader: rank must be in [0, {world_size}), got {rank!r}")
        if tokens.dim() != 1 or tokens.is_floating_point() or tokens.is_complex():
            raise ValueError(
                f"TokenLoader: tokens must be a 1-D integer tensor, got {tokens.dtype} "
                f"{tuple(tokens.shape)}"
            )
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.global_batch = batch_size * world_size
        self.num_windows = max(len(tokens) - 1, 0) // seq_len
        full, rest = divmod(self.num_windows, self.global_batch)
        self._len = full + (1 if not drop_last and rest >= world_size else 0)
        if self._len == 0:
            raise ValueError(
                f"TokenLoader: {len(tokens)} tokens make {self.num_windows} windows of "
                f"seq_len + 1 = {seq_len + 1} tokens, fewer than one batch of "
                f"{self.global_batch} (batch_size {batch_size} x world_size {world_size})"
            )
        # [num_windows, T + 1] view with stride T: windows overlap by one token, nothing is copied
        self._windows = tokens[: self.num_windows * seq_len + 1].unfold(0, seq_len + 1, seq_len)
        self.epoch = 0
        self.position = 0
        self._order: tuple[int, Tensor] | None = None

    def __len__(self) -> int:
        return self._len

    def _permutation(self, epoch: int) -> Tensor:
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
                order = torch.randperm(self.num_windows, generator=gen)
            else:
                order = torch.arange(self.num_windows)
            self._order = (epoch, order)
        return self._order[1]

    def batch(self, epoch: int, index: int) -> tuple[Tensor, Tensor]:
        """This rank's batch `index` of `epoch` (a pure function of the loader's arguments)."""
        if not 0 <= index < self._len:
            raise IndexError(f"TokenLoader: batch index {index} outside [0, {self._len})")
        order = self._permutation(epoch)
        start = index * self.global_batch
        ids = order[start : start + self.global_batch]
        if len(ids) == self.global_batch:
            mine = ids[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        else:  # the short last batch of drop_last=False
            mine = torch.tensor_split(ids, self.world_size)[self.rank]
        windows = self._windows[mine].long()
        return windows[:, :-1], windows[:, 1:]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        out = self.batch(self.epoch, self.position)
        self.position += 1
        if self.position == self._len:
            self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        """Where the next batch comes from, plus what must match on resume; plain ints."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; a key that does not match this loader's data or shape raises a
        ValueError naming it (resuming on other data or another batch would not be a resume)."""
        for key in ("seed", "seq_len", "global_batch", "num_windows"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"TokenLoader.load_state_dict: {key} is {state[key]} in the state but "
                    f"{getattr(self, key)} in this loader"
                )
        missing = [key for key in ("epoch", "position") if key not in state]
        if missing:
            raise ValueError(f"TokenLoader.load_state_dict: the state has no {missing[0]!r}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self._len:
            raise ValueError(
                f"TokenLoader.load_state_dict: position {position} of epoch {epoch} is outside "
                f"this loader's {self._len} batches per epoch"
            )
        self.epoch, self.position = epoch, position
