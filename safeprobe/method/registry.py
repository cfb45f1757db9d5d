"""The method registry: each method declares itself in its own file with one `register(Method(...))` line, and
`safeprobe train`, `align`, `compare`, the resume fingerprints and the report find everything about it here.

Methods outside this package register the same way, from a module or a file named in the environment variable
SAFEPROBE_METHODS (comma-separated) or from a package's `safeprobe.methods` entry point.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

TRAIN, ALIGN = "train", "align"  # the stage a method runs at: fine-tuning, or making the aligned base
BASELINE = "sft"  # plain fine-tuning: what every defense is measured against


@dataclass(frozen=True)
class DataRole:
    """A dataset a method reads beyond the task data.

    `kwarg`: the trainer's keyword for it; `source` / `count`: the run settings naming the dataset and how many of
    its records to use; `kind`: "pairs" (prompt, safe answer, harmful answer), "examples" (prompt -> response) or
    "harmful examples" (the harmful side of pairs); `role`: its name in run.json's data fingerprints.
    """

    kwarg: str
    source: str
    count: str
    kind: str
    role: str
    split: str | None = "train"


@dataclass(frozen=True)
class Series:
    """A step-log key the report plots for the method's runs (one panel; `cumulative`: summed over steps)."""

    key: str
    title: str
    ylabel: str
    cumulative: bool = False


@dataclass(frozen=True)
class Method:
    """Everything the rest of safeprobe needs to know about a method."""

    name: str
    trainer: type
    stage: str = TRAIN
    data: tuple[DataRole, ...] = ()
    series: tuple[Series, ...] = ()
    summary: str = ""
    aliases: tuple[str, ...] = field(default=())  # names its runs log (e.g. SAP's reference mode)
    data_only: bool = False  # its trainer only changes the training data: it composes with others as "A+B"

    @property
    def config_class(self):
        return self.trainer.config_class


METHODS: dict[str, Method] = {}
COMPOSED: dict[str, Method] = {}  # "sap+safeinstr" and the like, built by `compose` when first named


def register(method: Method) -> Method:
    """Add `method` (its name must be new: a second method of the same name is a mistake, not an override)."""
    known = METHODS.get(method.name)
    if known is not None and known.trainer is not method.trainer:
        raise ValueError(f"a method named '{method.name}' is already registered ({known.trainer.__name__})")
    METHODS[method.name] = method
    return method


def methods(stage: str = TRAIN) -> dict[str, Method]:
    """The registered methods of `stage`, by name."""
    discover()
    return {name: m for name, m in METHODS.items() if m.stage == stage}


def get_method(name: str, stage: str = TRAIN) -> Method:
    found = methods(stage)
    if "+" in name and name not in found:
        return compose(name, stage)
    if name not in found:
        raise UserError(f"unknown method '{name}'; valid choices: {', '.join(found)} (or a composition such as "
                        "sap+safeinstr)")
    return found[name]


def compose(name: str, stage: str = TRAIN) -> Method:
    """The method "A+B+...": one optimiser-side method (sft, sap, lisa, ...) trained on the data of the data-side
    ones (`data_only`, e.g. SafeInstr's demonstrations mixed in). Its trainer is a class whose bases are the
    data-side trainers, then the optimiser's: each data-side `__init__` adds its data and passes the rest on, so
    no method knows of another. Built once per name and kept apart from the registered methods (which list the
    methods there are, not their combinations)."""
    if name in COMPOSED:
        return COMPOSED[name]
    parts = [get_method(part.strip(), stage) for part in name.split("+")]
    data_side = [m for m in parts if m.data_only]
    optimisers = [m for m in parts if not m.data_only]
    if len(optimisers) != 1 or not data_side or len({m.name for m in parts}) != len(parts):
        raise UserError(f"method '{name}': a composition is one optimiser-side method and one or more data-side "
                        f"ones ({', '.join(m.name for m in methods(stage).values() if m.data_only) or 'none'}), "
                        "each once")
    optimiser = optimisers[0]
    trainer = type("".join(m.trainer.__name__.removesuffix("Trainer") for m in parts) + "Trainer",
                   (*(m.trainer for m in data_side), optimiser.trainer),
                   {"method_name": name, "config_class": optimiser.trainer.config_class})
    roles = {role.kwarg: role for m in parts for role in m.data}
    aliases = tuple(name + alias.removeprefix(optimiser.name) for alias in optimiser.aliases)  # sap+safeinstr-reference
    COMPOSED[name] = Method(name, trainer, stage=stage, data=tuple(roles.values()), series=optimiser.series,
                            aliases=aliases, summary=f"{optimiser.name} on the data of {', '.join(m.name for m in data_side)}")
    return COMPOSED[name]


def method_of_run(logged_name: str) -> Method | None:
    """The method whose runs log `logged_name` as their method (its name or an alias)."""
    discover()
    found = next((m for m in METHODS.values() if logged_name == m.name or logged_name in m.aliases), None)
    if found is None and "+" in logged_name:
        try:  # a composition logs its name or an alias of its optimiser's (a mode suffix after "-")
            composed = compose(logged_name.split("-")[0])
        except UserError:
            return None
        return composed if logged_name == composed.name or logged_name in composed.aliases else None
    return found


_discovered = False


def discover() -> None:
    """Import this package's method modules and the external ones (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{info.name}")
    for entry in importlib.metadata.entry_points(group="safeprobe.methods"):
        entry.load()
    for spec in filter(None, (s.strip() for s in os.environ.get("SAFEPROBE_METHODS", "").split(","))):
        _import_external(spec)


def _import_external(spec: str) -> None:
    path = Path(spec).expanduser()
    if path.suffix == ".py":
        if not path.is_file():
            raise UserError(f"SAFEPROBE_METHODS: {path}: file not found")
        name = f"safeprobe_external_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            importlib.import_module(spec)
        except ImportError as e:
            raise UserError(f"SAFEPROBE_METHODS: cannot import '{spec}' ({e})") from None
