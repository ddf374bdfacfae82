"""Prompt datasets: both layouts in jsonl, parquet and HF directories; bad rows; resumable order."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxcov.config import ColumnsConfig, DataConfig, RewardConfig, SyntheticConfig
from jaxcov.data import (DataError, PromptDataset, PromptIterator, eval_batches, load_datasets,
                         read_examples)
from jaxcov.models.registry import load_tokenizer
from jaxcov.rewards import RewardScorer

VERL_ROWS = [
    {"data_source": "math_dapo",
     "prompt": [{"role": "user", "content": f"Compute {i} + {i}."}],
     "reward_model": {"ground_truth": str(2 * i), "style": "rule"}}
    for i in range(1, 7)
]
QA_ROWS = [
    {"question": "What is 6 * 7?", "answer": "42", "solution": ""},
    {"question": "What is half of 1?", "answer": "\\frac{1}{2}", "solution": ""},
    {"question": "What is 3 + 4?", "answer": "", "solution": "3 + 4 = \\boxed{7}."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def write_hf_directory(path, rows):
    """The layout `datasets.Dataset.save_to_disk` writes (checked against datasets 5.2.0)."""
    os.makedirs(path)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(os.path.join(path, "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "x",
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
             "_output_all_columns": False, "_split": None}
    with open(os.path.join(path, "state.json"), "w") as f:
        json.dump(state, f)
    with open(os.path.join(path, "dataset_info.json"), "w") as f:
        json.dump({}, f)
    return str(path)


def write_hf_dataset_dict(path, splits):
    os.makedirs(path)
    for name, rows in splits.items():
        write_hf_directory(os.path.join(path, name), rows)
    with open(os.path.join(path, "dataset_dict.json"), "w") as f:
        json.dump({"splits": list(splits)}, f)
    return str(path)


WRITERS = {
    "jsonl": lambda tmp, rows: write_jsonl(tmp / "d.jsonl", rows),
    "parquet": lambda tmp, rows: write_parquet(tmp / "d.parquet", rows),
    "hf_dataset": lambda tmp, rows: write_hf_directory(tmp / "hf", rows),
    "hf_dataset_dict": lambda tmp, rows: write_hf_dataset_dict(
        tmp / "hfdd", {"test": rows[:1], "train": rows}),
}


def expected_prompt(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("kind", list(WRITERS))
def test_verl_layout(kind, tmp_path, tokenizer):
    source = WRITERS[kind](tmp_path, VERL_ROWS)
    config = DataConfig(source=source, system_prompt="Be brief.", prompt_suffix=" Box it.")
    train, held_out = load_datasets(config, tokenizer)
    assert held_out is None and len(train) == 6
    assert [e["ground_truth"] for e in train.examples] == ["2", "4", "6", "8", "10", "12"]
    first = train[0]
    text, ids = expected_prompt(tokenizer, [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Compute 1 + 1. Box it."}])
    assert first["prompt"] == text and first["prompt_ids"] == ids
    assert first["data_source"] == "math_dapo" and first["row"] == 1 and "task" not in first
    assert first["question"] == "Compute 1 + 1."
    assert train.stats == {"rows": 6, "bad_rows": 0, "too_long": 0}


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_qa_layout_with_answer_from_solution_box(kind, tmp_path, tokenizer):
    source = WRITERS[kind](tmp_path, QA_ROWS)
    train, _ = load_datasets(DataConfig(source=source), tokenizer)
    assert [e["ground_truth"] for e in train.examples] == ["42", "\\frac{1}{2}", "7"]
    text, ids = expected_prompt(tokenizer, [
        {"role": "user", "content": "What is 6 * 7? Put the final answer in \\boxed{}."}])
    assert train[0]["prompt"] == text and train[0]["prompt_ids"] == ids
    assert "You are a helpful AI assistant named SmolLM" in text  # the template's default system


def test_verl_layout_accepts_a_plain_string_prompt(tmp_path, tokenizer):
    rows = [{"prompt": "What is 2 + 2?", "reward_model": {"ground_truth": 4}}]
    config = DataConfig(source=write_jsonl(tmp_path / "s.jsonl", rows), layout="verl")
    train, _ = load_datasets(config, tokenizer)
    assert train[0]["question"] == "What is 2 + 2?" and train[0]["ground_truth"] == "4"


def test_column_mapping_with_nested_columns_and_task(tmp_path, tokenizer):
    rows = [{"problem": "Add 2 and 2.", "meta": {"final": 4, "kind": "addition"}},
            {"problem": "Add 3 and 3.", "meta": {"final": 6.5, "kind": "math"}},
            {"problem": "Tiny?", "meta": {"final": 1e-7, "kind": "math"}}]
    columns = ColumnsConfig(question="problem", answer="meta.final", task="meta.kind")
    config = DataConfig(source=write_jsonl(tmp_path / "m.jsonl", rows), layout="qa",
                        columns=columns)
    train, _ = load_datasets(config, tokenizer)
    assert [(e["ground_truth"], e["task"]) for e in train.examples] == [
        ("4", "addition"), ("6.5", "math"), ("0.0000001", "math")]


def test_bad_row_error_names_file_and_row(tmp_path):
    lines = [json.dumps(QA_ROWS[0]), json.dumps(QA_ROWS[1]), "{not json", json.dumps(QA_ROWS[2])]
    source = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as error:
        read_examples(source, DataConfig(source=source))
    message = str(error.value)
    assert source in message and "row 3" in message and "JSON" in message
    assert "\n" not in message


def test_bad_rows_skipped_and_counted(tmp_path, tokenizer):
    lines = [json.dumps(QA_ROWS[0]), "{not json", json.dumps({"question": "Q?"}),
             json.dumps(["a", "list"]), "", json.dumps(QA_ROWS[2])]
    source = write_jsonl(tmp_path / "bad.jsonl", lines)
    train, _ = load_datasets(DataConfig(source=source, on_bad_row="skip"), tokenizer)
    assert [e["row"] for e in train.examples] == [1, 6]  # the blank line 5 is no row
    assert train.stats == {"rows": 5, "bad_rows": 3, "too_long": 0}


def _jsonl_with_a_latin1_line(tmp_path):
    lines = [json.dumps(QA_ROWS[0]).encode(), b'{"question": "caf\xe9?", "answer": "1"}',
             json.dumps(QA_ROWS[2]).encode()]
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_non_utf8_jsonl_line_is_a_bad_row(tmp_path, tokenizer):
    source = _jsonl_with_a_latin1_line(tmp_path)
    with pytest.raises(DataError) as error:
        read_examples(source, DataConfig(source=source))
    assert str(error.value) == f"{source} row 2: not UTF-8 text (byte 0xe9 at offset 17)"
    train, _ = load_datasets(DataConfig(source=source, on_bad_row="skip"), tokenizer)
    assert [e["row"] for e in train.examples] == [1, 3]
    assert train.stats == {"rows": 3, "bad_rows": 1, "too_long": 0}


@pytest.mark.parametrize("damage", ["random_bytes", "truncated", "empty"])
def test_unreadable_parquet_names_the_file(tmp_path, damage):
    path = tmp_path / "damaged.parquet"
    whole = open(write_parquet(path, VERL_ROWS), "rb").read()
    path.write_bytes({"random_bytes": os.urandom(2000), "truncated": whole[:len(whole) // 2],
                      "empty": b""}[damage])
    with pytest.raises(DataError) as error:
        read_examples(str(path), DataConfig(source=str(path)))
    message = str(error.value)
    assert message.startswith(f"{path}: cannot read it as parquet: ") and "\n" not in message


def test_parquet_bad_row_names_column(tmp_path):
    rows = VERL_ROWS[:2] + [{"data_source": "x", "prompt": [{"role": "user", "content": "Q"}],
                             "reward_model": {"ground_truth": None, "style": "rule"}}]
    source = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(DataError, match=r"bad\.parquet row 3: .*reward_model\.ground_truth"):
        read_examples(source, DataConfig(source=source))


@pytest.mark.parametrize("messages", [[], [{"role": "system", "content": "only system"}],
                                      [{"role": "user"}], "", 42])
def test_malformed_chat_prompts_are_bad_rows(messages, tmp_path):
    row = {"prompt": messages, "reward_model": {"ground_truth": "1"}}
    source = write_jsonl(tmp_path / "p.jsonl", [VERL_ROWS[0], row])
    with pytest.raises(DataError, match="row 2"):
        read_examples(source, DataConfig(source=source, layout="verl"))


def test_missing_empty_and_unsupported_sources(tmp_path, tokenizer):
    with pytest.raises(DataError, match="dataset not found"):
        load_datasets(DataConfig(source=str(tmp_path / "nope.jsonl")), tokenizer)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match=r"empty\.jsonl: no usable train examples \(0 rows"):
        load_datasets(DataConfig(source=empty), tokenizer)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported"):
        load_datasets(DataConfig(source=str(tmp_path / "data.csv")), tokenizer)
    os.makedirs(tmp_path / "plain_dir")
    with pytest.raises(DataError, match="state.json"):
        load_datasets(DataConfig(source=str(tmp_path / "plain_dir")), tokenizer)
    dd = write_hf_dataset_dict(tmp_path / "dd", {"train": VERL_ROWS})
    with pytest.raises(DataError, match="no split 'validation'"):
        load_datasets(DataConfig(source=dd, split="validation"), tokenizer)


def test_long_prompts_are_dropped_and_counted(tmp_path, tokenizer):
    rows = [{"question": "Short?", "answer": "1"},
            {"question": "Long " * 300 + "?", "answer": "2"},
            {"question": "Also short?", "answer": "3"}]
    source = write_jsonl(tmp_path / "long.jsonl", rows)
    train, _ = load_datasets(DataConfig(source=source, max_prompt_len=64), tokenizer)
    assert [e["ground_truth"] for e in train.examples] == ["1", "3"]
    assert train.stats["too_long"] == 1
    assert all(len(e["prompt_ids"]) <= 64 for e in train.examples)
    with pytest.raises(DataError, match="3 longer than max_prompt_len=8"):
        load_datasets(DataConfig(source=source, max_prompt_len=8), tokenizer)


# --------------------------------------------------------------------------- splits and order


def test_generated_dataset_with_held_out_split(tokenizer):
    config = DataConfig(source="times_table", eval_size=21, seed=5,
                        synthetic=SyntheticConfig(size=1000, max_factor=12))
    train, held_out = load_datasets(config, tokenizer)
    train_q = {e["question"] for e in train.examples}
    eval_q = {e["question"] for e in held_out.examples}
    assert len(train) == 100 and len(held_out) == 21 and not train_q & eval_q
    assert all(e["task"] == "times_table" for e in train.examples)
    again, held_again = load_datasets(config, tokenizer)
    assert [e["question"] for e in held_again.examples] == [e["question"]
                                                           for e in held_out.examples]
    _, other = load_datasets(DataConfig(source="times_table", eval_size=21, seed=6,
                                        synthetic=config.synthetic), tokenizer)
    assert {e["question"] for e in other.examples} != eval_q
    with pytest.raises(DataError, match="leaves no training examples"):
        load_datasets(DataConfig(source="times_table", eval_size=121), tokenizer)


def test_separate_eval_source(tmp_path, tokenizer):
    config = DataConfig(source=WRITERS["parquet"](tmp_path, VERL_ROWS),
                        eval_source=write_jsonl(tmp_path / "eval.jsonl", QA_ROWS))
    train, held_out = load_datasets(config, tokenizer)
    assert len(train) == 6 and [e["ground_truth"] for e in held_out.examples] == [
        "42", "\\frac{1}{2}", "7"]
    assert [len(b) for b in eval_batches(held_out, 2)] == [2, 1]


def _dataset(n):
    return PromptDataset("toy", [{"question": str(i)} for i in range(n)], {})


def _ids(batch):
    return [int(e["question"]) for e in batch]


def test_iterator_epochs_are_seeded_permutations():
    iterator = PromptIterator(_dataset(10), batch_size=5, seed=3)
    epochs = [_ids(iterator.next_batch()) + _ids(iterator.next_batch()) for _ in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert iterator.state_dict() == {"epoch": 3, "index": 0}
    same = PromptIterator(_dataset(10), batch_size=10, seed=3)
    assert _ids(same.next_batch()) == epochs[0]  # the order does not depend on the batch size
    other = PromptIterator(_dataset(10), batch_size=10, seed=4)
    assert _ids(other.next_batch()) != epochs[0]
    plain = PromptIterator(_dataset(10), batch_size=4, shuffle=False)
    assert [_ids(plain.next_batch()) for _ in range(3)] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


def test_resumed_iterator_sees_the_same_next_batches():
    iterator = PromptIterator(_dataset(7), batch_size=3, seed=11)
    for _ in range(3):  # 9 examples: the third batch crosses into epoch 1
        iterator.next_batch()
    state = json.loads(json.dumps(iterator.state_dict()))  # as a checkpoint would store it
    assert state == {"epoch": 1, "index": 2}
    expected = [_ids(iterator.next_batch()) for _ in range(4)]
    resumed = PromptIterator(_dataset(7), batch_size=3, seed=11)
    resumed.load_state_dict(state)
    assert [_ids(resumed.next_batch()) for _ in range(4)] == expected
    fresh = PromptIterator(_dataset(7), batch_size=3, seed=11)
    assert _ids(fresh.next_batch()) != expected[0]


def test_bad_positions_are_refused():
    iterator = PromptIterator(_dataset(5), batch_size=2)
    for state in ({"epoch": 0, "index": 5}, {"epoch": -1, "index": 0}, {"index": 1}):
        with pytest.raises(DataError, match="does not fit"):
            iterator.load_state_dict(state)


def test_generated_examples_score_with_their_own_tasks(tokenizer):
    # The ground truth each generator writes is what the verifier accepts, end to end.
    synthetic = SyntheticConfig(size=30, seed=2)
    rows = []
    for name in ("times_table", "addition", "countdown"):
        train, _ = load_datasets(DataConfig(source=name, synthetic=synthetic), tokenizer)
        rows += train.examples[:10]
    responses = ["\\boxed{" + (r["solution"] if r["task"] == "countdown" else r["ground_truth"])
                 + "}" for r in rows]
    with RewardScorer(RewardConfig(task="math")) as scorer:
        rewards, metrics = scorer.score(responses, rows, [5] * len(rows))
        wrong, _ = scorer.score(["\\boxed{1}"] * len(rows), rows, [5] * len(rows))
    assert rewards.tolist() == [1.0] * 30 and metrics["reward/accuracy/countdown"] == 1.0
    assert wrong.sum() == 0


def test_data_config_from_overrides():
    from jaxcov.config import ConfigError, load_config
    config = load_config(None, ["data.source=addition", "data.synthetic.digits=3",
                                "data.columns.question=problem", "data.on_bad_row=skip"])
    assert (config.data.source, config.data.synthetic.digits) == ("addition", 3)
    assert config.data.columns.question == "problem" and config.data.on_bad_row == "skip"
    with pytest.raises(ConfigError, match="data.on_bad_row: must be one of"):
        load_config(None, ["data.on_bad_row=ignore"])
    with pytest.raises(ConfigError, match="data.synthetic.max_factor: must be >= min_factor"):
        load_config(None, ["data.synthetic.min_factor=5", "data.synthetic.max_factor=3"])
