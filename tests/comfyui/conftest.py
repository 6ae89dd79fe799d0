"""ComfyUI integration tests: skipped unless COMFYUI_PATH points at a ComfyUI checkout.

Import design (why it looks like this):

- ComfyUI is imported in-process lazily, by the session fixture ``comfy`` (autouse in this folder),
  not at collection time, so collecting the rest of the suite never sees ComfyUI on ``sys.path``.
- How it is imported (``COMFYUI_PATH`` at the front of ``sys.path``, argv swapped for ``--cpu
  --base-directory <tmp>``) and how the pack is loaded (through ComfyUI's own
  ``nodes.load_custom_node``, so its relative imports resolve inside the pack) lives in
  ``bootstrap.py``, shared with ``benchmarks/comfyui.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .bootstrap import REPO_ROOT, bootstrap_comfy, load_pack

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
SKIP_REASON = "COMFYUI_PATH is not set: point it at a ComfyUI checkout to run the ComfyUI integration tests"
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every test of this folder when COMFYUI_PATH is unset (the hook sees the whole session)."""
    if COMFYUI_PATH:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def comfy(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """ComfyUI bootstrapped for CPU (once per session); returns the ``comfy`` package."""
    if not COMFYUI_PATH:
        pytest.skip(SKIP_REASON)
    bootstrap_comfy(COMFYUI_PATH, str(tmp_path_factory.mktemp("comfy_base")))
    import comfy as comfy_pkg

    return comfy_pkg


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread() -> Any:
    """Tiny models on one thread: with 2 threads on a busy 2-core machine a 30 ms KSampler run was
    seen taking 2-3 s (threads spinning against other processes); restored after this folder."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def instructmole_pack(comfy: ModuleType) -> Any:
    """This repo loaded as a custom node pack, the way ComfyUI loads ``custom_nodes/<pack>``."""
    if not (REPO_ROOT / "__init__.py").is_file():
        pytest.skip("the pack's __init__.py does not exist yet")
    return load_pack(REPO_ROOT)


SERVER_ADAPTER = "tiny.safetensors"
SERVER_ICEDIT = "tiny_icedit.safetensors"
SERVER_VAE = "tiny_taesd16.safetensors"
# Random adapters for the tiny Qwen-Image-Edit-2511 and FLUX.2 [klein] (instructmole.tiny_families, seed 0).
SERVER_QWEN_ADAPTER = "tiny_qwen_image_edit.safetensors"
SERVER_KLEIN_ADAPTER = "tiny_flux2_klein.safetensors"


def family_adapter(transformer: Any, seed: int = 1) -> Any:
    """A random adapter for a tiny transformer of another family (``tiny_family_config``), its experts
    and gates drawn as ``tests.helpers.random_adapter`` draws FLUX.1's (nonzero B, decisive gates)."""
    import torch

    import instructmole as im
    from instructmole.tiny_families import tiny_family_config
    from tests.helpers import randomize

    torch.manual_seed(seed)
    return randomize(im.Adapter(im.InstructMoLE(tiny_family_config(transformer), init="lora")), seed=seed)


def write_server_models(base_directory: Path) -> None:
    """Model files the server workflows load: a random adapter for ``tiny_flux(0)`` in
    models/instructmole, and one each for ``tiny_qwen_image(0)`` and ``tiny_flux2(0)``; a random
    ICEdit-format MoE-LoRA for its Fill-shaped twin in models/loras, and a random TAESD VAE with 16
    latent channels in models/vae (the other families' tiny VAEs are built in memory by the test pack).

    TAESD's layers are ``comfy.ops.disable_weight_init`` (left uninitialised), so every tensor is
    drawn from a seeded normal: decoded images are finite and the same on every run.
    """
    import torch
    from comfy.taesd.taesd import TAESD
    from safetensors.torch import save_file

    from instructmole.tiny import tiny_flux
    from instructmole.tiny_families import tiny_flux2, tiny_qwen_image
    from tests.helpers import random_adapter
    from tests.test_icedit import icedit_state_dict

    adapters = base_directory / "models" / "instructmole"
    adapters.mkdir(parents=True, exist_ok=True)
    random_adapter(tiny_flux(0)).save(str(adapters / SERVER_ADAPTER))
    family_adapter(tiny_qwen_image(0)).save(str(adapters / SERVER_QWEN_ADAPTER))
    family_adapter(tiny_flux2(0)).save(str(adapters / SERVER_KLEIN_ADAPTER))
    loras = base_directory / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    fill = tiny_flux(0, in_channels=384, out_channels=64)
    save_file(icedit_state_dict(fill), str(loras / SERVER_ICEDIT), metadata={"format": "pt"})
    vae = base_directory / "models" / "vae"
    vae.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in TAESD(latent_channels=16).state_dict().items()}
    save_file(state, str(vae / SERVER_VAE))


@pytest.fixture(scope="session")
def comfy_server(comfy: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One headless ComfyUI server for the session, with the test node pack, this pack when it has
    an entry point, and the files of ``write_server_models``.

    The pack is symlinked as ``custom_nodes/instructmole`` only once ``__init__.py`` exists, so the
    server smoke test works before the pack does; ``testing_pack`` is linked as
    ``custom_nodes/instructmole_testing``. ``INSTRUCTMOLE_FRONTEND_ROOT`` (a frontend's ``static``
    folder, e.g. from an unpacked newer ``comfyui-frontend-package`` wheel) serves that frontend
    instead of the one the checkout pins (``--front-end-root``), for the browser tests.
    """
    from .server import start_server

    base = tmp_path_factory.mktemp("comfy_server")
    write_server_models(base)
    packs: dict[str, Path] = {"instructmole_testing": HERE / "testing_pack"}
    if (REPO_ROOT / "__init__.py").is_file():
        packs["instructmole"] = REPO_ROOT
    frontend = os.environ.get("INSTRUCTMOLE_FRONTEND_ROOT")
    extra = ["--front-end-root", frontend] if frontend else None
    with start_server(COMFYUI_PATH or "", base, custom_nodes=packs, extra_args=extra) as server:
        yield server


@pytest.fixture(scope="session")
def setup(instructmole_pack: Any) -> dict[str, Any]:
    """The pack's nodes, the tiny diffusers Flux and its ComfyUI twin, and two adapter files in
    models/instructmole (the first with a plain-LoRA part), loaded by the core for the diffusers side."""
    import folder_paths
    import torch

    import instructmole as im
    from instructmole.tiny import tiny_flux
    from tests.helpers import random_adapter

    from .comfy_tiny import comfy_flux_from_diffusers

    nodes = instructmole_pack.nodes
    nodes.common.register_folder()
    folder = folder_paths.get_folder_paths("instructmole")[0]
    os.makedirs(folder, exist_ok=True)
    transformer = tiny_flux(0)
    adapter = random_adapter(transformer, seed=3)
    g = torch.Generator().manual_seed(9)
    for name in (
        "transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.1.proj_mlp",
        "transformer_blocks.1.ff.net.0.proj",
    ):
        mod = transformer.get_submodule(name)
        adapter.lora[f"transformer.{name}.lora_A.weight"] = torch.randn(2, mod.in_features, generator=g) * 0.2
        adapter.lora[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, 2, generator=g) * 0.2
        adapter.lora[f"transformer.{name}.alpha"] = torch.tensor(4.0)
    adapter.save(os.path.join(folder, "tiny.safetensors"))
    second = random_adapter(transformer, seed=11)
    second.save(os.path.join(folder, "second.safetensors"))
    return {
        "nodes": nodes,
        "transformer": transformer,
        "base": comfy_flux_from_diffusers(transformer),
        "adapter": im.load_adapter(os.path.join(folder, "tiny.safetensors")),
        "second": im.load_adapter(os.path.join(folder, "second.safetensors")),
    }
