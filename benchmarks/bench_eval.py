"""What evaluating every method costs against one fused method, on real MiLiC-Eval prompts.

On the Uyghur reading-comprehension and translation prompts of MiLiC-Eval (read from
``../shared/data/milic-eval``, the benchmark as distributed) with the demo trio, prints per item:

* the time of one fused method (``trimix-ppl``: perplexity selection on the prompt, then generation);
* the time of the default method list with the full 6x6 upper bound (every single model, Proxy
  Tuning, Contrastive Decoding, TriMix with per-prompt PPL and ENT selection, with per-task PPL and
  ENT calibration, and the 36 grid pairs), all from one prompt evaluation per model and one batched
  generation;
* their ratio (targets: at most 2x on reading comprehension, 2-token answers; at most 5x on
  translation, up to 64-token answers).

Both run on the same engine, item after item in turn (one, all, one, all, ...), and the median over
repeats is reported. The one-off per-task calibration (both strategies from one evaluation of each
sampled prompt) is timed separately. Then the decode throughput of 1, 4, 16 and 36 sequences decoding
together (aggregate generated tokens per second and milliseconds per step).

    python benchmarks/bench_eval.py [--data ../shared/data/milic-eval] [--items 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import trimix_cpp as tm
from trimix_cpp import _llama
from trimix_cpp.engine import SeqSpec
from trimix_cpp.evaluation.items import PromptSettings
from trimix_cpp.evaluation.pipeline import batch_options
from trimix_cpp.evaluation.predict import DEFAULT_METHODS, GenerationSettings, Runner, Task, parse_methods
from trimix_cpp.evaluation.tasks import load_spec
from trimix_cpp.modelset import ModelSet
from trimix_cpp.selection import DEFAULT_GRID

HERE = Path(__file__).resolve().parent
TASKS = {
    "reading comprehension": ("reading_comprehension:ug", 2, 2.0),
    "translation en-ug": ("translation_dialogue:ug:en-ug", 64, 5.0),
}


def per_item(engine: tm.Engine, data_root: Path, n_items: int, repeats: int, calibration_n: int) -> None:
    print("\n## per item: one fused method against every method with the full 6x6 upper bound")
    print("| task | prompt tokens | one method (trimix-ppl) | every method | ratio | target |")
    print("|---|---|---|---|---|---|")
    specs = parse_methods(DEFAULT_METHODS, DEFAULT_GRID, DEFAULT_GRID)
    [one] = parse_methods("trimix-ppl", DEFAULT_GRID, DEFAULT_GRID)
    calibration = {}
    for label, (spec, max_tokens, target) in TASKS.items():
        room = engine.n_ctx - max_tokens - 8
        budget = PromptSettings(shots=5, max_prompt=room, count_tokens=lambda t: len(engine.tokenize(t)))
        data = load_spec(f"milic:{data_root}:{spec}", settings=PromptSettings(shots=5))
        fitted = data.fitted(budget)
        items = list(fitted[:n_items])
        with tempfile.TemporaryDirectory() as out:
            settings = GenerationSettings(max_tokens=max_tokens)
            runner = Runner(engine, Path(out), settings, calibration_n=calibration_n)
            task = Task(data.task, items, pool=fitted)
            t0 = time.perf_counter()
            concrete = runner.expand(task, specs)  # the per-task calibrations happen here, once
            calibration[label] = time.perf_counter() - t0
            solo, every, n_prompt = [], [], []
            for item in items:
                n_prompt.append(len(engine.tokenize(item.prompt)))
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    runner.predict_item(task, item, [one])
                    solo.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    runner.predict_item(task, item, concrete)
                    every.append(time.perf_counter() - t0)
            runner.close()
        a, b = statistics.median(solo), statistics.median(every)
        print(
            f"| {label} | {statistics.median(n_prompt):.0f} | {a:.2f} s | {b:.2f} s ({len(concrete)} columns) | "
            f"{b / a:.2f}x | <= {target:g}x |"
        )
    print()
    for label, seconds in calibration.items():
        print(f"one-off per-task calibration, {label}: {seconds:.1f} s ({calibration_n} prompts, PPL and ENT)")


def throughput(engine: tm.Engine, prompt: str, n_tokens: int) -> None:
    print("\n## decode throughput of sequences decoding together (greedy, a different prompt each)")
    print("| sequences | aggregate tok/s | ms per step | vs 1 sequence |")
    print("|---|---|---|---|")
    base = None
    sched = engine.scheduler
    for n in (1, 4, 16, 36):
        # different prompts, so no two sequences share their tokens (and their decodes)
        prompts = [f"{prompt} {i}" for i in range(n)]
        gens = engine.generate_batch(prompts, SeqSpec(tm.plan("trimix", alpha=0.1, beta=1.0), max_tokens=n_tokens))
        sched.step()  # admission: the prompt evaluations and the first tokens
        first = sum(len(g.token_ids) for g in gens)
        steps0, t0 = sched.steps, time.perf_counter()
        engine.run(gens)
        wall = time.perf_counter() - t0
        rate = (sum(len(g.token_ids) for g in gens) - first) / wall
        base = base or rate
        ms = 1000 * wall / max(sched.steps - steps0, 1)
        print(f"| {n} | {rate:.1f} | {ms:.1f} | {rate / base:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "milic-eval")
    ap.add_argument("--items", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--calibration-n", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-ctx", type=int, default=2048)
    args = ap.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"no MiLiC-Eval data at {args.data} (pass --data)")
    modelset = ModelSet.make("demo")
    paths = modelset.paths(("large_ins", "small_cpt", "small_base"), "the benchmark")
    specs = parse_methods(DEFAULT_METHODS, DEFAULT_GRID, DEFAULT_GRID)
    options = batch_options(
        tm.LoadOptions(n_ctx=args.n_ctx, n_threads=args.threads), specs, len(DEFAULT_GRID) ** 2, 64, 0
    )
    print(f"llama.cpp: {_llama.system_info()}")
    print(f"demo trio, n_ctx {options.n_ctx}, {options.n_seq} sequences, {options.kv_cells} KV cells")
    with tm.Engine(paths, options) as engine:
        per_item(engine, args.data, args.items, args.repeats, args.calibration_n)
        throughput(engine, "ئالاقەداشنى ئۆچۈرۈش مەغلۇپ بولدى، ھۆججەتنى ساقلاش", 32)


if __name__ == "__main__":
    main()
