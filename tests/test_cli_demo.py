"""The command line (inspect, convert), the heat map and the embedded demo."""

from __future__ import annotations

import json

import torch
from PIL import Image

import instructmole as im
from instructmole import demo
from instructmole.cli import main
from instructmole.reference import write_reference_layout
from instructmole.viz import council_heatmap


def test_inspect_text_and_json(tmp_path, adapter, capsys):
    path = adapter.save(tmp_path / "a.safetensors")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "N=4 k=2 rank=4 alpha=8" in out and "single_transformer_blocks.1.proj_out" in out
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"]["experts"] == sum(
        lay.A.numel() + lay.B.numel() for _, lay in adapter.model.named_layers()
    )
    assert info["adapter_id"] == adapter.adapter_id


def test_convert_reference_folder(tmp_path, adapter, capsys):
    folder = write_reference_layout(adapter, tmp_path / "ckpt")
    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(folder), str(out), "--quiet"]) == 0
    assert "4 MoLE layers" in capsys.readouterr().out
    back = im.load_adapter(out)
    assert torch.equal(
        back.model.layer("transformer_blocks.1.ff.net.2").B, adapter.model.layer("transformer_blocks.1.ff.net.2").B
    )


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "x.safetensors").write_bytes(b"\x00" * 10)
    assert main(["inspect", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 'x.safetensors' is not a readable .safetensors file") and err.count("\n") == 1
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "o.safetensors"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_heatmap_marks_members(adapter):
    council = adapter.route(torch.randn(2, 32, 64), torch.randn(2, 32), labels=["a", "b"])
    img = council_heatmap(im.ban(council, [0]), cell=30)
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    assert img.width > 2 * 4 * 30 and img.height > 4 * 30
    assert len(set(img.getdata())) > 10  # a real picture, not a blank canvas


def test_demo_runs_and_paths_agree(tmp_path, capsys):
    checks = demo.run(tmp_path)
    assert checks["adapter changes the output"] > 1e-3
    assert checks["merged - fixed"] < 1e-5 and checks["detached - base"] == 0.0
    assert (tmp_path / "councils.png").stat().st_size > 1000
    assert "extract the canny edges" in capsys.readouterr().out
