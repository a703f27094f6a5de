"""The ``trimix`` command line: a thin Typer layer over :mod:`trimix_cpp`.

stdout carries only what a script wants (the generated text, or one JSON object); everything for a
person (statistics, tables, errors) goes to stderr through rich. Every error is one line and a
non-zero exit code; ``--verbose`` adds the traceback and llama.cpp's own log.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import trimix_cpp as tm
from trimix_cpp.batch import BatchDefaults, line_spec, read_batch, run_batch
from trimix_cpp.calibrate import calibrate as run_calibration
from trimix_cpp.calibrate import check_output_path, read_prompts, sample_prompts
from trimix_cpp.chat_template import chat_prompt
from trimix_cpp.evaluation.run import EvalConfig
from trimix_cpp.evaluation.runner import DEFAULT_METHODS
from trimix_cpp.evaluation.runner import parse_methods as eval_methods
from trimix_cpp.generation import check_logprobs
from trimix_cpp.methods import MethodChoice, check_models_used, fusion_roles, resolve_fusion, sampling_params
from trimix_cpp.modelset import ModelSet
from trimix_cpp.selection import SELECTION_ROLES, Selector, choose

from . import models as models_cmd
from . import render
from .chat import chat as chat_cmd
from .common import Verbose, err, errors
from .evaluate import run_eval
from .serve import SERVE_HELP
from .serve import serve as serve_cmd

app = typer.Typer(
    name="trimix",
    help="Fuse the next-token logits of several GGUF models (TriMix) through llama.cpp.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


app.add_typer(models_cmd.app, name="models")
app.command("serve", help=SERVE_HELP)(serve_cmd)
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


def _model_set(lang: str | None, **paths: Path | None) -> ModelSet:
    return ModelSet.make(lang, paths)


# Shared option declarations -----------------------------------------------------------------------

LargeIns = Annotated[Path | None, typer.Option("--large-ins", help="GGUF of the large instruction model.")]
SmallCpt = Annotated[
    Path | None, typer.Option("--small-cpt", help="GGUF of the small model continued on the language.")
]
SmallBase = Annotated[Path | None, typer.Option("--small-base", help="GGUF of the small base model.")]
LargeBase = Annotated[Path | None, typer.Option("--large-base", help="GGUF of the large base model (trimix4 only).")]
NCtx = Annotated[
    int | None, typer.Option("--n-ctx", help="Context length in tokens (prompt + generation); default 4096.")
]
Lang = Annotated[
    str | None,
    typer.Option("--lang", "-l", help="Language profile (bod, uig, kaz, mvf, demo, ...): models and defaults."),
]
Raw = Annotated[bool, typer.Option("--raw", help="Send the prompt as it is, without the profile's template.")]
Threads = Annotated[int, typer.Option("--threads", "-t", help="CPU threads per model (0: every core).")]
NGpu = Annotated[
    int, typer.Option("--n-gpu-layers", "-ngl", help="Layers on the GPU (-1: all, if the build has a GPU).")
]


SelectOpt = Annotated[
    str | None,
    typer.Option(
        "--select",
        help="How TriMix picks (alpha, beta): fixed (--alpha/--beta), ppl (lowest fused perplexity of the "
        "prompt) or ent (lowest entropy of the first generated token). Default: fixed when --alpha and "
        "--beta are given, else ppl. Ties go to the smaller alpha, then the smaller beta.",
    ),
]
GridAlpha = Annotated[str | None, typer.Option("--grid-alpha", help="Alpha values to try, e.g. 0.1,0.5,0.9.")]
GridBeta = Annotated[
    str | None, typer.Option("--grid-beta", help="Beta values to try (default 0.1,0.3,0.5,0.7,0.9,1).")
]
MaxLogits = Annotated[
    float | None,
    typer.Option("--max-logits-mib", help="Memory bound for perplexity selection's logits, in MiB (default 512)."),
]


def _selector(strategy: str, grid_alpha: str | None, grid_beta: str | None, max_logits_mib: float | None) -> Selector:
    choice = MethodChoice(select=strategy, grid_alpha=grid_alpha, grid_beta=grid_beta, max_logits_mib=max_logits_mib)
    fusion = resolve_fusion(choice)
    assert isinstance(fusion, Selector)
    return fusion


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="The prompt; '-' reads stdin.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the prompt from this file.")] = None,
    large_ins: LargeIns = None,
    small_cpt: SmallCpt = None,
    small_base: SmallBase = None,
    large_base: LargeBase = None,
    lang: Lang = None,
    method: Annotated[
        str | None, typer.Option(help="trimix | trimix4 | proxy | contrastive | single (default: trimix)")
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="Weight of the large instruction model.")] = None,
    beta: Annotated[float | None, typer.Option(help="Weight of the small continued model.")] = None,
    gamma: Annotated[float | None, typer.Option(help="Scaling weight (trimix4).")] = None,
    role: Annotated[str | None, typer.Option(help="The model used by --method single (default large_ins).")] = None,
    select: SelectOpt = None,
    grid_alpha: GridAlpha = None,
    grid_beta: GridBeta = None,
    max_logits_mib: MaxLogits = None,
    weights_from: Annotated[
        Path | None, typer.Option("--weights-from", help="Use the (alpha, beta) saved by trimix calibrate.")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")] = 256,
    temperature: Annotated[
        float | None, typer.Option("--temperature", "--temp", help="Sampling temperature (default 0: greedy).")
    ] = None,
    top_k: Annotated[int | None, typer.Option(help="Keep the k most likely tokens (0: off).")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass (1: off).")] = None,
    min_p: Annotated[float | None, typer.Option(help="Drop tokens below min_p x the top probability.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed: same seed, same output (default 0).")] = None,
    repeat_penalty: Annotated[
        float | None, typer.Option(help="Penalise tokens seen in the last --repeat-last-n tokens (1: off).")
    ] = None,
    repeat_last_n: Annotated[
        int | None, typer.Option(help="Tokens the penalties look back over, prompt included (default 64; -1: all).")
    ] = None,
    frequency_penalty: Annotated[
        float | None, typer.Option(help="Subtracted from a token's logit per occurrence in the window (0: off).")
    ] = None,
    presence_penalty: Annotated[
        float | None, typer.Option(help="Subtracted once from the logit of a token in the window (0: off).")
    ] = None,
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
            "model checks them in one batch. Same output as 0 (off).",
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
    n_ctx: NCtx = None,
    threads: Threads = 0,
    n_gpu_layers: NGpu = -1,
    verbose: Verbose = False,
) -> None:
    """Generate text with fused logits, streaming whole characters to stdout.

    Sampling follows llama.cpp's order: top-k, top-p and min-p on the distribution at temperature 1,
    then the temperature, then the draw. Flags that the chosen method or decoding would ignore are
    refused.
    """
    with errors(verbose):
        setup = _model_set(lang, large_ins=large_ins, small_cpt=small_cpt, small_base=small_base, large_base=large_base)
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
        choice = MethodChoice(
            method=method,
            alpha=alpha,
            beta=beta,
            gamma=gamma,
            role=role,
            select=select,
            grid_alpha=grid_alpha,
            grid_beta=grid_beta,
            max_logits_mib=max_logits_mib,
            weights_from=weights_from,
        )
        fusion = resolve_fusion(choice, setup.profile, lambda roles: setup.paths(roles, "--weights-from"))
        method_name = fusion.method if isinstance(fusion, tm.FusionPlan) else "trimix"
        check_models_used(fusion, list(setup.explicit), method_name)
        roles = fusion_roles(fusion)
        paths = setup.paths(roles, f"method {method_name}")
        penalties = dict(
            repeat_penalty=repeat_penalty,
            repeat_last_n=repeat_last_n,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
        )
        sampling = sampling_params(temperature, top_k, top_p, min_p, seed, **penalties)
        check_logprobs(logprobs)
        stops = setup.stops([unescape(s) for s in stop] if stop is not None else None)
        if batch is not None:
            defaults = BatchDefaults(
                choice,
                max_tokens,
                temperature,
                top_k,
                top_p,
                min_p,
                seed,
                tuple(stops),
                utf8_guard,
                draft,
                logprobs=logprobs,
                **penalties,
            )
            _generate_batch(
                batch, setup, paths, defaults, raw, parallel, n_ctx, threads, n_gpu_layers, verbose, chat, system
            )
            return
        options = setup.load_options(n_ctx, threads, n_gpu_layers, verbose)
        with tm.Engine(paths, options) as engine:
            prompt_ids = _prompt(setup, engine, text, raw, chat, system)
            spec = tm.SeqSpec(fusion, sampling, max_tokens, tuple(stops), utf8_guard, draft, logprobs)
            gen = engine.generate_many(prompt_ids, [spec])[0]
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


def _prompt(setup: ModelSet, engine: tm.Engine, text: str, raw: bool, chat: bool, system: str | None):
    """The prompt as the model sees it: the text, the profile's template around it, or (``--chat``) a
    user message through the chat template, the same tokens the server's chat route builds."""
    if chat:
        return chat_prompt(engine, setup.profile.template if setup.profile is not None else None, text, system)
    return setup.prompt(engine, text, raw)


def _generate_batch(
    batch: Path,
    setup: ModelSet,
    paths: dict[str, Path],
    defaults: BatchDefaults,
    raw: bool,
    parallel: int | None,
    n_ctx: int | None,
    threads: int,
    n_gpu_layers: int,
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
    options = setup.load_options(n_ctx, threads, n_gpu_layers, verbose, n_seq=4 if parallel is None else parallel)
    failed = 0
    with tm.Engine(paths, options) as engine:

        def spec(settings):
            return line_spec(defaults, settings, setup.profile)

        make = lambda p: _prompt(setup, engine, p, raw, chat, system)  # noqa: E731
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
def select_cmd(
    prompt: Annotated[str | None, typer.Argument(help="The prompt; '-' reads stdin.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the prompt from this file.")] = None,
    lang: Lang = None,
    large_ins: LargeIns = None,
    small_cpt: SmallCpt = None,
    small_base: SmallBase = None,
    raw: Raw = False,
    strategy: Annotated[
        str, typer.Option(help="ppl (perplexity of the prompt) or ent (entropy of the next token).")
    ] = "ppl",
    grid_alpha: GridAlpha = None,
    grid_beta: GridBeta = None,
    max_logits_mib: MaxLogits = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    n_ctx: NCtx = None,
    threads: Threads = 0,
    n_gpu_layers: NGpu = -1,
    verbose: Verbose = False,
) -> None:
    """Show the whole (alpha, beta) landscape for a prompt and the pair TriMix would pick."""
    with errors(verbose):
        setup = _model_set(lang, large_ins=large_ins, small_cpt=small_cpt, small_base=small_base)
        text = read_prompt(prompt, file)
        paths = setup.paths(SELECTION_ROLES, "selection")
        selector = _selector(strategy, grid_alpha, grid_beta, max_logits_mib)
        options = setup.load_options(n_ctx, threads, n_gpu_layers, verbose)
        with tm.Engine(paths, options) as engine:
            sel = engine.select(setup.prompt(engine, text, raw), selector)
        if as_json:
            sys.stdout.write(json.dumps(sel.as_dict(), ensure_ascii=False) + "\n")
        else:
            render.landscape(Console(), sel)
        if sel.note:
            err.print(f"[yellow]note:[/] {sel.note}", soft_wrap=True)
        err.print(f"[dim]{sel.n_tokens} prompt tokens, selection took {sel.seconds:.2f} s[/]", soft_wrap=True)


@app.command()
def calibrate(
    prompts: Annotated[Path, typer.Option("--prompts", help='JSONL file, one {"prompt": ...} object per line.')],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the weights JSON.")] = Path(
        "trimix-weights.json"
    ),
    lang: Lang = None,
    large_ins: LargeIns = None,
    small_cpt: SmallCpt = None,
    small_base: SmallBase = None,
    raw: Raw = False,
    n: Annotated[int, typer.Option("--n", help="How many prompts to sample.")] = 50,
    seed: Annotated[int, typer.Option(help="Seed of the prompt sample.")] = 0,
    grid_alpha: GridAlpha = None,
    grid_beta: GridBeta = None,
    max_logits_mib: MaxLogits = None,
    strategy: Annotated[
        str, typer.Option(help="ppl (mean perplexity of the prompts) or ent (entropy of their next token).")
    ] = "ppl",
    n_ctx: NCtx = None,
    threads: Threads = 0,
    n_gpu_layers: NGpu = -1,
    verbose: Verbose = False,
) -> None:
    """Pick one (alpha, beta) for a whole task from a sample of its prompts, and save it."""
    with errors(verbose):
        check_output_path(output)
        setup = _model_set(lang, large_ins=large_ins, small_cpt=small_cpt, small_base=small_base)
        paths = setup.paths(SELECTION_ROLES, "calibration")
        sample = sample_prompts(read_prompts(prompts), n, seed)
        selector = _selector(strategy, grid_alpha, grid_beta, max_logits_mib)
        options = setup.load_options(n_ctx, threads, n_gpu_layers, verbose)
        with tm.Engine(paths, options) as engine, render.progress(err) as bar:
            task = bar.add_task("calibrating", total=len(sample))
            formatted = [setup.prompt(engine, p, raw) for p in sample]
            cal = run_calibration(engine, formatted, selector, paths, lambda k: bar.update(task, completed=k))
        cal = cal[selector.strategy]
        cal.save(output)
        a, b = cal.chosen
        skipped = f" ({cal.n_skipped} too long for the context)" if cal.n_skipped else ""
        err.print(f"chose alpha={a:g} beta={b:g} over {cal.n_prompts} prompts{skipped}; wrote {output}", soft_wrap=True)


def parse_methods(spec: str) -> tuple[dict[str, tm.FusionPlan], bool]:
    """``large-ins,small-cpt,proxy,contrastive,trimix@0.1:0.9,trimix-grid`` -> named plans, and whether
    the whole TriMix grid is wanted. Method names are the evaluation's; only fixed-weight ones apply."""
    items = [x.strip() for x in spec.split(",") if x.strip()]
    grid = "trimix-grid" in items
    rest = [x for x in items if x != "trimix-grid"]
    plans: dict[str, tm.FusionPlan] = {}
    for m in eval_methods(",".join(rest)) if rest else []:
        if not isinstance(m.fusion, tm.FusionPlan):
            raise tm.TrimixError(f"{m.name} picks weights per prompt or per task; for perplexity use trimix-grid")
        plans[m.name] = m.fusion
    if not plans and not grid:
        raise tm.TrimixError("--methods is empty")
    return plans, grid


@app.command()
def ppl(
    text_file: Annotated[Path, typer.Argument(help="UTF-8 text file to score.")],
    lang: Lang = None,
    large_ins: LargeIns = None,
    small_cpt: SmallCpt = None,
    small_base: SmallBase = None,
    methods: Annotated[
        str,
        typer.Option(
            help="Comma-separated: large-ins, small-cpt, small-base, proxy, contrastive, trimix@A:B, and "
            "trimix-grid (every pair of the grid; reports the best one, chosen on this text)."
        ),
    ] = "large-ins,small-cpt,small-base,proxy,contrastive,trimix-grid",
    window: Annotated[int | None, typer.Option(help="Tokens per scoring window (default: the context).")] = None,
    grid_alpha: GridAlpha = None,
    grid_beta: GridBeta = None,
    max_logits_mib: MaxLogits = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    n_ctx: NCtx = None,
    threads: Threads = 0,
    n_gpu_layers: NGpu = -1,
    verbose: Verbose = False,
) -> None:
    """Perplexity of a text file under each method (any length: overlapping windows)."""
    with errors(verbose):
        if not text_file.is_file():
            raise tm.TrimixError(f"text file not found: {text_file}")
        text = _decode_utf8(text_file.read_bytes(), f"text file {text_file}")
        plans, want_grid = parse_methods(methods)
        if not want_grid and (grid_alpha is not None or grid_beta is not None):
            raise tm.TrimixError("--grid-alpha/--grid-beta apply to trimix-grid, which --methods does not list")
        setup = _model_set(lang, large_ins=large_ins, small_cpt=small_cpt, small_base=small_base)
        roles = {r for p in plans.values() for r in p.roles} | (set(SELECTION_ROLES) if want_grid else set())
        paths = setup.paths(tuple(r for r in tm.ROLES if r in roles), "scoring")
        options = setup.load_options(n_ctx, threads, n_gpu_layers, verbose)
        grid = _selector("ppl", grid_alpha, grid_beta, max_logits_mib) if want_grid else None
        with tm.Engine(paths, options) as engine:
            budget = 512.0 if max_logits_mib is None else max_logits_mib
            scores, grid_scores = engine.perplexity(text, plans, window=window, max_logits_mib=budget, grid=grid)
        rows = [
            {"method": name, "nll": s.nll, "ppl": s.ppl, "tokens": s.n_tokens, "masked": s.n_masked}
            for name, s in scores.items()
        ]
        if grid_scores is not None:
            mean = grid_scores.mean_nll
            a, b = choose(grid_scores.alphas, grid_scores.betas, mean)
            nll = float(mean[grid_scores.alphas.index(a), grid_scores.betas.index(b)])
            rows.append(
                {
                    "method": f"trimix-ppl@{a:g}:{b:g}",
                    "nll": nll,
                    "ppl": math.exp(nll),
                    "tokens": grid_scores.n_rows,
                    "masked": 0,
                    "alpha": a,
                    "beta": b,
                }
            )
        if as_json:
            sys.stdout.write(json.dumps({"file": str(text_file), "methods": rows}, ensure_ascii=False) + "\n")
        else:
            table = Table(title=f"perplexity of {text_file.name}", title_justify="left")
            for col in ("method", "perplexity", "NLL/token", "tokens"):
                table.add_column(col, justify="left" if col == "method" else "right")
            for r in rows:
                table.add_row(r["method"], f"{r['ppl']:.3f}", f"{r['nll']:.4f}", str(r["tokens"]))
            Console().print(table)
            if any(r["masked"] for r in rows):
                err.print("[dim]inf: the plausibility constraint ruled out some true tokens[/]", soft_wrap=True)


@app.command("eval")
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
    lang: Lang = None,
    large_ins: LargeIns = None,
    small_cpt: SmallCpt = None,
    small_base: SmallBase = None,
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
    n_ctx: NCtx = None,
    threads: Threads = 0,
    n_gpu_layers: NGpu = -1,
    verbose: Verbose = False,
) -> None:
    """Compare single models, Proxy Tuning, Contrastive Decoding and TriMix on tasks; resumable.

    Per item, every method runs from one evaluation of the prompt in each model and all methods
    generate together as one batch.
    """
    with errors(verbose):
        setup = _model_set(lang, large_ins=large_ins, small_cpt=small_cpt, small_base=small_base)
        options = setup.load_options(n_ctx, threads, n_gpu_layers, verbose)
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
        run_eval(tasks, setup, options, cfg, plot_file)
        err.print(
            f"[dim]predictions: {out / 'predictions.jsonl'}; results: {out / 'results.json'}, {out / 'results.md'}[/]",
            soft_wrap=True,
        )


def _weights_text(weights: dict[str, float]) -> str:
    return " ".join(f"{r}={w:g}" for r, w in weights.items())


@app.command()
def inspect(
    models: Annotated[list[Path], typer.Argument(help="One or more GGUF files.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    verbose: Verbose = False,
) -> None:
    """Show each model's architecture, vocabulary, quantization and context, and whether they fuse."""
    with errors(verbose):
        tm._llama.set_verbose(verbose)
        check = tm.inspect_models(models)
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
            Console().print(table)
            mark = "[green]fusable[/]" if check.fusable else "[red]not fusable[/]"
            Console().print(f"{mark}: {check.reason}")
        if not check.fusable:
            raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
