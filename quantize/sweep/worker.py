"""The body of a sweep's tasks, as plain functions (Ray runs them; so can a test, or a shell).

``run_job`` makes one run by calling the ``quantize`` command line in this process with the run's
arguments (``quantize --json-logs run RECIPE --set ... --out DIR``: the command itself, not a copy
of it), its stdout and stderr going to the run's log file ``OUTPUT_DIR/logs/RUN.log`` (one JSON
event per line). Reading those events as they are written, it learns what the run did:

* which layers of the quantize stage it computed in this attempt. A run whose worker died is
  rerun by the scheduler with the same arguments; the stage resumes from its last completed layer
  (``quantize/executor/resume.py``), and the layers it did not have to compute again are recorded
  in the run's manifest (``metrics.sweep.resumed_layers``) together with the attempt count;
* the one-line error of a failed run (the ``error`` event the command ends with).

``sample_job`` samples a calibration set shared by several runs: the sample stage of
``quantize run`` (``pipeline.run.plan_run``) into ``OUTPUT_DIR/shared/KEY``, skipped when complete.

Test hook: ``pause_after_layer`` (the sweep command passes ``QUANTIZE_SWEEP_PAUSE=RUN:LAYER``)
makes that run write its pid to ``logs/RUN.pid`` and wait after that layer, once (not again in
the retried attempt), so that a test can kill the worker process mid-quantization.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

QUANTIZE_STAGES = ("gptq", "rtn", "awq", "exl2", "fp8", "gguf")
PAUSE_SECONDS = 600


class _EventSink(io.TextIOBase):
    """A text stream (the command's stderr) that appends every line to the log file and hands the
    JSON events to ``on_event`` as they arrive (in the writing thread)."""

    def __init__(self, log: io.TextIOBase, on_event: Callable[[dict[str, Any]], None]):
        self.log, self.on_event, self._buf = log, on_event, ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self.log.write(line + "\n")
            self.log.flush()
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict):
                    self.on_event(rec)
        return len(s)

    def flush(self) -> None:
        self.log.flush()


def _record(log: io.TextIOBase, event: str, **fields: Any) -> None:
    log.write(json.dumps({"ts": round(time.time(), 3), "event": event, **fields}, default=str) + "\n")
    log.flush()


def _prepare(job: dict[str, Any]) -> str | None:
    """Enter the driver's working directory and environment; a one-line reason when impossible."""
    cwd = job.get("cwd")
    if cwd:
        try:
            os.chdir(cwd)
        except OSError as e:
            return (f"working directory {cwd} is not on node {socket.gethostname()} ({e.strerror}); "
                    "run the sweep from a directory every node mounts at the same path")
    os.environ.update(job.get("env") or {})
    return None


def _attempt(log_path: Path) -> int:
    """1 + the attempts this run's log already records (the log is reset when a run is submitted)."""
    if not log_path.is_file():
        return 1
    return 1 + sum(1 for line in log_path.read_text(errors="replace").splitlines() if '"event": "sweep_attempt"' in line)


def _link_calibration(out: Path, shared: Path) -> None:
    """``OUT/calibration`` -> the shared set (relative, so it holds on every node's mount)."""
    out.mkdir(parents=True, exist_ok=True)
    link = out / "calibration"
    target = os.path.relpath(shared / "calibration", out)
    if link.is_symlink():
        if os.readlink(link) == target:
            return
        link.unlink()
    elif link.exists():  # a set this run sampled itself earlier: `quantize run` decides whether it is current
        return
    link.symlink_to(target, target_is_directory=True)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Make one run. ``job``: name, argv (of ``quantize``), out, log, cwd, env, threads,
    shared_calibration, pause_after_layer, pid_file. Returns its status, exit code, error line, seconds, attempt, pid,
    node, the quantize stage's layers computed here and those resumed."""
    t0 = time.time()
    info: dict[str, Any] = {"name": job["name"], "pid": os.getpid(), "node": socket.gethostname()}
    problem = _prepare(job)
    log_path = Path(job["log"])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    attempt = _attempt(log_path)
    info["attempt"] = attempt
    seen: dict[str, Any] = {"stage": None, "layers": {}, "n_layers": {}, "error": None, "code": None}
    pause = job.get("pause_after_layer")
    pid_file = Path(job["pid_file"]) if job.get("pid_file") else None

    def on_event(rec: dict[str, Any]) -> None:
        ev = rec.get("event")
        if ev == "stage_start":
            seen["stage"] = rec.get("stage")
            if rec.get("stage") in QUANTIZE_STAGES and "layers" in rec:
                seen["n_layers"][rec["stage"]] = rec["layers"]
        elif ev == "layer" and seen["stage"] in QUANTIZE_STAGES:
            seen["layers"].setdefault(seen["stage"], []).append(rec.get("layer"))
            if pause is not None and rec.get("layer") == pause and pid_file is not None and not pid_file.exists():
                tmp = pid_file.with_name(pid_file.name + ".tmp")
                tmp.write_text(str(os.getpid()))
                os.replace(tmp, pid_file)
                time.sleep(PAUSE_SECONDS)  # the test kills this process here
        elif ev == "error":
            seen["error"] = str(rec.get("message", "")).removeprefix("error: ")
            seen["code"] = rec.get("code")

    with open(log_path, "a") as log:
        _record(log, "sweep_attempt", run=job["name"], attempt=attempt, pid=info["pid"], node=info["node"],
                command=job.get("command"))
        if problem is not None:
            rc, seen["error"] = 2, problem
        else:
            try:
                if job.get("shared_calibration"):
                    _link_calibration(Path(job["out"]), Path(job["shared_calibration"]))
                if job.get("threads"):  # what the task asked for; torch on CPU rounds by its thread count
                    import torch

                    torch.set_num_threads(int(job["threads"]))
                from ..cli import main

                sink = _EventSink(log, on_event)
                with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(log):
                    rc = main(["--json-logs", *job["argv"]])
            except Exception as e:  # noqa: BLE001 - reported as the run's one line, never a traceback
                rc, seen["error"] = 1, f"{type(e).__name__}: {_one_line(e)}"
        stage = next(iter(seen["n_layers"]), None)
        computed = sorted(set(seen["layers"].get(stage, []))) if stage else []
        resumed = sorted(set(range(seen["n_layers"][stage])) - set(computed)) if stage else []
        info.update(status="done" if rc == 0 else "failed", exit_code=rc, error=seen["error"] if rc else None,
                    seconds=round(time.time() - t0, 2), stage=stage, computed_layers=computed, resumed_layers=resumed)
        if rc == 0:
            _stamp_manifest(Path(job["out"]), job, info)
        _record(log, "sweep_end", **{k: v for k, v in info.items() if k != "name"}, run=job["name"])
    return info


def _stamp_manifest(out: Path, job: dict[str, Any], info: dict[str, Any]) -> None:
    """Record the sweep's view of the run in the run's manifest (``metrics.sweep``): attempts and
    the quantize stage's layers resumed from a previous attempt rather than computed in this one."""
    from .. import manifest as mf

    m = mf.load_manifest(out, required=True)
    sweep = {"sweep": job.get("sweep"), "attempts": info["attempt"], "stage": info["stage"],
             "resumed_layers": info["resumed_layers"], "computed_layers": info["computed_layers"]}
    done = m.model_copy(update={"metrics": {**m.metrics, "sweep": sweep}})
    mf.write_manifest(out, mf.Manifest.model_validate(done.model_dump()))


def sample_job(job: dict[str, Any]) -> dict[str, Any]:
    """Sample one shared calibration set with the sample stage of ``quantize run`` (recipe + overrides
    as for its runs) into ``job["dir"]``. Returns status, error, the set's manifest sha256."""
    t0 = time.time()
    info: dict[str, Any] = {"key": job["key"], "pid": os.getpid(), "node": socket.gethostname()}
    problem = _prepare(job)
    log_path = Path(job["log"])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        _record(log, "sweep_attempt", calibration=job["key"], pid=info["pid"], node=info["node"])
        rc, error, sha = (2, problem, None) if problem else (0, None, None)
        if problem is None:
            from .. import log as qlog
            from .. import manifest as mf
            from ..errors import QuantizeError
            from ..pipeline.recipe import load_recipe
            from ..pipeline.run import _check_source, _done, plan_run

            qlog.configure(True)
            sink = _EventSink(log, lambda rec: None)
            try:
                with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(log):
                    path = Path(job["recipe"])
                    recipe = load_recipe(path, job["overrides"])
                    _check_source(recipe, path)
                    _, plans = plan_run(recipe, path, out=Path(job["dir"]))
                    sample = next(p for p in plans if p.name == "sample")
                    if _done(sample):
                        qlog.event("stage_skip", f"sample: complete at {sample.out}, skipped", stage="sample")
                    else:
                        qlog.event("stage_start", f"sample -> {sample.out}", stage="sample")
                        sample.run()
                    sha = mf.manifest_sha256(sample.out)
            except QuantizeError as e:
                rc, error = e.exit_code, str(e)
            except Exception as e:  # noqa: BLE001
                rc, error = 1, f"{type(e).__name__}: {_one_line(e)}"
        info.update(status="done" if rc == 0 else "failed", exit_code=rc, error=error, manifest_sha256=sha,
                    seconds=round(time.time() - t0, 2))
        _record(log, "sweep_end", **info)
    return info


def probe_job(job: dict[str, Any]) -> dict[str, Any]:
    """Can this node see the sweep's output directory (the token the driver wrote there), its
    working directory and the recipes? Returns node, ok, reason."""
    node = socket.gethostname()
    problem = _prepare(job)
    if problem is None:
        token = Path(job["token_path"])
        try:
            seen = token.read_text()
        except OSError as e:
            seen = None
            problem = f"{token.parent} is not visible from node {node} ({e.strerror or e})"
        if seen is not None and seen != job["token"]:
            problem = f"{token.parent} on node {node} is another directory than the driver's (a local disk, not shared)"
    if problem is None:
        missing = [r for r in job.get("recipes", []) if not Path(r).is_file()]
        if missing:
            problem = f"recipe {missing[0]} is not visible from node {node}"
    return {"node": node, "ok": problem is None, "reason": problem}
