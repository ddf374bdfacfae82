"""Prompt datasets: reading files or generating tasks, chat templates, held-out split, iteration.

Sources (`DataConfig.source`):
- a generated dataset by name: times_table | addition | countdown (`jaxcov.rewards.synthetic`);
- a `.jsonl` or `.parquet` file;
- a directory written by HF `datasets` `save_to_disk` (a Dataset, or a DatasetDict whose split
  `DataConfig.split` is read); its Arrow files are read with pyarrow, no `datasets` needed.

Row layouts (`DataConfig.layout`, `auto` picks per row):
- verl / DAPO: `prompt` is a list of chat messages, `reward_model.ground_truth` the answer,
  `data_source` where it came from;
- qa: `question` and `answer` columns; a row without an answer takes the last `\\boxed{}` of its
  `solution`.

Every example becomes a dict the trainer and `rewards.score_batch` use:
    prompt_ids (list[int]), prompt (templated text), messages, question, ground_truth,
    data_source, task (only when known), row (1-based row number in its source)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from jaxcov.config import ConfigError, DataConfig
from jaxcov.rewards import synthetic
from jaxcov.rewards.extract import last_boxed

logger = logging.getLogger(__name__)

_TOKENIZE_CHUNK = 1024


class DataError(ConfigError):
    """A dataset problem, in one line that names the file (and the row)."""


class BadRow(ValueError):
    """One malformed row; the loader adds the file and the row number."""


# --------------------------------------------------------------------------- reading raw rows


def read_records(path: str, split: str = "train") -> Iterator[tuple[int, Any]]:
    """Yields (1-based row number, record) from a jsonl, parquet or HF `save_to_disk` source.

    A jsonl line that is not UTF-8 or not JSON is yielded as a `BadRow` instead of a record;
    a file that cannot be read at all (e.g. a damaged parquet file) raises DataError.
    """
    if os.path.isdir(path):
        yield from enumerate(_read_hf_directory(path, split), start=1)
    elif not os.path.isfile(path):
        raise DataError(f"dataset not found: {path}")
    elif path.endswith(".jsonl"):
        yield from _read_jsonl(path)
    elif path.endswith(".parquet"):
        yield from enumerate(_read_parquet(path), start=1)
    else:
        raise DataError(f"{path}: unsupported dataset file (expected .jsonl, .parquet or a "
                        "directory saved by datasets.save_to_disk)")


def _read_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:  # decoded line by line: a non-UTF-8 line is one bad row
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield number, BadRow(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                                     f"{e.start})")
                continue
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                yield number, BadRow(f"not valid JSON ({e.msg})")


def _read_parquet(path: str) -> list:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:  # not parquet, truncated, unreadable
        raise DataError(f"{path}: cannot read it as parquet: {_first_line(e)}") from None


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _read_hf_directory(path: str, split: str) -> list:
    """Rows of a `datasets` `save_to_disk` directory (state.json + Arrow stream files)."""
    import pyarrow as pa

    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        if split not in splits:
            raise DataError(f"{path}: no split {split!r} (splits: {', '.join(splits)})")
        path = os.path.join(path, split)
    state_file = os.path.join(path, "state.json")
    if not os.path.isfile(state_file):
        raise DataError(f"{path}: not a dataset directory saved by datasets.save_to_disk "
                        "(no state.json)")
    with open(state_file) as f:
        files = [entry["filename"] for entry in json.load(f)["_data_files"]]
    rows = []
    for name in files:
        with pa.memory_map(os.path.join(path, name)) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return rows


# --------------------------------------------------------------------------- rows to examples


def _lookup(record: dict, dotted: str) -> Any:
    """record["a"]["b"] for "a.b"; None where a key is missing."""
    value: Any = record
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _ground_truth(value: Any, column: str) -> Any:
    if isinstance(value, bool) or value is None:
        raise BadRow(f"missing or empty ground truth column {column!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):  # positional: math-verify would read the e of 1e-07 as Euler's
        return np.format_float_positional(value, trim="-")
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, dict) and value:  # e.g. countdown {"target": .., "numbers": [..]}
        return value
    raise BadRow(f"missing or empty ground truth column {column!r}")


def _check_messages(messages: Any, column: str) -> list[dict]:
    if isinstance(messages, str) and messages.strip():  # a bare prompt string is one user turn
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        raise BadRow(f"column {column!r} must be a non-empty list of chat messages or a string")
    for message in messages:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise BadRow(f"column {column!r}: every message needs string 'role' and 'content'")
    if not any(m["role"] == "user" for m in messages):
        raise BadRow(f"column {column!r} has no user message")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def record_to_example(record: Any, config: DataConfig) -> dict:
    """The example of one raw record (before the chat template); raises BadRow."""
    if isinstance(record, BadRow):
        raise record
    if not isinstance(record, dict):
        raise BadRow(f"expected an object, got {type(record).__name__}")
    columns = config.columns
    layout = config.layout
    if layout == "auto":
        layout = "verl" if isinstance(_lookup(record, columns.prompt), list) else "qa"
    if layout == "verl":
        messages = _check_messages(_lookup(record, columns.prompt), columns.prompt)
        truth = _ground_truth(_lookup(record, columns.ground_truth), columns.ground_truth)
    else:
        question = _lookup(record, columns.question)
        if not isinstance(question, str) or not question.strip():
            raise BadRow(f"missing or empty question column {columns.question!r}")
        messages = [{"role": "user", "content": question}]
        truth = _qa_ground_truth(record, columns)
    example = {"messages": messages, "ground_truth": truth,
               "data_source": _lookup(record, columns.data_source) or ""}
    task = _lookup(record, columns.task) if columns.task else None
    if task:
        example["task"] = str(task)
    return example


def _qa_ground_truth(record: dict, columns) -> Any:
    answer = _lookup(record, columns.answer)
    if answer not in (None, ""):
        return _ground_truth(answer, columns.answer)
    solution = _lookup(record, columns.solution)
    boxed = last_boxed(solution) if isinstance(solution, str) else None
    if boxed is None or not boxed.strip():
        raise BadRow(f"no answer: column {columns.answer!r} is empty and column "
                     f"{columns.solution!r} has no \\boxed{{}}")
    return boxed.strip()


def read_examples(source: str, config: DataConfig) -> tuple[list[dict], dict[str, int]]:
    """Examples of a generated dataset or a file, in source order, and counts of rows and bad rows.

    Raises DataError naming the file and row for a bad row when `on_bad_row` is "error".
    """
    if source in synthetic.GENERATORS:
        return _generated_examples(source, config)
    if not os.path.exists(source):
        raise DataError(f"dataset not found: {source!r} (not a file or directory, nor one of "
                        f"the generated datasets {', '.join(synthetic.GENERATORS)})")
    examples, stats = [], {"rows": 0, "bad_rows": 0}
    for number, record in read_records(source, config.split):
        stats["rows"] += 1
        try:
            example = record_to_example(record, config)
        except BadRow as e:
            if config.on_bad_row == "error":
                raise DataError(f"{source} row {number}: {e}") from None
            stats["bad_rows"] += 1
            continue
        example["row"] = number
        examples.append(example)
    if stats["bad_rows"]:
        logger.warning("%s: skipped %d bad rows of %d", source, stats["bad_rows"], stats["rows"])
    return examples, stats


def _generated_examples(name: str, config: DataConfig) -> tuple[list[dict], dict[str, int]]:
    examples = []
    for number, row in enumerate(synthetic.generate(name, config.synthetic), start=1):
        example = {"messages": [{"role": "user", "content": row["question"]}],
                   "ground_truth": row["ground_truth"], "data_source": name,
                   "task": row["task"], "row": number}
        if "solution" in row:
            example["solution"] = row["solution"]
        examples.append(example)
    return examples, {"rows": len(examples), "bad_rows": 0}


# --------------------------------------------------------------------------- chat template


def build_messages(messages: Sequence[dict], system_prompt: Optional[str],
                   prompt_suffix: str) -> list[dict]:
    """Adds the system prompt (unless one is there) and the suffix of the last user message."""
    messages = [dict(m) for m in messages]
    if system_prompt is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last_user]["content"] += prompt_suffix
    return messages


def tokenize_examples(examples: list[dict], tokenizer, config: DataConfig) -> tuple[list, int]:
    """Adds `prompt`, `prompt_ids` and `question`; drops prompts over `max_prompt_len` tokens.

    Returns (kept examples, number dropped as too long).
    """
    kept, too_long = [], 0
    for start in range(0, len(examples), _TOKENIZE_CHUNK):
        chunk = examples[start:start + _TOKENIZE_CHUNK]
        chats = [build_messages(e["messages"], config.system_prompt, config.prompt_suffix)
                 for e in chunk]
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in chats]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for example, chat, text, prompt_ids in zip(chunk, chats, texts, ids):
            if len(prompt_ids) > config.max_prompt_len:
                too_long += 1
                continue
            question = [m["content"] for m in example["messages"] if m["role"] == "user"][-1]
            kept.append({**example, "messages": chat, "prompt": text,
                         "prompt_ids": list(prompt_ids), "question": question})
    return kept, too_long


# --------------------------------------------------------------------------- datasets


@dataclasses.dataclass
class PromptDataset:
    """Tokenized examples of one split, and what loading counted (rows, bad_rows, too_long)."""

    name: str
    examples: list[dict]
    stats: dict[str, int]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


def _held_out_split(examples: list, eval_size: int, seed: int, source: str) -> tuple[list, list]:
    """(train, held-out): a seeded choice of `eval_size` examples, both kept in source order."""
    if eval_size >= len(examples):
        raise DataError(f"{source}: eval_size={eval_size} leaves no training examples "
                        f"(the dataset has {len(examples)})")
    chosen = np.random.default_rng([seed, 1]).permutation(len(examples))[:eval_size]
    held_out = set(chosen.tolist())
    train = [e for i, e in enumerate(examples) if i not in held_out]
    return train, [e for i, e in enumerate(examples) if i in held_out]


def _finish(name: str, examples: list, stats: dict, tokenizer, config: DataConfig,
            split: str) -> PromptDataset:
    kept, too_long = tokenize_examples(examples, tokenizer, config)
    stats = {**stats, "too_long": too_long}
    if too_long:
        logger.warning("%s (%s): dropped %d prompts longer than %d tokens", name, split,
                       too_long, config.max_prompt_len)
    if not kept:
        raise DataError(f"{name}: no usable {split} examples ({stats['rows']} rows, "
                        f"{stats['bad_rows']} bad, {too_long} longer than max_prompt_len="
                        f"{config.max_prompt_len} tokens)")
    return PromptDataset(name, kept, stats)


def check_dataset_sources(config: DataConfig) -> None:
    """Reads the dataset files once without a tokenizer: a missing or unreadable file or a bad
    row is a DataError before the model loads (generated datasets cannot be bad)."""
    for source in filter(None, (config.source, config.eval_source)):
        if source not in synthetic.GENERATORS:
            read_examples(source, config)


def load_datasets(config: DataConfig, tokenizer) -> tuple[PromptDataset, Optional[PromptDataset]]:
    """The training dataset and the held-out one (None when neither eval option is set).

    Args:
      config: the `data` section.
      tokenizer: a transformers tokenizer with a chat template (`models.registry.load_tokenizer`).
    """
    examples, stats = read_examples(config.source, config)
    held_out, eval_stats = None, None
    if config.eval_source:
        held_out, eval_stats = read_examples(config.eval_source, config)
    elif config.eval_size:
        examples, held_out = _held_out_split(examples, config.eval_size, config.seed,
                                             config.source)
        eval_stats = {"rows": len(held_out), "bad_rows": 0}
    train = _finish(config.source, examples, stats, tokenizer, config, "train")
    if held_out is None:
        return train, None
    eval_name = config.eval_source or config.source
    return train, _finish(eval_name, held_out, eval_stats, tokenizer, config, "eval")


# --------------------------------------------------------------------------- iteration


class PromptIterator:
    """Endless batches of examples: seeded shuffle per epoch, resumable position.

    The order of epoch e is a permutation drawn from (seed, e) alone, so `state_dict()` —
    {"epoch": e, "index": i} — is all a resumed run needs to see exactly the same prompts.
    A batch that runs past the end of an epoch continues with the next one.
    """

    def __init__(self, dataset: PromptDataset, batch_size: int, seed: int = 0,
                 shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0
        self._order_epoch, self._order = -1, np.arange(0)

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            n = len(self.dataset)
            self._order = (np.random.default_rng([self.seed, self.epoch]).permutation(n)
                           if self.shuffle else np.arange(n))
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> list[dict]:
        """The next `batch_size` examples."""
        batch = []
        while len(batch) < self.batch_size:
            order = self._epoch_order()
            take = min(self.batch_size - len(batch), len(order) - self.index)
            batch.extend(self.dataset[int(j)] for j in order[self.index:self.index + take])
            self.index += take
            if self.index == len(order):
                self.epoch, self.index = self.epoch + 1, 0
        return batch

    def __iter__(self) -> "PromptIterator":
        return self

    def __next__(self) -> list[dict]:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """The position: the next batch starts at `index` of the order of `epoch`."""
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        """Restores a position saved by `state_dict`."""
        epoch, index = state.get("epoch"), state.get("index")
        if not (isinstance(epoch, int) and isinstance(index, int)
                and epoch >= 0 and 0 <= index < len(self.dataset)):
            raise DataError(f"data position {state!r} does not fit a dataset of "
                            f"{len(self.dataset)} examples")
        self.epoch, self.index = epoch, index


def eval_batches(dataset: PromptDataset, batch_size: int) -> Iterator[list[dict]]:
    """The held-out examples in order, in batches (the last one may be smaller)."""
    for start in range(0, len(dataset), batch_size):
        yield dataset.examples[start:start + batch_size]
