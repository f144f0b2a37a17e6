"""Reading an image a person uploaded: any format Pillow reads, bounded in pixels and memory.

Images over MAX_IMAGE_PIXELS are refused from their header, before decoding (decompression
bombs). At most two images decode at once, JPEGs decode at a reduced scale where that is
enough, and every image is cut down to WORKING_SIDE pixels on its longer side (every
processor here resizes far below that), so many large uploads at once stay bounded in
memory. Messages say what is wrong with the image, never where it is on the server.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_IMAGE_PIXELS = 64_000_000
WORKING_SIDE = 2048
_decoding = threading.BoundedSemaphore(2)


def open_image(path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open a file (or a binary file object) as an RGB image, or raise ValueError with a
    message for the person; images over `max_pixels` are refused before decoding."""
    with _decoding:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    width, height = img.size
                    if width * height > max_pixels:
                        raise ValueError(
                            f"the image is {width} x {height} pixels; the limit is {max_pixels:,} pixels"
                        )
                    img.draft("RGB", (WORKING_SIDE, WORKING_SIDE))
                    img.load()
                    image = prepare_image(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ValueError(f"the image is too large to decode safely (limit {MAX_IMAGE_PIXELS:,} pixels)") from None
        except FileNotFoundError:
            raise ValueError("the uploaded file is gone from the server (uploads are kept for a while): "
                             "upload it again") from None
        except UnidentifiedImageError:
            raise ValueError("the file is not an image that can be read (PNG, JPEG, GIF, WebP, BMP, TIFF ...)") from None
        except (IsADirectoryError, PermissionError, NotADirectoryError):
            raise ValueError("the file cannot be read") from None
        except (OSError, SyntaxError, EOFError):
            raise ValueError("the image is truncated or corrupt") from None
        if max(image.size) > WORKING_SIDE:
            image.thumbnail((WORKING_SIDE, WORKING_SIDE))
        return image


def prepare_image(image: Image.Image) -> Image.Image:
    """Any PIL image (RGBA, CMYK, 16-bit, palette, animated) as the RGB frame models expect."""
    if getattr(image, "is_animated", False):
        image.seek(0)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = array.max() or 1.0
        image = Image.fromarray((array / top * 255).astype("uint8"))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")
