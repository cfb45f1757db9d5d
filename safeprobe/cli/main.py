"""The `safeprobe` command line: every subcommand with settings takes --config FILE.yaml plus flags that override it."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from rich.console import Console

from ..errors import UserError
from ..memory import keep_freed_memory
from . import config as cfgmod
from .align_cmd import align_config, run_align_command
from .data_cmd import DataShowConfig, data_list, data_show
from .eval_cmd import (EvalConfig, JudgeTrainConfig, JudgeValidateConfig, run_eval_command, run_judge_train,
                       run_judge_validate)

COMMANDS = {}  # name -> (help, config dataclass or None, handler(cfg, console))


def command(name: str, help_text: str, config_cls=None):
    def register(fn):
        COMMANDS[name] = (help_text, config_cls, fn)
        return fn
    return register


@command("data list", "list the named datasets and whether they are present locally")
def _data_list(cfg, console):
    data_list(console)


@command("data show", "print examples exactly as the model will see them", DataShowConfig)
def _data_show(cfg, console):
    data_show(cfg, console)


def _train_config():
    from ..experiments.train import TrainConfig
    return TrainConfig


@command("train", "fine-tune with a method (sft, sap, ...) and save a PEFT adapter", _train_config)
def _train(cfg, console):
    from ..experiments.train import run_train
    info = run_train(cfg)
    console.print(f"[green]done[/green]: {info['method']} {info['global_steps']} steps, "
                  f"train loss {info['train_loss']:.4f}, {info['wall_time_s']} s -> {cfg.output_dir}")


command("align", "make an aligned base model (plain, vaccine or booster); prints its directory",
        align_config)(run_align_command)


@command("eval", "answer suites of prompts and judge them: harmful score, over-refusal, task accuracy", EvalConfig)
def _eval(cfg, console):
    run_eval_command(cfg, console)


@command("judge train", "build the offline moderation judge into the cache (a few minutes on CPU)",
         JudgeTrainConfig)
def _judge_train(cfg, console):
    run_judge_train(cfg, console)


@command("judge validate", "agreement of a judge with human labels (last line: the accuracy)",
         JudgeValidateConfig)
def _judge_validate(cfg, console):
    run_judge_validate(cfg, console)


def _attack_config():
    from ..experiments.attack import AttackConfig
    return AttackConfig


@command("attack", "harmful fine-tuning after fine-tuning: the worst harmful score of a small grid whose task "
         "accuracy stays within a bound (attack.json)", _attack_config)
def _attack(cfg, console):
    from ..experiments.attack import run_attack
    result = run_attack(cfg, console)
    before, top = result["before"], result["worst"]
    console.print(f"before the attack: harmful score {100 * before['harmful_score']:.1f}%, "
                  f"accuracy {100 * before['accuracy']:.1f}%")
    for point in result["grid"]:
        console.print(f"  lr {point['learning_rate']:g}, {point['steps']} steps: harmful score "
                      f"{100 * point['harmful_score']:.1f}%, accuracy {100 * point['accuracy']:.1f}%")
    if top["harmful_score"] is None:
        console.print(f"no attack kept accuracy within {100 * cfg.accuracy_bound:.0f} points")
    else:
        console.print(f"worst attack within {100 * cfg.accuracy_bound:.0f} points of accuracy: harmful score "
                      f"{100 * top['harmful_score']:.1f}% (lr {top['learning_rate']:g}, {top['steps']} steps) "
                      f"-> {cfg.output_dir}/attack.json")


def _demo_config():
    from ..experiments.demo import DemoConfig
    return DemoConfig


@command("demo", "the embedded default end to end: SFT vs SAP on SST-2 with harmful pairs, judged", _demo_config)
def _demo(cfg, console):
    from ..experiments.demo import run_demo
    run_demo(cfg, console)


def _compare_config():
    from ..experiments.compare import CompareConfig
    return CompareConfig


@command("compare", "methods x seeds x settings on identical data, trained and evaluated: results.json, report.md, "
         "report.html", _compare_config)
def _compare(cfg, console):
    from ..experiments.compare import run_compare
    from ..reporting.summary import against_reference_lines
    for line in against_reference_lines(run_compare(cfg, console)):
        console.print(line)


def build_parser(only: str | None = None, argv: list[str] = ()) -> argparse.ArgumentParser:
    """The whole command line; with `only`, the flags of that command alone (the others' configs import torch,
    which `safeprobe --help` should not wait for), and for a training command the flags of the method that `argv`
    names (its config's fields)."""
    parser = argparse.ArgumentParser(prog="safeprobe", allow_abbrev=False, description="Fine-tune LLMs without losing their safety "
                                     "alignment (Safety-Aware Probing).")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups = {}
    for name, (help_text, config_cls, _) in COMMANDS.items():
        words = name.split()
        target = sub
        if len(words) == 2:
            if words[0] not in groups:
                group = sub.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            target = groups[words[0]]
        p = target.add_parser(words[-1], help=help_text, description=help_text, allow_abbrev=False)
        p.set_defaults(handler=name)
        if config_cls is not None and only in (None, name):
            cls = _dataclass(config_cls)
            extra = _method_flags(cls, argv) if only == name else []
            cfgmod.add_arguments(p, cls, extra, _hidden_flags(cls) if only == name else [])
    return parser


def _command_in(argv: list[str]) -> str:
    """The command that `argv` names ('' for none): its first one or two words that are not flags."""
    words = [a for a in argv if not a.startswith("-")][:2]
    return next((name for name in (" ".join(words), *words[:1]) if name in COMMANDS), "")


def _method_flags(cls, argv: list[str]) -> list:
    """The flags of the method named by `--method` in `argv`, else by the `--config` file, else the default."""
    if not hasattr(cls, "from_values"):
        return []
    from ..experiments.run_settings import flag_fields
    method = cls.method
    for i, word in enumerate(argv):
        if word == "--config" and i + 1 < len(argv):
            try:
                method = str(cfgmod.read_yaml(argv[i + 1]).get("method", method))
            except UserError:
                pass  # the file's error is reported when the config is read
    for i, word in enumerate(argv):
        if word == "--method" and i + 1 < len(argv):
            method = argv[i + 1]
        elif word.startswith("--method="):
            method = word.split("=", 1)[1]
    return flag_fields(cls, method)


def _hidden_flags(cls) -> list[str]:
    if not hasattr(cls, "from_values"):
        return []
    from ..experiments.run_settings import hidden_flags
    return hidden_flags(cls)


def _dataclass(config_cls):
    return config_cls() if not isinstance(config_cls, type) else config_cls


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_command_in(argv), argv=argv)
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    _quiet_libraries(args.verbose)
    keep_freed_memory()  # training and generation on a CPU reallocate the same large buffers at every step
    console = Console()
    help_text, config_cls, handler = COMMANDS[args.handler]
    try:
        cfg = cfgmod.resolve(_dataclass(config_cls), args) if config_cls is not None else None
        handler(cfg, console)
    except UserError as e:
        if args.verbose:
            raise
        print(f"safeprobe: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("safeprobe: interrupted", file=sys.stderr)
        return 130
    return 0


def _quiet_libraries(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # weight-loading bars; training keeps its bar


if __name__ == "__main__":
    sys.exit(main())
