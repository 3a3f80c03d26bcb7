"""The bad-input catalogue: every case exits 2 (1 for runtime/integrity faults) with ONE line on
stderr naming the problem, no traceback, and nothing at the output path that looks complete."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantize import manifest as mf
from quantize.calibration import sample_calibration
from quantize.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    base = tmp_path_factory.mktemp("bad")
    model = tiny_model_dir("llama")
    cal = base / "cal"
    sample_calibration(model, "wikitext2", 4, 32, 0, cal)
    return {"model": model, "cal": cal, "base": base}


def _copy_model(env, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(env["model"], dst)
    return dst


def _gptq(model, cal, out):
    return ["gptq", "--model", str(model), "--calibration", str(cal), "--out", str(out), "--device", "cpu",
            "--group-size", "32"]


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def case_truncated(env, tmp_path):
    m = _copy_model(env, tmp_path)
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return _gptq(m, env["cal"], tmp_path / "out"), 2, "model.safetensors"


def case_header_length(env, tmp_path):
    m = _copy_model(env, tmp_path)
    f = m / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    f.write_bytes(bytes(data))
    return _gptq(m, env["cal"], tmp_path / "out"), 2, "model.safetensors"


def case_shape_mismatch(env, tmp_path):
    m = _copy_model(env, tmp_path)
    t = load_file(str(m / "model.safetensors"))
    t["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 64)
    save_file(t, str(m / "model.safetensors"), metadata={"format": "pt"})
    return _gptq(m, env["cal"], tmp_path / "out"), 2, "q_proj"


def case_nan_weights(env, tmp_path):
    m = _copy_model(env, tmp_path)
    t = load_file(str(m / "model.safetensors"))
    t["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(t, str(m / "model.safetensors"), metadata={"format": "pt"})
    return _gptq(m, env["cal"], tmp_path / "out"), 2, "up_proj"


def case_missing_tensor(env, tmp_path):
    m = _copy_model(env, tmp_path)
    t = load_file(str(m / "model.safetensors"))
    del t["model.layers.1.mlp.down_proj.weight"]
    save_file(t, str(m / "model.safetensors"), metadata={"format": "pt"})
    return _gptq(m, env["cal"], tmp_path / "out"), 2, "down_proj"


def case_path_traversal(env, tmp_path):
    m = _copy_model(env, tmp_path)
    names = list(load_file(str(m / "model.safetensors")))
    (m / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "../../etc/passwd" for n in names}}))
    (m / "model.safetensors").unlink()
    return _gptq(m, env["cal"], tmp_path / "out"), 2, "index"


def case_index_missing_shard(env, tmp_path):
    m = _copy_model(env, tmp_path)
    names = list(load_file(str(m / "model.safetensors")))
    (m / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model-00002-of-00002.safetensors" for n in names}}))
    (m / "model.safetensors").unlink()
    return _gptq(m, env["cal"], tmp_path / "out"), 2, "model-00002-of-00002.safetensors"


def case_pickle_refused(env, tmp_path):
    m = _copy_model(env, tmp_path)
    (m / "model.safetensors").unlink()
    with open(m / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    return _gptq(m, env["cal"], tmp_path / "out"), 2, "weights_only"


def case_unsupported_arch(env, tmp_path):
    m = _copy_model(env, tmp_path)
    cfg = json.loads((m / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (m / "config.json").write_text(json.dumps(cfg))
    return _gptq(m, env["cal"], tmp_path / "out"), 2, "supported"


def case_missing_config(env, tmp_path):
    m = _copy_model(env, tmp_path)
    (m / "config.json").unlink()
    return _gptq(m, env["cal"], tmp_path / "out"), 2, "config.json"


def case_group_size_cannot_hold(env, tmp_path):
    return _gptq(env["model"], env["cal"], tmp_path / "out")[:-1] + ["48"], 2, "48"


def case_bits_not_supported(env, tmp_path):
    return _gptq(env["model"], env["cal"], tmp_path / "out") + ["--bits", "5"], 2, "bits"


def case_output_exists(env, tmp_path):
    (tmp_path / "out").mkdir()
    return _gptq(env["model"], env["cal"], tmp_path / "out"), 2, "--overwrite"


def case_calibration_not_a_sample(env, tmp_path):
    return _gptq(env["model"], env["model"], tmp_path / "out"), 2, "manifest"


def case_calibration_other_tokenizer(env, tmp_path):
    m = _copy_model(env, tmp_path)
    tok = json.loads((m / "tokenizer_config.json").read_text())
    tok["model_max_length"] = 77
    (m / "tokenizer_config.json").write_text(json.dumps(tok))
    return _gptq(m, env["cal"], tmp_path / "out"), 2, "tokenizer"


def case_tampered_calibration(env, tmp_path):
    cal = tmp_path / "cal"
    shutil.copytree(env["cal"], cal)
    f = cal / "calibration.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    return _gptq(env["model"], cal, tmp_path / "out"), 1, "calibration.safetensors"


def case_manifest_unknown_key(env, tmp_path):
    cal = tmp_path / "cal"
    shutil.copytree(env["cal"], cal)
    m = json.loads((cal / "manifest.json").read_text())
    m["surprise"] = 1
    (cal / "manifest.json").write_text(json.dumps(m))
    return _gptq(env["model"], cal, tmp_path / "out"), 2, "surprise"


def case_manifest_future_version(env, tmp_path):
    cal = tmp_path / "cal"
    shutil.copytree(env["cal"], cal)
    m = json.loads((cal / "manifest.json").read_text())
    m["schema_version"] = 99
    (cal / "manifest.json").write_text(json.dumps(m))
    return ["inspect", str(cal)], 2, "schema_version"


def case_manifest_path_escape(env, tmp_path):
    cal = tmp_path / "cal"
    shutil.copytree(env["cal"], cal)
    m = json.loads((cal / "manifest.json").read_text())
    m["outputs"][0]["path"] = "../../../etc/passwd"
    (cal / "manifest.json").write_text(json.dumps(m))
    return ["verify", str(cal)], 2, "inside"


def case_empty_dataset(env, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    return ["sample", "--model", str(env["model"]), "--dataset", str(tmp_path / "empty.txt"), "--samples", "2",
            "--seq-len", "16", "--out", str(tmp_path / "out")], 2, "empty.txt"


def case_too_little_text(env, tmp_path):
    (tmp_path / "small.txt").write_text("just a few words here")
    return ["sample", "--model", str(env["model"]), "--dataset", str(tmp_path / "small.txt"), "--samples", "4",
            "--seq-len", "64", "--out", str(tmp_path / "out")], 2, "tokens"


def case_seq_len_beyond_context(env, tmp_path):
    return ["sample", "--model", str(env["model"]), "--samples", "1", "--seq-len", "100000",
            "--out", str(tmp_path / "out")], 2, "context"


def case_missing_tokenizer(env, tmp_path):
    m = _copy_model(env, tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (m / f).unlink()
    return ["sample", "--model", str(m), "--samples", "1", "--seq-len", "16", "--out", str(tmp_path / "out")], 2, "tokenizer"


def case_dataset_missing(env, tmp_path):
    return ["sample", "--model", str(env["model"]), "--dataset", str(tmp_path / "nope.jsonl"), "--samples", "1",
            "--seq-len", "16", "--out", str(tmp_path / "out")], 2, "nope.jsonl"


def case_unknown_recipe_key(env, tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text((ROOT / "recipes/tiny.yaml").read_text() + "\nbitz: 4\n")
    return ["run", str(r), "--out", str(tmp_path / "out")], 2, "bitz"


def case_cuda_on_cpu_machine(env, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    return _gptq(env["model"], env["cal"], tmp_path / "out") + ["--device", "cuda:0"], 2, "CUDA"


def case_gate_without_baseline(env, tmp_path):
    return ["eval", "--model", str(env["model"]), "--max-ppl-increase", "5", "--seq-len", "32",
            "--out", str(tmp_path / "out")], 2, "--baseline"


CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, env, tmp_path, capsys):
    argv, code, needle = CASES[name](env, tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("!!")]
    assert rc == code, f"{name}: exit {rc}, stderr: {err}"
    assert "Traceback" not in err
    assert len(lines) == 1, f"{name}: expected one error line, got: {err}"
    assert needle.lower() in lines[0].lower(), f"{name}: {lines[0]!r} does not mention {needle!r}"
    out = tmp_path / "out"
    if out.exists() and (out / "manifest.json").exists():
        assert mf.load_manifest(out).status != "complete"  # nothing that looks complete
    assert not (tmp_path / "out.partial" / "manifest.json").exists() or \
        mf.load_manifest(tmp_path / "out.partial").status != "complete"


def test_catalogue_has_at_least_20_cases():
    assert len(CASES) >= 20
