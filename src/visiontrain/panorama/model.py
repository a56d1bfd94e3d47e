"""Four fisheye views → a conditioning of the 2:1 panorama grid → a flow-matching UNet decoder.

Pipeline, for views ``[B, 4, 3, s, s]`` with cameras ``[B, 4, 5]`` and a panorama ``[B, 3, H, 2H]``:

1. :class:`ViewEncoder` (shared by the four views): ``[B·4, 3, s, s]`` → latents ``[B·4, 4, s/8, s/8]``.
2. :class:`LatentFusion`: the four *square* latents are placed on the *2:1* latent grid by the camera
   geometry. Every panorama pixel's ray is projected into each view (UCM with that view's own ``xi, f`` and
   rotation); the view latent is sampled bilinearly at that point (latent coordinates = view pixel
   coordinates / 8), zero where the view does not see the ray, then averaged over 8 × 8 panorama pixels
   (anti-aliasing: a view covers only a few latent cells of the panorama). So the front latent lands around
   longitude 0 in the middle of the grid, right at +90°, left at −90°, back split across the seam, each
   curved and scaled as the lens maps it. The four warped latents and their coverage fractions are
   concatenated (``4 × (4 + 1)`` channels) and mixed by convolutions into one latent
   ``[B, fused_channels, H/8, 2H/8]``.
3. Conditioning ``[B, fused + 4, H, 2H]``: the fused latent upsampled ×8 (bilinear), plus — unless
   ``backprojection=False`` — the back-projected views (:mod:`.baseline`) and the seen mask at full
   resolution, so seen pixels need not squeeze through the 4-channel latent.
4. Decoder: diffusers' ``UNet2DModel`` on ``concat(x_t, conditioning)``, time ``t · 1000``. The model's output
   is always the flow-matching velocity ``v = x − ε`` (:mod:`.flow_matching`: loss and sampler are unchanged),
   parametrised by ``prediction``:

   * ``"sample"`` (default): the UNet predicts the clean panorama as a *residual over the back-projection
     baseline*, ``x̂ = base + unet(...)`` (``base``: the back-projected views where seen, their mean colour
     elsewhere, i.e. :func:`.baseline.backprojection_baseline`), and the velocity follows from the path,
     ``v̂ = (x̂ − x_t) / max(t, t_min)`` (since ``x_t = (1 − t)x + tε``). The training loss stays the velocity
     MSE, which weights the ``x̂`` error by ``1/t²`` ("x-prediction, v-loss", Li & He 2025, *Back to Basics:
     Let Denoising Generative Models Denoise*). Why: the seen region is then an identity the network need not
     learn, the untrained model starts at the baseline, and one Euler step from ``t = 1`` returns ``x̂``, the
     network's estimate of the conditional mean (the PSNR-optimal answer); more steps add sampled detail.
     With ``keep_seen`` (default) the residual is zeroed on seen pixels, ``x̂ = base + (1 − seen)·unet(...)``:
     the panorama keeps exactly what the cameras saw and the network spends its capacity on the unseen
     region (the usual inpainting contract; without it a 30-CPU-minute model rendered the seen region
     3.9 dB worse than the back-projection it was given).
   * ``"velocity"``: the UNet predicts ``v`` directly (the plain rectified-flow parametrisation).

   With ``wrap_x`` (default for new runs) every padded convolution on the 2:1 grid — the UNet's and the
   latent fusion's — wraps around the longitude seam (:mod:`.wrap`: circular padding in x, zeros at the
   poles) and the fused latent is upsampled across the seam, so the left and right edges of a generated
   panorama meet. Checkpoints saved before the key existed load with ``wrap_x=False``.

The condition is computed once per sample and reused at every sampler step: call :meth:`condition` and
pass its tensor to :meth:`forward`. ``forward`` also accepts ``{"views", "cameras"}`` so a DDP-wrapped
model is called once per training step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visiontrain.panorama.baseline import backproject_views
from visiontrain.panorama.camera import gather_bilinear, panorama_view_grid
from visiontrain.panorama.wrap import upsample_wrap_x, wrap_x_convs

LATENT_STRIDE = 8
PREDICTIONS = ("sample", "velocity")


@dataclass
class PanoramaModelConfig:
    pano_size: int = 64  # panorama height H (width 2H); a multiple of 8
    view_size: int = 128
    latent_channels: int = 4
    encoder_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    fused_channels: int = 8
    unet_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    unet_layers: int = 1
    unet_attention: bool = True  # self-attention at the lowest UNet level (and the mid block)
    norm_groups: int = 8
    backprojection: bool = True
    prediction: str = "sample"  # "sample" (x̂ as a residual over the baseline) | "velocity"
    t_min: float = 0.05  # "sample": v̂ = (x̂ − x_t) / max(t, t_min)
    keep_seen: bool = True  # "sample": x̂ = base on seen pixels (the network only fills the unseen region)
    wrap_x: bool = True  # convolutions on the 2:1 grid wrap around the longitude seam (:mod:`.wrap`)


def check_model_config(cfg: PanoramaModelConfig) -> None:
    """A :class:`ValueError` naming the key and the fix for an architecture that cannot be built (the training
    config runs this when it is loaded, so a bad value fails before any data is read)."""
    for key in ("pano_size", "view_size"):
        size = getattr(cfg, key)
        if size < LATENT_STRIDE or size % LATENT_STRIDE:
            raise ValueError(f"{key}={size}: pano_size and view_size must be multiples of 8 (the model works "
                             f"at 1/8 scale), e.g. {key}={max(1, round(size / LATENT_STRIDE)) * LATENT_STRIDE}")
    if len(cfg.encoder_channels) != 3:
        raise ValueError(f"encoder_channels={list(cfg.encoder_channels)}: give 3 widths (one per ×2 "
                         f"downsampling, 8× in total), e.g. [16,32,64]")
    widths = {"encoder_channels": cfg.encoder_channels, "unet_channels": cfg.unet_channels}
    for key, value in widths.items():
        if not value or min(value) < 1:
            raise ValueError(f"{key}={list(value)}: widths must be positive whole numbers")
    for key in ("latent_channels", "fused_channels", "unet_layers", "norm_groups"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key}={getattr(cfg, key)}: must be >= 1")
    for key, value in widths.items():  # GroupNorm; the encoder uses min(norm_groups, width) groups
        bad = [c for c in value if c % (cfg.norm_groups if key == "unet_channels" else min(cfg.norm_groups, c))]
        if bad:
            raise ValueError(f"{key}={list(value)}: every width must be divisible by norm_groups="
                             f"{cfg.norm_groups} (GroupNorm); {bad} are not")
    levels = len(cfg.unet_channels)
    if cfg.pano_size % (2 ** (levels - 1)):
        raise ValueError(f"pano_size={cfg.pano_size} must be divisible by {2 ** (levels - 1)} for a "
                         f"{levels}-level UNet (unet_channels={list(cfg.unet_channels)})")
    if cfg.prediction not in PREDICTIONS:
        raise ValueError(f"prediction={cfg.prediction!r}: choose 'sample' or 'velocity'")
    if cfg.prediction == "sample" and not cfg.backprojection:
        raise ValueError("prediction='sample' predicts a residual over the back-projection: it needs "
                         "backprojection=True (or use prediction='velocity')")
    if cfg.t_min <= 0:
        raise ValueError(f"t_min={cfg.t_min:g}: must be > 0 (the velocity divides by max(t, t_min))")


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv3x3, twice, with a skip: ``[N, C, h, w] → [N, C, h, w]``."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(_norm(channels, groups), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                  _norm(channels, groups), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ViewEncoder(nn.Module):
    """``[N, 3, s, s] → [N, latent_channels, s/8, s/8]``: three stride-2 convs; a ResBlock after the second and
    the third (the first level, at half the view resolution, only downsamples: it is the costly one)."""

    def __init__(self, channels: list[int], latent_channels: int, groups: int):
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"encoder_channels={channels}: give 3 widths (one per ×2 downsampling, 8× in total)")
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1)]
            layers += [ResBlock(c, groups)] if i > 0 else [nn.SiLU()]
            c_in = c
        layers += [_norm(c_in, groups), nn.SiLU(), nn.Conv2d(c_in, latent_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, views: Tensor) -> Tensor:
        return self.net(views)


class LatentFusion(nn.Module):
    """Four view latents ``[B, V, C, s/8, s/8]`` → one 2:1 latent ``[B, F, H/8, 2H/8]`` (see module docstring)."""

    def __init__(self, latent_channels: int, fused_channels: int, views: int = 4):
        super().__init__()
        c_in = views * (latent_channels + 1)
        self.mix = nn.Sequential(nn.Conv2d(c_in, 64, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(64, fused_channels, 3, padding=1))

    @staticmethod
    def warp(latents: Tensor, pixels: Tensor, inside: Tensor) -> Tensor:
        """Place view latents on the 2:1 latent grid: ``[B, V, C + 1, H/8, 2H/8]`` (features, coverage).

        ``latents [B, V, C, l, l]``; ``pixels [B, V, H, W, 2]`` view pixel coordinates and ``inside
        [B, V, H, W]`` of every panorama pixel (:func:`.camera.panorama_view_grid`).
        """
        b, v, c = latents.shape[:3]
        h, w = pixels.shape[2:4]
        latent_pix = (pixels + 0.5) / LATENT_STRIDE - 0.5
        warped = gather_bilinear(latents.flatten(0, 1), latent_pix.reshape(b * v, h * w, 2), "border")
        mask = inside.reshape(b * v, 1, h * w).to(warped.dtype)
        warped = torch.cat((warped * mask, mask), dim=1).reshape(b * v, c + 1, h, w)
        pooled = F.avg_pool2d(warped, LATENT_STRIDE)  # [B·V, C + 1, H/8, W/8]
        return pooled.reshape(b, v, c + 1, h // LATENT_STRIDE, w // LATENT_STRIDE)

    def forward(self, latents: Tensor, pixels: Tensor, inside: Tensor) -> Tensor:
        """Arguments as :meth:`warp`; returns the fused latent ``[B, F, H/8, 2H/8]``."""
        return self.mix(self.warp(latents, pixels, inside).flatten(1, 2))


class PanoramaFlowModel(nn.Module):
    """Views + cameras → condition; ``(x_t [B, 3, H, 2H], t [B], condition) → velocity [B, 3, H, 2H]``."""

    def __init__(self, cfg: PanoramaModelConfig):
        super().__init__()
        from diffusers import UNet2DModel

        check_model_config(cfg)
        levels = len(cfg.unet_channels)
        self.cfg = cfg
        self.encoder = ViewEncoder(list(cfg.encoder_channels), cfg.latent_channels, cfg.norm_groups)
        self.fusion = LatentFusion(cfg.latent_channels, cfg.fused_channels)
        self.cond_channels = cfg.fused_channels + (4 if cfg.backprojection else 0)
        down = ["DownBlock2D"] * levels
        up = ["UpBlock2D"] * levels
        if cfg.unet_attention:
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        self.unet = UNet2DModel(
            sample_size=(cfg.pano_size, 2 * cfg.pano_size), in_channels=3 + self.cond_channels, out_channels=3,
            block_out_channels=tuple(cfg.unet_channels), layers_per_block=cfg.unet_layers,
            down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=cfg.norm_groups,
            attention_head_dim=min(32, cfg.unet_channels[-1]), add_attention=cfg.unet_attention)
        if cfg.wrap_x:  # seam-free 360°: same parameters, circular padding in x (state-dict keys unchanged)
            wrap_x_convs(self.unet)
            wrap_x_convs(self.fusion)
        if cfg.prediction == "sample":
            with torch.no_grad():  # start close to the baseline (small, not zero: gradients reach every layer)
                self.unet.conv_out.weight.mul_(0.1)
                self.unet.conv_out.bias.zero_()

    def condition(self, views: Tensor, cameras: Tensor) -> Tensor:
        """``views [B, 4, 3, s, s]``, ``cameras [B, 4, 5]`` → conditioning ``[B, cond_channels, H, 2H]``."""
        b, v = views.shape[:2]
        size = views.shape[-1]
        h = self.cfg.pano_size
        pixels, inside, axis_cos = panorama_view_grid(h, cameras.to(torch.float32), size)
        latents = self.encoder(views.flatten(0, 1)).unflatten(0, (b, v))
        fused = self.fusion(latents, pixels, inside)
        if self.cfg.wrap_x:
            parts = [upsample_wrap_x(fused, LATENT_STRIDE)]
        else:
            parts = [F.interpolate(fused, size=(h, 2 * h), mode="bilinear", align_corners=False)]
        if self.cfg.backprojection:
            colours, seen = backproject_views(views, pixels, inside, axis_cos)
            mean = views.mean(dim=(1, 3, 4))[:, :, None, None]  # unseen: the views' mean colour (the baseline)
            base = torch.where(seen[:, None], colours, mean.expand_as(colours))
            parts += [base.to(fused.dtype), seen[:, None].to(fused.dtype)]
        return torch.cat(parts, dim=1)

    def base(self, cond: Tensor) -> Tensor:
        """The back-projection baseline ``[B, 3, H, 2H]`` held in a conditioning tensor."""
        f = self.cfg.fused_channels
        return cond[:, f:f + 3]

    def seen(self, cond: Tensor) -> Tensor:
        """The seen mask ``[B, 1, H, 2H]`` (1 where a view sees the pixel) held in a conditioning tensor."""
        f = self.cfg.fused_channels
        return cond[:, f + 3:f + 4]

    def finalize(self, x: Tensor, cond: Tensor) -> Tensor:
        """A sampler's output with ``keep_seen``'s promise made exact: seen pixels set to the back-projection.

        The Euler path reaches ``x̂`` on seen pixels only approximately, because the velocity divides by
        ``max(t, t_min)`` and the last grid times fall below ``t_min`` (12 steps, shift 2: t = 0.028, 0.007);
        the network compensates for the clamp on the pixels it predicts, not on the pinned ones. Left as is,
        that residual noise cost 0.5 dB on the seen region of the 30-CPU-minute benchmark.
        """
        if self.cfg.prediction != "sample" or not self.cfg.keep_seen:
            return x
        return torch.where(self.seen(cond) > 0.5, self.base(cond).to(x.dtype), x)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | dict[str, Tensor]) -> Tensor:
        if isinstance(cond, dict):
            cond = self.condition(cond["views"], cond["cameras"])
        t = t.reshape(-1).expand(x_t.shape[0]) if t.numel() == 1 else t
        out = self.unet(torch.cat((x_t, cond.to(x_t.dtype)), dim=1), t * 1000).sample
        if self.cfg.prediction == "velocity":
            return out
        if self.cfg.keep_seen:  # seen pixels keep the back-projected colours exactly (inpainting)
            out = out * (1 - self.seen(cond).to(out.dtype))
        x_hat = self.base(cond).to(out.dtype) + out
        tb = t.to(out.dtype).clamp_min(self.cfg.t_min).reshape(-1, 1, 1, 1)
        return (x_hat - x_t) / tb
