"""Router near-ties: where an engine may route a token to other experts than our read-back does.

An engine that rounds activations (llama.cpp's Q8 blocks before every quantized matmul, vLLM's bf16)
computes a Mixture-of-Experts router's logits a little differently from our fp32 read-back. Where a
token's k-th and (k+1)-th router scores are nearly tied, that is enough for the engine to pick the
other expert: the token then runs through other weights, its logits differ by far more than the
rounding, and so do later tokens that attend to it. That is the engine computing the same model, not
a misread tensor. So a check of an MoE output compares logits position by position and allows
positions beyond the tolerance in a prompt only once a router near-tie has occurred in it (at that
position or before: a flip whose own token stays within the tolerance still reaches later tokens
through attention), and only a bounded share of them; a misplaced expert, block or row breaks the
first positions already, whatever the margins (tests/test_interop_llamacpp_moe.py measured it on
every family's F16/Q8_0/Q4_K_M files: the first such position at a margin of 0.001-0.061, median
margin ~0.3; `quantize check` on the four families' Q4_K_M files, plain and calibrated: 0-12 of 78
positions off, the smallest margin up to each prompt's first 0.000-0.061, KL(ours || llama.cpp)
0.01-0.06 of the quantization effect; one DeepSeek-V3 prompt's first off position has margin 0.17
itself, after a near-tie of 0.039 earlier in the prompt).

The margin of a token in one layer: the k-th minus the (k+1)-th largest router logit over the std of
that token's router logits; DeepSeek-V3 selects on ``sigmoid(logits) + e_score_correction_bias``
within its best groups (each group scored by its two best experts): there the smaller of the
group-selection and the expert-selection margin, over the std of the selection scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TIE = 0.1  # router margin / std of the token's router scores below which an engine may flip the choice
MAX_DIVERGED = 0.25  # share of positions allowed beyond the tolerance (a flip, and later tokens attending to it)


def _margin(router: torch.nn.Module, x: torch.Tensor, k: int, config) -> torch.Tensor:
    b = getattr(router, "bias", None)  # GPT-OSS's router is biased
    logits = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]).float(), router.weight.float(),
                                        b.float() if isinstance(b, torch.Tensor) else None)
    bias = getattr(router, "e_score_correction_bias", None)
    if bias is None:
        top = logits.sort(-1, descending=True).values
        return (top[:, k - 1] - top[:, k]) / logits.std(-1)
    s = logits.sigmoid() + bias.float()
    G, Tg = int(getattr(config, "n_group", 1) or 1), int(getattr(config, "topk_group", 1) or 1)
    groups = s.view(len(s), G, -1)
    inf = torch.full((len(s),), float("inf"))
    g_score = groups.topk(min(2, groups.shape[-1]), -1).values.sum(-1).sort(-1, descending=True)
    g_margin = g_score.values[:, Tg - 1] - g_score.values[:, Tg] if Tg < G else inf
    chosen = groups.gather(1, g_score.indices[:, :Tg, None].expand(-1, -1, groups.shape[-1])).reshape(len(s), -1)
    top = chosen.sort(-1, descending=True).values
    e_margin = top[:, k - 1] - top[:, k] if k < top.shape[-1] else inf
    return torch.minimum(g_margin, e_margin) / s.std(-1)


def routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The routers of a transformers MoE model's sparse layers (``mlp.gate`` beside ``mlp.experts``)."""
    out = []
    for layer in model.model.layers:
        mlp = getattr(layer, "mlp", None)
        gate = getattr(mlp, "gate", None)
        if gate is None:
            gate = getattr(mlp, "router", None)  # GPT-OSS: mlp.router
        if isinstance(gate, torch.nn.Module) and hasattr(mlp, "experts") and hasattr(gate, "weight"):
            out.append(gate)
    return out


def forward_with_margins(model: torch.nn.Module, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logits [T, vocab] fp32, per position the smallest router margin over the layers [T])``;
    the margins are None for a model without routers."""
    found = routers(model)
    k = int(getattr(model.config, "num_experts_per_tok", 0) or 0)
    margins: list[torch.Tensor] = []
    handles = [r.register_forward_pre_hook(lambda mod, args: margins.append(_margin(mod, args[0], k, model.config)))
               for r in found] if found and k else []
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
    finally:
        for h in handles:
            h.remove()
    return logits, (torch.stack(margins).min(0).values if margins else None)


@dataclass(frozen=True)
class Divergence:
    """Positions where an engine's logits are beyond ``rel`` of our logits' range, per prompt."""

    diverged: list[list[int]]  # per prompt, the positions beyond the tolerance
    first_margins: list[float]  # per prompt with any: the smallest router margin up to its first such position
    total: int  # positions over all prompts

    @property
    def count(self) -> int:
        return sum(len(d) for d in self.diverged)

    def explained(self) -> bool:
        """In every prompt a router near-tie comes at or before its first position beyond the
        tolerance, and at most ``MAX_DIVERGED`` of the positions are beyond it."""
        return all(m < TIE for m in self.first_margins) and self.count <= MAX_DIVERGED * self.total


def divergence(ours: list[torch.Tensor], got: list[torch.Tensor], margins: list[torch.Tensor], rel: float) -> Divergence:
    """Which positions of each prompt differ by more than ``rel`` of the range of all our logits."""
    rng = float(torch.cat(ours).max() - torch.cat(ours).min())
    diverged, first = [], []
    for a, b, m in zip(ours, got, margins):
        per_pos = (b.float() - a.float()).abs().max(-1).values
        pos = (~(per_pos <= rel * rng)).nonzero().flatten().tolist()  # NaN counts as diverged
        diverged.append(pos)
        if pos:
            first.append(float(m[: pos[0] + 1].min()))
    return Divergence(diverged, first, sum(len(a) for a in ours))
