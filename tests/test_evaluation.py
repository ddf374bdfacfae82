"""Held-out evaluation end to end with a scripted sampler: which responses `evaluate` asks for,
how they are judged (correctness only, whatever the training reward), and avg@k / pass@k /
greedy accuracy / sampling entropy by hand. (`sampled_metrics` alone: tests/test_analyze.py.)"""

import math
import types

import jax
import numpy as np
import pytest

from jaxcov import evaluation
from jaxcov.config import load_config
from jaxcov.data import PromptDataset

RIGHT, WRONG, NONE = "right", "wrong", "none"
# Problem p asks for 6 (p + 1); its prompt is [p]. Problem 3 is past train.eval_examples.
SAMPLED = [[RIGHT, WRONG, RIGHT, RIGHT], [WRONG, WRONG, NONE, WRONG], [RIGHT, NONE, WRONG, WRONG],
           [RIGHT] * 4]
GREEDY = [WRONG, RIGHT, RIGHT, WRONG]
WIDTH = 24  # response columns; the texts are shorter, the rest is padding


def response_text(problem, kind):
    answer = 6 * (problem + 1)
    return {RIGHT: f"so it is \\boxed{{{answer}}}", WRONG: f"\\boxed{{{answer + 1}}}",
            NONE: "I do not know"}[kind]


class CharTokenizer:
    def batch_decode(self, rows, skip_special_tokens):
        return ["".join(map(chr, row)) for row in rows]


class ScriptedSampler:
    """Stands in for `jaxcov.sampler.generate`: the scripted responses of each prompt, with
    sampling log-prob -1 on every token of the first chunk's samples and -2 after it (-9 on
    padding, -5 for greedy rows: neither may enter the entropy)."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, prompts, key, sampler_config, n, params, prompt_width):
        greedy = sampler_config.temperature == 0
        self.calls.append((tuple(p[0] for p in prompts), sampler_config.temperature, n,
                           prompt_width, params, tuple(np.asarray(jax.random.key_data(key)))))
        texts = [response_text(p[0], GREEDY[p[0]] if greedy else SAMPLED[p[0]][j])
                 for p in prompts for j in range(n)]
        ids = np.zeros((len(texts), WIDTH), np.int32)
        mask = np.zeros((len(texts), WIDTH), bool)
        for row, text in enumerate(texts):
            ids[row, :len(text)] = [ord(c) for c in text]
            mask[row, :len(text)] = True
        value = -5.0 if greedy else (-1.0 if len(self.calls) <= 2 else -2.0)
        return types.SimpleNamespace(response_ids=ids, response_mask=mask,
                                     sample_logprobs=np.where(mask, value, -9.0))


@pytest.fixture
def scripted(monkeypatch):
    sampler = ScriptedSampler()
    monkeypatch.setattr(evaluation, "generate", sampler)
    return sampler


def _config(**train):
    # A training reward that would score every answer differently (format and custom terms,
    # -1 for wrong): evaluation must judge correctness alone.
    overrides = ["reward.correct_weight=0.3", "reward.incorrect_value=-1.0",
                 "reward.format_weight=0.5",
                 "reward.custom_fn=tests.reward_fixtures:distinct_characters",
                 "train.eval_samples=4", "train.eval_temperature=0.7", "train.eval_batch_prompts=2",
                 "train.eval_examples=3", "train.prompts_per_step=8", "train.mini_batch_prompts=8"]
    return load_config(None, overrides + [f"train.{k}={v}" for k, v in train.items()])


DATASET = PromptDataset("held-out", [{"prompt_ids": [p], "ground_truth": str(6 * (p + 1)),
                                      "task": "times_table"} for p in range(4)], {})


def test_evaluate_metrics_by_hand(scripted):
    key = jax.random.key(11)
    metrics = evaluation.evaluate(types.SimpleNamespace(tokenizer=CharTokenizer()), "params",
                                  DATASET, _config(), key, prompt_width=16)
    # Two chunks of the first 3 problems ([0, 1], [2]), each greedy then 4 samples at T = 0.7,
    # both with the chunk's key, prompts padded to the given width.
    chunk_keys = [tuple(np.asarray(jax.random.key_data(jax.random.fold_in(key, i))))
                  for i in (0, 0, 1, 1)]
    assert [c[:4] for c in scripted.calls] == [((0, 1), 0.0, 1, 16), ((0, 1), 0.7, 4, 16),
                                               ((2,), 0.0, 1, 16), ((2,), 0.7, 4, 16)]
    assert [c[4] for c in scripted.calls] == ["params"] * 4
    assert [c[5] for c in scripted.calls] == chunk_keys
    # Per problem 3/4, 0, 1/4 correct: avg@4 = 1/3, SD of (3/4, 0, 1/4) = sqrt(21)/12, so the
    # standard error is sqrt(7)/12; 2 of 3 problems solved at least once; greedy right on 1, 2.
    tokens_first = sum(len(response_text(p, k)) for p in (0, 1) for k in SAMPLED[p])
    tokens_second = sum(len(response_text(2, k)) for k in SAMPLED[2])
    assert metrics == pytest.approx({
        "eval/greedy_acc": 2 / 3, "eval/avg@4": 1 / 3, "eval/avg@4_se": math.sqrt(7) / 12,
        "eval/pass@4": 2 / 3, "eval/examples": 3,
        "eval/sample_entropy": (tokens_first + 2 * tokens_second) / (tokens_first + tokens_second),
    })


def test_evaluate_without_greedy_and_over_all_examples(scripted):
    metrics = evaluation.evaluate(types.SimpleNamespace(tokenizer=CharTokenizer()), None,
                                  DATASET, _config(eval_greedy=False, eval_examples=0,
                                                   eval_batch_prompts=0),
                                  jax.random.key(0))
    # One chunk of all 4 problems (eval_batch_prompts 0: prompts_per_step = 8); problem 3 is
    # always right: per problem 3/4, 0, 1/4, 1.
    assert [c[:4] for c in scripted.calls] == [((0, 1, 2, 3), 0.7, 4, None)]
    per_problem = np.array([0.75, 0.0, 0.25, 1.0])
    assert metrics == pytest.approx({
        "eval/avg@4": 0.5, "eval/avg@4_se": per_problem.std(ddof=1) / 2, "eval/pass@4": 0.75,
        "eval/examples": 4, "eval/sample_entropy": 1.0})
