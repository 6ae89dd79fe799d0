"""Edit quality against a target image: PSNR and SSIM, per image, on images in [0, 1].

No maintained implementation is a dependency of the project (scikit-image, torchmetrics and
pytorch-msssim are not), and neither measure is worth one: both are a few lines of tensor maths,
written here exactly as they are usually reported so that numbers compare with other papers'.

- ``psnr``: ``10·log10(1 / MSE)`` over all pixels and channels of an image (data range 1).
- ``ssim``: Wang, Bovik, Sheikh and Simoncelli (2004), "Image quality assessment: from error
  visibility to structural similarity", with their constants: an 11×11 Gaussian window of σ = 1.5,
  ``C1 = (0.01·L)²``, ``C2 = (0.03·L)²`` with ``L = 1``, population (biased) local variances, each
  channel on its own, and the mean over the positions where the whole window fits (no padding) and
  over the channels. This is scikit-image's ``structural_similarity(gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=...)``, which computes the
  same local statistics and crops the same border before averaging.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SSIM_WINDOW", "psnr", "ssim"]

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
_C1, _C2 = 0.01**2, 0.03**2
# An exact copy has MSE 0 and an infinite PSNR; the MSE is floored here (100 dB) so that a mean over
# images stays a number.
_MSE_FLOOR = 1e-10


def _pairs(images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    if images.shape != targets.shape or images.ndim != 4:
        raise ValueError(
            f"images {tuple(images.shape)} and targets {tuple(targets.shape)} must both be [b, channels, H, W]"
        )
    return images.double(), targets.double()


def psnr(images: Tensor, targets: Tensor) -> Tensor:
    """Per image ``[b]``, the PSNR in dB of ``images`` against ``targets`` (``[b, c, H, W]`` in [0, 1])."""
    x, y = _pairs(images, targets)
    mse = (x - y).pow(2).mean(dim=(1, 2, 3)).clamp_min(_MSE_FLOOR)
    return (10 * torch.log10(1 / mse)).float()


def _window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """The normalised 2-D Gaussian window ``[1, 1, size, size]`` (float64)."""
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(images: Tensor, targets: Tensor) -> Tensor:
    """Per image ``[b]``, the mean SSIM of ``images`` against ``targets`` (``[b, c, H, W]`` in [0, 1],
    both sides at least ``SSIM_WINDOW`` pixels); see the module's docstring for the exact definition."""
    x, y = _pairs(images, targets)
    b, c, h, w = x.shape
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {h}x{w}")
    window = _window()

    def local_mean(t: Tensor) -> Tensor:  # every channel on its own, no padding
        return torch.nn.functional.conv2d(t.reshape(b * c, 1, h, w), window)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + _C1) / (mu_x**2 + mu_y**2 + _C1)
    structure = (2 * cov + _C2) / (var_x + var_y + _C2)
    return (luminance * structure).reshape(b, -1).mean(dim=1).float()
