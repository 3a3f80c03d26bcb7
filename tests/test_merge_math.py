"""LoRA merge math against the spec's test vectors (MERGE.md §7, TV-2 and TV-3)."""

from __future__ import annotations

import math

import pytest
import torch

from quantize.merge import lora_math as lm

W = torch.tensor([[1, 0, -1, 2], [0.5, 1.5, 0, -0.5], [-2, 1, 1, 0]])
A = torch.tensor([[0.1, 0.2, 0, -0.1], [0, -0.3, 0.4, 0.2]])
B = torch.tensor([[1, 0], [0.5, -1], [0, 2]])
R, ALPHA = 2, 4

PLAIN = [[1.2, 0.4, -1, 1.8], [0.6, 2.3, -0.8, -1.0], [-2.0, -0.2, 2.6, 0.8]]


def close(t, expected, atol=1e-6):
    torch.testing.assert_close(t, torch.tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


def test_scales():
    assert lm.lora_scale(ALPHA, R) == 2.0
    assert lm.lora_scale(ALPHA, R, use_rslora=True) == pytest.approx(4 / math.sqrt(2))
    with pytest.raises(ValueError):
        lm.lora_scale(4, 0)


def test_plain_and_rslora():
    close(lm.merge_linear(W, A, B, lm.lora_scale(ALPHA, R)), PLAIN)
    close(
        lm.merge_linear(W, A, B, lm.lora_scale(ALPHA, R, use_rslora=True)),
        [[1.282843, 0.565685, -1, 1.717157], [0.641421, 2.631371, -1.131371, -1.207107],
         [-2, -0.697056, 3.262742, 1.131371]],
    )


def test_dora_and_dora_rslora():
    m = torch.tensor([2.0, 1.0, 3.0])
    merged = lm.merge_linear(W, A, B, 2.0, magnitude=m)
    close(
        merged,
        [[0.993127, 0.331042, -0.827606, 1.489691], [0.222222, 0.851852, -0.296296, -0.370370],
         [-1.773937, -0.177394, 2.306118, 0.709575]],
    )
    # DoRA rescales every output row to the trained magnitude
    close(torch.linalg.norm(merged, dim=1), m.tolist())
    close(
        lm.merge_linear(W, A, B, lm.lora_scale(ALPHA, R, use_rslora=True), magnitude=m),
        [[1.054997, 0.465214, -0.822390, 1.412173], [0.202103, 0.829107, -0.356478, -0.380342],
         [-1.481081, -0.516198, 2.416192, 0.837826]],
    )


def test_fan_in_fan_out_is_the_transpose():
    merged = lm.merge_linear(W.T.contiguous(), A, B, 2.0, fan_in_fan_out=True)
    close(merged, [[1.2, 0.6, -2], [0.4, 2.3, -0.2], [-1, -0.8, 2.6], [1.8, -1, 0.8]])
    m = torch.tensor([2.0, 1.0, 3.0])
    dora_t = lm.merge_linear(W.T.contiguous(), A, B, 2.0, magnitude=m, fan_in_fan_out=True)
    torch.testing.assert_close(dora_t, lm.merge_linear(W, A, B, 2.0, magnitude=m).T)


def test_lora_bias():
    close(lm.merge_bias(torch.tensor([0.1, -0.2, 0.3]), torch.tensor([1.0, 0, -1]), 2.0), [2.1, -0.2, -1.7])


def test_embedding_lora_and_dora():
    E = torch.tensor([[0, .1, .2], [.3, .4, .5], [.6, .7, .8], [.9, 1, 1.1], [1.2, 1.3, 1.4]])
    eA = torch.tensor([[1, 0, 0, 0.5, 0], [0, 1, 0, 0, -1]])
    eB = torch.tensor([[0.2, 0], [0, 0.4], [1, 1]])
    merged = lm.merge_embedding(E, eA, eB, 2.0)
    close(merged, [[0.4, 0.1, 2.2], [0.3, 1.2, 2.5], [0.6, 0.7, 0.8], [1.1, 1.0, 2.1], [1.2, 0.5, -0.6]])
    m = torch.tensor([1.0, 2.0, 3.0])
    dora = lm.merge_embedding(E, eA, eB, 2.0, magnitude=m)
    # the DoRA norm runs over the vocab axis: every embedding column ends up with the trained magnitude
    close(torch.linalg.norm(dora, dim=0), m.tolist())
    torch.testing.assert_close(dora, merged * (m / torch.linalg.norm(merged, dim=0)))


def test_pattern_resolution_tv2g():
    pattern = {"q_proj": 32, r"layers\.1\.self_attn\.v_proj": 64, r"model\.layers\.\d+\.mlp\.down_proj": 8}
    assert lm.resolve_rank_alpha("model.layers.0.self_attn.q_proj", 16, 16, pattern)[0] == 32
    assert lm.resolve_rank_alpha("model.layers.1.self_attn.v_proj", 16, 16, pattern)[0] == 64
    assert lm.resolve_rank_alpha("model.layers.0.self_attn.v_proj", 16, 16, pattern)[0] == 16
    assert lm.resolve_rank_alpha("model.layers.3.mlp.down_proj", 16, 16, pattern)[0] == 8
    assert lm.resolve_rank_alpha("model.layers.0.self_attn.xq_proj", 16, 16, pattern)[0] == 16
    # rank and alpha are resolved independently (PEFT >= 0.15)
    assert lm.resolve_rank_alpha("model.layers.0.self_attn.q_proj", 8, 16, {"q_proj": 4}, {"self_attn.q_proj": 2}) == (4, 2)


@pytest.mark.parametrize(
    "module, kwargs, expected",
    [
        ("model.layers.0.self_attn.q_proj", dict(target_modules=["q_proj", "v_proj"]), True),
        ("model.layers.0.self_attn.xq_proj", dict(target_modules=["q_proj"]), False),
        ("model.layers.0.self_attn.q_proj", dict(target_modules=r".*\.(q|v)_proj"), True),
        ("model.layers.0.self_attn.k_proj", dict(target_modules=r".*\.(q|v)_proj"), False),
        ("model.layers.1.mlp.down_proj", dict(target_modules=["down_proj"], layers_to_transform=[1]), True),
        ("model.layers.0.mlp.down_proj", dict(target_modules=["down_proj"], layers_to_transform=[1]), False),
        ("model.layers.0.mlp.down_proj", dict(target_modules=["down_proj"], layers_to_transform=0), True),
        ("model.embed_tokens", dict(target_modules=["embed_tokens"], layers_to_transform=[0]), False),
        ("model.layers.2.mlp.experts.0.w1",
         dict(target_modules=["w1"], layers_to_transform=[2], layers_pattern="layers"), True),
        ("model.layers.0.self_attn.q_proj", dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), False),
        ("lm_head", dict(target_modules=["lm_head"], modules_to_save=["lm_head"]), False),
        ("lm_head", dict(target_modules=None), False),
    ],
)
def test_is_targeted(module, kwargs, expected):
    assert lm.is_targeted(module, **kwargs) is expected


def test_litgpt_blockdiag_qkv_tv3():
    # n_embd=3, n_head=2, n_query_groups=1, head_size=2; q+v enabled, r=1, alpha=2
    Wqkv = torch.tensor([[(3 * i + j) / 10 for j in range(3)] for i in range(8)])
    lA = torch.tensor([[1, 0, -1], [0.5, 2, 0]])
    lB = torch.tensor([[1.0], [2], [0], [-1], [3], [0.5]])
    merged = Wqkv + lm.blockdiag_qkv_delta(lA, lB, 2.0, enable=(True, False, True), sizes=(4, 2, 2))
    close(merged[0:4], [[2.0, 0.1, -1.8], [4.3, 0.4, -3.5], [0.6, 0.7, 0.8], [-1.1, 1.0, 3.1]])
    close(merged[4:6], [[1.2, 1.3, 1.4], [1.5, 1.6, 1.7]])
    close(merged[6:8], [[4.8, 13.9, 2.0], [2.6, 4.2, 2.3]])
    with pytest.raises(ValueError):
        lm.blockdiag_qkv_delta(lA, lB[:5], 2.0, enable=(True, False, True), sizes=(4, 2, 2))


def test_single_rounding_tv2h():
    w = torch.tensor([1.0])
    d = torch.tensor([0.0039065])
    assert lm.round_to(w + d, torch.bfloat16).item() == 1.0078125
    # rounding the delta first (PEFT on CPU with bf16 factors) loses the update
    assert (w.bfloat16() + d.bfloat16()).item() == 1.0
