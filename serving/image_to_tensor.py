"""How an image becomes a tensor: uploaded bytes or a JSON array → the 28×28 frame a model was trained on.

The models only ever saw MNIST / Fashion-MNIST frames: 28×28 uint8, light ink on a black (0)
background. MNIST digits were fitted into a 20×20 box (aspect kept, anti-aliased) and placed so their
centre of mass sits at the centre of the frame; Fashion-MNIST products fill the frame with their
longest side, centred. A phone photo of a digit on paper is none of that, so serving rebuilds the
frame the way the data set was built instead of squashing the photo to 28×28, which would leave a
small dark-on-light digit the model has never seen.

Everything a client can get wrong raises :class:`ImageInputError`, whose message says what was wrong
and how to fix it (it becomes the body of an HTTP 400 or 413). Only numpy and Pillow are used.
"""

from __future__ import annotations

import io
import math
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain

import numpy as np
from PIL import Image, ImageOps

from preprocessing import PixelScaling

FRAME = 28
MNIST_BOX = 20
DATASETS = ("mnist", "fashion-mnist")

# Pillow format names Image.open may try; "JPEG" also opens phone photos that carry an MPO index.
PIL_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
ACCEPTED = "PNG, JPEG, GIF, BMP, WebP or TIFF"

# Exceptions Pillow's decoders raise for truncated or malformed files (PNG CRC errors are SyntaxError,
# oversized text chunks ValueError, a short header struct.error or EOFError, a broken zlib stream zlib.error).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)

# A border brighter than this (median of the outer ring) means dark ink on a light background.
LIGHT_BACKGROUND = 127
# Pixels at least this fraction of the brightest one count as content when cropping; fainter ones are
# JPEG ringing, paper texture and anti-aliasing, which would otherwise make the box too big.
CONTENT_FRACTION = 0.1
# After the background is removed, an image whose brightest pixel is below this is blank: stretching
# its contrast would turn sensor noise and compression artefacts into a fake digit.
MIN_INK = 24


class ImageInputError(ValueError):
    """An image or pixel array the service refuses; ``str(err)`` says what and how to fix it."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class ImageLimits:
    """Bounds checked before any pixel is decoded, so a hostile upload costs a header read, not memory."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 25_000_000
    min_side: int = 1


# ----- decoding -------------------------------------------------------------------------------------


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Decode uploaded bytes into a grayscale ``uint8 [H, W]`` array, refusing anything unsafe or broken.

    Sizes are checked in the order they become known: the payload length first, then width × height
    from the header (``Image.open`` reads no pixels), and only then are pixels decoded. Pillow's own
    decompression-bomb warning is turned into an error so it can never be silenced into a decode.
    """
    _check_payload(data, limits)
    return _to_gray(_open_upright(bytes(data), limits))


def is_small_image(data: bytes, max_bytes: int = 32 * 1024, max_pixels: int = 256 * 256) -> bool:
    """True for a file whose decoding costs less than handing it to a thread (tens of microseconds).

    Both bounds matter: a few kilobytes of PNG can hold millions of uniform pixels. The header is
    read, no pixel is; anything Pillow cannot even open counts as small (it fails fast anyway).
    """
    if len(data) > max_bytes:
        return False
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":  # PNG: the size is at a fixed place
        width, height = struct.unpack(">II", data[16:24])
        return width * height <= max_pixels
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception:  # noqa: BLE001 - unreadable: decode_image will refuse it at once, with the reason
        return True
    return width * height <= max_pixels


def _open_upright(data: bytes, limits: ImageLimits) -> Image.Image:
    """Open, size-check, decode and EXIF-rotate; every failure of Pillow on bad bytes becomes ImageInputError.

    Only this function talks to Pillow's file readers, so the broad set of decoder exceptions caught
    here cannot hide a bug in the pixel arithmetic that follows.
    """
    try:
        with _open_checked(data) as img:
            _check_size(img.size, limits)
            img.load()  # GIF, WebP, TIFF: the first frame / page, the one Image.open selects
            _read_exif(img)
            return ImageOps.exif_transpose(img)  # a copy, so it outlives the file
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageInputError(
            f"the image is too large to decode safely ({err}); resize it to at most "
            f"{limits.max_pixels:,} pixels (width × height)",
            status=413,
        ) from err
    except Image.UnidentifiedImageError as err:
        if _sniff(data) is None:
            raise ImageInputError(f"the upload is not an image this service reads; send a {ACCEPTED} file") from err
        raise _corrupt(data, "its header could not be read") from err
    except _DECODE_ERRORS as err:
        raise _corrupt(data, f"{type(err).__name__}: {err}") from err


def _corrupt(data: bytes, detail: str) -> ImageInputError:
    """The refusal for a file that starts like an image but does not decode: usually a cut-off upload."""
    return ImageInputError(
        f"the {_sniff(data) or 'image'} file is truncated or corrupt ({detail}); "
        "re-export the image and upload the whole file"
    )


def _open_checked(data: bytes) -> Image.Image:
    """``Image.open`` (the header only) with Pillow's decompression-bomb warning raised as an error."""
    with _quiet_pillow():
        return Image.open(io.BytesIO(data), formats=PIL_FORMATS)


def _read_exif(img: Image.Image) -> None:
    """Parse EXIF once pixels are loaded (PNG keeps it after the pixels), so exif_transpose re-reads nothing."""
    with _quiet_pillow():
        img.getexif()


@contextmanager
def _quiet_pillow() -> Iterator[None]:
    """Warning filters for parsing client headers: bomb warnings become errors, metadata chatter is dropped.

    ``warnings.catch_warnings`` swaps process-wide state, so concurrent requests in a threaded server
    could restore each other's filters; the lock serialises only these cheap header reads, not decoding.
    """
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


_OPEN_LOCK = threading.Lock()
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
          (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def _sniff(data: bytes) -> str | None:
    """Name the accepted format whose signature the bytes start with, to tell 'corrupt' from 'not an image'."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), None)


def _check_payload(data: bytes, limits: ImageLimits) -> None:
    """Refuse empty and oversized bodies before Pillow sees a byte of them."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ImageInputError(f"expected the image file's bytes, got {type(data).__name__}")
    size = len(data)
    if size == 0:
        raise ImageInputError(f"the upload is empty (0 bytes); send a {ACCEPTED} file as the request body")
    if size > limits.max_bytes:
        raise ImageInputError(
            f"the upload is {size:,} bytes, over the limit of {limits.max_bytes:,}; "
            "send a smaller or more compressed image (a 28×28 to 1000×1000 PNG or JPEG is plenty)",
            status=413,
        )


def _check_size(size: tuple[int, int], limits: ImageLimits) -> None:
    """Refuse by the header's dimensions, which cost nothing, rather than after decoding pixels."""
    width, height = size
    if width * height > limits.max_pixels:
        raise ImageInputError(
            f"the image is {width}×{height} = {width * height:,} pixels, over the limit of "
            f"{limits.max_pixels:,}; resize it (the model sees 28×28, so 1000×1000 is plenty)",
            status=413,
        )
    if min(width, height) < limits.min_side:
        raise ImageInputError(
            f"the image is {width}×{height}; each side must be at least {limits.min_side} pixels"
        )


def _to_gray(img: Image.Image) -> np.ndarray:
    """Any Pillow mode → 8-bit luminance, compositing transparency and rescaling wide pixel types."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _wide_to_uint8(np.asarray(img), integer=True)
    if img.mode == "F":
        return _wide_to_uint8(np.asarray(img), integer=False)
    if img.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in img.info:
        return _composite(img.convert("RGBA"))
    if img.mode == "L":
        return np.array(img, dtype=np.uint8)
    # 1, P, RGB, CMYK, YCbCr, LAB, HSV: through RGB so every mode gets the same ITU-R 601 luma weights.
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    return np.array(rgb.convert("L"), dtype=np.uint8)


def _wide_to_uint8(values: np.ndarray, integer: bool) -> np.ndarray:
    """16/32-bit integer or float pixels → 0..255.

    Integers use a fixed white level of 65535 rather than the image's own range: the file's
    brightness means something (a faint image stays faint instead of having its noise stretched
    into ink), and an 8-bit image widened the usual way (v × 257) decodes to exactly its 8-bit
    values. If every value is ≤ 255 the file is 8-bit data in a wide container and is kept as is
    (on a 65535 scale it would be black). Floats are read as 0..1 when they fit, else as 0..255.
    Anything outside those ranges (signed or 32-bit data) has no white level, so its actual
    min..max range is stretched to 0..255.
    """
    x = values.astype(np.float64)
    if not np.isfinite(x).all():
        raise ImageInputError("the floating-point image contains NaN or infinity; save it as an 8-bit PNG")
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0 and hi <= 1 and not integer:
        x = x * 255.0
    elif lo >= 0 and hi <= 255:
        pass
    elif lo >= 0 and hi <= 65535 and integer:
        x = x * (255.0 / 65535.0)
    elif hi > lo:
        x = (x - lo) * (255.0 / (hi - lo))
    else:
        x = np.zeros_like(x)  # a constant image outside every known range: no contrast, nothing to see
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def _composite(rgba: Image.Image) -> np.ndarray:
    """Flatten transparency onto a background that contrasts with the ink.

    A digit drawn on a transparent canvas has no background colour of its own: black ink needs a
    white background and white ink a black one, or the digit vanishes. The ink's colour is the
    alpha-weighted mean luminance of the visible pixels.
    """
    pixels = np.asarray(rgba)
    luma = np.asarray(rgba.convert("RGB").convert("L"), dtype=np.float64)
    alpha = pixels[..., 3].astype(np.float64) / 255.0
    weight = float(alpha.sum())
    if weight == 0.0:
        return np.zeros(luma.shape, dtype=np.uint8)  # fully transparent: nothing to see
    ink = float((luma * alpha).sum()) / weight
    background = 255.0 if ink < 128 else 0.0
    flat = luma * alpha + background * (1.0 - alpha)
    return np.clip(np.floor(flat + 0.5), 0, 255).astype(np.uint8)


# ----- the data set's frame -------------------------------------------------------------------------


def to_dataset_frame(gray: np.ndarray, dataset: str) -> np.ndarray:
    """Rebuild a grayscale image as a ``uint8 [28, 28]`` light-on-dark frame the way ``dataset`` was made.

    A 28×28 image with a dark background is taken to be in the data set's form already and is
    returned untouched, so a data set image saved as PNG comes back bit for bit. Anything else is
    cropped to its content, resized (MNIST: longest side 20 px, centre of mass at the centre;
    Fashion-MNIST: longest side 28 px, centred) and contrast-stretched to a full-white brightest pixel.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown data set {dataset!r}: expected one of {DATASETS}")
    gray = np.asarray(gray)
    if gray.ndim != 2 or gray.dtype != np.uint8 or gray.size == 0:
        raise ValueError(f"expected a non-empty uint8 [H, W] array, got {gray.dtype} {gray.shape}")
    if _is_light_background(gray):
        gray = 255 - gray
    if gray.shape == (FRAME, FRAME):
        return gray.copy()
    content = _remove_background(gray)
    box = _content_box(content)
    if box is None:
        return np.zeros((FRAME, FRAME), dtype=np.uint8)
    top, bottom, left, right = box
    crop = content[top:bottom, left:right]
    if dataset == "mnist":
        return _place_mnist(crop)
    return _place_fashion(crop)


def _outer_ring(gray: np.ndarray) -> np.ndarray:
    """The border pixels, where the background shows even when the subject is off-centre."""
    if min(gray.shape) <= 2:
        return gray.ravel()
    return np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])


def _is_light_background(gray: np.ndarray) -> bool:
    """Dark ink on paper (or a product on a white page) shows as a light border; the data sets are inverted."""
    return float(np.median(_outer_ring(gray))) > LIGHT_BACKGROUND


def _remove_background(gray: np.ndarray) -> np.ndarray:
    """Subtract the border level so grey paper in a photo becomes the data set's black (0)."""
    level = int(np.median(_outer_ring(gray)))
    return np.clip(gray.astype(np.int16) - level, 0, 255).astype(np.uint8)


def _content_box(content: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box ``(top, bottom, left, right)`` of the pixels bright enough to be ink, or None if blank."""
    peak = int(content.max())
    if peak < MIN_INK:
        return None
    mask = content >= max(1, math.ceil(peak * CONTENT_FRACTION))
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _resize_longest(crop: np.ndarray, longest: int) -> np.ndarray:
    """Scale so the longest side is ``longest`` px, keeping the aspect ratio (the data sets never stretch)."""
    height, width = crop.shape
    scale = longest / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(crop).resize(size, Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)


def _stretch(frame: np.ndarray) -> np.ndarray:
    """Make the brightest pixel 255, as in the data sets, so a dim photo's ink still reads as ink."""
    peak = int(frame.max())
    if peak == 0 or peak == 255:
        return frame
    scaled = frame.astype(np.float64) * (255.0 / peak)
    return np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)


def _place_mnist(crop: np.ndarray) -> np.ndarray:
    """Fit into a 20×20 box and put the centre of mass at the frame's centre, as MNIST was built."""
    digit = _stretch(_resize_longest(crop, MNIST_BOX))
    height, width = digit.shape
    weights = digit.astype(np.float64)
    total = weights.sum()
    if total == 0:
        return np.zeros((FRAME, FRAME), dtype=np.uint8)
    com_y = float((weights.sum(axis=1) * np.arange(height)).sum() / total)
    com_x = float((weights.sum(axis=0) * np.arange(width)).sum() / total)
    # MNIST's centres of mass sit at (14, 14) in pixel-index coordinates (measured on the test split).
    top = min(max(round(FRAME / 2 - com_y), 0), FRAME - height)
    left = min(max(round(FRAME / 2 - com_x), 0), FRAME - width)
    return _paste(digit, top, left)


def _place_fashion(crop: np.ndarray) -> np.ndarray:
    """Longest side to 28 px, centred, as Fashion-MNIST's product photos were.

    When the margin is odd the extra pixel goes before the product (top / left): that is where all
    but a handful of the 10,000 Fashion-MNIST test images put it.
    """
    product = _stretch(_resize_longest(crop, FRAME))
    height, width = product.shape
    return _paste(product, (FRAME - height + 1) // 2, (FRAME - width + 1) // 2)


def _paste(patch: np.ndarray, top: int, left: int) -> np.ndarray:
    frame = np.zeros((FRAME, FRAME), dtype=np.uint8)
    frame[top: top + patch.shape[0], left: left + patch.shape[1]] = patch
    return frame


# ----- the whole path -------------------------------------------------------------------------------


def image_to_model_input(
    data: bytes,
    dataset: str,
    scaling: PixelScaling,
    limits: ImageLimits = ImageLimits(),
) -> tuple[np.ndarray, np.ndarray]:
    """Uploaded bytes → ``(model input float32 [1, 28, 28], frame uint8 [28, 28])``.

    The frame is returned as well because it is exactly what the model saw: a UI shows it, so a
    surprising prediction can be traced to the preprocessing instead of the model.
    """
    frame = to_dataset_frame(decode_image(data, limits), dataset)
    return scaling.apply(frame)[np.newaxis].astype(np.float32, copy=False), frame


# ----- JSON arrays ----------------------------------------------------------------------------------


def array_to_frame(pixels: object) -> np.ndarray:
    """A JSON pixel array (28×28 nested or 784 flat, lists or numpy) → ``uint8 [28, 28]``, as given.

    The JSON path carries the data set's own representation (light on dark), so nothing is inverted,
    cropped or stretched. Units: if the largest value is ≤ 1 the array is read as 0..1 and multiplied
    by 255; otherwise it is 0..255. The rule looks only at the maximum, so it cannot flip on whether
    one pixel happens to be integral, and it loses nothing: read as 0..255, an array whose brightest
    pixel is 1 would be invisible (1/255 of white), so the 0..1 reading is the only useful one (an
    array of integer 0s and 1s becomes a black-and-white image). Values are rounded to the nearest
    integer.
    """
    if isinstance(pixels, np.ndarray) and pixels.dtype != object:
        values = _numbers_from_array(pixels)
    else:  # lists, tuples, and object arrays (which hold Python values, checked one by one)
        values = _numbers_from_lists(pixels.tolist() if isinstance(pixels, np.ndarray) else pixels)
    if not np.isfinite(values).all():
        raise ImageInputError("pixel values must be finite numbers; NaN and Infinity are not allowed")
    if values.min() < 0:
        raise ImageInputError(f"pixel values must not be negative (found {values.min():g}); use 0..255 or 0..1")
    if values.max() > 255:
        raise ImageInputError(f"pixel values must be at most 255 (found {values.max():g}); use 0..255 or 0..1")
    if values.max() <= 1.0:
        values = values * 255.0
    return np.floor(values + 0.5).astype(np.uint8).reshape(FRAME, FRAME)


_SHAPE_HINT = f"send {FRAME} rows of {FRAME} numbers, or one flat list of {FRAME * FRAME}"


def _numbers_from_array(array: np.ndarray) -> np.ndarray:
    """Check a numpy array's type and shape; bool and non-numeric dtypes are not pixels."""
    if array.dtype == np.bool_ or array.dtype.kind not in "iuf":
        raise ImageInputError(f"pixel values must be numbers, got an array of {array.dtype}")
    if array.shape not in ((FRAME, FRAME), (FRAME * FRAME,)):
        raise ImageInputError(f"expected shape [{FRAME}, {FRAME}] or [{FRAME * FRAME}], got {list(array.shape)}; "
                              + _SHAPE_HINT)
    return array.astype(np.float64).ravel()


def _numbers_from_lists(pixels: object) -> np.ndarray:
    """Walk nested lists by hand: numpy would silently turn bools into 0/1 and ragged rows into objects."""
    plain = _plain_numbers(pixels)
    if plain is not None:
        return plain
    if not isinstance(pixels, list | tuple):
        raise ImageInputError(f"expected a list of pixel rows, got {_json_type(pixels)}; " + _SHAPE_HINT)
    nested = [isinstance(v, list | tuple) for v in pixels]
    if not any(nested):
        if len(pixels) != FRAME * FRAME:
            raise ImageInputError(f"expected shape [{FRAME}, {FRAME}] or [{FRAME * FRAME}], got a flat list of "
                                  f"{len(pixels)} values; " + _SHAPE_HINT)
        return np.array([_number(v, f"[{i}]") for i, v in enumerate(pixels)], dtype=np.float64)
    if not all(nested):
        raise ImageInputError("the array mixes numbers and lists at its top level; " + _SHAPE_HINT)
    _check_rows(pixels)
    return np.array([_number(v, f"[{r}][{c}]") for r, row in enumerate(pixels) for c, v in enumerate(row)],
                    dtype=np.float64)


def _plain_numbers(pixels: object) -> np.ndarray | None:
    """The usual request at C speed: 28 lists of 28 ints or floats, or one flat list of 784.

    Checking the set of element types is as strict as the walk below (bool is its own type, so it is
    not let through as an int), only without a Python call per pixel, which cost a fifth of the
    worker's time under load. Anything else returns None and takes the walk, which names what is wrong.
    """
    if type(pixels) is not list:
        return None
    if len(pixels) == FRAME and all(type(row) is list and len(row) == FRAME for row in pixels):
        flat = list(chain.from_iterable(pixels))
    elif len(pixels) == FRAME * FRAME:
        flat = pixels
    else:
        return None
    if not set(map(type, flat)) <= {int, float}:
        return None
    try:
        return np.array(flat, dtype=np.float64)
    except OverflowError:  # an integer beyond float range: the walk reports it
        return None


def _check_rows(rows: Sequence[Sequence[object]]) -> None:
    """Reject ragged, deeper or wrongly sized nestings, naming the shape that was sent."""
    lengths = {len(row) for row in rows}
    if len(lengths) > 1:
        short = next(i for i, row in enumerate(rows) if len(row) != len(rows[0]))
        raise ImageInputError(
            f"the rows have different lengths (row 0 has {len(rows[0])}, row {short} has {len(rows[short])}); "
            + _SHAPE_HINT
        )
    width = lengths.pop() if lengths else 0
    deeper = any(isinstance(v, list | tuple) for row in rows for v in row)
    shape = f"[{len(rows)}, {width}{', …' if deeper else ''}]"
    if deeper or (len(rows), width) != (FRAME, FRAME):
        raise ImageInputError(f"expected shape [{FRAME}, {FRAME}] or [{FRAME * FRAME}], got {shape}; " + _SHAPE_HINT)


def _number(value: object, where: str) -> float:
    """One pixel: an int or float, never a bool (JSON true/false) or a string."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ImageInputError(f"pixel {where} is {_json_type(value)} {value!r:.40}; pixel values must be numbers")
    try:
        return float(value)
    except OverflowError as err:  # an integer too big for a float is certainly over 255
        raise ImageInputError(f"pixel {where} is far above 255; pixel values must lie in 0..255 or 0..1") from err


def _json_type(value: object) -> str:
    """Name a value the way a JSON client would recognise it."""
    names = {bool: "a boolean", str: "a string", dict: "an object", type(None): "null", list: "a list"}
    return names.get(type(value), f"a {type(value).__name__}")
