"""Programs built per step: the default run, and a run on prompts of varied length (verl layout)
under both `sampler.pad_prompts` settings. Prints each step's time and the running
`sampler/compiles`, `score/compiles`, `update/compiles` metrics; a program built after step 3
also gets the trainer's `jaxcov: warning:` line on stderr.

    python bench/bench_compiles.py default [--steps 5]
    python bench/bench_compiles.py varied [--steps 12] [--pad-prompts dataset|batch]
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from machine import machine_line  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "apple river stone cloud green house water light paper table music money world".split()
NAMES = ("sampler/compiles", "score/compiles", "update/compiles")


def varied_prompts(path: str, count: int, seed: int = 0) -> None:
    """`count` verl-layout rows whose user turns have 12..392 words (about one token each)."""
    rng = np.random.RandomState(seed)
    with open(path, "w") as f:
        for _ in range(count):
            words = rng.choice(WORDS, size=rng.randint(12, 393))
            f.write(json.dumps({"prompt": [{"role": "user", "content": " ".join(words)}],
                                "reward_model": {"ground_truth": "1"},
                                "data_source": "varied"}) + "\n")


def varied_config(directory: str, steps: int, pad_prompts: str) -> tuple[str, list[str]]:
    """A tiny random Llama (SmolLM2's tokenizer) on varied prompts: (config path, overrides)."""
    source = os.path.join(directory, "varied.jsonl")
    varied_prompts(source, 4 * steps)
    overrides = [
        "model.name=random:llama", "model.tokenizer=smollm2-135m-instruct", "model.remat=none",
        f"data.source={source}", "data.max_prompt_len=512", "data.eval_size=0",
        "data.shuffle=false", "data.system_prompt=", "data.prompt_suffix=", "reward.task=math", "sampler.max_new_tokens=16",
        "sampler.max_prompt_len=512", f"sampler.pad_prompts={pad_prompts}",
        "algo.group_size=4", "algo.filter_groups=false", "algo.policy_loss=ppo_clip",
        "train.prompts_per_step=4", "train.mini_batch_prompts=2", "train.eval_every=0"]
    return os.path.join(ROOT, "configs", "default.yaml"), overrides


def run(config_path: str, overrides: list[str], steps: int, directory: str) -> None:
    from jaxcov.config import load_config
    from jaxcov.data import load_datasets
    from jaxcov.metrics import read_metrics
    from jaxcov.models.registry import load_tokenizer
    from jaxcov.trainer import train

    run_dir = os.path.join(directory, "run")
    config = load_config(config_path, overrides + [
        f"train.steps={steps}", f"train.run_dir={run_dir}", "train.checkpoint_every=0",
        "train.progress=false", "train.tensorboard=false"])
    train_set, _ = load_datasets(config.data, load_tokenizer(config.model.tokenizer or
                                                             config.model.name))
    lengths = [len(e["prompt_ids"]) for e in train_set.examples]
    print(f"{config.model.name}, {len(lengths)} prompts of {min(lengths)}..{max(lengths)} tokens "
          f"(chat template included), sampler.pad_prompts={config.sampler.pad_prompts}")
    assert train(config) == 0
    print(f"{'step':>4} {'step s':>7} " + " ".join(f"{n:>17}" for n in NAMES))
    for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")):
        if r["step"]:
            print(f"{r['step']:4} {r['time/step']:7.1f} "
                  + " ".join(f"{int(r[n]):17}" for n in NAMES))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workload", choices=["default", "varied"])
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--pad-prompts", choices=["dataset", "batch"], default="dataset")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        if args.workload == "default":
            run(os.path.join(ROOT, "configs", "default.yaml"), ["train.eval_every=0"],
                args.steps or 5, directory)
        else:
            steps = args.steps or 12
            run(*varied_config(directory, steps, args.pad_prompts), steps, directory)
    print(machine_line())


if __name__ == "__main__":
    main()
