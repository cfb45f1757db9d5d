"""`SAPTrainer`: Algorithm 1 (see `algorithm.py`) wired into TRL's `SFTTrainer`.

Drop-in for a TRL user: `SFTTrainer`'s arguments, `args` an `SAPConfig` (an `SFTConfig` with SAP's knobs), plus
`safety_dataset`: safety pairs as a preference dataset (`prompt`, `chosen` = the safe answer, `rejected` = the
harmful one; standard or conversational) or as encoded pairs. Works with PEFT LoRA or full fine-tuning, gradient
accumulation, fp32/bf16, accelerate DDP and FSDP2.

Distributed training: every rank draws the same safety batch from an identically seeded sampler, so the
safety direction s is identical on every rank by construction (it is also averaged across ranks, which removes
any floating-point drift). g_V is averaged across ranks so that every rank applies the same V_safe, as a single
process would with the global batch. The auxiliary passes run under `accelerator.no_sync(model)`, so DDP's
gradient hooks only ever synchronise the final (step 5) backward.

FSDP2: the trainable weights are shards; step 1's s comes from a backward into the shards (reduce-scattered, so
averaged over ranks like the rest), dW is added to the local shards in place and copied back, and the norms are
reduced over the ranks (see `weights`). Every micro-batch then synchronises its gradients, so that step 1's
backward never meets gradients held back by the Trainer's accumulation. The shared lower forward is off (FSDP
frees and re-gathers the layers' weights around each pass); the other fast paths stay on.

Checkpoints carry SAP's state (cached s and V_safe with their steps, the reference-mode probe and its AdamW
moments, how many safety batches were drawn), so a resumed run continues exactly where it stopped. A non-finite
s or g_V skips the step (see `SafeprobeTrainer`) and is never cached.
"""
from __future__ import annotations

import contextlib

import torch

from ...data.formats import safety_pair_features
from ...data.tokenize import PairCollator
from ..base import EndlessBatches, SafeprobeTrainer, all_finite
from ..checkpoint import numbered, unnumbered
from .dropout_masks import DropoutMasks
from .probe import Probe
from ..registry import DataRole, Method, Series, register
from ..weights import check_shardable, global_dot, global_norm, is_sharded, like, same_randomness
from .algorithm import perturbation, probe_gradient, safe_probe, safety_direction
from .config import SAPConfig
from .shared_forward import SharedLowerForward
from .shared_prompt import SharedPromptPass


class SAPTrainer(SafeprobeTrainer):
    method_name = "sap"
    config_class = SAPConfig

    def __init__(self, *args, safety_dataset=None, **kwargs):
        super().__init__(*args, **kwargs)
        check_shardable(self, "SAP")
        if safety_dataset is None or not len(safety_dataset):
            raise ValueError("SAPTrainer needs a non-empty safety_dataset (preference rows or encoded safety pairs)")
        if self.args.mode == "reference":  # a composed method keeps its name: sap+safeinstr-reference
            self.method_name = f"{self.method_name}-reference"
        self.probe = Probe(self.model, self.args.probe_layers)
        # the clean probe pass and step 5 share the layers below the lowest probed one (not under gradient
        # checkpointing, which would recompute them from inside the shared graph, nor under FSDP)
        self._shared = SharedLowerForward(self.model, self.probe.layers[0],
                                          enabled=not (self.args.gradient_checkpointing or self.is_fsdp_enabled))
        # the perturbed probe pass draws the dropout masks, the clean pass and step 5 reuse them (same reason)
        self._masks = DropoutMasks(self.model, enabled=not self.args.gradient_checkpointing)
        # step 1 runs each safety pair's prompt once for both answers, the pairs packed into few rows (checked
        # against the padded batch once; no KV cache, so gradient checkpointing keeps it)
        self._shared_prompt = SharedPromptPass()
        self._safety_dataset = safety_pair_features(safety_dataset, self.processing_class, self.args.max_length)
        self._safety_batch_size = self.args.safety_batch_size
        # a larger safety batch runs in chunks of at most one task batch of pairs: the memory of a task step
        self._safety_chunk = max(1, self.args.per_device_train_batch_size)
        self._safety_batches = self._safety_stream()
        self._s, self._s_step = None, None
        self._V, self._V_step = None, None
        self._ref = None  # reference mode: the probe as a parameter with its own AdamW
        self._unprobed = None  # L(W, 0) of the current micro-batch, when this step computed it

    def fast_paths(self) -> dict:
        """Each of SAP's fast paths, "on" or why it was off (recorded in run.json)."""
        checkpointing = "off: gradient checkpointing (it recomputes layers from inside the shared graph)" \
            if self.args.gradient_checkpointing else None
        sharded = "off: FSDP (it frees the weights between passes)" if self.is_fsdp_enabled else None
        packed = {True: "on", None: "not reached", False: "off: the model ignores the block attention mask (the "
                  "packed loss differed from the padded one)"}
        return {"shared_lower_forward": "on" if self._shared.supported else checkpointing or sharded or "off: layer 0 "
                "is probed, or the model passes its layers inputs that differ between passes",
                "dropout_mask_replay": "on" if self._masks.modules else checkpointing or "off: the model has no "
                "dropout",
                "packed_safety_pass": packed[self._shared_prompt.verified]}

    # -- data --------------------------------------------------------------------------------------
    def _safety_stream(self, skip: int = 0) -> EndlessBatches:
        collate, size = PairCollator(self.processing_class), self._safety_chunk
        chunked = lambda pairs: [collate(pairs[i:i + size]) for i in range(0, len(pairs), size)]  # noqa: E731
        return EndlessBatches(self._safety_dataset, self._safety_batch_size, self.args.seed, chunked, skip)

    def _next_safety_batch(self) -> list[dict]:
        """One safety batch as a list of chunks."""
        return [self._prepare_inputs(chunk) for chunk in next(self._safety_batches)]

    def _seed(self, tag: int) -> int:
        return hash((self.args.seed, self.state.global_step, tag, self.accelerator.process_index)) % 2**31

    def _mean_across_ranks(self, tensors: list) -> list:
        if self.accelerator.num_processes == 1 or is_sharded(tensors):  # FSDP's reduce-scatter averaged them
            return tensors
        return [self.accelerator.reduce(t, reduction="mean") for t in tensors]

    # -- Algorithm 1 -------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        inputs = self._prepare_inputs(inputs)
        self.gradient_sync_every_micro_batch(model)
        with self.accelerator.no_sync(model) if not self.is_fsdp_enabled else contextlib.nullcontext():
            V_safe = self._reference_probe(model, inputs) if self.args.mode == "reference" \
                else self._paper_probe(model, inputs)
        # step 5: the ordinary step, probed
        with self.probe.active(V_safe), self._shared.replayed(inputs), self._masks.replayed(inputs, last=True):
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self._unprobed is not None:  # how much the probe raised the loss step 5 descends
            self.record(probe_raise=float(loss) * self.current_gradient_accumulation_steps - self._unprobed)
            self._unprobed = None
        return loss

    def _harmful_perturbation(self, model, force: bool = False) -> list | None:
        """Step 1 (every `safety_every` steps): s on a safety batch, probe off -> dW (None: s not finite)."""
        step = self.state.global_step
        if force or self._s is None or step - self._s_step >= self.args.safety_every:
            batch = self._next_safety_batch()
            with same_randomness(self._seed(1), batch[0]["input_ids"].device):
                s, safety_loss = safety_direction(model, self.trainable_params, batch, self.args.safety_loss,
                                                  self._shared_prompt)
            s = self._mean_across_ranks(s)
            self.record(safety_loss=safety_loss, s_norm=global_norm(s))
            if not all_finite([safety_loss, *s]):
                self.flag_bad_step("safety direction")
                return None
            self._s, self._s_step = s, step
        self._s = like(self._s, self.trainable_params)  # a resumed run under FSDP: this rank's shards of the saved s
        delta, eps = perturbation(self.trainable_params, self._s, self.args.eps, self.args.eps_mode)
        self.record(eps=eps)
        return delta

    def _paper_probe(self, model, inputs) -> list | None:
        step = self.state.global_step
        if self._V is not None and step != self._V_step and (step - self._V_step) < self.args.probe_every:
            return self._V  # amortised: reuse the last V_safe
        delta = self._harmful_perturbation(model)
        if delta is None:
            return None  # the step is skipped anyway
        with self.probe.active(None):
            g_V, loss, loss_perturbed = probe_gradient(model, self.probe, self.trainable_params, delta, inputs,
                                                       shared=self._shared, masks=self._masks)
        g_V = self._mean_across_ranks(g_V)
        if not all_finite(g_V):
            self.flag_bad_step("probe gradient")
            return None
        self._V, self._V_step = safe_probe(g_V, self.args.beta, self.args.probe_norm), step
        # task_loss_unprobed: L(W, 0) on this batch, what SFT's step would see; task_loss (step 5) is L(W, V_safe)
        self.record(g_v_norm=global_norm(g_V), v_safe_norm=global_norm(self._V), l_su=loss_perturbed - loss,
                    task_loss_unprobed=loss)
        self._unprobed = float(loss)
        return self._V

    def _reference_probe(self, model, inputs) -> list:
        """The authors' schedule: this step uses the probe computed at the previous step (docs/sap.md, reference mode)."""
        if self._ref is None:
            self._ref = [torch.nn.Parameter(v) for v in self.probe.zeros(inputs["input_ids"])]
            self._ref_opt = torch.optim.AdamW(self._ref, lr=self.args.probe_lr)
        V_prev = [v.detach().clone() for v in self._ref]
        with self.probe.active(V_prev):  # the safety gradient is taken with the lagged probe still active
            delta = self._harmful_perturbation(model, force=self._s is None)
        if delta is None:
            return V_prev  # the step is skipped; the probe and its moments stay as they are
        g_V, loss, loss_perturbed = probe_gradient(model, self.probe, self.trainable_params, delta, inputs, at=V_prev,
                                                   shared=self._shared, masks=self._masks)
        g_V = self._mean_across_ranks(g_V)
        if not all_finite(g_V):
            self.flag_bad_step("probe gradient")
            return V_prev
        with torch.no_grad():  # next probe: zeroed, then one AdamW step ascending L_su (moments kept)
            for v, g in zip(self._ref, g_V):
                v.zero_()
                v.grad = -g
        self._ref_opt.step()
        self._ref_opt.zero_grad(set_to_none=True)
        self._V = [v.detach().clone() for v in self._ref]  # used at the NEXT step
        self.record(g_v_norm=global_norm(g_V), v_safe_norm=global_norm(V_prev), l_su=loss_perturbed - loss)
        return V_prev

    # -- checkpoints -------------------------------------------------------------------------------
    def method_state(self) -> dict:
        state = {**super().method_state(), "safety_batches_drawn": self._safety_batches.drawn,
                 "s_step": self._s_step, "V_step": self._V_step, **numbered("s", self._s), **numbered("V", self._V)}
        if self._ref is not None:
            opt = self._ref_opt.state_dict()
            state.update(numbered("ref", self._ref), ref_opt_groups=opt["param_groups"])
            state.update({f"ref_opt.{i}.{k}": v for i, moments in opt["state"].items() for k, v in moments.items()})
        return state

    def load_method_state(self, state: dict) -> None:
        super().load_method_state(state)
        device = self.trainable_params[0].device
        self._safety_batches = self._safety_stream(skip=state["safety_batches_drawn"])  # as an unbroken run
        self._s, self._s_step = unnumbered(state, "s", device), state["s_step"]
        self._V, self._V_step = unnumbered(state, "V", device), state["V_step"]
        ref = unnumbered(state, "ref", device)
        if ref is not None:
            self._ref = [torch.nn.Parameter(v) for v in ref]
            self._ref_opt = torch.optim.AdamW(self._ref, lr=self.args.probe_lr)
            moments = {}
            for key, value in state.items():
                if key.startswith("ref_opt."):
                    _, index, name = key.split(".", 2)
                    moments.setdefault(int(index), {})[name] = value
            self._ref_opt.load_state_dict({"state": moments, "param_groups": state["ref_opt_groups"]})

    # -- diagnostics -------------------------------------------------------------------------------
    def before_optimizer_step(self) -> None:
        """cos(task gradient under the probe, safety direction s): positive = SFT drifts toward harm."""
        if self._s is None:
            return
        grads = [p.grad for p in self.trainable_params]
        if any(g is None for g in grads):
            return
        dot = global_dot(grads, self._s)
        denom = global_norm(grads) * global_norm(self._s)
        self.record(cos_task_safety=float(dot / denom) if denom > 0 else 0.0)


register(Method(
    "sap", SAPTrainer, aliases=("sap-reference",), summary="Safety-Aware Probing (Wu et al. 2025)",
    data=(DataRole("safety_dataset", "safety_data", "n_safety", "pairs", "safety"),),
    series=(Series("probe_raise", "SAP: loss with the probe minus without", "L(W, V_safe) - L(W, 0)"),
            Series("l_su", "cumulative L_su (SAP)", "sum of L_su", cumulative=True))))
