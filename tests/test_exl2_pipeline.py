"""EXL2 end to end through the streaming executor: every family, read-back, achieved bpw from the
files, measurement reuse, determinism, resume, lm_head, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantize import manifest as mf
from quantize.cli import main
from quantize.commands.exl2 import quantize_exl2
from quantize.formats.exl2 import SUFFIXES, achieved_bpw, check_exl2_tensors, packed_linears
from quantize.io.quantized import load_dequantized_model
from quantize.io.reader import CheckpointReader
from quantize.methods.exl2 import HEAD_OPTIONS, storage_bits
from quantize.testing.tiny import FAMILIES

from helpers import (
    CPU,
    assert_reads_back_close,
    assert_same_files,
    killed_at,
    output_files,
    recording,
    replaced,
    sha256_file,
)

pytestmark = pytest.mark.usefixtures("one_thread")
ROWS = 4  # measurement rows: keeps the 36 candidate forwards per layer cheap


def _run(model, cal, out, bpw=4.0, **kw):
    return quantize_exl2(model_dir=model, calibration=cal, out=out, bpw=bpw, measurement_rows=ROWS, exec_cfg=CPU, **kw)


def _checked_linears(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every EXL2 linear of ``out`` with its bias, after the loader's checks (§3.10)."""
    reader = CheckpointReader(out)
    found = {}
    for prefix in packed_linears(reader):
        t = {s: reader.get(f"{prefix}.{s}") for s in SUFFIXES if f"{prefix}.{s}" in reader}
        if f"{prefix}.bias" in reader:
            t["bias"] = reader.get(f"{prefix}.bias")
        check_exl2_tensors(t, prefix)
        found[prefix] = t
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_quantizes_and_reads_back(family, tiny_model_dir, calib_for, tmp_path):
    model = tiny_model_dir(family)
    cal = calib_for(model)
    m = _run(model, cal, tmp_path / "q")
    out = tmp_path / "q"
    assert m.status == "complete" and not mf.verify(out)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "exl2" and qc["bits"] == 4.0 and qc["version"]
    assert qc["calibration"] == {"rows": 8, "length": 64, "dataset": "wikitext2"}
    # every decoder linear is EXL2 and passes the loader's checks; no dense projection weights remain
    linears = _checked_linears(out)
    reader = CheckpointReader(out)
    n_layers = cfg["num_hidden_layers"]
    from quantize.arch import get_arch

    arch = get_arch(cfg)
    assert {p for p in linears if p != "lm_head"} == {arch.layer_prefix(i) + n for i in range(n_layers)
                                                      for n in arch.linear_names()}
    assert not any(n.endswith("_proj.weight") for n in reader.names())
    # the head: quantized when untied, else left as the embedding
    if arch.is_tied(cfg):
        assert "lm_head" not in linears and qc["head_bits"] == 16
    else:
        assert "lm_head" in linears and qc["head_bits"] == 6 and "lm_head.weight" not in reader.names()
    # achieved bpw from the files = the bits the optimizer planned = the manifest's figure, within budget
    got = achieved_bpw(out)
    assert got["decoder"]["bits"] == m.params["planned_bits"]
    assert got["decoder"]["bpw"] == pytest.approx(m.metrics["bpw"], rel=1e-12) and got["decoder"]["bpw"] <= 4.0
    # the measurement travels with the output
    meas = json.loads((out / "measurement.json").read_text())
    assert len(meas["measurement"]) == 2 * n_layers and meas["last_module_idx"] == 2 * n_layers
    # read-back: a transformers model with dequantized weights, close to the original
    assert_reads_back_close(model, out, family)


def test_biases_are_fp16_for_the_loader(tiny_model_dir, calib_for, tmp_path):
    model = tiny_model_dir("qwen2")  # q/k/v carry a bias
    _run(model, calib_for(model), tmp_path / "q")
    linears = _checked_linears(tmp_path / "q")
    biased = [p for p, t in linears.items() if "bias" in t]
    assert len(biased) == 6 and all(linears[p]["bias"].dtype == torch.float16 for p in biased)


@pytest.fixture(scope="module")
def wide_llama(tiny_model_dir):
    """4 layers, hidden 128: enough slots and option granularity to hit a bpw target closely."""
    return tiny_model_dir("llama", hidden=128, num_layers=4, tie_word_embeddings=False)


def test_targets_met_within_005_with_one_measurement(wide_llama, calib_for, tmp_path):
    cal = calib_for(wide_llama)
    first = _run(wide_llama, cal, tmp_path / "q3.0", bpw=3.0)
    meas = tmp_path / "q3.0" / "measurement.json"
    got = {3.0: achieved_bpw(tmp_path / "q3.0")["decoder"]["bpw"]}
    for bpw in (4.0, 5.0, 6.0):
        m = _run(wide_llama, cal, tmp_path / f"q{bpw}", bpw=bpw, measurement=meas)
        assert m.params["measurement_sha256"] == first.params["measurement_sha256"]
        got[bpw] = achieved_bpw(tmp_path / f"q{bpw}")["decoder"]["bpw"]
        assert sha256_file(tmp_path / f"q{bpw}" / "measurement.json") == sha256_file(meas)
    for target, bpw in got.items():
        assert target - 0.05 <= bpw <= target, got
    # more bits, less error (Hessian-weighted, per linear, averaged)
    errs = [mf.load_manifest(tmp_path / f"q{b}").metrics["mean_rel_error"] for b in (3.0, 4.0, 5.0, 6.0)]
    assert errs == sorted(errs, reverse=True), errs
    # the head has the --head-bits 6 allocation, outside the budget (K=128: its one 0.15:8b group of
    # 128 rows covers every input, so it is all 8-bit here)
    head = achieved_bpw(tmp_path / "q4.0")["head"]
    assert head["weights"] == 1024 * 128 and head["bits"] == storage_bits(HEAD_OPTIONS[6], 128, 1024)


def test_reused_measurement_reproduces_a_measured_run(tiny_llama, calib_for, tmp_path):
    cal = calib_for(tiny_llama)
    _run(tiny_llama, cal, tmp_path / "a", bpw=4.5)
    _run(tiny_llama, cal, tmp_path / "b", bpw=4.5)
    _run(tiny_llama, cal, tmp_path / "c", bpw=4.5, measurement=tmp_path / "a" / "measurement.json")
    for f in ("model.safetensors", "measurement.json", "config.json"):
        assert sha256_file(tmp_path / "a" / f) == sha256_file(tmp_path / "b" / f) == sha256_file(tmp_path / "c" / f), f


def test_readback_equals_solver_output(tiny_llama, calib_for, tmp_path):
    """The packed checkpoint dequantizes to exactly the weights the executor propagated with."""
    from quantize.methods.exl2_layer import Exl2QuantMethod

    seen = {}
    orig_layer, orig_head = Exl2QuantMethod.process_layer, Exl2QuantMethod.process_head

    def spy(self, ctx):
        res = orig_layer(self, ctx)
        seen.update({ctx.prefix + n + ".weight": r.W_hat.clone() for n, r in res.results.items()})
        return res

    def spy_head(self, streamer):
        res = orig_head(self, streamer)
        seen.update({n + ".weight": r.W_hat.clone() for n, r in res.results.items()})
        return res

    with replaced(Exl2QuantMethod, "process_layer", spy), replaced(Exl2QuantMethod, "process_head", spy_head):
        _run(tiny_llama, calib_for(tiny_llama), tmp_path / "q", head_bits=8)
    params = dict(load_dequantized_model(tmp_path / "q").named_parameters())
    assert "lm_head.weight" in seen and len(seen) == 1 + 2 * 7
    for name, W_hat in seen.items():
        assert torch.equal(params[name].float(), W_hat), name


def test_resume_after_kill_in_measurement_and_in_quantization(tiny_model_dir, calib_for, tmp_path):
    from quantize.methods.exl2_layer import Exl2MeasureMethod, Exl2QuantMethod

    model = tiny_model_dir("llama", num_layers=3)
    cal = calib_for(model)
    _run(model, cal, tmp_path / "a")
    files = output_files(tmp_path / "a")

    # killed while measuring layer 1
    with replaced(Exl2MeasureMethod, "process_layer", killed_at(Exl2MeasureMethod, 1)), pytest.raises(KeyboardInterrupt):
        _run(model, cal, tmp_path / "c")
    assert not (tmp_path / "c").exists() and (tmp_path / "c.partial").is_dir()
    # rerun: the measurement finishes, then a kill while quantizing layer 1
    measured: list[int] = []
    record_measure, kill_quant = recording(Exl2MeasureMethod, measured), killed_at(Exl2QuantMethod, 1)
    with (replaced(Exl2MeasureMethod, "process_layer", record_measure),
          replaced(Exl2QuantMethod, "process_layer", kill_quant), pytest.raises(KeyboardInterrupt)):
        _run(model, cal, tmp_path / "c")
    assert not (tmp_path / "c").exists() and (tmp_path / "c.partial").is_dir()
    assert measured == [1, 2]  # the measurement resumed where it was killed
    # measurement finished on the second attempt; now the quantization pass resumes at layer 1
    resumed: list[int] = []
    with replaced(Exl2QuantMethod, "process_layer", recording(Exl2QuantMethod, resumed)):
        _run(model, cal, tmp_path / "c")
    assert resumed == [1, 2] and not (tmp_path / "c.partial").exists()
    assert_same_files(tmp_path / "a", tmp_path / "c", files)


def test_cli(tiny_llama, calib_for, tmp_path, capsys):
    cal = calib_for(tiny_llama)
    base = ["exl2", "--model", str(tiny_llama), "--calibration", str(cal), "--device", "cpu",
            "--measurement-rows", str(ROWS)]
    assert main(base + ["--bpw", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert "--bpw" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(base + ["--bpw", "2.0", "--out", str(tmp_path / "x")]) == 2  # below the cheapest options here
    assert "cheapest" in capsys.readouterr().err
    assert main(base + ["--bpw", "5", "--head-bits", "8", "--out", str(tmp_path / "q")]) == 0
    assert "bpw over the decoder linears" in capsys.readouterr().out
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["head_bits"] == 8
    # reuse the measurement; a measurement of another model is refused with one line
    assert main(base + ["--bpw", "4.5", "--measurement", str(tmp_path / "q" / "measurement.json"),
                        "--out", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    doc = json.loads((tmp_path / "q" / "measurement.json").read_text())
    doc["measurement"]["model.layers.0.mlp"][3]["total_bits"] += 32
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    assert main(base + ["--bpw", "4.5", "--measurement", str(bad), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "another model" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    bad.write_text("{}")
    assert main(base + ["--bpw", "4.5", "--measurement", str(bad), "--out", str(tmp_path / "s")]) == 2


def test_recipe_plans_an_exl2_stage(tiny_llama, tmp_path):
    from quantize.pipeline.recipe import Recipe
    from quantize.pipeline.run import plan_run

    recipe = Recipe.model_validate({"name": "t", "source": {"model": str(tiny_llama)}, "method": "exl2", "bpw": 4.5,
                                    "resources": {"ram": "1 GiB", "vram": "none (CPU)"}})
    out, plans = plan_run(recipe, tmp_path / "t.yaml", out=tmp_path / "run", device="cpu")
    stage = next(p for p in plans if p.name == "exl2")
    assert stage.params == {"method": "exl2", "bpw": 4.5} and stage.out == out / "model"
