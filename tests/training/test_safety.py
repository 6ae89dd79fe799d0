"""The trainer never loses a user's run: a used output folder is refused (or, with --overwrite, replaced
only after every check passed), a resume refuses a config it cannot continue exactly, pruning and
failed saves touch only this run's newest work, and every bad input or file-system fault is one
``error:`` line with exit code 2 that ``--check`` reports the same way."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.training.conftest import TINY_CONFIG, run_overrides
from training import preflight
from training.checkpoint import MARKER, checkpoints, save_checkpoint
from training.cli import main
from training.config import load_config
from training.errors import CheckpointError
from training.loop import train


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the sha256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cli(tiny, out: Path, capsys, *args: str, steps: int = 2, every: int = 2) -> tuple[int, str]:
    """``python -m training`` in-process: (exit code, stderr)."""
    code = main(
        ["--config", str(TINY_CONFIG), *run_overrides(tiny, out, "save.report=false", steps=steps, every=every), *args]
    )
    return code, capsys.readouterr().err


def assert_one_error_line(stderr: str, *phrases: str, alone: bool = True) -> None:
    """One ``error:`` line naming ``phrases``, no traceback; ``alone``: nothing else was printed (a
    mistake found before the run started), else it is the last line after the run's progress."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and (len(lines) == 1 or not alone), stderr
    assert "Traceback" not in stderr
    for phrase in phrases:
        assert phrase in errors[0], (phrase, errors[0])


@pytest.fixture(scope="module")
def first_run(tiny_kontext, tmp_path_factory) -> Path:
    """A finished 4-step run (checkpoints at 2 and 4) that the tests below must never damage."""
    out = tmp_path_factory.mktemp("first") / "run"
    overrides = run_overrides(tiny_kontext, out, "save.report=false", steps=4, every=2)
    train(load_config(TINY_CONFIG, overrides))
    return out


def copy_run(first_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(first_run, out)
    return out


# ---- item 1: the output folder belongs to one run ---------------------------------------------------


def test_a_fresh_run_into_a_used_folder_is_refused_and_loses_nothing(tiny_kontext, first_run, tmp_path, capsys):
    out = copy_run(first_run, tmp_path)
    before = snapshot(out)
    code, err = cli(tiny_kontext, out, capsys, "train.seed=9")
    assert code == 2
    assert_one_error_line(err, "holds an earlier run (checkpoints up to step 4)", "--resume latest", "--overwrite")
    assert snapshot(out) == before  # byte for byte, config.yaml included
    code, err = cli(tiny_kontext, out, capsys, "train.seed=9", "--check")
    assert code == 2 and "holds an earlier run" in err  # --check fails where training would


def test_overwrite_replaces_only_the_earlier_runs_files(tiny_kontext, first_run, tmp_path, capsys):
    out = copy_run(first_run, tmp_path)
    (out / "notes.txt").write_text("mine")  # not a run file: never touched
    for stale in ("instructmole-ema.sha256", "instructmole-ema.preview.png"):  # an earlier EMA run's card files
        (out / stale).write_text("old")
    code, err = cli(tiny_kontext, out, capsys, "train.seed=9", "--overwrite", steps=2, every=1)
    assert code == 0, err
    assert not (out / "instructmole-ema.sha256").exists() and not (out / "instructmole-ema.preview.png").exists()
    assert (out / "instructmole.sha256").read_text().split()[1] == "instructmole.safetensors"  # this run's card
    assert [p.name for _, p in checkpoints(out)] == ["step-0000001", "step-0000002"]
    assert (out / "notes.txt").read_text() == "mine"
    assert "seed: 9" in (out / "config.yaml").read_text()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2]  # the earlier run's lines are gone, not mixed in


def test_overwrite_with_bad_data_keeps_the_earlier_run(tiny_kontext, first_run, tmp_path, capsys):
    out = copy_run(first_run, tmp_path)
    before = snapshot(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "target": "missing.png", "references": ["missing.png"]}) + "\n")
    code, err = cli(tiny_kontext, out, capsys, f"data.manifest={bad}", "--overwrite")
    assert code == 2
    assert_one_error_line(err, "bad.jsonl line 1", "missing", "data.on_error=skip")
    assert snapshot(out) == before  # the config.yaml of the good run is not overwritten before the data is checked


def test_bad_data_leaves_no_output_folder(tiny_kontext, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "target": 5}\n')
    out = tmp_path / "never"
    code, err = cli(tiny_kontext, out, capsys, f"data.manifest={bad}")
    assert code == 2 and "'target' needs a non-empty image path" in err
    assert not out.exists()
    code, err = cli(tiny_kontext, out, capsys, f"data.manifest={bad}", "--check")
    assert code == 2 and "'target' needs a non-empty image path" in err


def test_resume_accepts_allowed_changes_and_refuses_the_rest(tiny_kontext, first_run, tmp_path, capsys):
    out = copy_run(first_run, tmp_path)
    before = snapshot(out)
    code, err = cli(tiny_kontext, out, capsys, "--resume", "latest", "train.lr=5e-3", steps=4)
    assert code == 2
    assert_one_error_line(err, "was trained with another train.lr (0.001, now 0.005)", "set it back")
    code, err = cli(tiny_kontext, out, capsys, "--resume", "latest", "adapter.rank=8", "train.seed=1", steps=4)
    assert code == 2 and "(and 1 other keys)" in err
    assert snapshot(out) == before
    code, err = cli(tiny_kontext, out, capsys, "--resume", "latest", "--check", "train.lr=5e-3", steps=4)
    assert code == 2 and "train.lr" in err
    # More steps, another schedule and warm-up, other saving and logging: the same run goes on.
    allowed = ["train.lr_schedule=cosine", "train.warmup_steps=1", "save.keep=5", "log.every=1", "data.workers=1"]
    code, err = cli(tiny_kontext, out, capsys, "--resume", "latest", *allowed, steps=6, every=2)
    assert code == 0, err
    assert [s for s, _ in checkpoints(out)] == [2, 4, 6]
    assert "lr_schedule: cosine" in (out / "config.yaml").read_text()


def test_resume_latest_before_the_first_checkpoint_starts_the_same_run_again(tiny_kontext, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    cfg = load_config(TINY_CONFIG, run_overrides(tiny_kontext, out, "save.report=false", steps=2, every=2))
    (out / "config.yaml").write_text(cfg.to_yaml())  # a run killed before its first checkpoint
    code, err = cli(tiny_kontext, out, capsys, "--resume", "latest", "train.seed=4")
    assert code == 2 and "holds an earlier run's files (config.yaml)" in err  # another run's config: refused
    code, err = cli(tiny_kontext, out, capsys, "--resume", "latest")
    assert code == 0, err


def test_resume_from_a_checkpoint_into_another_runs_folder_is_refused(tiny_kontext, first_run, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("train: {seed: 1}\n")  # another run, stopped before its first checkpoint
    checkpoint = first_run / "checkpoints" / "step-0000004"
    code, err = cli(tiny_kontext, other, capsys, "--resume", str(checkpoint), steps=6)
    assert code == 2
    assert_one_error_line(err, f"train.output_dir '{other}' holds files of another run than {checkpoint}")
    assert (other / "config.yaml").read_text() == "train: {seed: 1}\n"


def test_an_earlier_runs_ema_adapter_alone_marks_the_folder_used(tiny_kontext, tmp_path, capsys):
    """A folder holding only an earlier run's EMA adapter is a used folder: refused, and --overwrite
    removes that file rather than leaving it beside the new run's."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "instructmole-ema.safetensors").write_bytes(b"an earlier run's EMA adapter")
    code, err = cli(tiny_kontext, out, capsys)
    assert code == 2
    assert_one_error_line(err, "--overwrite")
    assert (out / "instructmole-ema.safetensors").read_bytes() == b"an earlier run's EMA adapter"
    code, _ = cli(tiny_kontext, out, capsys, "--overwrite")
    assert code == 0 and not (out / "instructmole-ema.safetensors").exists()


def test_the_space_check_counts_the_ema(tiny_kontext, tmp_path):
    plain = load_config(TINY_CONFIG, run_overrides(tiny_kontext, tmp_path / "a", steps=2, every=2))
    ema = load_config(TINY_CONFIG, run_overrides(tiny_kontext, tmp_path / "a", "train.ema=0.99", steps=2, every=2))
    assert preflight.checkpoint_bytes(ema) > preflight.checkpoint_bytes(plain)


def test_overwrite_and_resume_together_are_refused(tiny_kontext, tmp_path, capsys):
    code, err = cli(tiny_kontext, tmp_path / "x", capsys, "--overwrite", "--resume", "latest")
    assert code == 2
    assert_one_error_line(err, "pass only one of them")


# ---- checkpoints: pruning and failed saves ------------------------------------------------------------


class FakeAccelerator:
    """What ``save_checkpoint`` uses of accelerate: one main process whose state is one file."""

    is_main_process = True
    num_processes = 1

    def __init__(self, fail: OSError | None = None) -> None:
        self.fail = fail

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str) -> None:
        if self.fail is not None:
            (Path(folder) / "model.safetensors").write_bytes(b"half")
            raise self.fail
        (Path(folder) / "model.safetensors").write_bytes(b"state")


def fake_checkpoint(out: Path, step: int, run: str) -> Path:
    folder = out / "checkpoints" / f"step-{step:07d}"
    folder.mkdir(parents=True)
    (folder / MARKER).write_text(json.dumps({"run": run, "step": step}))
    return folder


def test_pruning_touches_only_this_runs_checkpoints(tmp_path):
    foreign = fake_checkpoint(tmp_path, 100, "another run")
    damaged = fake_checkpoint(tmp_path, 50, "x")
    (damaged / MARKER).write_text("{not json")
    for step in range(1, 6):
        save_checkpoint(FakeAccelerator(), tmp_path, step, 2, {"run": "mine"}, lambda folder: None)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-0000004", "step-0000005", "step-0000050", "step-0000100"]
    assert foreign.is_dir() and damaged.is_dir()


def test_a_resaved_step_replaces_the_old_one_only_once_complete(tmp_path):
    save_checkpoint(FakeAccelerator(), tmp_path, 3, 2, {"run": "r"}, lambda folder: None)
    (tmp_path / "checkpoints" / "step-0000003" / "old.txt").write_text("old")

    def extras(folder: Path) -> None:
        assert (tmp_path / "checkpoints" / "step-0000003" / "old.txt").is_file()  # still there while writing
        (folder / "new.txt").write_text("new")

    save_checkpoint(FakeAccelerator(), tmp_path, 3, 2, {"run": "r"}, extras)
    folder = tmp_path / "checkpoints" / "step-0000003"
    assert (folder / "new.txt").is_file() and not (folder / "old.txt").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000003"]


def test_a_full_disk_during_a_save_keeps_the_earlier_checkpoints(tmp_path):
    save_checkpoint(FakeAccelerator(), tmp_path, 2, 1, {"run": "r"}, lambda folder: None)
    before = snapshot(tmp_path)
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(FakeAccelerator(fail=full), tmp_path, 4, 1, {"run": "r"}, lambda folder: None)
    text = str(err.value)
    assert "could not write checkpoint step-0000004" in text and "No space left on device" in text
    assert "step-0000002, is intact" in text and "--resume latest" in text
    assert snapshot(tmp_path) == before  # no half-made folder, nothing pruned


def test_a_full_disk_mid_run_is_one_line_and_the_run_resumes(tiny_kontext, tmp_path, capsys, monkeypatch):
    import accelerate

    out = tmp_path / "run"
    save_state = accelerate.Accelerator.save_state
    saves = []

    def filling(self, folder, *args, **kwargs):
        saves.append(folder)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "optimizer.bin"))
        return save_state(self, folder, *args, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", filling)
    code, err = cli(tiny_kontext, out, capsys, steps=4, every=2)
    assert code == 2
    assert_one_error_line(err, "could not write checkpoint step-0000004", "step-0000002, is intact", alone=False)
    assert [p.name for _, p in checkpoints(out)] == ["step-0000002"]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    code, err = cli(tiny_kontext, out, capsys, "--resume", "latest", steps=4, every=2)
    assert code == 0, err


# ---- item 3: bad inputs and file-system faults, each one line, exit 2, caught by --check -------------


def both(tiny, out: Path, capsys, *args: str) -> list[tuple[int, str]]:
    """The run and ``--check`` on the same input."""
    return [cli(tiny, out, capsys, *args), cli(tiny, out, capsys, *args, "--check")]


def test_an_output_path_that_is_a_file(tiny_kontext, tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("precious")
    for code, err in both(tiny_kontext, out, capsys):
        assert code == 2
        assert_one_error_line(err, f"train.output_dir: '{out}' is a file, not a folder")
    assert out.read_text() == "precious"
    nested = out / "run"
    for code, err in both(tiny_kontext, nested, capsys):
        assert code == 2 and "is a file; choose another path" in err


def test_a_read_only_output_folder(tiny_kontext, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real = preflight.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # permission bits do not bind root: refuse as a read-only mount would
        if Path(dir) == locked:
            raise PermissionError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(preflight.tempfile, "mkstemp", mkstemp)
    for code, err in both(tiny_kontext, locked / "run", capsys):
        assert code == 2
        assert_one_error_line(err, f"train.output_dir: '{locked}' is not writable (Read-only file system)")
    assert list(locked.iterdir()) == []


def test_a_cache_folder_that_is_a_file(tiny_kontext, tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.write_text("x")
    out = tmp_path / "run"
    for code, err in both(tiny_kontext, out, capsys, f"data.cache_dir={cache}"):
        assert code == 2
        assert_one_error_line(err, f"data.cache_dir: '{cache}' is a file, not a folder")
    assert not out.exists()


def test_a_disk_without_room_for_one_checkpoint(tiny_kontext, tmp_path, capsys, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    out = tmp_path / "run"
    for code, err in both(tiny_kontext, out, capsys):
        assert code == 2
        assert_one_error_line(err, "has 1.0 MiB free, but one checkpoint and the adapter need about")
    assert not out.exists()


def test_a_damaged_cache_entry_fails_the_check(tiny_kontext, tmp_path, capsys):
    cache = tmp_path / "cache"
    out = tmp_path / "run"
    code, err = cli(tiny_kontext, out, capsys, f"data.cache_dir={cache}", steps=1, every=1)
    assert code == 0, err
    entry = next(p for p in cache.rglob("*.safetensors"))
    entry.write_bytes(b"\x00" * 5)
    for code, err in both(tiny_kontext, tmp_path / "run2", capsys, f"data.cache_dir={cache}"):
        assert code == 2
        assert_one_error_line(err, f"the cache entry {entry} is damaged", "delete it")
    assert not (tmp_path / "run2").exists()


def test_a_file_where_the_run_keeps_its_checkpoints(tiny_kontext, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("a note")
    for code, err in both(tiny_kontext, out, capsys):
        assert code == 2
        assert_one_error_line(err, f"'{out / 'checkpoints'}' is a file, but the run keeps its checkpoints there")
    assert (out / "checkpoints").read_text() == "a note"


def test_a_binary_config_file(tmp_path, capsys):
    config = tmp_path / "model.safetensors"
    config.write_bytes(bytes(range(256)) * 4)
    assert main(["--config", str(config), "--check"]) == 2
    assert_one_error_line(capsys.readouterr().err, "is not UTF-8 text (a binary file?)")
    assert main(["--config", str(tmp_path), "--check"]) == 2
    assert_one_error_line(capsys.readouterr().err, "is a folder; pass the YAML file")


def test_overrides_on_both_sides_of_a_flag(tiny_kontext, tmp_path, capsys):
    first, *rest = run_overrides(tiny_kontext, tmp_path / "run")
    code = main(["--config", str(TINY_CONFIG), first, "--check", *rest, "train.mixed_precision=no"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "config OK" in out.out and "a fresh run" in out.out


def test_an_unknown_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--chek"])
    assert exit_.value.code == 2
    assert_one_error_line(capsys.readouterr().err, "unrecognized arguments: --chek")


def test_mixed_precision_no_unquoted(tmp_path):
    manifest, model = tmp_path / "m.jsonl", tmp_path / "model"
    manifest.write_text("")
    model.mkdir()
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {{pretrained: {model}}}\ndata: {{manifest: {manifest}}}\ntrain: {{mixed_precision: no}}\n"
    )
    assert load_config(config).train.mixed_precision == "no"
    assert load_config(config, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    from training.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train\.mixed_precision=True must be one of: bf16, fp16, no"):
        load_config(config, ["train.mixed_precision=yes"])


def test_accelerate_starting_one_process_of_several_is_refused(tiny_kontext, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # what `accelerate launch --cpu --num_processes 2` sets
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for code, err in both(tiny_kontext, tmp_path / "run", capsys):
        assert code == 2
        assert_one_error_line(err, "accelerate launch started one process", "--multi_gpu --num_processes N")
    monkeypatch.setenv("WORLD_SIZE", "1")  # a real (if small) process group: not refused
    code, err = cli(tiny_kontext, tmp_path / "run", capsys, "--check")
    assert code == 0, err
