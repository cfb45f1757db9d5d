"""Data layer: readers, record kinds, registry, label masks, splits, and one-line errors on bad input."""
import json

import pytest

from safeprobe.cli.main import main
from safeprobe.data import Example, load_examples, load_pairs, load_prompts, sample, split
from safeprobe.data.readers import read_rows
from safeprobe.data.registry import REGISTRY
from safeprobe.data.tokenize import IGNORE, encode, encode_all
from safeprobe.errors import UserError
from safeprobe.model import load_model


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("tiny-random-llama")[1]


def test_label_mask_of_a_known_example_token_by_token(tokenizer):
    ex = Example((("user", "Hi"),), "Hello!")
    feat = encode(tokenizer, ex, 256)
    ids, labels = feat["input_ids"], feat["labels"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    n_prompt = labels.count(IGNORE)
    # the prompt (system + user turn + assistant header) is masked, everything after it is a target
    assert tokenizer.decode(ids[:n_prompt]).endswith("<|im_start|>assistant\n")
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tokens[n_prompt:] == ["Hello", "!", "<|im_end|>"]  # the end-of-turn token is a target
    assert len(ids) == len(labels) == len(feat["attention_mask"])


def test_truncation_never_leaves_an_example_without_response(tokenizer):
    long_prompt = Example((("user", "word " * 300),), "ok")
    assert encode(tokenizer, long_prompt, 64) is None
    short = Example((("user", "hi"),), "a fairly long answer " * 20)
    feat = encode(tokenizer, short, 64)
    assert len(feat["input_ids"]) == 64 and feat["labels"][-1] != IGNORE
    result = encode_all(tokenizer, [long_prompt, short], 64)
    assert result.dropped == 1 and len(result.features) == 1


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_readers_and_record_kinds(tmp_path):
    alpaca = write(tmp_path / "a.json", json.dumps([{"instruction": "Add", "input": "1+1", "output": "2"}]))
    chat = write(tmp_path / "c.jsonl", json.dumps({"messages": [{"role": "user", "content": "q"},
                                                               {"role": "assistant", "content": "a"}]}) + "\n")
    pc = write(tmp_path / "p.csv", "prompt,completion\nq1,a1\n\"q,2\",a2\n")
    assert load_examples(alpaca)[0] == Example((("user", "Add\n\n1+1"),), "2")
    assert load_examples(chat)[0].response == "a"
    assert [e.prompt for e in load_examples(pc)] == ["q1", "q,2"]
    pku = write(tmp_path / "pku.json", json.dumps([{"prompt": "p", "response": ["safe", "unsafe"]}]))
    cr = write(tmp_path / "cr.jsonl", json.dumps({"prompt": "p", "chosen": "s", "rejected": "h"}) + "\n")
    hh = write(tmp_path / "hh.jsonl", json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: no",
                                                  "rejected": "\n\nHuman: hi\n\nAssistant: yes"}) + "\n")
    assert (load_pairs(pku)[0].safe, load_pairs(pku)[0].harmful) == ("safe", "unsafe")
    assert load_pairs(cr)[0].harmful == "h"
    assert load_pairs(hh)[0].prompt == "hi" and load_pairs(hh)[0].safe == "no"
    mapped = write(tmp_path / "m.csv", "question,answer\nq,a\n")
    assert load_examples(mapped, columns={"prompt": "question", "completion": "answer"})[0].response == "a"


def test_parquet_reader(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["x"], "completion": ["y"]}), tmp_path / "d.parquet")
    assert load_examples(str(tmp_path / "d.parquet"))[0].response == "y"


@pytest.mark.parametrize("name, content, message", [
    ("missing.jsonl", None, "missing.jsonl: file not found"),
    ("bad.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n', "bad.jsonl:2: malformed JSON line"),
    ("field.jsonl", '{"prompt": "a"}\n', "field.jsonl:1: missing required field 'completion'"),
    ("blank.jsonl", '{"prompt": "a", "completion": "b"}\n\n{"prompt": 5, "completion": ["a"]}\n',
     "blank.jsonl:3: field 'completion' must be a string, got list"),  # the line, blank lines counted
    ("rows.csv", 'prompt,completion\na,b\nc,\n', "rows.csv:3: field 'completion' is empty"),  # header counted
    ("header.csv", 'prompt,prompt,completion\na,b,c\n', "header.csv:1: the header names column 'prompt' more"),
    ("unnamed.csv", ',,prompt,completion\n1,2,a,b\n', "unnamed.csv:1: the header names an unnamed column more"),
    ("items.json", '[{"prompt": "a", "completion": "b"}, {"prompt": "a"}]', "items.json: item 2: missing"),
    ("alone.jsonl", '{"messages": [{"role": "assistant", "content": "hello"}]}\n',
     "alone.jsonl:1: field 'messages' must end with a non-empty user turn"),
    ("silent.jsonl", '{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "hi"}]}\n',
     "silent.jsonl:1: field 'messages' must end with a non-empty user turn"),
    ("empty.jsonl", "", "dataset is empty"),
    ("wrong.json", '{"x": 1}', "expected a JSON list of objects"),
    ("type.jsonl", '{"prompt": 3.5, "completion": ["a"]}\n', "field 'completion'"),
])
def test_bad_files_give_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError) as e:
        load_examples(str(path))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("row", ['{"messages": [{"role": "assistant", "content": "hello"}]}',
                                 '{"messages": [{"role": "user", "content": ""}]}'])
def test_a_chat_prompt_without_a_user_turn_is_a_row_error(tmp_path, row):
    path = write(tmp_path / "prompts.jsonl", row + "\n")
    with pytest.raises(UserError, match=r"prompts.jsonl:1: field 'messages' must end with a non-empty user turn"):
        load_prompts(path)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UserError, match="valid names: advbench"):
        load_examples("no-such-dataset")


def test_registry_datasets_load():
    sst2 = load_examples("sst2", "test")
    assert len(sst2) == 872 and sst2[0].response in ("positive", "negative")
    assert load_examples("gsm8k", "test")[0].meta["label"] == "18"
    assert len(load_prompts("xstest-safe")) == 250 and len(load_prompts("xstest-unsafe")) == 200
    assert len(load_prompts("advbench")) == 520 and len(load_prompts("jbb-harmful")) == 100
    train, test = load_pairs("pku-saferlhf-pairs", "train"), load_pairs("pku-saferlhf-pairs", "test")
    assert not {p.prompt for p in train} & {p.prompt for p in test}  # held out by prompt
    assert len(train) + len(test) == 5135
    assert len(load_examples("pure-bad")) == 100 and len(load_examples("alpaca")) == 1000


def test_seeded_sample_and_grouped_split_are_deterministic():
    items = list(range(100))
    assert sample(items, 10, 1) == sample(items, 10, 1) != sample(items, 10, 2)
    recs = [Example((("user", f"p{i % 7}"),), "r") for i in range(70)]
    train, held = split(recs, 0.3, 0)
    assert len(train) + len(held) == 70 and not {r.prompt for r in train} & {r.prompt for r in held}


def test_cli_data_show_formats_examples(capsys):
    assert main(["data", "show", "sst2", "--n", "2", "--model-name-or-path", "tiny-random-llama"]) == 0
    out = capsys.readouterr().out
    assert out.count("<|im_start|>assistant") == 2 and out.count("tive<|im_end|>⟧") == 2  # positive / negative
    assert main(["data", "show", "pku-saferlhf-pairs", "--n", "1", "--model-name-or-path", "tiny-random-llama"]) == 0
    assert "(harmful)" in capsys.readouterr().out
    assert main(["data", "show", "advbench", "--n", "1", "--model-name-or-path", "tiny-random-llama"]) == 0
    assert "(prompt)" in (out := capsys.readouterr().out) and "0 of them targets" in out


def test_cli_data_show_malformed_file_exits_2(tmp_path, capsys):
    bad = write(tmp_path / "bad.jsonl", "{not json}\n")
    assert main(["data", "show", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("safeprobe: error:") and "bad.jsonl:1" in err and len(err.splitlines()) == 1


def test_config_file_with_flag_override_and_errors(tmp_path, capsys):
    from safeprobe.cli import config as cfgmod
    from safeprobe.cli.main import build_parser
    from safeprobe.experiments.train import TrainConfig

    cfg_file = write(tmp_path / "c.yaml", "method: sap\nn: 12\nbeta: 0.1\nprobe_layers: [3, 9]\n")
    args = build_parser().parse_args(["train", "--config", cfg_file, "--n", "20"])
    cfg = cfgmod.resolve(TrainConfig, args)
    assert (cfg.method, cfg.n, cfg.value("beta"), cfg.value("probe_layers")) == ("sap", 20, 0.1, "3,9")
    for text, message in (("nsteps: 3\n", "unknown key 'nsteps'"), ("n: many\n", "key 'n': expected an integer"),
                          ("n: [1\n", "invalid YAML")):
        bad = write(tmp_path / "bad.yaml", text)
        assert main(["train", "--config", bad]) == 2
        err = capsys.readouterr().err
        assert message in err and "bad.yaml" in err and len(err.strip().splitlines()) == 1, err
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: config file not found" in capsys.readouterr().err


def test_a_mapping_flag_overrides_only_the_keys_it_names(tmp_path):
    from safeprobe.cli import config as cfgmod
    from safeprobe.cli.main import build_parser
    from safeprobe.experiments.compare import CompareConfig

    cfg_file = write(tmp_path / "c.yaml", "methods: [sft]\nbase: {model_name_or_path: tiny-random-llama, n: 16, max_steps: 2}\n"
                                          "eval: {suites: [advbench], limit: 3, max_new_tokens: 8}\n")
    args = build_parser().parse_args(["compare", "--config", cfg_file, "--base", "{max_steps: 3}",
                                      "--eval", "{limit: 2}", "--methods", "sap"])
    cfg = cfgmod.resolve(CompareConfig, args)
    assert cfg.base == {"model_name_or_path": "tiny-random-llama", "n": 16, "max_steps": 3}
    assert cfg.eval == {"suites": ["advbench"], "limit": 2, "max_new_tokens": 8}
    assert cfg.methods == ["sap"]  # not a mapping: the flag replaces the file's value


def test_a_mapping_flag_removes_the_keys_it_sets_to_null(tmp_path):
    from safeprobe.cli import config as cfgmod
    from safeprobe.cli.main import build_parser
    from safeprobe.experiments.compare import CompareConfig

    cfg_file = write(tmp_path / "c.yaml", "methods: [sft]\nbase: {model_name_or_path: tiny-random-llama, n: 16, max_steps: 2}\n"
                                          "settings: {p0: {poison_ratio: 0.0}, p10: {poison_ratio: 0.1}, "
                                          "p100: {poison_ratio: 1.0}}\n")
    args = build_parser().parse_args(["compare", "--config", cfg_file, "--settings", "{p10: null, p5: null}",
                                      "--base", "{max_steps: null, learning_rate: 1.0e-4}"])
    cfg = cfgmod.resolve(CompareConfig, args)
    assert cfg.settings == {"p0": {"poison_ratio": 0.0}, "p100": {"poison_ratio": 1.0}}  # p5 was never there
    assert cfg.base == {"model_name_or_path": "tiny-random-llama", "n": 16, "learning_rate": 1.0e-4}


def test_config_errors_name_the_file_or_the_flag(tmp_path, capsys):
    bad = write(tmp_path / "bad.yaml", "methods: [sft]\nbase: {model_name_or_path: tiny-random-llama, n: many}\n")
    for argv, message in ((["compare", "--config", bad], "bad.yaml: base: key 'n': expected an integer"),
                          (["train", "--max-steps", "abc"], "--max-steps: expected an integer, got 'abc'"),
                          (["train", "--lr", "1e-4"], "key 'lr' is now 'learning_rate'"),
                          (["train", "--method", "sft", "--eps", "0.1"], "key 'eps' is a setting of another method")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("name", ["sst2", "safety-tuned-llamas"])
def test_validation_side_is_a_fixed_disjoint_part_of_the_train_file(name, tmp_path):
    train, val = load_examples(name, "train"), load_examples(name, "validation")
    assert val and not {e.prompt for e in train} & {e.prompt for e in val}
    spec = REGISTRY[name]
    every = read_rows(spec.path("train"))
    assert len(train) + len(val) == len(every)  # nothing lost, nothing duplicated
    assert abs(len(val) / len(every) - spec.validation) < 0.02  # about the declared fraction
    assert [e.prompt for e in load_examples(name, "validation")] == [e.prompt for e in val]  # fixed, not seeded


def test_validation_suites_never_share_a_prompt_with_training_or_evaluation_data():
    from safeprobe.evaluation.suites import get_suite
    stl_train = {e.prompt for e in load_examples("safety-tuned-llamas", "train")}
    val_harmful = {e.prompt for e in get_suite("val-harmful").load()}
    assert val_harmful and not val_harmful & stl_train
    sst2_val = {e.prompt for e in get_suite("sst2-val").load()}
    assert not sst2_val & {e.prompt for e in get_suite("sst2").load()}
    assert not sst2_val & {e.prompt for e in sample(load_examples("sst2", "train"), 2000, 0)}


def test_end_of_turn_token_is_im_end_when_the_vocabulary_has_it_else_eos():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from safeprobe.data.tokenize import _end_of_turn_id
    vocab = {"<unk>": 0, "</s>": 1, "hello": 2}
    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                    unk_token="<unk>", eos_token="</s>")
    assert _end_of_turn_id(plain) == 1  # unknown token: EOS, not the unk id
    plain.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    assert _end_of_turn_id(plain) == plain.convert_tokens_to_ids("<|im_end|>") == 3


def test_a_csv_row_with_too_many_or_too_few_fields_is_counted_right(tmp_path):
    from safeprobe.data.readers import read_rows
    for body, count in (("a,b\nc,d,e\n", 3), ("a,b\nc\n", 1)):
        path = write(tmp_path / "rows.csv", "prompt,completion\n" + body)
        with pytest.raises(UserError, match=rf"rows.csv:3: row has {count} fields, header has 2$"):
            read_rows(path)


def test_the_top_level_help_does_not_load_torch():
    import subprocess
    import sys
    code = ("import sys\nfrom safeprobe.cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: safeprobe" in out and out.strip().endswith("False")


# -- training order --------------------------------------------------------------------------------------------------
def _runs(kinds: list[str]) -> int:
    """The longest run of consecutive equal kinds."""
    longest = current = 1
    for before, after in zip(kinds, kinds[1:]):
        current = current + 1 if after == before else 1
        longest = max(longest, current)
    return longest


def test_length_grouped_batches_keep_lengths_close_and_interleave_the_kinds():
    """Long and short examples (the alignment's refusals and self-answers) in batches of similar length whose kinds
    alternate at random, where transformers' sampler gives blocks of one kind (the failure this sampler fixes)."""
    import random

    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from safeprobe.data.sampling import LengthGroupedBatches
    rng = random.Random(0)
    lengths = [rng.randint(90, 160) for _ in range(400)] + [rng.randint(20, 60) for _ in range(560)]
    rng.shuffle(lengths)
    order = list(LengthGroupedBatches(lengths, 8, seed=42))
    assert sorted(order) == list(range(len(lengths)))
    batches = [order[i:i + 8] for i in range(0, len(order), 8)]
    kinds = ["long" if lengths[b[0]] >= 90 else "short" for b in batches]
    padded = sum(8 * max(lengths[i] for i in b) for b in batches) / sum(lengths)
    assert padded < 1.1  # random batches of this mix pad to 1.9x
    assert _runs(kinds) <= 8
    torch.manual_seed(0)
    blocks = get_length_grouped_indices(lengths, 8)
    assert _runs(["long" if lengths[blocks[i]] >= 90 else "short" for i in range(0, len(blocks), 8)]) >= 10


def test_length_grouped_batches_are_seeded_per_epoch_and_keep_a_short_batch_last():
    from safeprobe.data.sampling import LengthGroupedBatches
    lengths = list(range(1, 31))  # 30 examples in batches of 4: seven full batches and one of 2
    sampler = LengthGroupedBatches(lengths, 4, seed=3, pool=2)
    first = list(sampler)
    assert first == list(LengthGroupedBatches(lengths, 4, seed=3, pool=2))  # a resumed run: the same order
    assert len(set(first[-2:]) & set(first[:-2])) == 0 and sorted(first) == list(range(30))
    assert all(len({lengths[i] for i in first[k:k + 4]}) == 4 for k in range(0, 28, 4))
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(30))
    with pytest.raises(ValueError):
        LengthGroupedBatches(lengths, 0, seed=3)
