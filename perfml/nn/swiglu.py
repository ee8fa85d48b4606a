"""perfml.nn.SwiGLUMLP: the Llama MLP, down_proj(silu(gate_proj(x)) * up_proj(x)), with the
gated activation fused.

Parameter names and shapes are those of HF LlamaMLP (gate_proj, up_proj, down_proj), so its
state_dict loads either way. The two projections are separate nn.Linear layers unless
perfml.models.fuse_projections stacks them into one `gate_up_proj` (one matmul; its state_dict
hooks keep the separate keys), whose output the forward splits with views. The projections'
outputs are fresh tensors that only the gated activation reads, so its backward writes dgate and
dup over them (inplace_backward=True): the backward of the activation allocates nothing, as in
Liger's SwiGLU. A forward hook that keeps gate_proj's or up_proj's output would see it
overwritten by its gradient after backward.
"""

from __future__ import annotations

import torch
from torch import nn

from perfml.ops.swiglu import swiglu


class SwiGLUMLP(nn.Module):
    """x [..., hidden_size] -> [..., hidden_size] through an intermediate_size SwiGLU."""

    fusible_projections = ("gate_up_proj",)  # the forward reads it (perfml.models.fuse)

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if hidden_size <= 0 or intermediate_size <= 0:
            raise ValueError(
                "SwiGLUMLP: hidden_size and intermediate_size must be positive, got "
                f"{hidden_size} and {intermediate_size}"
            )
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        factory = {"device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up_proj = self._modules.get("gate_up_proj")  # set by perfml.models.fuse
        if gate_up_proj is not None:
            # two [.., I] views of one [.., 2I] output, read in place by the kernel; its backward
            # writes new buffers for them (halves of one storage are never overwritten)
            gate, up = gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(swiglu(gate, up, inplace_backward=True))
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), inplace_backward=True))
