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
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "whose chat template to apply"})


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
    """The first K records exactly as the model sees them: template applied, response boundary marked."""
    from ..data import load_records
    from ..data.records import SafetyPair
    from ..data.tokenize import response_ids
    from ..model import load_model  # heavy import only when needed

    if cfg.n < 1:
        raise UserError(f"--n must be >= 1, got {cfg.n}")
    records = load_records(cfg.dataset, cfg.split, cfg.kind)[: cfg.n]
    _, tokenizer = load_model(cfg.model)
    for i, record in enumerate(records, start=1):
        answers = [("safe", record.safe), ("harmful", record.harmful)] if isinstance(record, SafetyPair) \
            else [("response", record.response)]
        for label, answer in answers:
            head, tail = response_ids(tokenizer, record.chat, answer)
            console.rule(f"[bold]{cfg.dataset} #{i} ({label})")
            console.print(tokenizer.decode(head), end="", markup=False, highlight=False)
            console.print("[reverse]<<response: trained tokens>>[/reverse]")
            console.print(tokenizer.decode(tail) if answer else "(prompt only)", markup=False, highlight=False)
            console.print(f"[dim]{len(head)} prompt tokens, {len(tail) if answer else 0} response tokens[/dim]")
