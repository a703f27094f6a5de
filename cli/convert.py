"""``trimix models convert`` and ``trimix models quantize``: checkpoints to GGUF and GGUF to smaller GGUF."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from trimix_cpp import _llama
from trimix_cpp.convert import CONVERT_TYPES, convert_checkpoint, quantize_gguf, quantized_tensor_types
from trimix_cpp.convert.outfile import gib

from .common import Verbose, err, errors

TYPES = ", ".join(CONVERT_TYPES)
OutType = Annotated[str, typer.Option("--type", "-t", help=f"Output type: {TYPES}.")]
Force = Annotated[bool, typer.Option("--force", help="Replace the output file if it exists.")]
Threads = Annotated[int, typer.Option("--threads", help="Threads for llama.cpp's quantizer (0: every core).")]


@contextmanager
def _bars() -> Iterator[Callable[[str, int, int], None]]:
    """Rich bars on stderr, one per stage as it starts: bytes read while converting, tensors while quantizing."""
    stages: dict[str, TaskID] = {}
    bytes_bar = Progress(
        TextColumn("{task.description:>9}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    count_bar = Progress(
        TextColumn("{task.description:>9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tensors"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )
    live: list[Progress] = []

    def update(stage: str, done: int, total: int) -> None:
        bar = bytes_bar if stage == "convert" else count_bar
        if stage not in stages:
            if live and live[-1] is not bar:
                live[-1].stop()
            bar.start()
            live.append(bar)
            stages[stage] = bar.add_task(stage, total=total)
        bar.update(stages[stage], completed=done, total=total)

    try:
        yield update
    finally:
        for bar in live:
            bar.stop()


def convert(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder: config.json, *.safetensors, tokenizer files.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The GGUF file to write.")],
    out_type: OutType = "f16",
    force: Force = False,
    threads: Threads = 0,
    verbose: Verbose = False,
) -> None:
    """Convert a Hugging Face checkpoint (Qwen2/2.5, Llama 2/3.x, Gemma 3 text) to GGUF, without torch."""
    with errors(verbose):
        _llama.set_verbose(verbose)
        t0 = time.perf_counter()
        with _bars() as progress:
            path = convert_checkpoint(
                checkpoint, output, out_type=out_type, force=force, threads=threads or None, progress=progress
            )
        size = path.stat().st_size
        err.print(f"wrote {path} ({gib(size)}, {out_type.lower()}) in {time.perf_counter() - t0:.1f} s", soft_wrap=True)


def quantize(
    source: Annotated[Path, typer.Argument(help="The GGUF file to quantize (f32, f16 or bf16).")],
    output: Annotated[Path, typer.Argument(help="The GGUF file to write.")],
    out_type: Annotated[str, typer.Argument(help=f"Output type: {TYPES}.")],
    threads: Threads = 0,
    allow_requantize: Annotated[
        bool,
        typer.Option(
            "--allow-requantize", help="Quantize a file that is already quantized (each pass adds rounding error)."
        ),
    ] = False,
    force: Force = False,
    verbose: Verbose = False,
) -> None:
    """Quantize a GGUF file with llama.cpp's own quantizer (q4_k_m, q5_k_m, q6_k, q8_0, ...)."""
    with errors(verbose):
        _llama.set_verbose(verbose)
        t0 = time.perf_counter()
        warned = not allow_requantize

        def warn_once() -> None:
            # said when llama.cpp starts, i.e. once every check has passed, so a refused run prints one line
            nonlocal warned
            if not warned:
                warned = True
                types = quantized_tensor_types(source)
                if types:
                    err.print(
                        f"[yellow]warning:[/] {source} is already quantized ({', '.join(types)}); quantizing it "
                        "again adds a second rounding error on top of the first (the f16 GGUF gives a better result)",
                        soft_wrap=True,
                    )

        with _bars() as bars:

            def progress(stage: str, done: int, total: int) -> None:
                warn_once()
                bars(stage, done, total)

            path = quantize_gguf(
                source,
                output,
                out_type,
                threads=threads or None,
                allow_requantize=allow_requantize,
                force=force,
                progress=progress,
            )
        size = path.stat().st_size
        err.print(f"wrote {path} ({gib(size)}, {out_type.lower()}) in {time.perf_counter() - t0:.1f} s", soft_wrap=True)
