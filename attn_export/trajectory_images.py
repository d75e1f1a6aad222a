"""The picture of a trajectory check: final images side by side, their difference, and the error's growth.

Layout (all sizes in pixels; ``s = max(1, TILE // max(H, W))`` is the
nearest-neighbour upscale of an H x W image, so a tile is ``H*s`` x ``W*s``):

* a header line (``LINE`` high) naming the three columns;
* per sample, one row: reference | candidate | ``|difference|`` amplified
  ``GAIN`` times as a heatmap (mean over channels, black - red - yellow -
  white), ``PAD`` apart, then a caption line (``LINE``) with the sample's
  PSNR, SSIM and max abs difference;
* the error-growth curve (``PLOT_H`` high): the per-step mean abs difference
  of the sample (blue) and of the model output (orange), log scale.

Width ``max(3*W*s + 4*PAD, MIN_WIDTH)``; height
``PAD + LINE + B*(H*s + LINE + PAD) + PLOT_H + PAD``
(:func:`grid_size`). Drawn with Pillow alone; written atomically (a
temporary file in the same folder, then renamed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import atomic_path
from .errors import UsageError

if TYPE_CHECKING:
    from PIL import Image, ImageDraw

# attn_export.trajectory's report; that module is on this floor, so it is read by its fields, not imported.
TrajectoryReport = Any

TILE = 128
PAD = 8
LINE = 14
PLOT_H = 200
MIN_WIDTH = 420
GAIN = 10.0
_BG, _FG, _GRID = (255, 255, 255), (0, 0, 0), (210, 210, 210)
_SAMPLE, _OUTPUT = (31, 119, 180), (255, 127, 14)


def grid_size(batch: int, height: int, width: int) -> tuple[int, int]:
    """(width, height) of the PNG for ``batch`` images of ``height`` x ``width`` (the module doc's layout)."""
    s = max(1, TILE // max(height, width))
    return max(3 * width * s + 4 * PAD, MIN_WIDTH), PAD + LINE + batch * (height * s + LINE + PAD) + PLOT_H + PAD


def _rgb(img: np.ndarray) -> np.ndarray:
    """(C, H, W) in [0, 1] as (H, W, 3) uint8: three channels as RGB, else the first one in gray."""
    chw = np.nan_to_num(np.asarray(img, np.float64), nan=0.0)
    rgb = chw[:3] if chw.shape[0] >= 3 else np.repeat(chw[:1], 3, axis=0)
    return (np.clip(rgb, 0, 1).transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)


def _heat(diff: np.ndarray) -> np.ndarray:
    """(H, W) |difference| in [0, 1] as a black-red-yellow-white heatmap, (H, W, 3) uint8, amplified GAIN times."""
    v = np.clip(np.nan_to_num(diff, nan=1.0) * GAIN, 0, 1)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return (rgb * 255 + 0.5).astype(np.uint8)


def _tile(pixels: np.ndarray, s: int) -> "Image.Image":
    from PIL import Image

    return Image.fromarray(pixels, "RGB").resize((pixels.shape[1] * s, pixels.shape[0] * s), Image.Resampling.NEAREST)


def _plot(draw: "ImageDraw.ImageDraw", box: tuple[int, int, int, int], report: "TrajectoryReport") -> None:
    """The error-growth curve in ``box`` (left, top, right, bottom): per-step mean abs, log10 axis by decades."""
    left, top, right, bottom = box
    series = [([s.sample_mean_abs for s in report.steps], _SAMPLE, "sample"),
              ([s.output_mean_abs for s in report.steps], _OUTPUT, "model output")]
    floor = 1e-12  # identical steps (a difference of 0) sit on the axis' floor
    values = [max(v, floor) for vs, _, _ in series for v in vs if math.isfinite(v)]
    lo = math.floor(math.log10(min(values))) if values else -12
    hi = math.ceil(math.log10(max(values))) if values else 0
    hi = max(hi, lo + 1)
    title = "mean |difference| per step (log scale)"
    draw.text((left, top), title, fill=_FG)
    axis_l, axis_t, axis_r, axis_b = left + 44, top + LINE + 4, right - 4, bottom - LINE - 2
    n = len(report.steps)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = axis_l + (axis_r - axis_l) * (i / max(n - 1, 1))
        y = axis_b - (axis_b - axis_t) * ((math.log10(max(v, floor)) - lo) / (hi - lo))
        return x, y

    step = max(1, (hi - lo + 5) // 6)  # at most about 6 labelled decades
    for d in range(lo, hi + 1, step):
        y = axis_b - (axis_b - axis_t) * ((d - lo) / (hi - lo))
        draw.line([(axis_l, y), (axis_r, y)], fill=_GRID)
        draw.text((left, y - 6), f"1e{d}", fill=_FG)
    draw.rectangle([axis_l, axis_t, axis_r, axis_b], outline=_FG)
    draw.text((axis_l, axis_b + 2), "step 1", fill=_FG)
    draw.text((axis_r - 48, axis_b + 2), f"step {n}", fill=_FG)
    legend_x = axis_l + 60
    for vs, color, name in series:
        points = [xy(i, v) for i, v in enumerate(vs) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points if len(points) <= 60 else []:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        draw.line([(legend_x, axis_b + 8), (legend_x + 16, axis_b + 8)], fill=color, width=2)
        draw.text((legend_x + 20, axis_b + 2), name, fill=_FG)
        legend_x += 110


def draw_grid(report: "TrajectoryReport") -> "Image.Image":
    """The picture of ``report`` as a Pillow image (layout in the module doc)."""
    from PIL import Image, ImageDraw

    ref, cand = report.reference_images, report.candidate_images
    if ref is None or cand is None:
        raise ValueError("the report holds no final images")
    b, _, h, w = ref.shape
    s = max(1, TILE // max(h, w))
    size = grid_size(b, h, w)
    img = Image.new("RGB", size, _BG)
    draw = ImageDraw.Draw(img)
    tw, th = w * s, h * s
    cols = [PAD + k * (tw + PAD) for k in range(3)]
    for x, text in zip(cols, ("reference", "candidate", f"|difference| x{GAIN:g}")):
        draw.text((x, PAD), text, fill=_FG)
    y = PAD + LINE
    for k in range(b):
        diff = np.abs(np.nan_to_num(cand[k], nan=np.inf) - ref[k]).mean(axis=0)
        for x, pixels in zip(cols, (_rgb(ref[k]), _rgb(cand[k]), _heat(diff))):
            img.paste(_tile(pixels, s), (x, y))
        r = report.images[k] if k < len(report.images) else None
        if r is not None:
            caption = (f"#{k} PSNR {r.psnr:.1f} dB  SSIM {r.ssim:.4f}  max {r.max_abs:.2g}  "
                       + ("pass" if r.passed else "FAIL"))
            draw.text((PAD, y + th + 1), caption, fill=_FG if r.passed else (200, 0, 0))
        y += th + LINE + PAD
    _plot(draw, (PAD, y, size[0] - PAD, y + PLOT_H), report)
    return img


def check_images_path(path: str | Path) -> Path:
    """``path`` if it can take the PNG: a .png name in an existing folder (UsageError, exit 2, otherwise)."""
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise UsageError(f"--images writes a PNG: give a file name ending in .png (got {p.name!r})")
    if p.is_dir() or not p.parent.is_dir():
        raise UsageError(f"cannot write the images to {p}: "
                         + ("it is a folder" if p.is_dir() else f"folder {p.parent} does not exist"))
    return p


def write_grid(report: "TrajectoryReport", path: str | Path) -> Path:
    """Draw ``report`` and write it to ``path`` as PNG, atomically; returns the path."""
    target = check_images_path(path)
    img = draw_grid(report)
    with atomic_path(target, ".png") as tmp:
        img.save(tmp, format="PNG", optimize=True)
    return target


__all__ = ["TILE", "PAD", "LINE", "PLOT_H", "MIN_WIDTH", "GAIN", "grid_size", "draw_grid", "check_images_path",
           "write_grid"]
