"""``trimix models pull / verify / bundle / install`` end to end: the real ``huggingface_hub`` client
against a Hub stand-in on 127.0.0.1 (tests/hubstandin.py) serving tiny GGUF files the tests write,
the real CLI in subprocesses, and real llama.cpp generating from what was installed."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from hubstandin import HubStandIn
from tinygguf import write_tiny_llama

ROLES = ("large_ins", "small_cpt", "small_base")
SEEDS = {"large_ins": 1, "small_cpt": 2, "small_base": 3}
GEN = ["--alpha", "0.3", "--beta", "0.6", "-n", "12", "--n-ctx", "128", "--json", "the cat"]


def run(*args: str, env: dict[str, str], stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trimix_cli.main", *args],
        input=stdin,
        capture_output=True,
        timeout=300,
        env=env,
    )


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The command failed with exactly one line on stderr: the error."""
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.decode().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr.decode()
    return errors[0]


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("published")
    out = {role: write_tiny_llama(d / f"{role}.gguf", seed=SEEDS[role]).read_bytes() for role in ROLES}
    # over twice the client's 10 MiB read size, so a connection cut half-way has delivered whole
    # chunks and the retry must ask for the rest with a Range request
    out["big"] = write_tiny_llama(d / "big.gguf", seed=5, n_embd=256, n_ff=1024, n_layer=6).read_bytes()
    return out


@pytest.fixture
def hub(ggufs: dict[str, bytes]):
    """The stand-in, serving one GGUF repository per role and a private one."""
    server = HubStandIn()
    for role, data in ggufs.items():
        server.add_repo(f"tiny/{role}-GGUF", {"README.md": b"# tiny\n", f"{role}-q8_0.gguf": data})
    assert len(ggufs["big"]) > 2 * 10 * 2**20
    server.add_repo("tiny/private-GGUF", {"small_cpt-q8_0.gguf": ggufs["small_cpt"]}, token="hf_secret")
    server.start()
    yield server
    server.stop()


PROFILE = """[profile]
lang = "tiny"
name = "Tiny trio"
n_ctx = 256

[models]
large_ins = "tiny-large-ins.gguf"
small_cpt = "tiny-small-cpt.gguf"
small_base = "tiny-small-base.gguf"
"""


def source_table(role: str, repo: str | None = None, revision: str = "main") -> str:
    repo = repo or f"tiny/{role}-GGUF"
    return f'\n[sources.{role}]\nrepo = "{repo}"\nrevision = "{revision}"\ngguf = "*-q8_0.gguf"\n'


class Machine:
    """One user's folders: profiles, config, data (models) and the Hub client's cache."""

    def __init__(self, root: Path, hub: HubStandIn | None) -> None:
        self.root = root
        self.profiles = root / "profiles"
        self.profiles.mkdir(parents=True, exist_ok=True)
        self.models = root / "data" / "trimix" / "models"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRIMIX_", "XDG_"))}
        self.env.update(
            XDG_DATA_HOME=str(root / "data"),
            XDG_CONFIG_HOME=str(root / "config"),
            HF_HOME=str(root / "hf"),
            HF_HUB_DISABLE_TELEMETRY="1",
            TRIMIX_PROFILES=str(self.profiles),
            OMP_WAIT_POLICY="PASSIVE",
            COLUMNS="300",
        )
        # nothing listens on port 9 (discard): a machine without a Hub
        self.env["HF_ENDPOINT"] = hub.url if hub is not None else "http://127.0.0.1:9"

    def write_profile(self, **overrides: str) -> Path:
        text = PROFILE + "".join(overrides.get(r, source_table(r)) for r in ROLES)
        path = self.profiles / "tiny.toml"
        path.write_text(text)
        return path

    def __call__(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return run(*args, env={**self.env, **env})

    def installed(self) -> list[str]:
        """Everything in the models folder, hidden scratch folders included."""
        if not self.models.exists():
            return []
        return sorted(str(p.relative_to(self.models)) for p in self.models.rglob("*"))


@pytest.fixture
def machine(tmp_path: Path, hub: HubStandIn) -> Machine:
    return Machine(tmp_path / "online", hub)


def tokens(machine: Machine, *args: str) -> list[int]:
    r = machine("generate", *args, *GEN)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)["token_ids"]


@pytest.mark.slow
def test_full_pull_then_generate_and_idempotent_offline(machine: Machine, hub: HubStandIn, ggufs, tmp_path: Path):
    machine.write_profile()
    r = machine("models", "pull", "--lang", "tiny")
    assert r.returncode == 0, r.stderr.decode()
    err = r.stderr.decode()
    assert "installed" in err and "fusable" in r.stdout.decode()  # models check ran after installing
    assert machine.installed() == [
        "tiny-large-ins.gguf",
        "tiny-small-base.gguf",
        "tiny-small-cpt.gguf",
        "tiny.lock.json",
    ]
    lock = json.loads((machine.models / "tiny.lock.json").read_text())
    for role in ROLES:
        entry = lock["roles"][role]
        assert entry["repo"] == f"tiny/{role}-GGUF" and entry["revision"] == "main"
        assert entry["commit"] == hub.repos[f"tiny/{role}-GGUF"].commit
        assert entry["files"][0]["sha256"] == hashlib.sha256(ggufs[role]).hexdigest()
        assert entry["files"][0]["size"] == len(ggufs[role])
        assert entry["source_files"][0]["sha256"] == hashlib.sha256(ggufs[role]).hexdigest()
        assert "trimix" in entry["versions"] and "llama-cpp-python" in entry["versions"]
    # the installed files are the published ones: same tokens as the originals given by path
    originals = tmp_path / "orig"
    originals.mkdir()
    paths = []
    for role in ROLES:
        (originals / f"{role}.gguf").write_bytes(ggufs[role])
        paths += [f"--{role.replace('_', '-')}", str(originals / f"{role}.gguf")]
    assert tokens(machine, "--lang", "tiny") == tokens(machine, *paths)
    # again: nothing to do, no request to the Hub, also with HF_HUB_OFFLINE
    before = len(hub.requests)
    again = machine("models", "pull", "--lang", "tiny")
    assert again.returncode == 0 and "nothing to do" in again.stderr.decode()
    offline = machine("models", "pull", "--lang", "tiny", HF_HUB_OFFLINE="1")
    assert offline.returncode == 0 and "nothing to do" in offline.stderr.decode(), offline.stderr.decode()
    assert len(hub.requests) == before
    listing = machine("models", "list")
    row = next(ln for ln in listing.stdout.decode().splitlines() if "tiny" in ln)
    assert "pulled, verified" in row


@pytest.mark.slow
def test_dry_run_fetches_nothing(machine: Machine, hub: HubStandIn, ggufs):
    machine.write_profile()
    r = machine("models", "pull", "--lang", "tiny", "--dry-run")
    assert r.returncode == 0, r.stderr.decode()
    out = r.stderr.decode()
    assert "to fetch" in out and hub.repos["tiny/large_ins-GGUF"].commit[:12] in out and "free" in out
    assert not any(m == "GET" and "/resolve/" in p for m, p, _ in hub.requests)
    assert machine.installed() == []


@pytest.mark.slow
def test_role_limits_the_pull(machine: Machine, hub: HubStandIn):
    machine.write_profile()
    r = machine("models", "pull", "--lang", "tiny", "--role", "small-cpt")
    assert r.returncode == 0, r.stderr.decode()
    assert machine.installed() == ["tiny-small-cpt.gguf", "tiny.lock.json"]
    assert "not asked for" in r.stderr.decode()
    assert "no such role" in one_error_line(machine("models", "pull", "--lang", "tiny", "--role", "large-base"))


@pytest.mark.slow
def test_dropped_connection_resumes_with_a_range_request(machine: Machine, hub: HubStandIn, ggufs):
    machine.write_profile(small_cpt=source_table("small_cpt", "tiny/big-GGUF"))
    hub.faults.drop["big-q8_0.gguf"] = 1
    r = machine("models", "pull", "--lang", "tiny", "--no-check")
    assert r.returncode == 0, r.stderr.decode()
    gets = [rng for m, p, rng in hub.requests if m == "GET" and p.endswith("big-q8_0.gguf")]
    assert len(gets) == 2 and gets[0] is None
    start = int(gets[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start < len(ggufs["big"])
    assert (machine.models / "tiny-small-cpt.gguf").read_bytes() == ggufs["big"]


@pytest.mark.slow
def test_interrupted_download_resumes_in_the_next_run(machine: Machine, hub: HubStandIn, ggufs):
    machine.write_profile(small_cpt=source_table("small_cpt", "tiny/big-GGUF"))
    name = "big-q8_0.gguf"
    hub.faults.drop[name] = 1
    hub.faults.fail_after_drop.add(name)
    r = machine("models", "pull", "--lang", "tiny", "--no-check")
    line = one_error_line(r)
    assert "500" in line and "tiny/big-GGUF" in line
    assert not any(p.endswith(".gguf") and "/" not in p for p in machine.installed())  # nothing installed
    parts = [machine.models / p for p in machine.installed() if p.endswith(".part")]
    assert len(parts) == 1 and 0 < parts[0].stat().st_size < len(ggufs["big"])  # the half that arrived is kept
    have = parts[0].stat().st_size
    hub.faults.fail_after_drop.clear()
    hub.requests.clear()
    r = machine("models", "pull", "--lang", "tiny", "--no-check")
    assert r.returncode == 0, r.stderr.decode()
    gets = [rng for m, p, rng in hub.requests if m == "GET" and p.endswith(name)]
    assert gets == [f"bytes={have}-"]
    assert (machine.models / "tiny-small-cpt.gguf").read_bytes() == ggufs["big"]
    assert not (machine.models / ".pull").exists()


@pytest.mark.slow
def test_ctrl_c_during_a_download_installs_nothing_and_the_next_run_resumes(machine: Machine, hub, ggufs):
    machine.write_profile(small_cpt=source_table("small_cpt", "tiny/big-GGUF"))
    hub.faults.stall.add("big-q8_0.gguf")
    proc = subprocess.Popen(
        [sys.executable, "-m", "trimix_cli.main", "models", "pull", "--lang", "tiny", "--no-check"],
        env=machine.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        part = None
        while part is None or part.stat().st_size == 0:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
            part = next((machine.models / p for p in machine.installed() if p.endswith(".part")), None)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        hub.faults.release.set()
    assert proc.returncode == 130 and "interrupted" in err.decode(), err.decode()
    assert not any(p.endswith((".gguf", ".lock.json")) and "/" not in p for p in machine.installed())
    have = part.stat().st_size
    hub.requests.clear()
    r = machine("models", "pull", "--lang", "tiny", "--no-check")
    assert r.returncode == 0, r.stderr.decode()
    assert [rng for m, p, rng in hub.requests if m == "GET" and p.endswith("big-q8_0.gguf")] == [f"bytes={have}-"]
    assert (machine.models / "tiny-small-cpt.gguf").read_bytes() == ggufs["big"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "env", "expect"),
    [
        (source_table("small_cpt", "tiny/private-GGUF"), {}, "401"),
        (source_table("small_cpt", "tiny/missing-GGUF"), {}, "404"),
        (source_table("small_cpt", revision="v9.9"), {}, "no revision 'v9.9'"),
    ],
    ids=["401", "404", "bad-revision"],
)
def test_hub_errors_are_one_line_naming_the_repository(machine: Machine, override, env, expect):
    machine.write_profile(small_cpt=override)
    r = machine("models", "pull", "--lang", "tiny", **env)
    line = one_error_line(r)
    repo = override.split('repo = "')[1].split('"')[0]
    assert expect in line and repo in line, line
    assert machine.installed() == []


@pytest.mark.slow
def test_private_repository_with_hf_token(machine: Machine):
    machine.write_profile(small_cpt=source_table("small_cpt", "tiny/private-GGUF"))
    r = machine("models", "pull", "--lang", "tiny", "--no-check", HF_TOKEN="hf_secret")
    assert r.returncode == 0, r.stderr.decode()


@pytest.mark.slow
def test_content_not_matching_its_published_sha256_is_refused(machine: Machine, hub: HubStandIn):
    machine.write_profile()
    hub.faults.corrupt.add("small_cpt-q8_0.gguf")
    r = machine("models", "pull", "--lang", "tiny")
    line = one_error_line(r)
    assert "does not match its published sha256" in line and "tiny/small_cpt-GGUF" in line
    assert not any(p.endswith((".gguf", ".lock.json")) and "/" not in p for p in machine.installed())


@pytest.mark.slow
def test_offline_with_nothing_installed_is_a_clear_error(machine: Machine, hub: HubStandIn):
    machine.write_profile()
    r = machine("models", "pull", "--lang", "tiny", HF_HUB_OFFLINE="1")
    line = one_error_line(r)
    assert "HF_HUB_OFFLINE" in line and "tiny/" in line
    assert hub.requests == [] and machine.installed() == []


@pytest.mark.slow
def test_verify_names_the_file_that_differs(machine: Machine):
    machine.write_profile()
    assert machine("models", "pull", "--lang", "tiny", "--no-check").returncode == 0
    ok = machine("models", "verify", "--lang", "tiny")
    assert ok.returncode == 0 and "all 3 files" in ok.stderr.decode()
    target = machine.models / "tiny-small-base.gguf"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    listing = machine("models", "list").stdout.decode()
    assert "small-cpt: pulled, verified; small-base: pulled, changed" in listing
    bad = machine("models", "verify", "--lang", "tiny")
    line = one_error_line(bad)
    assert "tiny-small-base.gguf differs from the lock" in line and "sha256" in line
    # a file that no longer matches its lock is not bundled either
    out = machine.root / "tiny.trimix.tar"
    line = one_error_line(machine("models", "bundle", "--lang", "tiny", "-o", str(out)))
    assert "does not match the sha256 its lock records" in line and not out.exists()
    assert not list(machine.root.glob(".tiny.trimix.tar*"))


@pytest.mark.slow
def test_files_placed_by_hand_are_listed_as_such(tmp_path: Path, ggufs):
    m = Machine(tmp_path / "hand", None)
    m.models.mkdir(parents=True)
    for role in ROLES:
        (m.models / f"tiny-{role.replace('_', '-')}.gguf").write_bytes(ggufs[role])
    (m.profiles / "tiny.toml").write_text(PROFILE)
    row = next(ln for ln in m("models", "list").stdout.decode().splitlines() if "tiny" in ln)
    assert "by hand" in row
    line = one_error_line(m("models", "verify", "--lang", "tiny"))
    assert "no lock file for --lang tiny" in line


# Bundles ------------------------------------------------------------------------------------------


@pytest.fixture
def bundle(machine: Machine, tmp_path: Path) -> Path:
    machine.write_profile()
    assert machine("models", "pull", "--lang", "tiny", "--no-check").returncode == 0
    out = tmp_path / "stick" / "tiny.trimix.tar"
    r = machine("models", "bundle", "--lang", "tiny", "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()
    return out


@pytest.fixture
def offline(tmp_path: Path) -> Machine:
    """A machine that never had network: no Hub, HF_HUB_OFFLINE, no profile of its own."""
    m = Machine(tmp_path / "offline", None)
    m.env["HF_HUB_OFFLINE"] = "1"
    return m


def nothing_installed(m: Machine) -> None:
    assert m.installed() == [], m.installed()
    assert not (m.root / "config" / "trimix" / "profiles" / "tiny.toml").exists()


@pytest.mark.slow
def test_bundle_then_install_on_a_fresh_machine_gives_the_same_tokens(machine, bundle, offline):
    r = offline("models", "install", str(bundle))
    assert r.returncode == 0, r.stderr.decode()
    assert sorted(offline.installed()) == [
        "tiny-large-ins.gguf",
        "tiny-small-base.gguf",
        "tiny-small-cpt.gguf",
        "tiny.lock.json",
    ]
    assert (offline.root / "config" / "trimix" / "profiles" / "tiny.toml").is_file()
    assert tokens(offline, "--lang", "tiny") == tokens(machine, "--lang", "tiny")
    assert offline("models", "verify", "--lang", "tiny").returncode == 0
    row = next(ln for ln in offline("models", "list").stdout.decode().splitlines() if "tiny" in ln)
    assert "bundle, verified" in row
    again = offline("models", "install", str(bundle))  # same files again: kept, still fine
    assert again.returncode == 0 and "already there" in again.stderr.decode()


def _members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def _write(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _extra(name: str, **kw) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    data = kw.pop("data", None)
    for k, v in kw.items():
        setattr(info, k, v)
    if data is not None:
        info.size = len(data)
    return info, data


@pytest.mark.slow
def test_a_truncated_bundle_installs_nothing(bundle, offline, tmp_path):
    data = bundle.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) * 2 // 3])
    line = one_error_line(offline("models", "install", str(cut)))
    assert "truncated" in line
    nothing_installed(offline)


@pytest.mark.slow
def test_one_changed_byte_in_a_gguf_installs_nothing(bundle, offline, tmp_path):
    members = _members(bundle)
    info, data = members[-1]
    assert info.name.endswith(".gguf")
    changed = bytearray(data)
    changed[len(changed) // 2] ^= 0x01
    members[-1] = (info, bytes(changed))
    bad = _write(tmp_path / "flipped.tar", members)
    line = one_error_line(offline("models", "install", str(bad)))
    assert "does not match the sha256" in line and info.name in line
    nothing_installed(offline)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("member", "expect"),
    [
        (lambda: _extra("../x", data=b"escape"), "outside the folder"),
        (lambda: _extra("/tmp/x", data=b"absolute"), "absolute path"),
        (lambda: _extra("models/link.gguf", type=tarfile.SYMTYPE, linkname="/etc/passwd"), "is a link"),
        (lambda: _extra("models/hard.gguf", type=tarfile.LNKTYPE, linkname="tiny.toml"), "is a link"),
        (lambda: _extra("models/dev.gguf", type=tarfile.CHRTYPE, devmajor=1, devminor=3), "device"),
        (lambda: _extra("models/extra.gguf", data=b"GGUF not named"), "not named by the bundle's lock"),
    ],
    ids=["dotdot", "absolute", "symlink", "hardlink", "device", "unlisted"],
)
def test_bad_members_are_refused_and_nothing_installed(bundle, offline, tmp_path, member, expect):
    members = _members(bundle)
    members.insert(2, member())  # after the manifest and the profile, before the GGUF files
    bad = _write(tmp_path / "bad.tar", members)
    line = one_error_line(offline("models", "install", str(bad)))
    assert expect in line, line
    nothing_installed(offline)


@pytest.mark.slow
def test_a_lock_naming_a_path_is_refused(bundle, offline, tmp_path):
    members = _members(bundle)
    info, data = members[0]
    manifest = json.loads(data)
    manifest["lock"]["roles"]["small_cpt"]["files"][0]["name"] = "../../evil.gguf"
    text = json.dumps(manifest).encode()
    info.size = len(text)
    members[0] = (info, text)
    line = one_error_line(offline("models", "install", str(_write(tmp_path / "evil.tar", members))))
    assert "bad file name" in line
    nothing_installed(offline)


@pytest.mark.slow
def test_ctrl_c_during_install_leaves_nothing(bundle, offline, tmp_path):
    """A real SIGINT while the install is copying: the bundle comes through a pipe that the test
    feeds half-way, so the process is surely mid-copy when the signal arrives."""
    fifo = tmp_path / "bundle.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "-m", "trimix_cli.main", "models", "install", str(fifo)],
        env=offline.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    data = bundle.read_bytes()
    with open(fifo, "wb") as w:
        w.write(data[: len(data) // 2])
        w.flush()
        deadline = time.monotonic() + 60
        while not any(p.startswith(".install-") and "/" in p for p in offline.installed()):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert "interrupted" in err.decode()
    nothing_installed(offline)


# Checkpoints: converted on the way in ------------------------------------------------------------


@pytest.mark.slow
def test_checkpoint_sources_are_converted_and_installed(hub: HubStandIn, tmp_path: Path):
    """Three tiny Qwen2 checkpoints as the Hub serves them (safetensors in bfloat16, config and
    tokenizer files): pull converts each to the profile's type; the installed files generate the
    same tokens as the same checkpoints converted locally, and the lock records the converter."""
    from tinyckpt import write_checkpoint

    from trimix_cpp.convert import convert_checkpoint

    types = {"large_ins": "Q4_K_M", "small_cpt": "Q8_0", "small_base": "F16"}  # quantized by llama.cpp, direct, direct
    local = []
    (tmp_path / "local").mkdir()
    for role in ROLES:
        folder = write_checkpoint(tmp_path / "ckpt" / role, "qwen2", seed=SEEDS[role])
        hub.add_repo(f"tiny/{role}-ckpt", {p.name: p.read_bytes() for p in sorted(folder.iterdir())})
        out = convert_checkpoint(folder, tmp_path / "local" / f"{role}.gguf", out_type=types[role].lower())
        local += [f"--{role.replace('_', '-')}", str(out)]
    m = Machine(tmp_path / "online", hub)
    text = PROFILE.replace("tiny-", "ckpt-") + "".join(
        f'\n[sources.{role}]\nrepo = "tiny/{role}-ckpt"\nrevision = "main"\ntype = "{types[role]}"\n' for role in ROLES
    )
    (m.profiles / "tiny.toml").write_text(text)
    dry = m("models", "pull", "--lang", "tiny", "--dry-run")
    assert dry.returncode == 0 and "convert to Q8_0" in dry.stderr.decode(), dry.stderr.decode()
    r = m("models", "pull", "--lang", "tiny")
    assert r.returncode == 0, r.stderr.decode()
    assert "fusable" in r.stdout.decode()
    lock = json.loads((m.models / "tiny.lock.json").read_text())
    for role in ROLES:
        entry = lock["roles"][role]
        assert entry["kind"] == "checkpoint" and entry["type"] == types[role]
        assert entry["commit"] == hub.repos[f"tiny/{role}-ckpt"].commit
        published = hub.repos[f"tiny/{role}-ckpt"].files
        assert {f["name"]: f["sha256"] for f in entry["source_files"]} == {
            name: hashlib.sha256(data).hexdigest() for name, data in published.items()
        }
        assert "converter" in entry["versions"]
    assert sorted(p for p in m.installed()) == [
        "ckpt-large-ins.gguf",
        "ckpt-small-base.gguf",
        "ckpt-small-cpt.gguf",
        "tiny.lock.json",
    ]
    assert tokens(m, "--lang", "tiny") == tokens(m, *local)
    assert "nothing to do" in m("models", "pull", "--lang", "tiny", HF_HUB_OFFLINE="1").stderr.decode()
    # another type for one role: converted again, named after the type, and the profile updated to name it
    r = m("models", "pull", "--lang", "tiny", "--type", "small-base=Q8_0", "--no-check")
    assert r.returncode == 0, r.stderr.decode()
    assert (m.models / "ckpt-small-base-Q8_0.gguf").is_file()
    assert 'small_base = "ckpt-small-base-Q8_0.gguf"' in (m.profiles / "tiny.toml").read_text()
    assert json.loads((m.models / "tiny.lock.json").read_text())["roles"]["small_base"]["type"] == "Q8_0"
    assert len(tokens(m, "--lang", "tiny")) == 12
    wrong = m("models", "pull", "--lang", "tiny", "--type", "Q9_9")
    assert "unknown GGUF type 'Q9_9'" in one_error_line(wrong)


# Split GGUF files --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_split_gguf_is_pulled_bundled_and_installed_as_its_parts(hub: HubStandIn, ggufs, tmp_path: Path):
    published = tmp_path / "published"
    published.mkdir()
    first = write_tiny_llama(published / "model-q8_0.gguf", seed=SEEDS["small_cpt"], split_max_tensors=8)
    parts = sorted(published.glob("model-q8_0-*.gguf"))
    assert first == parts[0] and len(parts) == 3
    hub.add_repo("tiny/split-GGUF", {p.name: p.read_bytes() for p in parts} | {"model-f16.gguf": b"GGUF other"})
    m = Machine(tmp_path / "online", hub)
    split = '\n[sources.small_cpt]\nrepo = "tiny/split-GGUF"\nrevision = "main"\ngguf = "model-q8_0-*.gguf"\n'
    m.write_profile(small_cpt=split)
    # the profile must name the first part, or llama.cpp would not find the others
    line = one_error_line(m("models", "pull", "--lang", "tiny"))
    assert "split in 3 parts" in line and "tiny-small-cpt-00001-of-00003.gguf" in line
    profile = m.profiles / "tiny.toml"
    profile.write_text(profile.read_text().replace("tiny-small-cpt.gguf", "tiny-small-cpt-00001-of-00003.gguf"))
    r = m("models", "pull", "--lang", "tiny")
    assert r.returncode == 0, r.stderr.decode()
    names = [f"tiny-small-cpt-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    assert all((m.models / n).read_bytes() == p.read_bytes() for n, p in zip(names, parts))
    lock = json.loads((m.models / "tiny.lock.json").read_text())
    assert [f["name"] for f in lock["roles"]["small_cpt"]["files"]] == names
    expected = tokens(
        m,
        "--large-ins",
        str(m.models / "tiny-large-ins.gguf"),
        "--small-cpt",
        str(first),
        "--small-base",
        str(m.models / "tiny-small-base.gguf"),
    )
    assert tokens(m, "--lang", "tiny") == expected
    out = tmp_path / "split.trimix.tar"
    assert m("models", "bundle", "--lang", "tiny", "-o", str(out)).returncode == 0
    offline = Machine(tmp_path / "offline", None)
    r = offline("models", "install", str(out), HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr.decode()
    assert all((offline.models / n).is_file() for n in names)
    assert tokens(offline, "--lang", "tiny") == expected


# The profile's [sources] tables, and the disk check ----------------------------------------------


@pytest.mark.parametrize(
    ("table", "expect"),
    [
        ('repo = "a/b"\ntype = "Q8_0"\ngguf = "*.gguf"', "either type"),
        ('repo = "a/b"', "either type"),
        ('repo = "../b"\ntype = "Q8_0"', "repo must be a Hub repository id"),
        ('repo = "a/b/c"\ntype = "Q8_0"', "repo must be a Hub repository id"),
        ('repo = "a/b"\ntype = "Q7_X"', "unknown GGUF type 'Q7_X'"),
        ('repo = "a/b"\nrevision = "../main"\ntype = "Q8_0"', "revision must be"),
        ('repo = "a/b"\ngguf = "model.bin"', "gguf must be a file pattern ending in .gguf"),
        ('repo = "a/b"\ntype = "Q8_0"\nbranch = "x"', "unknown key 'branch'"),
        ('repo = "a/b"\ntype = 8', "type must be a string"),
    ],
)
def test_bad_source_tables_are_one_line_naming_file_and_role(tmp_path: Path, table: str, expect: str):
    from trimix_cpp.errors import TrimixError
    from trimix_cpp.profiles import load_profile

    path = tmp_path / "x.toml"
    path.write_text(PROFILE + f"\n[sources.small_cpt]\n{table}\n")
    with pytest.raises(TrimixError, match=r"x.toml: \[sources.small_cpt\]") as e:
        load_profile(path)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_shipped_profiles_say_where_every_model_comes_from():
    from trimix_cpp.profiles import SHIPPED_DIR, load_profile

    for lang, code in (("bod", "bo"), ("uig", "ug"), ("kaz", "kk"), ("mvf", "mn")):
        p = load_profile(SHIPPED_DIR / f"{lang}.toml")
        assert p.origins["small_cpt"].repo == f"pkupie/Qwen2.5-1.5B-{code}-cpt"
        assert p.origins["large_ins"].repo == "Qwen/Qwen2.5-7B-Instruct"
        assert p.origins["small_base"].repo == "Qwen/Qwen2.5-1.5B"
        assert p.origins["large_base"].repo == "Qwen/Qwen2.5-7B"
        for role, src in p.origins.items():
            # the type each file name says is the type it is converted to
            assert src.kind == "checkpoint" and p.models[role].endswith(f"-{src.type}.gguf")


def test_a_short_disk_stops_the_pull_before_any_download(machine: Machine, hub: HubStandIn, monkeypatch):
    from trimix_cpp.errors import TrimixError
    from trimix_cpp.profiles import find_profile
    from trimix_cpp.pull import plan_pull, run_pull

    machine.write_profile()
    for k, v in machine.env.items():
        if k.startswith(("HF_", "TRIMIX_", "XDG_")):
            monkeypatch.setenv(k, v)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    plan = plan_pull(find_profile("tiny"))
    assert plan.needed_bytes == sum(len(hub.repos[f"tiny/{r}-GGUF"].files[f"{r}-q8_0.gguf"]) for r in ROLES)
    plan.free_bytes = plan.needed_bytes - 1  # the disk as it would be one byte short
    with pytest.raises(TrimixError, match="not enough disk"):
        run_pull(plan)
    assert not any(m == "GET" and "/resolve/" in p for m, p, _ in hub.requests)
    assert machine.installed() == []


@pytest.mark.slow
def test_a_small_file_not_matching_its_git_blob_id_is_refused(hub: HubStandIn, tmp_path: Path):
    """config.json and the tokenizer files are not LFS files: the Hub publishes only their git blob
    id, and that is checked too."""
    from tinyckpt import write_checkpoint

    folder = write_checkpoint(tmp_path / "ckpt", "qwen2", seed=1)
    hub.add_repo("tiny/ckpt", {p.name: p.read_bytes() for p in sorted(folder.iterdir())})
    hub.faults.corrupt.add("config.json")
    m = Machine(tmp_path / "online", hub)
    (m.profiles / "tiny.toml").write_text(
        PROFILE + '\n[sources.small_cpt]\nrepo = "tiny/ckpt"\nrevision = "main"\ntype = "Q8_0"\n'
    )
    line = one_error_line(m("models", "pull", "--lang", "tiny"))
    assert "tiny/ckpt: config.json does not match its published git blob id" in line
    assert not any(p.endswith((".gguf", ".lock.json")) and "/" not in p for p in m.installed())
