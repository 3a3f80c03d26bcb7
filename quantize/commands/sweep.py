"""`quantize sweep SWEEP.yaml`: a matrix of `quantize run`s, side by side on Ray (quantize/sweep/)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from .. import log
from ..errors import InputError, RuntimeFault


def _gib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f}" if n >= 2**30 / 100 else f"{n / 2**30:.4f}"


def run_complete(run) -> bool:
    """A run directory whose manifest is complete for this very recipe and overrides, files present."""
    from .. import manifest as mf

    try:
        m = mf.load_manifest(run.out) if run.out.is_dir() else None
    except InputError:
        return False
    if m is None or m.status != "complete" or m.stage != "run":
        return False
    if m.params.get("recipe") != run.recipe.model_dump(mode="json") or m.params.get("recipe_path") != str(run.recipe_path):
        return False
    return not mf.verify_sizes(run.out)


def _print_plan(sweep, path: Path, root: Path, runs, resources) -> None:
    echo = click.echo
    echo(f"sweep {sweep.name} ({path}): {len(runs)} runs; output {root} (every Ray node must see this path)")
    keys: dict[str, list] = {}
    for r in runs:
        if r.calibration_key:
            keys.setdefault(r.calibration_key, []).append(r)
    for key, members in keys.items():
        c = members[0].recipe.calibration
        echo(f"calibration {key}: {members[0].recipe.source.model}, {c.dataset} {c.samples} x {c.seq_len} seed {c.seed}, "
             f"sampled once for {len(members)} run(s) -> {members[0].shared_calibration}/calibration")
    w = max(len("run"), *(len(r.name) for r in runs))
    echo(f"{'run':<{w}}  {'setting':<22} {'GPUs':>4} {'CPUs':>4} {'host GiB':>9} {'(est.)':>7} {'GPU GiB':>8} "
         f"{'source GiB':>10} {'output GiB':>10}")
    notes = []
    for r in runs:
        res = resources[r.name]
        gpus = "1*" if res.gpus is None else str(res.gpus)
        setting = res.setting if res.setting.startswith(r.recipe.method) else f"{r.recipe.method} ({res.setting})"
        echo(f"{r.name:<{w}}  {setting:<22} {gpus:>4} {res.cpus:>4} {_gib(res.memory):>9} {_gib(res.memory_estimate):>7} "
             f"{_gib(res.device_memory):>8} {_gib(res.source_bytes):>10} {_gib(res.output_bytes):>10}")
        if res.note:
            notes.append(f"  {r.name}: no plan figures: {res.note}")
    if any(resources[r.name].gpus is None for r in runs):
        echo("  * device auto: 1 GPU where the cluster has GPUs, else the run goes to a CPU")
    for n in notes:
        echo(n)
    echo("commands:")
    for r in runs:
        echo(f"  {r.command()}")


def _on_state(name: str | None, state: str, **f) -> None:
    if name is None:
        if state == "cluster":
            log.event("sweep", f"Ray {f['ray']}: {f['nodes']} node(s) see the output directory; "
                               f"{f['cpus']:g} CPUs, {f['gpus']:g} GPUs", **f)
        else:  # calibration
            detail = {"sampling": f" -> {f.get('dir')}/calibration for {', '.join(f.get('runs', []))}",
                      "done": f" in {f.get('seconds')} s (manifest {str(f.get('manifest_sha256'))[:12]})",
                      "complete": f" at {f.get('dir')}/calibration, reused",
                      "failed": f": {f.get('error')}"}.get(f["phase"], "")
            log.event("calibration", f"calibration {f['key']}: {f['phase']}{detail}", **f)
        return
    detail = {
        "waiting": f" for calibration {f.get('calibration')}",
        "queued": f" ({f.get('cpus')} CPU, {f.get('gpus')} GPU, {f.get('memory_gib')} GiB)",
        "running": f" on {f.get('node')} (pid {f.get('pid')}, attempt {f.get('attempt')})",
        "retrying": f" on {f.get('node')} (pid {f.get('pid')}, attempt {f.get('attempt')}: the previous worker died)",
        "done": f" in {f.get('seconds')} s" + (f", resumed layers {f['resumed_layers']}" if f.get("resumed_layers") else ""),
        "failed": f": {f.get('error')}",
        "skipped": f" (complete at {f.get('out')})",
    }.get(state, "")
    log.event("run_state", f"[{name}] {state}{detail}", run=name, state=state, **f)


def _pause_hook() -> tuple[str, int] | None:
    raw = os.environ.get("QUANTIZE_SWEEP_PAUSE")
    if not raw:
        return None
    run, _, layer = raw.rpartition(":")
    if not run or not layer.isdigit():
        raise InputError(f"QUANTIZE_SWEEP_PAUSE={raw!r}: expected RUN:LAYER (a test hook); unset it")
    return run, int(layer)


@click.command("sweep")
@click.argument("sweep_file", metavar="SWEEP.yaml", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--address", default=None, help="Ray cluster to run on (default: RAY_ADDRESS, else a local instance "
                                               "started and stopped by this command).")
@click.option("--max-parallel", type=click.IntRange(min=1), default=None,
              help="At most N tasks at once (default: as many as the cluster's resources allow).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Output directory (default: the sweep file's output_dir); every node must see it.")
@click.option("--dry-run", is_flag=True, help="Print the runs, their resources and the plan's memory figures; run nothing.")
@click.option("--emit-commands", is_flag=True, help="With --dry-run: print only the runs' `quantize run` command "
                                                    "lines, one per line (for a Slurm array).")
@click.option("--json-logs", is_flag=True, help="One JSON object per line on stderr, for batch jobs.")
def sweep_command(sweep_file, address, max_parallel, out, dry_run, emit_commands, json_logs):
    """Run a sweep: every recipe x matrix combination as `quantize run`, side by side on Ray.

    Completed runs are skipped on rerun; a failed run is reported while the others go on (exit 1).
    """
    from ..manifest import sha256_file
    from ..sweep import expand, load_sweep
    from ..sweep.report import RunRecord, SweepReport, fill_from_manifests, table, write_report
    from ..sweep.resources import run_resources

    if json_logs:
        log.configure(True)
    if emit_commands and not dry_run:
        raise click.UsageError("--emit-commands goes with --dry-run")
    t0 = time.time()
    sweep = load_sweep(sweep_file)
    root, runs = expand(sweep, sweep_file, out=out)
    if emit_commands:
        for r in runs:
            click.echo(r.command())
        return
    resources = {r.name: run_resources(r, sweep.cpus_per_run) for r in runs}
    if dry_run:
        _print_plan(sweep, sweep_file, root, runs, resources)
        return
    pause = _pause_hook()

    todo, where, results = [], "none (every run was complete)", {}
    for r in runs:
        if run_complete(r):
            _on_state(r.name, "skipped", out=str(r.out))
        else:
            todo.append(r)
    if todo:
        from ..sweep.ray_exec import Job, execute

        logs = root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        jobs = [Job(run=r, resources=resources[r.name], log=logs / f"{r.name}.log", pid_file=logs / f"{r.name}.pid")
                for r in todo]
        where, results = execute(jobs, root=root, address=address, max_parallel=max_parallel,
                                 max_retries=sweep.max_retries, cwd=os.getcwd(), pause=pause, sweep_name=sweep.name,
                                 on_state=_on_state)

    records = []
    for r in runs:
        res = results.get(r.name)
        status = "skipped" if res is None and r not in todo else (res or {}).get("status", "not run")
        rec = RunRecord(name=r.name, status=status, command=r.command(), out=str(r.out),
                        seconds=(res or {}).get("seconds"), error=(res or {}).get("error"),
                        exit_code=(res or {}).get("exit_code"), attempts=(res or {}).get("attempt"),
                        resumed_layers=(res or {}).get("resumed_layers") or [],
                        threads=resources[r.name].cpus if res is not None else None,
                        resources=resources[r.name].as_dict())
        records.append(fill_from_manifests(rec))
    report = SweepReport(sweep=sweep.name, file=str(sweep_file), file_sha256=sha256_file(sweep_file), ray=where,
                         seconds=round(time.time() - t0, 2), runs=records)
    path = write_report(root, report)
    click.echo(table(records))
    click.echo(f"sweep.json: {path}")
    failed = [r.name for r in records if r.status in ("failed", "not run")]
    if failed:
        raise RuntimeFault(f"{len(failed)} of {len(records)} runs failed ({', '.join(failed)}); "
                           f"errors in the table and {path}, logs in {root / 'logs'}")
