"""Named datasets: where each lives under $SAFEPROBE_DATA, what kind of records it holds, and its public source.

A path to a file works wherever a name does. Task datasets (sst2, agnews, gsm8k) carry the prompt format
used both for fine-tuning and for grading, so that the two can never drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..io import sha256_file
from ..settings import data_dir
from .readers import DEFAULTS, DatasetOptions, is_hub_id, read_located_rows, read_rows
from .records import Example, SafetyPair, rename_columns, to_example, to_prompt, to_safety_pair, user_turn
from .splits import split as grouped_split

VALIDATION = "validation"
HOLDOUT_SEED = 0  # fixed: the held-out prompts of a dataset never change between runs or seeds

KINDS = ("examples", "pairs", "prompts")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    files: dict  # split -> path relative to the data directory
    kind: str  # examples | pairs | prompts
    source: str  # public origin, for users with a network
    description: str = ""
    columns: dict = field(default_factory=dict)  # canonical -> source column
    keep: Callable[[dict], bool] | None = None  # row filter (e.g. xstest safe / unsafe)
    format: Callable[[dict, str], Example] | None = None  # task-specific row -> Example
    holdout: float | None = None  # one file split by prompt into train / test (e.g. PKU repeats prompts)
    # Fraction of the train file's prompts reserved as split "validation" (never in "train"): data to tune a
    # method's settings on without touching any evaluation suite.
    validation: float | None = None

    @property
    def splits(self) -> list[str]:
        """The files' splits, and `validation` where the train file holds one out."""
        return [*self.files, *([VALIDATION] if self.validation and VALIDATION not in self.files else [])]

    def path(self, split: str) -> Path:
        if split == VALIDATION and self.validation:
            split = "train"
        if split not in self.files:
            raise UserError(f"dataset '{self.name}' has no split '{split}'; available: {', '.join(self.splits)}")
        return data_dir() / self.files[split]


# --- task formats: one place for each task's prompt and gold answer -------------------------------------
SST2_LABELS = {0: "negative", 1: "positive"}
AGNEWS_LABELS = {0: "World", 1: "Sports", 2: "Business", 3: "Sci/Tech"}
GSM8K_MARKER = "####"


def _label(row: dict, key: str, names: dict, where: str) -> str:
    try:
        return names[int(row[key])]
    except (KeyError, ValueError, TypeError):
        raise UserError(f"{where}: field '{key}' must be one of {sorted(names)}") from None


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key, "")
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' must be text, got {type(value).__name__}")
    return value.strip()


def format_sst2(row: dict, where: str) -> Example:
    answer = _label(row, "label", SST2_LABELS, where)
    prompt = ("Analyze the sentiment of the following sentence and answer with one word, "
              f"positive or negative.\nSentence: {_text(row, 'sentence', where)}")
    return Example(user_turn(prompt), answer, {"label": answer})


def format_agnews(row: dict, where: str) -> Example:
    answer = _label(row, "label", AGNEWS_LABELS, where)
    prompt = ("Categorize the news article into one of four categories: World, Sports, Business, "
              f"Sci/Tech. Answer with the category only.\nArticle: {_text(row, 'text', where)}")
    return Example(user_turn(prompt), answer, {"label": answer})


def format_gsm8k(row: dict, where: str) -> Example:
    answer = str(row.get("answer", ""))
    if GSM8K_MARKER not in answer:
        raise UserError(f"{where}: field 'answer' has no final-answer marker '{GSM8K_MARKER}'")
    final = answer.rsplit(GSM8K_MARKER, 1)[1].strip().replace(",", "")
    return Example(user_turn(str(row.get("question", "")).strip()), answer, {"label": final})


def _xstest(label: str):
    return lambda row: row.get("label") == label


REGISTRY: dict[str, DatasetSpec] = {s.name: s for s in [
    DatasetSpec("advbench", {"test": "advbench/harmful_behaviors.csv"}, "prompts",
                "https://github.com/llm-attacks/llm-attacks (data/advbench/harmful_behaviors.csv)",
                "520 harmful behaviours (AdvBench)", {"prompt": "goal"}),
    DatasetSpec("jbb-harmful", {"test": "jailbreakbench/harmful-behaviors.csv"}, "prompts",
                "https://huggingface.co/datasets/JailbreakBench/JBB-Behaviors (harmful)",
                "100 harmful behaviours (JailbreakBench)", {"prompt": "Goal"}),
    DatasetSpec("jbb-benign", {"test": "jailbreakbench/benign-behaviors.csv"}, "prompts",
                "https://huggingface.co/datasets/JailbreakBench/JBB-Behaviors (benign)",
                "100 benign look-alike behaviours (JailbreakBench), for over-refusal", {"prompt": "goal"}),
    DatasetSpec("jbb-judge-comparison", {"test": "jailbreakbench/judge-comparison.csv"}, "prompts",
                "https://huggingface.co/datasets/JailbreakBench/JBB-Behaviors (judge_comparison)",
                "100 real responses with 3 human harmfulness labels", {"prompt": "goal"}),
    DatasetSpec("xstest", {"test": "xstest/xstest_prompts.csv"}, "prompts",
                "https://github.com/paul-rottger/exaggerated-safety", "450 XSTest prompts (250 safe, 200 unsafe)"),
    DatasetSpec("xstest-safe", {"test": "xstest/xstest_prompts.csv"}, "prompts",
                "https://github.com/paul-rottger/exaggerated-safety", "250 safe XSTest prompts (over-refusal)",
                keep=_xstest("safe")),
    DatasetSpec("xstest-unsafe", {"test": "xstest/xstest_prompts.csv"}, "prompts",
                "https://github.com/paul-rottger/exaggerated-safety", "200 unsafe XSTest prompts",
                keep=_xstest("unsafe")),
    DatasetSpec("pku-saferlhf-pairs", {"train": "pku_saferlhf_contrastive/pku_saferlhf_test_safe_vs_unsafe.json",
                                       "test": "pku_saferlhf_contrastive/pku_saferlhf_test_safe_vs_unsafe.json"},
                "pairs", "https://huggingface.co/datasets/PKU-Alignment/PKU-SafeRLHF",
                "5,135 (prompt, safe, unsafe) pairs over 930 prompts; test = 20% of prompts held out",
                holdout=0.2),
    DatasetSpec("safety-tuned-llamas", {"train": "safety_tuned_llamas/training/safety_only_data_Instructions.json"},
                "examples", "https://github.com/vinid/safety-tuned-llamas",
                "2,483 harmful instructions with safe (refusing) answers; validation = 10% of prompts",
                validation=0.1),
    DatasetSpec("hh-harmless", {"test": "hh_rlhf_harmless/harmless_base_test.jsonl"}, "pairs",
                "https://huggingface.co/datasets/Anthropic/hh-rlhf (harmless-base)",
                "2,312 chosen/rejected dialogues"),
    DatasetSpec("pure-bad", {"train": "harmful_finetuning_pure_bad/pure_bad_100.jsonl"}, "examples",
                "https://github.com/LLM-Tuning-Safety/LLMs-Finetuning-Safety",
                "100 harmful requests with harmful answers (attack data)"),
    DatasetSpec("harmless-instructions", {"train": "refusal_direction_splits/harmless_train.json",
                                          "validation": "refusal_direction_splits/harmless_val.json",
                                          "test": "refusal_direction_splits/harmless_test.json"}, "prompts",
                "https://github.com/andyrdt/refusal_direction", "Alpaca instructions without answers"),
    DatasetSpec("sst2", {"train": "sst2/train.csv", "test": "sst2/validation.csv"}, "examples",
                "https://huggingface.co/datasets/stanfordnlp/sst2", "SST-2 sentiment (test = GLUE validation; "
                "validation = 1% of train)", format=format_sst2, validation=0.01),
    DatasetSpec("agnews", {"train": "ag_news/train_10k.csv", "test": "ag_news/test.csv"}, "examples",
                "https://huggingface.co/datasets/fancyzhx/ag_news", "AG News topic classification (validation = "
                "5% of train)", format=format_agnews, validation=0.05),
    DatasetSpec("gsm8k", {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}, "examples",
                "https://huggingface.co/datasets/openai/gsm8k", "grade-school maths word problems (validation "
                "= 5% of train)", format=format_gsm8k, validation=0.05),
    DatasetSpec("alpaca", {"train": "alpaca/alpaca_en_demo_1000.json"}, "examples",
                "https://huggingface.co/datasets/vicgalle/alpaca-gpt4", "1,000 Alpaca instructions, GPT-4 answers"),
]}


def resolve(name_or_path: str, split: str | None = None) -> tuple[DatasetSpec | None, Path | str]:
    """A registry name -> (spec, local path of the split); a file path -> (None, path)."""
    spec = REGISTRY.get(name_or_path)
    if spec is None:
        if is_hub_id(str(name_or_path)) or Path(name_or_path).exists() or _looks_like_path(name_or_path):
            return None, name_or_path
        raise UserError(f"unknown dataset '{name_or_path}'; valid names: {', '.join(REGISTRY)} (or a file path)")
    split = split or next(iter(spec.files))
    path = spec.path(split)
    if not path.exists():
        raise UserError(f"dataset '{spec.name}' not found at {path}; set SAFEPROBE_DATA to the folder that "
                        f"holds it (public source: {spec.source})")
    return spec, path


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or Path(text).suffix.lower() in (".json", ".jsonl", ".csv", ".parquet")


def _rows(name_or_path: str, split: str | None, columns: dict | None, options: DatasetOptions):
    spec, path = resolve(name_or_path, split)
    mapping = {**(spec.columns if spec else {}), **(columns or {})}
    out = []
    for row, where in read_located_rows(path, split or "train", options):
        row = rename_columns(row, mapping)
        if spec and spec.keep and not spec.keep(row):
            continue
        out.append((row, where))
    return spec, path, out


def load_examples(name_or_path: str, split: str | None = None, columns: dict | None = None,
                  options: DatasetOptions = DEFAULTS) -> list[Example]:
    """Supervised (prompt, response) examples. `columns` maps a layout's field to the file's column
    ({"completion": "answer"}); `options` are `datasets.load_dataset`'s for a Hub dataset or a folder."""
    spec, path, rows = _rows(name_or_path, split, columns, options)
    fmt = spec.format if spec and spec.format else to_example
    return _non_empty(_select(spec, split, [fmt(row, where) for row, where in rows]), path)


def load_pairs(name_or_path: str, split: str | None = None, columns: dict | None = None,
               options: DatasetOptions = DEFAULTS) -> list[SafetyPair]:
    """Safety pairs (prompt, safe answer, harmful answer)."""
    spec, path, rows = _rows(name_or_path, split, columns, options)
    return _non_empty(_select(spec, split, [to_safety_pair(row, where) for row, where in rows]), path)


def load_prompts(name_or_path: str, split: str | None = None, columns: dict | None = None,
                 options: DatasetOptions = DEFAULTS) -> list[Example]:
    """Prompts for generation; task datasets keep their gold answer in `meta['label']`."""
    spec, path, rows = _rows(name_or_path, split, columns, options)
    fmt = spec.format if spec and spec.format else to_prompt
    return _non_empty(_select(spec, split, [_keep_meta(fmt(row, where), row) for row, where in rows]), path)


def load_records(name_or_path: str, split: str | None = None, kind: str | None = None, columns=None,
                 options: DatasetOptions = DEFAULTS):
    """Records of the dataset's own kind (or `kind`): Examples, SafetyPairs or prompt Examples."""
    spec = REGISTRY.get(name_or_path)
    loaders = {"examples": load_examples, "pairs": load_pairs, "prompts": load_prompts}
    if kind is not None and kind not in loaders:
        raise UserError(f"unknown record kind '{kind}'; valid choices: {', '.join(KINDS)}")
    kind = kind or (spec.kind if spec else _detected_kind(name_or_path, split, options))
    return loaders[kind](name_or_path, split, columns, options)


def _detected_kind(path: str, split: str | None, options: DatasetOptions = DEFAULTS) -> str:
    """A file's record kind from its first row: safety pairs, supervised examples, or prompts only."""
    rows = read_rows(path, split or "train", options)
    row = rows[0] if rows and isinstance(rows[0], dict) else {}
    pair_fields = {"safe", "harmful"} & row.keys() or {"chosen", "rejected"} <= row.keys()
    if pair_fields or isinstance(row.get("response"), list):
        return "pairs"
    if {"completion", "response", "output", "messages", "conversations"} & row.keys():
        return "examples"
    return "prompts" if row else "examples"


def _select(spec: DatasetSpec | None, split: str | None, records: list) -> list:
    """The side of a fixed split by prompt: PKU's train / test, or a dataset's train / validation."""
    if spec is None:
        return records
    split = split or next(iter(spec.files))
    if spec.holdout is not None:
        train, test = grouped_split(records, spec.holdout, HOLDOUT_SEED, key=lambda r: r.prompt)
        return test if split == "test" else train
    if spec.validation and split in ("train", VALIDATION):
        # the top of the hash range, so a dataset could also hold out a test side at the bottom (as PKU does)
        top, rest = grouped_split(records, 1 - spec.validation, HOLDOUT_SEED, key=lambda r: r.prompt)
        return top if split == VALIDATION else rest
    return records


def _keep_meta(example: Example, row: dict) -> Example:
    meta = {**{k: v for k, v in row.items() if isinstance(v, (str, int, float, bool))}, **example.meta}
    return Example(example.messages, example.response, meta)


def _non_empty(records: list, path) -> list:
    if not records:
        raise UserError(f"{path}: dataset is empty (after filtering)")
    return records


def fingerprint(name_or_path: str, split: str | None = None, options: DatasetOptions = DEFAULTS) -> dict:
    """What a run manifest records about a dataset: name, split, file, sha256, and the load options given."""
    spec, path = resolve(name_or_path, split)
    if not is_hub_id(str(path)) and not Path(path).exists():
        raise UserError(f"{path}: file not found")
    digest = sha256_file(path) if Path(path).is_file() else None
    return {"name": name_or_path, "split": split, "path": str(path), "sha256": digest, **options.recorded()}


def available() -> list[dict]:
    """The registry with local presence, for `safeprobe data list`."""
    out = []
    for spec in REGISTRY.values():
        present = all((data_dir() / f).exists() for f in spec.files.values())
        out.append({"name": spec.name, "kind": spec.kind, "splits": spec.splits, "present": present,
                    "description": spec.description, "source": spec.source})
    return out
