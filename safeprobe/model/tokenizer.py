"""One tokenizer fix-up used by every loading path, so all models behave the same downstream.

Choices (documented here because training and generation code rely on them):

* pad token: the tokenizer's own if it has one; else its EOS token; else, for ChatML tokenizers, the
  end-of-turn token `<|im_end|>`; else its UNK token. Padding therefore often shares an id with EOS, so
  padding must be masked with the attention mask (or labels = -100), never by comparing ids to pad_token_id,
  or the model never learns to stop.
* padding side: "right" (what training wants); generation code switches to left itself.
* chat template: always the tokenizer's own. A tokenizer without one (e.g. a raw GPT-2 checkpoint) gets
  the plain ChatML template below; its `<|im_start|>`/`<|im_end|>` markers are then ordinary text.
* BOS: left as the tokenizer does it, except when the caller pins it (built-in models pin "no BOS",
  as SmolLM2's GGUF metadata says: its chat template already starts every turn with `<|im_start|>`).
* the generation config stops on the end-of-turn token as well as EOS, and knows the pad id.
"""
from __future__ import annotations

import logging

from ..errors import UserError

logger = logging.getLogger(__name__)

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# ChatML without a default system prompt (the SmolLM2 template adds one; a fallback should not).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def prepare_tokenizer(tokenizer, model=None, add_bos: bool | None = None):
    """Apply the fix-ups above to `tokenizer` (in place) and sync `model`'s pad/eos ids; returns `tokenizer`."""
    if not tokenizer.chat_template:
        logger.info("tokenizer has no chat template; using plain ChatML")
        tokenizer.chat_template = CHATML_TEMPLATE
    if add_bos is not None and getattr(tokenizer, "add_bos_token", False) != add_bos:
        tokenizer.add_bos_token = add_bos  # the setter rebuilds the post-processor (transformers 4.x and 5.x)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = _pad_fallback(tokenizer)
    tokenizer.padding_side = "right"
    if model is not None:
        _sync_model(tokenizer, model)
    return tokenizer


def end_of_turn_id(tokenizer) -> int | None:
    """Id of `<|im_end|>` when the chat template is ChatML and the vocabulary has it as one token."""
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: any of them using ChatML counts
        template = " ".join(template.values())
    if not template or IM_END not in template:
        return None
    token_id = tokenizer.convert_tokens_to_ids(IM_END)
    return None if token_id is None or token_id == tokenizer.unk_token_id else token_id


def _pad_fallback(tokenizer) -> str:
    if tokenizer.eos_token is not None:
        return tokenizer.eos_token
    if end_of_turn_id(tokenizer) is not None:
        return IM_END
    if tokenizer.unk_token is not None:
        return tokenizer.unk_token
    raise UserError("the tokenizer has no pad, eos or unk token to pad with; add a pad token to the checkpoint")


def _sync_model(tokenizer, model) -> None:
    """Make the model's config and generation config agree with the tokenizer on pad / eos / length."""
    config = model.config
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if max_positions and (tokenizer.model_max_length or 0) > max_positions:
        tokenizer.model_max_length = max_positions  # unset (~1e30) or longer than the model can take
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    stop_ids = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids or [])
    eot = end_of_turn_id(tokenizer)
    if eot is not None and eot not in stop_ids:
        stop_ids.append(eot)  # chat models must stop at the end of their turn
    if stop_ids:
        gen.eos_token_id = stop_ids[0] if len(stop_ids) == 1 else stop_ids
