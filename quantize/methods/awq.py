"""AWQ (activation-aware weight quantization, Lin et al. 2023, arXiv:2306.00978) as pure functions.

For a smoothing pair "previous op -> linears" (quantize/arch.py ``ScalePair``) a per-input-channel
scale ``s`` is multiplied into the linears' input columns and divided out of the previous op's
output channels, which leaves the fp model's function unchanged but moves quantization error away
from the channels that carry large activations. Per pair:

1. statistics: ``x_mean[k] = mean_t |x[t, k]|`` over all calibration tokens, and ``w_mean[k]`` the
   mean over output rows of ``|W[n, k]| / max_{k' in group(k)} |W[n, k']|`` (:func:`weight_mean`);
2. scale search (:func:`search_scales`): ``s(α) = x_mean^α / w_mean^(1−α)`` ("duo scaling"),
   normalised so ``max(s)·min(s) = 1``, for α on a 20-point grid, and ``s = 1`` (plain
   round-to-nearest), so the chosen scales never do worse than RTN. Every candidate is scored at once
   by the output error of the linears with the weights ``Q(W·s)/s`` over *all* calibration tokens,
   ``tr(ΔW H ΔWᵀ)`` with ``H`` their input Hessian (:func:`quadratic_losses`: no token pass per
   candidate). Where the linears feed a nonlinear sub-block (attention, a gated MLP) the caller's
   loss re-runs that sub-block with the candidate weights and returns its output error: on every
   candidate, or on the identity and the quadratic form's best few (``refine``);
3. folding (:func:`fold_into_norm`, :func:`fold_into_rows`, :func:`scale_columns`);
4. clip search (:func:`search_clip`): per output row and group, shrink the range to
   ``[−r·max|w|, r·max|w|]`` for r = 1, 0.99, …, 0.51 and keep the r minimising the group's output
   error ``ΔW_g Σ_g ΔW_gᵀ``, with ``Σ_g`` the group's input second moment (:class:`GroupGram`).
   AutoAWQ steps r by 0.05 on 512 sampled tokens; with the exact all-token error the finer grid
   pays (on ref-llama 7.5% lower KL than 0.05 steps, at no measurable cost);
5. 4-bit asymmetric group quantization on AWQ's min/max grid (:func:`awq_quantize`).

The clip error is AutoAWQ's objective (mean over tokens of the squared partial output of each group)
computed exactly as a quadratic form in the per-group Gram matrices: the Gram matrices are
accumulated over *all* calibration tokens, which is both cheaper than AutoAWQ's token subsample and
not an approximation of it. All math is fp32; nothing here touches a model, a device or a file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .grid import QuantResult, QuantSpec, dequantize_grouped, dtype_exact

BITS = 4
MAXQ = (1 << BITS) - 1
SCALE_GRID = 20  # α = 0, 0.05, ..., 0.95
CLIP_GRID = 100  # r = 1 − i/100 (AutoAWQ: 20; 1% steps measured 7.5% lower KL on ref-llama, README)
CLIP_MAX_SHRINK = 0.5  # i < 0.5·100: r down to 0.51
_MIN_RANGE = 1e-5  # AutoAWQ: scale = max(max − min, 1e-5) / 15
_W_EPS = 1e-6  # |W| / (group max + eps) in w_mean
_DUO_EPS = 1e-4  # x^α / (w^(1−α) + eps), then clamp(min=eps)
_CHUNK_ELEMS = 1 << 24  # rows × columns per clip-search chunk (bounds temporaries)


# -- statistics -------------------------------------------------------------------------------------


class AbsMean:
    """Per-channel mean |x| over every token seen (fp64 sums: exact enough for any token count)."""

    def __init__(self) -> None:
        self.sum: Tensor | None = None
        self.n = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        s = x.float().abs().sum(0).double()
        self.sum = s if self.sum is None else self.sum + s
        self.n += x.shape[0]

    @property
    def mean(self) -> Tensor:
        if self.sum is None or self.n == 0:
            raise ValueError("no activations were accumulated")
        return (self.sum / self.n).float()


class GroupGram:
    """Per-group input second moments ``Σ_g = mean_t x_g(t) x_g(t)ᵀ`` (fp32, ``[G, g, g]``).

    The block diagonal of the GPTQ Hessian (up to its factor 2): enough to score a group's
    quantization error ``ΔW_g Σ_g ΔW_gᵀ`` exactly.
    """

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size
        self.sum: Tensor | None = None
        self.n = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        K = x.shape[1]
        g = K if self.group_size == -1 else self.group_size
        xg = x.view(x.shape[0], K // g, g)
        s = torch.einsum("tgi,tgj->gij", xg, xg)
        self.sum = s if self.sum is None else self.sum + s
        self.n += x.shape[0]

    @property
    def gram(self) -> Tensor:
        if self.sum is None or self.n == 0:
            raise ValueError("no activations were accumulated")
        return self.sum / self.n


def _group_normalised(W: Tensor, group_size: int) -> Tensor:
    """``|W| [N, K]`` divided by each group's max ``|W|`` (AWQ's duo-scaling weight statistic, per row)."""
    N, K = W.shape
    g = K if group_size == -1 else group_size
    a = W.abs().view(N, K // g, g)
    return (a / (a.amax(dim=-1, keepdim=True) + _W_EPS)).view(N, K)


def weight_mean(weights: Sequence[Tensor], group_size: int) -> Tensor:
    """``w_mean [K]``: mean over the rows of all ``weights`` of |W| normalised by its group's max |W|."""
    return _group_normalised(torch.cat([w.float() for w in weights], dim=0), group_size).mean(0)


def streamed_weight_mean(weights: Iterable[Tensor], group_size: int) -> Tensor:
    """:func:`weight_mean` of ``weights`` taken one at a time (a generator may bring each to the device
    and drop it): every linear's column sums of ``|W| / group max`` added in fp64, in iteration
    order, over the total rows. The same value however the weights are produced (a Mixture-of-Experts
    pair's experts, all resident or a chunk at a time); fp32 ``[K]``."""
    total: Tensor | None = None
    rows = 0
    for W in weights:
        s = _group_normalised(W.float(), group_size).double().sum(0)
        total = s if total is None else total + s
        rows += W.shape[0]
        del W, s  # not alive while the next weight is produced
    if total is None or rows == 0:
        raise ValueError("no weights")
    return (total / rows).float()


class LazySequence(Sequence):
    """``n`` items, item ``i`` computed as ``fn(i)`` on every access and never kept: a pair's weights
    (or candidate weights) handed over one at a time, so only the item in use is resident."""

    def __init__(self, n: int, fn: Callable[[int], Tensor]) -> None:
        self.n, self.fn = n, fn

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self.fn(j) for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.fn(i % self.n)

    def __iter__(self) -> Iterator[Tensor]:
        for i in range(self.n):
            yield self.fn(i)


# -- the AWQ grid ----------------------------------------------------------------------------------


def _group_width(K: int, group_size: int) -> int:
    g = K if group_size == -1 else group_size
    if K % g:
        raise ValueError(f"in_features={K} is not a multiple of group_size={group_size}")
    return g


def _grid_params(groups: Tensor, scale_dtype: str = "float16") -> tuple[Tensor, Tensor]:
    """AWQ asymmetric params per group of ``groups [..., g]``: scale exact in ``scale_dtype`` (the
    searches use fp16; the final quantization the checkpoint's dtype), integer zero (fp32)."""
    mx = groups.amax(dim=-1)
    mn = groups.amin(dim=-1)
    scale = dtype_exact((mx - mn).clamp(min=_MIN_RANGE) / MAXQ, scale_dtype)
    zero = (-torch.round(mn / scale)).clamp(0, MAXQ)
    return scale, zero


def fake_quantize(W: Tensor, group_size: int) -> Tensor:
    """``Q(W)``: quantize-then-dequantize ``W [..., N, K]`` on the AWQ grid, fp32 (search inner loop;
    leading dims: a batch of candidates)."""
    W = W.float()
    K = W.shape[-1]
    g = _group_width(K, group_size)
    groups = W.reshape(*W.shape[:-1], K // g, g)
    scale, zero = _grid_params(groups)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    return ((torch.clamp(torch.round(groups / s) + z, 0, MAXQ) - z) * s).view(W.shape)


def awq_quantize(W: Tensor, spec: QuantSpec, loss: float = float("nan")) -> QuantResult:
    """4-bit asymmetric round-to-nearest of every contiguous group of ``W [N, K]`` (AutoAWQ's
    ``pseudo_quantize_tensor``, zero_point=True) with scales exact in ``spec.scale_dtype`` (fp16 for
    the AWQ GEMM format), so the packed tensors dequantize to ``W_hat`` bit for bit."""
    W = W.float()
    N, K = W.shape
    g = _group_width(K, spec.group_size)
    G = K // g
    groups = W.view(N, G, g)
    scale, zero = _grid_params(groups, spec.scale_dtype)
    codes = torch.clamp(torch.round(groups / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, MAXQ)
    codes = codes.view(N, K).to(torch.int32)
    g_idx = (torch.arange(K, device=W.device) // g).to(torch.int32)
    scales, zeros = scale.T.contiguous(), zero.T.to(torch.int32).contiguous()
    W_hat = dequantize_grouped(codes, scales, zeros, g_idx)
    return QuantResult(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, perm=None, W_hat=W_hat, spec=spec,
                       loss=loss, damp_used=0.0, dead_columns=0)


# -- scale search ----------------------------------------------------------------------------------


def duo_scales(x_mean: Tensor, w_mean: Tensor | None, alpha: float) -> Tensor:
    """``s = x_mean^α / (w_mean^(1−α) + ε)`` (``x_mean^α`` alone without ``w_mean``), clamped to ≥ ε,
    normalised so that ``max(s)·min(s) = 1``. fp32 ``[K]``."""
    x = x_mean.float()
    s = x.pow(alpha) if w_mean is None else x.pow(alpha) / (w_mean.float().pow(1.0 - alpha) + _DUO_EPS)
    s = s.clamp(min=_DUO_EPS)
    return s / torch.sqrt(s.max() * s.min())


def scaled_fake_quant(W: Tensor, s: Tensor, group_size: int) -> Tensor:
    """The weight the scaled linear effectively applies to the *unscaled* input: ``Q(W·s) / s``."""
    return fake_quantize(W.float() * s, group_size) / s


def scale_candidates(x_mean: Tensor, weights: Sequence[Tensor], group_size: int, *, n_grid: int = SCALE_GRID,
                     duo_scaling: bool = True, w_mean: Tensor | None = None) -> list[tuple[float | None, Tensor]]:
    """The scale search's candidates in tie-break order: ``(None, ones)`` (the identity, plain RTN),
    then ``(α, s(α))`` for α = i / n_grid, i < n_grid (:func:`duo_scales`; possibly non-finite).
    ``w_mean``: the caller's :func:`weight_mean` of ``weights`` (e.g. :func:`streamed_weight_mean`)."""
    if not duo_scaling:
        w_mean = None
    elif w_mean is None:
        w_mean = weight_mean(weights, group_size)
    ones = torch.ones(x_mean.numel(), dtype=torch.float32, device=x_mean.device)
    return [(None, ones)] + [(i / n_grid, duo_scales(x_mean, w_mean, i / n_grid)) for i in range(n_grid)]


def quadratic_losses(weights: Sequence[Tensor], scales: Tensor, H: Tensor, group_size: int) -> Tensor:
    """Per candidate ``scales [C, K]``: the mean squared output error of the linears ``weights``
    (``[N_i, K]``) with ``Q(W·s)/s`` in place of ``W``, on inputs with Hessian ``H = 2/n XᵀX``:
    ``Σ_i tr(ΔW_i H ΔW_iᵀ) / (2 Σ_i N_i)`` (:func:`output_mse` of every candidate at once). fp64 ``[C]``.

    Every candidate is scored over all the tokens ``H`` was accumulated on, with no token pass: the
    candidates are quantized together (one batched fake-quantize and one batched matmul per block of
    rows; groups lie within a row, so row blocks are independent and bound the temporaries)."""
    C, K = scales.shape
    H = H.float()
    S = scales.float().unsqueeze(1)  # [C, 1, K]
    total = torch.zeros(C, dtype=torch.float64, device=scales.device)
    rows_total = 0
    step = max(1, _CHUNK_ELEMS // (C * K))
    for W in weights:
        W = W.float()
        N = W.shape[0]
        rows_total += N
        for r0 in range(0, N, step):
            w = W[r0 : r0 + step]  # [n, K]
            D = fake_quantize(w * S, group_size) / S - w  # [C, n, K]: Q(W·s)/s − W per candidate
            total += (torch.matmul(D, H) * D).sum(dim=(1, 2)).double()
    return total / (2 * rows_total)


def weighted_quadratic_losses(terms: Iterable[tuple[Sequence[Tensor], Tensor, float]], scales: Tensor,
                              group_size: int) -> Tensor:
    """:func:`quadratic_losses` over several sets of linears, each with its own input Hessian and a
    weight (tokens): per candidate ``Σ_j w_j Σ_i tr(ΔW_ji H_j ΔW_jiᵀ)/2 / Σ_j w_j N_j``. For the
    norm -> experts pair of a Mixture-of-Experts layer, one term per expert (its gate/up, ``H`` from
    the tokens routed to it, weight their count): the model's squared output error, weighted by
    routing. ``terms`` may be a generator (one Hessian alive at a time). fp64 ``[C]``."""
    total = torch.zeros(scales.shape[0], dtype=torch.float64, device=scales.device)
    norm = 0.0
    for weights, H, w in terms:
        rows = sum(W.shape[0] for W in weights)
        if w <= 0 or rows == 0:
            del weights, H
            continue
        total += quadratic_losses(weights, scales, H, group_size) * (w * rows)
        norm += w * rows
        del weights, H  # not alive while the next term is produced
    return total / norm if norm > 0 else total


@dataclass(frozen=True)
class ScaleSearch:
    scales: Tensor  # fp32 [K], the chosen s (all ones when the identity won)
    alpha: float | None  # the chosen α; None: the identity (plain RTN) was best
    loss: float  # the loss at the chosen scales (the caller's, else the quadratic form's)
    rtn_loss: float  # the loss at s = 1
    losses: dict[float, float]  # α -> loss over the grid (nan where non-finite or not evaluated)
    proxy: dict[float | None, float] | None = None  # α (None: identity) -> quadratic-form loss, when ``H`` was given


def search_scales(
    x_mean: Tensor,
    weights: Sequence[Tensor],
    loss_fn: Callable[[list[Tensor]], float] | None,
    group_size: int,
    *,
    n_grid: int = SCALE_GRID,
    duo_scaling: bool = True,
    H: Tensor | None = None,
    refine: int | None = None,
    batch_loss: Callable[[Tensor], Tensor] | None = None,
    w_mean: Tensor | None = None,
) -> ScaleSearch:
    """Grid-search the per-channel scales of one smoothing pair.

    ``weights``: the pair's linears ``[N_i, K]`` (fp, current values). Candidates
    (:func:`scale_candidates`): ``s = 1`` and ``s(α)`` for α = i / n_grid, i < n_grid; ties keep the
    identity, then the smaller α. Two losses, either or both:

    * ``H`` (``2/n XᵀX`` of the linears' input over all calibration tokens): every candidate's
      :func:`quadratic_losses`, batched: the exact output error of the linears themselves;
    * ``loss_fn(effective)``: gets, per linear, the weight ``Q(W·s)/s`` to apply to the unscaled
      input and returns an output error (e.g. of the sub-block the linears feed). Without ``H`` or
      ``refine`` it is evaluated on every candidate; with both, on the identity and the ``refine``
      candidates of lowest quadratic loss only (the quadratic form ranks, the caller's loss decides).

    * ``batch_loss(scales [C, K]) -> [C]``: in place of ``H``, the caller's batched proxy of every
      candidate (e.g. :func:`weighted_quadratic_losses` with per-expert Hessians).

    ``loss_fn``'s argument is a sequence whose items are computed on access (one candidate weight
    alive at a time; ``weights`` may be a :class:`LazySequence` too). ``w_mean``: the duo-scaling
    weight statistic when the caller computed it (:func:`streamed_weight_mean`), else
    :func:`weight_mean` of ``weights``.

    Without ``loss_fn`` the quadratic loss decides. A candidate with a non-finite scale or loss never
    wins; if none is finite a ``ValueError`` is raised (the caller names the layer and module).
    """
    if loss_fn is None and H is None and batch_loss is None:
        raise ValueError("search_scales needs a loss_fn, a Hessian H (or batch_loss), or both")
    cands = scale_candidates(x_mean, weights, group_size, n_grid=n_grid, duo_scaling=duo_scaling, w_mean=w_mean)
    finite = [bool(torch.isfinite(s).all()) for _, s in cands]
    proxy: dict[float | None, float] | None = None
    if H is not None or batch_loss is not None:
        idx = [i for i, ok in enumerate(finite) if ok]
        S = torch.stack([cands[i][1] for i in idx])
        q = (quadratic_losses(weights, S, H, group_size) if H is not None else batch_loss(S)).tolist()
        proxy = {a: math.nan for a, _ in cands}
        proxy.update({cands[i][0]: v if math.isfinite(v) else math.nan for i, v in zip(idx, q)})
    if loss_fn is None:
        scores = proxy
    else:
        chosen = [i for i, ok in enumerate(finite) if ok]
        if proxy is not None and refine is not None:
            ranked = sorted((i for i in chosen if math.isfinite(proxy[cands[i][0]])), key=lambda i: proxy[cands[i][0]])
            keep = {0, *ranked[:refine]}
            chosen = [i for i in chosen if i in keep]
        scores = {a: math.nan for a, _ in cands}
        for i in chosen:
            a, s = cands[i]
            loss = float(loss_fn(LazySequence(len(weights), lambda j, a=a, s=s: (
                fake_quantize(weights[j], group_size) if a is None else scaled_fake_quant(weights[j], s, group_size)))))
            scores[a] = loss if math.isfinite(loss) else math.nan
    best_i, best = 0, math.inf
    for i, (a, _) in enumerate(cands):  # in tie-break order: strictly better wins
        v = scores[a]
        if finite[i] and math.isfinite(v) and v < best:
            best_i, best = i, v
    if not math.isfinite(best):
        raise ValueError("every candidate scale gave a non-finite loss")
    alpha, s = cands[best_i]
    rtn = scores[None]
    return ScaleSearch(scales=s, alpha=alpha, loss=best, rtn_loss=rtn if math.isfinite(rtn) else math.nan,
                       losses={a: v for a, v in scores.items() if a is not None}, proxy=proxy)


def output_mse(deltas: Sequence[Tensor], H: Tensor) -> float:
    """Mean squared output error of linears perturbed by ``deltas`` (``Ŵ − W``, ``[N_i, K]``) on inputs
    with Hessian ``H = 2/n XᵀX``: ``Σ_i tr(ΔW_i H ΔW_iᵀ) / (2 Σ_i N_i)`` = mean over tokens and outputs
    of ``(x ΔWᵀ)²``, computed from all tokens without re-running them (one candidate; the search
    scores all at once with :func:`quadratic_losses`)."""
    total = sum(float(((d.float() @ H) * d.float()).sum()) for d in deltas)
    return total / (2 * sum(d.shape[0] for d in deltas))


# -- folding ---------------------------------------------------------------------------------------


def fold_into_norm(weight: Tensor, s: Tensor, offset: float = 0.0, bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Divide a norm's output channels by ``s``.

    The norm multiplies by ``offset + weight`` (Gemma's RMSNorm stores ``w`` and applies ``1 + w``),
    so the new weight is ``(offset + w) / s − offset``; a LayerNorm bias is divided too.
    """
    s = s.float()
    w = (offset + weight.float()) / s - offset
    return w, (None if bias is None else bias.float() / s)


def fold_into_rows(W: Tensor, s: Tensor, start: int = 0, bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Divide output rows ``start : start + len(s)`` of a previous linear (and its bias) by ``s``."""
    s = s.float()
    W = W.float().clone()
    rows = slice(start, start + s.numel())
    W[rows] /= s.unsqueeze(1)
    if bias is not None:
        bias = bias.float().clone()
        bias[rows] /= s
    return W, bias


def scale_columns(W: Tensor, s: Tensor) -> Tensor:
    """Multiply the input columns of a linear ``[N, K]`` by ``s [K]``."""
    return W.float() * s.float()


# -- clip search -----------------------------------------------------------------------------------


def group_error(W: Tensor, W_hat: Tensor, gram: Tensor) -> Tensor:
    """``[N, G]``: ``(Ŵ − W)_g Σ_g (Ŵ − W)_gᵀ`` per output row and group (mean squared partial output)."""
    G, g, _ = gram.shape
    d = (W_hat.float() - W.float()).view(W.shape[0], G, g)
    return (torch.einsum("ngk,gkl->ngl", d, gram) * d).sum(-1)


def search_clip(
    W: Tensor,
    gram: Tensor,
    group_size: int,
    *,
    n_grid: int = CLIP_GRID,
    max_shrink: float = CLIP_MAX_SHRINK,
) -> Tensor:
    """Per output row and group, the clip threshold ``[N, G]`` (fp32) minimising :func:`group_error`
    of the quantized clipped weight against the unclipped ``W``. r = 1 (no clipping) is a candidate,
    so clipping never increases that error."""
    W = W.float()
    N, K = W.shape
    g = _group_width(K, group_size)
    G = K // g
    if tuple(gram.shape) != (G, g, g):
        raise ValueError(f"gram has shape {tuple(gram.shape)}, expected ({G}, {g}, {g})")
    amax = W.view(N, G, g).abs().amax(dim=-1)
    best_max = amax.clone()
    rows = max(1, _CHUNK_ELEMS // K)
    for r0 in range(0, N, rows):
        w = W[r0 : r0 + rows]
        am = amax[r0 : r0 + rows]
        best_err = torch.full_like(am, math.inf)
        for i in range(int(max_shrink * n_grid)):
            mv = am * (1.0 - i / n_grid)
            lim = mv.repeat_interleave(g, dim=1)
            err = group_error(w, fake_quantize(torch.maximum(torch.minimum(w, lim), -lim), g), gram)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max[r0 : r0 + rows] = torch.where(better, mv, best_max[r0 : r0 + rows])
    return best_max


def clip_weight(W: Tensor, max_val: Tensor) -> Tensor:
    """Clamp every group of ``W [N, K]`` to ``[−max_val, max_val]`` (``max_val [N, G]``)."""
    N, K = W.shape
    lim = max_val.float().repeat_interleave(K // max_val.shape[1], dim=1)
    return torch.maximum(torch.minimum(W.float(), lim), -lim)
