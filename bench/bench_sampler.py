"""Rollout generation speed, SmolLM2-135M-Instruct: jaxcov sampler vs transformers `generate`.

    python bench/bench_sampler.py [--batch 16 --new-tokens 64 --repeats 3 --threads 2
                                   --dtypes float32,bfloat16 --engines continuous,static
                                   --skip-torch]

Both sides sample at T=1 (no top-k / top-p) from the same weights (the embedded GGUF), on the
same left-padded batch of chat prompts, and generate exactly --new-tokens tokens per row (no
early stop: jaxcov gets no stop ids, transformers gets min_new_tokens). Throughput counts new
tokens per second of the whole call, prefill included. Compile time = first call - steady call.
"""

import argparse
import os
import time

from machine import machine_line

QUESTIONS = [
    "What is 17 times 23?", "Name three primary colors.", "Why is the sky blue?",
    "Write a haiku about autumn leaves.", "What is the capital city of Australia?",
    "Explain photosynthesis in one sentence.", "How many legs does a spider have?",
    "Give me a synonym for happy.", "What is the boiling point of water in Fahrenheit?",
    "Who wrote Romeo and Juliet?", "Convert 5 kilometers to miles, roughly.",
    "What does a thermometer measure?", "List two prime numbers greater than ten.",
    "What is the square root of 144?", "Describe a cat in five words.",
    "What gas do plants absorb from the air?",
]


SUFFIX = " Please explain your answer briefly."  # brings the prompts to ~44 tokens


def chat_prompts(tokenizer, batch):
    texts = [QUESTIONS[i % len(QUESTIONS)] + SUFFIX for i in range(batch)]
    return [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                                    tokenize=False, add_generation_prompt=True))
            ["input_ids"] for t in texts]


def _timed(fn):
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def jax_runner(args, prompts, dtype, engine):
    """A no-argument function that samples the batch once (fresh key per call), and the model."""
    import jax

    from jaxcov import sampler
    from jaxcov.config import SamplerConfig
    from jaxcov.models.api import load_model

    model = load_model("smollm2-135m-instruct", with_tokenizer=False)
    config = SamplerConfig(max_new_tokens=args.new_tokens, temperature=1.0,
                           compute_dtype=dtype, max_prompt_len=256, engine=engine)
    keys = iter(jax.random.split(jax.random.key(0), 1000))

    def run():
        out = sampler.sample(model.params, model.config, model.mesh, prompts, next(keys), config,
                             stop_ids=(), pad_id=2)
        jax.block_until_ready(out)
        assert int(out.response_mask.sum()) == len(prompts) * args.new_tokens

    return run


def torch_runner(args, prompts):
    import torch
    import transformers

    from jaxcov.models.registry import embedded_model_path

    torch.set_num_threads(args.threads)
    path = embedded_model_path("smollm2-135m-instruct")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 pad_token_id=2, eos_token_id=2)
        assert out.shape[1] == width + args.new_tokens

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="jaxcov compute dtypes")
    parser.add_argument("--engines", default="continuous,static", help="jaxcov sampler engines")
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()

    from jaxcov import sampler
    from jaxcov.models.registry import load_tokenizer

    prompts = chat_prompts(load_tokenizer("smollm2-135m-instruct"), args.batch)
    tokens = args.batch * args.new_tokens
    print(f"SmolLM2-135M-Instruct, batch {args.batch}, chat prompts of "
          f"{sum(map(len, prompts)) / len(prompts):.1f} tokens on average (max "
          f"{max(map(len, prompts))}), {args.new_tokens} new tokens per row, T=1; "
          f"load average before: {os.getloadavg()[0]:.1f}")
    runners, compile_s = {}, {}
    for dtype in args.dtypes.split(","):
        for engine in args.engines.split(","):
            name = f"jaxcov {engine} ({dtype})"
            runners[name] = jax_runner(args, prompts, dtype, engine)
            first, _ = _timed(runners[name])
            compile_s[name] = first
    if not args.skip_torch:
        peer_name = f"transformers generate (fp32, {args.threads} threads)"
        runners[peer_name] = torch_runner(args, prompts)
    times = {name: [] for name in runners}
    for _ in range(args.repeats):  # interleaved, so every side sees the same background load
        for name, run in runners.items():
            times[name].append(_timed(run))
    best = {name: min(t[0] for t in ts) for name, ts in times.items()}
    cpu = {name: min(t[1] for t in ts) for name, ts in times.items()}
    peer = best[list(runners)[-1]] if not args.skip_torch else None
    print(f"\n| {'implementation':40} | wall s | new tokens/s | vs transformers | CPU s | "
          f"compile s |")
    print(f"|{'-' * 42}|-------:|-------------:|----------------:|------:|----------:|")
    for name in runners:
        ratio = f"{peer / best[name]:.2f}x" if peer else "-"
        first = compile_s.get(name)
        comp = f"{first - best[name]:.1f}" if first is not None else "-"
        print(f"| {name:40} | {best[name]:6.2f} | {tokens / best[name]:12.1f} | {ratio:>15} | "
              f"{cpu[name]:5.2f} | {comp:>9} |")
    print(f"\nbest of {args.repeats} interleaved calls; compile s = first call - best call; "
          f"sampler programs compiled: {sampler.compile_count()}; "
          f"load average after: {os.getloadavg()[0]:.1f}")
    print(machine_line())


if __name__ == "__main__":
    main()
