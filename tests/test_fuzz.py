"""Property-based tests (hypothesis) of everything that reads user input: data files and their rows, YAML
configs and the command line. Malformed rows, wrong types, unicode, empty and very long strings, deep nesting and
big files must give a correct result or a one-line UserError, never another exception.

The last test prints how many generated cases ran.
"""
import collections
import contextlib
import dataclasses
import csv
import io
import json
import math
import os
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safeprobe.cli import config as cfgmod
from safeprobe.cli.main import COMMANDS, main
from safeprobe.data import Example, SafetyPair, load_examples, load_pairs, load_prompts
from safeprobe.data.readers import read_rows
from safeprobe.data.records import to_example, to_prompt, to_safety_pair
from safeprobe.data.registry import format_agnews, format_gsm8k, format_sst2
from safeprobe.errors import UserError
from safeprobe.experiments.run_settings import knob_names, method_arguments
from safeprobe.experiments.train import TrainConfig
from safeprobe.io import check_output_dir
from safeprobe.method import get_method, methods
from safeprobe.method.sap import SAPConfig
from safeprobe.method.sap.config import EPS_MODES, MODES, SAFETY_LOSSES

CASES = collections.Counter()  # property name -> generated cases run
ACCEPTED = collections.Counter()  # property name -> cases that gave a result rather than a UserError
# The test run is reproducible (a fixed seed, so a clean checkout passes or fails the same way every time);
# SAFEPROBE_FUZZ_RANDOM=1 explores fresh cases and SAFEPROBE_FUZZ_EXAMPLES=N runs more of them.
FUZZ = settings(max_examples=int(os.environ.get("SAFEPROBE_FUZZ_EXAMPLES", "150")),
                derandomize=not os.environ.get("SAFEPROBE_FUZZ_RANDOM"), database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

# -- strategies --------------------------------------------------------------------------------------------
ROW_KEYS = ["prompt", "completion", "response", "output", "instruction", "input", "messages", "safe", "harmful",
            "chosen", "rejected", "goal", "Goal", "question", "text", "label", "sentence", "answer", "role",
            "content"]
texts = st.text(max_size=30) | st.sampled_from(["", " ", "\n\nHuman: hi\n\nAssistant: no", "1", "####  42",
                                                "\u202e\u0000\ud7ff", "x" * 5000])
scalars = st.none() | st.booleans() | st.integers() | st.floats() | texts
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(ROW_KEYS) | st.text(max_size=5), inner, max_size=4),
                           max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", 3]),
                                           "content": texts | st.integers()}), max_size=3)
LAYOUTS = [("prompt", "completion"), ("instruction", "output"), ("prompt", "response"), ("messages",),
           ("prompt", "safe", "harmful"), ("prompt", "chosen", "rejected"), ("chosen", "rejected"), ("goal",)]


def row_of(keys):
    return st.fixed_dictionaries({k: messages if k == "messages" else texts for k in keys},
                                 optional={"input": texts, "label": json_values})


rows = st.sampled_from(LAYOUTS).flatmap(row_of) | st.dictionaries(st.sampled_from(ROW_KEYS),
                                                                  json_values | messages | texts, max_size=5)
same_layout = st.sampled_from(LAYOUTS).flatmap(lambda keys: st.lists(row_of(keys), min_size=1, max_size=4))
LOADERS = {"examples": (load_examples, Example), "pairs": (load_pairs, SafetyPair), "prompts": (load_prompts, Example)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def one_line_user_error(call, counted: str | None = None) -> bool:
    """Run `call`; True if it raised a one-line UserError, False if it returned (counted as accepted)."""
    try:
        call()
    except UserError as e:
        assert "\n" not in str(e) and str(e), repr(e)
        return True
    if counted:
        ACCEPTED[counted] += 1
    return False


def check_records(path) -> None:
    """Every loader gives records of its kind with text fields, or a one-line UserError."""
    for name, (loader, kind) in LOADERS.items():
        out = []
        if not one_line_user_error(lambda: out.extend(loader(str(path))), f"loaded as {name}"):
            assert out and all(isinstance(r, kind) for r in out)
            assert all(isinstance(c, str) for r in out for _, c in r.messages)


def same_json(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN-safe equality


# -- data files --------------------------------------------------------------------------------------------
@FUZZ
@given(lines=same_layout.map(lambda rs: [json.dumps(r) for r in rs])
       | st.lists(rows.map(json.dumps) | json_values.map(json.dumps) | texts, max_size=6))
def test_jsonl_files(workdir, lines):
    CASES["jsonl files"] += 1
    path = workdir / "data.jsonl"
    path.write_text("\n".join(line.replace("\n", " ") for line in lines) + "\n", encoding="utf-8",
                    errors="surrogatepass")
    read = []
    if not one_line_user_error(lambda: read.extend(read_rows(path)), "jsonl files"):
        expected = [json.loads(line) for line in lines if line.strip()]
        assert same_json(read, expected)
    check_records(path)


@FUZZ
@given(document=same_layout | json_values | st.lists(rows, max_size=5)
       | st.fixed_dictionaries({"data": st.lists(rows)}))
def test_json_files(workdir, document):
    CASES["json files"] += 1
    path = workdir / "data.json"
    path.write_text(json.dumps(document), encoding="utf-8", errors="surrogatepass")
    read = []
    if not one_line_user_error(lambda: read.extend(read_rows(path)), "json files"):
        assert read and all(isinstance(r, dict) for r in read)
        if isinstance(document, list):
            assert same_json(read, document)
    check_records(path)


csv_fields = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=12)


@FUZZ
@given(header=st.lists(csv_fields, min_size=1, max_size=4), body=st.lists(st.lists(csv_fields, max_size=5),
                                                                          max_size=5))
def test_csv_files(workdir, header, body):
    CASES["csv files"] += 1
    path = workdir / "data.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([header, *body])
    read = []
    if one_line_user_error(lambda: read.extend(read_rows(path)), "csv files"):
        return
    well_formed = len(set(header)) == len(header) and all(header) and all(len(r) == len(header) for r in body)
    if well_formed and all(body):
        assert read == [dict(zip(header, r)) for r in body]
    check_records(path)


@FUZZ
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".json", ".jsonl", ".csv", ".parquet"]))
def test_arbitrary_bytes(workdir, content, suffix):
    CASES["arbitrary bytes"] += 1
    path = workdir / f"bytes{suffix}"
    path.write_bytes(content)
    read = []
    if not one_line_user_error(lambda: read.extend(read_rows(path)), "arbitrary bytes"):
        assert read and all(isinstance(r, dict) for r in read)


@FUZZ
@given(row=rows)
def test_rows_to_records(row):
    CASES["rows"] += 1
    for convert, kind in ((to_example, Example), (to_prompt, Example), (to_safety_pair, SafetyPair),
                          (format_sst2, Example), (format_agnews, Example), (format_gsm8k, Example)):
        out = []
        if not one_line_user_error(lambda: out.append(convert(row, "f.jsonl: row 1")), "rows"):
            record = out[0]
            assert isinstance(record, kind) and all(isinstance(c, str) for _, c in record.messages)
            assert all(isinstance(t, str) for t in (getattr(record, "response", ""), getattr(record, "safe", ""),
                                                    getattr(record, "harmful", "")))


def test_big_files_and_long_strings(workdir):
    """100,000 rows, a 10 MB field and deep nesting: read in full, or refused on one line."""
    big = workdir / "big.jsonl"
    big.write_text("".join(json.dumps({"prompt": f"q{i} \u00e9\u4e2d", "completion": "a" * 50}) + "\n"
                           for i in range(100_000)), encoding="utf-8")
    assert len(load_examples(str(big))) == 100_000
    wide = workdir / "wide.csv"
    wide.write_text("prompt,completion\nq," + "z" * 10_000_000 + "\n", encoding="utf-8")
    assert len(read_rows(wide)[0]["completion"]) == 10_000_000
    for name, text in (("deep.json", "[" * 100_000), ("deep.jsonl", "{\"a\":" * 100_000 + "\n")):
        (workdir / name).write_text(text)
        assert one_line_user_error(lambda: read_rows(workdir / name))
    deep = workdir / "deep.yaml"
    deep.write_text("n: " + "[" * 100_000)
    assert one_line_user_error(lambda: cfgmod.read_yaml(deep))
    CASES["big files"] += 5


# -- config files ------------------------------------------------------------------------------------------
# safeprobe's own keys and SAP's knobs (which the config routes to the method's settings)
FIELDS = {**{f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "method_settings"},
          **{k: SAPConfig.__dataclass_fields__[k] for k in knob_names(get_method("sap"))}}
junk = scalars | st.lists(st.integers() | texts, max_size=3) | st.sampled_from(["nan", "inf", "-1", "0", "1e-3"])
CHOICES = {"method": list(methods()), "lr_scheduler_type": ["constant", "linear", "cosine"], "report_to": ["none"],
           "mode": MODES, "eps_mode": EPS_MODES, "safety_loss": SAFETY_LOSSES,
           "probe_layers": ["middle", "all", "3,9", "0.3:0.6", "99"]}


def typed(name: str):
    """Values of the field's own type (often out of range), so that many configs get past type checks."""
    kind = cfgmod._base_type(FIELDS[name].type)[0]
    if kind is bool:
        return st.booleans()
    if kind is int:
        return st.integers(1, 10) | st.integers(-3, 10) | st.integers()
    if kind is float:
        return st.floats(0, 1) | st.floats(-1, 2) | st.floats()
    return st.sampled_from(list(CHOICES[name])) | texts if name in CHOICES else texts


configs = st.lists(st.sampled_from(list(FIELDS)), max_size=5, unique=True).flatmap(
    lambda names: st.fixed_dictionaries({n: typed(n) | junk if i == 0 else typed(n) for i, n in enumerate(names)}))


def check_config(cfg, workdir) -> None:
    """A config that loads has the declared types and is accepted by the Trainer's own arguments."""
    assert isinstance(cfg, TrainConfig)
    for name in ("n", "per_device_train_batch_size", "max_length", "lora_r", "max_steps", "seed"):
        assert isinstance(getattr(cfg, name), int) and not isinstance(getattr(cfg, name), bool)
    assert all(math.isfinite(getattr(cfg, f)) for f in ("learning_rate", "num_train_epochs", "poison_ratio"))
    if cfg.method == "sap":
        assert all(math.isfinite(cfg.value(f)) for f in ("eps", "beta"))
    method_arguments(cfg, workdir / "args")


@FUZZ
@given(mapping=configs, dashes=st.booleans(), unknown=st.dictionaries(st.text(max_size=6), junk, max_size=1),
       tail=st.sampled_from(["", "", "\n: :", "\n- x", "\n\t", "\n!!python/object:os.system x", "\n? [a]\n: b",
                             "\n&a [*a]"]))
def test_yaml_configs(workdir, mapping, dashes, unknown, tail):
    CASES["yaml configs"] += 1
    mapping = {(k.replace("_", "-") if dashes else k): v for k, v in mapping.items()}
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump({**mapping, **unknown}, allow_unicode=True) + tail, encoding="utf-8",
                    errors="surrogatepass")
    out = []
    if not one_line_user_error(lambda: out.append(TrainConfig.from_values(cfgmod.read_yaml(path), str(path))), "yaml configs"):
        check_config(out[0], workdir)


# -- command line ------------------------------------------------------------------------------------------
def as_flags(mapping: dict) -> list[str]:
    flags = []
    for name, value in mapping.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


extra_args = st.lists(st.sampled_from(["--config", "--help", "-v", "--nope", "-x", "--n"]) | junk.map(str) | texts,
                      max_size=2)


@FUZZ
@given(command=st.sampled_from([["train"]] * 4 + [["data", "show"], ["data", "list"], ["data"], [], ["nope"]]),
       flags=configs.map(as_flags), extra=extra_args)
def test_command_line(workdir, command, flags, extra):
    """Parsing and validation of any argv; the commands themselves are replaced by a check of their config."""
    CASES["command lines"] += 1
    checks = {"train": lambda cfg, console: check_config(cfg, workdir), "data show": lambda cfg, console: None,
              "data list": lambda cfg, console: None}
    stubs = {name: (COMMANDS[name][0], COMMANDS[name][1], check) for name, check in checks.items()}
    with mock.patch.dict(COMMANDS, stubs), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            code = main([*command, *flags, *extra])
        except SystemExit as e:  # argparse: usage error (2) or --help (0)
            code = e.code
    assert code in (0, 2), code
    ACCEPTED["command lines"] += code == 0
    if code == 2 and "usage:" not in err.getvalue():
        assert len(err.getvalue().strip().splitlines()) == 1, err.getvalue()


@FUZZ
@given(name=texts | st.sampled_from(["a/b/../c", "\x00", "/proc/nope", "~nobody/x", "x" * 300]))
def test_output_directories(workdir, name):
    CASES["output dirs"] += 1
    out = []
    if not one_line_user_error(lambda: out.append(check_output_dir(workdir / "outs" / name)), "output dirs"):
        assert out[0].is_dir()


def test_zz_report_generated_cases(capsys):
    """Last in this file: how many generated cases ran (printed even when output is captured)."""
    total = sum(CASES.values())
    with capsys.disabled():
        print("\nfuzz cases run: " + ", ".join(f"{k} {v}" for k, v in CASES.items()) + f"; total {total}")
        print("accepted (the rest refused with a one-line error): "
              + ", ".join(f"{k} {v}" for k, v in ACCEPTED.items()))
    assert total >= 1000, CASES  # every property above ran its examples
