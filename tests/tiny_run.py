"""The tiny end-to-end training run shared by the trainer and multi-process tests: a random
tiny Llama, times-table prompts, and a reward it can vary (tests/reward_fixtures.py)."""

import json

import yaml

TINY = {
    "model": {"name": "random:llama", "tokenizer": "smollm2-135m-instruct", "remat": "none",
              "logits_chunk": 32},
    "mesh": {"data": 2, "fsdp": 2, "tensor": 2},
    # An empty system prompt keeps prompts inside the 32-token bucket: fewer tokens to score.
    "data": {"source": "times_table", "synthetic": {"size": 64}, "max_prompt_len": 32,
             "system_prompt": ""},
    # Bounds and ratios wide enough that Clip-Cov / KL-Cov touch tokens of a tiny batch.
    "algo": {"group_size": 4, "filter_groups": False, "clip_cov_ratio": 0.05, "clip_cov_lb": 0.0,
             "kl_cov_ratio": 0.05},
    "sampler": {"max_new_tokens": 8, "max_prompt_len": 32},
    "reward": {"custom_fn": "tests.reward_fixtures:distinct_characters", "correct_weight": 0.0},
    "optim": {"lr": 1e-3},
    "train": {"steps": 2, "prompts_per_step": 4, "mini_batch_prompts": 2, "micro_batch_size": 4,
              "ppo_epochs": 1, "checkpoint_every": 1, "progress": False, "tensorboard": False},
}


def write_tiny_config(path, **sections) -> str:
    """TINY with each given section updated key by key, written as YAML to `path`."""
    values = json.loads(json.dumps(TINY))
    for section, changes in sections.items():
        values[section].update(changes)
    path.write_text(yaml.safe_dump(values))
    return str(path)
