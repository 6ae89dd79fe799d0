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
                       best remaining expert by router probability fills in and takes over its
                       weight, so the layer keeps its strength
    ban 2 routed       the same, but the newcomer keeps its own routed weight (its probability)
    scale 1.5          every council weight times 1.5 (0 switches the layer's experts off)
    top 2              re-pick the top-2 experts by router probability (banned ones excluded)

Example: ``single:0-37 force 1,5; double:* ban 2; all scale 1.5``.

Limits (a rule text comes from a workflow file or a text box, so nothing in it may make parsing
or applying slow or memory-hungry; every limit is named in its error):

* a rule text is at most ``MAX_RULES_CHARS`` (65,536) characters and ``MAX_RULES`` (1,000) rules;
* block numbers are whole numbers from 0 to ``MAX_BLOCK`` (10,000); a range is kept as its two
  ends, never expanded, so ``double:0-10000`` costs what ``double:3`` costs;
* expert numbers are whole numbers below ``MAX_EXPERTS`` (256), and must exist in the council's
  adapter when applied; each expert is listed once per rule;
* council weights are never negative: a forced weight lies in (0, 100] (to remove an expert, ban
  it), a scale factor in [0, 100], and a scaled weight may not exceed 100; a negative effect is
  ``expert_strength`` on the loader nodes and ``attach``;
* ``top K``: K from 1 to the adapter's number of experts;
* numbers are plain decimals (``0.5``, ``1e-2``); ``nan``, ``inf`` and out-of-range values are refused.

The Python functions check their arguments the same way and raise ``CouncilRuleError``.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .checks import real_number
from .council import MAX_EXPERTS, MAX_WEIGHT, Council, CouncilMismatchError, describe_value
from .errors import InstructMoLEError
from .layers import block_of
from .validation import whole_number

__all__ = [
    "MAX_BLOCK",
    "MAX_RULES",
    "MAX_RULES_CHARS",
    "CouncilRuleError",
    "Selector",
    "apply_rules",
    "ban",
    "blend",
    "force",
    "only",
    "parse_rules",
    "parse_selector",
    "scale",
    "select_layers",
    "take",
    "top",
    "with_strength",
]

ACTIONS = ("force", "only", "ban", "scale", "top")
MAX_RULES_CHARS = 65_536
MAX_RULES = 1_000
MAX_BLOCK = 10_000
MAX_FACTOR = 100.0  # the largest scale factor
_MAX_NUMBER_CHARS = 32


class CouncilRuleError(InstructMoLEError):
    """A council rule (text form or arguments) is invalid; the message names the bad part."""


# ---- numbers ----------------------------------------------------------------------------------

_DIGITS = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]{1,4})?")


def _small_int(digits: str) -> int | None:
    """A rule's whole number, or None when it has more than six digits (beyond every bound; and
    ``int`` of thousands of digits is slow, then refused by Python)."""
    return int(digits) if len(digits) <= 6 else None


def _expert_number(council: Council, value: Any) -> int:
    """An expert of ``council``'s adapter, given as a whole number (bools are not)."""
    e = whole_number(value)
    if e is None or not 0 <= e < council.num_experts:
        raise CouncilRuleError(
            f"expert {describe_value(value)} does not exist; this adapter has experts 0-{council.num_experts - 1}"
        )
    return e


def _weight(value: Any, expert: Any) -> float | None:
    """A forced weight: None (the council's mean) or a number in (0, MAX_WEIGHT]."""
    if value is None:
        return None
    w = real_number(value)
    if w is None or not (math.isfinite(w) and 0 < w <= MAX_WEIGHT):
        raise CouncilRuleError(
            f"weight {describe_value(value)} of expert {describe_value(expert)} is not possible; a forced weight is "
            f"a number above 0 and at most {MAX_WEIGHT:g} (to remove an expert, ban it)"
        )
    return w


def _factor(value: Any, what: str, high: float, low: float = 0.0) -> float:
    f = real_number(value)
    if f is None or not (math.isfinite(f) and low <= f <= high):
        raise CouncilRuleError(
            f"{what} {describe_value(value)} is not possible; choose a number from {low:g} to {high:g}"
        )
    return f


def _k(council: Council, value: Any) -> int:
    k = whole_number(value)
    if k is None or not 1 <= k <= council.num_experts:
        raise CouncilRuleError(f"top {describe_value(value)} is not possible; choose 1 to {council.num_experts}")
    return k


# ---- selectors --------------------------------------------------------------------------------

_KIND_SEL = re.compile(r"(double|single)(?::(.+))?")
_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?")


@dataclass(frozen=True)
class Selector:
    """Which layers an override acts on, parsed once: a block kind with block ranges, a name, or all.

    Ranges stay ``(lo, hi)`` pairs (merged, sorted), so a huge range costs no memory.
    """

    kind: str  # "all", "double", "single" or "name"
    ranges: tuple[tuple[int, int], ...] | None = None  # for a kind: inclusive block ranges; None = every block
    name: str = ""  # for "name": the canonical layer name
    text: str = ""  # as written
    _starts: tuple[int, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("all", "double", "single", "name"):
            raise CouncilRuleError(f"selector kind {describe_value(self.kind)} is not all, double, single or name")
        if self.ranges is not None:  # sorted and merged, whoever built it: ``picks`` bisects them
            object.__setattr__(self, "ranges", _merged(self.ranges))
            object.__setattr__(self, "_starts", tuple(lo for lo, _ in self.ranges))

    def picks(self, layer: str) -> bool:
        if self.kind == "all":
            return True
        if self.kind == "name":
            return layer == self.name
        kind, n = block_of(layer)
        if kind != self.kind:
            return False
        if self.ranges is None:
            return True
        i = bisect.bisect_right(self._starts, n) - 1
        return i >= 0 and n <= self.ranges[i][1]

    def mask(self, layers: Sequence[str]) -> Tensor:
        """Boolean mask ``[L]`` of the layers this selector picks; picking none is an error."""
        try:
            mask = [self.picks(name) for name in layers]
        except ValueError:  # a hand-built council with a name outside the Flux blocks
            raise CouncilRuleError(
                f"selector {describe_value(self.text)} needs Flux layer names, and this council has others"
            ) from None
        if layers and not any(mask):
            raise CouncilRuleError(
                f"selector {describe_value(self.text)} picks no layer of this adapter (it has {_have(layers)})"
            )
        return torch.tensor(mask, dtype=torch.bool)


def _have(layers: Sequence[str]) -> str:
    """``double 0-18, single 0-37``: the blocks an adapter's layers live in."""
    blocks: dict[str, list[int]] = {"double": [], "single": []}
    for name in layers:
        try:
            kind, n = block_of(name)
        except ValueError:
            continue
        blocks[kind].append(n)
    return ", ".join(f"{kind} {min(ns)}-{max(ns)}" for kind, ns in blocks.items() if ns) or "no Flux block"


def _block(text: str, part: str) -> int:
    n = _small_int(text)
    if n is None or n > MAX_BLOCK:
        raise CouncilRuleError(
            f"block range {describe_value(part)} is not valid; block numbers are whole numbers from 0 to {MAX_BLOCK}"
        )
    return n


def _ranges(spec: str) -> tuple[tuple[int, int], ...] | None:
    """``*`` -> None (all), ``0-5,9`` -> ((0, 5), (9, 9)); merged, sorted, never expanded."""
    if spec == "*":
        return None
    picked: list[tuple[int, int]] = []
    for part in spec.split(","):
        m = _RANGE.fullmatch(part.strip())
        if not m:
            raise CouncilRuleError(f"block range {describe_value(part)} is not valid; write N, N-M or *")
        lo = _block(m.group(1), part)
        hi = _block(m.group(2), part) if m.group(2) else lo
        if hi < lo:
            raise CouncilRuleError(f"block range {describe_value(part)} runs backwards; write {hi}-{lo}")
        picked.append((lo, hi))
    return _merged(picked)


def _merged(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Inclusive ranges sorted, with overlapping and adjacent ones joined."""
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return tuple(merged)


_SELECTOR_HELP = "write all, double, single, double:0-5, single:*, or a layer name of this adapter"


def parse_selector(text: str) -> Selector:
    """The selector a text names; raises ``CouncilRuleError`` on anything else."""
    if not isinstance(text, str):
        raise CouncilRuleError(f"a layer selector must be text, got {describe_value(text)}")
    if len(text) > MAX_RULES_CHARS:
        raise CouncilRuleError(
            f"layer selector is {len(text)} characters long; the limit is {MAX_RULES_CHARS} characters"
        )
    text = text.strip()
    if text == "all":
        return Selector("all", text=text)
    if m := _KIND_SEL.fullmatch(text):
        return Selector(m.group(1), _ranges(m.group(2) or "*"), text=text)
    if "." in text:
        try:
            block_of(text)
        except ValueError:
            pass
        else:
            if text.isprintable() and not any(c.isspace() for c in text):
                return Selector("name", name=text, text=text)
    raise CouncilRuleError(f"selector {describe_value(text)} is not valid; {_SELECTOR_HELP}")


def select_layers(layers: Sequence[str], selector: str) -> Tensor:
    """Boolean mask ``[L]`` of the layers a selector picks; a selector that picks none is an error."""
    return parse_selector(selector).mask(layers)


# ---- the overrides ----------------------------------------------------------------------------


def _council(value: Any, what: str = "council") -> Council:
    if not isinstance(value, Council):
        raise CouncilMismatchError(f"{what} must be a Council (from routing), got {describe_value(value)}")
    return value


def _expert_weights(
    council: Council, experts: Mapping[int, float | None] | Iterable[int], with_weights: bool = True
) -> dict[int, float | None]:
    """``experts`` as ``{expert: weight or None}``, each checked; none listed twice, at least one."""
    if isinstance(experts, Mapping):
        if not with_weights:
            raise CouncilRuleError("ban takes a list of experts, not weights")
        items = list(itertools.islice(experts.items(), MAX_EXPERTS + 1))
    elif isinstance(experts, Tensor) and experts.ndim == 1:
        items = [(e, None) for e in experts[: MAX_EXPERTS + 1].tolist()]
    elif isinstance(experts, (str, bytes, Tensor)) or not isinstance(experts, Iterable):
        raise CouncilRuleError(f"experts must be a list of expert numbers, got {describe_value(experts)}")
    else:  # at most one more than any adapter has: an endless iterator must not hang
        items = [(e, None) for e in itertools.islice(experts, MAX_EXPERTS + 1)]
    if not items:
        raise CouncilRuleError("no expert given; name at least one")
    if len(items) > MAX_EXPERTS:
        raise CouncilRuleError(f"more than {MAX_EXPERTS} experts given; an adapter has at most {MAX_EXPERTS}")
    out: dict[int, float | None] = {}
    for e, weight in items:
        number = _expert_number(council, e)
        if number in out:
            raise CouncilRuleError(f"expert {number} is listed twice; list each expert once")
        out[number] = _weight(weight, e)
    return out


def _where(council: Council, where: str | Selector | Tensor) -> Tensor:
    """The selected layers as a mask ``[1, L, 1]`` (broadcast over instances and experts)."""
    if isinstance(where, str):
        where = parse_selector(where)
    if isinstance(where, Selector):
        mask = where.mask(council.layers)
    elif isinstance(where, Tensor) and where.dtype == torch.bool and where.shape == (len(council.layers),):
        mask = where
    elif (
        isinstance(where, (list, tuple))
        and len(where) == len(council.layers)
        and all(isinstance(x, bool) for x in where)
    ):
        mask = torch.tensor(where, dtype=torch.bool)
    else:
        raise CouncilRuleError(
            f"where must be a layer selector (text) or a bool mask of {len(council.layers)} layers, "
            f"got {describe_value(where)}"
        )
    return mask.to(council.weights.device)[None, :, None]


def _edit(council: Council, new_weights: Tensor, mask: Tensor) -> Council:
    return replace(council, weights=torch.where(mask, new_weights, council.weights))


def _fill(weights: Tensor, probs: Tensor, size: Tensor, excluded: Tensor) -> Tensor:
    """Add the best non-member, non-excluded experts by probability until each council has ``size``."""
    free = (weights == 0) & ~excluded
    missing = (size - (weights != 0).sum(-1, keepdim=True)).clamp_min(0)
    rank = torch.where(free, probs, torch.full_like(probs, -1.0)).argsort(-1, descending=True).argsort(-1)
    take_it = free & (rank < missing)
    return torch.where(take_it, probs, weights)


def _mean_weight(council: Council, experts: dict[int, float | None], mask: Tensor) -> Tensor:
    """Each council's mean member weight ``[b, L, 1]``; refused where it is needed but the council is empty."""
    members = council.weights != 0
    count = members.sum(-1, keepdim=True)
    if any(w is None for w in experts.values()):
        empty = (count == 0) & mask
        if bool(empty.any()):
            b, row, _ = (int(i) for i in empty.nonzero()[0])
            e = next(e for e, w in experts.items() if w is None)
            raise CouncilRuleError(
                f"expert {e} has no mean weight to take on {council.layers[row]} (instance {b}): that council is "
                f"empty; give a weight, e.g. {e}:0.5"
            )
    return council.weights.sum(-1, keepdim=True) / count.clamp_min(1)


def force(
    council: Council, experts: Mapping[int, float | None] | Sequence[int], where: str | Tensor = "all"
) -> Council:
    """Make ``experts`` members (with their given weight, else the council's mean weight).

    The council keeps its size k (or grows to the number forced); the weakest unforced members
    make room.
    """
    council = _council(council)
    experts = _expert_weights(council, experts)
    mask = _where(council, where)
    w = council.weights.clone()
    mean = _mean_weight(council, experts, mask).expand_as(w)
    forced = torch.zeros_like(w, dtype=torch.bool)
    for e, weight in experts.items():
        forced[..., e] = True
        w[..., e] = mean[..., e] if weight is None else weight
    size = max(council.top_k, len(experts))
    # Drop the weakest unforced members beyond ``size``.
    extra = ((w != 0).sum(-1, keepdim=True) - size).clamp_min(0)
    unforced = (w != 0) & ~forced
    rank = torch.where(unforced, w.abs(), torch.full_like(w, float("inf"))).argsort(-1).argsort(-1)
    w = torch.where(unforced & (rank < extra), torch.zeros_like(w), w)
    return _unban(_edit(council, w, mask), forced, mask)


def _unban(council: Council, experts: Tensor, mask: Tensor) -> Council:
    """Forcing an expert lifts an earlier ban on it (on the selected layers)."""
    if council.banned is None:
        return council
    return replace(council, banned=council.banned & ~(experts & mask))


def only(council: Council, experts: Mapping[int, float | None] | Sequence[int], where: str | Tensor = "all") -> Council:
    """Make the council exactly ``experts`` (given weights, else the council's mean weight)."""
    council = _council(council)
    experts = _expert_weights(council, experts)
    mask = _where(council, where)
    mean = _mean_weight(council, experts, mask)[..., 0]
    w = torch.zeros_like(council.weights)
    for e, weight in experts.items():
        w[..., e] = mean if weight is None else weight
    return _unban(_edit(council, w, mask), w != 0, mask)


def ban(council: Council, experts: Sequence[int], where: str | Tensor = "all", inherit: bool = True) -> Council:
    """Remove ``experts``; the best remaining experts by router probability take their places.

    ``inherit=True`` (the rule ``ban 2``): each newcomer takes over the weight of an expert it
    replaces (the heaviest banned weight goes to the most probable newcomer), so the layer keeps
    its strength: banning a dominant expert (weight 0.98) hands 0.98 on, instead of leaving the
    layer with a newcomer's own tiny probability. ``inherit=False`` (``ban 2 routed``): newcomers
    keep the weight the router gave them, their probability.
    """
    council = _council(council)
    experts = _expert_weights(council, experts, with_weights=False)
    if not isinstance(inherit, bool):
        raise CouncilRuleError(f"inherit must be True or False, got {describe_value(inherit)}")
    mask = _where(council, where)
    now = torch.zeros(council.num_experts, dtype=torch.bool, device=council.weights.device)
    now[list(experts)] = True
    banned = council.banned_mask | (now & mask)
    size = (council.weights != 0).sum(-1, keepdim=True)
    kept = council.weights.masked_fill(banned, 0.0)
    w = _fill(kept, council.probs, size, banned)
    if inherit:
        newcomers = (w != 0) & (kept == 0)
        removed = (council.weights - kept).sort(-1, descending=True).values  # banned members' weights first
        order = torch.where(newcomers, council.probs, torch.full_like(council.probs, -1.0))
        rank = order.argsort(-1, descending=True).argsort(-1)  # newcomers first, most probable first
        w = torch.where(newcomers, torch.gather(removed, -1, rank), w)
    return replace(council, weights=torch.where(mask, w, council.weights), banned=banned)


def scale(council: Council, factor: float, where: str | Tensor = "all") -> Council:
    """Multiply every council weight by ``factor`` (0 to 100; 0 switches the experts off).

    Refused where a weight would exceed ``MAX_WEIGHT``: such a council could not be shared as JSON.
    """
    council = _council(council)
    factor = _factor(factor, "scale factor", MAX_FACTOR)
    mask = _where(council, where)
    scaled = council.weights * factor
    if factor > 1 and bool((torch.where(mask, scaled, 0.0) > MAX_WEIGHT).any()):
        heaviest = float(torch.where(mask, council.weights, 0.0).max())
        raise CouncilRuleError(
            f"scale factor {factor:g} would lift a council weight above {MAX_WEIGHT:g} (the selected layers have "
            f"weights up to {heaviest:g}); choose a smaller factor"
        )
    return _edit(council, scaled, mask)


def with_strength(council: Council, strength: float) -> Council:
    """Every council weight times an adapter's ``expert_strength`` (may be negative: that inverts the
    experts' effect), for the merged paths that fold a council into the weights.

    Not an override: the council it returns is meant for folding, not for sharing or editing.
    """
    council = _council(council)
    s = _factor(strength, "expert_strength", MAX_FACTOR, low=-MAX_FACTOR)
    return replace(council, weights=council.weights * s)


def top(council: Council, k: int, where: str | Tensor = "all") -> Council:
    """Re-pick the ``k`` most probable experts (weights = their probabilities, as routed)."""
    council = _council(council)
    k = _k(council, k)
    mask = _where(council, where)
    allowed = council.probs.masked_fill(council.banned_mask, -1.0)
    _, indices = allowed.topk(k, dim=-1)
    values = torch.gather(council.probs, -1, indices).masked_fill(torch.gather(council.banned_mask, -1, indices), 0.0)
    w = torch.zeros_like(council.probs).scatter_(-1, indices, values)
    return _edit(council, w, mask)


def blend(a: Council, b: Council, factor: float, where: str | Tensor = "all", k: int | None = None) -> Council:
    """Mix two councils' router probabilities (``(1-f)·a + f·b``), then take the top-k of the mix.

    A single-instance council is broadcast over the other's instances.
    """
    a, b = _council(a, "council a"), _council(b, "council b")
    a.check_compatible(b)
    factor = _factor(factor, "blend factor", 1.0)
    k = a.top_k if k is None else _k(a, k)
    n = max(a.batch_size, b.batch_size)
    a, b = a.expand(n), b.expand(n)
    mask = _where(a, where)
    mixed = replace(a, probs=torch.where(mask, (1 - factor) * a.probs + factor * b.probs, a.probs))
    return top(mixed, k, mask[0, :, 0])


def take(a: Council, b: Council, where: str | Tensor = "all") -> Council:
    """``a``, with ``b``'s council (its probabilities, weights and bans) on the selected layers."""
    a, b = _council(a, "council a"), _council(b, "council b")
    a.check_compatible(b)
    n = max(a.batch_size, b.batch_size)
    a, b = a.expand(n), b.expand(n)
    mask = _where(a, where)
    banned = None
    if a.banned is not None or b.banned is not None:
        banned = torch.where(mask, b.banned_mask, a.banned_mask)
    return replace(
        a,
        probs=torch.where(mask, b.probs, a.probs),
        weights=torch.where(mask, b.weights, a.weights),
        banned=banned,
    )


# ---- the text form ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    selector: str
    action: str
    args: tuple
    text: str
    target: Selector | None = field(default=None, compare=False)  # the parsed selector
    options: tuple[tuple[str, Any], ...] = ()  # keyword options, e.g. (("inherit", False),) for 'ban 2 routed'

    def __post_init__(self) -> None:
        if self.target is None:
            object.__setattr__(self, "target", parse_selector(self.selector))

    def __call__(self, council: Council) -> Council:
        fn: Callable[..., Council] = {"force": force, "only": only, "ban": ban, "scale": scale, "top": top}[self.action]
        return fn(council, *self.args, where=self.target, **dict(self.options))


def _quote(text: str, limit: int = 60) -> str:
    """A rule as quoted in an error: ``repr`` (no newline can reach the one-line message), shortened."""
    return describe_value(text, limit)


def _shown_int(digits: str) -> str:
    """A rule's whole number for a message: as written, or its first digits when it is very long."""
    return digits if len(digits) <= 12 else digits[:12] + "…"


def _expert_list(text: str, with_weights: bool) -> dict[int, float | None]:
    out: dict[int, float | None] = {}
    want = (
        f"E or E:W (expert number, optional weight above 0 and at most {MAX_WEIGHT:g})"
        if with_weights
        else "an expert number"
    )
    for part in text.split(","):
        part = part.strip()
        number, sep, weight = part.partition(":")
        if not _DIGITS.fullmatch(number) or (sep and not with_weights):
            raise CouncilRuleError(f"{_quote(part)} is not {want}")
        e = _small_int(number)
        if e is None or e >= MAX_EXPERTS:
            raise CouncilRuleError(
                f"expert {_shown_int(number)} does not exist; experts are numbered 0 to {MAX_EXPERTS - 1} at most"
            )
        if e in out:
            raise CouncilRuleError(f"expert {e} is listed twice; list each expert once")
        if sep and (len(weight) > _MAX_NUMBER_CHARS or not _DECIMAL.fullmatch(weight)):
            raise CouncilRuleError(f"{_quote(part)} is not {want}")
        out[e] = _weight(float(weight), e) if sep else None
    return out


def _parse_rule(text: str) -> Rule:
    tokens = text.split(None, 2)
    if tokens[0] in ACTIONS:
        tokens = ["all", *text.split(None, 1)]
    if len(tokens) < 2 or tokens[1] not in ACTIONS:
        bad = _quote(tokens[1], 20) if len(tokens) > 1 else "(nothing)"
        raise CouncilRuleError(f"unknown action {bad}; valid actions: {', '.join(ACTIONS)}")
    selector, action = tokens[0], tokens[1]
    arg = "".join(tokens[2].split()) if len(tokens) > 2 else ""
    if not arg:
        raise CouncilRuleError(f"'{action}' needs an argument, e.g. '{action} {'1.5' if action == 'scale' else '2'}'")
    target = parse_selector(selector)
    options: tuple[tuple[str, Any], ...] = ()
    if action in ("force", "only"):
        args: tuple = (_expert_list(arg, with_weights=True),)
    elif action == "ban":
        words = tokens[2].split()
        routed = len(words) > 1 and words[-1] == "routed"
        experts = "".join(words[:-1]) if routed else arg
        args = (list(_expert_list(experts, with_weights=False)),)
        options = (("inherit", False),) if routed else ()
    elif action == "scale":
        if len(arg) > _MAX_NUMBER_CHARS or not _DECIMAL.fullmatch(arg):
            raise CouncilRuleError(f"scale needs a number, got {_quote(arg, 20)}; choose one from 0 to {MAX_FACTOR:g}")
        args = (_factor(float(arg), "scale factor", MAX_FACTOR),)
    else:
        if not _DIGITS.fullmatch(arg):
            raise CouncilRuleError(f"top needs a whole number of experts, got {_quote(arg, 20)}")
        k = _small_int(arg)
        if k is None or not 1 <= k <= MAX_EXPERTS:
            raise CouncilRuleError(
                f"top {_shown_int(arg)} is not possible; choose 1 to the adapter's number of experts (at most "
                f"{MAX_EXPERTS})"
            )
        args = (k,)
    return Rule(selector, action, args, text, target, options)


def parse_rules(text: str) -> list[Rule]:
    """Parse the text form; errors say which rule and which token is wrong, and what is valid."""
    if not isinstance(text, str):
        raise CouncilRuleError(f"rules must be text, got {describe_value(text)}")
    if len(text) > MAX_RULES_CHARS:
        raise CouncilRuleError(
            f"the rules text is {len(text)} characters long; the limit is {MAX_RULES_CHARS} characters"
        )
    rules = []
    lines = (line.split("#", 1)[0] for line in text.splitlines())  # '#' starts a comment
    parts = (p.strip() for line in lines for p in line.split(";"))
    for i, part in enumerate(p for p in parts if p):
        if i >= MAX_RULES:
            raise CouncilRuleError(f"the rules text holds more than {MAX_RULES} rules; the limit is {MAX_RULES}")
        try:
            rules.append(_parse_rule(part))
        except CouncilRuleError as err:
            raise CouncilRuleError(f"rule {i + 1} ({_quote(part)}): {err}") from None
    return rules


def apply_rules(council: Council, text: str) -> Council:
    """Apply the text form's rules in order; errors name the rule that failed."""
    council = _council(council)
    for i, rule in enumerate(parse_rules(text)):
        try:
            council = rule(council)
        except CouncilRuleError as err:
            raise CouncilRuleError(f"rule {i + 1} ({_quote(rule.text)}): {err}") from None
    return council
