"""Councils as shared text: read one back from the JSON that Council Preview gives (or a file of it).

A council a person liked (routed, overridden, blended) is worth keeping: the Preview's ``json``
output holds it whole, including the id of the adapter it came from, so pasting it here, or
saving it as a ``.json`` file under ComfyUI's output folder, gives the same council back in
another graph. Applying it to another adapter fails with the usual message at Apply Council.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from comfy_api.latest import io

from ..instructmole import Council, InstructMoLEError
from .common import COUNCIL, COUNCILS, NodeInputError, file_identity

NODE = "InstructMoLE Load Council"
NO_FILE = "(paste the JSON below)"
MAX_JSON_CHARS = 16 * 1024 * 1024  # a full-size council of 57 layers x 8 experts is about 20 KB
MAX_FILES = 500


def council_files() -> list[str]:
    """``.json`` files in the output folder and its direct subfolders (newest first, at most
    ``MAX_FILES``), relative to it. Not deeper: this runs whenever the frontend asks for the node
    list, and an output folder may hold a deep tree of many thousands of images."""
    import folder_paths

    root = Path(folder_paths.get_output_directory())
    if not root.is_dir():
        return []
    found = [*root.glob("*.json"), *root.glob("*/*.json")]
    found = sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)[:MAX_FILES]
    return [p.relative_to(root).as_posix() for p in found]


def _read_file(name: str) -> str:
    """The text of an output-folder file; never a path outside that folder."""
    import folder_paths

    root = Path(folder_paths.get_output_directory()).resolve()
    path = (root / name).resolve()
    if root not in path.parents or not path.is_file():
        raise InstructMoLEError(f"'{name}' is not a file in ComfyUI's output folder; pick one from the list")
    if path.stat().st_size > MAX_JSON_CHARS:
        raise InstructMoLEError(f"'{name}' is larger than {MAX_JSON_CHARS // 2**20} MB; a council file is a few KB")
    return path.read_text(encoding="utf-8", errors="replace")


def parse_council(text: str) -> Council:
    """A council from its JSON text, every field checked (``Council.from_dict``)."""
    if not isinstance(text, str) or not text.strip():
        raise InstructMoLEError("no council JSON given; paste the 'json' output of Council Preview, or pick a file")
    if len(text) > MAX_JSON_CHARS:
        raise InstructMoLEError(f"the council JSON is over {MAX_JSON_CHARS // 2**20} MB; a council is a few KB")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InstructMoLEError(f"the council JSON is not valid JSON ({err.msg} at line {err.lineno})") from None
    except RecursionError:
        raise InstructMoLEError("the council JSON is nested too deeply to be a council") from None
    return Council.from_dict(data)


class LoadCouncil(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructMoLE_LoadCouncil",
            display_name=NODE,
            category=COUNCILS,
            description="A council from its JSON (the 'json' output of InstructMoLE Council Preview), pasted or "
            "from a .json file in ComfyUI's output folder, to use a shared council again. It remembers the "
            "adapter it was routed with: Apply Council refuses it on another adapter.",
            inputs=[
                io.Combo.Input(
                    "file",
                    options=[NO_FILE, *council_files()],
                    default=NO_FILE,
                    tooltip="A council .json file in ComfyUI's output folder, or the first entry to use the "
                    "pasted JSON.",
                ),
                io.String.Input(
                    "council_json",
                    multiline=True,
                    default="",
                    tooltip="The council as JSON, as Council Preview's 'json' output gives it (used when no file is "
                    "picked).",
                ),
            ],
            outputs=[COUNCIL.Output(display_name="council", tooltip="The council, as it was saved.")],
        )

    @classmethod
    def validate_inputs(cls, file: str | None = None, council_json: str | None = None) -> bool | str:
        """Checked before the graph runs: a missing file, bad JSON or an invalid council."""
        if file is None or (file == NO_FILE and council_json is None):  # linked: known only at run time
            return True
        try:
            cls._council(file, council_json or "")
        except InstructMoLEError as err:
            return f"{NODE}: {err}"
        return True

    @staticmethod
    def _council(file: str, council_json: str) -> Council:
        return parse_council(_read_file(file) if file != NO_FILE else council_json)

    @classmethod
    def execute(cls, file: str, council_json: str) -> io.NodeOutput:
        try:
            return io.NodeOutput(cls._council(file, council_json))
        except InstructMoLEError as err:
            raise NodeInputError(NODE, "file" if file != NO_FILE else "council_json", str(err)) from None

    @classmethod
    def fingerprint_inputs(cls, file: str, council_json: str) -> str:
        """Run again when the picked file changes on disk."""
        if file == NO_FILE:
            return council_json
        import folder_paths

        path = os.path.join(folder_paths.get_output_directory(), file)
        return f"{file}:{file_identity(path) if os.path.isfile(path) else 'missing'}"
