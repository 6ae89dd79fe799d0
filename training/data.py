"""The data set description: which edit pairs exist, and whether every one of them is usable.

Two ways to describe a data set:

* a JSONL manifest, one edit pair per line (blank lines and ``#`` lines are skipped)::

      {"instruction": "make it snowy", "target": "out/001.png", "references": ["in/001.png"],
       "task": "weather", "split": "train"}

  ``references`` may be a single string, a list of several (multi-subject rows) or empty/absent
  (text-to-image rows). ``task`` is a free tag for reports; ``split`` is ``train`` (default) or
  ``holdout`` (kept out of training, used only for the routing report). ``mask`` (optional) is a
  greyscale image of the target's size, white where the edit happens: the flow loss of that row is
  weighted towards the edited region (``train.mask_outside_weight`` outside it). Relative paths are
  read against the manifest's folder.

* a folder, the layout other Kontext trainers use::

      dataset/target/0001.png      the edited image (any of png/jpg/jpeg/webp/bmp/tif/tiff)
      dataset/target/0001.txt      its instruction (UTF-8 text)
      dataset/control/0001.png     the first reference (required; same stem, any image extension)
      dataset/control_1/0001.png   a second reference (optional, per row)
      dataset/control_2/0001.png   a third, and so on
      dataset/mask/0001.png        the edited region of the target (optional, per row; see ``mask``)

  Every row is ``split=train`` with no task; use a manifest for holdout rows or task tags.

Rows are read first (cheap, structural mistakes fail at once) and then checked (every image opened,
in a thread pool) before any model is loaded, so a bad row costs seconds, not a failed night.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageOps, UnidentifiedImageError

from training.errors import DataError

__all__ = [
    "IMAGE_ERRORS",
    "IMAGE_EXTENSIONS",
    "MANIFEST_KEYS",
    "SPLITS",
    "CheckedRows",
    "Row",
    "check_rows",
    "content_hash",
    "image_size",
    "read_rows",
]

MANIFEST_KEYS = ("instruction", "target", "references", "task", "split", "mask")
SPLITS = ("train", "holdout")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

# What PIL raises for a file that is not (or no longer) an image it can read.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, UnidentifiedImageError, Image.DecompressionBombError)
_EXIF_ORIENTATION = 0x0112
_CONTROL_DIR = re.compile(r"^control(?:_(\d+))?$")


@dataclass(frozen=True)
class Row:
    """One edit pair. ``where`` is what every message names, so users can find the row at once."""

    index: int
    instruction: str
    target: Path
    references: tuple[Path, ...]
    task: str | None
    split: str
    where: str
    mask: Path | None = None  # white = the edited region; None: the loss is not weighted
    # The folder relative paths were written against: messages show paths the way the user wrote them.
    root: Path | None = field(default=None, compare=False, repr=False)


@dataclass
class CheckedRows:
    """The rows that survived the checks, and one line per problem for the run's report."""

    rows: list[Row]
    problems: list[str]
    skipped: int


# ----------------------------------------------------------------------------------------- reading


def read_rows(path: str | Path) -> list[Row]:
    """Read a manifest (.jsonl) or a folder in the target/control layout; structural mistakes raise."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(
            f"data path {path} does not exist; point data.manifest at a .jsonl manifest or a dataset folder"
        )
    rows = _read_folder(path) if path.is_dir() else _read_manifest(path)
    if not rows:
        raise DataError(f"{path} describes no edit pairs; add rows (one JSON object per line) or images under target/")
    return rows


def _read_manifest(path: Path) -> list[Row]:
    root = path.parent.absolute()
    rows: list[Row] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} cannot be read as UTF-8 text ({exc}); save the manifest as UTF-8 JSONL") from None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{path.name} line {number}"
        rows.append(_parse_line(stripped, where=where, index=len(rows), root=root))
    return rows


def _parse_line(line: str, *, where: str, index: int, root: Path) -> Row:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); write one JSON object per line"
        ) from None
    except RecursionError:  # thousands of nested brackets: no row looks like that
        raise DataError(f"{where}: nested too deeply to be a row; write one flat JSON object per line") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'instruction' and 'target', got {type(obj).__name__}")
    _reject_unknown_keys(obj, where)
    instruction = obj.get("instruction")
    if not isinstance(instruction, str):
        raise DataError(f"{where}: 'instruction' must be a string (the edit to make); add it to the row")
    return Row(
        index=index,
        instruction=instruction.strip(),
        target=_path_value(obj.get("target"), "target", where, root),
        references=tuple(_path_value(p, "references", where, root) for p in _reference_list(obj, where)),
        task=_task_value(obj.get("task"), where),
        split=_split_value(obj.get("split", "train"), where),
        where=where,
        mask=None if obj.get("mask") is None else _path_value(obj["mask"], "mask", where, root),
        root=root,
    )


def _reject_unknown_keys(obj: dict[str, Any], where: str) -> None:
    for key in obj:
        if key in MANIFEST_KEYS:
            continue
        close = difflib.get_close_matches(str(key), MANIFEST_KEYS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys are {', '.join(MANIFEST_KEYS)}"
        raise DataError(f"{where}: unknown key '{key}'; {hint}")


def _reference_list(obj: dict[str, Any], where: str) -> list[Any]:
    """A single string is a one-element list: single-reference rows are the common case."""
    refs = obj.get("references")
    if refs is None:
        return []
    if isinstance(refs, str):
        return [refs]
    if not isinstance(refs, list):
        raise DataError(f"{where}: 'references' must be a path or a list of paths, got {type(refs).__name__}")
    return refs


def _path_value(value: Any, key: str, where: str, root: Path) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: '{key}' needs a non-empty image path, got {json.dumps(value)}; fix the row")
    path = Path(value.strip()).expanduser()
    return path if path.is_absolute() else root / path


def _task_value(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: 'task' must be a string tag, got {json.dumps(value)}; quote it or drop it")
    return value.strip() or None


def _split_value(value: Any, where: str) -> str:
    if value in SPLITS:
        return value
    close = difflib.get_close_matches(str(value), SPLITS, n=1)
    hint = f"did you mean '{close[0]}'?" if close else "use 'train' or 'holdout'"
    raise DataError(f"{where}: unknown split {json.dumps(value)}; {hint}")


def _read_folder(folder: Path) -> list[Row]:
    root = folder.absolute()
    target_dir = root / "target"
    if not target_dir.is_dir():
        raise DataError(
            f"folder {folder} has no target/ subfolder; use the layout target/ + control/ (see training/data.py) "
            "or pass a .jsonl manifest"
        )
    controls = _control_dirs(root)
    targets = _images_by_stem(target_dir, root)
    masks = _images_by_stem(root / "mask", root) if (root / "mask").is_dir() else {}
    rows = []
    for index, (stem, target) in enumerate(sorted(targets.items())):
        rows.append(
            Row(
                index=index,
                instruction=_folder_instruction(target_dir / f"{stem}.txt"),
                target=target,
                references=_folder_references(stem, target.name, controls),
                task=None,
                split="train",
                where=f"target/{target.name}",
                mask=masks.get(stem),
                root=root,
            )
        )
    return rows


def _control_dirs(root: Path) -> list[tuple[Path, dict[str, Path]]]:
    """control/, control_1/, control_2/… in number order, each with its images by stem."""
    found = []
    for child in root.iterdir():
        match = _CONTROL_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1) or 0), child))
    return [(folder, _images_by_stem(folder, root)) for _, folder in sorted(found)]


def _images_by_stem(folder: Path, root: Path) -> dict[str, Path]:
    images: dict[str, Path] = {}
    for file in sorted(folder.iterdir()):
        if file.suffix.lower() not in IMAGE_EXTENSIONS or not file.is_file():
            continue
        if file.stem in images:
            other = images[file.stem].relative_to(root).as_posix()
            raise DataError(
                f"{other} and {file.relative_to(root).as_posix()} share the name '{file.stem}'; "
                "keep one image per name in each folder"
            )
        images[file.stem] = file
    return images


def _folder_references(stem: str, name: str, controls: list[tuple[Path, dict[str, Path]]]) -> tuple[Path, ...]:
    """control/ is required for every row (a missing file keeps its expected path, so the check names it);
    control_1/, control_2/… are per row, since multi-subject rows are usually a minority."""
    refs = []
    for folder, by_stem in controls:
        if stem in by_stem:
            refs.append(by_stem[stem])
        elif folder.name == "control":
            refs.append(folder / name)
    return tuple(refs)


def _folder_instruction(path: Path) -> str:
    """A missing .txt is an empty instruction: check_rows reports it like any other bad row."""
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} cannot be read as UTF-8 text ({exc}); save the instruction as UTF-8") from None


# ---------------------------------------------------------------------------------------- checking


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as the image will be shown (EXIF rotation applied), without decoding pixels."""
    path = Path(path)
    try:
        return _cached_size(path)
    except FileNotFoundError:
        raise DataError(f"image {path} is missing; fix the path") from None
    except IMAGE_ERRORS as exc:
        raise DataError(f"image {path} is not a readable image ({exc}); replace the file") from None


@functools.cache
def _cached_size(path: Path) -> tuple[int, int]:
    """Cached per path: buckets, checks and caches all ask, and a 100k-row set would reopen every file."""
    with Image.open(path) as im:
        im.verify()  # checks the container (PNG CRCs, …) without decoding pixels, but spends the file object
    with Image.open(path) as im:
        width, height = im.size
        rotated = im.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8)
    return (height, width) if rotated else (width, height)


def check_rows(
    rows: Sequence[Row], *, min_side: int, max_references: int, on_error: Literal["fail", "skip"]
) -> CheckedRows:
    """Check every row before training; "fail" stops at the first problem, "skip" drops bad rows and reports them."""
    if on_error not in ("fail", "skip"):
        raise DataError(f"data.on_error must be 'fail' or 'skip', got {on_error!r}")
    kept: list[Row] = []
    problems: list[str] = []
    pool = ThreadPoolExecutor(thread_name_prefix="check-rows")
    try:
        results = pool.map(lambda r: _row_problems(r, min_side, max_references), rows)
        for row, found in zip(rows, results, strict=True):
            if not found:
                kept.append(row)
            elif on_error == "fail":
                text, fix = found[0]
                raise DataError(f"{text}; {fix} or set data.on_error=skip")
            else:
                problems.extend(text for text, _ in found)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if not kept and rows:
        raise DataError(f"every one of the {len(rows)} rows has a problem (first: {problems[0]}); fix the data")
    return CheckedRows(rows=kept, problems=problems, skipped=len(rows) - len(kept))


def _row_problems(row: Row, min_side: int, max_references: int) -> list[tuple[str, str]]:
    """All problems of one row as (message, way out); empty when the row is usable."""
    found = []
    if not row.instruction:
        found.append((f"{row.where}: the instruction is empty", "write one"))
    if len(row.references) > max_references:
        found.append(
            (
                f"{row.where}: {len(row.references)} references, more than data.max_references={max_references}",
                "drop references or raise data.max_references",
            )
        )
    found.extend(_image_problem(row, "target", row.target, min_side))
    for ref in row.references:
        found.extend(_image_problem(row, "reference", ref, min_side))
    if row.mask is not None and not found:
        found.extend(_mask_problem(row))
    return found


def _mask_problem(row: Row) -> list[tuple[str, str]]:
    """A mask must open, have its target's size and show some edited (non-black) region."""
    assert row.mask is not None
    shown = f"mask '{_shown(row.mask, row.root)}'"
    way_out = "fix the mask or drop the row's 'mask'"
    try:
        size = _cached_size(row.mask)
        with Image.open(row.mask) as im:
            brightest = ImageOps.exif_transpose(im).convert("L").getextrema()[1]
    except FileNotFoundError:
        return [(f"{row.where}: {shown} is missing (looked at {row.mask.absolute()})", f"{way_out} key")]
    except IMAGE_ERRORS as exc:
        return [(f"{row.where}: {shown} is not a readable image ({exc})", f"{way_out} key")]
    target = _cached_size(row.target)
    if size != target:
        return [
            (
                f"{row.where}: {shown} is {size[0]}x{size[1]} but its target is {target[0]}x{target[1]}",
                "save the mask at the target's size or drop the row's 'mask' key",
            )
        ]
    if brightest == 0:
        return [(f"{row.where}: {shown} is all black, so no region is edited (white = edited)", f"{way_out} key")]
    return []


def _image_problem(row: Row, role: str, path: Path, min_side: int) -> list[tuple[str, str]]:
    shown = f"{role} '{_shown(path, row.root)}'"
    try:
        width, height = _cached_size(path)
    except FileNotFoundError:
        return [(f"{row.where}: {shown} is missing (looked at {path.absolute()})", "fix the path")]
    except IMAGE_ERRORS as exc:
        return [(f"{row.where}: {shown} is not a readable image ({exc})", "replace the file")]
    if min(width, height) < min_side:
        return [
            (
                f"{row.where}: {shown} is {width}x{height}, its shorter side is under data.min_side={min_side}",
                "use a larger image or lower data.min_side",
            )
        ]
    return []


def _shown(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return str(path)


# ------------------------------------------------------------------------------------------ hashes


def content_hash(path: str | Path) -> str:
    """sha256 of the file's bytes: cache keys follow content, so a renamed file still hits and an edited one misses."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror or exc}); fix the path") from None
    return digest.hexdigest()
