"""``trimix chat``: a conversation in the terminal, over :class:`trimix_cpp.conversation.Conversation`.

This module reads lines (with line editing and history on a terminal, plain lines otherwise),
turns commands into settings changes of the conversation, streams each reply and prints one dim
line after it. Ctrl-C during a reply stops it (what was printed stays in the conversation); a
second Ctrl-C, or Ctrl-C or Ctrl-D at the prompt, ends the chat.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.markup import escape

import trimix_cpp as tm
from trimix_cpp.chat_template import NoChat, chat_format
from trimix_cpp.conversation import ChatSettings, Conversation, Turn
from trimix_cpp.methods import SAMPLING_FIELDS, MethodChoice, check_models_used, fusion_roles, resolve_fusion
from trimix_cpp.modelset import ModelSet

from .common import Verbose, err, errors, message
from .options import MODELS, EngineArgs, group, grouped

PROMPT = ">>> "
MORE = "... "
FENCE = '"""'

HELP = """commands:
  /help                      this list
  /clear                     forget the conversation (the system prompt stays)
  /regen                     generate the last reply again
  /system [TEXT]             set the system prompt (none: remove it)
  /weights A B               TriMix with fixed alpha A and beta B
  /select ppl|ent            TriMix choosing (alpha, beta) per turn by perplexity or entropy
  /method NAME               trimix, trimix4, proxy, contrastive or single (the profile's weights)
  /temp T, /top-k K, /top-p P, /min-p P, /seed N
  /repeat-penalty R, /repeat-last-n N, /frequency-penalty F, /presence-penalty P
  /max-tokens N              the longest reply
  /settings                  the settings in force
  /save FILE, /load FILE     the conversation as JSON
  /exit                      leave (also Ctrl-D, or Ctrl-C at the prompt)
Begin and end a message with \"\"\" to write several lines. Ctrl-C stops a reply."""

# /name -> (setting, parser, what the value is)
_NUMERIC: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "/temp": ("temperature", float, "a number >= 0"),
    "/temperature": ("temperature", float, "a number >= 0"),
    "/top-k": ("top_k", int, "a whole number"),
    "/top-p": ("top_p", float, "a number in (0, 1]"),
    "/min-p": ("min_p", float, "a number in [0, 1)"),
    "/seed": ("seed", int, "a whole number"),
    "/repeat-penalty": ("repeat_penalty", float, "a number > 0"),
    "/repeat-last-n": ("repeat_last_n", int, "a whole number >= -1"),
    "/frequency-penalty": ("frequency_penalty", float, "a number"),
    "/presence-penalty": ("presence_penalty", float, "a number"),
    "/max-tokens": ("max_tokens", int, "a whole number >= 1"),
}


class Quit(Exception):
    """The person asked to leave."""


def _number(parse: Callable[[str], Any], text: str, usage: str) -> Any:
    try:
        return parse(text)
    except ValueError:
        raise tm.TrimixError(f"usage: {usage}") from None


def run_command(conv: Conversation, line: str, out: Callable[[str], None]) -> Turn | None:
    """Carry out one ``/command``; a turn when it starts one (``/regen``)."""
    name, _, rest = line.strip().partition(" ")
    rest = rest.strip()
    args = rest.split()
    if name in ("/exit", "/quit", "/bye"):
        raise Quit
    if name in ("/help", "/?"):
        out(HELP)
    elif name == "/clear":
        conv.clear()
        out("conversation cleared")
    elif name == "/regen":
        return conv.regen()
    elif name == "/system":
        conv.system = rest or None
        out("system prompt set" if rest else "system prompt removed")
    elif name == "/weights":
        if len(args) != 2:
            raise tm.TrimixError("usage: /weights ALPHA BETA (e.g. /weights 0.1 0.9)")
        a, b = (_number(float, x, "/weights ALPHA BETA") for x in args)
        conv.configure(choice=MethodChoice(method="trimix", alpha=a, beta=b))
        out(f"weights: alpha={a:g} beta={b:g}")
    elif name == "/select":
        if len(args) != 1 or args[0] not in ("ppl", "ent"):
            raise tm.TrimixError("usage: /select ppl|ent")
        conv.configure(choice=MethodChoice(method="trimix", select=args[0]))
        out(f"TriMix chooses its weights per turn by {args[0]}")
    elif name == "/method":
        if len(args) != 1:
            raise tm.TrimixError("usage: /method trimix|trimix4|proxy|contrastive|single")
        needs = fusion_roles(resolve_fusion(MethodChoice(method=args[0]), conv.profile))
        missing = [r for r in needs if r not in conv.engine.models]
        if missing:
            raise tm.TrimixError(f"--method {args[0]} needs the {missing[0]} model, which this chat did not load")
        conv.configure(choice=MethodChoice(method=args[0]))
        out(f"method: {args[0]}")
    elif name in _NUMERIC:
        key, parse, what = _NUMERIC[name]
        if len(args) != 1:
            raise tm.TrimixError(f"usage: {name} VALUE ({what})")
        conv.configure(**{key: _number(parse, args[0], f"{name} VALUE ({what})")})
        out(f"{key} = {args[0]}")
    elif name == "/settings":
        for k, v in conv.settings.describe(conv.profile).items():
            out(f"  {k}: {v}")
        out(f"  system: {conv.system!r}")
    elif name == "/save":
        if not rest:
            raise tm.TrimixError("usage: /save FILE")
        conv.save(rest)
        out(f"saved {len(conv.messages)} messages to {rest}")
    elif name == "/load":
        if not rest:
            raise tm.TrimixError("usage: /load FILE")
        conv.load(rest)
        out(f"loaded {len(conv.messages)} messages from {rest}")
    else:
        raise tm.TrimixError(f"unknown command {name} (/help lists them)")
    return None


class Lines:
    """The person's input: prompt_toolkit on a terminal (line editing, history), plain lines otherwise."""

    def __init__(self) -> None:
        self.session: Any = None
        if sys.stdin.isatty() and sys.stdout.isatty():
            from prompt_toolkit import PromptSession
            from prompt_toolkit.history import InMemoryHistory

            self.session = PromptSession(history=InMemoryHistory())

    def read(self, prompt: str) -> str:
        """One line; EOFError at the end of input (Ctrl-D), KeyboardInterrupt on Ctrl-C."""
        if self.session is not None:
            return self.session.prompt(prompt)
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n").removesuffix("\r")

    def message(self) -> str:
        """One message: a line, or the lines between two \"\"\" fences."""
        first = self.read(PROMPT)
        if not first.lstrip().startswith(FENCE):
            return first
        body = first.lstrip()[len(FENCE) :]
        if body.rstrip().endswith(FENCE) and body.strip():
            return body.rstrip()[: -len(FENCE)]
        lines = [body] if body else []
        while True:
            line = self.read(MORE)
            if line.rstrip().endswith(FENCE):
                lines.append(line.rstrip()[: -len(FENCE)])
                return "\n".join(lines).rstrip("\n")
            lines.append(line)


class _Interrupts:
    """While a message is handled and its reply streams: the first Ctrl-C stops the reply (also one
    pressed before the reply began), a second one leaves."""

    def __init__(self) -> None:
        self.turn: Turn | None = None
        self.stopped = False
        self._old: Any = None

    def watch(self, turn: Turn) -> None:
        self.turn = turn
        if self.stopped:
            turn.generation.cancel()

    def __enter__(self) -> _Interrupts:
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._old)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stopped:
            raise KeyboardInterrupt
        self.stopped = True
        if self.turn is not None:
            self.turn.generation.cancel()  # the scheduler stops it at its next step


def _summary(turn: Turn) -> str:
    g = turn.generation
    f = g.fusion
    t = g.timings
    weights = " ".join(f"{k}={v:g}" for k, v in f.params.items()) if isinstance(f, tm.FusionPlan) else ""
    chosen = f" (chosen by {g.selection.strategy})" if g.selection is not None else ""
    method = f.method if isinstance(f, tm.FusionPlan) else "trimix"
    cached = f", {t.cached_tokens} cached" if t.cached_tokens else ""
    return (
        f"{method} {weights}{chosen} | {t.gen_tokens} tok {t.gen_tokens_per_s:.1f} tok/s | prompt {t.prompt_tokens} tok"
        f"{cached} {t.prompt_s:.2f} s | stop: {g.finish_reason}"
    )


def chat_loop(conv: Conversation, lines: Lines) -> None:
    """Read, reply, repeat, until the person leaves."""

    def note(text: str) -> None:
        err.print(f"[dim]{escape(text)}[/]", soft_wrap=True)

    while True:
        try:
            text = lines.message()
        except (EOFError, KeyboardInterrupt):
            return
        if not text.strip():
            continue
        try:
            with _Interrupts() as interrupts:
                if text.lstrip().startswith("/"):
                    turn = run_command(conv, text, note)
                else:
                    turn = conv.ask(text)
                if turn is None:
                    continue
                interrupts.watch(turn)
                if turn.dropped:
                    note(
                        f"note: the {turn.dropped} oldest turn{'s' if turn.dropped > 1 else ''} left the conversation "
                        f"to fit the context of {conv.engine.n_ctx} tokens"
                    )
                shown = []
                try:
                    for piece in turn.generation:
                        sys.stdout.write(piece)
                        sys.stdout.flush()
                        shown.append(piece)
                finally:
                    sys.stdout.write("\n")
                    sys.stdout.flush()
            conv.commit(turn, "".join(shown))
            note(_summary(turn))
        except Quit:
            return
        except KeyboardInterrupt:  # a second Ctrl-C while a reply stopped
            raise
        except tm.TrimixError as e:
            err.print(f"[bold red]error:[/] {escape(message(e))}", soft_wrap=True)


# chat's own wording of options other commands share
WORDING = {
    "select": Annotated[
        str | None,
        typer.Option(help="How TriMix picks (alpha, beta) each turn: fixed, ppl or ent (default: the profile's)."),
    ],
    "seed": Annotated[int | None, typer.Option(help="Sampling seed (default 0).")],
    "repeat_last_n": Annotated[
        int | None, typer.Option(help="Tokens the penalties look back over (default 64; -1: the whole context).")
    ],
    "frequency_penalty": Annotated[
        float | None, typer.Option(help="Subtracted per occurrence in the window (0: off).")
    ],
    "presence_penalty": Annotated[float | None, typer.Option(help="Subtracted once if in the window (0: off).")],
    "n_ctx": Annotated[int | None, typer.Option("--n-ctx", help="Context length in tokens (default: the profile's).")],
}


@grouped
def chat(
    modelset: ModelSet = MODELS,
    choice: MethodChoice = group(MethodChoice, "method", "alpha", "beta", "gamma", "role", "select", own=WORDING),
    system: Annotated[str | None, typer.Option("--system", help="The system prompt.")] = None,
    load: Annotated[Path | None, typer.Option("--load", help="Start from a conversation saved with /save.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="The longest reply, in tokens.")] = 256,
    sampling: dict[str, Any] = group(dict, *SAMPLING_FIELDS, own=WORDING),
    stop: Annotated[
        list[str] | None, typer.Option(help="Stop a reply at this string (repeatable; default: the profile's).")
    ] = None,
    loading: EngineArgs = group(EngineArgs, "n_ctx", "threads", "n_gpu_layers", own=WORDING),
    verbose: Verbose = False,
) -> None:
    """Chat with the fused models in the terminal (the model's chat template; /help lists the commands).

    Each turn evaluates only what it adds: the conversation stays in every model's KV cache.
    """
    with errors(verbose):
        from .main import unescape

        stops = modelset.stops([unescape(s) for s in stop] if stop is not None else None)
        settings = ChatSettings(choice, {k: v for k, v in sampling.items() if v is not None}, max_tokens, tuple(stops))
        spec = settings.spec(modelset.profile)  # refuse bad settings before minutes of loading
        name = spec.fusion.method if isinstance(spec.fusion, tm.FusionPlan) else "trimix"
        check_models_used(spec.fusion, list(modelset.explicit), name)
        paths = modelset.paths(fusion_roles(spec.fusion), f"method {name}")
        if load is not None:
            from trimix_cpp.conversation import read_conversation

            saved_system, saved = read_conversation(load)
        with loading.open(modelset, paths, verbose) as engine:
            fmt = chat_format(engine, modelset.profile.template if modelset.profile is not None else None)
            if isinstance(fmt, NoChat):
                raise tm.TrimixError(f"trimix chat needs a chat template: {fmt.reason}")
            conv = Conversation(engine, fmt, settings, modelset.profile, system)
            if load is not None:
                conv.messages = saved
                conv.system = system if system is not None else saved_system
            err.print(
                f"[dim]{len(engine.models)} models loaded, context {engine.n_ctx} tokens; /help lists the commands, "
                "Ctrl-D leaves[/]",
                soft_wrap=True,
            )
            try:
                chat_loop(conv, Lines())
            except KeyboardInterrupt:
                pass
            finally:
                conv.close()
