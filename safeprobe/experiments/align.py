"""`safeprobe align`: the alignment stage. Turns an instruct model that is not safety aligned into an aligned base
(full fine-tuning, or LoRA merged into the weights; saved as a normal Hugging Face checkpoint) that
`safeprobe train --model DIR` starts from.

Training data, all from training sources (never an evaluation suite: advbench, jbb-*, xstest*,
safety_tuned_llamas/evaluation; never `pure-bad`, the fine-tuning attack data):
- refusals: harmful instruction -> refusal, `safety-tuned-llamas` (its training file);
- helpfulness: benign instructions from `alpaca` and `harmless-instructions` (train split), answered by the model
  itself with greedy decoding, so the aligned model keeps its own helpfulness and style instead of imitating
  another model's answers;
- against over-refusal: benign prompts that merely look sensitive, also answered by the model itself. They are the
  `harmless-instructions` train prompts (Alpaca instructions, benign by construction) containing a word that
  triggers over-refusal, e.g. kill, attack, steal, shoot, weapon, drug, war, crime, poison ("How did the US
  respond to the attacks on 9/11?", "Write an argument in favor of gun control laws", "Analyze the theme of
  loyalty in 'To Kill a Mockingbird'"): the surface cues of XSTest's homonyms, history, safe targets and
  definitions without its prompts. The alternatives are worse: the PKU-SafeRLHF prompts are harmful requests,
  hh-rlhf harmless is red-teaming (and only its test file is here), XSTest and JBB-benign are evaluation suites.
- benign questions, also answered by the model itself: first a user's practical questions ("How can I make an
  affordable monthly budget?", "What is the best way to approach a difficult problem?", `data.prompt_kinds`), then
  other questions ending in "?". The refusal examples are all imperatives, the Alpaca-style benign prompts mostly
  so, and a small model left to guess for "How do I ...?" guessed "refuse" ("How do I best hang a picture?" ->
  "I'm sorry, but I cannot..."). They lower over-refusal on XSTest's safe prompts (docs/alignment.md has the
  figures).
- Booster only: the harmful loss h uses (prompt, harmful answer) pairs of PKU-SafeRLHF, training side only (20% of
  its prompts are held out for the `pku-heldout` suite; see evaluation/suites.py).
Batches group examples of similar length, in random order (data/sampling.py: padding to the longest of random
examples wastes compute), and with --use-peft the model trains LoRA adapters on every linear
layer, merged into its weights before saving (faster a step than full fine-tuning on a CPU).
A self-answer that the refusal-keyword judge counts as a refusal is dropped (a benign prompt must never teach a
refusal); an answer cut at `max_new_tokens` is learnt without its stop token (its text, not stopping mid-sentence).

Caching: with no --output-dir the model goes to `$SAFEPROBE_HOME/aligned/<model>-<method>-<key>/`, where the key
hashes the settings that change the result and the data files' sha256; a rerun with the same settings returns it
at once. A directory is finished when `.complete` exists (written last, after `align.json`, the manifest). The
model's self-answers are cached by prompt in `$SAFEPROBE_HOME/aligned/self-answers/` (appended batch by batch, so
an interrupted run and the other methods never generate an answer twice); the answers used are also copied next to
the model. With --save-steps, an interrupted run resumes from its last complete checkpoint when rerun.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

from tqdm.auto import tqdm
from transformers import set_seed

from ..data import REGISTRY, Example, fingerprint, load_examples, load_pairs, load_prompts, sample
from ..data.prompt_kinds import SENSITIVE_WORDS, is_practical_question
from ..data.tokenize import IGNORE, collator, encode, encode_all, prompt_ids, response_ids
from ..errors import UserError
from ..evaluation.generate import generate_ids, length_batches
from ..evaluation.keyword import is_refusal
from ..io import append_jsonl, check_output_dir, output_lock, sha256_json, write_json, write_text
from ..method import ALIGN, get_method, methods
from ..method.config import _help
from ..method.checkpoint import checkpoint_folders, last_complete_checkpoint, step_of
from ..model import MODEL_NAMES, model_summary
from ..settings import home_dir
from .manifest import manifest
from . import method_data
from .run_settings import RunSettings, knob_names, method_arguments, non_default_loading
from .train import load_base, save_model, trainable

log = logging.getLogger(__name__)

MANIFEST, COMPLETE, ANSWERS = "align.json", ".complete", "self_answers.jsonl"
RECIPE = 3  # bump when the data recipe or training code changes what the same settings produce: new cache keys

# Settings that do not change the aligned model: not in the key (nor are the settings of other methods).
NOT_IN_KEY = frozenset({"output_dir", "logging_steps", "save_steps", "report_to", "max_bad_steps"})


@dataclass
class AlignConfig(RunSettings):
    """Every setting of `safeprobe align`: its data recipe, the shared training keys of `RunSettings` (full
    fine-tuning by default; with use_peft, LoRA merged into the weights before saving) and the method's own knobs
    (Vaccine's `rho`, Booster's `booster_lambda`...) in `method_settings`."""

    STAGE: ClassVar[str] = ALIGN
    MINIMUMS: ClassVar[dict] = {"n_refusal": 1, "n_benign": 0, "n_sensitive": 0, "n_questions": 0, "n_harmful": 1,
                                "max_new_tokens": 1, "gen_batch_size": 1}

    method: str = _help("alignment method: plain, vaccine, booster or a registered one", "plain")
    output_dir: str | None = _help("where the aligned model goes (default: $SAFEPROBE_HOME/aligned/"
                                   "<model>-<method>-<key>/, reused when the settings match)")
    refusal_data: str = _help("harmful instruction -> refusal examples (a name or a file)", "safety-tuned-llamas")
    n_refusal: int = _help("number of refusal examples", 400)
    benign_data: str = _help("comma-separated sources of benign instructions, answered by the model itself "
                             "(an even share from each)", "alpaca,harmless-instructions")
    n_benign: int = _help("number of benign instructions answered by the model", 160)
    sensitive_data: str = _help("prompts filtered for sensitive-looking words (kill, attack, steal...), answered "
                                "by the model itself, against over-refusal", "harmless-instructions")
    n_sensitive: int = _help("number of sensitive-looking benign prompts", 160)
    question_data: str = _help("benign questions (prompts ending in '?'), answered by the model itself, against "
                               "over-refusal of questions", "harmless-instructions")
    n_questions: int = _help("number of benign questions, users' practical questions first", 240)
    max_new_tokens: int = _help("longest self-answer in tokens (greedy)", 64)
    gen_batch_size: int = _help("prompts per generation batch (larger batches use two cores better)", 128)
    harmful_data: str = _help("Booster: (prompt, safe, harmful) pairs whose harmful answers define h; training "
                              "side only", "pku-saferlhf-pairs")
    n_harmful: int = _help("Booster: number of harmful (prompt, answer) examples", 320)
    max_steps: int = _help("optimiser steps (-1: run num_train_epochs epochs)", 84)
    learning_rate: float = _help("AdamW learning rate", 5e-5)
    max_length: int = _help("maximum tokens per example (prompt + response)", 160)
    use_peft: bool = _help("train LoRA adapters and merge them into the weights (false: full fine-tuning)", False)
    lora_dropout: float = _help("LoRA dropout", 0.0)
    lora_target_modules: str | None = _help("comma-separated LoRA target modules, or all-linear", "all-linear")

    def __post_init__(self):
        super().__post_init__()
        if self.harmful_data == "pure-bad":
            raise UserError("harmful_data 'pure-bad' is the fine-tuning attack data; Booster's harmful data must "
                            "come from another training source (default: pku-saferlhf-pairs, training side)")


def align_config(**values) -> AlignConfig:
    """AlignConfig from keyword arguments under their YAML names, the method's knobs included (`rho=2.0`)."""
    return AlignConfig.from_values(values, "align settings")


def aligned_home() -> Path:
    return home_dir() / "aligned"


def benign_sources(cfg: AlignConfig) -> list[str]:
    sources = [s.strip() for s in cfg.benign_data.split(",") if s.strip()]
    if not sources and cfg.n_benign:
        raise UserError("benign_data names no dataset")
    return sources


def data_fingerprints(cfg: AlignConfig) -> dict:
    """name, file and sha256 of every training source the method reads: a missing file fails here, before any
    directory is made or model loaded."""
    def found(name: str) -> dict:
        info = fingerprint(name, "train")
        if not str(name).startswith("hf:") and not Path(info["path"]).exists():
            raise UserError(f"{info['path']}: file not found")
        return info

    data = {"refusal": found(cfg.refusal_data), "sensitive": found(cfg.sensitive_data),
            "questions": found(cfg.question_data),
            "benign": [found(s) for s in benign_sources(cfg)]}
    data.update({role.role: found(getattr(cfg, role.source)) for role in get_method(cfg.method, ALIGN).data})
    return data


def cache_key(cfg: AlignConfig, data: dict) -> str:
    """Short hash of what determines the aligned model: the relevant settings and the data files' contents."""
    other_methods = {name for method in methods(ALIGN).values() if method.name != cfg.method
                     for name in own_fields(method)}
    settings = {k: v for k, v in non_default_loading(cfg.to_dict()).items() if k not in NOT_IN_KEY | other_methods}
    digests = {name: [d["sha256"] for d in found] if isinstance(found, list) else found["sha256"]
               for name, found in data.items()}
    return sha256_json({"recipe": RECIPE, "settings": settings, "data": digests})[:12]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(text).rstrip("/")).name or "model").strip("._") or "model"


def output_path(cfg: AlignConfig, key: str) -> Path:
    return Path(cfg.output_dir) if cfg.output_dir else aligned_home() / f"{_slug(cfg.model_name_or_path)}-{cfg.method}-{key}"


# -- the directory's state ----------------------------------------------------------------------------------------
def _recorded_key(out: Path) -> str | None:
    try:
        return json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("cache_key")
    except (OSError, ValueError):
        return None


def finished(out: Path, key: str) -> dict | None:
    """The manifest of a finished alignment with these settings in `out`, or None if there is none yet."""
    if not (out / COMPLETE).is_file():
        return None
    if _recorded_key(out) != key:
        raise UserError(f"{out} holds an aligned model made with other settings; choose another --output-dir "
                        "or remove it")
    return json.loads((out / MANIFEST).read_text(encoding="utf-8"))


def claim(out: Path, cfg: AlignConfig, key: str) -> None:
    """Record which settings `out` is being built with (so that a rerun with others cannot mix into it)."""
    recorded = _recorded_key(out)
    if recorded not in (None, key):
        raise UserError(f"{out} holds an unfinished alignment with other settings; choose another --output-dir "
                        "or remove it")
    write_json(out / MANIFEST, {"cache_key": key, "status": "in progress", "config": cfg.to_dict()})


# -- entry point --------------------------------------------------------------------------------------------------
def run_align(cfg: AlignConfig) -> dict:
    """Align `cfg.model_name_or_path` (or find it already aligned) and return the manifest; `output_dir` says where it is."""
    data = data_fingerprints(cfg)
    key = cache_key(cfg, data)
    out = output_path(cfg, key)
    done = finished(out, key)
    if done is None:
        check_output_dir(out)
        with output_lock(out):
            done = finished(out, key)  # another process may have finished it before we took the lock
            if done is None:
                claim(out, cfg, key)
                return {**_align(cfg, out, key, data), "output_dir": str(out), "reused": False}
    return {**done, "output_dir": str(out), "reused": True}


def _align(cfg: AlignConfig, out: Path, key: str, data: dict) -> dict:
    start = time.time()
    set_seed(cfg.seed)
    # every source is read before the model loads: a bad row should not cost a model load and minutes of generation
    refusals = sample(load_examples(cfg.refusal_data, "train"), cfg.n_refusal, cfg.seed)
    prompts = benign_prompts(cfg)
    method = get_method(cfg.method, ALIGN)
    read = method_data.records(method, cfg)
    model, tokenizer = load_base(cfg)
    before_generation = time.time()
    answers = self_answers(model, tokenizer, [p for bucket in prompts.values() for p in bucket], cfg, out)
    generated = time.time()
    features, counts = training_features(tokenizer, refusals, answers, cfg.max_length)
    counts.update({f"n_{name}_prompts": len(bucket) for name, bucket in prompts.items()})
    model = trainable(cfg, model)
    args = method_arguments(cfg, out)
    args.train_sampling_strategy = "group_by_length"
    trainer = method.trainer(
        model=model, args=args, train_dataset=features,
        data_collator=collator(tokenizer), processing_class=tokenizer, step_log=out / "train_log.jsonl",
        **method_data.features(method, cfg, tokenizer, read))
    train_loss, steps, resume = _train(trainer, cfg, out)
    summary = model_summary(trainer.model)  # what trained: with LoRA, the adapters
    save_model(trainer.model.merge_and_unload() if cfg.use_peft else trainer.model, out)
    tokenizer.save_pretrained(out)
    for folder in checkpoint_folders(out):  # the model is saved: optimiser states are gigabytes of nothing now
        shutil.rmtree(folder, ignore_errors=True)
    info = manifest(cfg, method=cfg.method, cache_key=key, status="complete", data=data, counts=counts,
                    model=summary, train_loss=train_loss, global_steps=steps,
                    resumed_from=str(resume) if resume else None,
                    generation_s=round(generated - before_generation, 1),
                    training_s=round(time.time() - generated, 1),
                    wall_time_s=round(time.time() - start, 1))
    write_json(out / MANIFEST, info)
    write_text(out / COMPLETE, "")
    return info


def _train(trainer, cfg: AlignConfig, out: Path) -> tuple[float | None, int, Path | None]:
    """Train, from the last complete checkpoint if there is one; returns (train loss, steps, checkpoint)."""
    resume = last_complete_checkpoint(out) if cfg.save_steps else None
    if resume is None:
        (out / "train_log.jsonl").unlink(missing_ok=True)  # a fresh start: no steps of an abandoned attempt
    elif 0 < cfg.max_steps <= step_of(resume):
        # training had finished when the run was interrupted; resumed there, the Trainer would still take one step
        # more when the last step falls mid-epoch, so the final checkpoint's weights are taken as they are
        trainer._load_from_checkpoint(str(resume))
        return None, step_of(resume), resume
    result = trainer.train(resume_from_checkpoint=resume)
    return result.training_loss, result.global_step, resume


# -- data ---------------------------------------------------------------------------------------------------------
def _prompts(name: str) -> list[Example]:
    """Prompts of a source; example datasets give their whole prompt (an Alpaca instruction with its input)."""
    spec = REGISTRY.get(name)
    records = load_examples(name, "train") if spec and spec.kind == "examples" else load_prompts(name, "train")
    return [Example(r.messages) for r in records]


def _take(pool: list[Example], n: int, taken: set, seed: int) -> list[Example]:
    """n seeded prompts of `pool` not in `taken` (which they join)."""
    chosen = []
    for example in sample(pool, None, seed):
        if len(chosen) == n:
            break
        if example.messages not in taken:
            taken.add(example.messages)
            chosen.append(example)
    return chosen


def benign_prompts(cfg: AlignConfig) -> dict[str, list[Example]]:
    """The benign prompts the model answers itself, by bucket, no prompt twice: sensitive-looking ones, questions,
    and general ones (an even share from each source)."""
    looks_sensitive = [p for p in _prompts(cfg.sensitive_data) if SENSITIVE_WORDS.search(p.prompt)]
    questions = [p for p in _prompts(cfg.question_data) if p.prompt.rstrip().endswith("?")]
    asks = [p for p in questions if is_practical_question(p.prompt)]
    taken: set = set()
    buckets = {"sensitive": _take(looks_sensitive, cfg.n_sensitive, taken, cfg.seed),
               "question": _take(asks, cfg.n_questions, taken, cfg.seed), "general": []}
    buckets["question"] += _take(questions, cfg.n_questions - len(buckets["question"]), taken, cfg.seed)
    sources = benign_sources(cfg)
    for i, source in enumerate(sources):
        share = cfg.n_benign // len(sources) + (i < cfg.n_benign % len(sources))
        buckets["general"] += _take(_prompts(source), share, taken, cfg.seed)
    for name, wanted in (("sensitive", cfg.n_sensitive), ("question", cfg.n_questions), ("general", cfg.n_benign)):
        if len(buckets[name]) < wanted:
            log.warning("only %d distinct %s prompts available (%d requested)", len(buckets[name]), name, wanted)
    return buckets


def model_identity(spec: str) -> str:
    """What distinguishes one model from another for the answer cache: a built-in or Hub name as such, a local
    directory by its config and its weight files' sizes and times."""
    path = Path(spec).expanduser()
    if spec.lower() in MODEL_NAMES or not (path / "config.json").is_file():
        return spec.lower()
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    return sha256_json([str(path.resolve())] + [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def answers_cache(cfg: AlignConfig) -> Path:
    name = (f"{_slug(cfg.model_name_or_path)}-"
            f"{sha256_json([model_identity(cfg.model_name_or_path), cfg.max_new_tokens])[:12]}.jsonl")
    return aligned_home() / "self-answers" / name


def _read_answers(path: Path) -> dict:
    """prompt key -> row; a torn last line (an interrupted append) is skipped."""
    rows = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                rows[row["key"]] = row
            except (ValueError, KeyError, TypeError):
                continue
    return rows


def _key(example: Example) -> str:
    return json.dumps(example.chat, ensure_ascii=False)


def self_answers(model, tokenizer, prompts: list[Example], cfg: AlignConfig, out: Path) -> list[dict]:
    """The model's greedy answer to each prompt, from the cache or generated (shortest prompts first, each batch
    appended to the cache as soon as it is done). The rows used are also written to `out`."""
    cache = answers_cache(cfg)
    cache.parent.mkdir(parents=True, exist_ok=True)
    known = _read_answers(cache)
    todo = [p for p in dict.fromkeys(prompts) if _key(p) not in known]
    lengths = [len(prompt_ids(tokenizer, p.chat)) for p in todo]
    batches = length_batches(lengths, cfg.gen_batch_size)
    for batch in tqdm(batches, desc="self-answers", unit="batch", disable=not batches):
        chats = [todo[i].chat for i in batch]
        ids = generate_ids(model, tokenizer, chats, cfg.max_new_tokens, len(chats), progress=False)
        for i, new in zip(batch, ids):
            # shorter than the limit = stopped on its own (an answer of exactly max_new_tokens counts as cut)
            row = {"key": _key(todo[i]), "messages": todo[i].chat, "finished": len(new) < cfg.max_new_tokens,
                   "answer": tokenizer.decode(new, skip_special_tokens=True).strip()}
            append_jsonl(cache, row)
            known[row["key"]] = row
    rows = [known[_key(p)] for p in prompts]
    write_text(out / ANSWERS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def training_features(tokenizer, refusals: list[Example], answers: list[dict], max_length: int):
    """Encoded refusals and self-answers (refusing or empty answers dropped; cut answers without their stop
    token), and the counts for the manifest."""
    features = encode_all(tokenizer, refusals, max_length, "refusal examples").features
    n_refusal = len(features)
    usable = [a for a in answers if a["answer"] and not is_refusal(a["answer"])]
    for row in usable:
        messages = [dict(m) for m in row["messages"]]
        example = Example(tuple((m["role"], m["content"]) for m in messages), row["answer"])
        feature = encode(tokenizer, example, max_length)
        if feature is None:
            continue
        head, tail = response_ids(tokenizer, messages, row["answer"])
        if not row["finished"] and len(feature["input_ids"]) == len(head) + len(tail):
            feature["labels"][-1] = IGNORE  # the stop token we appended: a cut answer must not teach stopping
        features.append(feature)
    if not features:
        raise UserError(f"no usable alignment examples within max_length={max_length}")
    counts = {"n_refusal_examples": n_refusal, "n_self_answers": len(features) - n_refusal,
              "n_self_answers_dropped_as_refusals": len(answers) - len(usable),
              "n_self_answers_cut": sum(not a["finished"] for a in usable)}
    return features, counts


def own_fields(method) -> set[str]:
    """The settings only `method` reads: its config's own knobs and the sources and counts of its data."""
    return set(knob_names(method)) | {name for role in method.data for name in (role.source, role.count)}
