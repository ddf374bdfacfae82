"""Token selection and policy-loss cost: how Clip-Cov / KL-Cov compare with plain PPO.

    python bench/bench_losses.py [--tokens 1000000 --repeats 10 --devices 1]

1. Selection alone on N scores: the mask of the k largest eligible scores, k traced and
   k <= k_max static, as Clip-Cov (k = 2e-4 N, over random priorities) and KL-Cov (k = 2e-3 N,
   over covariances) need it. Methods, all under jit, same inputs:
     top_k          lax.top_k(scores, k_max) + scatter of the first k        (exact)
     approx_max_k   lax.approx_max_k(scores, k_max, recall 0.95) + scatter  (approximate)
     sort           full sort, threshold = k-th largest, mask = scores >= threshold
                    (more than k when the threshold value is tied)
     radix_select   bisection on the bits of the float keys and then of the index: 32 + log2 N
                    global counts, no sort and no gather                    (exact)
   `exact` says whether the mask equals the reference (lax.top_k's) mask.
2. Loss + gradient w.r.t. the log-probs on a synthetic token batch (rows x steps = N): the
   selection pass (covariances, pick) plus value_and_grad of the loss, per policy loss, with
   the ratio to ppo_clip measured in the same run; "+metrics" also returns every metric
   (covariance statistics with their top-k), as the policy update does.

With --devices D > 1 the scores are sharded over D simulated CPU devices (run as a fresh process:
the flag has to be set before JAX starts).
"""

import argparse
import os
import sys
import time


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=4096, help="tokens per row in part 2")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--devices", type=int, default=1)
    return parser.parse_args()


ARGS = parse_args()
if ARGS.devices > 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={ARGS.devices}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from jaxcov.config import AlgoConfig  # noqa: E402
from jaxcov.entropy import fraction_count, largest_k_mask, radix_select_mask  # noqa: E402
from jaxcov.losses import batch_loss  # noqa: E402


def best_time(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


# ----------------------------------------------------------------------------- selection methods


def via_top_k(scores_n, eligible_n, k, k_max):
    return largest_k_mask(scores_n, eligible_n, k, k_max)


def via_approx_max_k(scores_n, eligible_n, k, k_max):
    flat = jnp.where(eligible_n, scores_n, -jnp.inf)
    _, index_k = jax.lax.approx_max_k(flat, k_max, recall_target=0.95)
    keep_k = (jnp.arange(k_max) < k) & eligible_n[index_k]
    return jnp.zeros(flat.shape, bool).at[index_k].set(keep_k)


def via_sort(scores_n, eligible_n, k, k_max):
    del k_max
    flat = jnp.where(eligible_n, scores_n, -jnp.inf)
    threshold = jnp.sort(flat)[flat.shape[0] - k]
    return eligible_n & (flat >= threshold)


def via_radix_select(scores_n, eligible_n, k, k_max):
    del k_max
    return radix_select_mask(scores_n, eligible_n, k)


METHODS = {"top_k": via_top_k, "approx_max_k": via_approx_max_k, "sort": via_sort,
           "radix_select": via_radix_select}


def bench_selection(n, repeats, sharding):
    rows = []
    rng = np.random.default_rng(0)
    # Covariance-like scores with ties (repeated values) as real batches have them.
    scores = np.round(rng.standard_t(3, n).astype(np.float32), 3)
    eligible = rng.uniform(size=n) < 0.9
    scores, eligible = jax.device_put((scores, eligible), sharding)
    for label, ratio in (("clip_cov k=2e-4 N", 2e-4), ("kl_cov k=2e-3 N", 2e-3)):
        k_static = max(1, int(ratio * int(eligible.sum())))
        reference = None
        for name, method in METHODS.items():
            fn = jax.jit(lambda s, e, method=method, ratio=ratio: method(
                s, e, *fraction_count(ratio, jnp.sum(e.astype(jnp.int32)), n)))
            seconds = best_time(fn, scores, eligible, repeats=repeats)
            mask = np.asarray(fn(scores, eligible))
            reference = mask if reference is None else reference
            exact = bool(np.array_equal(mask, reference))
            rows.append((label, name, seconds, int(mask.sum()), k_static, exact))
    return rows


def bench_losses(n, steps, repeats, sharding):
    devices = len(sharding.mesh.devices.flat)
    rows_b = max(1, n // steps // devices) * devices
    rng = np.random.default_rng(1)
    logp = -np.abs(rng.normal(1.0, 1.5, (rows_b, steps))).astype(np.float32)
    old = (logp + rng.normal(0, 0.1, logp.shape)).astype(np.float32)
    adv = np.repeat(rng.normal(0, 1, (rows_b, 1)), steps, 1).astype(np.float32)
    mask = (np.arange(steps)[None] < rng.integers(steps // 4, steps + 1, (rows_b, 1)))
    arrays = jax.device_put(tuple(x for x in (logp, old, adv, mask.astype(np.float32))), sharding)
    key = jax.random.key(0)
    results = []
    for name in ("ppo_clip", "clip_cov", "kl_cov"):
        algo = dataclasses.replace(AlgoConfig(), policy_loss=name)
        loss_fn = lambda lp, o, a, m, algo=algo: batch_loss(lp, o, a, m, key, algo)  # noqa: E731
        # Without the metrics XLA drops the covariance statistics that only feed them.
        bare = jax.jit(jax.value_and_grad(lambda *xs: loss_fn(*xs)[0]))
        full = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        results.append((name, best_time(bare, *arrays, repeats=repeats),
                        best_time(full, *arrays, repeats=repeats)))
    return rows_b, results


def main():
    n = ARGS.tokens
    devices = jax.devices()[:ARGS.devices]
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    flat_sharding = NamedSharding(mesh, PartitionSpec("data"))
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {len(devices)} device(s), "
          f"N = {n:,} tokens, median of {ARGS.repeats}")
    print("\n1. selection: mask of the k largest eligible scores")
    print(f"{'case':<20} {'method':<14} {'ms':>9} {'vs top_k':>9} {'picked':>8} {'k':>7}  exact")
    rows = bench_selection(n, ARGS.repeats, flat_sharding)
    base = {label: s for label, name, s, *_ in rows if name == "top_k"}
    for label, name, seconds, picked, k, exact in rows:
        print(f"{label:<20} {name:<14} {seconds * 1e3:9.2f} {seconds / base[label]:8.2f}x "
              f"{picked:8d} {k:7d}  {exact}")
    rows_b, results = bench_losses(n, ARGS.steps, ARGS.repeats,
                                   NamedSharding(mesh, PartitionSpec("data", None)))
    print(f"\n2. selection pass + loss + grad w.r.t. logp, {rows_b} x {ARGS.steps} tokens, "
          "token-mean, paper ratios (clip_cov 2e-4, kl_cov 2e-3)")
    print(f"{'loss':<10} {'ms':>9} {'vs ppo_clip':>12} {'+metrics ms':>12} {'vs ppo_clip':>12}")
    for name, bare, full in results:
        print(f"{name:<10} {bare * 1e3:9.2f} {bare / results[0][1]:11.2f}x "
              f"{full * 1e3:12.2f} {full / results[0][2]:11.2f}x")


if __name__ == "__main__":
    main()
