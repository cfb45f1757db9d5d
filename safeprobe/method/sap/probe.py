"""The safety-aware probe: one vector per probed decoder layer, added to that layer's output hidden states.

Implemented with forward hooks (not parameters glued onto a module), so it works on any architecture whose
decoder layers can be found, never clashes with LoRA, and is never saved: the deployed model is f_W.
An inactive probe returns None from its hooks, which leaves the layer output untouched (bit-identical).
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable

import torch

from ...errors import UserError
from ...model import decoder_layers

# The paper probes v_11..v_20 of a 32-layer Llama-2: the band [10/32, 20/32) of the depth.
PAPER_BAND = (10 / 32, 20 / 32)


def resolve_layers(spec: str | list | tuple | None, n_layers: int) -> list[int]:
    """Probe layer indices (0-based) from a spec.

    `middle` (default): the paper's band scaled to the model's depth; `all`; `3,9` (indices);
    `10:20` (index range, end exclusive); `0.3:0.6` (fractions of depth).
    """
    layers = parse_layers(spec)(n_layers)
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad or not layers:
        raise UserError(f"probe layer(s) {bad or spec} out of range; valid layer indices are 0..{n_layers - 1}")
    return sorted(set(layers))


def parse_layers(spec: str | list | tuple | None) -> Callable[[int], list[int]]:
    """The spec's syntax, checked without a model: a function of the model's depth giving the indices."""
    if spec is None or spec == "middle":
        def middle(n_layers: int) -> list[int]:
            start = int(n_layers * PAPER_BAND[0] + 0.5)
            return list(range(start, min(max(start + 1, int(n_layers * PAPER_BAND[1] + 0.5)), n_layers)))
        return middle
    if isinstance(spec, (list, tuple)):
        try:
            layers = [int(i) for i in spec]
        except (TypeError, ValueError):
            raise UserError(f"probe layers {list(spec)} not understood; give layer indices") from None
        return lambda n_layers: layers
    if spec == "all":
        return lambda n_layers: list(range(n_layers))
    text = str(spec)
    if re.fullmatch(r"\s*0?\.\d+\s*:\s*(0?\.\d+|1(\.0*)?)\s*", text):
        lo, hi = (float(x) for x in text.split(":"))
        return lambda n_layers: list(range(int(n_layers * lo + 0.5), max(int(n_layers * lo + 0.5) + 1,
                                                                         int(n_layers * hi + 0.5))))
    if re.fullmatch(r"\s*-?\d+\s*:\s*-?\d+\s*", text):
        lo, hi = (int(x) for x in text.split(":"))
        return lambda n_layers: list(range(lo, hi))
    if re.fullmatch(r"\s*-?\d+(\s*,\s*-?\d+)*\s*", text):
        return lambda n_layers: [int(x) for x in text.split(",")]
    raise UserError(f"probe layers '{spec}' not understood; use 'middle', 'all', '3,9', '10:20' or '0.3:0.6'")


class Probe:
    """Forward hooks adding `vectors[k]` to the output of decoder layer `layers[k]` while active."""

    def __init__(self, model: torch.nn.Module, layers=None):
        blocks = decoder_layers(model)
        self.layers = resolve_layers(layers, len(blocks))
        self.hidden_size = _hidden_size(model)
        # the probe lives in at least fp32 (fp64 for an fp64 model), whatever the compute dtype
        self.dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
        self.vectors: list[torch.Tensor] | None = None
        self._handles = [blocks[i].register_forward_hook(self._hook(k)) for k, i in enumerate(self.layers)]

    def _hook(self, k: int):
        def add_vector(module, args, output):
            if self.vectors is None:
                return None  # inactive: output untouched
            if isinstance(output, tuple):
                return (output[0] + self.vectors[k].to(output[0].dtype),) + output[1:]
            return output + self.vectors[k].to(output.dtype)
        return add_vector

    def zeros(self, like: torch.Tensor, requires_grad: bool = False) -> list[torch.Tensor]:
        """V = 0 on the device of `like` (leaf tensors we can differentiate with respect to)."""
        return [torch.zeros(self.hidden_size, device=like.device, dtype=self.dtype, requires_grad=requires_grad)
                for _ in self.layers]

    @contextlib.contextmanager
    def active(self, vectors: list[torch.Tensor] | None):
        previous, self.vectors = self.vectors, vectors
        try:
            yield self
        finally:
            self.vectors = previous

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.vectors = None


def _hidden_size(model) -> int:
    config = model.config
    for key in ("hidden_size", "n_embd", "d_model"):
        if hasattr(config, key):
            return int(getattr(config, key))
    raise UserError(f"cannot find the hidden size of model type '{config.model_type}'")
