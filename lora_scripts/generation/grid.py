"""A labelled image grid (e.g. one column per LoRA weight), drawn with Pillow's default font."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)
_FONT_SIZE = 14
_PAD = 4


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=_FONT_SIZE)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def make_grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str]) -> Image.Image:
    """Paste `rows` of equally sized images into one RGB image, `labels[c]` written centred under column c
    of every row. All rows must have len(labels) images."""
    if not rows or any(len(row) != len(labels) for row in rows):
        raise ValueError("every row needs one image per label")
    width, height = rows[0][0].size
    font = _font()
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_height = max(draw_probe.textbbox((0, 0), label or " ", font=font)[3] for label in labels)
    band = text_height + 2 * _PAD
    grid = Image.new("RGB", (width * len(labels), (height + band) * len(rows)), _BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        top = r * (height + band)
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB"), (c * width, top))
            text_width = draw.textlength(labels[c], font=font)
            x = c * width + max(0.0, (width - text_width) / 2)
            draw.text((x, top + height + _PAD), labels[c], fill=_TEXT, font=font)
    return grid
