"""One forward of the layers below the lowest probed layer for two passes over the same batch.

SAP's clean probe pass (W, V = 0) and its step-5 pass (W, V_safe) see the same weights, the same batch and,
from the same RNG state, the same dropout masks: they differ only from the lowest probed layer up. The clean
pass `record`s the output of the last layer below it (with its autograd graph) and the RNG state at that
point; the step-5 pass, `replayed`, skips those layers: they hand back the recorded output, the RNG resumes
from the recorded state, and the backward of step 5 runs through the recorded graph. The result is what the
step-5 pass computes on its own, bit for bit (tested), for one lower-layer forward less.

The weights must not change in place between the two passes (autograd would refuse the recorded graph), so
the perturbed probe pass runs before the clean one.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from ...model import decoder_layers
from ...model.layers import forwards_replaced

log = logging.getLogger(__name__)


class SharedLowerForward:
    """Records the lower layers' forward in one pass (`record`) and lets the next pass reuse it (`replayed`)."""

    def __init__(self, model: torch.nn.Module, first_probed_layer: int, enabled: bool = True):
        blocks = decoder_layers(model)
        self.lower, self.first_probed = list(blocks[:first_probed_layer]), blocks[first_probed_layer]
        self.supported = enabled and bool(self.lower)  # nothing to share when layer 0 is probed
        self.kept = None  # (input ids, output of the last lower layer, RNG state after it)

    @contextlib.contextmanager
    def record(self, batch: dict):
        """Keep, from the pass over `batch` run inside the block, the last lower layer's output and the RNG
        state after it."""
        if not self.supported:
            yield
            return

        def keep(module, args, output):
            self.kept = (batch["input_ids"], output, _rng_state(_hidden(output).device))

        def check(module, args, kwargs):
            if self.kept is not None and _incoming(args, kwargs) is not _hidden(self.kept[1]):
                log.warning("this model changes hidden states between decoder layers: no lower-layer sharing")
                self.supported, self.kept = False, None
        handles = [self.lower[-1].register_forward_hook(keep),
                   self.first_probed.register_forward_pre_hook(check, with_kwargs=True)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def replayed(self, batch: dict):
        """Inside the block, the next forward (over `batch`, the recorded one) skips the lower layers and reuses
        what `record` kept. Whatever was kept is used once at most."""
        kept, self.kept = self.kept, None
        if kept is None or kept[0] is not batch["input_ids"]:
            yield
            return
        _, output, rng = kept
        with _skipped(self.lower, output) as unskip:
            def resume(module, args, kwargs):
                unskip()  # only this forward skips them (a checkpointed backward may run them again)
                _set_rng_state(rng, _incoming(args, kwargs).device)
            handle = self.first_probed.register_forward_pre_hook(resume, with_kwargs=True)
            try:
                yield
            finally:
                handle.remove()


def _skipped(layers: list, output):
    """The layers return `output` instead of computing; yields a function that ends this early (idempotent)."""
    return forwards_replaced(layers, lambda layer, original: lambda *args, **kwargs: output)


def _incoming(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
