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

It prints a line per stage with the elapsed time (and a bar through each long one), the flow loss
start → end and the routing report's numbers at init and after training beside the targets, and
writes the report picture and a labelled picture of the edits. Every random draw is seeded and
the algorithms are deterministic, so two runs on one machine print the same numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "training" / "configs" / "tiny_demo.yaml"

# The demo's targets, on held-out phrasings (docs/training.md, "The demo's targets").
TARGETS = {
    "distinctness": (">=", 0.5),
    "decode_accuracy": (">=", 0.5),
    "swap_gap": (">=", 0.05),
    "flow_vs_base": ("<=", -0.20),
}

# Threads per process. The demo's tensors are tiny (hidden 32, 32x32 images), so an operation is
# over before a second OpenMP thread has paid for waking up: measured on 2 cores, 40 training steps
# took 36 s with torch's default (2 threads) and 3 s with one. One thread is fastest in every stage
# but the VAE's (below).
THREADS = 1
# The VAE stage alone is made of convolutions big enough to share: two threads took it from 78 to
# 55 ms a step on 2 cores. Fixed, not the machine's count, so that its numbers repeat everywhere.
VAE_THREADS = 2
# T5 tokens per instruction: the longest phrasing is six words and an end token.
TEXT_LENGTH = 16


class Clock:
    """The demo's elapsed time, printed with a line at the start and end of every stage.

    Each stage also gives its CPU time: on a busy machine the wall time says little, while the CPU
    time of a one-thread stage is what it takes on an idle core.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        began, cpu = time.perf_counter(), time.process_time()
        print(f"[{self.elapsed():5.0f} s] {name} ...", flush=True)
        yield
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu
        print(f"[{self.elapsed():5.0f} s] {name}: done in {wall:.1f} s (CPU {cpu:.1f} s)", flush=True)


class Recent:
    """The mean of the last ``window`` losses: a stage's loss as it ends, not its first noisy steps."""

    def __init__(self, window: int = 100) -> None:
        self.window, self.values = window, []

    def add(self, value: float) -> None:
        self.values = [*self.values[-(self.window - 1) :], value]

    @property
    def value(self) -> float:
        return sum(self.values) / max(len(self.values), 1)


def progress(total: int, desc: str) -> Any:
    """A bar on a terminal; in a log file a line every 10 s, not one per step."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10)


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """``count`` torch threads for the block, the previous count after it."""
    was = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(was)


@contextlib.contextmanager
def reproducible(count: int = THREADS) -> Iterator[None]:
    """One thread count and deterministic algorithms for the block (the previous settings after it).

    With a fixed thread count the reductions add in a fixed order, so the demo's numbers repeat
    bit for bit on one machine; another thread count (or CPU) may move them in the last digits.
    """
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with threads(count):
            yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def build(out: Path, clock: Clock) -> tuple[Path, Path]:
    """The tiny pipeline and the data set (reused when already complete).

    The pipeline is built in a side folder and renamed when whole, so an interrupted build is
    started afresh rather than reused half-taught.
    """
    from instructmole.tiny import save_tiny_kontext

    from .synthetic import all_phrasings, write_dataset

    model, data = out / "tiny-kontext", out / "data"
    if not (model / "model_index.json").is_file():
        partial = out / "tiny-kontext.partial"
        shutil.rmtree(partial, ignore_errors=True)
        with clock.stage("tiny pipeline: random transformer, VAE, T5 and CLIP"):
            save_tiny_kontext(partial, seed=0, text_length=TEXT_LENGTH, corpus=all_phrasings())
            damp_t5_mixing(partial / "text_encoder_2")
        with clock.stage("VAE: taught to keep colour"), threads(VAE_THREADS):
            loss = fit_vae(partial / "vae")
        print(f"        reconstruction error {loss:.3f} (mean |difference| in [-1, 1])", flush=True)
        with clock.stage("transformer: taught to give back its reference"):
            loss = teach_copy(partial)
        print(f"        flow loss of the copy {loss:.3f} (0 would be a perfect copy)", flush=True)
        shutil.rmtree(model, ignore_errors=True)
        partial.rename(model)
    else:
        print(f"[{clock.elapsed():5.0f} s] tiny pipeline: reusing {model}", flush=True)
    manifest = data / "manifest.jsonl"
    if not manifest.is_file():
        with clock.stage("data set: six tonal edits on procedural images"):
            write_dataset(data)
    return model, manifest


def damp_t5_mixing(folder: Path, scale: float = 0.1) -> None:
    """Give the tiny random T5 what a trained one has and the router relies on: a word keeps its
    feature in a sentence it has never seen.

    A random T5's blocks write about as much of the other words into a token's feature as the word
    itself brings: measured on the demo's phrasings, the feature of "brighten" in "brighten the image"
    and in "brighten the picture" had cosine 0.88 ("cool": 0.73), so a held-out sentence moved the
    router's signal as far as another key word would, and 7 of 24 held-out phrasings routed as
    another task. Scaling each block's residual writes (attention output and feed-forward output)
    by ``scale`` keeps the encoder a real, contextual T5 whose words stay themselves (cosine 0.99):
    on that build 1 of 24 then routed as another task (the demo prints its own count)."""
    from transformers import T5EncoderModel

    t5 = T5EncoderModel.from_pretrained(folder)
    with torch.no_grad():
        for block in t5.encoder.block:
            block.layer[0].SelfAttention.o.weight.mul_(scale)
            block.layer[-1].DenseReluDense.wo.weight.mul_(scale)
    t5.save_pretrained(folder)


def _procedural_latents(vae, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [count, 3, 32, 32] in [-1, 1], their VAE posterior means)``."""
    import numpy as np

    from .synthetic import procedural_image

    rng = np.random.default_rng(seed)
    pixels = [np.asarray(procedural_image(rng), dtype=np.float32) for _ in range(count)]
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        return images, vae.encode(images).latent_dist.mean


def teach_copy(folder: Path, steps: int = 1500, batch: int = 32, seed: int = 0, lr: float = 2e-3) -> float:
    """Teach the tiny random transformer what FLUX.1 Kontext does with an empty instruction: give back
    its reference. A random base never looks at the reference tokens (measured: shuffling them changed
    nothing), and an adapter on top of it learns only task-blind denoising; a real Kontext base reads
    its references, and this gives the tiny one that ability before any adapter sees it."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    from instructmole.kontext import pack, token_ids

    torch.manual_seed(seed)  # the transformer's dropout-free forward draws nothing, but be sure
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
    g = torch.Generator().manual_seed(seed)

    def loss() -> torch.Tensor:
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
        return (out[:, : (h // 2) * (w // 2)] - pack(noise - x0)).pow(2).mean()

    final = _fit(transformer, loss, steps=steps, lr=lr, desc="copy the reference")
    transformer.eval().save_pretrained(folder / "transformer")
    return final


def fit_vae(folder: Path, steps: int = 800, batch: int = 32, seed: int = 0, lr: float = 3e-3) -> float:
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
    g = torch.Generator().manual_seed(seed)

    def loss() -> torch.Tensor:
        x = images[torch.randint(0, len(images), (batch,), generator=g)]
        return (vae.decode(vae.encode(x).latent_dist.mean).sample - x).abs().mean()

    final = _fit(vae, loss, steps=steps, lr=lr, desc="autoencode")
    vae.eval()
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mean
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=1.0 / float(z.std()))
    vae.save_pretrained(folder)
    return final


def _fit(module: torch.nn.Module, loss: Callable[[], torch.Tensor], *, steps: int, lr: float, desc: str) -> float:
    """``steps`` AdamW steps on ``module``'s parameters, each on a fresh ``loss()``, with a bar showing
    the recent loss; returns that loss as the stage ends (``Recent``)."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, fused=True)
    tracker = Recent()
    module.train()
    with progress(steps, desc) as bar:
        for _ in range(steps):
            value = loss()
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            tracker.add(value.item())
            bar.update(1)
            bar.set_postfix(loss=f"{tracker.value:.4f}", refresh=False)
    return tracker.value


# ---- the edits -----------------------------------------------------------------------------------


@dataclass
class Edit:
    """One held-out phrasing on one held-out image, edited by the base model and with the adapter.

    Images are ``[3, H, W]`` in [0, 1]. ``routed_as`` holds the task(s) whose councils the phrasing's
    own council is nearest to (what the router understood); ``base_error`` and
    ``adapter_error`` are the mean absolute difference from the target, in [0, 1].
    """

    task: str
    instruction: str
    source: torch.Tensor
    base: torch.Tensor
    adapter: torch.Tensor
    target: torch.Tensor
    routed_as: tuple[str, ...]

    @property
    def base_error(self) -> float:
        return float((self.base - self.target).abs().mean())

    @property
    def adapter_error(self) -> float:
        return float((self.adapter - self.target).abs().mean())


def _edit_rows(manifest: Path, phrasing: int = 1) -> list[dict]:
    """One held-out row per task, chosen by position, never by its result: task number t (in manifest
    order) shows its t-th held-out image (cyclically), so every task has its own image, with its
    ``phrasing``-th held-out phrasing. All tasks' phrasings come from one held-out sentence (by
    default "{verb} the picture"), so that the rows differ in the key word alone; every held-out
    phrasing's routing is counted in the terminal's summary."""
    by_task: dict[str, list[dict]] = {}
    for line in manifest.read_text().splitlines():
        row = json.loads(line)
        if row["split"] == "holdout":
            by_task.setdefault(row["task"], []).append(row)
    picked = []
    for t, rows in enumerate(by_task.values()):
        images = list(dict.fromkeys(r["references"][0] for r in rows))
        phrasings = list(dict.fromkeys(r["instruction"] for r in rows))
        image, wording = images[t % len(images)], phrasings[phrasing % len(phrasings)]
        match = [r for r in rows if r["references"][0] == image and r["instruction"] == wording]
        picked.append(match[0] if match else rows[0])
    return picked


def _routed_as(council: Any, mean_weights: dict[str, list[list[float]]]) -> tuple[str, ...]:
    """The tasks whose mean council weights (over their training phrasings, from the routing report)
    are nearest to ``council``'s weights (one instance; L1 over layers and experts), in name order:
    one task, or several at the same distance.

    Weights, not member sets: the gates grow decisive (one member near 1, the other near 0), and the
    near-zero member is picked almost at random, so comparing sets named a wrong task for phrasings
    whose edits visibly went the right way."""
    mine = council.weights[0].float()
    distances = {
        task: float((mine - torch.tensor(weights, dtype=torch.float32)).abs().sum())
        for task, weights in mean_weights.items()
    }
    best = min(distances.values())
    return tuple(sorted(t for t, d in distances.items() if d <= best + 1e-6))


def _routing_note(task: str, routed_as: tuple[str, ...]) -> str:
    """What the router made of a phrasing, in words."""
    if routed_as == (task,):
        return "routed as its task"
    others = ", ".join(t for t in routed_as if t != task)
    return f"councils shared with {others}" if task in routed_as else f"routed as {others}"


def make_edits(
    model_dir: Path, adapter_path: Path, manifest: Path, mean_weights: dict[str, list[list[float]]]
) -> tuple[list[Edit], dict[str, tuple[str, tuple[str, ...]]]]:
    """Per task, a held-out phrasing on a held-out image (a different one per task), edited in 28
    steps by the base model and with the adapter (loaded exactly as the Load InstructMoLE Adapter
    node loads it). Also how every held-out phrasing routes: ``{phrasing: (task, routed_as)}``."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    import instructmole as im

    from .buckets import load_image
    from .cache import encode_texts
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
    adapter = im.load_adapter(adapter_path)
    rows = _edit_rows(manifest)
    heldout = {
        r["instruction"]: r["task"]
        for r in map(json.loads, manifest.read_text().splitlines())
        if r["split"] == "holdout"
    }
    features: dict[str, dict[str, torch.Tensor]] = {}
    encode_texts(
        list(heldout),
        **encoders,
        text_length=adapter.config.text_length,
        batch_size=8,
        write=lambda text, t: features.__setitem__(text, t),
    )
    edits = []
    with progress(len(rows), "edit") as bar:
        for row in rows:
            source = load_image(manifest.parent / row["references"][0], (32, 32))
            target = load_image(manifest.parent / row["target"], (32, 32))
            with torch.no_grad():
                z = vae.encode(source[None]).latent_dist.mean
            ref = (z - norm.shift) * norm.scale
            t5, pooled = features[row["instruction"]]["t5"][None], features[row["instruction"]]["pooled"][None]
            base = decode(vae, edit_latents(transformer, t5, pooled, [ref], guidance=1.0), norm)[0]
            with im.attach(transformer, adapter):
                ours = decode(vae, edit_latents(transformer, t5, pooled, [ref], guidance=1.0), norm)[0]
            routed = _routed_as(adapter.route(t5, pooled), mean_weights)
            edits.append(Edit(row["task"], row["instruction"], (source + 1) / 2, base, ours, (target + 1) / 2, routed))
            bar.update(1)
    routing = {}
    for text, task in heldout.items():
        council = adapter.route(features[text]["t5"][None], features[text]["pooled"][None])
        routing[text] = (task, _routed_as(council, mean_weights))
    return edits, routing


EDIT_COLUMNS = ("input", "base model", "with the adapter", "target")


def edits_picture(edits: Sequence[Edit], tile: int = 112) -> Any:
    """A labelled sheet: a row per task (its name, the held-out phrasing, what the router understood,
    each output's error against the target), columns ``EDIT_COLUMNS``; 32 px images enlarged to ``tile``."""
    from PIL import Image, ImageDraw

    from instructmole.viz import _font

    background, ink, dim, warn = (24, 24, 28), (235, 235, 235), (165, 165, 170), (240, 150, 90)
    font, small = _font(16), _font(13)
    gap, pad, head = 8, 12, 28
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = []
    for e in edits:
        routed = _routing_note(e.task, e.routed_as)
        errors = f"error vs target: base {e.base_error:.2f}, adapter {e.adapter_error:.2f}"
        labels.append((e.task, f"\u201c{e.instruction}\u201d", routed, errors))
    widths = [probe.textlength(text, font=font if i == 0 else small) for lab in labels for i, text in enumerate(lab)]
    left = pad + int(max(widths, default=0)) + 2 * gap
    width = left + len(EDIT_COLUMNS) * (tile + gap) - gap + pad
    height = pad + head + len(edits) * (tile + gap) - gap + pad
    sheet = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(EDIT_COLUMNS):
        x = left + c * (tile + gap) + (tile - draw.textlength(name, font=font)) / 2
        draw.text((x, pad), name, fill=ink, font=font)
    for r, (e, lab) in enumerate(zip(edits, labels, strict=True)):
        y = pad + head + r * (tile + gap)
        draw.text((pad, y + 4), lab[0], fill=ink, font=font)
        for i, text in enumerate(lab[1:]):
            colour = warn if i == 1 and e.routed_as != (e.task,) else dim
            draw.text((pad, y + 28 + 18 * i), text, fill=colour, font=small)
        for c, image in enumerate((e.source, e.base, e.adapter, e.target)):
            pixels = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            picture = Image.fromarray(pixels).resize((tile, tile), Image.Resampling.NEAREST)  # see the pixels
            sheet.paste(picture, (left + c * (tile + gap), y))
    return sheet


# ---- the run -------------------------------------------------------------------------------------


def _report(run: Path, step: int) -> dict:
    return json.loads((run / "reports" / f"step-{step:07d}.json").read_text())


def _met(key: str, value: float) -> str:
    op, bound = TARGETS[key]
    ok = value >= bound if op == ">=" else value <= bound
    return "yes" if ok else "no"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="where everything is written")
    parser.add_argument(
        "--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS}: the fastest for tiny tensors)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides for the training run (key=value)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    from .cli import quiet_libraries

    quiet_libraries()  # before diffusers loads: its pipelines' torchvision notices mean nothing here
    with reproducible(args.threads):
        return _run(args.out, args.overrides, Clock())


def _run(out: Path, overrides: Sequence[str], clock: Clock) -> int:
    from .cli import main as train_cli

    model, manifest = build(out, clock)
    run = out / "run"
    if run.exists():  # the demo's own previous run: replaced, so that the numbers are this run's
        shutil.rmtree(run)
    print(f"tiny pipeline {model}\ndata set      {manifest}\ntraining      {run} (python -m training)", flush=True)
    with clock.stage("training (python -m training)"):
        code = train_cli(
            ["--config", str(CONFIG), f"model.pretrained={model}", f"data.manifest={manifest}",
             f"train.output_dir={run}", *overrides]
        )  # fmt: skip
    if code:
        return code
    adapter = run / "instructmole.safetensors"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = lines[-1]["step"]
    first, last = _report(run, 0), _report(run, steps)
    start, end = first["metrics"], last["metrics"]
    print(f"\ntraining flow loss (per log line): {lines[0]['flow']:.3f} -> {lines[-1]['flow']:.3f}")
    print("\nheld-out phrasings      at init   trained   target")
    names = {"distinctness": "distinctness", "decode_accuracy": "decode accuracy", "swap_gap": "swap gap",
             "flow_vs_base": "flow loss vs base", "agreement": "agreement", "balance": "expert balance"}  # fmt: skip
    for key, name in names.items():
        target = f"{TARGETS[key][0]} {TARGETS[key][1]:g}  {_met(key, end[key])}" if key in TARGETS else "(context)"
        print(f"  {name:<20} {start[key]:>8.3f}  {end[key]:>8.3f}   {target}")
    with clock.stage("edits with held-out phrasings"):
        edits, routing = make_edits(model, adapter, manifest, last["mean_weights"])
        picture = out / "edits.png"
        edits_picture(edits).save(picture)
    print("\nedits (error against the target, mean |difference| in [0, 1]):")
    for e in edits:
        routed = "" if e.routed_as == (e.task,) else f"   {_routing_note(e.task, e.routed_as)}"
        print(f"  {e.task:<10} {e.instruction!r:<28} base {e.base_error:.3f}  adapter {e.adapter_error:.3f}{routed}")
    wrong = {text: routed for text, (task, routed) in routing.items() if routed != (task,)}
    print(f"\nheld-out phrasings routed as their task: {len(routing) - len(wrong)} of {len(routing)}")
    for text, routed in wrong.items():
        print(f"  {routing[text][0]:<10} {text!r:<28} {_routing_note(routing[text][0], routed)}")
    print(f"\nadapter       {adapter}")
    print(f"report        {run / 'reports' / f'step-{steps:07d}.png'}")
    print(f"edits         {picture}  (a row per task: input | base model | with the adapter | target)")
    print(f"demo done in {clock.elapsed():.0f} s (CPU {time.process_time():.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
