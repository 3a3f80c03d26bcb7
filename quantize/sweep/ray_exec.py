"""A sweep's tasks on Ray. The only module of ``quantize`` that imports Ray, and only when called.

* Instance: with no address (neither ``--address`` nor ``RAY_ADDRESS``), a local Ray instance
  started here and stopped at the end (few CPUs, no dashboard, a small object store: tasks pass
  only small dicts; outputs go to the shared directory); with an address, that cluster
  (``ray start --head`` / KubeRay), which is left running.
* Shared storage: before any run, a probe task on every alive node reads a token the driver wrote
  into the output directory; a node that cannot see it (or sees another directory there) stops the
  sweep with exit 2, before any work.
* Tasks: one per shared calibration set (``worker.sample_job``), then one per run
  (``worker.run_job``) requesting the run's resources (``resources.py``). Each task runs in a fresh
  worker process (``max_calls=1``: a run changes its process's working directory, environment and
  allocator policy). A task whose worker process or node dies is retried (``max_retries``) and
  resumes from the run's last completed layer; a run that fails is reported and the others go on.
* Progress: ``on_state(name, state, **fields)`` for every state change of a run, read from the
  tasks' results and from the attempt records the tasks write into their log files.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError, RuntimeFault
from .resources import RunResources
from .spec import RunSpec

OBJECT_STORE_BYTES = 128 * 2**20  # tasks exchange small dicts only
PROBE_TIMEOUT_S = 180


@dataclass
class Job:
    run: RunSpec
    resources: RunResources
    log: Path
    pid_file: Path
    offset: int = 0  # bytes of the log already read
    attempts: int = 0
    result: dict[str, Any] = field(default_factory=dict)


def _ray():
    try:
        import ray
    except ImportError:
        raise InputError("quantize sweep runs on Ray, which is not installed: pip install 'quantize[ray]' "
                         "(or use --dry-run --emit-commands for a Slurm array)") from None
    return ray


def start(address: str | None, num_cpus: int) -> tuple[Any, str, bool]:
    """(ray, what we are on: "local" or the address, whether we started it)."""
    ray = _ray()
    addr = address or os.environ.get("RAY_ADDRESS") or None
    common = dict(log_to_driver=False, configure_logging=False, logging_level=logging.ERROR)
    if addr:
        try:
            ray.init(address=addr, **common)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise InputError(f"--address {addr}: no Ray cluster answers there ({' '.join(str(e).split())[:200]}); "
                             "start one with `ray start --head`, or leave --address and RAY_ADDRESS unset "
                             "for a local instance") from None
        return ray, addr, False
    # Ray announces its default (token authentication for a new local instance) as a warning line
    # on stderr, which would break --json-logs' one object per line: quiet its logger while starting
    ray_log = logging.getLogger("ray")
    level = ray_log.level
    ray_log.setLevel(logging.ERROR)
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
                 **common)
    finally:
        ray_log.setLevel(level)
    return ray, "local", True


def _alive_nodes(ray) -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]


def check_shared(ray, root: Path, base_job: dict[str, Any], recipes: list[str]) -> list[str]:
    """Names of the nodes that see ``root`` (the directory the driver sees); InputError otherwise."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .worker import probe_job

    root.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    token_path = root / f".sweep-probe-{token[:8]}"
    token_path.write_text(token)
    try:
        probe = ray.remote(probe_job)
        refs = [probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote({**base_job, "token": token, "token_path": str(token_path.resolve()), "recipes": recipes})
                for n in _alive_nodes(ray)]
        try:
            answers = ray.get(refs, timeout=PROBE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeFault(f"the Ray nodes did not answer the shared-storage check within {PROBE_TIMEOUT_S} s") from None
    finally:
        token_path.unlink(missing_ok=True)
    bad = [a for a in answers if not a["ok"]]
    if bad:
        raise InputError(f"{root}: {bad[0]['reason']}; the sweep's output_dir (or --out) must be shared storage "
                         "mounted at the same path on every node (NFS, CephFS, a PVC in KubeRay)")
    return [a["node"] for a in answers]


def _infeasible(res: dict[str, Any], nodes: list[dict[str, Any]]) -> str | None:
    """Why no node could ever run a task asking ``res`` (None when one could)."""
    for n in nodes:
        r = n.get("Resources", {})
        if (r.get("CPU", 0) >= res["num_cpus"] and r.get("GPU", 0) >= res["num_gpus"]
                and r.get("memory", 0) >= res["memory"]):
            return None
    best = max((n.get("Resources", {}).get("memory", 0) for n in nodes), default=0)
    return (f"needs {res['num_cpus']} CPU, {res['num_gpus']} GPU and {res['memory'] / 2**30:.1f} GiB of host memory; "
            f"no node has that (largest memory: {best / 2**30:.1f} GiB): add such a node or lower resources.ram")


def _read_attempts(job: Job) -> list[dict[str, Any]]:
    """New ``sweep_attempt`` records in the job's log since the last call."""
    import json

    try:
        with open(job.log, "rb") as f:
            f.seek(job.offset)
            data = f.read()
    except OSError:
        return []
    end = data.rfind(b"\n") + 1
    job.offset += end
    out = []
    for line in data[:end].decode(errors="replace").splitlines():
        if '"sweep_attempt"' in line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def execute(jobs: list[Job], *, root: Path, address: str | None, max_parallel: int | None, max_retries: int,
            cwd: str, pause: tuple[str, int] | None, sweep_name: str,
            on_state: Callable[..., None]) -> tuple[str, dict[str, dict[str, Any]]]:
    """Run ``jobs`` (shared calibration sets first); returns (the instance: "local" or the address,
    each run's result: status, exit_code, error, seconds, attempt, resumed_layers, ...)."""
    from .worker import run_job, sample_job

    cpus = max(j.resources.cpus for j in jobs)
    local_cpus = max(cpus, min(os.cpu_count() or 1, (max_parallel or 64) * cpus))
    ray, where, started = start(address, local_cpus)
    results: dict[str, dict[str, Any]] = {}
    running: dict[Any, Job] = {}
    try:
        base = {"cwd": cwd, "env": {}}
        recipes = sorted({str(j.run.recipe_path) for j in jobs})
        nodes = check_shared(ray, root, base, recipes)
        on_state(None, "cluster", ray=where, nodes=len(nodes),
                 cpus=ray.cluster_resources().get("CPU", 0), gpus=ray.cluster_resources().get("GPU", 0))
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        alive = _alive_nodes(ray)
        run_task = ray.remote(max_calls=1)(run_job)
        sample_task = ray.remote(max_calls=1)(sample_job)

        # shared calibration sets: one task per key whose set is not complete yet
        groups: dict[str, list[Job]] = {}
        queue: list[Job] = []
        for j in jobs:
            (groups.setdefault(j.run.calibration_key, []) if j.run.calibration_key else queue).append(j)
        pending_cal: dict[Any, str] = {}
        cal_queue: list[str] = []
        for key, members in groups.items():
            if calibration_complete(members[0].run):
                on_state(None, "calibration", key=key, phase="complete", dir=str(members[0].run.shared_calibration))
                queue += members
            else:
                cal_queue.append(key)
                for j in members:
                    on_state(j.run.name, "waiting", calibration=key)

        def announce(j: Job) -> None:  # the attempts the job's log records since the last look
            for rec in _read_attempts(j):
                j.attempts = rec.get("attempt", j.attempts + 1)
                on_state(j.run.name, "running" if j.attempts == 1 else "retrying", attempt=j.attempts,
                         node=rec.get("node"), pid=rec.get("pid"))

        def submit(j: Job) -> None:
            opts = j.resources.ray_options(cluster_gpus)
            why = _infeasible(opts, alive)
            if why:
                results[j.run.name] = {"status": "failed", "exit_code": 1, "error": why, "attempt": 0}
                on_state(j.run.name, "failed", error=why)
                return
            j.log.unlink(missing_ok=True)
            j.pid_file.unlink(missing_ok=True)
            job = {"name": j.run.name, "argv": j.run.argv(), "command": j.run.command(), "out": str(j.run.out),
                   "log": str(j.log), "cwd": cwd, "env": j.run.env, "sweep": sweep_name, "threads": opts["num_cpus"],
                   "shared_calibration": str(j.run.shared_calibration) if j.run.shared_calibration else None,
                   "pause_after_layer": pause[1] if pause and pause[0] == j.run.name else None,
                   "pid_file": str(j.pid_file)}
            ref = run_task.options(max_retries=max_retries, retry_exceptions=False, **opts).remote(job)
            running[ref] = j
            on_state(j.run.name, "queued", cpus=opts["num_cpus"], gpus=opts["num_gpus"],
                     memory_gib=round(opts["memory"] / 2**30, 2))

        def submit_sample(key: str) -> None:
            first = groups[key][0].run
            log = root / "logs" / f"calibration-{key}.log"
            log.unlink(missing_ok=True)
            job = {"key": key, "recipe": str(first.recipe_path), "overrides": first.overrides, "cwd": cwd,
                   "env": first.env, "dir": str(first.shared_calibration), "log": str(log)}
            ref = sample_task.options(max_retries=max_retries, retry_exceptions=False, num_cpus=1,
                                      memory=min(j.resources.memory for j in groups[key])).remote(job)
            pending_cal[ref] = key
            on_state(None, "calibration", key=key, phase="sampling", dir=str(first.shared_calibration),
                     runs=[j.run.name for j in groups[key]])

        limit = max_parallel or 1 << 30
        while queue or running or pending_cal or cal_queue:
            while cal_queue and len(running) + len(pending_cal) < limit:
                submit_sample(cal_queue.pop(0))
            while queue and len(running) + len(pending_cal) < limit:
                submit(queue.pop(0))
            refs = list(running) + list(pending_cal)
            if not refs:
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=0.5)
            for j in running.values():
                announce(j)
            for ref in ready:
                if ref in pending_cal:
                    key = pending_cal.pop(ref)
                    res = _get(ray, ref, max_retries)
                    if res["status"] == "done":
                        on_state(None, "calibration", key=key, phase="done", seconds=res.get("seconds"),
                                 manifest_sha256=res.get("manifest_sha256"))
                        queue += groups[key]
                    else:
                        on_state(None, "calibration", key=key, phase="failed", error=res.get("error"))
                        for j in groups[key]:
                            results[j.run.name] = {**res, "attempt": 0}
                            on_state(j.run.name, "failed", error=res.get("error"))
                    continue
                j = running.pop(ref)
                announce(j)  # an attempt that started and ended between two looks
                res = _get(ray, ref, max_retries)
                res.setdefault("attempt", j.attempts)
                results[j.run.name] = res
                if res["status"] == "done":
                    on_state(j.run.name, "done", seconds=res.get("seconds"), attempt=res.get("attempt"),
                             resumed_layers=res.get("resumed_layers"))
                else:
                    on_state(j.run.name, "failed", error=res.get("error"), exit_code=res.get("exit_code"))
    except KeyboardInterrupt:
        for ref in running:
            ray.cancel(ref, force=True)
        raise
    finally:
        ray.shutdown()  # stops the local instance we started; only disconnects from a cluster
    return where, results


def _get(ray, ref, max_retries: int) -> dict[str, Any]:
    """A task's result dict, or a failed one when Ray could not run it (worker or node died too often)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as e:
        kind = type(e).__name__
        return {"status": "failed", "exit_code": 1,
                "error": f"{kind}: the task's worker died {max_retries + 1} times (max_retries {max_retries}); "
                         "see the run's log under logs/"}


def calibration_complete(run: RunSpec) -> bool:
    """Whether the run's shared calibration set is complete for its calibration settings (the
    criteria of `quantize run`'s sample stage: complete manifest, same parameters, files present)."""
    from .. import manifest as mf

    if run.shared_calibration is None:
        return False
    d = run.shared_calibration / "calibration"
    try:
        m = mf.load_manifest(d) if d.is_dir() else None
    except InputError:
        return False
    cal = run.recipe.calibration
    if m is None or m.status != "complete":
        return False
    if any(m.params.get(k) != v for k, v in (("n_samples", cal.samples), ("seq_len", cal.seq_len), ("seed", cal.seed))):
        return False
    if str(Path(run.recipe.source.model)) not in {str(Path(i.path)) for i in m.inputs}:
        return False
    return not mf.verify_sizes(d)
