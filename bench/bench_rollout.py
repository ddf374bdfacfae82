"""Long-tailed rollouts, SmolLM2-135M-Instruct: the continuous engine vs the static batch vs
transformers `generate`, in one run.

    python bench/bench_rollout.py [--samples 4 --new-tokens 256 --slots 0 --repeats 2
                                   --dtypes bfloat16,float32 --threads 2 --skip-torch]

16 chat prompts x 4 samples at T=1, each row ending at its first <|im_end|> or at --new-tokens.
Twelve prompts ask for a one-word answer, four for a long story, so a few rows run to the cap
while most stop within a few tokens: the workload where a static batch decodes mostly rows that
have already ended. Throughput counts useful new tokens (each row's tokens up to and including
its stop token) per second of the whole call, prefill included; the seeds differ between sides,
so each side's own token count is used and printed. Prints the response-length histogram.
"""

import argparse
import os
import time

import numpy as np

from machine import machine_line

SHORT = [
    "What is the capital of France? Answer with one word.",
    "What color is grass? Answer with one word.", "Is ice cold? Answer yes or no.",
    "What is 3 plus 4? Answer with just the number.", "Name the largest ocean in one word.",
    "Which animal barks? Answer with one word.", "What is the opposite of up? One word.",
    "How many days are in a week? Just the number.", "What is 10 minus 7? Just the number.",
    "Which planet do we live on? One word.", "What do bees make? Answer with one word.",
    "Is the sun hot? Answer yes or no.",
]
LONG = [
    "Write a long, detailed story about a dragon who learns to bake bread.",
    "Tell me a long adventure story about two friends sailing around the world.",
    "Write a long fairy tale about a princess, a wizard and a talking cat.",
    "Write a long story about a robot exploring an abandoned city on Mars.",
]


def chat_prompts(tokenizer):
    # Three one-word questions, then a story, four times over (the stories come late in the
    # queue: the continuous engine cannot start them first).
    texts = [q for i in range(4) for q in SHORT[3 * i:3 * i + 3] + LONG[i:i + 1]]
    return [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                                    tokenize=False, add_generation_prompt=True))
            ["input_ids"] for t in texts]


def histogram(lengths, cap):
    edges = [1, 5, 17, 65, cap, cap + 1]
    counts = np.histogram(lengths, bins=edges)[0]
    labels = [f"{a}-{b - 1}" for a, b in zip(edges[:-2], edges[1:-1])] + [f"{cap} (cap)"]
    return ", ".join(f"{label}: {c}" for label, c in zip(labels, counts))


def jax_runner(args, model, prompts, engine, dtype):
    """A no-argument function that samples the batch once (fresh key per call) and returns the
    response lengths and the slot utilisation."""
    import jax

    from jaxcov import sampler
    from jaxcov.config import SamplerConfig

    config = SamplerConfig(max_new_tokens=args.new_tokens, temperature=1.0, compute_dtype=dtype,
                           max_prompt_len=256, engine=engine, slots=args.slots)
    keys = iter(jax.random.split(jax.random.key(0), 1000))

    def run():
        out = sampler.generate(model, prompts, next(keys), config, n=args.samples)
        lengths = np.asarray(out.response_lengths)
        return lengths, out.slot_utilisation()

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
    rows = [p for p in prompts for _ in range(args.samples)]
    ids = torch.tensor([[2] * (width - len(p)) + p for p in rows])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=args.new_tokens, pad_token_id=2, eos_token_id=2)
        new = out[:, width:].numpy()
        ended = new == 2
        lengths = np.where(ended.any(1), ended.argmax(1) + 1, new.shape[1])
        return lengths, float("nan")

    return run


def _timed(run):
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--slots", type=int, default=0, help="continuous slots (0: automatic)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="jaxcov compute dtypes")
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()

    from jaxcov import continuous
    from jaxcov.config import SamplerConfig
    from jaxcov.models.api import load_model

    model = load_model("smollm2-135m-instruct")
    prompts = chat_prompts(model.tokenizer)
    rows = len(prompts) * args.samples
    slots = continuous.slot_count(SamplerConfig(slots=args.slots), rows, None)
    print(machine_line())
    print(f"SmolLM2-135M-Instruct, {len(prompts)} prompts x {args.samples} samples = {rows} rows "
          f"(one-word answers and long stories, {min(map(len, prompts))}..."
          f"{max(map(len, prompts))} prompt tokens), <= {args.new_tokens} new tokens, T=1; "
          f"continuous engine with {slots} slots; load average {os.getloadavg()[0]:.1f}")
    runners, compile_s = {}, {}
    for dtype in args.dtypes.split(","):
        for engine in ("continuous", "static"):
            name = f"jaxcov {engine} ({dtype})"
            runners[name] = jax_runner(args, model, prompts, engine, dtype)
            compile_s[name] = _timed(runners[name])[0]
    if not args.skip_torch:
        runners[f"transformers generate (fp32, {args.threads} threads)"] = torch_runner(args,
                                                                                      prompts)
    results = {name: [] for name in runners}
    for _ in range(args.repeats):  # interleaved: every side sees the same background load
        for name, run in runners.items():
            results[name].append(_timed(run))
    _report(args, results, compile_s)


def _report(args, results, compile_s):
    best = {name: max(results[name], key=lambda r: r[1][0].sum() / r[0]) for name in results}
    rate = {name: r[1][0].sum() / r[0] for name, r in best.items()}
    names = list(results)
    peer = names[-1] if not args.skip_torch else None
    print("\nresponse lengths (best call of each):")
    for name, (_, (lengths, _)) in best.items():
        print(f"  {name:40} mean {lengths.mean():5.1f}: {histogram(lengths, args.new_tokens)}")
    print(f"\n| {'implementation':40} | wall s | useful tokens | tokens/s | slot use | "
          f"vs static | vs transformers |")
    print(f"|{'-' * 42}|-------:|--------------:|---------:|---------:|----------:|"
          f"----------------:|")
    for name, (seconds, (lengths, use)) in best.items():
        dtype = name.split("(")[-1]
        static = next((n for n in names if "static" in n and n.endswith(dtype)), None)
        vs_static = f"{rate[name] / rate[static]:.2f}x" if static and "jaxcov" in name else "-"
        vs_peer = f"{rate[name] / rate[peer]:.2f}x" if peer else "-"
        use_text = "-" if use != use else f"{use:.2f}"
        print(f"| {name:40} | {seconds:6.2f} | {int(lengths.sum()):13d} | {rate[name]:8.1f} | "
              f"{use_text:>8} | {vs_static:>9} | {vs_peer:>15} |")
    compiled = ", ".join(f"{n.split('jaxcov ')[1]} {compile_s[n] - best[n][0]:.0f} s"
                         for n in compile_s)
    print(f"\nbest of {args.repeats} interleaved calls by tokens/s; compile (first call - best): "
          f"{compiled}; load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
