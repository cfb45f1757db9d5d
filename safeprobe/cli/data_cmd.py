"""`safeprobe data list` and `safeprobe data show`."""
from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from ..errors import UserError


@dataclass
class DataShowConfig:
    dataset: str = field(default="sst2", metadata={"help": "dataset name or file", "positional": True})
    n: int = field(default=3, metadata={"help": "number of examples to show"})
    split: str | None = field(default=None, metadata={"help": "split (default: the dataset's first)"})
    kind: str | None = field(default=None, metadata={"help": "examples, pairs or prompts (default: the dataset's "
                                                                 "kind; for a file, detected from its first row)"})
    model_name_or_path: str = field(default="smollm2-135m-instruct", metadata={"help": "whose tokenizer and chat "
                                                                                       "template to apply"})
    max_length: int = field(default=256, metadata={"help": "truncate as `safeprobe train --max-length` does"})


def data_list(console: Console) -> None:
    from ..data import available  # imports stay in the commands: `safeprobe --help` should not load torch
    table = Table(title="safeprobe datasets ($SAFEPROBE_DATA)")
    for column in ("name", "kind", "splits", "local", "description", "source"):
        table.add_column(column, overflow="fold")
    for row in available():
        table.add_row(row["name"], row["kind"], ",".join(row["splits"]), "yes" if row["present"] else "no",
                      row["description"], row["source"])
    console.print(table)


def data_show(cfg: DataShowConfig, console: Console) -> None:
    """The first N records exactly as `safeprobe train` feeds them to the model: the token ids it trains on,
    decoded, with the tokens in the loss (the targets) between ⟦ and ⟧."""
    from ..data import load_records
    from ..data.records import Example, SafetyPair
    from ..data.tokenize import IGNORE, encode, prompt_ids
    from ..model import load_model  # heavy import only when needed

    for name, low in (("n", 1), ("max_length", 1)):
        if getattr(cfg, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(cfg, name)}")
    records = load_records(cfg.dataset, cfg.split, cfg.kind)[: cfg.n]
    _, tokenizer = load_model(cfg.model_name_or_path)
    console.print("[dim]targets (tokens in the loss) are shown between ⟦ and ⟧[/dim]")
    for i, record in enumerate(records, start=1):
        sides = [("safe", Example(record.messages, record.safe)), ("harmful", Example(record.messages, record.harmful))] \
            if isinstance(record, SafetyPair) else [("response" if record.response else "prompt", record)]
        for label, example in sides:
            console.rule(f"[bold]{cfg.dataset} #{i} ({label})")
            if label == "prompt":  # an evaluation prompt: what generation starts from
                ids = prompt_ids(tokenizer, example.chat)
                features = {"input_ids": ids, "labels": [IGNORE] * len(ids)}
            else:
                features = encode(tokenizer, example, cfg.max_length)
            if features is None:
                console.print(f"(dropped: no target token within max_length={cfg.max_length})")
                continue
            _print_spans(console, tokenizer, features["input_ids"], [label != IGNORE for label in features["labels"]])


def _print_spans(console: Console, tokenizer, ids: list[int], targets: list[bool]) -> None:
    """The decoded ids, each run of targets between ⟦ and ⟧, then the counts."""
    start = 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or targets[end] != targets[start]:
            text = tokenizer.decode(ids[start:end])
            console.print(f"⟦{text}⟧" if targets[start] else text, end="", markup=False, highlight=False,
                          style="reverse" if targets[start] else None)
            start = end
    console.print(f"\n[dim]{len(ids)} tokens, {sum(targets)} of them targets[/dim]")
