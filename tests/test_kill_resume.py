"""SIGKILL mid-run, rerun the same command: resumes and ends bit-identical (scripts/kill_resume.py)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kill_resume.py"


@pytest.mark.slow
def test_sigkill_then_rerun_is_bit_identical(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("kill_resume", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--layers", "3", "--kill-at", "2", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "ALL IDENTICAL" in out
