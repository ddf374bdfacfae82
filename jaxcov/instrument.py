"""The exact entropy instrument: what a step's updates did to the policy's entropy, measured and
predicted at every response position, and which positions the change sits at
(`train.entropy_instrument`).

The paper's lemma holds to first order for any optimizer (Adam included): with z the logits
over the whole vocabulary and dz = z_k+1 - z_k at one position,

    H(pi_k+1) - H(pi_k) = -Cov_{pi_k}(log pi_k, dz) + O(dz^2)
                        = -Cov_{pi_mid}(log pi_mid, dz) + O(dz^3),  pi_mid = softmax(z_k + dz/2)

(`models.logprobs.token_entropy_change` computes both from the two parameter sets). Metrics,
means over the instrument's response tokens:

  entropy/before, entropy/after, entropy/measured_dH   H(pi_k), H(pi_k+1) and their difference
  entropy/dH_first_order, entropy/dH_midpoint           the two predictions
  entropy/pred_dH_pg                                    -sum(lr) x Cov(log pi, pi A): the vanilla
                                                        policy-gradient form (`entropy/pred_dH` is
                                                        the natural-gradient form, per update)
  entropy/dH_share_selected                             share of the summed measured dH at the
                                                        positions Clip-Cov / KL-Cov select on the
                                                        step batch (ppo_clip: KL-Cov's would-be
                                                        selection, kl_cov_ratio)
  entropy/dH_share_top0.2pct, entropy/dH_share_top2pct  the same at the top 0.2% / 2% of positions
                                                        by Cov(log pi, A)

Selections use the step batch's log-probs before the updates (`old_logp_bt`). A random
TOKEN_SAMPLE response positions per step (measured, first-order, midpoint) go to
`run_dir/entropy_tokens.jsonl`, for `jaxcov analyze`'s per-token comparison.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxcov import compiles
from jaxcov.config import AlgoConfig
from jaxcov.entropy import (fraction_count, largest_k_mask, masked_mean, masked_sum,
                            token_covariance, valid_token_count)
from jaxcov.losses import TOKEN_SELECTORS, select_kl_cov
from jaxcov.models.logprobs import EntropyChange, token_entropy_change
from jaxcov.update import merge_micro_batches, split_micro_batches

TOP_SHARES = {"top0.2pct": 2e-3, "top2pct": 2e-2}
TOKEN_SAMPLE = 64
TOKENS_FILE = "entropy_tokens.jsonl"


def entropy_change_function(cfg, mesh, chunk: int, micro_rows: int, compiler_options=None):
    """Jitted (params_before, params_after, tokens_bt, mask_bt) -> EntropyChange [B, T], run
    `micro_rows` rows at a time (as scoring), so it never holds more than a micro-batch."""
    def change(before, after, tokens_bt, attention_mask_bt):
        run = lambda tokens, mask: token_entropy_change(  # noqa: E731
            before, after, cfg, tokens, mask, mesh=mesh, chunk=chunk)
        rows = tokens_bt.shape[0]
        if rows <= micro_rows or rows % micro_rows:
            return run(tokens_bt, attention_mask_bt)
        micro = split_micro_batches((tokens_bt, attention_mask_bt), rows // micro_rows, mesh)
        return merge_micro_batches(jax.lax.map(lambda x: run(*x), micro))
    shape = lambda before, after, tokens_bt, mask_bt: f"tokens {list(tokens_bt.shape)}"  # noqa
    return jax.jit(compiles.counted("entropy", change, shape), compiler_options=compiler_options)


def _share(dH_bt, at_bt, total):
    return masked_sum(dH_bt, at_bt) / jnp.where(total == 0, 1.0, total)


def dH_shares(dH_bt, logp_bt, advantages_bt, mask_bt, key, algo: AlgoConfig) -> dict:
    """Share of the summed measured dH at the selected and the top-covariance positions."""
    total = masked_sum(dH_bt, mask_bt)
    cov_bt = token_covariance(logp_bt, advantages_bt, mask_bt)
    shares = {}
    for name, fraction in TOP_SHARES.items():
        k, k_max = fraction_count(fraction, valid_token_count(mask_bt), mask_bt.size)
        shares[f"entropy/dH_share_{name}"] = _share(
            dH_bt, largest_k_mask(cov_bt, mask_bt > 0, k, k_max), total)
    select = TOKEN_SELECTORS[algo.policy_loss]
    select = select_kl_cov if algo.policy_loss == "ppo_clip" else select
    selected_bt, _ = select(logp_bt, logp_bt, advantages_bt, mask_bt, key, algo)
    shares["entropy/dH_share_selected"] = _share(dH_bt, selected_bt, total)
    return shares


def token_sample(change: EntropyChange, mask_bt, key) -> dict:
    """Measured dH and both predictions at up to TOKEN_SAMPLE random response positions
    (`kept` marks the real ones when there are fewer)."""
    priority = jnp.where(mask_bt > 0, jax.random.uniform(key, mask_bt.shape), -1.0).reshape(-1)
    priority, flat = jax.lax.top_k(priority, min(TOKEN_SAMPLE, priority.shape[0]))
    at = lambda x_bt: x_bt.reshape(-1)[flat]  # noqa: E731
    return {"measured": at(change.after - change.before), "first_order": at(change.first_order),
            "midpoint": at(change.midpoint), "kept": priority >= 0}


@functools.partial(jax.jit, static_argnames=("algo",))
def entropy_change_metrics(change: EntropyChange, logp_bt, advantages_bt, mask_bt, key,
                           lr_sum, algo: AlgoConfig) -> tuple[dict, dict]:
    """The module docstring's metrics from a step's EntropyChange over its response tokens,
    and its `token_sample`."""
    dH_bt = change.after - change.before
    mean = lambda x: masked_mean(x, mask_bt)  # noqa: E731
    pg_cov = mean(token_covariance(logp_bt, jnp.exp(logp_bt) * advantages_bt, mask_bt))
    return {"entropy/before": mean(change.before), "entropy/after": mean(change.after),
            "entropy/measured_dH": mean(dH_bt),
            "entropy/dH_first_order": mean(change.first_order),
            "entropy/dH_midpoint": mean(change.midpoint),
            "entropy/pred_dH_pg": -lr_sum * pg_cov,
            **dH_shares(dH_bt, logp_bt, advantages_bt, mask_bt, key, algo)}, token_sample(
        change, mask_bt, jax.random.fold_in(key, 1))


def append_token_sample(run_dir: str, step: int, sample: dict) -> None:
    """One line of TOKENS_FILE: the step's sampled positions (host arrays)."""
    kept = np.asarray(sample["kept"])
    line = {"step": step, **{k: np.asarray(v)[kept].round(9).tolist() for k, v in sample.items()
                             if k != "kept"}}
    with open(os.path.join(run_dir, TOKENS_FILE), "a") as f:
        f.write(json.dumps(line) + "\n")


def instrument_rows(rows: int, wanted: int, key) -> Optional[jax.Array]:
    """`wanted` of the step batch's rows, drawn per step (None: all of them)."""
    if not wanted or wanted >= rows:
        return None
    return jnp.sort(jax.random.permutation(key, rows)[:wanted])
