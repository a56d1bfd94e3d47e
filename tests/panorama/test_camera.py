"""UCM projection, rotations, equirectangular maps and fisheye rendering against float64 NumPy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from visiontrain.panorama.camera import (
    coverage_mask,
    equirect_lonlat,
    equirect_rays,
    gather_bilinear,
    lonlat_to_equirect_pixels,
    lonlat_to_rays,
    panorama_view_grid,
    rays_to_lonlat,
    render_fisheye,
    render_views,
    rotation_matrix,
    standard_cameras,
    ucm_project,
    ucm_unproject,
)

XIS = [0.0, 0.5, 0.85, 1.0, 1.4]


# ---- an independent float64 NumPy UCM ----------------------------------------------------------------------
# projection: the point goes onto the unit sphere, then a pinhole centred at (0, 0, -xi) images it;
# unprojection: intersect the line from (0, 0, -xi) through (mx, my, 1) with the unit sphere by solving the
# quadratic a λ² + b λ + c = 0 with the general formula (the far root, in front of the centre).

def np_project(p: np.ndarray, xi: float, f: float, cx: float, cy: float) -> np.ndarray:
    s = p / np.linalg.norm(p, axis=-1, keepdims=True)
    zc = s[..., 2] + xi
    return np.stack((f * s[..., 0] / zc + cx, f * s[..., 1] / zc + cy), axis=-1)


def np_unproject(uv: np.ndarray, xi: float, f: float, cx: float, cy: float) -> np.ndarray:
    m = np.stack(((uv[..., 0] - cx) / f, (uv[..., 1] - cy) / f, np.ones(uv.shape[:-1])), axis=-1)
    centre = np.array([0.0, 0.0, -xi])
    a = (m * m).sum(-1)
    b = 2 * (m @ centre)
    c = centre @ centre - 1
    lam = (-b + np.sqrt(b * b - 4 * a * c)) / (2 * a)
    return centre + lam[..., None] * m


def np_camera_axes(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rows = camera +X, +Y, +Z in world coordinates, built from the documented meaning of the angles."""
    fwd = np.array([math.cos(pitch) * math.sin(yaw), -math.sin(pitch), math.cos(pitch) * math.cos(yaw)])
    right = np.array([math.cos(yaw), 0.0, -math.sin(yaw)])  # horizontal, 90° to the right of forward
    down = np.cross(fwd, right)  # completes a right-handed (x right, y down, z forward) frame
    # roll: +X turns towards +Y about the optical axis
    x_axis = math.cos(roll) * right + math.sin(roll) * down
    y_axis = -math.sin(roll) * right + math.cos(roll) * down
    return np.stack((x_axis, y_axis, fwd))


def random_valid_points(n: int, xi: float, rng: np.random.Generator) -> np.ndarray:
    p = rng.normal(size=(n, 3)) * rng.uniform(0.1, 10, size=(n, 1))
    w = xi if xi <= 1 else 1 / xi
    keep = p[:, 2] > (-w + 0.05) * np.linalg.norm(p, axis=1)
    return p[keep]


@pytest.mark.parametrize("xi", XIS)
def test_ucm_round_trip_and_numpy_reference(xi: float) -> None:
    rng = np.random.default_rng(0)
    pts = random_valid_points(4000, xi, rng)
    f, cx, cy = 220.0, 63.5, 60.0
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        pix, valid = ucm_project(torch.from_numpy(pts).to(dtype), xi, f, cx, cy)
        assert valid.all()
        rays, uvalid = ucm_unproject(pix, xi, f, cx, cy)
        assert uvalid.all()
        unit = pts / np.linalg.norm(pts, axis=1, keepdims=True)
        assert np.abs(rays.double().numpy() - unit).max() < tol
        assert np.abs(pix.double().numpy() - np_project(pts, xi, f, cx, cy)).max() < tol * 1e3
    # unprojection against the quadratic-root reference on a pixel grid
    u, v = np.meshgrid(np.linspace(-200, 330, 41), np.linspace(-150, 280, 37))
    uv = np.stack((u, v), -1)
    rays, ok = ucm_unproject(torch.from_numpy(uv), xi, f, cx, cy)
    ref = np_unproject(uv, xi, f, cx, cy) if xi <= 1 else None
    if ref is not None:
        assert ok.all()
        assert np.abs(rays.numpy() - ref).max() < 1e-12


def test_ucm_validity_regions() -> None:
    # xi <= 1: valid iff Z > -xi·|P|
    p = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, -0.8], [1.0, 0.0, -0.3], [0.0, 0.0, -1.0]], dtype=torch.float64)
    p[1:3] = p[1:3] / p[1:3].norm(dim=1, keepdim=True)
    _, valid = ucm_project(p, 0.5, 100.0, 0.0, 0.0)
    assert valid.tolist() == [True, False, True, False]  # z/|p| = 1, -0.62, -0.29, -1 vs -0.5
    # xi > 1: the image circle is r <= 1/sqrt(xi² - 1); beyond it unprojection is undefined
    xi, f = 1.5, 100.0
    r_max = 1 / math.sqrt(xi * xi - 1)
    pix = torch.tensor([[0.99 * r_max * f, 0.0], [1.01 * r_max * f, 0.0]], dtype=torch.float64)
    _, ok = ucm_unproject(pix, xi, f, 0.0, 0.0)
    assert ok.tolist() == [True, False]
    # ...and projection is valid only for Z > -|P| / xi (where the model stops folding back)
    ang = torch.tensor([math.acos(-1 / xi) - 0.01, math.acos(-1 / xi) + 0.01], dtype=torch.float64)
    pts = torch.stack((torch.sin(ang), torch.zeros_like(ang), torch.cos(ang)), -1)
    pixels, valid = ucm_project(pts, xi, f, 0.0, 0.0)
    assert valid.tolist() == [True, False]
    assert pixels[0, 0] < r_max * f


def test_rotation_convention_matches_documented_axes() -> None:
    rng = np.random.default_rng(1)
    for yaw, pitch, roll in rng.uniform(-math.pi, math.pi, size=(20, 3)):
        r = rotation_matrix(torch.tensor(yaw, dtype=torch.float64), torch.tensor(pitch, dtype=torch.float64),
                            torch.tensor(roll, dtype=torch.float64)).numpy()
        assert np.abs(r @ r.T - np.eye(3)).max() < 1e-12
        assert abs(np.linalg.det(r) - 1) < 1e-12
        # camera → world: columns are the camera axes in world coordinates
        assert np.abs(r.T - np_camera_axes(yaw, pitch, roll)).max() < 1e-12
    fwd = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(rotation_matrix(math.pi / 2, 0.0, 0.0).double() @ fwd, torch.tensor([1.0, 0, 0]).double(),
                          atol=1e-6)  # yaw +90° looks right
    up = rotation_matrix(0.0, math.pi / 2, 0.0).double() @ fwd
    assert torch.allclose(up, torch.tensor([0.0, -1.0, 0.0]).double(), atol=1e-6)  # pitch +90° looks up


def test_equirect_convention() -> None:
    h = 8
    lon, lat = equirect_lonlat(h, dtype=torch.float64)
    assert lon.shape == (h, 2 * h)
    assert math.isclose(float(lon[0, 0]), -math.pi + math.pi / (2 * h))  # first column just right of the seam
    assert float(lat[0, 0]) > 0 and float(lat[-1, 0]) < 0  # top row is up
    rays = equirect_rays(h, dtype=torch.float64)
    assert torch.allclose(rays.norm(dim=-1), torch.ones(h, 2 * h, dtype=torch.float64))
    lon2, lat2 = rays_to_lonlat(rays)
    assert torch.allclose(lon2, lon) and torch.allclose(lat2, lat)
    pix = lonlat_to_equirect_pixels(lon, lat, h)
    cols, rows = torch.meshgrid(torch.arange(2 * h), torch.arange(h), indexing="xy")
    assert torch.allclose(pix[..., 0], cols.double()) and torch.allclose(pix[..., 1], rows.double())
    # forward is the middle of the image, right is +X, up is -Y
    r = lonlat_to_rays(torch.tensor([0.0, math.pi / 2, 0.0]), torch.tensor([0.0, 0.0, math.pi / 2]))
    assert torch.allclose(r, torch.tensor([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]]), atol=1e-6)


def dot_panorama(h: int, lon: float, lat: float, sigma_deg: float = 2.0) -> torch.Tensor:
    """A white Gaussian dot on black at (lon, lat): ``[1, 3, H, 2H]``."""
    rays = equirect_rays(h, dtype=torch.float64)
    centre = lonlat_to_rays(torch.tensor(lon, dtype=torch.float64), torch.tensor(lat, dtype=torch.float64))
    ang = torch.acos((rays @ centre).clamp(-1, 1))
    img = torch.exp(-0.5 * (ang / math.radians(sigma_deg)) ** 2)
    return img[None, None].expand(1, 3, h, 2 * h).float().contiguous()


def centroid(img: torch.Tensor) -> np.ndarray:
    w = img.double().clamp_min(0)
    w = torch.where(w > 0.2 * w.max(), w, torch.zeros_like(w))
    v, u = torch.meshgrid(torch.arange(img.shape[0]), torch.arange(img.shape[1]), indexing="ij")
    return np.array([float((w * u).sum() / w.sum()), float((w * v).sum() / w.sum())])


@pytest.mark.parametrize("lon, lat, yaw, pitch, roll, xi", [
    (20.0, 10.0, 0.0, 0.0, 0.0, 0.85),
    (100.0, -15.0, 90.0, 5.0, 20.0, 0.85),
    (-170.0, 5.0, 180.0, -3.0, -10.0, 1.2),  # across the longitude seam
    (-80.0, 25.0, -90.0, 10.0, 45.0, 0.5),
])
def test_render_puts_a_dot_where_the_equations_say(lon, lat, yaw, pitch, roll, xi) -> None:
    size, f = 128, 220.0
    pano = dot_panorama(512, math.radians(lon), math.radians(lat))
    view, valid = render_fisheye(pano, math.radians(yaw), math.radians(pitch), math.radians(roll), xi, f, size)
    assert view.shape == (1, 3, size, size) and valid.all()
    ray = lonlat_to_rays(torch.tensor(math.radians(lon)), torch.tensor(math.radians(lat))).double().numpy()
    cam = np_camera_axes(math.radians(yaw), math.radians(pitch), math.radians(roll)) @ ray
    expected = np_project(cam, xi, f, (size - 1) / 2, (size - 1) / 2)
    found = centroid(view[0, 0])
    assert np.abs(found - expected).max() < 0.35, (found, expected)


def test_render_batched_per_sample_parameters_and_gradients() -> None:
    torch.manual_seed(0)
    pano = torch.rand(3, 3, 32, 64, requires_grad=True)
    yaw = torch.tensor([0.0, 1.0, -2.0])
    pitch = torch.tensor([0.1, -0.2, 0.0])
    roll = torch.tensor([0.0, 0.3, -0.4])
    xi = torch.tensor([0.85, 0.5, 1.1])
    f = torch.tensor([60.0, 50.0, 70.0])
    views, _ = render_fisheye(pano, yaw, pitch, roll, xi, f, 24)
    for i in range(3):
        one, _ = render_fisheye(pano[i:i + 1], float(yaw[i]), float(pitch[i]), float(roll[i]), float(xi[i]),
                                float(f[i]), 24)
        assert torch.allclose(views[i], one[0], atol=1e-6)
    views.sum().backward()
    assert pano.grad is not None and pano.grad.abs().sum() > 0


def test_seam_interpolates_across_the_wrap() -> None:
    pano = torch.zeros(1, 1, 4, 8)
    pano[..., 0] = 1.0  # first column white, last black: halfway across the seam must be 0.5
    back = lonlat_to_rays(torch.tensor([[math.pi]]), torch.tensor([[0.0]]))[None]  # [1, 1, 1, 3]
    from visiontrain.panorama.camera import sample_equirect

    assert torch.allclose(sample_equirect(pano, back), torch.tensor(0.5), atol=1e-5)


def test_standard_views_and_coverage_mask() -> None:
    h, xi, f, size = 32, 0.85, 220.0, 128
    mask = coverage_mask(h, xi, f, size)
    assert mask.shape == (h, 2 * h)
    lon, lat = equirect_lonlat(h, dtype=torch.float64)
    # brute force: project every panorama ray into each standard view with the NumPy reference
    rays = equirect_rays(h, dtype=torch.float64).numpy()
    ref = np.zeros((h, 2 * h), bool)
    for yaw in (0.0, math.pi / 2, math.pi, -math.pi / 2):
        cam = rays @ np_camera_axes(yaw, 0.0, 0.0).T
        front = cam[..., 2] > -xi
        uv = np_project(cam, xi, f, (size - 1) / 2, (size - 1) / 2)
        ref |= front & (uv >= -0.5).all(-1) & (uv <= size - 0.5).all(-1)
    assert (mask.numpy() == ref).all()
    # view centres are seen, the poles are not; 128-pixel views at f = 220 see about ±30° around each axis
    row_eq = int(torch.argmin(lat[:, 0].abs()))
    for lon_deg in (0, 90, 180 - 1, -90):
        col = int(torch.argmin((lon[0] - math.radians(lon_deg)).abs()))
        assert mask[row_eq, col]
    assert not mask[0].any() and not mask[-1].any()
    assert not mask[row_eq, int(torch.argmin((lon[0] - math.radians(45)).abs()))]
    assert standard_cameras(xi, f).shape == (4, 5)


def test_panorama_view_grid_inverts_rendering() -> None:
    """A panorama pixel seen by a view maps to a view pixel whose ray points back at it."""
    cams = torch.tensor([[[0.85, 110.0, 0.3, 0.1, -0.2], [1.1, 90.0, 2.0, -0.1, 0.4]]], dtype=torch.float64)
    pixels, inside, _ = panorama_view_grid(16, cams, 64)
    from visiontrain.panorama.camera import view_rays

    rays_pano = equirect_rays(16, dtype=torch.float64)
    for v in range(2):
        sel = inside[0, v]
        assert sel.sum() > 10
        uv = pixels[0, v][sel]
        rays_cam, _ = ucm_unproject(uv, cams[0, v, 0], cams[0, v, 1], 31.5, 31.5)
        rot = rotation_matrix(cams[0, v, 2], cams[0, v, 3], cams[0, v, 4])
        assert torch.allclose(rays_cam @ rot.T, rays_pano[sel], atol=1e-10)
        rays, _ = view_rays(cams[0, v], 64)
        assert rays.shape == (64, 64, 3)


def test_gather_bilinear_matches_grid_sample() -> None:
    torch.manual_seed(0)
    img = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    pix = torch.rand(2, 50, 2, dtype=torch.float64) * torch.tensor([11.0, 9.0]) - 1.0  # some outside
    grid = torch.stack(((2 * pix[..., 0] + 1) / 9 - 1, (2 * pix[..., 1] + 1) / 7 - 1), -1)[:, None]
    for padding in ("zeros", "border"):
        ours = gather_bilinear(img, pix, padding)
        ref = F.grid_sample(img, grid, mode="bilinear", padding_mode=padding, align_corners=False)[:, :, 0]
        assert torch.allclose(ours, ref, atol=1e-12)


def test_render_views_matches_render_fisheye() -> None:
    torch.manual_seed(1)
    pano = torch.rand(2, 3, 16, 32)
    cams = standard_cameras(0.85, 60.0)[None].expand(2, 4, 5)
    views, valid = render_views(pano, cams, 32)
    assert views.shape == (2, 4, 3, 32, 32) and valid.shape == (2, 4, 32, 32)
    right, _ = render_fisheye(pano, math.pi / 2, 0.0, 0.0, 0.85, 60.0, 32)
    assert torch.allclose(views[:, 1], right, atol=1e-6)
