"""The bundled InstructMoLE trainer for FLUX.1 Kontext [dev] (accelerate; one or many processes).

``python -m training --config my.yaml`` (or ``accelerate launch -m training …``, ``torchrun …``)
validates the config and the data, caches latents and text features, trains the router, gates,
experts and an optional plain LoRA, checkpoints (resumable exactly) and exports adapter files that
the ComfyUI nodes load as they are. Nothing here imports ComfyUI.
"""
