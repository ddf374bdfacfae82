"""Host-side RL batches: rollouts + rewards as numpy arrays, grouped, filtered and merged.

A `RolloutBatch` has R = groups x n rows; row r belongs to group r // n. Each row is one
sequence `prompt (left-padded to P) + response (N columns)`, so every token's log-prob, advantage
and mask sit at the same [row, column] index.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass
class RolloutBatch:
    tokens: np.ndarray          # [R, P+N] int32
    attention_mask: np.ndarray  # [R, P+N] bool: real prompt and response tokens
    response_mask: np.ndarray   # [R, P+N] bool: response tokens (stop token included)
    sampler_logp: np.ndarray    # [R, P+N] fp32: T=1 log-probs from the sampler (0 elsewhere)
    rewards: np.ndarray         # [R] fp32
    stopped: np.ndarray         # [R] bool: ended with a stop token
    examples: list              # [groups] dataset rows
    responses: list             # [R] decoded response texts
    n: int
    prompt_width: int

    @property
    def groups(self) -> int:
        return len(self.examples)

    @property
    def response_lengths(self) -> np.ndarray:
        return self.response_mask.sum(axis=1)


def from_rollout(rollout, examples: Sequence[dict], n: int, responses: Sequence[str],
                 rewards: np.ndarray) -> RolloutBatch:
    """Joins a sampler `Rollout` (device arrays) with its examples, texts and rewards."""
    prompt_ids, prompt_mask = np.asarray(rollout.prompt_ids), np.asarray(rollout.prompt_mask)
    response_ids = np.asarray(rollout.response_ids)
    response_mask = np.asarray(rollout.response_mask)
    zeros = np.zeros_like(prompt_mask)
    return RolloutBatch(
        tokens=np.concatenate([prompt_ids, response_ids], axis=1).astype(np.int32),
        attention_mask=np.concatenate([prompt_mask, response_mask], axis=1),
        response_mask=np.concatenate([zeros, response_mask], axis=1),
        sampler_logp=np.concatenate([zeros.astype(np.float32),
                                     np.asarray(rollout.policy_logprobs, np.float32)], axis=1),
        rewards=np.asarray(rewards, np.float32), stopped=np.asarray(rollout.stopped),
        examples=list(examples), responses=list(responses), n=n,
        prompt_width=prompt_ids.shape[1])


def _left_pad_columns(x: np.ndarray, width: int) -> np.ndarray:
    pad = [(0, 0), (width, 0)] + [(0, 0)] * (x.ndim - 2)
    return np.pad(x, pad)


def _widen_prompts(batch: RolloutBatch, prompt_width: int) -> RolloutBatch:
    """Left-pads the prompt part so batches with different prompt buckets can be merged."""
    extra = prompt_width - batch.prompt_width
    if extra == 0:
        return batch
    return dataclasses.replace(
        batch, prompt_width=prompt_width,
        **{f: _left_pad_columns(getattr(batch, f), extra)
           for f in ("tokens", "attention_mask", "response_mask", "sampler_logp")})


def concat(batches: Sequence[RolloutBatch]) -> RolloutBatch:
    width = max(b.prompt_width for b in batches)
    batches = [_widen_prompts(b, width) for b in batches]
    arrays = {f: np.concatenate([getattr(b, f) for b in batches]) for f in (
        "tokens", "attention_mask", "response_mask", "sampler_logp", "rewards", "stopped")}
    return RolloutBatch(**arrays, examples=[e for b in batches for e in b.examples],
                        responses=[r for b in batches for r in b.responses],
                        n=batches[0].n, prompt_width=width)


def take_groups(batch: RolloutBatch, groups: Sequence[int]) -> RolloutBatch:
    """The rows of the given groups, in that order."""
    rows = np.concatenate([np.arange(g * batch.n, (g + 1) * batch.n) for g in groups])
    arrays = {f: getattr(batch, f)[rows] for f in (
        "tokens", "attention_mask", "response_mask", "sampler_logp", "rewards", "stopped")}
    return dataclasses.replace(batch, **arrays, examples=[batch.examples[g] for g in groups],
                               responses=[batch.responses[r] for r in rows])


def informative_groups(rewards: np.ndarray, n: int) -> np.ndarray:
    """Mask of groups whose rewards are not all equal (DAPO dynamic sampling keeps these)."""
    grouped = rewards.reshape(-1, n)
    return ~np.all(grouped == grouped[:, :1], axis=1)


def fill_groups(batch: RolloutBatch, wanted: int, filter_groups: bool) -> tuple[RolloutBatch, int]:
    """Chooses `wanted` groups: informative ones first (when filtering), then the rest.

    Returns the batch and how many informative groups it holds. Groups of equal rewards carry
    zero advantage, so padding with them changes only the loss normaliser, never the direction.
    """
    informative = informative_groups(batch.rewards, batch.n)
    if not filter_groups:
        return take_groups(batch, range(wanted)), int(informative[:wanted].sum())
    order = np.concatenate([np.flatnonzero(informative), np.flatnonzero(~informative)])
    chosen = order[:wanted]
    return take_groups(batch, chosen.tolist()), int(informative[chosen].sum())
