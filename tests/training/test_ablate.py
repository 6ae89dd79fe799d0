"""The ablation (``python -m training ablate``): a reduced run of every variant, its folder rules, and
the edit-quality measures it reports.

The full ablation (three seeds, the demo's 2000 steps, minutes) is run by hand; here one seed of four
steps runs on a shrunken build (the demo's stages with a few steps each, a smaller data set), which
checks everything but the numbers' meaning: every variant trains and is measured, the table has its
shape and finite values where a measure applies, and the picture is written.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math

import pytest
import torch
from PIL import Image

from training import ablate, demo, synthetic
from training.cli import main as cli_main
from training.quality import psnr, ssim


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """One reduced ablation, shared by the tests that read it: one seed of four steps, on the demo's
    build with a few steps per stage and 8 + 1 images (seconds instead of minutes). Yields its folder
    and what it printed."""
    out = tmp_path_factory.mktemp("ablation") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo, "fit_vae", functools.partial(demo.fit_vae, steps=3))
        patch.setattr(demo, "teach_copy", functools.partial(demo.teach_copy, steps=3))
        small = functools.partial(synthetic.write_dataset, images=8, holdout_images=1)
        patch.setattr("training.synthetic.write_dataset", small)
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            code = cli_main(["ablate", "--seeds", "1", "--steps", "4", "--jobs", "1", "--out", str(out)])
    assert code == 0
    return out, printed.getvalue()


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_reduced_ablation_trains_and_measures_every_variant(reduced):
    out, printed = reduced
    for i, variant in enumerate(ablate.VARIANTS, 1):  # a start and an end line per run
        assert f"run {i}/4 {variant.name}, seed 0: training 4 steps" in printed
        assert f"run {i}/4 {variant.name}, seed 0: done in" in printed

    lines = [line for line in (out / "ablation.md").read_text().splitlines() if line.startswith("|")]
    rows = [_cells(line) for line in lines]
    assert len(rows) == 2 + len(ablate.VARIANTS) + 1  # header, rule, the variants, the base model
    assert {len(r) for r in rows[:1] + rows[2:]} == {2 + len(ablate.METRICS)}
    assert [r[0] for r in rows[2:]] == [v.name for v in ablate.VARIANTS] + ["base model (no adapter)"]
    for variant, row in zip(ablate.VARIANTS, rows[2:], strict=False):
        for (_, _, _, applies), cell in zip(ablate.METRICS, row[2:], strict=True):
            assert (cell == "—") == (variant.routing not in applies), (variant.key, cell)

    data = json.loads((out / "ablation.json").read_text())
    for variant in ablate.VARIANTS:
        (run,) = data["runs"][variant.key]
        for key, _, _, applies in ablate.METRICS:
            if variant.routing in applies:
                assert math.isfinite(run[key]), (variant.key, key)
                assert math.isfinite(data["summary"][variant.key][key][0])
            else:
                assert key not in run
        assert run["parameters"] == data["plan"]["parameters"][variant.key]  # planned = trained
        assert math.isfinite(run["base_flow"]) and run["base_flow"] == pytest.approx(data["base"]["flow"], rel=1e-5)
    lora = data["runs"]["lora"][0]  # its inert MoLE was checked to add nothing (Judge.score), the LoRA did
    assert lora["flow"] != lora["base_flow"]
    params = data["plan"]["parameters"]
    per_rank = params["lora"] / data["plan"]["lora_rank"]
    assert abs(params["lora"] - params["ours"]) <= per_rank / 2  # the rank nearest ours' count
    assert all(math.isfinite(data["base"][k]) for k in ("flow", "psnr", "ssim"))

    with Image.open(out / "ablation.png") as picture:
        assert picture.format == "PNG" and picture.width > 1000 and picture.height > 400
    assert (out / "runs" / "ours-seed0" / "report.png").is_file()  # the routing report of every held-out row
    assert (out / "runs" / "lora-seed0" / "instructmole.safetensors").is_file()


def test_config_mode_trains_the_variants_on_a_given_config(reduced, tmp_path):
    """``--config`` (a real-size run's form) on the reduced build's model and data: no build, the
    config's model and data, the same table."""
    model, manifest = reduced[0] / "tiny-kontext", reduced[0] / "data" / "manifest.jsonl"
    out = tmp_path / "out"
    argv = ["ablate", "--config", str(demo.CONFIG), f"model.pretrained={model}", f"data.manifest={manifest}"]
    with demo.threads(1), contextlib.redirect_stdout(io.StringIO()) as printed:  # as fast as the demo's runs
        assert cli_main([*argv, "--seeds", "1", "--steps", "2", "--out", str(out)]) == 0
    assert "run 4/4 ours without orthogonality loss, seed 0: done in" in printed.getvalue()
    assert sorted(p.name for p in out.iterdir()) == ["ablation.json", "ablation.md", "ablation.png", "runs"]
    data = json.loads((out / "ablation.json").read_text())
    assert data["steps"] == 2 and all(math.isfinite(data["runs"][v.key][0]["flow"]) for v in ablate.VARIANTS)


def test_config_mode_refuses_a_plain_lora_beside_the_experts(reduced, tmp_path, capsys):
    model, manifest = reduced[0] / "tiny-kontext", reduced[0] / "data" / "manifest.jsonl"
    argv = ["--config", str(demo.CONFIG), f"model.pretrained={model}", f"data.manifest={manifest}"]
    assert ablate.main([*argv, "adapter.lora.rank=8", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: adapter.lora.rank=8") and err.count("\n") == 1


def test_a_non_empty_out_folder_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert ablate.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and "--overwrite" in err and err.count("\n") == 1
    assert ablate.main(["--out", str(out), "--overwrite"]) == 2  # not the ablation's file: never removed
    err = capsys.readouterr().err
    assert "does not write (notes.txt)" in err and err.count("\n") == 1
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_removes_only_the_earlier_results(tmp_path):
    out = tmp_path / "out"
    (out / "runs" / "ours-seed0").mkdir(parents=True)
    (out / "ablation.md").write_text("old")
    (out / "data").mkdir()
    (out / "data" / "manifest.jsonl").write_text("{}\n")
    ablate.prepare_out(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["data"]  # the shared data set is reused


@pytest.mark.parametrize(
    ("argv", "named"), [(["--seeds", "0"], "--seeds"), (["--steps", "x"], "--steps"), (["train.lr=1"], "--config")]
)
def test_usage_errors_are_one_line(argv, named, capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["ablate", *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "python -m training ablate --help" in err


# ---- PSNR and SSIM ---------------------------------------------------------------------------------


def test_psnr_of_a_known_error():
    target = torch.full((2, 3, 16, 16), 0.5)
    image = target + torch.tensor([0.1, 0.01])[:, None, None, None]  # MSE 1e-2 and 1e-4
    assert psnr(image, target).tolist() == pytest.approx([20.0, 40.0], abs=1e-4)
    assert psnr(target, target).tolist() == pytest.approx([100.0, 100.0])  # exact copies: the floor, not inf


def test_ssim_of_flat_images_is_the_luminance_term():
    """Flat images have no variance: SSIM is ``(2ab + C1) / (a² + b² + C1)`` exactly."""
    a, b = 0.3, 0.6
    image, target = torch.full((1, 3, 32, 32), a), torch.full((1, 3, 32, 32), b)
    c1 = 0.01**2
    assert float(ssim(image, target)[0]) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)


def test_ssim_is_one_for_a_copy_and_falls_with_noise():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(1, 3, 32, 32, generator=g)
    noisy = [(target + s * torch.randn(target.shape, generator=g)).clamp(0, 1) for s in (0.05, 0.2)]
    values = [float(ssim(target, target)[0]), *(float(ssim(n, target)[0]) for n in noisy)]
    assert values[0] == pytest.approx(1.0, abs=1e-6)
    assert values[0] > values[1] > values[2]
    assert float(ssim(noisy[0], target)[0]) == pytest.approx(float(ssim(target, noisy[0])[0]), abs=1e-6)  # symmetric


def test_measures_refuse_mismatched_or_tiny_images():
    with pytest.raises(ValueError, match="must both be"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
