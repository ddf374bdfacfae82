"""Long sequences on CPU: SmolLM2 forward+backward per token at 1 x 4096 against 16 x 128 (both
remat full, the 16 x 128 figure being the peer), the compiled gradient's temporaries of a
4-layer model from 2048 to 32768 tokens (chunked against dense attention), and the peak RSS of
a SmolLM2 forward+backward at 1 x 8192 (its whole context).

    python bench/bench_long.py [--repeats 2] [--skip-speed] [--skip-memory] [--skip-rss]
    python bench/bench_long.py --rss-child 8192   (one measured process; used by the above)
"""

import argparse
import resource
import subprocess
import sys
import time

import numpy as np

from machine import machine_line


def smollm2_step(batch: int, seq: int, remat: str, attention: str = "auto"):
    """A jitted fwd+bwd of the mean token log-prob on SmolLM2 and its compile time."""
    import jax
    import jax.numpy as jnp

    from jaxcov.models.api import load_model
    from jaxcov.models.logprobs import token_logprobs
    from jaxcov.xla_cpu import model_compile_options

    model = load_model("smollm2-135m-instruct", remat=remat, with_tokenizer=False,
                       attention=attention)
    cfg, mesh = model.config, model.mesh
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, seq)))
    mask = jnp.ones_like(tokens)

    def mean_logp(params):
        return jnp.mean(token_logprobs(params, cfg, tokens, mask, mesh=mesh, chunk=128)[0][:, 1:])

    options = model_compile_options("float32", seq, cfg.attention_block)  # as the trainer picks
    step = jax.jit(jax.value_and_grad(mean_logp), compiler_options=options)
    start = time.perf_counter()
    step = step.lower(model.params).compile()
    compile_s = time.perf_counter() - start
    return (lambda: jax.block_until_ready(step(model.params))), compile_s


def speed(repeats: int):
    shapes = {"16x128": (16, 128), "1x4096": (1, 4096)}
    steps = {name: smollm2_step(*shape, remat="full") for name, shape in shapes.items()}
    best = {name: float("inf") for name in shapes}
    for _ in range(repeats):  # interleaved, so load changes hit both
        for name, (step, _) in steps.items():
            start = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - start)
    per_token = {name: 1e3 * best[name] / np.prod(shapes[name]) for name in shapes}
    print(f"SmolLM2 fwd+bwd, fp32, remat full, attention auto, best of {repeats} interleaved")
    print(f"{'shape':10}{'s':>9}{'ms/token':>10}{'compile s':>11}")
    for name in shapes:
        print(f"{name:10}{best[name]:9.2f}{per_token[name]:10.2f}{steps[name][1]:11.1f}")
    print(f"1x4096 / 16x128 per token: {per_token['1x4096'] / per_token['16x128']:.2f}")


def gradient_temporaries():
    import jax
    import jax.numpy as jnp

    from jaxcov.models import llama
    from jaxcov.models.logprobs import token_logprobs
    from jaxcov.models.presets import tiny_config

    cfg = tiny_config("llama", vocab_size=2048, hidden_size=256, intermediate_size=768,
                      num_layers=4, num_heads=8, num_kv_heads=8, head_dim=32, remat="full",
                      max_position_embeddings=32768)
    print("compiled gradient temporaries, 4 layers, 8 heads, width 256, remat full (MiB)")
    print(f"{'tokens':>8}{'dense':>10}{'chunked':>10}")
    for seq in (2048, 8192, 32768):
        row = []
        for attention in ("dense", "chunked"):
            if attention == "dense" and seq > 8192:
                row.append(float("nan"))  # 100+ GiB: not compiled
                continue
            c = cfg.replace(attention=attention)
            params = jax.eval_shape(lambda: llama.init_params(c, jax.random.key(0)))
            tokens = jax.ShapeDtypeStruct((1, seq), jnp.int32)
            grad = jax.jit(jax.grad(
                lambda p, t, m: jnp.mean(token_logprobs(p, c, t, m, chunk=128)[0])))
            compiled = grad.lower(params, tokens, tokens).compile()
            row.append(compiled.memory_analysis().temp_size_in_bytes / 2**20)
        print(f"{seq:8}{row[0]:10.0f}{row[1]:10.0f}")


def peak_rss(seq: int):
    """Runs one fwd+bwd at 1 x seq in a child process and prints its peak RSS."""
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--rss-child", str(seq)], check=True)
    rss_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"SmolLM2 fwd+bwd 1x{seq} (remat full): peak RSS {rss_gib:.2f} GiB, "
          f"{time.perf_counter() - start:.0f} s with load and compile")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--rss-child", type=int, default=0)
    args = p.parse_args()
    if args.rss_child:
        smollm2_step(1, args.rss_child, remat="full")[0]()
        return
    if not args.skip_memory:
        gradient_temporaries()
    if not args.skip_rss:
        peak_rss(8192)
    if not args.skip_speed:
        speed(args.repeats)
    print(machine_line())


if __name__ == "__main__":
    main()
