"""The demo's picture: cut the Mandelbrot set into tiles, put the computed tiles back together.

The built-in task ``mandelbrot_tile(x_min, y_min, x_max, y_max, width, height, max_iter)``
samples both edges of its rectangle (agent/builtins.py), so each tile's rectangle is cut on
the pixel grid of the whole image: neighbouring tiles never sample the same line twice and
the assembled image equals one computed in a single piece.
"""

from __future__ import annotations

import base64
import colorsys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

# The classic view of the whole set, square so that square tiles have square pixels.
DEFAULT_REGION = (-2.2, -1.5, 0.8, 1.5)

# Byte the task uses for points inside the set.
INSIDE = 255


@dataclass(frozen=True)
class Tile:
    """Where one task's tile sits in the image, and the arguments that compute it."""

    column: int  # tile column, 0 = left
    row: int  # tile row, 0 = top
    left: int  # pixel offset in the image
    top: int
    width: int
    height: int
    args: list[Any]  # [x_min, y_min, x_max, y_max, width, height, max_iter]


def plan_tiles(
    tiles_across: int,
    tiles_down: int,
    tile_size: int,
    max_iter: int = 200,
    region: tuple[float, float, float, float] = DEFAULT_REGION,
) -> list[Tile]:
    """Tiles in row-major order (top row first), one task each."""
    if tiles_across < 1 or tiles_down < 1 or tile_size < 2:
        raise ValueError("need at least 1x1 tiles of at least 2x2 pixels")
    x0, y0, x1, y1 = region
    width_px, height_px = tiles_across * tile_size, tiles_down * tile_size
    step_x = (x1 - x0) / (width_px - 1)
    step_y = (y1 - y0) / (height_px - 1)
    tiles: list[Tile] = []
    for row in range(tiles_down):
        for column in range(tiles_across):
            left, top = column * tile_size, row * tile_size
            x_min = x0 + left * step_x
            x_max = x0 + (left + tile_size - 1) * step_x
            y_max = y1 - top * step_y
            y_min = y1 - (top + tile_size - 1) * step_y
            args = [x_min, y_min, x_max, y_max, tile_size, tile_size, max_iter]
            tiles.append(Tile(column, row, left, top, tile_size, tile_size, args))
    return tiles


def decode_tile(value: Mapping[str, Any], tile: Tile) -> bytes:
    """The tile's escape-time bytes; ValueError when the value does not fit the tile."""
    try:
        data = base64.b64decode(value["data"], validate=True)
        width, height = int(value["width"]), int(value["height"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"tile ({tile.column}, {tile.row}): malformed value ({exc})") from None
    if (width, height) != (tile.width, tile.height) or len(data) != width * height:
        raise ValueError(
            f"tile ({tile.column}, {tile.row}): got {width}x{height} with {len(data)} bytes, "
            f"expected {tile.width}x{tile.height}"
        )
    return data


def _palette() -> list[int]:
    """Escape time -> colour: dark blue through orange to white; the set itself black."""
    stops = [(0, (0, 7, 100)), (40, (32, 107, 203)), (110, (237, 255, 255)),
             (170, (255, 170, 0)), (254, (60, 2, 0))]  # fmt: skip
    palette: list[int] = []
    for value in range(256):
        if value == INSIDE:
            palette += [0, 0, 0]
            continue
        for (v0, c0), (v1, c1) in zip(stops, stops[1:], strict=False):
            if v0 <= value <= v1:
                t = (value - v0) / (v1 - v0)
                palette += [round(a + (b - a) * t) for a, b in zip(c0, c1, strict=True)]
                break
    return palette


def escape_image(tiles: Iterable[Tile], values: Mapping[int, Mapping[str, Any]], size: tuple[int, int]) -> Image.Image:
    """Grey-level image (mode "L") of the escape times; ``values`` maps tile position -> value."""
    image = Image.new("L", size, 0)
    for position, tile in enumerate(tiles):
        value = values.get(position)
        if value is None:
            continue  # a failed tile stays black
        image.paste(Image.frombytes("L", (tile.width, tile.height), decode_tile(value, tile)), (tile.left, tile.top))
    return image


def coloured(escape: Image.Image) -> Image.Image:
    """The escape-time image in the demo's palette, as RGB."""
    palette = _palette()
    channels = [escape.point(palette[c::3]) for c in range(3)]
    return Image.merge("RGB", channels)


def worker_colours(workers: Iterable[str]) -> dict[str, tuple[int, int, int]]:
    """A distinct, stable colour per worker (evenly spaced hues in sorted order)."""
    names = sorted(set(workers))
    colours: dict[str, tuple[int, int, int]] = {}
    for i, name in enumerate(names):
        r, g, b = colorsys.hsv_to_rgb(i / max(1, len(names)), 0.75, 1.0)
        colours[name] = (round(r * 255), round(g * 255), round(b * 255))
    return colours


def worker_map(
    escape: Image.Image,
    tiles: list[Tile],
    owners: Mapping[int, str],
    colours: Mapping[str, tuple[int, int, int]],
) -> Image.Image:
    """The picture tinted per tile with the colour of the worker that computed it, tiles
    outlined and labelled with the worker's number (its place in ``colours``)."""
    base = coloured(escape)
    tint = Image.new("RGB", base.size, (40, 40, 40))
    draw = ImageDraw.Draw(tint)
    numbers = {name: i + 1 for i, name in enumerate(colours)}
    for position, tile in enumerate(tiles):
        colour = colours.get(owners.get(position, ""), (40, 40, 40))
        box = (tile.left, tile.top, tile.left + tile.width - 1, tile.top + tile.height - 1)
        draw.rectangle(box, fill=colour)
    image = Image.blend(base, tint, 0.5)
    draw = ImageDraw.Draw(image)
    for position, tile in enumerate(tiles):
        box = (tile.left, tile.top, tile.left + tile.width - 1, tile.top + tile.height - 1)
        draw.rectangle(box, outline=(0, 0, 0))
        owner = owners.get(position)
        label = str(numbers[owner]) if owner in numbers else "?"
        draw.text((tile.left + 3, tile.top + 2), label, fill=(255, 255, 255))
    return image
