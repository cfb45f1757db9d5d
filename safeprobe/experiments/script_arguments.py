"""What `safeprobe train` fine-tunes on: the script arguments of TRL's scripts (`dataset_name`, `dataset_config`,
`dataset_train_split`, `dataset_streaming`) and the rest of what selects the data, in one small dataclass that
`TrainConfig` extends. Every key is a YAML key and a flag of the same name."""
from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from ..data.readers import DatasetOptions
from ..errors import UserError
from ..method.config import _help


@dataclass
class ScriptArguments:
    dataset_name: str = _help("useful fine-tuning data: a dataset name (sst2, agnews, gsm8k, alpaca...), a file "
                              "(JSON, JSONL, CSV, Parquet), a folder or a Hub id (owner/name)", "sst2")
    dataset_config: str | None = _help("the dataset's configuration (subset), for a Hub dataset or a folder")
    dataset_train_split: str = _help("the split of dataset_name to fine-tune on", "train")
    dataset_revision: str | None = _help("branch, tag or commit of a Hub dataset")
    dataset_data_files: str | None = _help("which files of a Hub dataset or folder to read: a name or glob, "
                                           "comma-separated for several")
    dataset_column_mapping: dict = field(default_factory=dict, metadata={
        "help": "a row layout's field -> your column, e.g. '{prompt: question, completion: answer}'"})
    dataset_streaming: bool = _help("stream a Hub dataset instead of downloading the split: n rows are drawn "
                                    "from a seeded shuffle buffer", False)
    n: int = _help("number of useful examples used", 1000)
    poison_ratio: float = _help("fraction of the n examples replaced by harmful (prompt, harmful answer) pairs", 0.0)
    poison_data: str = _help("where the harmful pairs for poisoning come from (name or file)", "pure-bad")

    def check_data(self) -> None:
        if not 0 <= self.poison_ratio <= 1:
            raise UserError(f"poison_ratio must be in [0, 1], got {self.poison_ratio}")
        self.dataset_column_mapping = _column_mapping(self.dataset_column_mapping)

    def dataset_options(self, seed: int, limit: int | None = None) -> DatasetOptions:
        """`datasets.load_dataset`'s options for dataset_name."""
        files = self.dataset_data_files
        files = [f.strip() for f in files.split(",") if f.strip()] if files and "," in files else files
        return DatasetOptions(self.dataset_config, self.dataset_revision, files, self.dataset_streaming,
                              limit if self.dataset_streaming else None, seed)


def _column_mapping(value) -> dict:
    """{field: column} from a mapping, or its YAML text (a flag)."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) or {}
        except yaml.YAMLError:
            value = None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise UserError("dataset_column_mapping must map field names to column names, e.g. "
                        "'{prompt: question, completion: answer}'")
    return dict(value)
