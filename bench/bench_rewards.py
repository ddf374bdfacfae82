"""Reward scoring throughput: answers per second for a batch of typical model answers.

    python bench/bench_rewards.py [--n 1024] [--workers 1,2] [--repeats 3]

Each batch is 128 prompts x 8 samples (the ground truth repeats within a group, as in GRPO),
every response a short reasoning text ending in a boxed answer, about half of them correct
(often in another form than the ground truth: 0.5 for \\frac{1}{2}; one or two forms per group)
and half wrong (one of four wrong answers per group). Two mixes:

- `math`: 40% integer answers (decided without sympy), the rest fractions, radicals, intervals,
  sets, expressions, text (math-verify in the pool);
- `symbolic`: no integers, so every answer goes through math-verify.

The peer, measured in the same run, is the plain way: math-verify's `parse` + `verify` called
serially in the trainer process on each whole response (its own SIGALRM timeouts, main thread).
Every repeat scores a fresh batch (new seed), so no cache holds this batch's answers.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxcov.config import RewardConfig  # noqa: E402
from jaxcov.rewards import RewardScorer  # noqa: E402

FILLER = ("Let me work through this carefully. First I rewrite the expression, then I simplify "
          "each term and check the result against the conditions of the problem. ")


def _fraction(rng):
    p, q = rng.randint(1, 20), rng.randint(2, 20)
    right = [f"{p}/{q}", f"\\dfrac{{{p}}}{{{q}}}"]
    return f"\\frac{{{p}}}{{{q}}}", right, f"\\frac{{{p + 1}}}{{{q}}}"


def _decimal(rng):
    q = rng.choice([2, 4, 5, 8])
    p = rng.randint(1, 3 * q)
    return f"\\frac{{{p}}}{{{q}}}", [f"{p / q:g}"], f"{p / q + 0.5:g}"


def _radical(rng):
    a, b = rng.randint(2, 9), rng.choice([2, 3, 5, 7])
    return f"{a}\\sqrt{{{b}}}", [f"\\sqrt{{{a * a * b}}}"], f"{a + 1}\\sqrt{{{b}}}"


def _interval(rng):
    a, b = rng.randint(-9, 0), rng.randint(1, 9)
    return f"[{a}, {b})", [f"[{a},{b})"], f"[{a}, {b}]"


def _set(rng):
    items = rng.sample(range(1, 20), 3)
    return ("\\{" + ",".join(map(str, items)) + "\\}",
            ["\\{" + ", ".join(map(str, reversed(items))) + "\\}"],
            "\\{" + ",".join(map(str, items[:2])) + "\\}")


def _expression(rng):
    a = rng.randint(1, 9)
    return f"x^2+{2 * a}x+{a * a}", [f"(x+{a})^2"], f"(x+{a + 1})^2"


def _text(rng):
    day = rng.choice(["Monday", "Tuesday", "Friday"])
    return f"\\text{{{day}}}", [f"\\text{{{day.lower()}}}"], "\\text{Sunday}"


def _integer(rng):
    n = rng.randint(2, 999)
    return str(n), [str(n)], str(n + rng.randint(1, 9))


SYMBOLIC = [_fraction, _decimal, _radical, _interval, _set, _expression, _text]


def make_batch(n: int, mix: str, seed: int) -> tuple[list[str], list[dict]]:
    """n responses (groups of 8 sharing a ground truth) and their rows."""
    rng = random.Random(seed)
    responses, rows = [], []
    for _ in range(n // 8):
        use_integer = mix == "math" and rng.random() < 0.4
        generator = _integer if use_integer else rng.choice(SYMBOLIC)
        gold, right_forms, wrong = generator(rng)
        wrongs = [wrong] + [generator(rng)[2] for _ in range(3)]  # wrong answers scatter
        for _ in range(8):
            answer = rng.choice(right_forms) if rng.random() < 0.5 else rng.choice(wrongs)
            responses.append(FILLER * rng.randint(1, 3) + f"So the answer is \\boxed{{{answer}}}.")
            rows.append({"ground_truth": gold})
    return responses, rows


def peer_score(responses: list[str], rows: list[dict]) -> list[float]:
    """The plain way: math-verify on each whole response, serially, in this process."""
    from math_verify import parse, verify
    return [float(verify(parse("$" + row["ground_truth"] + "$"), parse(response)))
            for response, row in zip(responses, rows)]


def start_scorer(workers: int) -> tuple[RewardScorer, float]:
    """A scorer with its pool started, and the seconds that took."""
    start = time.perf_counter()
    scorer = RewardScorer(RewardConfig(num_workers=workers, timeout_s=1.0))
    scorer.score(["\\boxed{1/2}"], [{"ground_truth": "0.5"}], [1])  # starts the pool
    return scorer, time.perf_counter() - start


def time_peer(responses, rows) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, correct answers) of the peer on one batch."""
    wall, cpu = time.perf_counter(), time.process_time()
    correct = sum(peer_score(responses, rows))
    return time.perf_counter() - wall, time.process_time() - cpu, correct


def time_scorer(scorer: RewardScorer, responses, rows) -> tuple[float, float, float, int]:
    """(wall seconds, CPU seconds of trainer + pool, correct answers, timeouts) on one batch."""
    cpu = time.process_time() + scorer.pool.cpu_seconds()
    wall = time.perf_counter()
    rewards, metrics = scorer.score(responses, rows, [100] * len(responses))
    wall = time.perf_counter() - wall
    cpu = time.process_time() + scorer.pool.cpu_seconds() - cpu
    return wall, cpu, float(rewards.sum()), int(metrics["reward/timeouts"])


def run_mix(mix: str, args, worker_counts: list[int]) -> None:
    """Peer and pools take turns on each batch, so a change of machine load hits them alike."""
    scorers = {w: start_scorer(w) for w in worker_counts}
    totals = {name: [0.0, 0.0, 0.0, 0] for name in ["peer"] + worker_counts}
    for seed in range(args.repeats):
        responses, rows = make_batch(args.n, mix, seed)
        wall, cpu, correct = time_peer(responses, rows)
        totals["peer"] = [a + b for a, b in zip(totals["peer"], (wall, cpu, correct, 0))]
        for w, (scorer, _) in scorers.items():
            totals[w] = [a + b for a, b in zip(totals[w], time_scorer(scorer, responses, rows))]
    n = args.n * args.repeats
    peer_rate = n / totals["peer"][0]
    for name, (wall, cpu, correct, timeouts) in totals.items():
        label = "peer: serial in-process" if name == "peer" else f"jaxcov pool, {name} workers"
        startup = "-" if name == "peer" else f"{scorers[name][1]:.2f}"
        print(f"{mix:<9} {label:<24} {startup:>10} {n / wall:>10.0f} "
              f"{n / wall / peer_rate:>8.2f} {1000 * cpu / n:>13.2f} {correct / n:>8.3f} "
              f"{'-' if name == 'peer' else timeouts:>8}")
    for scorer, _ in scorers.values():
        scorer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.n} answers per batch, {args.repeats} batches per row, "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}")
    print(f"{'mix':<9} {'scorer':<24} {'start-up s':>10} {'answers/s':>10} {'vs peer':>8} "
          f"{'CPU ms/answer':>13} {'accuracy':>8} {'timeouts':>8}")
    for mix in ("math", "symbolic"):
        run_mix(mix, args, [int(w) for w in args.workers.split(",")])
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
