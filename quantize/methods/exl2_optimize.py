"""The EXL2 optimizer: one candidate option per slot (a layer's attention or MLP) so that the total
bits fit a budget while the measured error is smallest (FORMATS.md §3.4).

exllamav2 solves this with randomly seeded simulated annealing on ``Σ err^n`` and sweeps ``n``.
The problem is a multiple-choice knapsack, so we solve it exactly by dynamic programming instead:
costs are rounded *up* to ``budget/resolution`` units (a DP-feasible choice is truly feasible),
then leftover exact bits are spent greedily on the upgrades that lower the objective most. No
randomness is involved: the result depends only on the measurement, the costs and the budget.

Objective: ``Σ_slots err^norm`` with ``err = 1 − accuracy`` from the measurement. ``norm=1`` is the
summed error; ``norm=None`` reproduces exllamav2's choice of exponent: the exponents 1.5 … 3.5 are
swept and the one whose solution has the smallest worst-slot error wins (ties: smaller sum).

Budget: ``bpw × Σ in·out`` of every decoder linear, a sparse layer's routed experts all counted
(exllamav2 optimize.py multiplies the MLP's numel by ``num_experts``); an MoE slot's cost is the
exact storage of every expert's tensors, so the bits in the files are the bits planned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import InputError, RuntimeFault
from .exl2 import SLOT_OPTIONS, QParams, exllamav2_total_bits, layer_slots, option_key, storage_bits

DEFAULT_RESOLUTION = 100_000  # DP budget units
NORM_SWEEP = tuple(round(1.5 + 0.1 * i, 2) for i in range(21))  # exllamav2's norm interval (1.5, 3.5)
_FINE_STEPS = (-0.075, -0.05, -0.025, 0.025, 0.05, 0.075)  # second stage: ±0.075 around the best


@dataclass(frozen=True)
class Slot:
    """One module group to assign an option to: exact storage cost and measured error per option."""

    key: str  # "model.layers.3.self_attn"
    costs: tuple[int, ...]  # bits, per option
    errors: tuple[float, ...]  # 1 − accuracy, per option

    def __post_init__(self):
        if not self.costs or len(self.costs) != len(self.errors):
            raise ValueError(f"slot {self.key}: needs one cost and one error per option")


@dataclass(frozen=True)
class Solution:
    choice: tuple[int, ...]  # option index per slot
    total_bits: int
    budget_bits: int
    norm: float
    objective: float  # Σ err^norm
    max_error: float
    sum_error: float


def min_bits(slots: list[Slot]) -> int:
    return sum(min(s.costs) for s in slots)


def max_bits(slots: list[Slot]) -> int:
    return sum(max(s.costs) for s in slots)


def _solve_dp(costs: list[np.ndarray], f: list[np.ndarray], budget: int, resolution: int) -> list[int]:
    """Exact minimum of ``Σ f[s][j]`` s.t. ``Σ ceil(cost/unit) ≤ resolution`` (``unit = budget/resolution``)."""
    unit = budget / resolution
    R = resolution
    INF = np.inf
    dp = np.full(R + 1, INF)
    dp[0] = 0.0
    picks = []
    for c, fv in zip(costs, f):
        units = np.ceil(c / unit - 1e-9).astype(np.int64)
        new = np.full(R + 1, INF)
        pick = np.full(R + 1, -1, dtype=np.int16)
        for j in range(len(c)):
            u = int(units[j])
            if u > R:
                continue
            cand = dp[: R + 1 - u] + fv[j]
            better = cand < new[u:]  # strict: the earlier (cheaper-listed) option wins ties
            new[u:][better] = cand[better]
            pick[u:][better] = j
        dp = new
        picks.append(pick)
    end = int(np.argmin(dp))
    if not np.isfinite(dp[end]):
        return []
    choice = []
    u = end
    for s in range(len(costs) - 1, -1, -1):
        j = int(picks[s][u])
        choice.append(j)
        u -= int(np.ceil(costs[s][j] / unit - 1e-9))
    return choice[::-1]


def _top_up(choice: list[int], costs: list[np.ndarray], f: list[np.ndarray], budget: int) -> list[int]:
    """Spend leftover exact bits: repeatedly take the single-slot change that lowers the objective
    most and still fits (ties: smaller cost increase, then lower slot index)."""
    choice = list(choice)
    used = sum(int(c[j]) for c, j in zip(costs, choice))
    while True:
        best = None
        for s, (c, fv) in enumerate(zip(costs, f)):
            cur = choice[s]
            for j in range(len(c)):
                gain = fv[cur] - fv[j]
                extra = int(c[j]) - int(c[cur])
                if gain > 0 and used + extra <= budget:
                    key = (-gain, extra, s, j)
                    if best is None or key < best:
                        best = key
        if best is None:
            return choice
        _, extra, s, j = best
        choice[s] = j
        used += extra


def optimize(slots: list[Slot], budget_bits: int, *, norm: float | None = 1.0,
             resolution: int = DEFAULT_RESOLUTION, target: str = "budget") -> Solution:
    """Choose one option per slot with ``Σ cost ≤ budget_bits`` minimising ``Σ err^norm``.

    ``norm=None``: exllamav2's exponent selection (see module docstring). InputError when even the
    cheapest options exceed the budget (``target`` names the user's setting in the message).
    """
    if not slots:
        raise InputError("EXL2 optimizer: nothing to quantize (no measured slots)")
    lo = min_bits(slots)
    if lo > budget_bits:
        raise InputError(f"{target}: the cheapest EXL2 options need {lo} bits, the budget is {budget_bits}; "
                         f"raise the target")
    costs = [np.asarray(s.costs, dtype=np.int64) for s in slots]
    errs = [np.clip(np.asarray(s.errors, dtype=np.float64), 1e-6, None) for s in slots]

    def solve(n: float) -> Solution:
        f = [e**n for e in errs]
        choice = _solve_dp(costs, f, budget_bits, resolution)
        if not choice:  # rounding made the budget too tight for the DP: start from the cheapest
            choice = [int(np.argmin(c)) for c in costs]
        choice = _top_up(choice, costs, f, budget_bits)
        total = sum(int(c[j]) for c, j in zip(costs, choice))
        if total > budget_bits:  # unreachable: DP units are rounded up, the top-up checks exact bits
            raise RuntimeFault(f"EXL2 optimizer: solution uses {total} bits, budget {budget_bits}")
        chosen = [float(e[j]) for e, j in zip(errs, choice)]
        return Solution(tuple(choice), total, budget_bits, n, float(sum(x**n for x in chosen)),
                        max(chosen), float(sum(chosen)))

    if norm is not None:
        return solve(float(norm))
    best = None
    for n in NORM_SWEEP:
        sol = solve(n)
        if best is None or (sol.max_error, sol.sum_error) < (best.max_error, best.sum_error):
            best = sol
    center = best.norm
    for d in _FINE_STEPS:
        sol = solve(round(center + d, 4))
        if (sol.max_error, sol.sum_error) < (best.max_error, best.sum_error):
            best = sol
    return best


# -- measurement.json <-> slots <-> per-linear plan ------------------------------------------------


def measurement_document(entries: dict[str, list[dict[str, Any]]], num_layers: int, info: dict[str, Any]) -> dict[str, Any]:
    """``measurement.json`` (FORMATS.md §3.9): ``measurement`` and ``last_module_idx`` as exllamav2
    writes them (module index counts the embedding as 0, then attention and MLP per layer), plus
    ``quantize``: how this measurement was made (informational; exllamav2 ignores extra keys)."""
    return {"measurement": entries, "last_module_idx": 2 * num_layers, "quantize": info}


def load_measurement(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a readable measurement.json ({' '.join(str(e).split())[:120]}); "
                         f"measure again (omit --measurement)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("measurement"), dict) or "last_module_idx" not in doc:
        raise InputError(f"{path}: not an EXL2 measurement (needs top-level 'measurement' and 'last_module_idx')")
    return doc


def _model_slots(arch, config: Mapping[str, Any]):
    """``(layer, slot, [(linear, role), ...])`` for every slot of the model, layer order."""
    for i in range(arch.num_layers(config)):
        for slot, linears in layer_slots(arch, config, i).items():
            yield i, slot, linears


def slots_from_measurement(doc: dict[str, Any], arch, config: Mapping[str, Any], source: str = "measurement.json") -> list[Slot]:
    """One :class:`Slot` per (layer, slot) in layer order, with exact storage costs for this model.

    The measurement must have been made for this model: every slot key present, one entry per
    candidate row with the table's options, and each entry's ``total_bits`` equal to exllamav2's
    cost for this model's shapes (a different model gives different costs). InputError otherwise.
    An MoE slot's cost counts every routed expert's gate, up and down (exllamav2 measure_moe_mlp:
    ``total_bits`` summed over the experts), so the budget holds the experts' bits.
    """
    meas = doc["measurement"]
    slots = []
    for i, slot, linears in _model_slots(arch, config):
        key = arch.layer_prefix(i) + slot
        entries = meas.get(key)
        options = SLOT_OPTIONS[slot]
        if not isinstance(entries, list) or len(entries) != len(options):
            have = "missing" if entries is None else f"{len(entries) if isinstance(entries, list) else 'not a list'} entries"
            raise InputError(f"{source}: {key} is {have}, expected {len(options)} options; "
                             f"the measurement belongs to another model: measure again (omit --measurement)")
        shapes = {lin: arch.linear_shape(lin, config) for lin, _ in linears}
        costs, errors = [], []
        for j, (entry, row) in enumerate(zip(entries, options)):
            cost = want_total = 0
            checked: set[str] = set()
            for lin, role in linears:
                leaf = option_key(slot, lin, role)
                qp = row[role]
                if leaf not in checked:
                    got = QParams.from_dict(entry.get(leaf) or {}, source=f"{source}: {key}[{j}].{leaf}")
                    if got.desc != qp.desc:
                        raise InputError(f"{source}: {key}[{j}].{leaf} is {got.desc}, the option table has {qp.desc}; "
                                         f"measure again (omit --measurement)")
                    checked.add(leaf)
                N, K = shapes[lin]
                cost += storage_bits(qp, K, N)
                want_total += exllamav2_total_bits(qp, K, N, bias=arch.has_bias(lin, config))
            acc = entry.get("accuracy")
            if entry.get("total_bits") != want_total:
                raise InputError(f"{source}: {key}[{j}] total_bits {entry.get('total_bits')} != {want_total} for this "
                                 f"model's shapes; the measurement belongs to another model: measure again")
            if not isinstance(acc, (int, float)) or not 0.0 < acc <= 1.0:
                raise InputError(f"{source}: {key}[{j}] accuracy {acc!r} is not in (0, 1]; measure again")
            costs.append(cost)
            errors.append(1.0 - float(acc))
        slots.append(Slot(key, tuple(costs), tuple(errors)))
    return slots


def decoder_weights(arch, config: Mapping[str, Any]) -> int:
    """Σ in·out over the quantized decoder linears (every routed expert's included): the
    denominator of the bpw target (exllamav2 optimize.py: ``numel_mlp`` times ``num_experts``)."""
    total = 0
    for _, _, linears in _model_slots(arch, config):
        for lin, _ in linears:
            N, K = arch.linear_shape(lin, config)
            total += N * K
    return total


def cheapest_bits(arch, config: Mapping[str, Any]) -> int:
    """Storage bits of the cheapest option row of every slot: the smallest feasible budget."""
    total = 0
    for _, slot, linears in _model_slots(arch, config):
        shapes = [(role, *arch.linear_shape(lin, config)) for lin, role in linears]
        total += min(sum(storage_bits(row[role], K, N) for role, N, K in shapes) for row in SLOT_OPTIONS[slot])
    return total


def measured_slots(arch, config: Mapping[str, Any]) -> int:
    """How many slots a complete measurement of this model has."""
    return sum(1 for _ in _model_slots(arch, config))


def plan_from_solution(solution: Solution, arch, config: Mapping[str, Any]) -> dict[int, dict[str, QParams]]:
    """``{layer: {linear: QParams}}`` from the chosen option rows (slots in :func:`slots_from_measurement`
    order); in an MoE slot every expert's gate/up/down takes the row's gate/up/down."""
    plan: dict[int, dict[str, QParams]] = {i: {} for i in range(arch.num_layers(config))}
    for k, (i, slot, linears) in enumerate(_model_slots(arch, config)):
        row = SLOT_OPTIONS[slot][solution.choice[k]]
        for lin, role in linears:
            plan[i][lin] = row[role]
    return plan
