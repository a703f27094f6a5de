"""``trimix chat`` through a real pseudo-terminal with the demo trio: turns, commands, Ctrl-C, overflow."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test here takes over a second (see README, Tests)

pexpect = pytest.importorskip("pexpect")

SUMMARY = re.compile(r"tok/s \| prompt (\d+) tok(?:, (\d+) cached)? [\d.]+ s \| stop: (\w[\w-]*)")
TIMEOUT = 120


def _spawn(*args: str, tmp_path=None) -> pexpect.spawn:
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm", COLUMNS="200", OMP_WAIT_POLICY="PASSIVE")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "trimix_cli.main", "chat", "--lang", "demo", *args],
        env=env,
        encoding="utf-8",
        timeout=TIMEOUT,
        dimensions=(50, 200),
        cwd=str(tmp_path) if tmp_path else None,
    )
    child.expect("/help lists the commands")
    child.expect(">>>")
    return child


def _say(child: pexpect.spawn, text: str) -> tuple[int, int, str]:
    """Send a message; the summary line's (prompt tokens, cached tokens, stop reason)."""
    child.sendline(text)
    child.expect(SUMMARY)
    prompt, cached, stop = child.match.groups()
    child.expect(">>>")
    return int(prompt), int(cached or 0), stop


def _command(child: pexpect.spawn, line: str, expect: str) -> str:
    child.sendline(line)
    child.expect(expect)
    seen = child.before + child.after
    child.expect(">>>")
    return seen


def _leave(child: pexpect.spawn) -> None:
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_a_conversation_of_several_turns_reuses_the_cache(tmp_path):
    child = _spawn("-n", "12", tmp_path=tmp_path)
    try:
        turns = [_say(child, m) for m in ("Salam!", "What is your name?", "Tell me about Kashgar.", "Thank you.")]
        first, *later = turns
        assert first[1] == 0  # nothing cached yet
        for (prompt, cached, _), (prev_prompt, _, _) in zip(later, turns):
            assert prompt > prev_prompt
            assert cached >= prev_prompt  # the earlier turns stayed in the cache
        _command(child, "/save convo.json", "saved 8 messages")
    finally:
        _leave(child)
    saved = json.loads((tmp_path / "convo.json").read_text(encoding="utf-8"))
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"] * 4
    assert saved["messages"][2]["content"] == "What is your name?"


def test_each_command(tmp_path):
    child = _spawn("-n", "8", tmp_path=tmp_path)
    try:
        _command(child, "/help", "/regen")
        seen = _command(child, "/settings", r"stop: \['\\n'\]")
        assert "ppl" in seen and "temperature: 0.0" in seen
        _command(child, "/weights 0.3 0.7", "weights: alpha=0.3 beta=0.7")
        child.sendline("Salam")
        child.expect(r"trimix alpha=0.3 beta=0.7 \|")
        child.expect(">>>")
        _command(child, "/select ent", "per turn by ent")
        child.sendline("Yaxshimusiz?")
        child.expect(r"\(chosen by ent\)")
        child.expect(">>>")
        _command(child, "/method single", "method: single")
        child.sendline("Hello")
        child.expect(r"single role=large_ins|single  ?\|")
        child.expect(">>>")
        _command(child, "/regen", "stop:")
        _command(child, "/temp 0.8", "temperature = 0.8")
        _command(child, "/top-k 20", "top_k = 20")
        _command(child, "/top-p 0.9", "top_p = 0.9")
        _command(child, "/min-p 0.05", "min_p = 0.05")
        _command(child, "/seed 7", "seed = 7")
        _command(child, "/repeat-penalty 1.3", "repeat_penalty = 1.3")
        _command(child, "/repeat-last-n 32", "repeat_last_n = 32")
        _command(child, "/frequency-penalty 0.2", "frequency_penalty = 0.2")
        _command(child, "/presence-penalty 0.1", "presence_penalty = 0.1")
        seen = _command(child, "/settings", "system:")
        assert "top_k: 20" in seen and "repeat_penalty: 1.3" in seen and "temperature: 0.8" in seen
        _command(child, "/temp 0", "temperature = 0")  # greedy again: the filters go with it
        _command(child, "/max-tokens 4", "max_tokens = 4")
        _command(child, "/system Answer in one word.", "system prompt set")
        _say(child, "Again")
        _command(child, "/save saved.json", "saved 8 messages")
        _command(child, "/clear", "conversation cleared")
        _command(child, "/load saved.json", "loaded 8 messages")
        # mistakes are one line each, and the chat goes on
        _command(child, "/weights x", "usage: /weights ALPHA BETA")
        _command(child, "/top-p 5", "--top-p must be in")
        _command(child, "/select maybe", "usage: /select ppl|ent")
        _command(child, "/method bogus", "unknown method")
        _command(child, "/nope", "unknown command /nope")
        _command(child, "/load missing.json", "cannot read")
        child.sendline('"""first line')
        child.expect(r"\.\.\.")
        _say(child, 'second line"""')
        child.sendline('"""')
        child.expect(r"\.\.\.")
        child.sendline("a message")
        child.expect(r"\.\.\.")
        _say(child, 'over two lines"""')
        _command(child, "/save final.json", "saved")
    finally:
        _leave(child)
    saved = json.loads((tmp_path / "saved.json").read_text(encoding="utf-8"))
    assert saved["system"] == "Answer in one word."
    final = json.loads((tmp_path / "final.json").read_text(encoding="utf-8"))
    users = [m["content"] for m in final["messages"] if m["role"] == "user"]
    assert users[-2:] == ["first line\nsecond line", "a message\nover two lines"]


def test_ctrl_c_stops_the_reply_and_a_second_leaves(tmp_path):
    child = _spawn("-n", "400", "--stop", "", tmp_path=tmp_path)
    try:
        child.sendline("Write a long story about the Taklamakan desert.")
        child.expect(r"\x1b\[\?2004l")  # the line editor let go of the terminal
        child.expect(r"[A-Za-z]{3,} [A-Za-z]{2,}")  # the reply has begun
        child.sendintr()
        child.expect(SUMMARY)
        assert child.match.group(3) == "cancelled"
        child.expect(">>>")
        _command(child, "/save stopped.json", "saved 2 messages")
        child.sendintr()  # Ctrl-C at the prompt leaves
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    reply = json.loads((tmp_path / "stopped.json").read_text(encoding="utf-8"))["messages"][1]["content"]
    assert 0 < len(reply)


def test_ctrl_d_leaves():
    child = _spawn()
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_a_full_context_drops_the_oldest_turns():
    child = _spawn("--n-ctx", "160", "-n", "16")
    try:
        long = "Salam, men Qeshqerdin keldim we sizge bir nerse demekchimen. " * 2
        notes = 0
        for _ in range(5):
            child.sendline(long)
            i = child.expect([r"oldest turns? left the conversation", SUMMARY])
            if i == 0:
                notes += 1
                child.expect(SUMMARY)
            prompt = int(child.match.group(1))
            assert prompt <= 160 - 16
            child.expect(">>>")
        assert notes >= 1
        _command(child, "x " * 400, "context of 160")  # one message longer than the context: one line, no crash
        _say(child, "Still here?")
    finally:
        _leave(child)


def test_without_a_terminal_it_reads_plain_lines():
    script = 'Salam\n/weights 0.5 0.5\n"""two\nlines"""\n/exit\n'
    r = subprocess.run(
        [sys.executable, "-m", "trimix_cli.main", "chat", "--lang", "demo", "-n", "6"],
        input=script.encode(),
        capture_output=True,
        timeout=TIMEOUT,
        env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"),
    )
    assert r.returncode == 0, r.stderr.decode()
    err = r.stderr.decode()
    assert len(SUMMARY.findall(err)) == 2
    assert "trimix alpha=0.5 beta=0.5" in err


def test_bad_settings_fail_before_loading():
    r = subprocess.run(
        [sys.executable, "-m", "trimix_cli.main", "chat", "--lang", "demo", "--top-k", "5"],
        capture_output=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 1
    assert r.stderr.decode().strip().splitlines() == [
        "error: --top-k applies to sampling, but decoding is greedy: set --temperature > 0"
    ]
