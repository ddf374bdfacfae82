"""Forward and forward+backward of SmolLM2 at 16 x 128 under the model code of git revisions.

    python bench/bench_revisions.py OLD_REV [NEW_REV ...] [--repeats 3]   (work = working tree)

`bench_model.py` compares jaxcov with torch; this compares jaxcov with itself. The machine's
speed drifts by 10-30% over hours (torch more than XLA), so a change is judged by timing the
revisions' `jaxcov/models/llama.py` + `logprobs.py` in one process on the same weights, calls
interleaved, best of the rounds (each timed on its second consecutive call, as bench_model.py).
"""

import argparse
import dataclasses
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_line

REPO = Path(__file__).resolve().parent.parent
MODULES = ("llama", "logprobs")


def load_revision(rev: str, directory: Path):
    """(llama, logprobs) modules of `rev`, imported from files written under `directory`."""
    if rev == "work":
        from jaxcov.models import llama, logprobs
        return llama, logprobs
    tag = "rev_" + "".join(c if c.isalnum() else "_" for c in rev)
    loaded = []
    for name in MODULES:
        source = subprocess.check_output(["git", "-C", str(REPO), "show",
                                          f"{rev}:jaxcov/models/{name}.py"], text=True)
        source = source.replace("from jaxcov.models.llama import", f"from {tag}_llama import")
        path = directory / f"{tag}_{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(f"{tag}_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        loaded.append(module)
    return tuple(loaded)


def programs(rev, model, tokens, mask, directory):
    import jax
    import jax.numpy as jnp

    from jaxcov.xla_cpu import model_compile_options

    llama, logprobs = load_revision(rev, directory)
    # Options an older revision does not know (attention, platform, ...) are left out.
    known = {f.name for f in dataclasses.fields(llama.LlamaConfig)}
    cfg = llama.LlamaConfig(**{k: v for k, v in dataclasses.asdict(model.config).items()
                               if k in known})

    def logp(params):
        return logprobs.token_logprobs(params, cfg, tokens, mask, mesh=model.mesh)[0]

    options = model_compile_options("float32")
    fwd = jax.jit(logp, compiler_options=options).lower(model.params).compile()
    bwd = jax.jit(jax.value_and_grad(lambda p: jnp.mean(logp(p)[:, 1:])),
                  compiler_options=options).lower(model.params).compile()
    return {f"{rev} forward": fwd, f"{rev} forward+backward": bwd}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("revisions", nargs="+")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxcov.models.api import load_model

    model = load_model("smollm2-135m-instruct", dtype="float32", remat="none",
                       with_tokenizer=False)
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randint(0, 49152, (16, 128)))
    mask = jnp.ones_like(tokens)
    with tempfile.TemporaryDirectory() as directory:
        calls = {}
        for rev in args.revisions:
            calls.update(programs(rev, model, tokens, mask, Path(directory)))
        best = {name: float("inf") for name in calls}
        for _ in range(args.repeats):
            for name, fn in calls.items():
                jax.block_until_ready(fn(model.params))
                start = time.perf_counter()
                jax.block_until_ready(fn(model.params))
                best[name] = min(best[name], time.perf_counter() - start)
    base = args.revisions[0]
    print(f"SmolLM2-135M 16x128 fp32, best of {args.repeats} interleaved")
    print(f"{'':34}{'s':>8}{'vs ' + base:>14}")
    for name, seconds in best.items():
        kind = name.split(" ", 1)[1]
        print(f"{name:34}{seconds:8.3f}{best[f'{base} {kind}'] / seconds:13.2f}x")
    print(machine_line())


if __name__ == "__main__":
    main()
