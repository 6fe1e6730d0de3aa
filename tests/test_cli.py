"""The command line itself: per-command help, one-line errors, `inspect --json`. Nothing here starts Ray."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill_llm.cli import COMMANDS, DEBUG_ENV, main
from test_shards import engine_rows, write_set

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_its_own_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert out.startswith(f"usage: distill-llm {command}") and "--debug" in out
    example = out.split("example:\n", 1)[1].strip().splitlines()[0]
    assert example.startswith(f"distill-llm {command} ")


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(f"  {command} " in out for command in COMMANDS)
    assert main([]) == 2


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    if DEBUG_ENV not in env:
        environ.pop(DEBUG_ENV, None)
    return subprocess.run([sys.executable, "-m", "distill_llm.cli", *args], env=environ, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_an_unexpected_error_is_one_line_and_the_traceback_needs_debug(tmp_path):
    broken = tmp_path / "shards"
    write_set(broken, [engine_rows(4)])
    (broken / "manifest.json").write_text("{not json")  # an error no check of ours anticipates
    proc = cli("inspect", str(broken))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distill-llm inspect: failed: JSONDecodeError:")
    assert "--debug" in lines[0] and DEBUG_ENV in lines[0]
    for debug in (cli("inspect", str(broken), "--debug"), cli("inspect", str(broken), **{DEBUG_ENV: "1"})):
        assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
        assert debug.stderr.strip().splitlines()[-1] == lines[0]


def test_inspect_json_is_one_object_for_scripts(tmp_path, capsys):
    write_set(tmp_path / "shards", [engine_rows(6)])
    assert main(["inspect", str(tmp_path / "shards"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 6 and info["prompts"] == 6 and info["k"] == 4 and info["shards"] == 1
    assert info["answers_checked"] == 6 and info["answer_pass_rate"] == pytest.approx(0.5)


def test_overrides_without_a_config_file_and_intermixed_flags(capsys):
    assert main(["config", "train.alpha=0", "--debug", "train.lr=0.01"]) == 0
    out = capsys.readouterr().out
    assert "alpha: 0" in out and "lr: 0.01" in out
