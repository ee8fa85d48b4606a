"""Token-by-token decoding of a perfml Llama with a static KV cache, replayed as a CUDA graph.

At batch 1 a decode step is a chain of small GEMVs, norms and a one-query attention: the GPU is
done with each kernel in microseconds, so launching them one by one from Python costs as much as
running them. A StaticKVCache gives every step the same shapes and buffers, so the whole step
(embedding, every layer, the head) is captured once in a CUDA graph and replayed with one launch
per token. Quantized models (perfml.quantize) decode the same way: their Triton kernels are
captured like any other. In a fused model (config.fused) each layer's attention is one
perfml.ops.decode_attention kernel (cache write and attention together, the position read on the
device) instead of SDPA over the masked cache; Llama.fuse_projections() cuts the projections to
two matmuls per layer.

    decoder = Decoder(model, max_len=prompt_len + new_tokens)
    logits = decoder.prefill(prompt_ids)          # [B, V] for the last prompt position (eager)
    logits = decoder.step(next_tokens)            # [B, V] for the next position (graph replay)
    ids = decoder.generate(prompt_ids, 128)       # greedy, [B, T + 128]

On CPU (or cuda_graph=False) step() runs the same static-shape code eagerly; the tests check it
against Llama.forward and Llama.generate. The logits step() returns on the graph path live in the
graph's output buffer: the next step overwrites them (clone to keep).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from perfml.models.llama import (
    DEFAULT_TEMPERATURE,
    StaticKVCache,
    check_sampling,
    sample_tokens,
)

# warm-up steps before capture: Triton compiles, cuBLAS picks kernels, the cache allocates
_WARMUP_STEPS = 2


class Decoder:
    """Decodes `model` (a perfml Llama, float or quantized) for up to `max_len` positions of a
    batch of `batch_size` sequences."""

    def __init__(
        self,
        model: nn.Module,
        max_len: int,
        *,
        batch_size: int = 1,
        cuda_graph: bool | None = None,
    ) -> None:
        for name in ("hidden_states", "logits", "config"):
            if not hasattr(model, name):
                raise TypeError(f"Decoder: model must be a perfml Llama (no .{name})")
        if not 1 <= max_len <= model.config.max_seq_len:
            raise ValueError(
                f"Decoder: max_len must be in [1, {model.config.max_seq_len}] (the model's "
                f"max_seq_len), got {max_len}"
            )
        if batch_size < 1:
            raise ValueError(f"Decoder: batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.max_len = max_len
        self.batch_size = batch_size
        self.device = model.embed_tokens.weight.device
        on_cuda = self.device.type == "cuda"
        if cuda_graph and not on_cuda:
            raise ValueError(f"Decoder: cuda_graph=True needs a CUDA model, got {self.device}")
        self.cuda_graph = on_cuda if cuda_graph is None else cuda_graph
        self.cache = StaticKVCache(model.config.num_layers, max_len, self.device)
        self._token = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: Tensor | None = None

    @property
    def length(self) -> int:
        """Positions filled so far."""
        return self.cache.length

    def reset(self, length: int = 0) -> None:
        """Forget the positions from `length` on (0: start over). Rewinding to the prompt's end
        decodes again from the same prefill; a captured graph stays valid."""
        self.cache.reset(length)

    def _check_tokens(self, ids: Tensor, what: str) -> None:
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"Decoder.{what}: token ids must be integers, got {ids.dtype}")
        if ids.shape[0] != self.batch_size:
            raise ValueError(
                f"Decoder.{what}: batch of {ids.shape[0]} sequences, the decoder was built for "
                f"{self.batch_size}"
            )
        if ids.device != self.device:
            raise ValueError(f"Decoder.{what}: token ids on {ids.device}, model on {self.device}")

    def _room(self, t: int, what: str) -> None:
        if self.cache.length + t > self.max_len:
            raise ValueError(
                f"Decoder.{what}: {self.cache.length + t} positions exceed max_len {self.max_len} "
                f"({self.cache.length} of {self.max_len} positions are already filled; call "
                f"reset() to start over or reset(n) to keep the first n, e.g. the prompt)"
            )

    @torch.no_grad()
    def prefill(self, input_ids: Tensor) -> Tensor:
        """Run the prompt [B, T] after the filled positions; the logits [B, V] of its last one."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(
                f"Decoder.prefill: input_ids must be [B, T] with T >= 1, got "
                f"{tuple(input_ids.shape)}"
            )
        self._check_tokens(input_ids, "prefill")
        self._room(input_ids.shape[1], "prefill")
        hidden = self.model.hidden_states(input_ids, self.cache)
        return self.model.logits(hidden[:, -1])

    def _forward_one(self) -> Tensor:
        return self.model.logits(self.model.hidden_states(self._token, self.cache)[:, -1])

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per sequence (tokens [B] or [B, 1]); the logits [B, V] it produces."""
        tokens = tokens.reshape(-1, 1) if tokens.dim() <= 1 else tokens
        if tokens.shape[1:] != (1,):
            raise ValueError(f"Decoder.step: one token per sequence, got {tuple(tokens.shape)}")
        self._check_tokens(tokens, "step")
        self._room(1, "step")
        self._token.copy_(tokens)
        if not self.cuda_graph:
            return self._forward_one()
        if self._graph is None:
            self._capture()
        self._graph.replay()
        self.cache.sync(1)
        return self._logits

    def _capture(self) -> None:
        length = self.cache.length
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            # the warm-up writes the slot the real step writes next; rewinding keeps it harmless
            for _ in range(_WARMUP_STEPS):
                self._forward_one()
                self.cache.reset(length)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = self._forward_one()
        # capturing ran the Python once (advancing the host count) but no kernel: undo the count
        self.cache.length = length
        self._graph = graph

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = DEFAULT_TEMPERATURE,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue input_ids [B, T] by up to max_new_tokens tokens from an empty cache; returns
        [B, T + n]. Llama.generate's sampling and default: temperature=0 (the default) is
        greedy, temperature > 0 samples, top_k keeps the k most likely tokens; a row that
        produced eos_token_id is padded with it, and generation stops when every row has."""
        check_sampling("Decoder.generate", max_new_tokens, temperature, top_k)
        if input_ids.shape[-1] + max_new_tokens > self.max_len:
            raise ValueError(
                f"Decoder.generate: prompt + max_new_tokens = "
                f"{input_ids.shape[-1] + max_new_tokens} exceeds max_len {self.max_len}"
            )
        self.reset()
        return sample_tokens(
            input_ids,
            max_new_tokens,
            lambda: self.prefill(input_ids),
            self.step,
            temperature,
            top_k,
            eos_token_id,
            generator,
        )
