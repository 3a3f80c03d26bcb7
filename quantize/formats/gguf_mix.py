"""Which GGUF type each tensor gets for a named file type (Q4_K_M, Q5_K_M, ...), as llama.cpp's
``llama_tensor_get_type`` decides it (src/llama-quant.cpp), so a Q4_K_M from this tool is the same
mix as llama.cpp's and file sizes compare at equal bits.

The policy for the file types we write:

- file type -> default type: Q4_K_M -> Q4_K, Q5_K_M -> Q5_K, Q6_K -> Q6_K, Q8_0 -> Q8_0,
  Q4_0 -> Q4_0; F16/BF16 quantize nothing;
- ``output`` (and ``token_embd`` when the head is tied to it): Q8_0 if the width is not a multiple
  of the default type's block, else Q6_K unless the default is Q8_0;
- ``attn_v`` and a fused ``attn_qkv`` (Q4_K_M, Q5_K_M): Q6_K where ``use_more_bits(i, n)`` over
  those tensors in order;
  a 70B Llama (80 layers, GQA) lifts Q4_K to Q5_K there;
- ``ffn_down`` (Q4_K_M, Q5_K_M): Q6_K where ``use_more_bits(layer, n_layers)``; in a Mixture-of-Experts
  model llama.cpp takes the layer from the name, so the stacked experts ``ffn_down_exps`` and the
  shared expert's ``ffn_down_shexp`` of a layer follow the same rule (each a whole 3D tensor);
- exactly 8 experts (``expert_count``, Mixtral's): ``attn_v`` and ``attn_k`` Q8_0 for every file
  type, ``attn_output`` Q5_K for Q4_K_M; routers (``ffn_gate_inp``, ``ffn_gate_inp_shexp``) stay F32;
  expert tensors ``ffn_{gate,up,down}_exps`` otherwise get the default type, judged on their row
  width as a 2D tensor would be;
- shapes a type cannot hold (width not a multiple of its block) fall back as llama.cpp does:
  Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and to F16 when even that does not fit;
- norms and other 1-D tensors stay F32, as convert_hf_to_gguf writes them;
- DeepSeek-V3's MLA tensors (``attn_q_a``, ``attn_q_b``, ``attn_kv_a_mqa``, ``attn_k_b``, ``attn_v_b``) fall in
  none of llama.cpp's categories (its ``attn_kv_b`` rule would apply only to an unsplit ``kv_b``; without
  ``q_lora_rank`` the plain ``attn_q`` is its ATTENTION_Q, which changes none of these file types): the
  default type, then the shape fallback on their own row width -- ``attn_k_b``'s rows are
  ``qk_nope_head_dim`` wide (128 in DeepSeek-V3: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0);
  ``attn_output``, the dense layers' ``ffn_*``, ``ffn_*_exps`` and ``ffn_*_shexp`` follow the rules above.

llama.cpp's imatrix-only rule (Q4_0 with an imatrix: the first eighth of ffn_down as Q4_1) is not
applied: the mix never depends on whether calibration data was given, so sizes do not either.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError

FILE_TYPES = ("F16", "BF16", "Q8_0", "Q4_0", "Q6_K", "Q5_K_M", "Q4_K_M")
FLOAT_FILE_TYPES = ("F16", "BF16")
DEFAULT_TYPE = {"F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q6_K": "Q6_K",
                "Q5_K_M": "Q5_K", "Q4_K_M": "Q4_K"}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def type_size(qtype: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a ggml type, from gguf-py's table."""
    import gguf

    return gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, qtype)]


def _block(qtype: str) -> int:
    return type_size(qtype)[0]


def check_file_type(ftype: str) -> str:
    name = ftype.upper()
    if name not in FILE_TYPES:
        raise InputError(f"--type {ftype!r}: use one of {', '.join(FILE_TYPES)}")
    return name


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the tensors that get more bits: the first and last eighth, and every
    third one in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    n_head: int
    n_head_kv: int
    tied: bool
    arch: str = "llama"  # the GGUF architecture
    n_expert: int = 1

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B: a Llama of 80 layers with grouped-query attention."""
        return self.arch == "llama" and self.n_layers == 80 and self.n_head != self.n_head_kv


def _fallback(qtype: str, ncols: int) -> str:
    if ncols % _block(qtype) == 0:
        return qtype
    alt = FALLBACK.get(qtype)
    if alt is None or ncols % _block(alt):
        return "F16"
    return alt


def tensor_type(name: str, ncols: int, ftype: str, shape: ModelShape, *, ndim: int = 2) -> str:
    """The GGUF type of tensor ``name`` (GGUF name, e.g. ``blk.3.attn_v.weight``) of width ``ncols``."""
    ftype = check_file_type(ftype)
    base = DEFAULT_TYPE[ftype]
    if ndim < 2 or not name.endswith("weight") or name.endswith("_norm.weight") or "ffn_gate_inp" in name:
        return "F32"
    if ftype in ("F16", "BF16"):
        return base
    new = base
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight" or (shape.tied and name == "token_embd.weight"):
        if ncols % _block(base):
            new = "Q8_0"
        elif base != "Q8_0":
            new = "Q6_K"
    elif name == "token_embd.weight":
        new = base
    elif "attn_v.weight" in name or "attn_qkv.weight" in name:
        # llama.cpp files a fused attn_qkv under category_is_attn_v: the same rule as attn_v (its
        # older "attn_qkv -> Q5_K" branch further down is unreachable; checked against
        # llama_model_quantize in tests/test_interop_llamacpp.py)
        if ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, shape.n_layers):
            new = "Q6_K"
        if shape.is_70b and new == "Q4_K":
            new = "Q5_K"
        if shape.n_expert == 8:
            new = "Q8_0"
    elif "attn_k.weight" in name and shape.n_expert == 8:
        new = "Q8_0"
    elif "ffn_down" in name:
        if ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, shape.n_layers):
            new = "Q6_K"
    elif "attn_output.weight" in name and shape.n_expert == 8 and ftype == "Q4_K_M":
        new = "Q5_K"
    return _fallback(new, ncols)


# our architecture table's linear names -> GGUF tensor stems (phi3's fused gate_up is ffn_up there)
GGUF_LINEAR = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               # DeepSeek-V3's MLA (kv_b_proj is written as k_b/v_b: formats/gguf.py split_kv_b)
               "self_attn.q_a_proj": "attn_q_a", "self_attn.q_b_proj": "attn_q_b",
               "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa", "self_attn.kv_b_proj": "attn_kv_b",
               "self_attn.k_b_proj": "attn_k_b", "self_attn.v_b_proj": "attn_v_b"}
EXPERT_STEMS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")  # routed experts stacked 3D: gate, up, down
SHARED_STEMS = ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")  # a shared expert's gate, up, down


def gguf_stem(arch, name: str) -> str:
    """The GGUF tensor stem of layer linear ``name`` (relative, on-disk): ``attn_q``, ..., an expert's
    linear -> its stacked ``ffn_*_exps``, a shared expert's -> ``ffn_*_shexp``."""
    slot = arch.expert_slot(name)
    if slot is not None:
        return EXPERT_STEMS[slot[1]]
    if name in GGUF_LINEAR:
        return GGUF_LINEAR[name]
    for j, suffix in enumerate((".gate_proj", ".up_proj", ".down_proj")):
        if arch.moe is not None and name.endswith(suffix) and "shared_expert" in name:
            return SHARED_STEMS[j]
    raise KeyError(f"{arch.name}: linear {name!r} has no GGUF tensor name")


def tensor_bytes(qtype: str, rows: int, cols: int) -> int:
    block, size = type_size(qtype)
    return rows * (cols // block) * size


def model_shape(config, arch) -> ModelShape:
    return ModelShape(n_layers=arch.num_layers(config), n_head=int(config["num_attention_heads"]),
                      n_head_kv=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
                      tied=arch.is_tied(config), arch=_gguf_arch_name(arch.name),
                      n_expert=max(1, arch.num_experts(config)))


def _gguf_arch_name(family: str) -> str:
    from .gguf import FAMILY_TO_GGUF

    return FAMILY_TO_GGUF.get(family, family)


def gguf_weight_bytes(config, ftype: str, arch) -> dict[str, int]:
    """Exact tensor-data bytes of a GGUF of ``ftype`` (metadata and the vocabulary excluded)."""
    shape = model_shape(config, arch)
    d = arch.dims(config)
    vocab, hidden = int(config["vocab_size"]), d["hidden"]
    layers = 0
    norm_width = {"q_norm": d["head_dim"], "k_norm": d["head_dim"], "q_a_layernorm": d.get("q_lora"),
                  "kv_a_layernorm": d.get("kv_lora")}
    for i in range(shape.n_layers):
        for name in arch.layer_linears(config, i):  # experts: E of them, one stacked tensor per projection
            N, K = arch.linear_shape(name, config)
            if arch.name == "deepseek_v3" and name == "self_attn.kv_b_proj":  # written as k_b and v_b
                H, nope, v, r = (int(config[k]) for k in ("num_attention_heads", "qk_nope_head_dim", "v_head_dim",
                                                           "kv_lora_rank"))
                layers += tensor_bytes(tensor_type(f"blk.{i}.attn_k_b.weight", nope, ftype, shape), H * r, nope)
                layers += tensor_bytes(tensor_type(f"blk.{i}.attn_v_b.weight", r, ftype, shape), H * v, r)
            else:
                layers += tensor_bytes(tensor_type(f"blk.{i}.{gguf_stem(arch, name)}.weight", K, ftype, shape), N, K)
            if arch.has_bias(name, config):
                layers += 4 * N
        if arch.is_sparse_layer(config, i):  # routers and shared-expert gates: F32
            layers += sum(4 * sum(d[o] for o in lin.out) * d[lin.inp] for lin in arch.moe.never_quantized)
            if arch.name == "deepseek_v3":  # exp_probs_b: the router's e_score_correction_bias, F32
                layers += 4 * shape.n_expert
        layers += sum(4 * (norm_width.get(n.rsplit(".", 1)[-1]) or hidden) for n in arch.layer_norms)
    embed = tensor_bytes(tensor_type("token_embd.weight", hidden, ftype, shape), vocab, hidden)
    head = 0 if shape.tied else tensor_bytes(tensor_type("output.weight", hidden, ftype, shape), vocab, hidden)
    total = layers + embed + head + 4 * hidden
    return {"layers": layers, "embeddings": embed, "lm_head": head, "final_norm": 4 * hidden, "total": total}
