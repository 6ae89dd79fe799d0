"""The embedded demo: train a real tiny InstructMoLE adapter on six tonal edit tasks, then use it.

``bash scripts/demo.sh`` (``python -m training.demo``) runs, with no download, on a CPU:

1. a tiny random Kontext-shaped pipeline saved in diffusers layout (transformer, VAE, T5 and CLIP
   with tokenizers made in-process; the VAE decoder is fitted for a few seconds to the procedural
   images so that edits can be looked at; the encoder stays random);
2. a synthetic edit data set written to disk as a real manifest (six tonal tasks, ten phrasings
   each, four held out);
3. training through the entry point users call (``python -m training``, here in-process);
4. the exported adapter loaded as the nodes load it, and edits made with held-out phrasings.

It prints the flow loss start → end and the routing report's numbers at init and after training
beside the targets, and writes the report picture and a before/after strip.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "training" / "configs" / "tiny_demo.yaml"

# The demo's targets (measured on a prototype; ../shared/TRAINING.md), on held-out phrasings.
TARGETS = {
    "distinctness": (">=", 0.5),
    "decode_accuracy": (">=", 0.5),
    "swap_gap": (">=", 0.05),
    "flow_vs_base": ("<=", -0.20),
}


def build(out: Path) -> tuple[Path, Path]:
    """The tiny pipeline and the data set (reused when already there)."""
    from instructmole.tiny import save_tiny_kontext

    from .synthetic import all_phrasings, write_dataset

    model, data = out / "tiny-kontext", out / "data"
    if not (model / "model_index.json").is_file():
        save_tiny_kontext(model, seed=0, text_length=32, corpus=all_phrasings())
        fit_decoder(model / "vae")
    manifest = data / "manifest.jsonl"
    if not manifest.is_file():
        write_dataset(data)
    return model, manifest


def fit_decoder(folder: Path, steps: int = 300, seed: int = 0) -> None:
    """Teach the tiny VAE's decoder to invert its (random, frozen) encoder on procedural images."""
    import numpy as np
    from diffusers import AutoencoderKL

    from .synthetic import TASKS, edit, procedural_image

    vae = AutoencoderKL.from_pretrained(folder)
    rng = np.random.default_rng(seed + 1)
    pictures = []
    for _ in range(64):
        image = procedural_image(rng)
        for task in (None, *TASKS):
            pixels = np.asarray(image if task is None else edit(image, task), dtype=np.float32)
            pictures.append(torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1)
    images = torch.stack(pictures)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean
    params = [*vae.decoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    vae.train()
    for _ in range(steps):
        pick = torch.randint(0, len(images), (32,), generator=g)
        loss = (vae.decode(latents[pick]).sample - images[pick]).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval().save_pretrained(folder)


def edit_strip(model_dir: Path, adapter_path: Path, manifest: Path, out: Path) -> Path:
    """Per task, a held-out phrasing on a held-out image: source | wanted | base model | with adapter."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    import instructmole as im

    from .buckets import load_image
    from .cache import encode_texts
    from .evaluate import image_sheet
    from .recipe import LatentNorm
    from .sampling import decode, edit_latents

    transformer = FluxTransformer2DModel.from_pretrained(model_dir / "transformer").eval()
    vae = AutoencoderKL.from_pretrained(model_dir / "vae").eval()
    norm = LatentNorm(vae.config.shift_factor, vae.config.scaling_factor)
    encoders = {
        "t5": T5EncoderModel.from_pretrained(model_dir / "text_encoder_2").eval(),
        "t5_tokenizer": AutoTokenizer.from_pretrained(model_dir / "tokenizer_2"),
        "clip": CLIPTextModel.from_pretrained(model_dir / "text_encoder").eval(),
        "clip_tokenizer": AutoTokenizer.from_pretrained(model_dir / "tokenizer"),
    }
    adapter = im.load_adapter(adapter_path)  # exactly what the Load InstructMoLE Adapter node does
    rows, seen = [], set()
    for line in manifest.read_text().splitlines():
        row = json.loads(line)
        if row["split"] == "holdout" and row["task"] not in seen:
            seen.add(row["task"])
            rows.append(row)
    features = {}
    encode_texts(
        [r["instruction"] for r in rows],
        **encoders,
        text_length=adapter.config.text_length,
        batch_size=8,
        write=lambda text, t: features.__setitem__(text, t),
    )
    strip = []
    for row in rows:
        source = load_image(manifest.parent / row["references"][0], (32, 32))
        wanted = load_image(manifest.parent / row["target"], (32, 32))
        with torch.no_grad():
            z = vae.encode(source[None]).latent_dist.mean
        ref = (z - norm.shift) * norm.scale
        t5, pooled = features[row["instruction"]]["t5"][None], features[row["instruction"]]["pooled"][None]
        base = decode(vae, edit_latents(transformer, t5, pooled, [ref], guidance=1.0), norm)[0]
        with im.attach(transformer, adapter):
            ours = decode(vae, edit_latents(transformer, t5, pooled, [ref], guidance=1.0), norm)[0]
        strip.append([(source + 1) / 2, (wanted + 1) / 2, base, ours])
    sheet = image_sheet(strip)
    sheet = sheet.resize((sheet.width * 4, sheet.height * 4), resample=0)  # 32 px tiles: enlarge to see
    path = out / "edits.png"
    sheet.save(path)
    (out / "edits.txt").write_text("".join(f"{r['task']}: {r['instruction']!r}\n" for r in rows))
    return path


def _metrics(run: Path, step: int) -> dict[str, float]:
    return json.loads((run / "reports" / f"step-{step:07d}.json").read_text())["metrics"]


def _met(key: str, value: float) -> str:
    op, bound = TARGETS[key]
    ok = value >= bound if op == ">=" else value <= bound
    return "yes" if ok else "no"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="where everything is written")
    parser.add_argument("overrides", nargs="*", help="config overrides for the training run (key=value)")
    args = parser.parse_args(argv)
    out: Path = args.out
    started = time.perf_counter()
    model, manifest = build(out)
    run = out / "run"
    print(f"tiny pipeline {model}\ndata set      {manifest}\ntraining      {run} (python -m training)", flush=True)
    from .cli import main as train_cli

    overrides = [f"model.pretrained={model}", f"data.manifest={manifest}", f"train.output_dir={run}", *args.overrides]
    code = train_cli(["--config", str(CONFIG), *overrides])
    if code:
        return code
    adapter = run / "instructmole.safetensors"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = lines[-1]["step"]
    start, end = _metrics(run, 0), _metrics(run, steps)
    print(f"\ntraining flow loss (per log line): {lines[0]['flow']:.3f} -> {lines[-1]['flow']:.3f}")
    print("\nheld-out phrasings      at init   trained   target")
    names = {"distinctness": "distinctness", "decode_accuracy": "decode accuracy", "swap_gap": "swap gap",
             "flow_vs_base": "flow loss vs base", "agreement": "agreement", "balance": "expert balance"}
    for key, name in names.items():
        target = f"{TARGETS[key][0]} {TARGETS[key][1]:g}  {_met(key, end[key])}" if key in TARGETS else "(context)"
        print(f"  {name:<20} {start[key]:>8.3f}  {end[key]:>8.3f}   {target}")
    strip = edit_strip(model, adapter, manifest, out)
    print(f"\nadapter       {adapter}")
    print(f"report        {run / 'reports' / f'step-{steps:07d}.png'}")
    print(f"edits         {strip}  (a row per task: source | wanted | base model | with the adapter)")
    print(f"demo done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
