"""AWQ as pure functions: folding invariance on real decoder layers, statistics, scale and clip search."""

from __future__ import annotations

import math

import pytest
import torch

from quantize.arch import get_arch
from quantize.formats.awq import awq_spec
from quantize.methods import awq as A
from quantize.methods.awq_layer import fold_pair, take_sequences


def _model(tiny_model_dir, family, **kw):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir(family, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, get_arch(model.config.to_dict())


def _fold_everything(model, arch, gen, *, offset=None):
    """Fold random scales (0.25x .. 4x) into every applicable pair of every layer."""
    config = model.config.to_dict()
    pairs = arch.scale_pairs_for(config)
    if offset is not None:  # a deliberately wrong norm convention, to show the test can fail
        import dataclasses
        arch = dataclasses.replace(arch, norm_weight_offset=offset)
    for layer in model.get_submodule(arch.layers_path):
        W = {n: layer.get_submodule(n).weight.detach().float().clone() for n in arch.linear_names()}
        for pair in pairs:
            K = layer.get_submodule(pair.linears[0]).in_features
            s = torch.exp((torch.rand(K, generator=gen) * 2 - 1) * math.log(4.0))
            fold_pair(layer, arch, config, pair, s, W)
    return pairs


# (family, config overrides, pairs expected): no GQA (4 KV heads) so v->o / qkv->o applies too
CASES = [
    ("llama", {}, 3),
    ("llama", {"num_key_value_heads": 4}, 4),
    ("qwen2", {"num_key_value_heads": 4}, 4),  # v_proj bias divided by the v->o scale
    ("gemma", {"num_key_value_heads": 4}, 4),  # (1 + w) RMSNorm
    ("gemma2", {}, 3),  # pre_feedforward_layernorm feeds the MLP
    ("phi3", {"num_key_value_heads": 4}, 4),  # fused qkv_proj (v rows) and gate_up_proj (up rows)
    ("qwen3", {"num_key_value_heads": 4}, 4),
    ("llama", {"mlp_bias": True, "attention_bias": True, "num_key_value_heads": 4}, 4),
]


@pytest.mark.parametrize("family,kw,n_pairs", CASES)
def test_folding_leaves_the_fp_model_unchanged(tiny_model_dir, family, kw, n_pairs):
    torch.manual_seed(0)
    model, arch = _model(tiny_model_dir, family, **kw)
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        before = model(ids).logits
        pairs = _fold_everything(model, arch, torch.Generator().manual_seed(1))
        after = model(ids).logits
    assert len(pairs) == n_pairs
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    # every prev op and every scaled linear really changed (scales of 0.25x..4x were folded)
    prefix = arch.layer_prefix(0)
    for pair in pairs:
        for name in (pair.prev, *pair.linears):
            key = prefix + name + ".weight"
            assert not torch.allclose(dict(model.named_parameters())[key], params[key]), key


def test_gemma_fold_needs_the_offset(tiny_model_dir):
    """Folding a (1 + w) norm as if it were a plain w norm changes the output: the offset matters."""
    model, arch = _model(tiny_model_dir, "gemma")
    ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        _fold_everything(model, arch, torch.Generator().manual_seed(1), offset=0.0)
        after = model(ids).logits
    assert (after - before).abs().max() > 1e-2


def test_fold_primitives():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 16, generator=g)
    s = torch.rand(16, generator=g) + 0.5
    w_norm = torch.randn(16, generator=g)
    W = torch.randn(8, 16, generator=g)
    for offset in (0.0, 1.0):
        w2, _ = A.fold_into_norm(w_norm, s, offset)
        torch.testing.assert_close((x * (offset + w2)) @ A.scale_columns(W, s).T, (x * (offset + w_norm)) @ W.T)
    # previous linear: rows 4..8 of a [12, 16] weight feed an 4-input linear
    P, b = torch.randn(12, 16, generator=g), torch.randn(12, generator=g)
    s4 = torch.rand(4, generator=g) + 0.5
    P2, b2 = A.fold_into_rows(P, s4, 4, b)
    assert torch.equal(P2[:4], P[:4]) and torch.equal(P2[8:], P[8:]) and torch.equal(b2[:4], b[:4])
    nxt = torch.randn(5, 4, generator=g)
    torch.testing.assert_close(((x @ P2.T + b2)[:, 4:8]) @ A.scale_columns(nxt, s4).T, ((x @ P.T + b)[:, 4:8]) @ nxt.T)


def test_statistics_match_direct_computation():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 7, 32, generator=g) * 3 for _ in range(3)]
    X = torch.cat([x.reshape(-1, 32) for x in xs])
    am, gg = A.AbsMean(), A.GroupGram(8)
    for x in xs:
        am.add(x)
        gg.add(x)
    torch.testing.assert_close(am.mean, X.abs().mean(0))
    Xg = X.view(-1, 4, 8)
    torch.testing.assert_close(gg.gram, torch.einsum("tgi,tgj->gij", Xg, Xg) / X.shape[0])
    # group_error is AutoAWQ's clip objective: mean over tokens of the squared partial outputs per group
    W = torch.randn(6, 32, generator=g)
    W_hat = A.fake_quantize(W, 8)
    direct = ((X.view(-1, 1, 4, 8) * (W_hat - W).view(1, 6, 4, 8)).sum(-1) ** 2).mean(0)
    torch.testing.assert_close(A.group_error(W, W_hat, gg.gram), direct, rtol=1e-4, atol=1e-6)


def test_output_mse_is_the_token_mean_of_squared_output_errors():
    from quantize.methods.hessian import HessianAccumulator

    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 24, generator=g)
    acc = HessianAccumulator()
    for chunk in X.split(64):
        acc.add(chunk)
    W1, W2 = torch.randn(8, 24, generator=g), torch.randn(16, 24, generator=g)
    E1, E2 = A.fake_quantize(W1, 8), A.fake_quantize(W2, 8)
    direct = float(torch.cat([X @ (E1 - W1).T, X @ (E2 - W2).T], dim=1).pow(2).mean())
    assert A.output_mse([E1 - W1, E2 - W2], acc.H) == pytest.approx(direct, rel=1e-4)


def test_weight_mean_and_duo_scales():
    W = torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.0, 1.0, 1.0, 0.0]])
    wm = A.weight_mean([W], 2)
    exp = torch.tensor([[0.5, 1.0, 0.125, 1.0], [0.0, 1.0, 1.0, 0.0]]).mean(0)
    torch.testing.assert_close(wm, exp, atol=1e-5, rtol=1e-5)
    x = torch.tensor([1.0, 10.0, 0.0, 3.0])
    for alpha in (0.0, 0.3, 0.95):
        s = A.duo_scales(x, wm, alpha)
        assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
        torch.testing.assert_close(s.max() * s.min(), torch.tensor(1.0))
    s = A.duo_scales(x, None, 0.5)  # x^α only: monotone in x
    assert s.argsort().tolist() == x.argsort().tolist()


def _outlier_problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 64, generator=g)
    X[:, 3] *= 40.0  # activation outlier channels: AWQ's premise
    X[:, 17] *= 25.0
    W = torch.randn(32, 64, generator=g) * 0.1
    ref = X @ W.T

    def loss(eff):
        return float((X @ eff[0].T - ref).pow(2).mean())

    return X, W, loss


def test_scale_search_beats_rtn_on_outlier_channels():
    X, W, loss = _outlier_problem()
    found = A.search_scales(X.abs().mean(0), [W], loss, 32)
    assert found.alpha is not None and found.alpha > 0
    assert found.loss < 0.7 * found.rtn_loss  # a large, real improvement
    assert found.loss == min(v for v in found.losses.values())
    assert len(found.losses) == A.SCALE_GRID
    # the chosen scales are the grid's, normalised, and protect the outlier channels
    assert found.scales[3] > found.scales.median() and found.scales[17] > found.scales.median()


def test_scale_search_keeps_identity_when_nothing_helps_and_skips_non_finite():
    X, W, loss = _outlier_problem()
    found = A.search_scales(X.abs().mean(0), [W], lambda eff: 0.0 if torch.equal(eff[0], A.fake_quantize(W, 32)) else 1.0, 32)
    assert found.alpha is None and torch.equal(found.scales, torch.ones(64))
    nan_rtn = A.search_scales(X.abs().mean(0), [W], lambda eff: math.nan if torch.equal(eff[0], A.fake_quantize(W, 32)) else loss(eff), 32)
    assert nan_rtn.alpha is not None and math.isfinite(nan_rtn.loss)
    with pytest.raises(ValueError, match="non-finite"):
        A.search_scales(X.abs().mean(0), [W], lambda eff: math.inf, 32)


def test_clip_search_never_hurts_and_helps_heavy_tails():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 128, generator=g)
    W = torch.randn(64, 128, generator=g) * 0.02
    W += (torch.rand(64, 128, generator=g) < 0.01) * torch.randn(64, 128, generator=g) * 0.2  # sparse outliers
    # (clipping helps the Gaussian bulk a few percent; it never clips an outlier it cannot afford to)
    gram = A.GroupGram(32)
    gram.add(X)
    mv = A.search_clip(W, gram.gram, 32)
    amax = W.view(64, 4, 32).abs().amax(-1)
    assert bool((mv <= amax).all()) and bool((mv >= 0.51 * amax - 1e-7).all())  # r = 1, 0.99, ..., 0.51
    e0 = A.group_error(W, A.fake_quantize(W, 32), gram.gram)
    e1 = A.group_error(W, A.fake_quantize(A.clip_weight(W, mv), 32), gram.gram)
    assert bool((e1 <= e0 + 1e-12).all())
    assert bool((mv < amax).any()) and float(e1.sum()) < 0.98 * float(e0.sum())


def test_awq_grid_matches_fake_quant_and_autoawq_formula():
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    r = A.awq_quantize(W, awq_spec(32))
    assert torch.equal(r.W_hat, A.fake_quantize(W, 32))
    groups = W.view(16, 2, 32)
    mx, mn = groups.amax(-1), groups.amin(-1)
    # fp16-rounded AutoAWQ scale; zero = clamp(-round(min/scale), 0, 15)
    scale = ((mx - mn).clamp(min=1e-5) / 15).half().float()
    torch.testing.assert_close(r.scales, scale.T)
    assert torch.equal(r.zeros, (-torch.round(mn / scale)).clamp(0, 15).T.to(torch.int32))


def test_take_sequences_slices_batch_tensors_only():
    B, L, H = 4, 8, 16
    hidden = torch.randn(B, L, H)
    kwargs = {"hidden_states": hidden, "attention_mask": torch.zeros(B, 1, L, L),
              "position_embeddings": (torch.randn(B, L, 4), torch.randn(B, L, 4)),
              "position_ids": torch.arange(L).view(1, L), "cache_position": torch.arange(L)}
    calls = [((), kwargs), ((), kwargs), ((), kwargs)]
    out = take_sequences(calls, 12)
    assert len(out) == 1
    k = out[0][1]
    assert k["hidden_states"].shape[0] == 2 and k["attention_mask"].shape[0] == 2
    assert k["position_embeddings"][0].shape[0] == 2 and k["position_ids"].shape == (1, L)
    assert k["cache_position"].shape == (L,)
    out = take_sequences(calls, 40)
    assert [o[1]["hidden_states"].shape[0] for o in out] == [4, 1]
    assert take_sequences([((hidden,), {})], 10**6)[0][0][0] is hidden


# -- the all-token scale search (quadratic form over XᵀX, candidates batched) ------------------------


def _layer_problem(seed: int, K: int = 64, T: int = 600):
    """Random linears sharing an input with outlier channels, their input Hessian over all ``T``
    tokens (fed in batches, as the pipeline does) and the brute-force token loop over all tokens."""
    from quantize.methods.hessian import HessianAccumulator

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, K, generator=g) * (1 + 20 * (torch.rand(K, generator=g) < 0.1))
    Ws = [torch.randn(n, K, generator=g) * 0.1 for n in (24, 8, 40)]
    acc = HessianAccumulator()
    for chunk in X.split(128):
        acc.add(chunk)

    def token_loop(effective):  # the old per-candidate loss: re-run every token through the linears
        sq = sum(float((X @ (e - w).T).pow(2).sum()) for e, w in zip(effective, Ws))
        return sq / (T * sum(w.shape[0] for w in Ws))

    return X, Ws, acc.H, token_loop


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_quadratic_losses_are_the_token_loop_losses(seed):
    X, Ws, H, token_loop = _layer_problem(seed)
    cands = A.scale_candidates(X.abs().mean(0), Ws, 32)
    q = A.quadratic_losses(Ws, torch.stack([s for _, s in cands]), H, 32)
    direct = [token_loop([A.scaled_fake_quant(w, s, 32) for w in Ws]) for _, s in cands]
    assert q.shape == (len(cands),) == (A.SCALE_GRID + 1,)
    torch.testing.assert_close(q, torch.tensor(direct, dtype=torch.float64), rtol=1e-4, atol=0)
    # row blocks (bounded temporaries) give the same numbers as one block
    small = A._CHUNK_ELEMS
    try:
        A._CHUNK_ELEMS = 64 * len(cands) * 5  # 5 rows per block
        torch.testing.assert_close(A.quadratic_losses(Ws, torch.stack([s for _, s in cands]), H, 32), q,
                                   rtol=1e-6, atol=0)
    finally:
        A._CHUNK_ELEMS = small


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_all_token_search_chooses_what_the_brute_force_token_loop_chooses(seed):
    X, Ws, H, token_loop = _layer_problem(seed)
    x_mean = X.abs().mean(0)
    brute = A.search_scales(x_mean, Ws, token_loop, 32)  # every candidate through every token
    fast = A.search_scales(x_mean, Ws, None, 32, H=H)  # the quadratic form, batched
    assert fast.alpha == brute.alpha and torch.equal(fast.scales, brute.scales)
    assert fast.loss == pytest.approx(brute.loss, rel=1e-4) and fast.rtn_loss == pytest.approx(brute.rtn_loss, rel=1e-4)
    for a, v in brute.losses.items():
        assert fast.losses[a] == pytest.approx(v, rel=1e-4), a
    assert fast.alpha is not None and fast.loss < fast.rtn_loss  # outlier channels: the search matters
    # with a sub-block loss and H: re-running every candidate (refine=None) is the brute force; with
    # refine=k only the identity and the quadratic form's k best are re-run
    both = A.search_scales(x_mean, Ws, token_loop, 32, H=H)
    assert both.alpha == brute.alpha and both.losses == brute.losses
    calls = []
    top = A.search_scales(x_mean, Ws, lambda eff: calls.append(1) or token_loop(eff), 32, H=H, refine=3)
    assert len(calls) == 4 and top.alpha == brute.alpha and top.loss == brute.loss
    assert sum(math.isfinite(v) for v in top.losses.values()) == 3 and top.rtn_loss == brute.rtn_loss


def test_all_token_search_can_fail_against_a_subsample():
    """The quadratic form is over the tokens H was accumulated on: a Hessian of a subsample (the old
    default's search tokens) scores different losses, so the equality above is not vacuous."""
    from quantize.methods.hessian import HessianAccumulator

    X, Ws, H, token_loop = _layer_problem(0)
    sub = HessianAccumulator()
    sub.add(X[:64])
    fast = A.search_scales(X.abs().mean(0), Ws, None, 32, H=sub.H)
    brute = A.search_scales(X.abs().mean(0), Ws, token_loop, 32)
    assert any(abs(fast.losses[a] - v) > 1e-3 * v for a, v in brute.losses.items())


def test_all_token_search_is_deterministic():
    X, Ws, H, token_loop = _layer_problem(7)
    runs = [A.search_scales(X.abs().mean(0), Ws, None, 32, H=H) for _ in range(2)]
    assert torch.equal(runs[0].scales, runs[1].scales) and runs[0].losses == runs[1].losses
    assert runs[0].proxy == runs[1].proxy and runs[0].alpha == runs[1].alpha


def test_quadratic_search_skips_non_finite_candidates_and_needs_a_loss():
    X, Ws, H, _ = _layer_problem(1)
    x_mean = X.abs().mean(0)
    x_mean[5] = math.inf  # every s(α > 0) is non-finite; s(0) and the identity are not
    found = A.search_scales(x_mean, Ws, None, 32, H=H)
    assert found.alpha in (None, 0.0) and bool(torch.isfinite(found.scales).all())
    assert all(math.isnan(v) for a, v in found.losses.items() if a > 0)
    with pytest.raises(ValueError, match="loss_fn"):
        A.search_scales(x_mean, Ws, None, 32)
