"""The `dualcast` command as a whole: its version, and being stopped while it starts.

The CLI runs as a real subprocess, as a user would run it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.harness.procs import ROOT, clean_env


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dualcast", *args], cwd=ROOT,
                          env=clean_env(env), capture_output=True, text=True, timeout=60)


def test_version_prints_the_installed_version() -> None:
    """`dualcast --version` (and `-V`) was "the following arguments are required"."""
    for flag in ("--version", "-V"):
        done = run(flag)
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"dualcast {version('dualcast')}\n"
        assert done.stderr == ""


def test_help_names_every_command() -> None:
    """`dualcast --help` began "The `dualcast` command: serve, publish, token, demo.",
    leaving out keys and tail, which the list under it does have."""
    done = run("--help")
    assert done.returncode == 0, done.stderr
    usage = re.search(r"\{([a-z,]+)\}", done.stdout)
    assert usage is not None, done.stdout
    commands = usage[1].split(",")
    described = next(line for line in done.stdout.splitlines() if "command:" in line)
    assert [c for c in commands if c not in described] == [], described


def test_a_bare_dualcast_lists_the_commands() -> None:
    """`dualcast` alone said "the following arguments are required: command"."""
    done = run()
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert "serve               run the server" in done.stderr
    assert "tail " in done.stderr and "required" not in done.stderr


def test_ctrl_c_while_the_command_imports_its_modules_exits_quietly(tmp_path: Path) -> None:
    """Ctrl-C in the first half second of `dualcast tail` (or any command) printed a
    traceback from the middle of an import: the entry point imported the command
    outside its interrupt guard. The interrupt is made certain here by a module of
    the command that raises it on import, as a Ctrl-C at that moment does."""
    (tmp_path / "argparse.py").write_text("raise KeyboardInterrupt\n")
    script = Path(sys.executable).parent / "dualcast"
    assert script.exists(), "the dualcast command is not installed beside this Python"
    for command in ([str(script)], [sys.executable, "-m", "dualcast"]):
        done = subprocess.run([*command, "tail", "http://127.0.0.1:9"], cwd=ROOT,
                              env=clean_env({"PYTHONPATH": str(tmp_path)}),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 130, done.stderr
        assert done.stderr == "" and done.stdout == ""


@pytest.mark.parametrize(("args", "flag"), [
    (["token", "--sub", "a", "--ttl", "\u0661h", "--secret", "s" * 40], "--ttl"),
    (["token", "--sub", "a", "--ttl", "1h\n2", "--secret", "s" * 40], "--ttl"),
    (["demo", "--speed", "\u0661", "--redis-url", "redis://127.0.0.1:9/0"], "--speed"),
    (["demo", "--speed", "1_0", "--redis-url", "redis://127.0.0.1:9/0"], "--speed"),
    (["publish", "x", "{}", "--wait-replicas", "\u0661"], "--wait-replicas"),
    (["publish", "x", "{}", "--wait-timeout", "\u0661\u0660\u0660"], "--wait-timeout"),
])
def test_numbers_on_the_command_line_are_ascii_digits(args: list[str], flag: str) -> None:
    """Flags took other scripts' digits (an Arabic-Indic 1 as --ttl 1h, --speed 1), and
    "1_0" as 10, as int() and float() read them, where the variables refused them."""
    done = run(*args)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert f"argument {flag}:" in line and done.stdout == ""


def test_tail_subscribes_to_the_rooms_of_every_rooms_flag(monkeypatch: pytest.MonkeyPatch,
                                                          ) -> None:
    """`dualcast tail URL --rooms a --rooms b,c` (or `--room a --room b`, as `dualcast token`
    and `publish` take rooms) tailed the last flag's rooms only, without a word."""
    from dualcast import cli
    from dualcast.client import tail

    asked: list[list[str]] = []
    monkeypatch.setattr(tail, "run", lambda url, *, rooms, **_: asked.append(rooms) or 0)
    assert cli.main(["tail", "http://127.0.0.1:9", "--rooms", "a", "--rooms", "b, c,a"]) == 0
    assert cli.main(["tail", "http://127.0.0.1:9", "--room", "a", "--room", "b"]) == 0
    assert cli.main(["tail", "http://127.0.0.1:9"]) == 0
    assert asked == [["a", "b", "c"], ["a", "b"], []]
