"""Train the demo trio's two small models and write them as GGUF files.

Phase 1 trains a small llama-architecture model from scratch on English (small-base).
Phase 2 continues it on Uyghur, with a tenth of the sequences still English so that the
English it knows is not wiped out (small-cpt).  Both use SmolLM2's tokenizer, so together
with SmolLM2-135M-Instruct (large-ins) they form a trio with one vocabulary.

Everything is fixed by ``--seed`` and step counts (not by wall time), so a rerun gives
the same weights on the same machine and thread count.  The defaults were sized for a
2-core CPU: about 20 minutes for both phases.

    python models/demo/fetch_data.py && python models/demo/train.py

Outputs: ``small-base.gguf`` and ``small-cpt.gguf`` (Q8_0) beside this file,
``metrics.json`` with the measured figures, checkpoints and logs under ``build/``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BUILD, CORPUS, DATA, EOD, HERE, Tokenizer, read_lines, smollm2_gguf
from evaluate import gguf_perplexity, logits_check, torch_perplexity
from export import write_gguf
from model import ModelConfig, TinyLlama


@dataclass(frozen=True)
class Phase:
    """One training phase: its data mix and optimisation schedule."""

    name: str
    steps: int
    peak_lr: float
    warmup: int
    english_share: float  # fraction of sequences drawn from the English stream
    min_lr_ratio: float = 0.1


@dataclass(frozen=True)
class Settings:
    """Settings shared by both phases."""

    seed: int = 1234
    batch: int = 4  # sequences per step
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    threads: int = 2
    log_every: int = 25


def token_stream(tok: Tokenizer, lines: list[str]) -> torch.Tensor:
    """All documents as one id stream, each preceded by the separator ``EOD``."""
    ids: list[int] = []
    for line in lines:
        ids.append(EOD)
        ids.extend(tok.encode(line))
    return torch.tensor(ids, dtype=torch.long)


def sample_batch(
    streams: tuple[torch.Tensor, torch.Tensor],
    english_share: float,
    batch: int,
    block: int,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``block + 1`` ids; each comes from English with ``english_share``."""
    english, other = streams
    rows = []
    for _ in range(batch):
        use_english = float(torch.rand((), generator=gen)) < english_share
        stream = english if use_english else other
        start = int(torch.randint(0, len(stream) - block - 1, (), generator=gen))
        rows.append(stream[start : start + block + 1])
    data = torch.stack(rows)
    return data[:, :-1], data[:, 1:]


def lr_at(step: int, phase: Phase) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak."""
    if step < phase.warmup:
        return phase.peak_lr * (step + 1) / phase.warmup
    progress = (step - phase.warmup) / max(1, phase.steps - phase.warmup)
    ratio = phase.min_lr_ratio + (1 - phase.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return phase.peak_lr * ratio


def make_optimizer(model: TinyLlama, settings: Settings) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norm gains)."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": matrices, "weight_decay": settings.weight_decay},
        {"params": vectors, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), eps=1e-8)


def train_phase(
    model: TinyLlama,
    phase: Phase,
    streams: tuple[torch.Tensor, torch.Tensor],
    settings: Settings,
    gen: torch.Generator,
    log: list[dict[str, float]],
) -> dict[str, float]:
    """Run one phase in place; return its wall time and throughput.

    Matrix products run under bfloat16 autocast (the CPU's AVX-512 BF16 units make them
    about twice as fast as float32); weights, optimiser state and the softmax over the full
    49,152-token vocabulary stay in float32.
    """
    model.train()
    optimizer = make_optimizer(model, settings)
    block = model.cfg.block_size
    start = time.perf_counter()
    window_start, window_tokens = start, 0
    for step in range(phase.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, phase)
        x, y = sample_batch(streams, phase.english_share, settings.batch, block, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        window_tokens += x.numel()
        if (step + 1) % settings.log_every == 0 or step + 1 == phase.steps:
            now = time.perf_counter()
            entry = {
                "phase": phase.name,
                "step": step + 1,
                "loss": round(loss.item(), 4),
                "lr": lr_at(step, phase),
                "tokens_per_s": round(window_tokens / (now - window_start), 1),
                "elapsed_s": round(now - start, 1),
            }
            log.append(entry)
            print(json.dumps(entry), flush=True)
            window_start, window_tokens = now, 0
    wall = time.perf_counter() - start
    tokens = phase.steps * settings.batch * block
    return {"wall_s": round(wall, 1), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1)}


def seed_everything(seed: int) -> torch.Generator:
    """Seed every generator in play; return the one that draws training batches."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def evaluate_all(
    models: dict[str, TinyLlama], ggufs: dict[str, Path], tok: Tokenizer, window: int
) -> dict[str, object]:
    """Held-out perplexities (llama.cpp, plus torch for the small models) and logits checks."""
    heldout = {
        "ug_heldout": read_lines(DATA / "ug_heldout.txt"),
        "en_heldout": read_lines(DATA / "en_heldout.txt"),
    }
    results: dict[str, object] = {"window": window, "llama_cpp": {}, "torch": {}, "logits_check": {}}
    for label, path in ggufs.items():
        for split, texts in heldout.items():
            t0 = time.perf_counter()
            res = gguf_perplexity(path, texts, tok, window)
            res["seconds"] = round(time.perf_counter() - t0, 1)
            results["llama_cpp"].setdefault(label, {})[split] = res
            print(f"llama.cpp {label} {split}: ppl {res['ppl']:.2f} ({res['tokens']} tokens)", flush=True)
    for label, model in models.items():
        for split, texts in heldout.items():
            res = torch_perplexity(model, texts, tok, window)
            results["torch"].setdefault(label, {})[split] = res
            print(f"torch {label} {split}: ppl {res['ppl']:.2f}", flush=True)
    sample = heldout["ug_heldout"][0] + " " + heldout["en_heldout"][0]
    ids = [EOD, *tok.encode(sample)][:64]
    for label, model in models.items():
        f32_path = BUILD / f"{label}.f32.gguf"
        write_gguf(model, f32_path, f"trimix-demo-{label}", weight_type="f32")
        results["logits_check"][label] = {
            "f32_file": logits_check(model, f32_path, ids),
            "q8_0_file": logits_check(model, ggufs[label], ids),
        }
        print(f"logits check {label}: {json.dumps(results['logits_check'][label])}", flush=True)
    return results


def main() -> None:
    """Both phases, export, evaluation, ``metrics.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=Settings.seed)
    parser.add_argument("--base-steps", type=int, default=300)
    parser.add_argument("--cpt-steps", type=int, default=350)
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the GGUF files")
    parser.add_argument("--eval-only", action="store_true", help="re-evaluate the build/*.pt checkpoints")
    args = parser.parse_args()

    settings = Settings(seed=args.seed)
    torch.set_num_threads(settings.threads)
    cfg = ModelConfig(block_size=512)
    phases = (
        Phase("small-base", steps=args.base_steps, peak_lr=2e-3, warmup=30, english_share=1.0),
        Phase("small-cpt", steps=args.cpt_steps, peak_lr=1e-3, warmup=20, english_share=0.1),
    )
    tok = Tokenizer()
    BUILD.mkdir(parents=True, exist_ok=True)
    gen = seed_everything(settings.seed)

    streams = {
        "en": token_stream(tok, read_lines(CORPUS / "en_train.txt")),
        "ug": token_stream(tok, read_lines(CORPUS / "ug_train.txt")),
    }
    print({k: len(v) for k, v in streams.items()}, flush=True)

    model = TinyLlama(cfg)
    print(f"parameters: {model.num_parameters():,}", flush=True)
    models: dict[str, TinyLlama] = {}
    ggufs: dict[str, Path] = {}
    timings: dict[str, dict[str, float]] = {}
    log: list[dict[str, float]] = []
    for phase in phases:
        checkpoint = BUILD / f"{phase.name}.pt"
        if args.eval_only:
            model.load_state_dict(torch.load(checkpoint))
        else:
            pair = (streams["en"], streams["en"] if phase.english_share >= 1 else streams["ug"])
            timings[phase.name] = train_phase(model, phase, pair, settings, gen, log)
            torch.save(model.state_dict(), checkpoint)
        ggufs[phase.name] = write_gguf(model, args.out / f"{phase.name}.gguf", f"trimix-demo-{phase.name}")
        models[phase.name] = TinyLlama(cfg)
        models[phase.name].load_state_dict(model.state_dict())

    evaluation = evaluate_all(models, {**ggufs, "smollm2-135m-instruct": smollm2_gguf()}, tok, cfg.block_size)
    metrics = {
        "model": cfg.to_dict(),
        "parameters": model.num_parameters(),
        "settings": asdict(settings),
        "phases": [asdict(p) for p in phases],
        "train_tokens": {k: len(v) for k, v in streams.items()},
        "timings": timings,
        "file_bytes": {k: p.stat().st_size for k, p in ggufs.items()},
        "evaluation": evaluation,
        "platform": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
        },
    }
    metrics_path = args.out / "metrics.json"
    if args.eval_only and metrics_path.exists():
        # Keep the training record of the run that made the checkpoints.
        previous = json.loads(metrics_path.read_text())
        metrics = {**previous, "evaluation": evaluation}
        timings = previous.get("timings", {})
    else:
        (BUILD / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    metrics_path.write_text(json.dumps(metrics, indent=1) + "\n")
    print(json.dumps({"timings": timings, "file_bytes": metrics["file_bytes"]}, indent=1))


if __name__ == "__main__":
    main()
