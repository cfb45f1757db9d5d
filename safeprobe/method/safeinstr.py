"""SafeInstr (Bianchi et al., ICLR 2024, "Safety-Tuned LLaMAs"): a few safety demonstrations (harmful
instruction -> refusal) mixed into the fine-tuning data; the optimisation itself is plain SFT.

A few percent of the data already helps; too many demonstrations cause over-refusal (`--n-safety` is the knob).
"""
from .base import SafeprobeTrainer
from .registry import DataRole, Method, register


class SafeInstrTrainer(SafeprobeTrainer):
    method_name = "safeinstr"

    def __init__(self, *args, safety_demos=None, train_dataset=None, **kwargs):
        if not safety_demos:
            raise ValueError("SafeInstrTrainer needs safety_demos (encoded harmful instruction -> refusal examples)")
        # The Trainer's seeded sampler shuffles the mixture, so demonstrations are spread over the run.
        super().__init__(*args, train_dataset=list(train_dataset) + list(safety_demos), **kwargs)


register(Method("safeinstr", SafeInstrTrainer, summary="safety demonstrations mixed into the task data (Bianchi et al. 2024)",
                data_only=True, data=(DataRole("safety_demos", "alignment_data", "n_safety", "examples", "alignment", None),)))
