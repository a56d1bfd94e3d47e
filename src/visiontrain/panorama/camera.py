"""Fisheye cameras (Unified Camera Model, Mei's form), equirectangular panoramas and the maps between them.

Conventions (one frame for everything):

* **Camera frame** (OpenCV): ``+X`` right, ``+Y`` down, ``+Z`` forward along the optical axis.
* **World frame** = the camera frame of the *front* view at zero rotation: ``+Z`` forward, ``+X`` right,
  ``+Y`` down (so "up" is ``-Y``).
* **Equirectangular image** ``[.., H, W=2H]``: longitude along the width, latitude along the height.
  Column ``j`` is centred at ``lon = (j + 0.5) / W · 2π − π`` (``lon = 0`` = forward ``+Z`` in the middle of
  the image, ``lon = +π/2`` = right ``+X``, the seam at ``±π`` = back). Row ``i`` is centred at
  ``lat = π/2 − (i + 0.5) / H · π`` (top row = up, ``lat > 0`` above the horizon).
  A ray is ``(cos lat · sin lon, −sin lat, cos lat · cos lon)``.
* **Pixels**: integer coordinates are pixel centres; a view of ``size`` pixels spans ``[−0.5, size − 0.5]``
  and its principal point is its centre ``((size − 1) / 2, (size − 1) / 2)``.
* **View rotation** (camera → world) ``R = R_yaw · R_pitch · R_roll``: ``yaw`` turns the optical axis to the
  right (``+X``) about the up axis, ``pitch`` tilts it up, ``roll`` turns the camera about its optical axis
  so that its ``+X`` axis moves towards ``+Y`` (clockwise as seen from behind the camera; the picture then
  turns counter-clockwise). Angles in radians.
* **Camera parameter rows** ``cameras[..., 5] = (xi, f, yaw, pitch, roll)``; ``f`` in pixels.

The four standard views are front (yaw 0), right (yaw π/2), back (yaw π) and left (yaw −π/2).

Every function is vectorised, works on any device and dtype, and is differentiable in its tensor
inputs (the visibility masks are not).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

VIEW_NAMES = ("front", "right", "back", "left")
VIEW_YAWS = (0.0, math.pi / 2, math.pi, -math.pi / 2)
CAMERA_FIELDS = ("xi", "f", "yaw", "pitch", "roll")

Scalar = float | Tensor


# ---- Unified Camera Model ------------------------------------------------------------------------------

def ucm_project(points: Tensor, xi: Scalar, f: Scalar, cx: Scalar, cy: Scalar) -> tuple[Tensor, Tensor]:
    """Project camera-frame points ``[..., 3]`` to pixels ``[..., 2]`` with the UCM (Mei's form).

    ``u = f · X / (Z + xi·‖P‖) + cx``, ``v = f · Y / (Z + xi·‖P‖) + cy``. Parameters are scalars or tensors
    broadcastable to ``points[..., 0]``. ``valid [...]`` is True where the projection is one-to-one:
    ``Z > −w·‖P‖`` with ``w = xi`` for ``xi ≤ 1`` and ``w = 1/xi`` for ``xi > 1`` (beyond it the model folds
    back), and where :func:`ucm_unproject` is defined at the resulting pixel (``1 + (1 − xi²)·r² ≥ 0``).
    Invalid points get finite but meaningless pixels.
    """
    x, y, z = points.unbind(-1)
    xi_t = torch.as_tensor(xi, dtype=points.dtype, device=points.device)
    norm = torch.linalg.vector_norm(points, dim=-1)
    w = torch.where(xi_t <= 1, xi_t, 1 / xi_t.clamp_min(1e-12))
    valid = (z > -w * norm) & (norm > 0)
    denom = z + xi_t * norm
    safe = torch.where(valid & (denom > 0), denom, torch.ones_like(denom))
    mx, my = x / safe, y / safe
    r2 = mx * mx + my * my
    valid = valid & (1 + (1 - xi_t * xi_t) * r2 >= 0)
    pixels = torch.stack((f * mx + cx, f * my + cy), dim=-1)
    return pixels, valid


def ucm_unproject(pixels: Tensor, xi: Scalar, f: Scalar, cx: Scalar, cy: Scalar) -> tuple[Tensor, Tensor]:
    """Unit rays ``[..., 3]`` through pixels ``[..., 2]`` and ``valid [...]``.

    ``m = ((u − cx)/f, (v − cy)/f)``, ``r² = ‖m‖²``, ``k = (xi + sqrt(1 + (1 − xi²)·r²)) / (1 + r²)``,
    ray ``(k·mx, k·my, k − xi)`` (unit length by construction). ``valid`` is ``1 + (1 − xi²)·r² ≥ 0``
    (always true for ``xi ≤ 1``; for ``xi > 1`` the image circle ``r ≤ 1/sqrt(xi² − 1)``). Invalid pixels
    get the ray of the clamped square root.
    """
    mx = (pixels[..., 0] - cx) / f
    my = (pixels[..., 1] - cy) / f
    r2 = mx * mx + my * my
    disc = 1 + (1 - xi * xi) * r2
    valid = disc >= 0
    k = (xi + torch.sqrt(disc.clamp_min(0))) / (1 + r2)
    rays = torch.stack((k * mx, k * my, k - xi), dim=-1)
    return rays / torch.linalg.vector_norm(rays, dim=-1, keepdim=True).clamp_min(1e-12), valid


# ---- rotations -----------------------------------------------------------------------------------------

def rotation_matrix(yaw: Scalar, pitch: Scalar, roll: Scalar) -> Tensor:
    """Camera → world rotation ``[..., 3, 3]`` (``R_yaw · R_pitch · R_roll``, see the module docstring)."""
    yaw, pitch, roll = torch.broadcast_tensors(*(torch.as_tensor(a, dtype=torch.get_default_dtype())
                                                 if not isinstance(a, Tensor) else a for a in (yaw, pitch, roll)))
    one, zero = torch.ones_like(yaw), torch.zeros_like(yaw)
    cy_, sy = torch.cos(yaw), torch.sin(yaw)
    cp, sp = torch.cos(pitch), torch.sin(pitch)
    cr, sr = torch.cos(roll), torch.sin(roll)
    r_yaw = torch.stack([cy_, zero, sy, zero, one, zero, -sy, zero, cy_], -1).unflatten(-1, (3, 3))
    r_pitch = torch.stack([one, zero, zero, zero, cp, -sp, zero, sp, cp], -1).unflatten(-1, (3, 3))
    r_roll = torch.stack([cr, -sr, zero, sr, cr, zero, zero, zero, one], -1).unflatten(-1, (3, 3))
    return r_yaw @ r_pitch @ r_roll


# ---- equirectangular maps ------------------------------------------------------------------------------

def equirect_lonlat(height: int, width: int | None = None, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Longitude and latitude ``[H, W]`` of the pixel centres of an equirectangular image (``W = 2H``)."""
    width = 2 * height if width is None else width
    lon = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width * (2 * math.pi) - math.pi
    lat = math.pi / 2 - (torch.arange(height, device=device, dtype=dtype) + 0.5) / height * math.pi
    return lon[None, :].expand(height, width), lat[:, None].expand(height, width)


def lonlat_to_rays(lon: Tensor, lat: Tensor) -> Tensor:
    """Unit world rays ``[..., 3]`` for longitude / latitude ``[...]`` (radians)."""
    c = torch.cos(lat)
    return torch.stack((c * torch.sin(lon), -torch.sin(lat), c * torch.cos(lon)), dim=-1)


def rays_to_lonlat(rays: Tensor) -> tuple[Tensor, Tensor]:
    """Longitude in ``[−π, π]`` and latitude in ``[−π/2, π/2]`` of world rays ``[..., 3]`` (any length)."""
    x, y, z = rays.unbind(-1)
    lon = torch.atan2(x, z)
    lat = torch.atan2(-y, torch.sqrt(x * x + z * z))
    return lon, lat


def equirect_rays(height: int, width: int | None = None, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Unit world rays ``[H, W, 3]`` through the pixel centres of an equirectangular image."""
    return lonlat_to_rays(*equirect_lonlat(height, width, device, dtype))


def lonlat_to_equirect_pixels(lon: Tensor, lat: Tensor, height: int, width: int | None = None) -> Tensor:
    """Pixel coordinates ``[..., 2] = (x, y)`` in an ``H × W`` equirectangular image (centres at integers)."""
    width = 2 * height if width is None else width
    x = (lon + math.pi) / (2 * math.pi) * width - 0.5
    y = (math.pi / 2 - lat) / math.pi * height - 0.5
    return torch.stack((x, y), dim=-1)


def sample_equirect(equirect: Tensor, rays: Tensor, mode: str = "bilinear") -> Tensor:
    """Bilinearly sample ``equirect [B, C, H, W]`` along world rays ``[B, *S, 3]`` → ``[B, C, *S]``.

    The longitude wraps around (one column of circular padding on each side, so the seam interpolates
    between the last and the first column); latitude is clamped at the poles.
    """
    b, c, h, w = equirect.shape
    spatial = rays.shape[1:-1]
    lon, lat = rays_to_lonlat(rays.reshape(b, 1, -1, 3))
    pix = lonlat_to_equirect_pixels(lon, lat, h, w)
    padded = torch.cat((equirect[..., -1:], equirect, equirect[..., :1]), dim=-1)
    gx = (2 * (pix[..., 0] + 1) + 1) / (w + 2) - 1
    gy = (2 * pix[..., 1] + 1) / h - 1
    grid = torch.stack((gx, gy), dim=-1).to(equirect.dtype)
    out = F.grid_sample(padded, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.reshape(b, c, *spatial)


# ---- fisheye views -------------------------------------------------------------------------------------

def _as_batch(value: Scalar, batch: int, like: Tensor) -> Tensor:
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return t.expand(batch) if t.ndim == 0 else t.reshape(batch)


def view_rays(cameras: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """World rays ``[..., size, size, 3]`` of every pixel of views ``cameras [..., 5]`` and ``valid [..., s, s]``."""
    c = (size - 1) / 2
    coords = torch.arange(size, device=cameras.device, dtype=cameras.dtype)
    pix = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), dim=-1)  # [s, s, 2] = (u, v)
    lead = cameras.shape[:-1]
    par = cameras.reshape(*lead, 1, 1, 5)
    rays_cam, valid = ucm_unproject(pix, par[..., 0], par[..., 1], c, c)
    rot = rotation_matrix(cameras[..., 2], cameras[..., 3], cameras[..., 4])  # [..., 3, 3]
    rays = torch.einsum("...ij,...hwj->...hwi", rot, rays_cam)
    return rays, valid


def render_views(equirect: Tensor, cameras: Tensor, size: int, fill: float = 0.0) -> tuple[Tensor, Tensor]:
    """Render fisheye views from equirectangular images.

    Args:
        equirect: ``[B, C, H, 2H]``.
        cameras: ``[B, V, 5]`` rows ``(xi, f, yaw, pitch, roll)``.
        size: view side in pixels (principal point at the centre).
    Returns:
        ``views [B, V, C, size, size]`` (``fill`` where invalid) and ``valid [B, V, size, size]``.
    """
    b, v = cameras.shape[:2]
    rays, valid = view_rays(cameras.to(equirect.dtype), size)  # [B, V, s, s, 3]
    views = sample_equirect(equirect, rays)  # [B, C, V, s, s]
    views = views.permute(0, 2, 1, 3, 4)
    views = torch.where(valid[:, :, None], views, torch.full_like(views, fill))
    return views, valid


def render_fisheye(equirect: Tensor, yaw: Scalar, pitch: Scalar, roll: Scalar, xi: Scalar, f: Scalar,
                   size: int, fill: float = 0.0) -> tuple[Tensor, Tensor]:
    """One fisheye view per image: ``equirect [B, C, H, 2H]`` → ``views [B, C, size, size]``, ``valid [B, s, s]``.

    Every parameter is a float or a ``[B]`` tensor (per-sample cameras). Differentiable in ``equirect``.
    """
    b = equirect.shape[0]
    cams = torch.stack([_as_batch(a, b, equirect) for a in (xi, f, yaw, pitch, roll)], dim=-1)
    views, valid = render_views(equirect, cams[:, None], size, fill)
    return views[:, 0], valid[:, 0]


def standard_cameras(xi: float, f: float, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """The four standard views (front, right, back, left) as camera rows ``[4, 5]``."""
    rows = [[xi, f, yaw, 0.0, 0.0] for yaw in VIEW_YAWS]
    return torch.tensor(rows, device=device, dtype=dtype)


# ---- panorama → views --------------------------------------------------------------------------------

def panorama_view_grid(height: int, cameras: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Where each panorama pixel lands in each view.

    Args:
        height: panorama height ``H`` (width ``2H``).
        cameras: ``[B, V, 5]``; views of ``size × size`` pixels.
    Returns:
        ``pixels [B, V, H, 2H, 2]`` view pixel coordinates ``(u, v)``, ``inside [B, V, H, 2H]`` (the ray
        projects validly into the view's image), ``axis_cos [B, V, H, 2H]`` (cosine between the ray and the
        view's optical axis, to choose among overlapping views).
    """
    rays = equirect_rays(height, device=cameras.device, dtype=cameras.dtype)  # [H, W, 3]
    rot = rotation_matrix(cameras[..., 2], cameras[..., 3], cameras[..., 4])  # [B, V, 3, 3]
    rays_cam = torch.einsum("bvji,hwj->bvhwi", rot, rays)  # R^T · ray
    c = (size - 1) / 2
    par = cameras[:, :, None, None, :]
    pixels, valid = ucm_project(rays_cam, par[..., 0], par[..., 1], c, c)
    lo, hi = -0.5, size - 0.5
    inside = valid & (pixels >= lo).all(-1) & (pixels <= hi).all(-1)
    return pixels, inside, rays_cam[..., 2]


def coverage_mask(height: int, xi: float, f: float, size: int) -> Tensor:
    """``[H, 2H]`` bool: panorama pixels seen by at least one of the four standard views."""
    cams = standard_cameras(xi, f, dtype=torch.float64)[None]
    _, inside, _ = panorama_view_grid(height, cams, size)
    return inside[0].any(0)


def gather_bilinear(images: Tensor, pixels: Tensor, padding: str = "zeros") -> Tensor:
    """Bilinear sampling by gathering: ``images [N, C, h, w]`` at ``pixels [N, P, 2] = (u, v)`` → ``[N, C, P]``.

    Pixel centres at integers. ``padding="zeros"``: outside the image the samples fade to zero (as
    ``grid_sample``'s zeros padding); ``"border"``: the edge pixels extend outwards. Unlike ``grid_sample``,
    the backward pass (a gather's) is deterministic on CUDA too.
    """
    if padding not in ("zeros", "border"):
        raise ValueError(f"padding={padding!r}: use 'zeros' or 'border'")
    n, c, h, w = images.shape
    u, v = pixels[..., 0], pixels[..., 1]
    u0, v0 = torch.floor(u), torch.floor(v)
    fu, fv = (u - u0).to(images.dtype), (v - v0).to(images.dtype)
    flat = images.reshape(n, c, h * w)
    out = images.new_zeros(n, c, pixels.shape[1])
    for du, dv, wgt in ((0, 0, (1 - fu) * (1 - fv)), (1, 0, fu * (1 - fv)), (0, 1, (1 - fu) * fv), (1, 1, fu * fv)):
        ui, vi = (u0 + du).long(), (v0 + dv).long()
        ok = (ui >= 0) & (ui < w) & (vi >= 0) & (vi < h) if padding == "zeros" else torch.ones_like(fu, dtype=bool)
        idx = (vi.clamp(0, h - 1) * w + ui.clamp(0, w - 1))[:, None].expand(n, c, -1)
        out = out + flat.gather(2, idx) * (wgt * ok)[:, None]
    return out
