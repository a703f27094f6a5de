"""The built wheel: what an install from it (not an editable one) will have on disk.

``--lang demo`` and the shipped profiles must work from a wheel, so the profiles and the demo trio's
two small GGUF files have to be inside it, under trimix's own import names. The wheel is built from a
copy of the sources in a temporary folder, so the working tree gets no build/ or egg-info folders.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here uses the wheel the module builds (about 6 s)

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "trimix_cpp", "cli", "models")
# pip's words when a build requirement cannot be downloaded: no index, no network, no proxy.
OFFLINE = (
    "No matching distribution found",
    "Could not find a version that satisfies",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ProxyError",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, src / name)
    out = tmp / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        log = r.stdout + r.stderr
        if any(s in log for s in OFFLINE):
            pytest.skip("building a wheel needs setuptools from a package index, which cannot be reached")
        pytest.fail(f"pip wheel failed:\n{log[-4000:]}")
    (built,) = out.glob("trimix-*.whl")
    with zipfile.ZipFile(built) as zf:
        yield zf


def test_wheel_ships_profiles_and_demo_models(wheel):
    names = set(wheel.namelist())
    profiles = {f"trimix_models/{p.name}" for p in (ROOT / "models").glob("*.toml")}
    assert {"trimix_models/demo.toml", "trimix_models/bod.toml"} <= profiles <= names
    for gguf in ("small-cpt.gguf", "small-base.gguf"):
        info = wheel.getinfo(f"trimix_models/demo/{gguf}")
        assert info.file_size == (ROOT / "models" / "demo" / gguf).stat().st_size
    assert "trimix_models/__init__.py" in names and "trimix_models/README.md" in names
    # the recipe and its training data stay in the repository; the data the README's examples read ships
    shipped_data = {f"trimix_models/demo/data/{f}" for f in README_DATA}
    assert not [
        n
        for n in names
        if n.startswith("trimix_models/demo/") and not n.endswith((".gguf", ".md")) and n not in shipped_data
    ]


# The files the README's `trimix ppl` and `trimix eval` examples read from $DEMO (trimix_models.DEMO_DATA).
README_DATA = ("ug_heldout.txt", "translation_en_ug.test.jsonl", "translation_en_ug.train.jsonl")


def test_wheel_ships_the_data_of_the_readme_examples(wheel):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert set(re.findall(r"\$DEMO/([\w.-]+)", readme)) == set(README_DATA)
    for f in README_DATA:
        assert wheel.read(f"trimix_models/demo/data/{f}") == (ROOT / "models" / "demo" / "data" / f).read_bytes()
    init = wheel.read("trimix_models/__init__.py").decode()
    assert "DEMO_DATA" in init


def test_wheel_has_only_trimix_import_names(wheel):
    names = wheel.namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"trimix_cpp", "trimix_cli", "trimix_models"}
    assert "trimix_cli/main.py" in names and "trimix_cpp/evaluation/__init__.py" in names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "trimix = trimix_cli.main:main" in wheel.read(entry_points).decode()


def test_wheel_ships_the_chat_page(wheel):
    names = set(wheel.namelist())
    static = ROOT / "trimix_cpp" / "server" / "static"
    for asset in ("index.html", "app.js", "style.css"):
        assert (static / asset).is_file()
        assert wheel.read(f"trimix_cpp/server/static/{asset}") == (static / asset).read_bytes()
    assert "trimix_cpp/server/app.py" in names and "trimix_cli/serve.py" in names
