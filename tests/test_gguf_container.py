"""GGUF container: metadata, tokenizer, names/layout, the streaming writer, the reader.

Every family's tiny model is written as F32 and Q8_0 with the streaming API and checked against
gguf-py's reader (names, shapes, types), the HF weights (exact for F32), gguf-py's own Q8_0 bytes,
transformers' GGUF loader (logits) and the HF tokenizer. Expectations are written out here (tensor
stems, metadata keys, the q/k row order) rather than recomputed with the module's own helpers.
"""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from quantize.errors import InputError  # noqa: E402
from quantize.formats import gguf as G  # noqa: E402
from quantize.io.quantized import load_dequantized_model, open_model  # noqa: E402
from quantize.io.reader import CheckpointReader  # noqa: E402
from quantize.testing import FAMILIES  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

T = gguf.GGMLQuantizationType

# HF tensor suffix -> GGUF stem, per family (written out, not taken from gguf-py's map)
COMMON = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
LAYER_STEMS = {
    "llama": COMMON,
    "mistral": COMMON,
    "qwen2": {**COMMON, "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
              "self_attn.v_proj.bias": "attn_v.bias"},
    "qwen3": {**COMMON, "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"},
    "gemma": COMMON,
    "gemma2": {**COMMON, "post_attention_layernorm.weight": "post_attention_norm.weight",
               "pre_feedforward_layernorm.weight": "ffn_norm.weight",
               "post_feedforward_layernorm.weight": "post_ffw_norm.weight"},
    "phi3": {"self_attn.qkv_proj.weight": "attn_qkv.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "mlp.gate_up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
             "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight"},
}
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
             "gemma2": "gemma2", "phi3": "phi3"}
TIED = {"gemma", "gemma2"}  # the tiny models' defaults

# the keys convert_hf_to_gguf writes for each family's tiny model (tokenizer keys tested apart)
BASE = {"general.type": "model", "general.quantization_version": 2}
TEXT = {"block_count": 2, "context_length": 512, "embedding_length": 64, "feed_forward_length": 128,
        "attention.head_count": 4, "attention.head_count_kv": 2, "rope.freq_base": 10000.0,
        "attention.layer_norm_rms_epsilon": 1e-6, "attention.key_length": 16, "attention.value_length": 16}
GEMMA = {"context_length": 512, "embedding_length": 64, "block_count": 2, "feed_forward_length": 128,
         "attention.head_count": 4, "attention.head_count_kv": 2, "attention.layer_norm_rms_epsilon": 1e-6,
         "attention.key_length": 16, "attention.value_length": 16, "rope.freq_base": 10000.0}
EXPECTED_KEYS = {
    "llama": {**TEXT, "vocab_size": 1024, "rope.dimension_count": 16},
    "mistral": {**TEXT, "vocab_size": 1024, "rope.dimension_count": 16},
    "qwen2": TEXT,
    "qwen3": TEXT,
    "gemma": GEMMA,
    "gemma2": {**GEMMA, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "attention.sliding_window": 4096},
    "phi3": {"context_length": 512, "rope.scaling.original_context_length": 4096, "embedding_length": 64,
             "feed_forward_length": 128, "block_count": 2, "attention.head_count": 4, "attention.head_count_kv": 2,
             "attention.layer_norm_rms_epsilon": 1e-5, "rope.dimension_count": 16, "rope.freq_base": 10000.0,
             "attention.sliding_window": 0},
}


# -- helpers ----------------------------------------------------------------------------------------


def gguf_name_for(family: str) -> str:
    """general.name for a tiny model: not "phi3" (llama.cpp then wants Phi-3's tokens, which the
    bundled tokenizer lacks), not exactly "mistral" (transformers then asks gguf-py for an arch
    "mistral" it does not have)."""
    return f"tiny-{family}".replace("phi3", "phi")


def stream_write(src: Path, out: Path, file_type: str, qtype_for=None, name: str = "tiny") -> Path:
    """The streaming API as a quantizer uses it: every tensor's info, the header, then one tensor at
    a time read from the checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    with CheckpointReader(src) as reader:
        config = reader.config
        names = G.hf_tensor_names(config)
        with G.GGUFStreamWriter(out / "model.gguf", config, src, file_type, name=name) as w:
            for n in names:
                shape = tuple(reader.shape(n))
                qt = "F32" if (len(shape) == 1 or file_type == "F32") else file_type
                if qtype_for is not None:
                    qt = qtype_for(n, shape)
                w.add_tensor_info(n, shape, qt)
            w.write_header()
            for n in names:
                w.write_tensor(n, reader.get(n))
    G.copy_sidecar_files(src, out)
    return out


def fields(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def hf_state(src: Path) -> dict[str, torch.Tensor]:
    with CheckpointReader(src) as r:
        return {n: r.get(n, dtype=torch.float32) for n in r.names()}


def reference_permute(W: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order, element by element: within a head of d rows, GGUF row 2i+j is HF
    row j*d/2 + i (j = 0, 1)."""
    rows = W.shape[0]
    d = rows // n_head
    out = torch.empty_like(W)
    for h in range(n_head):
        for i in range(d // 2):
            for j in range(2):
                out[h * d + 2 * i + j] = W[h * d + j * (d // 2) + i]
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny_model_dir):
    """(family, file_type) -> (source dir, GGUF dir), built lazily."""
    cache: dict = {}

    def get(family: str, file_type: str):
        if (family, file_type) not in cache:
            src = tiny_model_dir(family)
            out = stream_write(src, tmp_path_factory.mktemp(f"gguf-{family}-{file_type}"), file_type,
                               name=gguf_name_for(family))
            cache[family, file_type] = (src, out)
        return cache[family, file_type]

    return get


# -- (a) gguf-py reads what we wrote: names, shapes, types, metadata ----------------------------------


@pytest.mark.parametrize("file_type", ["F32", "Q8_0"])
@pytest.mark.parametrize("family", FAMILIES)
def test_names_shapes_types(written, family, file_type):
    src, out = written(family, file_type)
    reader = gguf.GGUFReader(out / "model.gguf")
    got = {t.name: (tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type) for t in reader.tensors}
    hf = {n: tuple(v.shape) for n, v in hf_state(src).items()}
    expected = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    if family not in TIED:
        expected["output.weight"] = hf["lm_head.weight"]
    for i in range(2):
        for suffix, stem in LAYER_STEMS[family].items():
            expected[f"blk.{i}.{stem}"] = hf[f"model.layers.{i}.{suffix}"]
    assert {n: s for n, (s, _) in got.items()} == expected
    for name, (shape, qtype) in got.items():
        want = T.F32 if (len(shape) == 1 or file_type == "F32") else T.Q8_0
        assert qtype == want, name
    meta = fields(out / "model.gguf")
    assert meta["general.architecture"] == GGUF_ARCH[family]
    assert meta["general.name"] == gguf_name_for(family)
    assert meta["general.file_type"] == (0 if file_type == "F32" else 7)
    for k, v in BASE.items():
        assert meta[k] == v, k


@pytest.mark.parametrize("family", FAMILIES)
def test_metadata_keys_per_family(written, family):
    _, out = written(family, "F32")
    meta = fields(out / "model.gguf")
    arch = GGUF_ARCH[family]
    model_keys = {k[len(arch) + 1:]: v for k, v in meta.items() if k.startswith(arch + ".")}
    assert model_keys == pytest.approx(EXPECTED_KEYS[family], rel=1e-6)


def test_alignment_and_offsets(written):
    """Tensor data starts at the 32-byte alignment, each tensor padded to it (what llama.cpp checks)."""
    _, out = written("llama", "Q8_0")
    reader = gguf.GGUFReader(out / "model.gguf")
    assert reader.alignment == 32
    assert reader.data_offset % 32 == 0
    for t in reader.tensors:
        assert t.data_offset % 32 == 0, t.name
    last = max(reader.tensors, key=lambda t: t.data_offset)
    assert (out / "model.gguf").stat().st_size >= last.data_offset + last.n_bytes


# -- (b) dense weights: exact for F32; gguf-py's own Q8_0 bytes ---------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_weights_exact(written, family):
    src, out = written(family, "F32")
    ref = hf_state(src)
    ck = G.GGUFCheckpoint(out)
    assert sorted(ck.names()) == sorted(ref)
    cfg = json.loads((src / "config.json").read_text())
    for name, W in ref.items():
        got = ck.get(name)
        assert got.dtype == torch.float32 and tuple(ck.shape(name)) == tuple(W.shape)
        raw = torch.from_numpy(ck.raw(name).view(np.float32).copy()).reshape(W.shape)
        if family in ("gemma", "gemma2") and name.endswith("norm.weight"):
            # stored as 1 + w in fp32 (convert_hf_to_gguf's Gemma convention); read back as stored - 1
            assert torch.equal(raw, W + 1), name
            assert torch.equal(got, raw - 1), name
            assert (got - W).abs().max() <= 2 ** -23, name
            continue
        assert torch.equal(got, W), name
        if GGUF_ARCH[family] == "llama" and ".q_proj." in name:
            assert torch.equal(raw, reference_permute(W, cfg["num_attention_heads"])), name
        elif GGUF_ARCH[family] == "llama" and ".k_proj." in name:
            assert torch.equal(raw, reference_permute(W, cfg["num_key_value_heads"])), name
        else:
            assert torch.equal(raw, W), name


@pytest.mark.parametrize("family", FAMILIES)
def test_q8_0_equals_gguf_py(written, family):
    src, out = written(family, "Q8_0")
    ref = hf_state(src)
    ck = G.GGUFCheckpoint(out)
    cfg = json.loads((src / "config.json").read_text())
    for name, W in ref.items():
        if W.dim() == 1:
            continue
        stored = W
        if GGUF_ARCH[family] == "llama" and ".q_proj." in name:
            stored = reference_permute(W, cfg["num_attention_heads"])
        elif GGUF_ARCH[family] == "llama" and ".k_proj." in name:
            stored = reference_permute(W, cfg["num_key_value_heads"])
        q = gguf.quants.quantize(stored.numpy(), T.Q8_0)
        assert np.array_equal(ck.raw(name).reshape(q.shape), q), name
        # rows quantize independently, so un-permuting the stored rows gives W's own Q8_0 values
        expect = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(W.numpy(), T.Q8_0), T.Q8_0))
        assert torch.equal(ck.get(name), expect), name


def test_permutation_roundtrip_and_reference():
    W = torch.randn(48, 8)
    for heads in (1, 2, 3, 6):
        P = G.permute_rows(W, heads)
        assert torch.equal(P, reference_permute(W, heads))
        assert torch.equal(G.unpermute_rows(P, heads), W)
        assert np.array_equal(G.permute_rows(W.numpy(), heads), P.numpy())
    assert G.needs_qk_permute("llama") and not G.needs_qk_permute("qwen2") and not G.needs_qk_permute("phi3")


def test_raw_block_bytes_are_row_permuted(tmp_path, tiny_model_dir):
    """Raw quantized rows (as gguf_blocks.pack gives them, in HF row order) are permuted as byte rows
    by the writer: the result equals quantizing the permuted weight."""
    src = tiny_model_dir("llama")
    ref = hf_state(src)
    with CheckpointReader(src) as reader:
        config = reader.config
        names = G.hf_tensor_names(config)
        with G.GGUFStreamWriter(tmp_path / "model.gguf", config, src, "Q4_0") as w:
            for n in names:
                shape = tuple(reader.shape(n))
                w.add_tensor_info(n, shape, "F32" if len(shape) == 1 else "Q4_0")
            w.write_header()
            for n in names:
                W = reader.get(n, dtype=torch.float32)
                w.write_tensor(n, W if W.dim() == 1 else gguf.quants.quantize(W.numpy(), T.Q4_0).tobytes())
    G.copy_sidecar_files(src, tmp_path)
    ck = G.GGUFCheckpoint(tmp_path)
    q = ref["model.layers.1.self_attn.k_proj.weight"]
    permuted = reference_permute(q, config["num_key_value_heads"]).numpy()
    assert np.array_equal(ck.raw("model.layers.1.self_attn.k_proj.weight").reshape(q.shape[0], -1),
                          gguf.quants.quantize(permuted, T.Q4_0))
    for n, W in ref.items():
        if W.dim() == 2:
            expect = gguf.quants.dequantize(gguf.quants.quantize(W.numpy(), T.Q4_0), T.Q4_0)
            assert np.array_equal(ck.get(n).numpy(), expect), n


# -- (c) transformers' GGUF loader ------------------------------------------------------------------

# families transformers 5's GGUF loader knows (it has no "gemma"); qwen3's loader ignores
# attention.key_length and assumes Qwen3's default head_dim of 128, so its tiny model uses that
TRANSFORMERS = {"llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 128}, "gemma2": {}, "phi3": {}}
IDS = torch.tensor([[0, 5, 17, 300, 999, 42, 7, 1000, 3, 64, 128, 511, 2, 1, 77]])


@pytest.mark.parametrize("family", sorted(TRANSFORMERS))
def test_transformers_loads_gguf(tmp_path, tiny_model_dir, family):
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir(family, **TRANSFORMERS[family])
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(IDS).logits
    for ft in ("F32", "Q8_0"):
        out = stream_write(src, tmp_path / ft, ft, name=f"{gguf_name_for(family)}-{ft}")
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
        with torch.no_grad():
            got = model(IDS).logits
        if ft == "F32":
            # same weights, same graph: identical up to summation order (measured: identical)
            assert (got - want).abs().max() <= 1e-5 * (want.max() - want.min())
        else:
            # transformers dequantizes Q8_0 with gguf-py as our reader does: same dense model
            ours = load_dequantized_model(out).eval()
            with torch.no_grad():
                mine = ours(IDS).logits
            assert (got - mine).abs().max() <= 1e-5 * (mine.max() - mine.min())
            assert (got - want).abs().max() <= 0.02 * (want.max() - want.min())


def test_transformers_rejects_gemma_v1(written):
    """Recorded limitation: transformers 5 has no GGUF loader for arch ``gemma`` (llama.cpp has)."""
    from transformers import AutoModelForCausalLM

    _, out = written("gemma", "F32")
    with pytest.raises(ValueError, match="gemma"):
        AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf")


# -- open_model / eval streaming over GGUF ----------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_open_model_reads_gguf(written, family):
    from transformers import AutoModelForCausalLM

    src, out = written(family, "F32")
    reader = open_model(out)
    assert isinstance(reader, G.GGUFCheckpoint)
    assert not hasattr(reader, "nbytes")  # the prefetcher then uses plain get()
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ours = load_dequantized_model(out).eval()
    with torch.no_grad():
        want, got = ref(IDS).logits, ours(IDS).logits
    tol = 1e-5 * float(want.max() - want.min()) if family in ("gemma", "gemma2") else 0.0
    assert (got - want).abs().max() <= tol


def test_eval_streams_over_gguf(written):
    from quantize.eval.perplexity import final_logits
    from quantize.executor.loop import ExecConfig

    src, out = written("llama", "Q8_0")
    windows = IDS.repeat(2, 1)
    cfg = ExecConfig(device="cpu", dtype=torch.float32, batch_size=2)
    got = torch.cat(list(final_logits(out, windows, cfg)))
    with torch.no_grad():
        want = load_dequantized_model(out).eval()(windows).logits
    assert (got - want).abs().max() <= 1e-4


def test_config_rebuilt_from_metadata(tmp_path, written):
    src, out = written("qwen2", "F32")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(out / "model.gguf", bare / "model.gguf")
    ck = G.GGUFCheckpoint(bare / "model.gguf")
    cfg = json.loads((src / "config.json").read_text())
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "max_position_embeddings", "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert ck.config[k] == cfg[k], k
    assert ck.config["architectures"] == cfg["architectures"]
    ref = hf_state(src)
    for n in ck.names():
        assert torch.equal(ck.get(n), ref[n]), n


# -- (d) tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_metadata_reproduces_hf(written):
    from transformers import AutoTokenizer

    src, out = written("llama", "F32")
    meta = fields(out / "model.gguf")
    tj = json.loads((src / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    by_id = sorted(vocab, key=vocab.get)
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"  # GPT-2's own byte-level regex
    assert meta["tokenizer.ggml.tokens"] == by_id
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    types = meta["tokenizer.ggml.token_type"]
    assert types[:3] == [int(gguf.TokenType.CONTROL)] * 3
    assert set(types[3:]) == {int(gguf.TokenType.NORMAL)}
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.padding_token_id"]) == (0, 1, 2)
    assert meta["tokenizer.ggml.add_bos_token"] is False
    # transformers rebuilds a tokenizer from the GGUF alone: same ids as the HF tokenizer
    text = "The quick brown fox jumps over the lazy dog. 3.14 <|eos|>"
    hf = AutoTokenizer.from_pretrained(src)
    from_gguf = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    assert from_gguf(text)["input_ids"] == hf(text)["input_ids"]


LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def with_llama3_pretokenizer(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose tokenizer.json pre-tokenizes as Llama 3's does (its split regex, then
    byte-level without the GPT-2 regex)."""
    shutil.copytree(src, dst)
    tj = json.loads((dst / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (dst / "tokenizer.json").write_text(json.dumps(tj))
    return dst


def test_pre_tokenizer_by_structure(tmp_path, tiny_model_dir):
    """A vocabulary of our own has no llama.cpp hash; the pre-tokenizer transformers actually builds
    names it: GPT-2's regex -> gpt-2, Llama 3's split -> llama-bpe, and for model_type qwen2
    transformers 5 imposes Qwen2's split whatever tokenizer.json says -> qwen2."""
    assert G.tokenizer_pre(tiny_model_dir("llama")) == "gpt-2"
    assert G.tokenizer_pre(tiny_model_dir("qwen2")) == "qwen2"
    assert G.tokenizer_pre(tiny_model_dir("qwen3")) == "gpt-2"
    assert G.tokenizer_pre(with_llama3_pretokenizer(tiny_model_dir("llama"), tmp_path / "l3")) == "llama-bpe"


def test_tokenizer_pads_to_vocab_size(tmp_path, tiny_model_dir):
    """A model whose embedding has more rows than the tokenizer has tokens (Qwen's case) gets
    [PAD{i}] UNUSED entries, as convert_hf_to_gguf writes them."""
    src = tiny_model_dir("qwen2", vocab_size=1040)
    meta = G.metadata(json.loads((src / "config.json").read_text()), src, "F32", tokenizer=True)
    tokens, _ = meta["tokenizer.ggml.tokens"]
    types, _ = meta["tokenizer.ggml.token_type"]
    assert len(tokens) == 1040 and tokens[1024] == "[PAD1024]" and tokens[-1] == "[PAD1039]"
    assert set(types[1024:]) == {int(gguf.TokenType.UNUSED)}


def test_known_tokenizer_hashes(tmp_path):
    """The probe text is llama.cpp's (its hash for GPT-2's tokenizer is the table's)."""
    assert len(G.PROBE_TEXT) == 350 and G.PROBE_TEXT.startswith("\n \n\n") and G.PROBE_TEXT.endswith("a'lL")
    assert G.KNOWN_PRE_HASHES["0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5"] == "llama-bpe"


def test_spm_tokenizer(tmp_path, tiny_model_dir):
    spm = pytest.importorskip("sentencepiece")
    src = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), src)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=320,
                                   model_type="bpe", byte_fallback=True)
    shutil.copyfile(tmp_path / "sp.model", src / "tokenizer.model")
    (src / "tokenizer.json").unlink()
    meta = G.metadata(json.loads((src / "config.json").read_text()), src, "F32", tokenizer=True)
    assert meta["tokenizer.ggml.model"][0] == "llama" and meta["tokenizer.ggml.pre"][0] == "default"
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    tokens = meta["tokenizer.ggml.tokens"][0]
    assert [t if isinstance(t, str) else t.decode() for t in tokens[: sp.vocab_size()]] == [
        sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert meta["tokenizer.ggml.scores"][0][: sp.vocab_size()] == pytest.approx(
        [sp.get_score(i) for i in range(sp.vocab_size())])
    types = meta["tokenizer.ggml.token_type"][0]
    assert types[sp.unk_id()] == int(gguf.TokenType.UNKNOWN) and types[sp.bos_id()] == int(gguf.TokenType.CONTROL)
    assert types[sp.piece_to_id("<0x41>")] == int(gguf.TokenType.BYTE)
    assert len(tokens) == 1024 and set(types[sp.vocab_size():]) == {int(gguf.TokenType.UNUSED)}
    llama_cpp = pytest.importorskip("llama_cpp")
    out = G.write_gguf_directory(src, tmp_path / "o", "F32")
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    text = "the quick brown fox 42 jumps over the lazy dog \u00e9"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == sp.encode(text)


# -- (e) streaming ----------------------------------------------------------------------------------


def test_writer_holds_one_tensor_at_a_time(tmp_path, tiny_model_dir):
    """Every tensor handed to write_tensor is released when the caller drops it (the writer keeps no
    reference), and gguf-py's writer holds infos without data."""
    src = tiny_model_dir("llama", num_layers=4)
    alive: list[weakref.ref] = []
    with CheckpointReader(src) as reader:
        config = reader.config
        names = G.hf_tensor_names(config)
        w = G.GGUFStreamWriter(tmp_path / "model.gguf", config, src, "Q8_0")
        for n in names:
            shape = tuple(reader.shape(n))
            w.add_tensor_info(n, shape, "F32" if len(shape) == 1 else "Q8_0")
        w.write_header()
        for n in names:
            t = reader.get(n)
            alive.append(weakref.ref(t))
            w.write_tensor(n, t)
            del t
            gc.collect()
            assert sum(r() is not None for r in alive) == 0, n
            assert all(ti.tensor is None for part in w._w.tensors for ti in part.values())
        w.close()
    assert G.GGUFCheckpoint(tmp_path / "model.gguf").names()  # a complete file


# -- generated tensors and RoPE keys ----------------------------------------------------------------


def test_llama3_rope_freqs(tmp_path, tiny_model_dir):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    src = tiny_model_dir("llama", rope_parameters=rope)
    out = G.write_gguf_directory(src, tmp_path / "o", "F32")
    reader = gguf.GGUFReader(out)
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert freqs.tensor_type == T.F32 and freqs.data.shape == (8,)
    # llama.cpp divides each base frequency by its factor: factors = base inv_freq / llama3 inv_freq
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(src)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    assert np.allclose(freqs.data, (base / scaled).numpy(), rtol=1e-5)
    meta = fields(out)
    assert "llama.rope.scaling.type" not in meta and meta["llama.rope.freq_base"] == 500000.0
    ck = G.GGUFCheckpoint(out.parent)
    assert "rope_freqs.weight" not in ck.names() and len(ck.names()) == 21


def test_yarn_and_linear_rope_keys(tiny_model_dir):
    cfg = json.loads((tiny_model_dir("qwen2") / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                              "rope_theta": 1e6}
    meta = G.metadata(cfg, None, "F16")
    assert meta["qwen2.rope.scaling.type"][0] == "yarn"
    assert meta["qwen2.rope.scaling.factor"][0] == 4.0
    assert meta["qwen2.rope.scaling.original_context_length"][0] == 128
    assert meta["qwen2.rope.freq_base"][0] == 1e6
    cfg["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    meta = G.metadata(cfg, None, "F16")
    assert (meta["qwen2.rope.scaling.type"][0], meta["qwen2.rope.scaling.factor"][0]) == ("linear", 2.0)
    assert meta["general.file_type"][0] == 1


def test_phi3_longrope_factors(tmp_path, tiny_model_dir):
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
            "long_factor": [1.0 + i / 10 for i in range(8)], "short_factor": [1.0] * 8}
    src = tiny_model_dir("phi3", rope_parameters=rope, max_position_embeddings=8192, original_max_position_embeddings=512)
    out = G.write_gguf_directory(src, tmp_path / "o", "F32")
    reader = gguf.GGUFReader(out)
    got = {t.name: t.data for t in reader.tensors if t.name.startswith("rope_factors")}
    assert np.allclose(got["rope_factors_long.weight"], rope["long_factor"])
    assert np.allclose(got["rope_factors_short.weight"], rope["short_factor"])
    meta = fields(out)
    scale = 8192 / 512
    assert meta["phi3.rope.scaling.attn_factor"] == pytest.approx(np.sqrt(1 + np.log(scale) / np.log(512)))


# -- bad input and the writer's contract ------------------------------------------------------------


def one_line(e: BaseException) -> str:
    s = str(e)
    assert "\n" not in s
    return s


def test_unknown_family(tiny_model_dir):
    cfg = json.loads((tiny_model_dir("llama") / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    with pytest.raises(InputError) as e:
        G.gguf_arch(cfg)
    assert "GPT2LMHeadModel" in one_line(e.value)
    with pytest.raises(InputError):
        G.GGUFStreamWriter(Path("/nonexistent/x.gguf"), cfg, tiny_model_dir("llama"))


def test_unknown_tokenizers(tmp_path, tiny_model_dir):
    src = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), src)
    cfg = json.loads((src / "config.json").read_text())
    tj = json.loads((src / "tokenizer.json").read_text())
    # a byte-level BPE with a pre-tokenizer llama.cpp does not know
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "[0-9]"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (src / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(InputError) as e:
        G.metadata(cfg, src, tokenizer=True)
    msg = one_line(e.value)
    assert "tokenizer.json" in msg and "Split+ByteLevel" in msg and "gpt-2" in msg
    # a WordPiece tokenizer
    tj["model"] = {"type": "WordPiece", "vocab": {"[UNK]": 0}, "unk_token": "[UNK]"}
    tj["decoder"] = {"type": "WordPiece"}
    (src / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(InputError) as e:
        G.metadata(cfg, src, tokenizer=True)
    assert "'WordPiece'" in one_line(e.value)
    (src / "tokenizer.json").unlink()
    with pytest.raises(InputError) as e:
        G.metadata(cfg, src, tokenizer=True)
    assert "no tokenizer.json or tokenizer.model" in one_line(e.value)


def test_untied_gemma_refused(tiny_model_dir):
    src = tiny_model_dir("gemma2", tie_word_embeddings=False)
    with pytest.raises(InputError) as e:
        G.hf_tensor_names(json.loads((src / "config.json").read_text()))
    assert "tie_word_embeddings=false" in one_line(e.value)


def test_writer_contract(tmp_path, tiny_model_dir):
    src = tiny_model_dir("llama")
    with CheckpointReader(src) as reader:
        config = reader.config
        w = G.GGUFStreamWriter(tmp_path / "model.gguf", config, src, "Q4_K_M")
        with pytest.raises(ValueError, match="F32"):
            w.add_tensor_info("model.norm.weight", (64,), "F16")
        with pytest.raises(ValueError, match="bytes"):
            w.add_tensor_info("model.embed_tokens.weight", (1024, 64), "Q8_0", nbytes=123)
        with pytest.raises(ValueError, match="multiple"):
            w.add_tensor_info("model.embed_tokens.weight", (1024, 64), "Q4_K")  # 64 is not a multiple of 256
        assert w.add_tensor_info("model.embed_tokens.weight", (1024, 64), "Q8_0") == "token_embd.weight"
        assert w.add_tensor_info("model.layers.0.self_attn.q_proj.weight", (64, 64), "Q4_0") == "blk.0.attn_q.weight"
        assert w.add_tensor_info("model.norm.weight", (64,), "F32") == "output_norm.weight"
        with pytest.raises(InputError, match="no GGUF name"):
            w.add_tensor_info("model.layers.0.mlp.experts.0.w1.weight", (8, 8), "F32")
        with pytest.raises(RuntimeError):
            w.write_tensor("model.embed_tokens.weight", reader.get("model.embed_tokens.weight"))
        w.write_header()
        with pytest.raises(ValueError, match="next declared tensor"):
            w.write_tensor("model.norm.weight", reader.get("model.norm.weight"))
        w.write_tensor("model.embed_tokens.weight", reader.get("model.embed_tokens.weight"))
        with pytest.raises(ValueError, match="bytes of data"):
            w.write_tensor("model.layers.0.self_attn.q_proj.weight", b"\0" * 10)
        with pytest.raises(ValueError, match="not written"):
            w.close()
    tied = dict(config, tie_word_embeddings=True)
    w2 = G.GGUFStreamWriter(tmp_path / "t.gguf", tied, src, "F32")
    with pytest.raises(ValueError, match="tied"):
        w2.add_tensor_info("lm_head.weight", (1024, 64), "F32")
    w2.abort()
    w3 = G.GGUFStreamWriter(tmp_path / "k.gguf", config, src, "Q4_K_M")
    w3.add_tensor_info("model.layers.0.mlp.down_proj.weight", (64, 256), "Q4_K")
    w3.write_header()
    with pytest.raises(ValueError, match="raw block bytes"):
        w3.write_tensor("model.layers.0.mlp.down_proj.weight", torch.zeros(64, 256))
    w3.abort()


def test_file_types_and_caveats(tiny_model_dir):
    cfg = json.loads((tiny_model_dir("gemma2") / "config.json").read_text())
    for name, value in (("F32", 0), ("F16", 1), ("BF16", 32), ("Q8_0", 7), ("Q4_0", 2), ("Q4_K_M", 15),
                        ("Q5_K_M", 17), ("Q6_K", 18)):
        assert G.metadata(cfg, None, name)["general.file_type"][0] == value
    with pytest.raises(InputError):
        G.metadata(cfg, None, "Q3_K_S")
    assert any("query_pre_attn_scalar" in c for c in G.llama_cpp_caveats(cfg))
    assert not G.llama_cpp_caveats(dict(cfg, query_pre_attn_scalar=16))


def test_bf16_and_f16_outputs(tmp_path, tiny_model_dir):
    src = tiny_model_dir("qwen3", dtype=torch.bfloat16)
    ref = hf_state(src)
    for ft in ("BF16", "F16"):
        out = G.write_gguf_directory(src, tmp_path / ft, ft)
        ck = G.GGUFCheckpoint(out.parent)
        for n, W in ref.items():
            assert ck.qtype(n) == ("F32" if W.dim() == 1 else ft)
            # bf16 source: BF16 and F32 hold it exactly; F16 rounds (values here are well inside its range)
            if ft == "BF16" or W.dim() == 1:
                assert torch.equal(ck.get(n), W), n
            else:
                assert torch.equal(ck.get(n), W.half().float()), n


def test_phi3_name_needs_phi3_vocabulary(tmp_path, tiny_model_dir):
    """llama.cpp looks up Phi-3's special tokens by text whenever general.name contains "phi3": a
    given name that triggers it with another vocabulary is refused; a derived one is replaced."""
    src = tmp_path / "my-phi3-finetune"
    shutil.copytree(tiny_model_dir("phi3"), src)
    cfg = json.loads((src / "config.json").read_text())
    with pytest.raises(InputError) as e:
        G.GGUFStreamWriter(tmp_path / "a.gguf", cfg, src, "F32", name="Phi-3-mini-ft")
    assert "'</s>'" in one_line(e.value)
    w = G.GGUFStreamWriter(tmp_path / "b.gguf", cfg, src, "F32")
    assert w._w.kv_data[0]["general.name"].value == "model"
    w.abort()


# -- llama.cpp itself (llama-cpp-python, when installed) --------------------------------------------

LLAMA_CPP_OVERRIDES = {"gemma2": {"query_pre_attn_scalar": 16}}  # see llama_cpp_caveats


@pytest.mark.interop
@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_logits(tmp_path, tiny_model_dir, family):
    """llama.cpp loads every family's GGUF and computes the HF model's logits (F32: within 5e-4 of
    the logit range -- ggml's GELU is a table, measured 2e-4 for gemma2, 2e-7 elsewhere; Q8_0:
    llama.cpp also rounds activations to 8 bits, measured 1e-2, against our read-back), and
    tokenizes like the HF tokenizer."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_model_dir(family, **LLAMA_CPP_OVERRIDES.get(family, {}))
    ids = IDS[0].tolist()
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(IDS).logits[0]
    for ft in ("F32", "Q8_0"):
        out = G.write_gguf_directory(src, tmp_path / ft, ft, name=gguf_name_for(family))
        llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                              type_k=0, type_v=0, flash_attn=False)  # f32 KV cache
        llm.eval(ids)
        got = torch.from_numpy(np.asarray(llm.scores[: len(ids)], dtype=np.float32).copy())
        if ft == "F32":
            base = want
            tol = 5e-4
        else:
            with torch.no_grad():
                base = load_dequantized_model(out.parent).eval()(IDS).logits[0]
            tol = 3e-2
        assert (got - base).abs().max() <= tol * float(base.max() - base.min()), ft
        if ft == "F32":
            text = "Hello world! The quick brown fox, 1234 jumps:\n  tabs\tand   spaces <|eos|> caf\u00e9"
            hf = AutoTokenizer.from_pretrained(src)(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf
        del llm


@pytest.mark.interop
def test_llama_cpp_tokenizes_llama3_pretokenizer(tmp_path, tiny_model_dir):
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    src = with_llama3_pretokenizer(tiny_model_dir("llama"), tmp_path / "l3")
    out = G.write_gguf_directory(src, tmp_path / "o", "F32")
    assert fields(out)["tokenizer.ggml.pre"] == "llama-bpe"
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    text = "Numbers 1234567 and 3.14159, can't WON'T\n\n  indented\tline <|eos|> na\u00efve"
    hf = AutoTokenizer.from_pretrained(src)(text, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf
