"""One draw of the dropout masks for SAP's three passes over a task batch.

The perturbed probe pass, the clean probe pass and step 5 run over the same batch from the same RNG state, so
they draw the same dropout masks (docs/sap.md). On a CPU the draw is not free: LoRA dropout draws one random number
per input element of every adapted module, and SAP would draw the same masks nearly three times (docs/performance.md
measures it). Now the perturbed pass `recorded` keeps each `nn.Dropout`'s masks as it draws them (as torch's CPU
dropout does, bit for bit), and the clean pass and step 5 are `replayed`: each dropout takes its recorded mask
instead of drawing, and the RNG ends where drawing would have left it. Same numbers, bit for bit (tested).

That is exact only if those modules draw every random number of the pass. The recording checks that nothing else
moved the RNG between and after their draws (attention dropout inside a fused kernel would) and keeps nothing
otherwise: the passes then draw again, as before. Tensors off the CPU are left alone (a fused kernel draws there,
cheaply), and so is gradient checkpointing (its recomputation calls every dropout again).
"""
from __future__ import annotations

import contextlib
import logging

import torch

from ...model.layers import forwards_replaced

log = logging.getLogger(__name__)


class DropoutMasks:
    """Records the dropout masks of one pass over a batch (`recorded`) for the next passes over it (`replayed`)."""

    def __init__(self, model: torch.nn.Module, enabled: bool = True):
        # exactly nn.Dropout: a subclass may draw differently
        self.modules = [m for m in model.modules() if type(m) is torch.nn.Dropout] if enabled else []
        self.kept = None  # (input ids, {module: [noise of each call]}, RNG state after the recorded pass)
        self._warned = False

    @contextlib.contextmanager
    def recorded(self, batch: dict):
        """Keep the masks that the pass over `batch` inside the block draws, if they are all it draws."""
        self.kept = None
        if not self.modules:
            yield
            return
        masks, rng = {}, _RngWatch()

        def drawing(module, original):
            def forward(x):
                if not _draws(module, x):
                    return original(x)
                if x.device.type != "cpu" or module.inplace or not rng.untouched():
                    rng.spoilt = True
                    return original(x)
                noise = torch.empty_like(x).bernoulli_(1 - module.p).div_(1 - module.p)  # torch's CPU dropout
                rng.mark()
                masks.setdefault(module, []).append(noise)
                return x * noise
            return forward
        with forwards_replaced(self.modules, drawing):
            yield
        if masks and not rng.spoilt and rng.untouched():
            self.kept = (batch["input_ids"], masks, rng.state)
        elif masks and not self._warned:
            self._warned = True
            log.info("this model draws random numbers outside its dropout modules: SAP's passes draw their own masks")

    @contextlib.contextmanager
    def replayed(self, batch: dict, last: bool = False):
        """Inside the block, a pass over `batch` (the recorded one) reuses the recorded masks; afterwards the RNG is
        where the recorded pass left it. `last`: the masks are dropped on leaving."""
        kept = self.kept
        if kept is None or kept[0] is not batch["input_ids"]:
            yield
            return
        _, masks, state = kept
        calls = {}

        def replaying(module, original):
            def forward(x):
                if not _draws(module, x):
                    return original(x)
                index = calls[module] = calls.get(module, -1) + 1
                noise = masks.get(module, [])[index:index + 1]
                if not noise or noise[0].shape != x.shape or noise[0].dtype != x.dtype:
                    return original(x)  # this pass went another way (e.g. other experts routed): a fresh mask
                return x * noise[0]
            return forward
        try:
            with forwards_replaced(self.modules, replaying):
                yield
            torch.set_rng_state(state)
        finally:
            if last:
                self.kept = None


def _draws(module: torch.nn.Dropout, x: torch.Tensor) -> bool:
    """Whether torch's dropout would draw random numbers for `x` (p = 0 and p = 1 draw none)."""
    return module.training and 0 < module.p < 1 and x.numel() > 0


class _RngWatch:
    """The CPU RNG state after the last draw we made, to tell whether anything else drew in between."""

    def __init__(self):
        self.state, self.spoilt = torch.get_rng_state(), False

    def untouched(self) -> bool:
        return torch.equal(torch.get_rng_state(), self.state)

    def mark(self) -> None:
        self.state = torch.get_rng_state()
