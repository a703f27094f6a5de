"""Rules the command line shares with the library, each kept in one place: which models a server
loads, which methods ``trimix ppl`` scores and its best grid pair, the fields a server request and a
batch line may set, and the option groups the commands declare once."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from trimix_cli.options import EngineArgs, group, grouped, model_set
from trimix_cpp.batch import SPEC_FIELDS, BatchDefaults, line_spec
from trimix_cpp.errors import TrimixError
from trimix_cpp.evaluation.predict import perplexity_methods
from trimix_cpp.methods import SAMPLING_FIELDS, MethodChoice, sampling_params
from trimix_cpp.modelset import ModelSet
from trimix_cpp.scoring import MethodScore, score_rows
from trimix_cpp.selection import DEFAULT_MAX_LOGITS_MIB, GridScores, Selection, Selector
from trimix_cpp.server.defaults import ServeDefaults, roles_to_load
from trimix_cpp.server.schema import CHOICE_FIELDS, TrimixSettings


def test_a_server_loads_the_given_files_and_the_profiles_but_its_large_base_only_for_trimix4():
    demo = ModelSet.make("demo")
    assert roles_to_load(demo, "trimix") == ["large_ins", "small_cpt", "small_base"]
    assert roles_to_load(demo, "trimix4") == ["large_ins", "small_cpt", "small_base", "large_base"]
    only = ModelSet.make(None, {"small_cpt": "a.gguf", "large_base": "b.gguf"})
    assert roles_to_load(only, "proxy") == ["small_cpt", "large_base"]
    assert roles_to_load(ModelSet.make(), None) == ["large_ins", "small_cpt", "small_base"]


def test_ppl_scores_the_fixed_methods_and_the_grid_it_names():
    plans, grid = perplexity_methods("large-ins, proxy,trimix@0.1:0.9,trimix-grid")
    assert list(plans) == ["large-ins", "proxy", "trimix@0.1:0.9"]
    assert plans["trimix@0.1:0.9"].params == {"alpha": 0.1, "beta": 0.9}
    assert isinstance(grid, Selector) and grid.strategy == "ppl" and grid.max_logits_mib == DEFAULT_MAX_LOGITS_MIB
    _, grid = perplexity_methods("trimix-grid", MethodChoice(grid_alpha="0.5,0.1", max_logits_mib=64))
    assert grid is not None and grid.alphas == (0.1, 0.5) and grid.max_logits_mib == 64
    alone, no_grid = perplexity_methods("small-cpt")
    assert list(alone) == ["small-cpt"] and alone["small-cpt"].roles == ("small_cpt",) and no_grid is None
    with pytest.raises(TrimixError, match="for perplexity use trimix-grid"):
        perplexity_methods("trimix-ppl")
    with pytest.raises(TrimixError, match="apply to trimix-grid"):
        perplexity_methods("large-ins", MethodChoice(grid_beta="0.5"))
    with pytest.raises(TrimixError, match="--methods is empty"):
        perplexity_methods(" , ")


def test_the_best_grid_pair_has_the_lowest_mean_nll_and_ties_go_to_the_smaller_alpha():
    nll = np.array([[3.0, 2.0], [2.0, 5.0]]) * 4  # (0.1, 0.9) and (0.5, 0.1) tie at a mean of 2
    scores = GridScores((0.1, 0.5), (0.1, 0.9), nll, n_rows=4)
    assert scores.best() == (0.1, 0.9, 2.0)
    rows = score_rows({"large-ins": MethodScore(nll_sum=8.0, n_tokens=4)}, scores)
    assert [r["method"] for r in rows] == ["large-ins", "trimix-ppl@0.1:0.9"]
    assert rows[1]["alpha"] == 0.1 and rows[1]["beta"] == 0.9 and rows[1]["tokens"] == 4
    assert rows[1]["ppl"] == pytest.approx(np.exp(2.0)) and rows[0]["nll"] == 2.0


def test_a_selection_runs_as_trimix_with_its_chosen_pair():
    sel = Selection("ppl", (0.1, 0.3), (0.5,), np.zeros((2, 1)), (0.3, 0.5), {}, 7)
    assert sel.plan().method == "trimix" and sel.plan().params == {"alpha": 0.3, "beta": 0.5}


def test_a_request_sets_the_library_fusion_choice_less_the_servers_own_settings():
    names = [f.name for f in dataclasses.fields(MethodChoice)]
    assert list(CHOICE_FIELDS) == [n for n in names if n not in ("weights_from", "max_logits_mib")]
    assert list(TrimixSettings.model_fields) == [*CHOICE_FIELDS, "draft", "utf8_guard"]
    assert TrimixSettings.model_validate({"grid_alpha": [0.1, 0.5]}).grid_alpha == [0.1, 0.5]
    with pytest.raises(ValueError):
        TrimixSettings.model_validate({"weights_from": "w.json"})  # a file on the server's disk: not a request's
    defaults = ServeDefaults(method="proxy", beta=0.5, temperature=0.7)
    assert isinstance(defaults, MethodChoice) and defaults.resolved(None).beta == 0.5


def test_a_batch_line_overrides_the_commands_sampling_and_spec_fields():
    assert SAMPLING_FIELDS[:2] == ("temperature", "top_k") and "presence_penalty" in SAMPLING_FIELDS
    assert set(SPEC_FIELDS) == {"max_tokens", "stop", "utf8_guard", "draft", "logprobs"}
    defaults = BatchDefaults(
        MethodChoice(method="single"), {"temperature": 0.5, "seed": 3}, {"max_tokens": 9, "stop": ("\n",)}
    )
    spec = line_spec(defaults, {"seed": 4, "stop": "END", "draft": 2})
    assert spec.sampling == sampling_params(temperature=0.5, seed=4)
    assert (spec.max_tokens, spec.stop, spec.draft, spec.utf8_guard) == (9, ("END",), 2, True)
    assert line_spec(BatchDefaults(MethodChoice(method="single")), {}).max_tokens == 256  # SeqSpec's default


def test_an_option_group_stands_in_its_place_and_builds_one_object():
    seen: dict[str, Any] = {}
    wording = Annotated[int | None, typer.Option("--n-ctx", help="A command's own wording.")]
    app = typer.Typer()

    @app.command()
    @grouped
    def cmd(
        first: Annotated[str, typer.Option()] = "a",
        grid: MethodChoice = group(MethodChoice, ("grid_alpha", Annotated[str, typer.Option()], "0.5")),
        modelset: ModelSet = group(model_set, "lang", "large_ins"),
        loading: EngineArgs = group(EngineArgs, "n_ctx", "threads", own={"n_ctx": wording}),
        last: Annotated[int, typer.Option()] = 0,
    ) -> None:
        seen.update(first=first, grid=grid, modelset=modelset, loading=loading, last=last)

    help_text = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    order = [help_text.index(flag) for flag in ("--first", "--lang", "--large-ins", "--n-ctx", "--threads", "--last")]
    assert order == sorted(order) and "A command's own wording." in help_text
    r = CliRunner().invoke(app, ["--large-ins", "x.gguf", "--n-ctx", "64", "--last", "2"])
    assert r.exit_code == 0, r.output
    assert seen["modelset"].explicit == {"large_ins": Path("x.gguf")} and seen["last"] == 2
    assert seen["loading"] == EngineArgs(n_ctx=64, threads=0) and seen["grid"] == MethodChoice(grid_alpha="0.5")
    r = CliRunner().invoke(app, ["--lang", "no-such-language"])
    assert r.exit_code == 1 and "no-such-language" in r.output and "Traceback" not in r.output
