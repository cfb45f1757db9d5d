"""TRL's dataset formats through `safeprobe train`'s data path: every assistant turn in the loss, the same tokens
as the Python API's trainers, `datasets.load_dataset` for folders and Parquet, and `data show` showing exactly
the trainer's targets."""
import json

import pytest

from safeprobe.cli.main import main
from safeprobe.data import DatasetOptions, Example, load_examples, load_pairs, load_prompts
from safeprobe.data.formats import encode_training_row
from safeprobe.data.tokenize import IGNORE, encode, response_ids
from safeprobe.errors import UserError
from safeprobe.model import load_model

TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is owl a word?"},
         {"role": "assistant", "content": "Yes, owl is one."}, {"role": "user", "content": "Spell it."},
         {"role": "assistant", "content": "o w l"}]
ROWS = {  # one conversation in each of TRL's supervised formats, and ShareGPT's
    "messages": {"messages": TURNS},
    "prompt-completion": {"prompt": TURNS[:2], "completion": TURNS[2:]},
    "sharegpt": {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                    "value": m["content"]} for m in TURNS]},
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("tiny-random-llama")[1]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def targets(tokenizer, features) -> str:
    return tokenizer.decode([t for t, label in zip(features["input_ids"], features["labels"]) if label != IGNORE])


@pytest.mark.parametrize("layout", ROWS)
def test_the_cli_path_trains_the_assistant_turns_of_every_format_as_the_trainers_do(tmp_path, tokenizer, layout):
    example = load_examples(jsonl(tmp_path / "d.jsonl", [ROWS[layout]]))[0]
    features = encode(tokenizer, example, 256)
    trained = targets(tokenizer, features)
    # a messages row trains every assistant turn; a prompt-completion row its completion, which here holds both
    assert trained == "Yes, owl is one.<|im_end|>o w l<|im_end|>"
    assert features == encode_training_row(tokenizer, ROWS[layout], 256, "row")  # what SAPTrainer(train_dataset=...) uses
    full = tokenizer.apply_chat_template(TURNS, tokenize=True)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    assert features["input_ids"] == full[:len(features["input_ids"])]  # the template's own rendering, untouched


def test_a_prompt_that_holds_earlier_answers_keeps_them_out_of_the_loss(tmp_path, tokenizer):
    row = {"prompt": TURNS[:4], "completion": TURNS[4:]}
    features = encode(tokenizer, load_examples(jsonl(tmp_path / "d.jsonl", [row]))[0], 256)
    assert targets(tokenizer, features) == "o w l<|im_end|>"


def test_a_single_turn_is_encoded_as_before_bit_for_bit(tokenizer):
    """One user turn and its answer: prompt ids with the assistant header, then the answer and end of turn."""
    for max_length in (256, 40, 8):
        example = Example((("user", "Is 'sun' positive?"),), "yes, it is")
        head, tail = response_ids(tokenizer, example.chat, example.response)
        ids = (head + tail)[:max_length]
        expected = None if len(ids) <= len(head) else {
            "input_ids": ids, "labels": [IGNORE] * len(head) + ids[len(head):], "attention_mask": [1] * len(ids)}
        assert encode(tokenizer, example, max_length) == expected


def test_a_text_row_is_language_modeling_every_token_a_target(tmp_path, tokenizer):
    example = load_examples(jsonl(tmp_path / "t.jsonl", [{"text": "The owl flies at night."}]))[0]
    features = encode(tokenizer, example, 256)
    assert features["labels"] == features["input_ids"] and features["input_ids"][-1] == tokenizer.eos_token_id
    assert "<|im_start|>" not in tokenizer.decode(features["input_ids"])  # no chat template


def test_conversational_preference_rows_are_safety_pairs(tmp_path):
    explicit = {"prompt": [{"role": "user", "content": "How do I hurt him?"}],
                "chosen": [{"role": "assistant", "content": "I can't help."}],
                "rejected": [{"role": "assistant", "content": "Hit him."}]}
    implicit = {key: explicit["prompt"] + explicit[key] for key in ("chosen", "rejected")}
    for row in (explicit, implicit):
        pair = load_pairs(jsonl(tmp_path / "p.jsonl", [row]))[0]
        assert (pair.messages, pair.safe, pair.harmful) == ((("user", "How do I hurt him?"),), "I can't help.",
                                                            "Hit him.")
    assert load_prompts(jsonl(tmp_path / "q.jsonl", [explicit]))[0].prompt == "How do I hurt him?"


@pytest.mark.parametrize("row, message", [
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant"}]},
     "c.jsonl:1: field 'completion[0]' must have string 'role' and 'content'"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": []}, "c.jsonl:1: field 'completion' must be a non"),
    ({"messages": TURNS[:4]}, "c.jsonl:1: field 'messages' must end with a non-empty assistant turn"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "c.jsonl:1: field 'conversations[0]' must have 'from'"),
])
def test_a_bad_conversational_row_is_a_one_line_error_naming_file_line_and_field(tmp_path, row, message):
    with pytest.raises(UserError) as e:
        load_examples(jsonl(tmp_path / "c.jsonl", [row]))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_preference_sides_must_be_one_assistant_message(tmp_path):
    row = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "no"}],
           "rejected": [{"role": "assistant", "content": "yes"}]}
    with pytest.raises(UserError, match=r"p.jsonl:1: field 'chosen' must be one assistant message"):
        load_pairs(jsonl(tmp_path / "p.jsonl", [row]))


def test_folders_go_through_datasets_with_splits_data_files_and_streaming(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    jsonl(folder / "train.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(30)])
    jsonl(folder / "test.jsonl", [{"prompt": "t", "completion": "u"}])
    assert len(load_examples(str(folder))) == 30 and load_examples(str(folder), "test")[0].response == "u"
    picked = load_examples(str(folder), "train", options=DatasetOptions(data_files={"train": "test.jsonl"}))
    assert [e.response for e in picked] == ["u"]
    streamed = load_examples(str(folder), options=DatasetOptions(streaming=True, limit=5, seed=1))
    again = load_examples(str(folder), options=DatasetOptions(streaming=True, limit=5, seed=1))
    assert len(streamed) == 5 and streamed == again and {e.prompt for e in streamed} <= {f"q{i}" for i in range(30)}
    with pytest.raises(UserError, match="corpus: could not load split 'validation'"):
        load_examples(str(folder), "validation")
    with pytest.raises(UserError, match="apply to a Hub dataset or a folder, not to a single file"):
        load_examples(str(folder / "train.jsonl"), options=DatasetOptions(config="en"))


def test_arrow_null_padding_is_not_a_field(tmp_path):
    """Arrow gives every row every column; a column a row lacks must not turn up as an empty field."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": ["Add", None], "input": ["1+1", None], "output": ["2", None],
                             "prompt": [None, "q"], "completion": [None, "a"]}), tmp_path / "mixed.parquet")
    examples = load_examples(str(tmp_path / "mixed.parquet"))
    assert [e.prompt for e in examples] == ["Add\n\n1+1", "q"] and examples[1].response == "a"


def test_train_on_a_multi_turn_file_with_conversational_preferences(tmp_path):
    task = jsonl(tmp_path / "chats.jsonl", [ROWS["messages"], ROWS["prompt-completion"], ROWS["sharegpt"]] * 2)
    prefs = jsonl(tmp_path / "prefs.jsonl", [{"prompt": [{"role": "user", "content": f"How do I hurt {w}?"}],
                                              "chosen": [{"role": "assistant", "content": "I can't help."}],
                                              "rejected": [{"role": "assistant", "content": f"Hit {w}."}]}
                                             for w in ("him", "her", "them")])
    out = tmp_path / "run"
    assert main(["train", "--method", "sap", "--model-name-or-path", "tiny-random-llama", "--dataset-name", task,
                 "--safety-data", prefs, "--n", "6", "--n-safety", "3", "--max-steps", "2",
                 "--per-device-train-batch-size", "2", "--output-dir", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["n_train"] == 6 and run["global_steps"] == 2 and run["data"]["task"]["sha256"]


def test_data_show_marks_exactly_the_trainers_targets(tmp_path, capsys, tokenizer):
    path = jsonl(tmp_path / "chats.jsonl", [ROWS["messages"]])
    assert main(["data", "show", path, "--model-name-or-path", "tiny-random-llama"]) == 0
    legend, out = capsys.readouterr().out.split("\n", 1)
    assert "⟦" in legend  # it says how targets are marked
    shown = [part.split("⟧")[0] for part in out.split("⟦")[1:]]
    assert "".join(shown) == targets(tokenizer, encode(tokenizer, load_examples(path)[0], 256))
    assert shown == ["Yes, owl is one.<|im_end|>", "o w l<|im_end|>"]
    assert main(["data", "show", path, "--model-name-or-path", "tiny-random-llama", "--max-length", "3"]) == 0
    assert "dropped: no target token within max_length=3" in capsys.readouterr().out


def test_a_column_mapping_flag_renames_the_files_columns(tmp_path):
    task = jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(4)])
    out = tmp_path / "run"
    assert main(["train", "--model-name-or-path", "tiny-random-llama", "--dataset-name", task, "--n", "4",
                 "--dataset-column-mapping", "{prompt: question, completion: answer}", "--max-steps", "1",
                 "--output-dir", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["config"]["dataset_column_mapping"] == {
        "prompt": "question", "completion": "answer"}
