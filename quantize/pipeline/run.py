"""`quantize run RECIPE`: merge (when the source needs it) -> sample -> quantize -> eval.

The run directory holds one sub-directory per stage, each written atomically with its own
manifest, and a top-level manifest (stage "run") that is complete only when every stage is:

    OUT/merged/  OUT/calibration/  OUT/model/  OUT/eval/  OUT/manifest.json

A stage whose output manifest is complete for the same inputs and parameters is skipped, so a
rerun after a crash carries on where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import log
from .. import manifest as mf
from ..errors import InputError
from .recipe import MoESettings, Recipe


@dataclass
class StagePlan:
    name: str
    out: Path
    params: dict[str, Any]  # what must match in an existing manifest for the stage to be skipped
    run: Callable[[], Any]
    inputs: tuple[Path, ...] = ()


def _done(plan: StagePlan) -> bool:
    m = mf.load_manifest(plan.out) if plan.out.is_dir() else None
    if m is None or m.status != "complete":
        return False
    for k, v in plan.params.items():
        if m.params.get(k) != v:
            return False
    paths = {str(Path(i.path)) for i in m.inputs}
    if not all(str(p) in paths for p in plan.inputs):
        return False
    for i in m.inputs:  # an upstream stage that was redone since makes this one stale
        if i.manifest_sha256 is not None and mf.manifest_sha256(Path(i.path)) != i.manifest_sha256:
            return False
    return not mf.verify_sizes(plan.out)


def _check_source(recipe: Recipe, recipe_path: Path) -> None:
    """Stop at once, naming the missing path and the recipe key / variable that sets it."""
    import re

    import yaml

    raw = (yaml.safe_load(Path(recipe_path).read_text()) or {}).get("source") or {}
    for key in ("model", "base", "adapter", "litgpt", "lora"):
        val = getattr(recipe.source, key)
        if val is not None and not Path(val).exists():
            env = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", str(raw.get(key, "")))
            via = f" or export {env[0]}=DIR" if env else ""
            raise InputError(
                f"{recipe_path}: source.{key} = {val} does not exist; put the weights there, "
                f"pass --set source.{key}=DIR{via}"
            )


def plan_run(recipe: Recipe, recipe_path: Path, *, out: Path | None = None, device: str | None = None,
             overwrite: bool = False) -> tuple[Path, list[StagePlan]]:
    from ..commands.common import make_exec_config

    out = Path(out) if out else recipe.out_dir()
    device = device or recipe.device
    src = recipe.source
    plans: list[StagePlan] = []

    if src.needs_merge:
        merged = out / "merged"
        mk = recipe.merge.kwargs()
        if src.litgpt is not None:
            def do_merge():
                from ..merge import merge_litgpt
                return merge_litgpt(Path(src.litgpt), merged, lora=Path(src.lora) if src.lora else None, overwrite=True,
                                    **mk)
            plans.append(StagePlan("merge", merged, {"base_quant_request": mk}, do_merge, (Path(src.litgpt),)))
        else:
            ax = recipe.merge.axolotl_config

            def do_merge():
                from ..merge import merge_lora
                return merge_lora(Path(src.base), Path(src.adapter), merged, overwrite=True, **mk,
                                  axolotl_config=Path(ax) if ax else None)
            plans.append(StagePlan("merge", merged, {"base_quant_request": mk}, do_merge, (Path(src.base), Path(src.adapter))))
        model_dir = merged
    else:
        model_dir = Path(src.model)

    cal = recipe.calibration
    calib_dir = out / "calibration"

    def do_sample():
        from ..calibration.sample import sample_calibration
        return sample_calibration(model_dir, cal.dataset, cal.samples, cal.seq_len, cal.seed, calib_dir,
                                  text_field=cal.text_field, overwrite=True)
    plans.append(StagePlan("sample", calib_dir, {"n_samples": cal.samples, "seq_len": cal.seq_len, "seed": cal.seed},
                           do_sample, (model_dir,)))

    qdir = out / "model"
    exec_cfg = make_exec_config(device, recipe.batch_size, False, "auto")
    if recipe.method in ("gptq", "rtn"):
        g = recipe.gptq
        moe = recipe.moe or MoESettings()

        def do_quantize():
            from ..commands.gptq import quantize_gptq
            return quantize_gptq(model_dir=model_dir, calibration=calib_dir, out=qdir, bits=recipe.bits,
                                 group_size=recipe.group_size, act_order=g.act_order, sym=g.sym, damp=g.damp,
                                 static_groups=g.static_groups, block_size=g.block_size, rtn=recipe.method == "rtn",
                                 grid=g.grid,
                                 exec_cfg=exec_cfg, seed=cal.seed, overwrite=True, format=recipe.format or "gptq",
                                 moe_calibration=moe.calibration, moe_min_tokens=moe.min_tokens,
                                 moe_fallback=moe.fallback)
        from ..commands.gptq import resolve_grid, resolve_static_groups
        qparams = {"method": recipe.method, "bits": recipe.bits, "group_size": recipe.group_size,
                   "act_order": g.act_order, "sym": g.sym, "damp": g.damp, "format": recipe.format or "gptq",
                   "static_groups": resolve_static_groups(g.static_groups, g.act_order,
                                                          recipe.method == "rtn")}
        grid = resolve_grid(g.grid, recipe.bits, recipe.method == "rtn", g.sym)
        if grid != "minmax":  # as the stage records it
            qparams["grid"] = grid
        if recipe.moe is not None:  # recorded in the manifest of an MoE model's stage
            qparams.update({"moe_calibration": moe.calibration, "moe_min_tokens": moe.min_tokens,
                            "moe_fallback": moe.fallback})
    elif recipe.method == "awq":
        moe = recipe.moe or MoESettings()

        def do_quantize():
            from ..commands.awq import quantize_awq
            return quantize_awq(model_dir=model_dir, calibration=calib_dir, out=qdir, bits=recipe.bits,
                                group_size=recipe.group_size, exec_cfg=exec_cfg, seed=cal.seed, overwrite=True,
                                format=recipe.format or "awq", moe_calibration=moe.calibration,
                                moe_min_tokens=moe.min_tokens, moe_fallback=moe.fallback)
        qparams = {"method": "awq", "bits": recipe.bits, "group_size": recipe.group_size, "format": recipe.format or "awq"}
        if recipe.moe is not None:  # recorded in the manifest of an MoE model's stage
            qparams.update({"moe_calibration": moe.calibration, "moe_min_tokens": moe.min_tokens,
                            "moe_fallback": moe.fallback})
    elif recipe.method == "fp8":
        moe = recipe.moe or MoESettings()

        def do_quantize():
            from ..commands.fp8 import quantize_fp8
            static = recipe.fp8_scheme == "static"
            return quantize_fp8(model_dir=model_dir, out=qdir, exec_cfg=exec_cfg, scheme=recipe.fp8_scheme,
                                calibration=calib_dir if static else None, seed=cal.seed, overwrite=True,
                                moe_calibration=moe.calibration, moe_min_tokens=moe.min_tokens,
                                moe_fallback=moe.fallback)
        qparams = {"method": "fp8", "scheme": recipe.fp8_scheme}
        if recipe.moe is not None and recipe.fp8_scheme == "static":  # recorded by a static MoE stage only
            qparams.update({"moe_calibration": moe.calibration, "moe_min_tokens": moe.min_tokens,
                            "moe_fallback": moe.fallback})
    elif recipe.method == "gguf":
        def do_quantize():
            from ..commands.gguf import quantize_gguf
            return quantize_gguf(model_dir=model_dir, out=qdir, exec_cfg=exec_cfg, ftype=recipe.gguf_type,
                                 calibration=calib_dir, seed=cal.seed, overwrite=True)
        qparams = {"method": "gguf", "type": recipe.gguf_type}
    elif recipe.method == "exl2":
        def do_quantize():
            from ..commands.exl2 import quantize_exl2
            return quantize_exl2(model_dir=model_dir, calibration=calib_dir, out=qdir, bpw=recipe.bpw,
                                 exec_cfg=exec_cfg, seed=cal.seed, overwrite=True)
        qparams = {"method": "exl2", "bpw": recipe.bpw}
    else:
        raise InputError(f"{recipe_path}: method {recipe.method!r} is not available in this version (gptq, rtn, awq, exl2, fp8, gguf)")
    if recipe.check != "off":
        do_quantize = _then_check(do_quantize, qdir, recipe.check)
    plans.append(StagePlan(recipe.method, qdir, qparams, do_quantize, (model_dir, calib_dir)))

    ev = recipe.eval
    if ev.enabled:
        edir = out / "eval"

        def do_eval():
            from ..eval.perplexity import run_eval
            return run_eval(model_dir=qdir, dataset=ev.dataset, seq_len=ev.seq_len, out=edir, baseline=model_dir,
                            max_windows=ev.max_windows, max_ppl_increase=ev.max_ppl_increase, cfg=exec_cfg,
                            overwrite=True)
        plans.append(StagePlan("eval", edir, {"seq_len": ev.seq_len, "max_windows": ev.max_windows,
                                              "max_ppl_increase": ev.max_ppl_increase}, do_eval, (qdir,)))
    return out, plans


def run_recipe(recipe: Recipe, recipe_path: Path, *, out: Path | None = None, device: str | None = None,
               overwrite: bool = False, dry_run: bool = False) -> mf.Manifest | None:
    _check_source(recipe, recipe_path)
    out, plans = plan_run(recipe, recipe_path, out=out, device=device)
    if dry_run:
        log.info(f"recipe {recipe.name} -> {out}")
        for p in plans:
            log.info(f"  {p.name:<8} -> {p.out}  {p.params}")
        return None
    if overwrite and out.exists():
        import shutil
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    params = {"recipe": recipe.model_dump(mode="json"), "recipe_path": str(recipe_path)}
    m = mf.new_manifest("run", inputs=[mf.describe_input("recipe", recipe_path)], params=params,
                        device=device or recipe.device)
    mf.write_manifest(out, m)
    summary = []
    for p in plans:
        t0 = time.time()
        if _done(p):
            log.event("stage_skip", f"{p.name}: complete at {p.out}, skipped", stage=p.name)
            summary.append((p.name, "skipped", 0.0, p.out))
            continue
        log.event("stage_start", f"{p.name} -> {p.out}", stage=p.name)
        p.run()
        summary.append((p.name, "done", time.time() - t0, p.out))
    metrics = {"stages": [{"stage": n, "status": s, "seconds": round(t, 2), "out": str(o)} for n, s, t, o in summary]}
    ev = mf.load_manifest(out / "eval") if (out / "eval").is_dir() else None
    if ev is not None:
        metrics["eval"] = {k: ev.metrics[k] for k in ("perplexity", "baseline_perplexity", "kl", "top1_agreement", "ppl_increase_pct") if k in ev.metrics}
    done = mf.complete(out, m, metrics=metrics)
    _print_summary(summary, metrics, out)
    return done


def _print_summary(summary, metrics, out: Path) -> None:
    import click

    click.echo(f"{'stage':<8} {'status':<8} {'seconds':>8}  output")
    for n, s, t, o in summary:
        click.echo(f"{n:<8} {s:<8} {t:8.1f}  {o}")
    e = metrics.get("eval")
    if e:
        click.echo(f"perplexity {e.get('perplexity', float('nan')):.3f} (baseline {e.get('baseline_perplexity', float('nan')):.3f}), "
                   f"KL {e.get('kl', float('nan')):.5f}, top-1 agreement {e.get('top1_agreement', float('nan')):.4f}")
    click.echo(f"complete: {out} (check with `quantize verify {out}`)")


def _then_check(quantize: Callable[[], Any], qdir: Path, engines: str) -> Callable[[], Any]:
    """The quantize stage followed by `quantize check` on its output (recipe key ``check``): the
    verdicts land in the output's manifest before eval records it as a parent; a failing engine
    fails the run (GateFailed, exit 1), an engine that is not installed is reported, not passed."""
    def run():
        from ..check import check_output
        from ..errors import GateFailed

        quantize()
        _, _, records = check_output(qdir, engines)
        mf.append_checks(qdir, records)
        for r in records:
            log.info(f"check {r.engine}: {r.verdict}" + (f" ({r.reason})" if r.reason else ""))
        failed = [r for r in records if r.verdict == "fail"]
        if failed:
            raise GateFailed("; ".join(f"{r.engine}: {r.reason}" for r in failed))
        return mf.load_manifest(qdir)
    return run

