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


def _correct(model, params, examples, key, sampler_config, n, reward_config,
             prompt_width=None) -> np.ndarray:
    """[len(examples), n] bool: which samples of each example were correct."""
    rollout = generate(model, [e["prompt_ids"] for e in examples], key, sampler_config, n=n,
                       params=params, prompt_width=prompt_width)
    ids, mask = to_host(rollout.response_ids), to_host(rollout.response_mask)
    texts = model.tokenizer.batch_decode([r[m] for r, m in zip(ids, mask)],
                                         skip_special_tokens=True)
    rows = [e for e in examples for _ in range(n)]
    rewards, _ = score_batch(texts, rows, mask.sum(axis=1).tolist(), reward_config)
    return (rewards > 0.5).reshape(len(examples), n)


def evaluate(model, params, dataset: PromptDataset, config: ExperimentConfig, key: jax.Array,
             k: int = 4, temperature: float = 1.0, max_examples: int = 0,
             batch_prompts: Optional[int] = None,
             prompt_width: Optional[int] = None) -> dict[str, float]:
    """Greedy accuracy and avg@k / pass@k on (the first `max_examples` of) `dataset`, prompts
    padded to `prompt_width` when given (`sampler.sample`)."""
    examples = dataset.examples[:max_examples] if max_examples else dataset.examples
    subset = PromptDataset(dataset.name, examples, dataset.stats)
    batch_prompts = batch_prompts or config.train.prompts_per_step
    reward_config = correctness_only(config)
    greedy_cfg = dataclasses.replace(config.sampler, temperature=0.0)
    sampled_cfg = dataclasses.replace(config.sampler, temperature=temperature)
    greedy, sampled = [], []
    for i, chunk in enumerate(eval_batches(subset, batch_prompts)):
        chunk_key = jax.random.fold_in(key, i)
        greedy.append(_correct(model, params, chunk, chunk_key, greedy_cfg, 1, reward_config,
                               prompt_width))
        sampled.append(_correct(model, params, chunk, chunk_key, sampled_cfg, k, reward_config,
                                prompt_width))
    greedy, sampled = np.concatenate(greedy), np.concatenate(sampled)
    return {"eval/greedy_acc": float(greedy.mean()), f"eval/avg@{k}": float(sampled.mean()),
            f"eval/pass@{k}": float(sampled.any(axis=1).mean()), "eval/examples": len(examples)}
