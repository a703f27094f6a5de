"""The ``trimix`` command line: a thin Typer layer over :mod:`trimix_cpp`.

stdout carries a command's answer (the generated text, one JSON object, or a query's table);
how the run went (progress, statistics, notes, errors) goes to stderr through rich (see
:mod:`.render`). Every error is one line and a non-zero exit code; ``--verbose`` adds the traceback
and llama.cpp's own log.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

import trimix_cpp as tm
from trimix_cpp import finite
from trimix_cpp.batch import BatchDefaults, line_spec, read_batch, run_batch
from trimix_cpp.calibrate import calibrate as run_calibration
from trimix_cpp.calibrate import check_output_path, read_prompts, sample_prompts
from trimix_cpp.chat_template import chat_prompt
from trimix_cpp.evaluation.cluster import backend_for
from trimix_cpp.evaluation.pipeline import EvalConfig
from trimix_cpp.evaluation.predict import DEFAULT_METHODS, perplexity_methods
from trimix_cpp.generation import check_logprobs
from trimix_cpp.methods import MethodChoice, check_models_used, fusion_roles, resolve_fusion, sampling_params
from trimix_cpp.modelset import ModelSet
from trimix_cpp.prefill import scoring_roles
from trimix_cpp.profiles import profile_files
from trimix_cpp.scoring import score_rows
from trimix_cpp.selection import DEFAULT_MAX_LOGITS_MIB, SELECTION_ROLES

from . import models as models_cmd
from . import render
from .bench import BENCH_HELP
from .bench import bench as bench_cmd
from .chat import chat as chat_cmd
from .common import Verbose, err, errors
from .evaluate import check_plot, run_eval
from .options import (
    ENGINE,
    FUSION,
    GRID,
    MODELS_TRIO,
    SAMPLING,
    EngineArgs,
    GridAlpha,
    GridBeta,
    Json,
    Raw,
    TrimixGroup,
    VersionOption,
    group,
    grouped,
    model_set,
    selection,
    selector,
)
from .serve import SERVE_HELP
from .serve import serve as serve_cmd

app = typer.Typer(
    name="trimix",
    help="Fuse the next-token logits of several GGUF models (TriMix) through llama.cpp.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    cls=TrimixGroup,
)


@app.callback()
def _root(version: Annotated[bool, VersionOption] = False) -> None:
    """Fuse the next-token logits of several GGUF models (TriMix) through llama.cpp."""


app.add_typer(models_cmd.app, name="models")
app.command("serve", help=SERVE_HELP)(serve_cmd)
app.command("bench", help=BENCH_HELP)(bench_cmd)
app.command("chat")(chat_cmd)

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "0": "\0"}


def unescape(s: str) -> str:
    r"""Read ``\n``, ``\t``, ``\r``, ``\0`` and ``\\`` in a --stop value as the characters they name."""
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s) and s[i + 1] in _ESCAPES:
            out.append(_ESCAPES[s[i + 1]])
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise tm.TrimixError(
            f"{where} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "save it as UTF-8 and try again"
        ) from None


def read_prompt(prompt: str | None, file: Path | None) -> str:
    """The prompt from the argument, from stdin (``-``), or from ``--file``."""
    if file is not None:
        if prompt is not None:
            raise tm.TrimixError("give the prompt either as an argument or with --file, not both")
        if not file.is_file():
            raise tm.TrimixError(f"prompt file not found: {file}")
        return _decode_utf8(file.read_bytes(), f"prompt file {file}")
    if prompt is None:
        raise tm.TrimixError("no prompt given (pass it as an argument, '-' for stdin, or --file PATH)")
    if prompt == "-":
        return _decode_utf8(sys.stdin.buffer.read(), "the prompt on stdin")
    return prompt


Prompt = Annotated[str | None, typer.Argument(help="The prompt; '-' reads stdin.")]
PromptFile = Annotated[Path | None, typer.Option("--file", "-f", help="Read the prompt from this file.")]
SelectStrategy = Annotated[str, typer.Option(help="ppl (perplexity of the prompt) or ent (entropy of the next token).")]
CalibrateStrategy = Annotated[
    str, typer.Option(help="ppl (mean perplexity of the prompts) or ent (entropy of their next token).")
]


@app.command()
@grouped
def generate(
    prompt: Prompt = None,
    file: PromptFile = None,
    modelset: ModelSet = group(model_set, *tm.ROLES, "lang"),  # generate lists the files before --lang
    choice: MethodChoice = FUSION,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")] = 256,
    sampling: dict[str, Any] = SAMPLING,
    logprobs: Annotated[
        int | None,
        typer.Option(
            "--logprobs",
            help="With --json: each token's log-probability under the fused distribution and its N most likely "
            "alternatives (0: none).",
        ),
    ] = None,
    chat: Annotated[
        bool,
        typer.Option(
            "--chat", help="Send the prompt as a user message through the chat template (as trimix chat and serve)."
        ),
    ] = False,
    system: Annotated[str | None, typer.Option("--system", help="With --chat: a system prompt.")] = None,
    stop: Annotated[
        list[str] | None, typer.Option(help="Stop at this string (repeatable; '\\n' is a newline).")
    ] = None,
    utf8_guard: Annotated[
        bool, typer.Option("--utf8-guard/--no-utf8-guard", help="Mask tokens that would break UTF-8.")
    ] = True,
    draft: Annotated[
        int,
        typer.Option(
            "--draft",
            help="Speculative decoding: the small models draft up to this many tokens per round and the large "
            "model checks them in one batch. Greedy: the same text as 0 (off). Sampling: the same fused "
            "distribution, but not the same text for a --seed (the draws differ).",
        ),
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming text.")] = False,
    batch: Annotated[
        Path | None,
        typer.Option(
            "--batch",
            help="Generate for every prompt of this file (one per line, or JSONL with 'prompt' and per-line "
            "settings); prints one JSON object per prompt, in input order. '-' reads stdin.",
        ),
    ] = None,
    parallel: Annotated[
        int | None, typer.Option("--parallel", "-np", help="Sequences decoded together with --batch (default 4).")
    ] = None,
    raw: Raw = False,
    loading: EngineArgs = ENGINE,
    verbose: Verbose = False,
) -> None:
    """Generate text with fused logits, streaming whole characters to stdout.

    Sampling follows llama.cpp's order: top-k, top-p and min-p on the distribution at temperature 1,
    then the temperature, then the draw. Flags that the chosen method or decoding would ignore are
    refused.
    """
    with errors(verbose):
        if batch is not None and (prompt is not None or file is not None):
            raise tm.TrimixError("--batch reads the prompts from its file: drop the prompt argument and --file")
        if batch is None and parallel is not None:
            raise tm.TrimixError("--parallel sets how many --batch prompts decode together; it needs --batch")
        if logprobs is not None and not as_json and batch is None:
            raise tm.TrimixError("--logprobs adds log-probabilities to the JSON output: add --json")
        if chat and raw:
            raise tm.TrimixError("--raw sends the prompt as it is, --chat through the chat template: choose one")
        if system is not None and not chat:
            raise tm.TrimixError("--system is the system prompt of --chat; add --chat")
        text = read_prompt(prompt, file) if batch is None else ""
        fusion = resolve_fusion(choice, modelset.profile, lambda roles: modelset.paths(roles, "--weights-from"))
        method_name = fusion.method if isinstance(fusion, tm.FusionPlan) else "trimix"
        check_models_used(fusion, list(modelset.explicit), method_name)
        paths = modelset.paths(fusion_roles(fusion), f"method {method_name}")
        params = sampling_params(**sampling)
        check_logprobs(logprobs)
        stops = tuple(modelset.stops([unescape(s) for s in stop] if stop is not None else None))
        spec = dict(max_tokens=max_tokens, stop=stops, utf8_guard=utf8_guard, draft=draft, logprobs=logprobs)
        if batch is not None:
            defaults = BatchDefaults(choice, sampling, spec)
            _generate_batch(batch, modelset, paths, defaults, raw, parallel, loading, verbose, chat, system)
            return
        with loading.open(modelset, paths, verbose) as engine:
            prompt_ids = _prompt(modelset, engine, text, raw, chat, system)
            gen = engine.generate_many(prompt_ids, [tm.SeqSpec(fusion, params, **spec)])[0]
            if as_json:
                gen.run()
            else:
                for piece in gen:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                sys.stdout.write("\n")
                sys.stdout.flush()
        used = gen.fusion
        if as_json:
            sys.stdout.write(json.dumps(gen.as_dict(), ensure_ascii=False) + "\n")
        if gen.selection is not None and gen.selection.note:
            err.print(f"[yellow]note:[/] {gen.selection.note}", soft_wrap=True)
        t = gen.timings
        chosen = (
            f" ({gen.selection.strategy} chose alpha={used.params['alpha']:g} beta={used.params['beta']:g})"
            if gen.selection
            else ""
        )
        err.print(
            f"[dim]{used.method} {_weights_text(used.weights)}{chosen} | prompt {t.prompt_tokens} tok "
            f"{t.prompt_tokens_per_s:.1f} tok/s | generated {t.gen_tokens} tok {t.gen_tokens_per_s:.1f} tok/s "
            f"| stop: {gen.finish_reason}[/]",
            soft_wrap=True,
        )


def _prompt(modelset: ModelSet, engine: tm.Engine, text: str, raw: bool, chat: bool, system: str | None):
    """The prompt as the model sees it: the text, the profile's template around it, or (``--chat``) a
    user message through the chat template, the same tokens the server's chat route builds."""
    if chat:
        return chat_prompt(engine, modelset.profile.template if modelset.profile is not None else None, text, system)
    return modelset.prompt(engine, text, raw)


def _generate_batch(
    batch: Path,
    modelset: ModelSet,
    paths: dict[str, Path],
    defaults: BatchDefaults,
    raw: bool,
    parallel: int | None,
    loading: EngineArgs,
    verbose: bool,
    chat: bool = False,
    system: str | None = None,
) -> None:
    """``generate --batch``: one JSON object per line of the file on stdout, in input order; a line
    that fails gets an error object (and a line on stderr), and the exit code is 1."""
    if str(batch) == "-":
        lines = read_batch(Path("stdin"), _decode_utf8(sys.stdin.buffer.read(), "the batch on stdin"))
    else:
        lines = read_batch(batch)
    failed = 0
    with loading.open(modelset, paths, verbose, n_seq=4 if parallel is None else parallel) as engine:

        def spec(settings):
            return line_spec(defaults, settings, modelset.profile)

        make = lambda p: _prompt(modelset, engine, p, raw, chat, system)  # noqa: E731
        for res in run_batch(engine, lines, spec, make, batch.name):
            sys.stdout.write(json.dumps(res.as_dict(), ensure_ascii=False) + "\n")
            sys.stdout.flush()
            if res.error is not None:
                failed += 1
                err.print(f"[bold red]error:[/] {escape(res.error)}", soft_wrap=True)
    done = len(lines) - failed
    err.print(f"[dim]{done} of {len(lines)} prompts generated[/]", soft_wrap=True)
    if failed:
        raise typer.Exit(1)


@app.command("select")
@grouped
def select_cmd(
    prompt: Prompt = None,
    file: PromptFile = None,
    modelset: ModelSet = MODELS_TRIO,
    raw: Raw = False,
    grid: MethodChoice = group(selection, ("strategy", SelectStrategy, "ppl"), *GRID),
    as_json: Json = False,
    loading: EngineArgs = ENGINE,
    verbose: Verbose = False,
) -> None:
    """Show the whole (alpha, beta) landscape for a prompt and the pair TriMix would pick."""
    with errors(verbose):
        text = read_prompt(prompt, file)
        paths = modelset.paths(SELECTION_ROLES, "selection")
        chooser = selector(grid)
        with loading.open(modelset, paths, verbose) as engine:
            sel = engine.select(modelset.prompt(engine, text, raw), chooser)
        if as_json:
            sys.stdout.write(json.dumps(sel.as_dict(), ensure_ascii=False) + "\n")
        else:
            render.landscape(render.out, sel)
        if sel.note:
            err.print(f"[yellow]note:[/] {sel.note}", soft_wrap=True)
        err.print(f"[dim]{sel.n_tokens} prompt tokens, selection took {sel.seconds:.2f} s[/]", soft_wrap=True)


@app.command()
@grouped
def calibrate(
    prompts: Annotated[Path, typer.Option("--prompts", help='JSONL file, one {"prompt": ...} object per line.')],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the weights JSON.")] = Path(
        "trimix-weights.json"
    ),
    modelset: ModelSet = MODELS_TRIO,
    raw: Raw = False,
    n: Annotated[int, typer.Option("--n", help="How many prompts to sample.")] = 50,
    seed: Annotated[int, typer.Option(help="Seed of the prompt sample.")] = 0,
    grid: MethodChoice = group(selection, *GRID, ("strategy", CalibrateStrategy, "ppl")),
    loading: EngineArgs = ENGINE,
    verbose: Verbose = False,
) -> None:
    """Pick one (alpha, beta) for a whole task from a sample of its prompts, and save it."""
    with errors(verbose):
        check_output_path(output)
        paths = modelset.paths(SELECTION_ROLES, "calibration")
        sample = sample_prompts(read_prompts(prompts), n, seed)
        chooser = selector(grid)
        with loading.open(modelset, paths, verbose) as engine, render.progress(err) as bar:
            task = bar.add_task("calibrating", total=len(sample))
            formatted = [modelset.prompt(engine, p, raw) for p in sample]
            cal = run_calibration(engine, formatted, chooser, paths, lambda k: bar.update(task, completed=k))
        cal = cal[chooser.strategy]
        cal.save(output)
        a, b = cal.chosen
        left_out = [f"{cal.n_skipped} too long for the context"] if cal.n_skipped else []
        left_out += [f"{cal.n_short} of one token, which has no perplexity"] if cal.n_short else []
        skipped = f" (left out: {'; '.join(left_out)})" if left_out else ""
        err.print(f"chose alpha={a:g} beta={b:g} over {cal.n_prompts} prompts{skipped}; wrote {output}", soft_wrap=True)


@app.command()
@grouped
def ppl(
    text_file: Annotated[Path, typer.Argument(help="UTF-8 text file to score.")],
    modelset: ModelSet = MODELS_TRIO,
    methods: Annotated[
        str,
        typer.Option(
            help="Comma-separated: large-ins, small-cpt, small-base, proxy, contrastive, trimix@A:B, and "
            "trimix-grid (every pair of the grid; reports the best one, chosen on this text)."
        ),
    ] = "large-ins,small-cpt,small-base,proxy,contrastive,trimix-grid",
    window: Annotated[int | None, typer.Option(help="Tokens per scoring window (default: the context).")] = None,
    grid: MethodChoice = group(MethodChoice, *GRID),
    as_json: Json = False,
    loading: EngineArgs = ENGINE,
    verbose: Verbose = False,
) -> None:
    """Perplexity of a text file under each method (any length: overlapping windows)."""
    with errors(verbose):
        if not text_file.is_file():
            raise tm.TrimixError(f"text file not found: {text_file}")
        text = _decode_utf8(text_file.read_bytes(), f"text file {text_file}")
        plans, grid_selector = perplexity_methods(methods, grid)
        paths = modelset.paths(scoring_roles(plans.values(), grid_selector is not None), "scoring")
        budget = DEFAULT_MAX_LOGITS_MIB if grid.max_logits_mib is None else grid.max_logits_mib
        with loading.open(modelset, paths, verbose) as engine:
            scores, grid_scores = engine.perplexity(
                text, plans, window=window, max_logits_mib=budget, grid=grid_selector
            )
        rows = score_rows(scores, grid_scores)
        if as_json:
            report = finite.json_safe({"file": str(text_file), "methods": rows})  # JSON has no inf: null
            sys.stdout.write(json.dumps(report, ensure_ascii=False) + "\n")
        else:
            table = Table(title=f"perplexity of {text_file.name}", title_justify="left")
            for col in ("method", "perplexity", "NLL/token", "tokens"):
                table.add_column(col, justify="left" if col == "method" else "right")
            for r in rows:
                table.add_row(r["method"], f"{r['ppl']:.3f}", f"{r['nll']:.4f}", str(r["tokens"]))
            render.out.print(table)
            if any(r["masked"] for r in rows):
                err.print("[dim]inf: the plausibility constraint ruled out some true tokens[/]", soft_wrap=True)


@app.command("eval")
@grouped
def eval_cmd(
    tasks: Annotated[
        list[str],
        typer.Argument(
            help="FILE.jsonl, milic:ROOT:TASK:LANG[:SRC-TGT], belebele:FILE:LANG or sib200:FILE:LANG. MiLiC-Eval "
            "TASK is a folder as distributed (translation_dialogue, title_generation_200, text_classification, "
            "response_selection, reading_comprehension, math); translation goes from LANG into English unless "
            "a direction follows: milic:ROOT:translation_dialogue:ug:en-ug translates English into Uyghur "
            "(the paper's LRL-G), ...:ug:ug-en Uyghur into English (ENG-G, the default)."
        ),
    ],
    modelset: ModelSet = MODELS_TRIO,
    methods: Annotated[str, typer.Option(help="Comma-separated methods to compare.")] = DEFAULT_METHODS,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder; rerun the same command to resume.")] = Path(
        "trimix-eval"
    ),
    train: Annotated[Path | None, typer.Option(help="File of in-context examples (JSONL, Belebele, SIB-200).")] = None,
    shots: Annotated[int, typer.Option(help="In-context examples per prompt (fewer when the context overflows).")] = 5,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N items of each task.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens per generated answer.")] = 64,
    mc_mode: Annotated[
        str, typer.Option(help="Multiple choice: generate (first letter of a short answer) or score (likelihood).")
    ] = "generate",
    calibration_n: Annotated[int, typer.Option(help="Prompts sampled per task for trimix-ppl-task.")] = 50,
    rouge_tokenizer: Annotated[
        str,
        typer.Option(
            help="ROUGE-L tokens: xlsum (XL-Sum's multilingual ROUGE, as MiLiC-Eval scores titles) or script "
            "(letters, marks and digits of any script; symbols dropped)."
        ),
    ] = "xlsum",
    grid_alpha: GridAlpha = None,
    grid_beta: GridBeta = None,
    plot_file: Annotated[
        Path | None, typer.Option("--plot", help="Draw per-task bars and landscapes to a PNG.")
    ] = None,
    draft: Annotated[
        int, typer.Option("--draft", help="Speculative decoding for the methods with a large model (same answers).")
    ] = 0,
    loading: EngineArgs = ENGINE,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="ADDRESS",
            help="Predict items on Ray workers: local (a Ray instance on this machine, for this run), HOST:PORT of "
            "a cluster's head, or auto (the cluster this node joined). Every node needs the same model files; "
            "--threads is per worker (default 1).",
            rich_help_panel="Cluster (Ray)",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", help="Ray workers, each loading the models once (default 2).", rich_help_panel="Cluster (Ray)"
        ),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Compare single models, Proxy Tuning, Contrastive Decoding and TriMix on tasks; resumable.

    Per item, every method runs from one evaluation of the prompt in each model and all methods
    generate together as one batch.
    """
    with errors(verbose):
        backend = backend_for(ray_address, workers, loading.threads)
        if plot_file is not None:
            check_plot(plot_file)
        options = loading.options(modelset, verbose)
        cfg = EvalConfig(
            methods=methods,
            out=out,
            train=train,
            shots=shots,
            limit=limit,
            max_tokens=max_tokens,
            mc_mode=mc_mode,
            calibration_n=calibration_n,
            grid_alpha=grid_alpha,
            grid_beta=grid_beta,
            rouge_tokenizer=rouge_tokenizer,
            draft=draft,
        )
        run_eval(tasks, modelset, options, cfg, plot_file, backend)
        err.print(
            f"[dim]predictions: {out / 'predictions.jsonl'}; results: {out / 'results.json'}, {out / 'results.md'}[/]",
            soft_wrap=True,
        )


def _weights_text(weights: dict[str, float]) -> str:
    return " ".join(f"{r}={w:g}" for r, w in weights.items())


@app.command()
def inspect(
    models: Annotated[
        list[Path] | None, typer.Argument(help="GGUF files (with --lang: added to the profile's).")
    ] = None,
    lang: Annotated[
        str | None, typer.Option("--lang", "-l", help="Inspect this profile's model files (those present).")
    ] = None,
    as_json: Json = False,
    verbose: Verbose = False,
) -> None:
    """Show each model's architecture, vocabulary, quantization and context, and whether they fuse."""
    with errors(verbose):
        tm._llama.set_verbose(verbose)
        files = [*(profile_files(lang) if lang is not None else []), *(models or [])]
        if not files:
            raise tm.TrimixError("give one or more GGUF files, or --lang CODE to inspect a profile's models")
        check = tm.inspect_models(files)
        if as_json:
            payload = {
                "models": [m.as_dict() for m in check.models],
                "fusable": check.fusable,
                "shared_vocab": check.shared_vocab,
                "reason": check.reason,
            }
            sys.stdout.write(json.dumps(payload, ensure_ascii=False) + "\n")
        else:
            table = Table(title="GGUF models", title_justify="left")
            table.add_column("")
            for m in check.models:
                table.add_column(Path(m.path).name, overflow="fold")
            props = [
                ("name", lambda m: m.name),
                ("architecture", lambda m: m.architecture),
                ("vocabulary", lambda m: f"{m.vocab_size:,} ({m.vocab_type})"),
                ("quantization", lambda m: m.quantization),
                ("context length", lambda m: f"{m.context_length:,}"),
                ("file size", lambda m: f"{m.file_size_bytes / 2**20:.1f} MiB"),
                ("adds BOS", lambda m: "yes" if m.add_bos else "no"),
            ]
            for label, get in props:
                table.add_row(label, *(get(m) for m in check.models))
            render.out.print(table)
            mark = "[green]fusable[/]" if check.fusable else "[red]not fusable[/]"
            render.out.print(f"{mark}: {check.reason}")
        if not check.fusable:
            raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
