"""Text for pictures, offline and without system fonts.

Pillow >= 10.1 built with FreeType ships a scalable font (Aileron Regular, ASCII) inside the library:
`ImageFont.load_default(size=...)`. Without FreeType (or on Pillow 10.0) only a fixed ~11-pixel bitmap font
exists; it is drawn at its own size and enlarged by a whole factor (nearest neighbour), so that text keeps
roughly the asked height and stays legible, if blocky. Both fonts cover ASCII only: other characters become "?".
"""

from __future__ import annotations

from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

Colour = tuple[int, int, int]
BLACK: Colour = (0, 0, 0)
WHITE: Colour = (255, 255, 255)
_BITMAP_HEIGHT = 11  # cap-to-descender height of Pillow's built-in bitmap font, in pixels


@lru_cache(maxsize=32)
def _font(size: int) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, int]:
    """(font, enlargement): the scalable font at `size` px, or the bitmap font and the factor to enlarge it by."""
    try:
        return ImageFont.load_default(size=size), 1
    except (ImportError, OSError, TypeError):  # no FreeType (ImportError/OSError) or Pillow 10.0 (TypeError)
        bitmap = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)  # Pillow 10.0: the latter
        return bitmap(), max(1, round(size / _BITMAP_HEIGHT))


def scalable_text() -> bool:
    """Whether text is drawn with the scalable font (False: the enlarged bitmap fallback)."""
    return isinstance(_font(12)[0], ImageFont.FreeTypeFont)


def text_image(text: str, size: int, *, colour: Colour = BLACK, background: Colour = WHITE) -> Image.Image:
    """`text` on one line as an RGB image, about `size` pixels tall (the same height for every text of a size,
    so lines align), as wide as the text."""
    font, factor = _font(int(size))
    text = text.encode("ascii", "replace").decode("ascii")
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    height = probe.textbbox((0, 0), "Hg|", font=font)[3] + 1  # ascender to descender, whatever the text
    width = max(1, int(probe.textlength(text, font=font)) + 1)
    canvas = Image.new("RGB", (width, height), background)
    ImageDraw.Draw(canvas).text((0, 0), text, font=font, fill=colour)
    if factor > 1:
        canvas = canvas.resize((width * factor, height * factor), Image.NEAREST)
    return canvas


def fitted_text_image(
    text: str, size: int, *, max_width: int, colour: Colour = BLACK, background: Colour = WHITE, min_size: int = 8
) -> Image.Image:
    """`text_image`, made smaller (down to `min_size`) and then cut short with ".." until it is <= max_width."""
    image = text_image(text, size, colour=colour, background=background)
    while image.width > max_width and size > min_size:
        size -= 1
        image = text_image(text, size, colour=colour, background=background)
    while image.width > max_width and len(text) > 1:
        text = text[:-3] + ".." if len(text) > 3 else text[:-1]
        image = text_image(text, size, colour=colour, background=background)
    return image
