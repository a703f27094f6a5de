"""Bad input to ``trimix models convert`` and ``quantize``: one line that names the problem and the fix,
a non-zero exit, and nothing left behind: no output, no partial file. Every case runs the real command
in a subprocess, so a crash by signal would show as one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tinyckpt

TRIMIX = [sys.executable, "-m", "trimix_cli.main"]


def trimix(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "400"}  # one line on stderr is one line, however long
    return subprocess.run([*TRIMIX, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert res.returncode == 1, (res.returncode, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "━" not in ln]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def only(folder: Path, *names: str) -> None:
    """The output folder holds exactly these names: no partial or scratch file."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    return tinyckpt.write_checkpoint(tmp_path / "ckpt", "qwen2", seed=3)


@pytest.fixture()
def out(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.mark.slow
def test_a_good_checkpoint_converts(ckpt: Path, out: Path) -> None:
    res = trimix("models", "convert", str(ckpt), "-o", str(out / "m.gguf"), "--type", "q8_0")
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stderr
    only(out, "m.gguf")


@pytest.mark.slow
def test_missing_weights(ckpt: Path, out: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    one_line_error(trimix("models", "convert", str(ckpt), "-o", str(out / "m.gguf")), "no *.safetensors")
    only(out)


@pytest.mark.slow
def test_truncated_safetensors(ckpt: Path, out: Path) -> None:
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    one_line_error(trimix("models", "convert", str(ckpt), "-o", str(out / "m.gguf")), "truncated", "download it again")
    f.write_bytes(data[:5])
    one_line_error(trimix("models", "convert", str(ckpt), "-o", str(out / "m.gguf")), "truncated")
    only(out)


def test_shard_index_naming_a_missing_file(tmp_path: Path, out: Path) -> None:
    ckpt = tinyckpt.write_checkpoint(tmp_path / "sharded", "llama3", shards=3)
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    one_line_error(
        trimix("models", "convert", str(ckpt), "-o", str(out / "m.gguf")),
        "model-00002-of-00003.safetensors",
        "missing shard",
    )
    only(out)


@pytest.mark.slow
def test_unsupported_architecture(ckpt: Path, out: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    line = one_line_error(
        trimix("models", "convert", str(ckpt), "-o", str(out / "m.gguf")),
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "LlamaForCausalLM",
        "Gemma3ForCausalLM",
        "convert_hf_to_gguf.py",
    )
    assert "llama.cpp" in line
    only(out)


@pytest.mark.slow
def test_wrong_tensor_shape(ckpt: Path, out: Path) -> None:
    w = tinyckpt.read_safetensors(ckpt / "model.safetensors")
    w["model.layers.1.self_attn.k_proj.weight"] = w["model.layers.1.self_attn.k_proj.weight"][:-8]
    tinyckpt.write_safetensors(ckpt / "model.safetensors", {k: v.astype(np.float32) for k, v in w.items()})
    one_line_error(
        trimix("models", "convert", str(ckpt), "-o", str(out / "m.gguf")),
        "model.layers.1.self_attn.k_proj.weight",
        "[24, 64]",
        "[32, 64]",
    )
    only(out)


@pytest.mark.slow
def test_a_tensor_the_family_does_not_have(ckpt: Path, out: Path) -> None:
    w = tinyckpt.read_safetensors(ckpt / "model.safetensors")
    w["model.layers.0.mlp.experts.0.weight"] = np.zeros((4, 4))
    tinyckpt.write_safetensors(ckpt / "model.safetensors", {k: v.astype(np.float32) for k, v in w.items()})
    one_line_error(trimix("models", "convert", str(ckpt), "-o", str(out / "m.gguf")), "experts.0.weight")
    only(out)


@pytest.mark.slow
def test_nan_weights_are_named_and_leave_nothing(ckpt: Path, out: Path) -> None:
    """The NaN sits in the last layer, so it is found while writing: the partial file must go."""
    w = tinyckpt.read_safetensors(ckpt / "model.safetensors")
    w["model.layers.1.mlp.down_proj.weight"][3, 5] = np.nan
    tinyckpt.write_safetensors(ckpt / "model.safetensors", {k: v.astype(np.float32) for k, v in w.items()})
    one_line_error(
        trimix("models", "convert", str(ckpt), "-o", str(out / "m.gguf")),
        "model.layers.1.mlp.down_proj.weight",
        "NaN",
    )
    only(out)


@pytest.mark.slow
def test_values_beyond_f16_suggest_bf16(ckpt: Path, out: Path) -> None:
    w = tinyckpt.read_safetensors(ckpt / "model.safetensors")
    w["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e6
    tinyckpt.write_safetensors(ckpt / "model.safetensors", {k: v.astype(np.float32) for k, v in w.items()})
    one_line_error(trimix("models", "convert", str(ckpt), "-o", str(out / "m.gguf")), "f16", "--type bf16")
    res = trimix("models", "convert", str(ckpt), "-o", str(out / "m.gguf"), "--type", "bf16")
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_config_problems(ckpt: Path, out: Path, tmp_path: Path) -> None:
    one_line_error(trimix("models", "convert", str(tmp_path / "nope"), "-o", str(out / "m.gguf")), "not found")
    (ckpt / "config.json").write_text("{not json")
    one_line_error(trimix("models", "convert", str(ckpt), "-o", str(out / "m.gguf")), "config.json", "not valid JSON")
    (ckpt / "config.json").unlink()
    one_line_error(trimix("models", "convert", str(ckpt), "-o", str(out / "m.gguf")), "no config.json")
    only(out)


@pytest.mark.slow
def test_missing_tokenizer(ckpt: Path, out: Path) -> None:
    (ckpt / "tokenizer.json").unlink()
    one_line_error(trimix("models", "convert", str(ckpt), "-o", str(out / "m.gguf")), "tokenizer")
    only(out)


@pytest.mark.slow
def test_existing_output_is_refused_unless_forced(ckpt: Path, out: Path) -> None:
    target = out / "m.gguf"
    target.write_bytes(b"keep me")
    one_line_error(trimix("models", "convert", str(ckpt), "-o", str(target)), "exists", "--force")
    assert target.read_bytes() == b"keep me"
    res = trimix("models", "convert", str(ckpt), "-o", str(target), "--force")
    assert res.returncode == 0, res.stderr
    assert target.read_bytes()[:4] == b"GGUF"
    only(out, "m.gguf")


@pytest.mark.slow
def test_unknown_type_and_missing_output_folder(ckpt: Path, out: Path, tmp_path: Path) -> None:
    one_line_error(trimix("models", "convert", str(ckpt), "-o", str(out / "m.gguf"), "-t", "q3_x"), "q4_k_m", "q8_0")
    one_line_error(trimix("models", "convert", str(ckpt), "-o", str(tmp_path / "no" / "m.gguf")), "does not exist")
    only(out)


@pytest.mark.slow
def test_not_enough_disk_is_found_before_writing(ckpt: Path, tmp_path: Path) -> None:
    """A real 256 KiB file system (tmpfs, mounted in a private mount namespace) for a 330 KB model."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not available")
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = (
        f"mount -t tmpfs -o size=256k tmpfs {mnt} && cd {os.getcwd()} && "
        f"{sys.executable} -m trimix_cli.main models convert {ckpt} -o {mnt}/m.gguf -t f32; "
        f"echo rc=$?; ls -A {mnt}"
    )
    res = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "400"},
    )
    if "mount:" in res.stderr or "unshare:" in res.stderr:
        pytest.skip(f"cannot mount a small file system here: {res.stderr.strip()}")
    assert "rc=1" in res.stdout, (res.stdout, res.stderr)
    assert "not enough disk space" in res.stderr and "free" in res.stderr, res.stderr
    assert res.stdout.strip().endswith("rc=1"), res.stdout  # ls printed nothing: the folder is empty


@pytest.mark.slow
def test_quantize_refuses_bad_input(ckpt: Path, out: Path, tmp_path: Path) -> None:
    res = trimix("models", "convert", str(ckpt), "-o", str(out / "m-q8.gguf"), "-t", "q8_0")
    assert res.returncode == 0, res.stderr
    one_line_error(
        trimix("models", "quantize", str(out / "m-q8.gguf"), str(out / "m-q4.gguf"), "q4_k_m"),
        "already quantized",
        "Q8_0",
        "--allow-requantize",
    )
    res = trimix("models", "quantize", str(out / "m-q8.gguf"), str(out / "m-q4.gguf"), "q4_0", "--allow-requantize")
    assert res.returncode == 0, res.stderr
    assert "warning:" in res.stderr and "already quantized" in res.stderr
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"PK\x03\x04" + bytes(100))
    one_line_error(trimix("models", "quantize", str(notgguf), str(out / "y.gguf"), "q8_0"), "not a GGUF")
    one_line_error(
        trimix("models", "quantize", str(out / "m-q8.gguf"), str(out / "y.gguf"), "q9_9"), "unknown output type"
    )
    one_line_error(
        trimix("models", "quantize", str(out / "m-q8.gguf"), str(out / "m-q8.gguf"), "q8_0", "--allow-requantize"),
        "is the input",
    )
    only(out, "m-q8.gguf", "m-q4.gguf")


# -- Ctrl-C: a real process, a real SIGINT, nothing left ----------------------------------------


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 400 MB of weights: long enough to convert that Ctrl-C lands in the middle."""
    root = tmp_path_factory.mktemp("big")
    return tinyckpt.write_checkpoint(root / "big", "llama3", hidden=1024, layers=2, tied=False, extra_rows=96_000)


def _interrupt_when_partial_appears(args: list[str], folder: Path, pattern: str) -> subprocess.CompletedProcess[str]:
    """Start the command in its own session, wait for its partial file, then Ctrl-C it as a terminal
    does (SIGINT to the whole process group, children included)."""
    proc = subprocess.Popen(
        [*TRIMIX, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "COLUMNS": "400"},
    )
    deadline = time.monotonic() + 120
    while not list(folder.glob(pattern)):
        assert proc.poll() is None, f"finished before the interrupt: {proc.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.05)
    assert proc.poll() is None, "finished before the interrupt"
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_ctrl_c_while_converting_leaves_no_partial_file(big: Path, out: Path) -> None:
    res = _interrupt_when_partial_appears(["models", "convert", str(big), "-o", str(out / "m.gguf")], out, ".*partial")
    assert res.returncode == 130, res.stderr
    assert "interrupted" in res.stderr
    only(out)


@pytest.mark.slow
def test_ctrl_c_while_quantizing_leaves_no_partial_file(big: Path, out: Path) -> None:
    """Interrupted in llama.cpp's quantizer (a child process), after the f16 scratch file was written."""
    res = _interrupt_when_partial_appears(
        ["models", "convert", str(big), "-o", str(out / "m.gguf"), "-t", "q4_k_m", "--threads", "1"],
        out,
        ".m.gguf.[0-9]*.partial",
    )
    assert res.returncode == 130, res.stderr
    only(out)
    time.sleep(0.5)  # a quantizer left running would still be writing somewhere: it must be gone
    only(out)
