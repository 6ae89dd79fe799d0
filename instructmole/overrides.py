"""Council overrides: pure functions ``Council -> Council``, and a short text form for people.

Every override acts on the layers a *selector* picks:

    all                    every instruction-routed layer
    double | single        all layers of that block kind
    double:*               the same
    double:0-5,9           blocks 0..5 and 9 of that kind (ranges inclusive)
    <canonical name>       one layer, e.g. single_transformer_blocks.3.proj_out

Actions (rules are separated by ``;`` or new lines, ``#`` starts a comment, and a rule without a
selector means ``all``):

    force 1,5          experts 1 and 5 join the council, replacing its weakest members; a forced
    force 1:0.5,5      expert gets the given weight, else the council's mean weight
    only 1,5           the council becomes exactly these experts (same weight rule)
    ban 2              expert 2 leaves and stays out (later refills skip it; force lifts it); the
                       best remaining expert by router probability fills in
    scale 1.5          every council weight times 1.5 (0 switches the layer's experts off)
    top 2              re-pick the top-2 experts by router probability (banned ones excluded)

Example: ``single:0-37 force 1,5; double:* ban 2; all scale 1.5``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .council import Council
from .errors import InstructMoLEError
from .layers import block_of

__all__ = [
    "CouncilRuleError",
    "apply_rules",
    "ban",
    "blend",
    "force",
    "only",
    "parse_rules",
    "scale",
    "select_layers",
    "take",
    "top",
]

ACTIONS = ("force", "only", "ban", "scale", "top")


class CouncilRuleError(InstructMoLEError):
    """A council rule (text form or arguments) is invalid; the message names the bad part."""


# ---- selectors --------------------------------------------------------------------------------

_KIND_SEL = re.compile(r"^(double|single)(?::(.+))?$")
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _blocks(spec: str) -> set[int] | None:
    """``*`` -> None (all), ``0-5,9`` -> {0..5, 9}; raises on anything else."""
    if spec == "*":
        return None
    picked: set[int] = set()
    for part in spec.split(","):
        m = _RANGE.match(part.strip())
        if not m:
            raise CouncilRuleError(f"block range {part!r} is not valid; write N, N-M or *")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise CouncilRuleError(f"block range {part!r} runs backwards; write {hi}-{lo}")
        picked.update(range(lo, hi + 1))
    return picked


def select_layers(layers: Sequence[str], selector: str) -> Tensor:
    """Boolean mask ``[L]`` of the layers a selector picks; a selector that picks none is an error."""
    selector = selector.strip()
    if selector == "all":
        mask = [True] * len(layers)
    elif m := _KIND_SEL.match(selector):
        kind, blocks = m.group(1), _blocks(m.group(2) or "*")
        mask = []
        for name in layers:
            k, n = block_of(name)
            mask.append(k == kind and (blocks is None or n in blocks))
    elif selector in layers:
        mask = [name == selector for name in layers]
    else:
        raise CouncilRuleError(
            f"selector {selector!r} is not valid; write all, double, single, double:0-5, single:*, "
            "or a layer name of this adapter"
        )
    if not any(mask):
        doubles = sorted(n for k, n in map(block_of, layers) if k == "double")
        singles = sorted(n for k, n in map(block_of, layers) if k == "single")
        have = ", ".join(f"{kind} {ns[0]}-{ns[-1]}" for kind, ns in (("double", doubles), ("single", singles)) if ns)
        raise CouncilRuleError(f"selector {selector!r} picks no layer of this adapter (it has {have})")
    return torch.tensor(mask)


# ---- the overrides ----------------------------------------------------------------------------


def _check_experts(council: Council, experts: Sequence[int]) -> None:
    for e in experts:
        if not 0 <= e < council.num_experts:
            raise CouncilRuleError(f"expert {e} does not exist; this adapter has experts 0-{council.num_experts - 1}")


def _where(council: Council, where: str | Tensor) -> Tensor:
    mask = select_layers(council.layers, where) if isinstance(where, str) else where
    return mask.to(council.weights.device)[None, :, None]  # broadcast over instances and experts


def _edit(council: Council, new_weights: Tensor, where: str | Tensor) -> Council:
    weights = torch.where(_where(council, where), new_weights, council.weights)
    return replace(council, weights=weights)


def _fill(weights: Tensor, probs: Tensor, size: Tensor, excluded: Tensor) -> Tensor:
    """Add the best non-member, non-excluded experts by probability until each council has ``size``."""
    free = (weights == 0) & ~excluded
    missing = (size - (weights != 0).sum(-1, keepdim=True)).clamp_min(0)
    rank = torch.where(free, probs, torch.full_like(probs, -1.0)).argsort(-1, descending=True).argsort(-1)
    take_it = free & (rank < missing)
    return torch.where(take_it, probs, weights)


def force(
    council: Council, experts: Mapping[int, float | None] | Sequence[int], where: str | Tensor = "all"
) -> Council:
    """Make ``experts`` members (with their given weight, else the council's mean weight).

    The council keeps its size k (or grows to the number forced); the weakest unforced members
    make room.
    """
    experts = dict(experts) if isinstance(experts, Mapping) else dict.fromkeys(experts)
    _check_experts(council, list(experts))
    w = council.weights.clone()
    members = w != 0
    mean = (w.sum(-1, keepdim=True) / members.sum(-1, keepdim=True).clamp_min(1)).expand_as(w)
    forced = torch.zeros_like(members)
    for e, weight in experts.items():
        forced[..., e] = True
        w[..., e] = mean[..., e] if weight is None else weight
    size = max(council.top_k, len(experts))
    # Drop the weakest unforced members beyond ``size``.
    extra = ((w != 0).sum(-1, keepdim=True) - size).clamp_min(0)
    unforced = (w != 0) & ~forced
    rank = torch.where(unforced, w.abs(), torch.full_like(w, float("inf"))).argsort(-1).argsort(-1)
    w = torch.where(unforced & (rank < extra), torch.zeros_like(w), w)
    return _unban(_edit(council, w, where), forced, where)


def _unban(council: Council, experts: Tensor, where: str | Tensor) -> Council:
    """Forcing an expert lifts an earlier ban on it (on the selected layers)."""
    if council.banned is None:
        return council
    return replace(council, banned=council.banned & ~(experts & _where(council, where)))


def only(council: Council, experts: Mapping[int, float | None] | Sequence[int], where: str | Tensor = "all") -> Council:
    """Make the council exactly ``experts`` (given weights, else the council's mean weight)."""
    experts = dict(experts) if isinstance(experts, Mapping) else dict.fromkeys(experts)
    _check_experts(council, list(experts))
    members = council.weights != 0
    mean = council.weights.sum(-1) / members.sum(-1).clamp_min(1)
    w = torch.zeros_like(council.weights)
    for e, weight in experts.items():
        w[..., e] = mean if weight is None else weight
    return _unban(_edit(council, w, where), w != 0, where)


def ban(council: Council, experts: Sequence[int], where: str | Tensor = "all") -> Council:
    """Remove ``experts``; the best remaining experts by router probability take their places."""
    _check_experts(council, experts)
    mask = _where(council, where)
    now = torch.zeros(council.num_experts, dtype=torch.bool, device=council.weights.device)
    now[list(experts)] = True
    banned = council.banned_mask | (now & mask)
    size = (council.weights != 0).sum(-1, keepdim=True)
    w = _fill(council.weights.masked_fill(banned, 0.0), council.probs, size, banned)
    return replace(council, weights=torch.where(mask, w, council.weights), banned=banned)


def scale(council: Council, factor: float, where: str | Tensor = "all") -> Council:
    """Multiply every council weight by ``factor``."""
    return _edit(council, council.weights * factor, where)


def top(council: Council, k: int, where: str | Tensor = "all") -> Council:
    """Re-pick the ``k`` most probable experts (weights = their probabilities, as routed)."""
    if not 1 <= k <= council.num_experts:
        raise CouncilRuleError(f"top {k} is not possible; choose 1 to {council.num_experts}")
    allowed = council.probs.masked_fill(council.banned_mask, -1.0)
    _, indices = allowed.topk(k, dim=-1)
    values = torch.gather(council.probs, -1, indices).masked_fill(torch.gather(council.banned_mask, -1, indices), 0.0)
    w = torch.zeros_like(council.probs).scatter_(-1, indices, values)
    return _edit(council, w, where)


def blend(a: Council, b: Council, factor: float, where: str | Tensor = "all", k: int | None = None) -> Council:
    """Mix two councils' router probabilities (``(1-f)·a + f·b``), then take the top-k of the mix.

    A single-instance council is broadcast over the other's instances.
    """
    a.check_compatible(b)
    if not 0.0 <= factor <= 1.0:
        raise CouncilRuleError(f"blend factor {factor} must lie between 0 and 1")
    n = max(a.batch_size, b.batch_size)
    a, b = a.expand(n), b.expand(n)
    mixed = replace(a, probs=torch.where(_where(a, where), (1 - factor) * a.probs + factor * b.probs, a.probs))
    return top(mixed, k or a.top_k, where)


def take(a: Council, b: Council, where: str | Tensor = "all") -> Council:
    """``a``, with ``b``'s council (and probabilities) on the selected layers."""
    a.check_compatible(b)
    n = max(a.batch_size, b.batch_size)
    a, b = a.expand(n), b.expand(n)
    mask = _where(a, where)
    return replace(a, probs=torch.where(mask, b.probs, a.probs), weights=torch.where(mask, b.weights, a.weights))


# ---- the text form ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    selector: str
    action: str
    args: tuple
    text: str

    def __call__(self, council: Council) -> Council:
        fn: Callable[..., Council] = {"force": force, "only": only, "ban": ban, "scale": scale, "top": top}[self.action]
        return fn(council, *self.args, where=self.selector)


def _expert_list(text: str, with_weights: bool) -> dict[int, float | None]:
    out: dict[int, float | None] = {}
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?::([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))?", part)
        if not m or (m.group(2) and not with_weights):
            want = "E or E:W (expert number, optional weight)" if with_weights else "an expert number"
            raise CouncilRuleError(f"{part!r} is not {want}")
        out[int(m.group(1))] = float(m.group(2)) if m.group(2) else None
    return out


def _parse_rule(text: str) -> Rule:
    tokens = text.split(None, 2)
    if tokens[0] in ACTIONS:
        tokens = ["all", *text.split(None, 1)]
    if len(tokens) < 2 or tokens[1] not in ACTIONS:
        bad = tokens[1] if len(tokens) > 1 else "(nothing)"
        raise CouncilRuleError(f"unknown action {bad!r}; valid actions: {', '.join(ACTIONS)}")
    selector, action = tokens[0], tokens[1]
    arg = tokens[2].replace(" ", "") if len(tokens) > 2 else ""
    if not arg:
        raise CouncilRuleError(f"'{action}' needs an argument, e.g. '{action} {'1.5' if action == 'scale' else '2'}'")
    if selector != "all" and not _KIND_SEL.match(selector) and "." not in selector:
        raise CouncilRuleError(
            f"selector {selector!r} is not valid; write all, double, single, double:0-5, single:*, or a layer name"
        )
    if m := _KIND_SEL.match(selector):
        _blocks(m.group(2) or "*")  # validate the range now, not at apply time
    if action in ("force", "only"):
        args: tuple = (_expert_list(arg, with_weights=True),)
    elif action == "ban":
        args = (list(_expert_list(arg, with_weights=False)),)
    elif action == "scale":
        try:
            args = (float(arg),)
        except ValueError:
            raise CouncilRuleError(f"scale needs a number, got {arg!r}") from None
    else:
        if not arg.isdigit():
            raise CouncilRuleError(f"top needs a whole number of experts, got {arg!r}")
        args = (int(arg),)
    return Rule(selector, action, args, text)


def parse_rules(text: str) -> list[Rule]:
    """Parse the text form; errors say which rule and which token is wrong, and what is valid."""
    rules = []
    lines = (line.split("#", 1)[0] for line in text.splitlines())  # '#' starts a comment
    parts = [p.strip() for line in lines for p in line.split(";")]
    for i, part in enumerate(p for p in parts if p):
        try:
            rules.append(_parse_rule(part))
        except CouncilRuleError as err:
            raise CouncilRuleError(f"rule {i + 1} ({part!r}): {err}") from None
    return rules


def apply_rules(council: Council, text: str) -> Council:
    """Apply the text form's rules in order; errors name the rule that failed."""
    for i, rule in enumerate(parse_rules(text)):
        try:
            council = rule(council)
        except CouncilRuleError as err:
            raise CouncilRuleError(f"rule {i + 1} ({rule.text!r}): {err}") from None
    return council
