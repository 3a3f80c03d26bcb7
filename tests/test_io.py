"""Checkpoint I/O: ShardedWriter -> CheckpointReader round trips, format fidelity, corrupt inputs."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from quantize.errors import InputError
from quantize.io.reader import CheckpointReader, read_safetensors_header
from quantize.io.torchfile import load_torch_file
from quantize.io.writer import ShardedWriter, copy_aux_files

SHARD_BYTES = 4096


def _raw(t: torch.Tensor) -> bytes:
    """The exact bytes of a tensor (bit-level comparison, NaN payloads and -0.0 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _random_model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = {
        "model.embed_tokens.weight": torch.randn(64, 16, generator=g),  # fp32, 4 KiB: a shard of its own
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(32, 16, generator=g).to(torch.float16),
        "model.layers.0.input_layernorm.weight": torch.randn(16, generator=g),
        "model.layers.0.qweight": torch.randint(-(2**31), 2**31 - 1, (8, 40), generator=g, dtype=torch.int32),
        "model.layers.0.mask": torch.rand(7, 3, generator=g) > 0.5,  # bool, odd byte count
        "model.layers.1.g_idx": torch.arange(16, dtype=torch.int64),
        "model.layers.1.codes": torch.randint(0, 256, (5, 9), generator=g, dtype=torch.uint8),
        "model.layers.1.delta": torch.randn(3, 5, generator=g, dtype=torch.float64),
        "model.layers.1.scale": torch.tensor(0.125),  # 0-d
        "model.layers.1.empty": torch.zeros(0, 4, dtype=torch.float16),  # no data
        # non-contiguous inputs: a transpose and a strided slice
        "model.layers.1.o_proj.weight": torch.randn(24, 16, generator=g).to(torch.bfloat16).t(),
        "lm_head.weight": torch.randn(64, 32, generator=g)[:, ::2],
    }
    m["model.layers.0.self_attn.q_proj.weight"][0, :3] = torch.tensor([float("nan"), -0.0, float("inf")])
    if hasattr(torch, "float8_e4m3fn"):
        m["model.layers.1.fp8"] = torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn)
    return m


def _write(directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = SHARD_BYTES, **kw) -> dict:
    with ShardedWriter(directory, max_shard_bytes=max_shard_bytes) as w:
        for name, t in tensors.items():
            w.add(name, t)
        return w.close(**kw)


def _sha256s(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture
def model(tmp_path):
    tensors = _random_model()
    out = tmp_path / "model"
    index = _write(out, tensors)
    return tensors, out, index


# ---------------------------------------------------------------------------------------------- round trip


def test_roundtrip_is_bit_identical_across_shards(model):
    tensors, out, index = model
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert sorted(p.name for p in out.iterdir()) == sorted(shards + ["model.safetensors.index.json"])
    on_disk = json.loads((out / "model.safetensors.index.json").read_text())
    assert on_disk == index
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())

    with CheckpointReader(out) as r:
        assert r.names() == sorted(tensors)
        assert r.shards == shards
        assert r.total_bytes == index["metadata"]["total_size"]
        assert r.index_file == "model.safetensors.index.json"
        for name, t in tensors.items():
            assert name in r
            assert r.shape(name) == tuple(t.shape)
            assert r.dtype(name) == t.dtype
            assert r.nbytes(name) == t.numel() * t.element_size()
            assert r.file_of(name) == index["weight_map"][name]
            got = r.get(name)
            assert got.dtype == t.dtype and tuple(got.shape) == tuple(t.shape) and got.is_contiguous()
            assert _raw(got) == _raw(t), name
        assert "missing.weight" not in r
        assert all(meta == {"format": "pt"} for meta in r.metadata.values())


def test_every_shard_respects_the_limit_except_oversized_tensors(model):
    tensors, out, index = model
    per_shard: dict[str, int] = {}
    for name, shard in index["weight_map"].items():
        per_shard[shard] = per_shard.get(shard, 0) + tensors[name].numel() * tensors[name].element_size()
    for shard, size in per_shard.items():
        members = [n for n, s in index["weight_map"].items() if s == shard]
        assert size <= SHARD_BYTES or len(members) == 1, (shard, size, members)


def test_get_casts_moves_and_reads_row_ranges(model):
    tensors, out, _ = model
    with CheckpointReader(out) as r:
        name = "model.layers.0.self_attn.q_proj.weight"
        as_fp32 = r.get(name, dtype=torch.float32)
        assert as_fp32.dtype == torch.float32
        assert _raw(as_fp32) == _raw(tensors[name].float())
        for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.o_proj.weight", "lm_head.weight"):
            assert _raw(r.get_rows(name, 3, 9)) == _raw(tensors[name][3:9])
        assert r.get_rows("model.layers.1.empty", 0, 5).shape == (0, 4)
        with pytest.raises(InputError, match="no tensor 'nope'"):
            r.get("nope")


def test_safe_open_reads_our_shards_and_bytes_match_safetensors(model):
    tensors, out, index = model
    by_shard: dict[str, dict[str, torch.Tensor]] = {}
    for name, shard in index["weight_map"].items():
        by_shard.setdefault(shard, {})[name] = tensors[name].contiguous()
    for shard, members in by_shard.items():
        with safe_open(str(out / shard), framework="pt") as f:
            assert sorted(f.keys()) == sorted(members)
            assert f.metadata() == {"format": "pt"}
            for name in members:
                assert _raw(f.get_tensor(name)) == _raw(members[name])
        # Same layout as the reference serializer, byte for byte.
        assert (out / shard).read_bytes() == st_save(members, metadata={"format": "pt"})


def test_output_is_byte_deterministic(tmp_path):
    a = _write(tmp_path / "a", _random_model(seed=3))
    b = _write(tmp_path / "b", _random_model(seed=3))
    assert a == b
    ha, hb = _sha256s(tmp_path / "a"), _sha256s(tmp_path / "b")
    assert ha == hb and len(ha) >= 4
    c = _write(tmp_path / "c", _random_model(seed=4))  # different data must change the hashes
    assert _sha256s(tmp_path / "c") != ha and c["weight_map"] == a["weight_map"]


def test_single_shard_is_model_safetensors_without_index(tmp_path):
    tensors = {"a": torch.ones(3), "b": torch.zeros(2, dtype=torch.bfloat16)}
    index = _write(tmp_path / "m", tensors, max_shard_bytes=10**9)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.safetensors"]
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    r = CheckpointReader(tmp_path / "m")
    assert r.shards == ["model.safetensors"] and r.index_file is None
    assert _raw(r.get("b")) == _raw(tensors["b"])
    assert CheckpointReader(tmp_path / "m" / "model.safetensors").names() == ["a", "b"]  # a file path works too


def test_custom_metadata_is_written_to_every_shard(tmp_path):
    _write(tmp_path / "m", _random_model(), metadata={"format": "pt", "quantize": "test"})
    r = CheckpointReader(tmp_path / "m")
    assert len(r.metadata) >= 3
    assert all(m == {"format": "pt", "quantize": "test"} for m in r.metadata.values())
    assert _raw(r.get("lm_head.weight")) == _raw(_random_model()["lm_head.weight"])


def test_writer_rejects_misuse_and_cleans_up_on_error(tmp_path):
    out = tmp_path / "m"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardedWriter(out, max_shard_bytes=16) as w:
            w.add("a", torch.ones(8))
            w.add("b", torch.ones(8))  # flushes shard 1
            with pytest.raises(ValueError, match="duplicate"):
                w.add("a", torch.ones(1))
            raise RuntimeError("boom")
    assert list(out.iterdir()) == []  # spool and unpublished shards removed

    _write(out, {"a": torch.ones(1)})
    with pytest.raises(InputError, match="already holds model.safetensors"):
        ShardedWriter(out)


def test_copy_aux_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "README.md"):
        (src / name).write_text(name)
    copied = copy_aux_files(src, dst)
    assert sorted(copied) == ["chat_template.jinja", "config.json", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in dst.iterdir()) == sorted(copied)
    assert (dst / "tokenizer.json").read_text() == "tokenizer.json"


def test_transformers_loads_our_shards(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False,
    )
    ref = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    out = tmp_path / "tiny"
    state = ref.state_dict()
    index = _write(out, state, max_shard_bytes=2048)
    assert len(set(index["weight_map"].values())) >= 3
    cfg.save_pretrained(out)
    loaded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    got = loaded.state_dict()
    for name, t in state.items():
        assert _raw(got[name]) == _raw(t), name
    assert CheckpointReader(out).config["hidden_size"] == 16


# ---------------------------------------------------------------------------------------------- corrupt input


def _header_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_truncated_shard_is_refused_naming_the_file(model):
    _, out, index = model
    last = sorted(set(index["weight_map"].values()))[-1]
    path = out / last
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(InputError, match=rf"{last}.*truncated.*re-download or re-export") as e:
        CheckpointReader(out)
    assert "runs past the end" in str(e.value) and "\n" not in str(e.value)


def test_header_length_larger_than_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(InputError, match=r"model\.safetensors.*header length 1000000 is larger than the file"):
        CheckpointReader(tmp_path)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(InputError, match=r"model\.safetensors.*corrupt or truncated"):
        CheckpointReader(tmp_path)


def test_non_json_header(tmp_path):
    _header_file(tmp_path / "model.safetensors", b"\xff\xfenot json at all")
    with pytest.raises(InputError, match=r"model\.safetensors.*header is not valid JSON.*re-download"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, "'a': 12 data bytes, but F32\\[2\\] needs 8"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
            "'a' and 'b' overlap",
        ),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "'a': malformed entry"),
        ({"a": {"dtype": "F32", "shape": [2]}}, "'a': malformed entry"),
        ({"a": {"dtype": "Q4_K", "shape": [1], "data_offsets": [0, 1]}}, "'a' has dtype Q4_K"),
    ],
)
def test_inconsistent_headers(tmp_path, entries, message):
    _header_file(tmp_path / "model.safetensors", json.dumps(entries).encode(), bytes(16))
    with pytest.raises(InputError, match=rf"model\.safetensors.*{message}"):
        read_safetensors_header(tmp_path / "model.safetensors")


def test_index_path_traversal_is_refused(tmp_path):
    root = tmp_path / "model"
    _write(tmp_path / "outside", {"w": torch.ones(2)}, max_shard_bytes=10**9)
    os.rename(tmp_path / "outside" / "model.safetensors", tmp_path / "evil.safetensors")  # exists, readable
    root.mkdir()
    for bad in ("../evil.safetensors", "/etc/passwd", "sub/../../evil.safetensors"):
        (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": bad}}))
        with pytest.raises(InputError, match=r"model\.safetensors\.index\.json.*must be relative and stay inside"):
            CheckpointReader(root)


def test_index_naming_a_missing_tensor_or_shard(model):
    tensors, out, index = model
    index_path = out / "model.safetensors.index.json"
    shard = index["weight_map"]["lm_head.weight"]
    doctored = {**index, "weight_map": {**index["weight_map"], "model.layers.9.ghost": shard}}
    index_path.write_text(json.dumps(doctored))
    with pytest.raises(InputError, match=rf"{shard}: has no tensor 'model.layers.9.ghost'.*out of sync"):
        CheckpointReader(out)
    doctored["weight_map"] = {**index["weight_map"], "x": "model-00009-of-00009.safetensors"}
    index_path.write_text(json.dumps(doctored))
    with pytest.raises(InputError, match=r"model-00009-of-00009\.safetensors: missing.*download the complete"):
        CheckpointReader(out)
    index_path.write_text("{not json")
    with pytest.raises(InputError, match=r"model\.safetensors\.index\.json: not a readable JSON index"):
        CheckpointReader(out)


def test_directory_without_weights_lists_what_it_found(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match=r"no model weights found.*found: adapter_model\.safetensors, config\.json"):
        CheckpointReader(tmp_path)


# ---------------------------------------------------------------------------------------------- pickle (.bin/.pth)


def test_bin_checkpoints_are_served_through_torch_load(tmp_path):
    tensors = {"a": torch.randn(4, 3).to(torch.bfloat16), "b": torch.arange(6, dtype=torch.int32).reshape(2, 3)}
    single = tmp_path / "single"
    single.mkdir()
    torch.save(tensors, single / "pytorch_model.bin")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    torch.save({"a": tensors["a"]}, sharded / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": tensors["b"]}, sharded / "pytorch_model-00002-of-00002.bin")
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({
        "metadata": {"total_size": 48},
        "weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"},
    }))
    for directory in (single, sharded):
        r = CheckpointReader(directory)
        assert r.names() == ["a", "b"]
        assert r.shape("b") == (2, 3) and r.dtype("a") == torch.bfloat16
        for name, t in tensors.items():
            assert _raw(r.get(name)) == _raw(t)
        assert _raw(r.get_rows("a", 1, 3)) == _raw(tensors["a"][1:3])
    assert CheckpointReader(sharded).file_of("b") == "pytorch_model-00002-of-00002.bin"


def test_load_torch_file_unwraps_training_state(tmp_path):
    sd = {"transformer.wte.weight": torch.randn(5, 2)}
    torch.save({"model": sd, "iter_num": 7}, tmp_path / "lit_model.pth")
    got = load_torch_file(tmp_path / "lit_model.pth")
    assert list(got) == ["transformer.wte.weight"]
    assert torch.equal(got["transformer.wte.weight"], sd["transformer.wte.weight"])
    torch.save({"w": torch.ones(1), "step": 3}, tmp_path / "mixed.pth")
    with pytest.raises(InputError, match=r"mixed\.pth: entry 'step' is a int, not a tensor"):
        load_torch_file(tmp_path / "mixed.pth")
    (tmp_path / "trunc.pth").write_bytes((tmp_path / "lit_model.pth").read_bytes()[:100])
    with pytest.raises(InputError, match=r"trunc\.pth: not a readable PyTorch checkpoint \(corrupt or truncated"):
        load_torch_file(tmp_path / "trunc.pth")


class _Exploit:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_pickle_with_code_is_refused_and_not_executed(tmp_path, fmt):
    marker = tmp_path / "pwned"
    directory = tmp_path / "model"
    directory.mkdir()
    path = directory / "pytorch_model.bin"
    payload = {"w": torch.ones(2), "x": _Exploit(marker)}
    if fmt == "zip":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(_Exploit(marker), f, protocol=2)
    assert b"system" in path.read_bytes()  # the crafted file really carries the call
    refused = r"pytorch_model\.bin: refused by torch\.load\(weights_only=True\): contains pickled code"
    with pytest.raises(InputError, match=refused):
        CheckpointReader(directory)
    with pytest.raises(InputError, match="convert it to safetensors with a trusted tool"):
        load_torch_file(path)
    assert not marker.exists()
