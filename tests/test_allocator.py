"""jemalloc for the ``quantize`` command (quantize/allocator.py, executor/memory.py).

The claims: the command re-executes itself with jemalloc preloaded when it is installed, never
twice, never against ``QUANTIZE_MALLOC=glibc``; the allocator changes no byte of the output; under
jemalloc freed pages stay for reuse until the per-layer ``release`` purges them; a bad setting is
exit 2 with one line. The tests that need the library are skipped where it is not installed
(Debian/Ubuntu: ``apt-get install libjemalloc2``; .ci/run installs it when it can).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from quantize.allocator import MALLOC_ENV, find_jemalloc, jemalloc_exec_env
from quantize.errors import InputError

from helpers import assert_same_files, output_files

LIB = find_jemalloc() if sys.platform.startswith("linux") else None
needs_jemalloc = pytest.mark.skipif(LIB is None, reason="libjemalloc is not installed")


# -- the decision (pure) ---------------------------------------------------------------------------


def _found():
    return "libjemalloc.so.2"


def _not_looked_up():
    raise AssertionError("the library lookup (ldconfig) ran where the answer did not depend on it")


def test_auto_preloads_the_library_found_and_marks_the_process():
    env = jemalloc_exec_env({"PATH": "/bin", "LD_PRELOAD": "libfoo.so"}, _found)
    assert env["LD_PRELOAD"] == "libjemalloc.so.2 libfoo.so"
    assert env["PATH"] == "/bin"
    assert jemalloc_exec_env(env, _not_looked_up) is None  # the re-executed process stays


@pytest.mark.parametrize("environ", [
    {MALLOC_ENV: "glibc"},
    {MALLOC_ENV: "GLIBC"},
    {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},  # the user preloaded it already
])
def test_no_reexecution_when_not_wanted_or_already_there(environ):
    assert jemalloc_exec_env(environ, _not_looked_up) is None


def test_auto_without_the_library_carries_on():
    assert jemalloc_exec_env({}, lambda: None) is None
    assert jemalloc_exec_env({MALLOC_ENV: "auto"}, lambda: None) is None


def test_required_but_missing_or_unknown_setting_is_an_input_error():
    with pytest.raises(InputError, match="apt-get install libjemalloc2"):
        jemalloc_exec_env({MALLOC_ENV: "jemalloc"}, lambda: None)
    with pytest.raises(InputError, match="use auto, glibc or jemalloc"):
        jemalloc_exec_env({MALLOC_ENV: "tcmalloc"}, _found)


def test_unknown_setting_exits_2_with_one_line():
    env = {**os.environ, MALLOC_ENV: "tcmalloc"}
    r = subprocess.run([sys.executable, "-m", "quantize", "--version"], capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and MALLOC_ENV in lines[0]


# -- with the library ------------------------------------------------------------------------------


def _gptq_cli(model, cal, out, malloc: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "QUANTIZE_MALLOC_EXEC")}
    env[MALLOC_ENV] = malloc
    r = subprocess.run([sys.executable, "-m", "quantize", "gptq", "--model", str(model), "--calibration", str(cal),
                        "--out", str(out), "--device", "cpu", "--group-size", "32"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads((out / "manifest.json").read_text())["metrics"]


@needs_jemalloc
def test_command_runs_under_jemalloc_and_writes_the_same_bytes(tiny_llama, calib_for, tmp_path):
    cal = calib_for(tiny_llama)
    je = _gptq_cli(tiny_llama, cal, tmp_path / "je", "auto")
    gl = _gptq_cli(tiny_llama, cal, tmp_path / "gl", "glibc")
    assert je["allocator"] == "jemalloc" and gl["allocator"] == "glibc"
    assert je["host_heap"] == gl["host_heap"] == "flat"
    assert_same_files(tmp_path / "je", tmp_path / "gl", output_files(tmp_path / "je"))


@needs_jemalloc
def test_freed_pages_are_reused_until_release_purges_them():
    code = textwrap.dedent("""
        import json, torch
        from quantize.executor import memory

        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096

        assert memory.allocator() == "jemalloc"
        assert memory.host_heap("flat") and not memory.offheap()
        n = 64 << 20
        a = torch.ones(n // 4); base = rss(); del a
        kept = rss()                 # freed, still resident: no decay
        b = torch.ones(n // 4); again = rss(); del b   # reused: no new pages
        memory.release(); purged = rss()
        print(json.dumps(dict(base=base, kept=kept, again=again, purged=purged)))
    """)
    env = {**os.environ, "LD_PRELOAD": LIB}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    m = json.loads(r.stdout.strip().splitlines()[-1])
    mb = 1 << 20
    assert m["kept"] > m["base"] - 8 * mb  # the 64 MiB block was not handed back when freed
    assert m["again"] < m["kept"] + 8 * mb  # the second block reused its pages
    assert m["purged"] < m["kept"] - 48 * mb  # release() handed them back


@pytest.mark.parametrize("found,says", [(None, "apt-get install libjemalloc2"), ("libjemalloc.so.2", "not in use here")])
def test_cpu_runs_under_glibc_say_once_what_jemalloc_would_give(found, says, monkeypatch, capsys):
    from quantize.executor import memory, stage

    monkeypatch.setattr(stage, "_hinted", False)
    monkeypatch.setattr(stage, "find_jemalloc", lambda: found)
    monkeypatch.setattr(stage, "allocator", lambda: "glibc")
    stage._allocator_hint("cuda:0")
    assert capsys.readouterr().err == ""  # not a CPU run
    stage._allocator_hint("cpu")
    stage._allocator_hint("cpu")
    err = capsys.readouterr().err
    assert err.count("jemalloc") >= 1 and says in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(stage, "_hinted", False)
    monkeypatch.setattr(stage, "allocator", lambda: memory.JEMALLOC)
    stage._allocator_hint("cpu")
    assert capsys.readouterr().err == ""  # already under jemalloc
