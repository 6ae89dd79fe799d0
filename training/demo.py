"""The embedded demo: train a real tiny InstructMoLE adapter on six tonal edit tasks, then use it.

``bash scripts/demo.sh`` (``python -m training.demo``) runs, with no download, on a CPU:

1. a tiny random Kontext-shaped pipeline saved in diffusers layout (transformer, VAE, T5 and CLIP
   with tokenizers made in-process), whose VAE and transformer are then taught for a few seconds
   what the real ones can do and a random one cannot: the VAE to keep colour, the transformer to
   give back its reference image (``fit_vae``, ``teach_copy``);
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
        started = time.perf_counter()
        save_tiny_kontext(model, seed=0, text_length=32, corpus=all_phrasings())
        fit_vae(model / "vae")
        teach_copy(model)
        print(f"built the tiny pipeline in {time.perf_counter() - started:.0f} s", flush=True)
    manifest = data / "manifest.jsonl"
    if not manifest.is_file():
        write_dataset(data)
    return model, manifest


def _procedural_latents(vae, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [count, 3, 32, 32] in [-1, 1], their VAE posterior means)``."""
    import numpy as np

    from .synthetic import procedural_image

    rng = np.random.default_rng(seed)
    pixels = [np.asarray(procedural_image(rng), dtype=np.float32) for _ in range(count)]
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        return images, vae.encode(images).latent_dist.mean


def teach_copy(folder: Path, steps: int = 3000, batch: int = 32, seed: int = 0) -> None:
    """Teach the tiny random transformer what FLUX.1 Kontext does with an empty instruction: give back
    its reference. A random base never looks at the reference tokens (measured: shuffling them changed
    nothing), and an adapter on top of it learns only task-blind denoising; a real Kontext base reads
    its references, and this gives the tiny one that ability before any adapter sees it."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    from instructmole.kontext import pack, token_ids

    transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    length = AutoTokenizer.from_pretrained(folder / "tokenizer_2").model_max_length
    with torch.no_grad():  # the empty instruction's features
        ids = AutoTokenizer.from_pretrained(folder / "tokenizer_2")([""], padding="max_length", max_length=length)
        text = T5EncoderModel.from_pretrained(folder / "text_encoder_2")(torch.tensor(ids.input_ids)).last_hidden_state
        clip_tok = AutoTokenizer.from_pretrained(folder / "tokenizer")
        clip_ids = clip_tok([""], padding="max_length", max_length=clip_tok.model_max_length).input_ids
        pooled = CLIPTextModel.from_pretrained(folder / "text_encoder")(torch.tensor(clip_ids)).pooler_output
    _, latents = _procedural_latents(vae, 512, seed + 7)
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    h, w = latents.shape[-2:]
    positions = token_ids((h, w), [(h, w)])
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    transformer.train()
    for _ in range(steps):
        x0 = latents[torch.randint(0, len(latents), (batch,), generator=g)]
        sigma = torch.rand(batch, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        out = transformer(
            hidden_states=torch.cat([pack(x_t), pack(x0)], dim=1),
            encoder_hidden_states=text.expand(batch, -1, -1),
            pooled_projections=pooled.expand(batch, -1),
            timestep=sigma,
            img_ids=positions,
            txt_ids=torch.zeros(text.shape[1], 3),
            guidance=torch.ones(batch),
            return_dict=False,
        )[0]
        loss = (out[:, : (h // 2) * (w // 2)] - pack(noise - x0)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    transformer.eval().save_pretrained(folder / "transformer")


def fit_vae(folder: Path, steps: int = 800, batch: int = 32, seed: int = 0) -> None:
    """Teach the tiny VAE to be an autoencoder of the procedural images (and their tonal edits).

    A random encoder ends in a GroupNorm that normalises away an image's overall colour and
    brightness, which are exactly what tonal edits change: in its latents a darkened image looks
    like the original. A trained FLUX VAE keeps colour; a few seconds of training give the tiny
    one that property. Its config then gets its own ``shift_factor``/``scaling_factor`` (as FLUX's
    have for the real VAE): normalised latents of these images have mean 0 and std 1.
    """
    import numpy as np
    from diffusers import AutoencoderKL

    from .synthetic import TASKS, edit, procedural_image

    vae = AutoencoderKL.from_pretrained(folder)
    rng = np.random.default_rng(seed + 1)
    pictures = []
    for _ in range(96):
        image = procedural_image(rng)
        pictures += [np.asarray(image if t is None else edit(image, t), dtype=np.float32) for t in (None, *TASKS)]
    images = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2) / 127.5 - 1
    optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    vae.train()
    for _ in range(steps):
        x = images[torch.randint(0, len(images), (batch,), generator=g)]
        loss = (vae.decode(vae.encode(x).latent_dist.mean).sample - x).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval()
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mean
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=1.0 / float(z.std()))
    vae.save_pretrained(folder)


def edit_strip(model_dir: Path, adapter_path: Path, manifest: Path, out: Path) -> Path:
    """Per task, a held-out phrasing on a held-out image (a different one per task): source | wanted |
    base model | with the adapter."""
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
    rows, seen_tasks, seen_images = [], set(), set()
    for line in manifest.read_text().splitlines():
        row = json.loads(line)
        image = row["references"][0]
        if row["split"] == "holdout" and row["task"] not in seen_tasks and image not in seen_images:
            seen_tasks.add(row["task"])
            seen_images.add(image)
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
