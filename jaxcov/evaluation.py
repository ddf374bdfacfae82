"""Held-out evaluation: greedy accuracy, and avg@k / pass@k at a sampling temperature.

Correctness comes from the same verifiers as the training reward (with every other reward term
switched off), so "accuracy" means exactly what `reward/accuracy` means during training. In a
multi-process run every process samples the same chunks, scores its own part of the responses,
and returns the same metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

from jaxcov.config import ExperimentConfig, OverlongConfig
from jaxcov.data import PromptDataset, eval_batches
from jaxcov.distributed import score_batch, to_host
from jaxcov.sampler import generate


def correctness_only(config: ExperimentConfig):
    """The reward section reduced to 1 for a correct answer and 0 otherwise."""
    return dataclasses.replace(config.reward, correct_weight=1.0, incorrect_value=0.0,
                               format_weight=0.0, overlong=OverlongConfig(), custom_fn="")


@dataclasses.dataclass
class _Samples:
    """One batch of evaluated samples."""

    correct: np.ndarray   # [examples, n] bool
    nll_sum: float        # sum of -log q(token) over the sampled tokens (q: sampling distribution)
    tokens: int


def _sample_and_score(model, params, examples, key, sampler_config, n, reward_config,
                      prompt_width=None) -> _Samples:
    rollout = generate(model, [e["prompt_ids"] for e in examples], key, sampler_config, n=n,
                       params=params, prompt_width=prompt_width)
    ids, mask = to_host(rollout.response_ids), to_host(rollout.response_mask)
    texts = model.tokenizer.batch_decode([r[m] for r, m in zip(ids, mask)],
                                         skip_special_tokens=True)
    rows = [e for e in examples for _ in range(n)]
    rewards, _ = score_batch(texts, rows, mask.sum(axis=1).tolist(), reward_config)
    nll = -float(np.sum(np.where(mask, to_host(rollout.sample_logprobs), 0.0)))
    return _Samples((rewards > 0.5).reshape(len(examples), n), nll, int(mask.sum()))


def sampled_metrics(correct: np.ndarray, nll_sum: float, tokens: int) -> dict[str, float]:
    """avg@k, its standard error over problems (a problem's k samples are correlated, so the
    problem is the unit), pass@k, and the sampling distribution's per-token entropy estimated
    by the mean -log q of the sampled tokens (the policy's entropy at temperature 1)."""
    k = correct.shape[1]
    per_problem = correct.mean(axis=1)
    se = per_problem.std(ddof=1) / np.sqrt(len(per_problem)) if len(per_problem) > 1 else 0.0
    return {f"eval/avg@{k}": float(per_problem.mean()), f"eval/avg@{k}_se": float(se),
            f"eval/pass@{k}": float(correct.any(axis=1).mean()),
            "eval/sample_entropy": nll_sum / max(tokens, 1)}


def evaluate(model, params, dataset: PromptDataset, config: ExperimentConfig, key: jax.Array,
             prompt_width: Optional[int] = None) -> dict[str, float]:
    """Greedy accuracy (with train.eval_greedy) and `sampled_metrics` (train.eval_samples per problem at
    train.eval_temperature) on (the first train.eval_examples of) `dataset`,
    train.eval_batch_prompts problems per generate call, prompts padded to `prompt_width` when
    given (`sampler.sample`)."""
    t = config.train
    examples = dataset.examples[:t.eval_examples] if t.eval_examples else dataset.examples
    subset = PromptDataset(dataset.name, examples, dataset.stats)
    reward_config = correctness_only(config)
    greedy_cfg = dataclasses.replace(config.sampler, temperature=0.0)
    sampled_cfg = dataclasses.replace(config.sampler, temperature=t.eval_temperature)
    greedy, sampled = [], []
    for i, chunk in enumerate(eval_batches(subset, t.eval_batch_prompts or t.prompts_per_step)):
        chunk_key = jax.random.fold_in(key, i)
        if t.eval_greedy:
            greedy.append(_sample_and_score(model, params, chunk, chunk_key, greedy_cfg, 1,
                                            reward_config, prompt_width).correct)
        sampled.append(_sample_and_score(model, params, chunk, chunk_key, sampled_cfg,
                                         t.eval_samples, reward_config, prompt_width))
    greedy_acc = {"eval/greedy_acc": float(np.concatenate(greedy).mean())} if greedy else {}
    return {**greedy_acc,
            **sampled_metrics(np.concatenate([s.correct for s in sampled]),
                              sum(s.nll_sum for s in sampled), sum(s.tokens for s in sampled)),
            "eval/examples": len(examples)}
