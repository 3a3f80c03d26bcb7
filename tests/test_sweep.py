"""`quantize sweep` on Ray: a local instance on CPU, the embedded tiny model (recipes/tiny.yaml).

One Ray instance is started for the module (the sweeps connect to it with --address); the test of a
broken run uses the command's own embedded instance instead, so both ways in are exercised. The
runs are the tiny recipe made smaller (16 x 128 calibration tokens, 8 eval windows), one CPU thread
each: torch on CPU rounds by its thread count, so the one-by-one runs they are compared with use
one thread too (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from quantize import manifest as mf
from quantize.sweep.spec import set_value
from quantize.sweep.worker import probe_job

REPO = Path(__file__).resolve().parents[1]
SMALL = {"check": "off", "calibration.samples": 16, "calibration.seq_len": 128, "eval.max_windows": 8,
         "eval.seq_len": 128}
GRID = {"method": ["gptq", "rtn"], "bits": [3, 4]}
GRID_RUNS = ["tiny-gptq-3bit", "tiny-gptq-4bit", "tiny-rtn-3bit", "tiny-rtn-4bit"]


def quantize(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "quantize", *args], cwd=REPO, capture_output=True, text=True,
                          env={**full_env, **(env or {})}, timeout=timeout)


def write_sweep(path: Path, name: str, out: Path, matrix: dict, recipes: list | None = None) -> Path:
    data = {"name": name, "output_dir": str(out), "recipes": recipes or ["recipes/tiny.yaml"], "set": SMALL,
            "matrix": matrix}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sha_tree(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# without Ray: the sweep file, dry-run, and the promise that no other command imports Ray


def test_sweep_file_rejects_unknown_keys_and_bad_combinations(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("name: x\nrecipes: [recipes/tiny.yaml]\nmatrx: {bits: [3]}\n")
    r = quantize("sweep", str(bad), "--dry-run")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"!! error: {bad}: invalid sweep file at matrx: unknown key (typo?)"]

    awq3 = write_sweep(tmp_path / "awq.yaml", "awq", tmp_path / "o", {"method": ["awq"], "bits": [3]})
    r = quantize("sweep", str(awq3), "--dry-run")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert f"{awq3}: run tiny-awq-3bit:" in line and "4-bit only" in line and "exclude" in line

    typo_key = write_sweep(tmp_path / "key.yaml", "k", tmp_path / "o", {"bitz": [3]})
    r = quantize("sweep", str(typo_key), "--dry-run")
    assert r.returncode == 2 and "bitz: unknown key (typo?)" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_set_values_read_back_as_written():
    for v in ["off", "gptq", "Q4_K_M", "a b", "", "3", True, None, 3, 0.01, [1, 2], "x: y"]:
        assert yaml.safe_load(set_value(v)) == v, v


def test_dry_run_70b_and_8b_without_weights(tmp_path):
    env = {"LLAMA3_70B_DIR": str(tmp_path / "no-70b"), "LLAMA3_8B_DIR": str(tmp_path / "no-8b")}
    r = quantize("sweep", "recipes/sweeps/llama3.yaml", "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "no-70b").exists() and not (tmp_path / "no-8b").exists()
    rows = {ln.split()[0]: ln.split() for ln in r.stdout.splitlines() if ln.startswith("llama3-")}
    assert set(rows) == {"llama3-70b-gptq-4bit", "llama3-70b-gptq-3bit", "llama3-70b-rtn-4bit",
                         "llama3-8b-gptq-4bit", "llama3-8b-gptq-3bit", "llama3-8b-rtn-4bit"}
    # columns: run, setting..., GPUs, CPUs, host GiB, (est.), GPU GiB, source GiB, output GiB
    g70, g8 = rows["llama3-70b-gptq-4bit"], rows["llama3-8b-gptq-4bit"]
    assert g70[-7:-5] == ["1*", "1"] and g70[-5] == "64.00"  # the recipe's 64 GiB over the estimate
    assert g70[-2:] == ["131.42", "37.06"]  # quantize plan's bf16 and GPTQ 4-bit g128 figures (README)
    assert rows["llama3-70b-gptq-3bit"][-1] == "29.03"
    assert g8[-5] == "16.00" and float(g8[-3]) > 10  # the GPU working set at 128 x 2048 tokens
    assert "calibration" in r.stdout and r.stdout.count("sampled once for 3 run(s)") == 2
    cmds = quantize("sweep", "recipes/sweeps/llama3.yaml", "--dry-run", "--emit-commands", env=env)
    lines = cmds.stdout.splitlines()
    assert len(lines) == 6 and all(ln.startswith("LLAMA3_") and " quantize run recipes/llama3-" in ln for ln in lines)
    assert "--set method=gptq --set bits=3 --out out/sweeps/llama3/llama3-70b-gptq-3bit" in lines[1]


def test_ray_is_never_imported_by_the_other_commands():
    code = (
        "import sys\n"
        "from quantize import cli\n"
        "for name in cli.COMMANDS:\n"
        "    cli.cli.get_command(None, name)\n"
        "cli.main(['--help'])\n"
        "cli.main(['run', '--help'])\n"
        "cli.main(['sweep', 'recipes/sweeps/llama3.yaml', '--dry-run'])\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_probe_reports_a_node_that_cannot_see_the_output(tmp_path):
    token = tmp_path / ".sweep-probe-x"
    job = {"cwd": str(REPO), "env": {}, "token": "abc", "token_path": str(token), "recipes": ["recipes/tiny.yaml"]}
    missing = probe_job(job)
    assert not missing["ok"] and "is not visible from node" in missing["reason"]
    token.write_text("another")
    other = probe_job(job)
    assert not other["ok"] and "another directory" in other["reason"]
    token.write_text("abc")
    assert probe_job(job)["ok"]
    assert not probe_job({**job, "cwd": str(tmp_path / "nowhere")})["ok"]


# ---------------------------------------------------------------------------------------------
# on Ray


@pytest.fixture(scope="module")
def ray_address():
    ray = pytest.importorskip("ray")
    logging.getLogger("ray").setLevel(logging.ERROR)  # its token-authentication notice
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20,
             log_to_driver=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _one_by_one(commands: list[str], swap: tuple[str, str]) -> None:
    """Run `quantize run` command lines (as --emit-commands prints them), two at a time, one thread each."""
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "OMP_NUM_THREADS": "1"}
    procs: list[subprocess.Popen] = []
    for line in commands:
        argv = shlex.split(line.replace(*swap))
        assert argv[:2] == ["quantize", "run"]
        procs.append(subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        if len(procs) == 2 or line == commands[-1]:
            for p in procs:
                _, err = p.communicate(timeout=300)
                assert p.returncode == 0, err
            procs = []


@pytest.fixture(scope="module")
def grid(tmp_path_factory, ray_address):
    """The 2 x 2 sweep (GPTQ/RTN x 3/4 bits) on the module's Ray, then the same runs one by one."""
    root = tmp_path_factory.mktemp("grid")
    sf = write_sweep(root / "grid.yaml", "grid", root / "sweep", GRID)
    t0 = time.time()
    res = quantize("--json-logs", "sweep", str(sf), "--address", ray_address)
    seconds = time.time() - t0
    cmds = quantize("sweep", str(sf), "--dry-run", "--emit-commands").stdout.splitlines()
    _one_by_one(cmds, (f"--out {root / 'sweep'}/", f"--out {root / 'single'}/"))
    return {"root": root, "file": sf, "result": res, "seconds": seconds, "commands": cmds}


def test_2x2_sweep_equals_quantize_run_one_by_one(grid):
    res, root = grid["result"], grid["root"]
    assert res.returncode == 0, res.stderr
    print(f"2x2 sweep: {grid['seconds']:.1f} s")
    sweep, single = root / "sweep", root / "single"
    for name in GRID_RUNS:
        ours, theirs = sha_tree(sweep / name / "model"), sha_tree(single / name / "model")
        assert ours == theirs and "model.safetensors" in ours, name
        e1 = json.loads((sweep / name / "eval" / "metrics.json").read_text())
        e2 = json.loads((single / name / "eval" / "metrics.json").read_text())
        e1.pop("seconds"), e2.pop("seconds")  # the eval's wall time is the only figure that differs
        assert e1 == e2 and e1["kl"] > 0, name
        assert mf.verify(sweep / name) == [] and mf.verify(sweep / name / "model") == []

    # calibration sampled once, shared by its manifest hash, and the same bytes as each run's own
    shared = list((sweep / "shared").iterdir())
    assert len(shared) == 1 and len(list((sweep / "logs").glob("calibration-*.log"))) == 1
    cal_sha = mf.manifest_sha256(shared[0] / "calibration")
    for name in GRID_RUNS:
        assert (sweep / name / "calibration").is_symlink()
        assert (sweep / name / "calibration").resolve() == (shared[0] / "calibration").resolve()
        model = mf.load_manifest(sweep / name / "model")
        assert [i.manifest_sha256 for i in model.inputs if i.role == "calibration"] == [cal_sha]
        assert sha_tree(single / name / "calibration") == sha_tree(shared[0] / "calibration")

    # progress: one JSON event per line; every run went queued -> running -> done
    evs = events(res.stderr)
    for name in GRID_RUNS:
        assert [e["state"] for e in evs if e.get("event") == "run_state" and e["run"] == name] == \
            ["waiting", "queued", "running", "done"]
    assert sum(1 for e in evs if e.get("event") == "calibration" and e["phase"] == "sampling") == 1

    # the table and sweep.json: status, time, size, KL, gate, each run's manifest hash
    report = json.loads((sweep / "sweep.json").read_text())
    assert [r["name"] for r in report["runs"]] == GRID_RUNS
    for r in report["runs"]:
        out = sweep / r["name"]
        assert r["status"] == "done" and r["attempts"] == 1 and r["resumed_layers"] == []
        assert r["manifest_sha256"] == mf.manifest_sha256(out)
        assert r["size_bytes"] == sum(o.bytes for o in mf.load_manifest(out / "model").outputs)
        assert r["kl"] == json.loads((out / "eval" / "metrics.json").read_text())["kl"]
        assert r["gate"] == "pass" and r["calibration_manifest_sha256"] == cal_sha
        assert r["command"] in grid["commands"]
    rows = [ln.split() for ln in res.stdout.splitlines() if ln.startswith("tiny-")]
    assert [(row[0], row[1]) for row in rows] == [(n, "done") for n in GRID_RUNS]
    assert all(float(row[4]) == pytest.approx(r["kl"], abs=1e-6) for row, r in zip(rows, report["runs"]))

    # rerun: every run is complete, so nothing runs (and no Ray instance is even needed)
    t0 = time.time()
    again = quantize("sweep", str(grid["file"]))
    assert again.returncode == 0, again.stderr
    assert [ln.split()[:2] for ln in again.stdout.splitlines() if ln.startswith("tiny-")] == \
        [[n, "skipped"] for n in GRID_RUNS]
    assert "queued" not in again.stderr and time.time() - t0 < 30
    assert json.loads((sweep / "sweep.json").read_text())["ray"].startswith("none")


def test_killed_worker_is_retried_and_resumes_bit_identical(grid, ray_address, tmp_path):
    sf = write_sweep(tmp_path / "kill.yaml", "kill", tmp_path / "sweep", {"method": ["gptq"], "bits": [4]})
    name = "tiny-gptq-4bit"
    pid_file = tmp_path / "sweep" / "logs" / f"{name}.pid"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "quantize", "--json-logs", "sweep", str(sf), "--address", ray_address],
                            cwd=REPO, env={**env, "QUANTIZE_SWEEP_PAUSE": f"{name}:1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while not pid_file.is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert pid_file.is_file(), "the run never reported its pid"
        pid = int(pid_file.read_text())
        assert pid != proc.pid and Path(f"/proc/{pid}").exists()  # the Ray worker, paused after layer 1
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    run = tmp_path / "sweep" / name
    assert sha_tree(run / "model") == sha_tree(grid["root"] / "single" / name / "model")
    sweep_metrics = mf.load_manifest(run).metrics["sweep"]
    assert sweep_metrics["attempts"] == 2
    assert sweep_metrics["resumed_layers"] == [0] and sweep_metrics["computed_layers"] == [1, 2, 3]
    states = [e["state"] for e in events(err) if e.get("event") == "run_state"]
    assert states == ["waiting", "queued", "running", "retrying", "done"]
    (rec,) = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["runs"]
    assert rec["status"] == "done" and rec["attempts"] == 2 and rec["resumed_layers"] == [0]
    assert not (run / "model.partial").exists()


def test_output_dir_a_worker_cannot_see_exits_2(ray_address, tmp_path):
    """The driver's output directory on a disk the workers do not see (a tmpfs in the driver's own
    mount namespace): the shared-storage check stops the sweep before any run, exit 2, one line."""
    private = tmp_path / "private"
    private.mkdir()
    ns = ["unshare", "--mount", "--propagation", "private"]
    if shutil.which("unshare") is None or subprocess.run([*ns, "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare --mount` (root) to give the driver a disk the workers do not see")
    sf = write_sweep(tmp_path / "hidden.yaml", "hidden", private / "out", {"method": ["rtn"], "bits": [4]})
    script = f"mount -t tmpfs none {private} && exec {sys.executable} -m quantize sweep {sf} --address {ray_address}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([*ns, "sh", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"!! error: {private / 'out'}: {private / 'out'} is not visible from node ")
    assert "shared storage mounted at the same path on every node" in line
    assert not (private / "out").exists()  # the driver's private disk is gone with its namespace


def test_broken_run_fails_in_the_table_while_the_others_complete(tmp_path):
    """The command's own local Ray instance (no --address): a run with a missing model path fails
    with the one line `quantize run` prints for it; the other run completes; exit 1."""
    missing = tmp_path / "no-such-model"
    recipes = ["recipes/tiny.yaml", {"recipe": "recipes/tiny.yaml", "name": "broken", "set": {"source.model": str(missing)}}]
    sf = write_sweep(tmp_path / "broken.yaml", "broken", tmp_path / "sweep", {"method": ["rtn"], "bits": [4]}, recipes)
    r = quantize("sweep", str(sf))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("!! error: 1 of 2 runs failed (broken-rtn-4bit)")
    report = {x["name"]: x for x in json.loads((tmp_path / "sweep" / "sweep.json").read_text())["runs"]}
    assert report["tiny-rtn-4bit"]["status"] == "done" and report["tiny-rtn-4bit"]["kl"] > 0
    assert report["broken-rtn-4bit"]["status"] == "failed"
    assert report["broken-rtn-4bit"]["exit_code"] == 2
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["ray"] == "local"
    # the same line `quantize run` ends with for that run
    alone = quantize(*shlex.split(report["broken-rtn-4bit"]["command"])[1:])
    assert alone.returncode == 2
    assert alone.stderr.strip() == f"!! error: {report['broken-rtn-4bit']['error']}"
    assert f"source.model = {missing} does not exist" in report["broken-rtn-4bit"]["error"]
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith("broken-rtn-4bit"))
    assert row.split()[1] == "failed" and row.endswith(report["broken-rtn-4bit"]["error"])
