"""Adapter cards: what a LoRA manager shows of a file, in the file itself, plus a preview and a hash beside it.

A *card* is a handful of ``__metadata__`` entries of an adapter's ``.safetensors`` file. The keys
that the ecosystem already reads follow the Stability AI model spec (``modelspec.*``, as kohya's
sd-scripts and ComfyUI write them), so LoRA managers and metadata viewers show a title, a base
model, a date, a description, tags and a hash without knowing InstructMoLE; what the spec has no
key for is ours, ``instructmole.*``, with JSON values:

=================================  ========================================================================
``modelspec.sai_model_spec``       ``1.0.0`` (the spec version ComfyUI writes)
``modelspec.architecture``         ``flux-1-kontext-dev/instructmole``: the base, then the adapter kind
``modelspec.implementation``       ``instructmole``: the code that can run it
``modelspec.title``                the run's adapter name and step
``modelspec.description``          one paragraph: experts, steps, rows, tasks, how to load it
``modelspec.date``                 ISO-8601, UTC
``modelspec.resolution``           the training pixel budget, ``WxH``
``modelspec.tags``                 the task names, comma separated
``modelspec.usage_hint``           example instructions, and the node that loads it
``modelspec.hash_sha256``          ``0x`` + sha256 of the tensor bytes (see ``seal``)
``instructmole.card``              the card's version (``"1"``); its presence is what makes a card
``instructmole.step``              the optimizer step the weights are from
``instructmole.base_model``        ``{"family", "source", "fingerprint"}``
``instructmole.tasks``             ``[{"task", "rows", "examples": [...]}]`` from the training manifest
``instructmole.data``              ``{"rows", "holdout", "fingerprint"}``
``instructmole.settings``          the training settings (adapter, train, data, dtypes), no local paths
=================================  ========================================================================

Why not ``/lora`` in the architecture, as kohya writes for Flux LoRAs: the spec asks for a
different architecture wherever inference differs, and a manager that took this file for a plain
LoRA would hand it to a LoRA loader, which applies at most its plain-LoRA part and silently drops
the routed experts. Why no ``modelspec.trigger_phrase``: nothing here is a phrase the adapter needs
in every prompt (managers paste it into the prompt); the instruction *is* the edit, so example
instructions go to ``usage_hint`` and the card's task list instead.

Beside ``<name>.safetensors`` the trainer puts ``<name>.preview.png`` (the sample sheet of that
checkpoint; the name A1111, civitai helpers and ComfyUI-Lora-Manager look for) and
``<name>.sha256`` (``sha256sum`` format: ``<hex>  <name>.safetensors``), the hash of the finished
file that civitai and the managers compare. ``seal`` writes both after the file is complete.

Reading never fails an adapter: a file without ``instructmole.card`` (every file made before cards,
ICEdit files, converted checkpoints) reads as "no card" (``read_card`` returns ``None``), and a card
whose JSON was damaged by hand reads with that part empty and a note in ``Card.problems``. Nothing
here is needed to load or run an adapter. Pure Python and safetensors: no ComfyUI, no diffusers.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .adapter import FORMAT
from .errors import InstructMoLEError
from .files import atomic_path
from .formats import read_metadata

__all__ = [
    "CARD_VERSION",
    "HASH_SUFFIX",
    "PREVIEW_SUFFIX",
    "Card",
    "CardError",
    "TaskSummary",
    "architecture",
    "build_card",
    "copy_sealed",
    "file_sha256",
    "hash_path",
    "is_adapter_metadata",
    "preview_path",
    "read_card",
    "read_card_metadata",
    "recorded_sha256",
    "render_card",
    "seal",
    "summarize_tasks",
    "summary_lines",
    "tensor_sha256",
    "verify",
]

SPEC_VERSION = "1.0.0"
CARD_VERSION = "1"
IMPLEMENTATION = "instructmole"
PREVIEW_SUFFIX = ".preview.png"
HASH_SUFFIX = ".sha256"

MS = "modelspec."
KEY_CARD = "instructmole.card"
KEY_STEP = "instructmole.step"
KEY_BASE = "instructmole.base_model"
KEY_TASKS = "instructmole.tasks"
KEY_DATA = "instructmole.data"
KEY_SETTINGS = "instructmole.settings"
KEY_HASH = f"{MS}hash_sha256"

MAX_TASKS = 64  # listed on the card; the count says how many more there were
MAX_EXAMPLES = 3  # example instructions per task
MAX_TEXT = 200  # characters of one instruction or name on the card
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
_CHUNK = 8 << 20


class CardError(InstructMoLEError):
    """A file cannot be sealed or checked: not a safetensors file, or the disk refused."""


@dataclass(frozen=True)
class TaskSummary:
    """One task of the training manifest: its name ("" for rows without one), its training rows and
    up to ``MAX_EXAMPLES`` distinct instructions, in manifest order."""

    name: str
    rows: int
    examples: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.name, "rows": self.rows, "examples": list(self.examples)}


def summarize_tasks(rows: Iterable[tuple[str | None, str]]) -> list[TaskSummary]:
    """``(task, instruction)`` per training row -> one ``TaskSummary`` per task, in order of first
    appearance. Why here and not in the trainer: the card's size limits (tasks, examples, text
    length) belong to the card, so every writer of cards applies the same ones."""
    counts: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for task, instruction in rows:
        name = _clip(task or "")
        counts[name] = counts.get(name, 0) + 1
        seen = examples.setdefault(name, [])
        text = _clip(" ".join(str(instruction).split()))
        if len(seen) < MAX_EXAMPLES and text and text not in seen:
            seen.append(text)
    return [TaskSummary(name, n, tuple(examples[name])) for name, n in counts.items()]


def _clip(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def architecture(family: str) -> str:
    """``flux.1-kontext-dev`` -> ``flux-1-kontext-dev/instructmole`` (kohya's ``<base>/<adapter>`` form)."""
    return f"{family.replace('.', '-').replace(' ', '-').lower()}/{IMPLEMENTATION}"


@dataclass(frozen=True)
class Card:
    """An adapter's card, as written to and read from its metadata (see the module doc)."""

    title: str
    base_model: dict[str, str]
    step: int
    tasks: tuple[TaskSummary, ...] = ()
    data: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    date: str = ""
    architecture: str = ""
    description: str = ""
    resolution: str = ""
    usage_hint: str = ""
    hash_sha256: str | None = None
    version: str = CARD_VERSION
    problems: tuple[str, ...] = ()  # parts of a read card that could not be understood

    @property
    def task_count(self) -> int:
        """How many tasks the data had (the card lists at most ``MAX_TASKS``)."""
        return int(self.data.get("tasks", len(self.tasks)) or 0)

    def to_metadata(self) -> dict[str, str]:
        """The metadata entries (strings only, as safetensors stores them)."""
        meta = {
            f"{MS}sai_model_spec": SPEC_VERSION,
            f"{MS}architecture": self.architecture,
            f"{MS}implementation": IMPLEMENTATION,
            f"{MS}title": self.title,
            f"{MS}description": self.description,
            f"{MS}date": self.date,
            f"{MS}resolution": self.resolution,
            f"{MS}tags": ", ".join(t.name for t in self.tasks if t.name),
            f"{MS}usage_hint": self.usage_hint,
            KEY_CARD: self.version,
            KEY_STEP: str(self.step),
            KEY_BASE: json.dumps(self.base_model, ensure_ascii=False),
            KEY_TASKS: json.dumps([t.to_dict() for t in self.tasks], ensure_ascii=False),
            KEY_DATA: json.dumps(self.data, ensure_ascii=False),
            KEY_SETTINGS: json.dumps(self.settings, ensure_ascii=False, sort_keys=True),
        }
        if self.hash_sha256:
            meta[KEY_HASH] = self.hash_sha256
        return {k: v for k, v in meta.items() if v != ""}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (``info --json``, the ComfyUI route)."""
        return {
            "version": self.version,
            "title": self.title,
            "architecture": self.architecture,
            "date": self.date,
            "step": self.step,
            "base_model": dict(self.base_model),
            "resolution": self.resolution,
            "description": self.description,
            "usage_hint": self.usage_hint,
            "tasks": [t.to_dict() for t in self.tasks],
            "data": dict(self.data),
            "settings": self.settings,
            "hash_sha256": self.hash_sha256,
            "problems": list(self.problems),
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> Card | None:
        """The card in ``meta``, or ``None`` when it has none. Never raises: a part that does not
        parse is left empty and named in ``problems`` (a card is information, not a requirement)."""
        if KEY_CARD not in meta:
            return None
        problems: list[str] = []

        def text(key: str) -> str:
            value = meta.get(key, "")
            return value if isinstance(value, str) else ""

        def parsed(key: str, kind: type) -> Any:
            raw = meta.get(key)
            if raw is None:
                return kind()
            try:
                value = json.loads(raw)
            except (TypeError, ValueError, RecursionError):
                value = None
            if not isinstance(value, kind):
                problems.append(f"{key} is not a JSON {kind.__name__}")
                return kind()
            return value

        try:
            step = int(text(KEY_STEP))
        except ValueError:
            problems.append(f"{KEY_STEP} is not a whole number")
            step = 0
        base = {str(k): str(v) for k, v in parsed(KEY_BASE, dict).items()}
        tasks = []
        for item in parsed(KEY_TASKS, list):
            try:
                examples = item.get("examples") or []
                tasks.append(
                    TaskSummary(
                        _clip(str(item.get("task") or "")),
                        int(item.get("rows", 0)),
                        tuple(_clip(str(e)) for e in examples[:MAX_EXAMPLES] if isinstance(examples, list)),
                    )
                )
            except (AttributeError, TypeError, ValueError):
                problems.append(f"{KEY_TASKS} holds an entry that is not a task")
                break
        hash_value = text(KEY_HASH) or None
        return cls(
            title=text(f"{MS}title"),
            base_model=base,
            step=step,
            tasks=tuple(tasks),
            data=parsed(KEY_DATA, dict),
            settings=parsed(KEY_SETTINGS, dict),
            date=text(f"{MS}date"),
            architecture=text(f"{MS}architecture"),
            description=text(f"{MS}description"),
            resolution=text(f"{MS}resolution"),
            usage_hint=text(f"{MS}usage_hint"),
            hash_sha256=hash_value,
            version=text(KEY_CARD),
            problems=tuple(problems),
        )


def build_card(
    *,
    title: str,
    family: str,
    step: int,
    tasks: Iterable[TaskSummary] = (),
    source: str | None = None,
    fingerprint: str | None = None,
    settings: Mapping[str, Any] | None = None,
    rows: int | None = None,
    holdout: int | None = None,
    data_fingerprint: str | None = None,
    resolution: int | None = None,
    date: _dt.datetime | None = None,
) -> Card:
    """A card for an adapter of model family ``family`` (``MoLEConfig.base_model``) at ``step``.

    ``source``: the base model's folder or file *name* (never a full path: a shared file must not
    carry its maker's folders); ``fingerprint``: a content fingerprint of the base weights;
    ``settings``: the training settings as plain JSON (the adapter's own N, k and rank are read from
    its ``adapter`` section for the description)."""
    tasks = list(tasks)
    settings = dict(settings or {})
    base = {"family": family}
    if source:
        base["source"] = _clip(Path(source).name or str(source))
    if fingerprint:
        base["fingerprint"] = fingerprint
    data: dict[str, Any] = {"tasks": len(tasks)}
    if rows is not None:
        data["rows"] = rows
    if holdout is not None:
        data["holdout"] = holdout
    if data_fingerprint:
        data["fingerprint"] = data_fingerprint
    when = (date or _dt.datetime.now(_dt.timezone.utc)).astimezone(_dt.timezone.utc)
    listed = tasks[:MAX_TASKS]
    return Card(
        title=_clip(title),
        base_model=base,
        step=int(step),
        tasks=tuple(listed),
        data=data,
        settings=settings,
        date=when.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        architecture=architecture(family),
        description=_description(family, step, tasks, settings, rows),
        resolution=f"{resolution}x{resolution}" if resolution else "",
        usage_hint=_usage_hint(listed),
    )


def _description(family: str, step: int, tasks: list[TaskSummary], settings: dict[str, Any], rows: int | None) -> str:
    adapter = settings.get("adapter") if isinstance(settings.get("adapter"), dict) else {}
    n, k, r = adapter.get("num_experts"), adapter.get("top_k"), adapter.get("rank")
    experts = (
        f"{n} LoRA experts of rank {r}, {k} chosen per layer by an instruction router" if n else "routed LoRA experts"
    )
    named = [t.name for t in tasks if t.name]
    shown = ", ".join(named[:12]) + (f" and {len(named) - 12} more" if len(named) > 12 else "")
    trained = f"Trained for {step} steps" + (f" on {rows} edit pairs" if rows is not None else "")
    if named:
        trained += f" in {len(tasks)} tasks ({shown})"
    return (
        f"InstructMoLE adapter for {family}: {experts}. {trained}. Load it with the InstructMoLE nodes "
        "(InstructMoLE Load Adapter) or `instructmole.load_adapter`; a plain LoRA loader cannot apply its routed "
        "experts."
    )


def _usage_hint(tasks: list[TaskSummary]) -> str:
    examples = [t.examples[0] for t in tasks if t.examples][:4]
    said = "; ".join(f"'{e}'" for e in examples)
    return "Write the edit as an instruction" + (f", as in training: {said}" if said else "") + "."


# ---- reading --------------------------------------------------------------------------------------


def read_card_metadata(path: str | os.PathLike) -> tuple[dict[str, str], Card | None]:
    """The file's metadata and its card (``None``: no card). Reads the header only, so a card of a
    multi-GB file reads in milliseconds; a missing or unreadable file is ``formats``' one-sentence
    ``AdapterError``."""
    meta = read_metadata(path)
    return meta, Card.from_metadata(meta)


def read_card(path: str | os.PathLike) -> Card | None:
    """The card of an adapter file, or ``None`` when it has none (files made before cards)."""
    return read_card_metadata(path)[1]


def is_adapter_metadata(meta: Mapping[str, str]) -> bool:
    """Whether metadata says "InstructMoLE adapter" (ICEdit files are told by their keys instead)."""
    return meta.get("format") == FORMAT


# ---- rendering ------------------------------------------------------------------------------------


def _flat(settings: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key in sorted(settings):
        value = settings[key]
        if isinstance(value, dict):
            out += _flat(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _show_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show_value(v) for v in value) + "]"
    return str(value)


def summary_lines(card: Card) -> list[str]:
    """The few lines a node shows under its preview: title, base, step and data, tasks."""
    base = card.base_model.get("family", "?")
    if card.base_model.get("source"):
        base += f" ({card.base_model['source']})"
    lines = [card.title or "(untitled)", f"base {base}", f"step {card.step}" + (f", {card.date}" if card.date else "")]
    rows = card.data.get("rows")
    if rows is not None:
        lines.append(f"{rows} training rows, {card.task_count} task{'s' if card.task_count != 1 else ''}")
    for task in card.tasks[:6]:
        example = f": '{task.examples[0]}'" if task.examples else ""
        lines.append(f"  {task.name or '(no task)'} ({task.rows}){example}")
    if len(card.tasks) > 6:
        lines.append(f"  ... {card.task_count - 6} more tasks")
    return lines


def render_card(card: Card | None, width: int = 100) -> str:
    """The card as aligned text (``python -m instructmole info``, the loader node's card box).

    ``None`` renders as one line saying the file has no card, which is not an error: files made
    before cards, ICEdit files and converted checkpoints have none."""
    if card is None:
        return "card         none (made before adapter cards, or not by the InstructMoLE trainer)"
    lines: list[str] = []

    def row(label: str, value: str) -> None:
        body = textwrap.wrap(value, width - 13, break_long_words=True, break_on_hyphens=False) or [""]
        lines.append(f"{label:<12} {body[0]}")
        lines.extend(f"{'':<12} {more}" for more in body[1:])

    row("title", card.title or "(untitled)")
    base = card.base_model.get("family", "?")
    details = [card.base_model[k] for k in ("source",) if card.base_model.get(k)]
    if card.base_model.get("fingerprint"):
        details.append(f"fingerprint {card.base_model['fingerprint']}")
    row("base model", base + (f" ({', '.join(details)})" if details else ""))
    row("architecture", card.architecture or "?")
    row("step", str(card.step))
    if card.date:
        row("date", card.date)
    if card.resolution:
        row("resolution", card.resolution)
    data = card.data
    trained = []
    if "rows" in data:
        trained.append(f"{data['rows']} training rows")
    trained.append(f"{card.task_count} task{'s' if card.task_count != 1 else ''}")
    if data.get("holdout"):
        trained.append(f"{data['holdout']} held out")
    if data.get("fingerprint"):
        trained.append(f"data fingerprint {data['fingerprint']}")
    row("data", ", ".join(trained))
    for i, task in enumerate(card.tasks):
        examples = "; ".join(f"'{e}'" for e in task.examples)
        rows = f"{task.rows} row{'s' if task.rows != 1 else ''}"
        row("tasks" if i == 0 else "", f"{task.name or '(no task)'} ({rows})" + (f": {examples}" if examples else ""))
    if card.task_count > len(card.tasks):
        row("", f"... and {card.task_count - len(card.tasks)} more tasks")
    if card.usage_hint:
        row("usage", card.usage_hint)
    settings = _flat(card.settings)
    if settings:
        row("settings", ", ".join(f"{k}={_show_value(v)}" for k, v in settings))
    if card.hash_sha256:
        row("tensor hash", card.hash_sha256)
    for problem in card.problems:
        row("note", f"{problem}; that part of the card is left out")
    return "\n".join(lines)


# ---- hashes, preview, sealing ---------------------------------------------------------------------


def hash_path(path: str | os.PathLike) -> Path:
    """``<name>.sha256`` beside ``<name>.safetensors``."""
    path = Path(path)
    return path.with_name(path.stem + HASH_SUFFIX)


def preview_path(path: str | os.PathLike) -> Path:
    """``<name>.preview.png`` beside ``<name>.safetensors``."""
    path = Path(path)
    return path.with_name(path.stem + PREVIEW_SUFFIX)


def _header(f: BinaryIO, path: Path) -> tuple[dict[str, Any], int]:
    """The parsed JSON header of the safetensors file open as ``f``, and where its tensor bytes start."""
    size = os.fstat(f.fileno()).st_size
    raw = f.read(8)
    n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    if not 0 < n <= min(_MAX_HEADER, size - 8):
        raise CardError(f"'{path.name}' is not a safetensors file (its header length is wrong); pass an adapter file")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CardError(
            f"'{path.name}' is not a safetensors file (its header is not JSON); pass an adapter file"
        ) from None
    if not isinstance(header, dict):
        raise CardError(f"'{path.name}' is not a safetensors file (its header is not a JSON object)")
    return header, 8 + n


def _copy_hashing(src: BinaryIO, dst: BinaryIO | None, digest: Any) -> None:
    while chunk := src.read(_CHUNK):
        digest.update(chunk)
        if dst is not None:
            dst.write(chunk)


def tensor_sha256(path: str | os.PathLike) -> str:
    """``0x`` + sha256 of the file's tensor bytes (everything after the header): ``modelspec.hash_sha256``."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        _header(f, path)
        _copy_hashing(f, None, digest)
    return f"0x{digest.hexdigest()}"


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of the whole file (what ``sha256sum``, civitai and LoRA managers compare), hex."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        _copy_hashing(f, None, digest)
    return digest.hexdigest()


def _write_hash_file(path: Path, hexdigest: str) -> Path:
    target = hash_path(path)
    with atomic_path(target) as tmp:
        tmp.write_text(f"{hexdigest}  {path.name}\n", encoding="utf-8")
    return target


def _place_preview(path: Path, preview: str | os.PathLike | None) -> Path | None:
    """Copy ``preview`` to ``<name>.preview.png``; with none, remove an old one (an earlier run's
    picture must not stand beside weights it does not show)."""
    target = preview_path(path)
    if preview is not None and Path(preview).is_file():
        with atomic_path(target) as tmp:
            shutil.copyfile(preview, tmp)
        return target
    target.unlink(missing_ok=True)
    return None


def seal(path: str | os.PathLike, preview: str | os.PathLike | None = None) -> str:
    """Finish a written adapter file: stamp ``modelspec.hash_sha256`` into its card, then write
    ``<name>.sha256`` and ``<name>.preview.png`` (a copy of ``preview``; none: an old one is removed).
    Returns the whole file's sha256 (hex).

    Which hash is which, and why two: ``modelspec.hash_sha256`` follows the spec's reference
    implementation, sha256 over the tensor bytes only (the file after its header), ``0x``-prefixed.
    A hash of the whole file cannot sit inside the file it hashes, and the tensor hash survives
    metadata edits (a retitled card keeps it). kohya's ``precalculate_safetensors_hashes`` instead
    hashes each tensor serialised alone, in state-dict order, which equals the file's bytes only
    when that order matches the file's; we take what anyone can recompute from the file itself.
    The ``.sha256`` file holds the hash of the finished file, header included: the one civitai, LoRA
    managers and ``sha256sum -c`` compare. So it is computed last, over the bytes written.

    Files without a card (``instructmole.card``) are not stamped; they still get the hash file and
    the preview. Everything is written atomically: a kill leaves the old file or the new one. The
    OS's refusals (a full disk) stay ``OSError``, as the trainer's checkpoint code expects."""
    path = Path(path)
    with open(path, "rb") as src:
        header, offset = _header(src, path)
        meta = header.get("__metadata__")
        carded = isinstance(meta, dict) and KEY_CARD in meta
        if carded:
            tensors = hashlib.sha256()
            _copy_hashing(src, None, tensors)
            meta[KEY_HASH] = f"0x{tensors.hexdigest()}"
    whole = hashlib.sha256()
    if not carded:
        with open(path, "rb") as src:
            _copy_hashing(src, None, whole)
    else:
        blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # safetensors keeps the tensor bytes 8-byte aligned
        start = len(blob).to_bytes(8, "little") + blob
        # contexts close in reverse: the source is closed before the rename (which Windows needs)
        with atomic_path(path) as tmp, open(path, "rb") as src, open(tmp, "wb") as dst:
            dst.write(start)
            whole.update(start)
            src.seek(offset)
            _copy_hashing(src, dst, whole)
    _write_hash_file(path, whole.hexdigest())
    _place_preview(path, preview)
    return whole.hexdigest()


def copy_sealed(source: str | os.PathLike, target: str | os.PathLike) -> str:
    """Copy a sealed adapter (and its preview) to ``target``, writing ``target``'s own hash file (its
    line names the new file). Returns the sha256, computed while copying: one read of the file."""
    source, target = Path(source), Path(target)
    whole = hashlib.sha256()
    with atomic_path(target) as tmp, open(source, "rb") as src, open(tmp, "wb") as dst:
        _copy_hashing(src, dst, whole)
    _write_hash_file(target, whole.hexdigest())
    _place_preview(target, preview_path(source))
    return whole.hexdigest()


def recorded_sha256(path: str | os.PathLike) -> str | None:
    """The hash ``<name>.sha256`` records for ``path``, or ``None`` (no file, or not one for it)."""
    path = Path(path)
    try:
        text = hash_path(path).read_text(encoding="utf-8", errors="replace")[:4096]
    except OSError:
        return None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == path.name and len(parts[0]) == 64:
            return parts[0].lower()
    return None


def verify(path: str | os.PathLike, card: Card | None) -> list[tuple[str, bool | None, str]]:
    """Recompute what the card and the hash file claim: ``(what, matches, detail)`` per claim;
    ``matches`` is ``None`` where nothing was recorded."""
    path = Path(path)
    out: list[tuple[str, bool | None, str]] = []
    if card is not None and card.hash_sha256:
        actual = tensor_sha256(path)
        out.append(("tensor hash", actual == card.hash_sha256.lower(), actual))
    else:
        out.append(("tensor hash", None, "not recorded"))
    recorded = recorded_sha256(path)
    if recorded is None:
        out.append((f"{hash_path(path).name}", None, "no hash file beside the adapter"))
    else:
        actual = file_sha256(path)
        out.append((f"{hash_path(path).name}", actual == recorded, actual))
    return out
