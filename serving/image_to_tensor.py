"""How an image becomes a tensor: uploaded bytes or a JSON array → the 28×28 frame a model was trained on.

The models only ever saw MNIST / Fashion-MNIST frames: 28×28 uint8, light ink on a black (0)
background. MNIST digits were fitted into a 20×20 box (aspect kept, anti-aliased) and placed so their
centre of mass sits at the centre of the frame; Fashion-MNIST products fill the frame with their
longest side, centred. A phone photo of a digit on paper is none of that, so serving rebuilds the
frame the way the data set was built instead of squashing the photo to 28×28, which would leave a
small dark-on-light digit the model has never seen.

Everything a client can get wrong raises :class:`ImageInputError`, whose message says what was wrong
and how to fix it (it becomes the body of an HTTP 400 or 413). Pillow decodes; numpy and OpenCV
(headless) do the pixel work.
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

import cv2
import numpy as np
from PIL import Image, ImageOps

from preprocessing import PixelScaling
from serving.shadow import find_shadow_edge

FRAME = 28
MNIST_BOX = 20
DATASETS = ("mnist", "fashion-mnist")

# Pillow format names Image.open may try; "JPEG" also opens phone photos that carry an MPO index.
PIL_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
ACCEPTED = "PNG, JPEG, GIF, BMP, WebP or TIFF"

# Exceptions Pillow's decoders raise for truncated or malformed files (PNG CRC errors are SyntaxError,
# oversized text chunks ValueError, a short header struct.error or EOFError, a broken zlib stream zlib.error).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)

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
#
# A photo is turned into the data set's frame in the steps a careful person would take:
#
# 1. work on a copy whose longest side is WORK_SIDE, lightly smoothed (sensor noise, JPEG blocks);
# 2. find the sheet: when a sheet of paper lies on a table of another shade, only the sheet is searched
#    (its edge and the table around it are not the subject);
# 3. tell ink from paper: the side the picture deviates to from its rim (dark ink on light paper, or
#    light on dark), against a smooth background surface fitted to the paper (uneven lighting, shadows);
# 4. threshold that contrast (Otsu, never below a floor set by the picture's own noise), label the
#    connected components, drop those touching the border or the sheet's edge, long thin lines (ruled
#    lines, paper edges) and specks, and keep the largest component with the strokes near it (a digit
#    may be several components);
# 5. cut the subject out of the full-resolution picture at 4× the frame's resolution, bring the stroke
#    width toward MNIST's (digits), and frame it as the data set was built.
#
# OpenCV does the pixel work (threshold, labelling, morphology, resampling): see the README for why.

# Longest side of the copy the search runs on; smaller pictures are enlarged to MIN_WORK_SIDE.
WORK_SIDE = 384
MIN_WORK_SIDE = 192
# The frame is cut out of the picture at this many pixels per frame pixel, then area-averaged down.
DETAIL = 4
# A picture whose subject deviates from the paper by less than this (0..255) is blank.
MIN_INK = 24
# Contrast below this never counts as ink, however clean the picture (JPEG ringing, paper texture).
MIN_CONTRAST = 12.0
# MNIST's stroke width in frame pixels, measured on 3,000 training digits with _stroke_width:
# quartiles 1.67 / 1.97 / 2.32. Subjects outside [STROKE_MIN, STROKE_MAX] are brought to STROKE_TARGET.
STROKE_TARGET = 2.0
STROKE_MIN = 1.3
STROKE_MAX = 3.0
# The lower threshold of the hysteresis, as a fraction of the (Otsu) ink threshold.
HYSTERESIS = 0.35
# Kept for callers that imported them: the old crop rule's constants.
LIGHT_BACKGROUND = 127
CONTENT_FRACTION = 0.1


def to_dataset_frame(gray: np.ndarray, dataset: str) -> np.ndarray:
    """Rebuild a grayscale image as a ``uint8 [28, 28]`` light-on-dark frame the way ``dataset`` was made.

    A 28×28 image is taken to be in the data set's form already (inverted when its background is
    light) and is otherwise returned untouched, so a data set image saved as PNG comes back bit for
    bit and costs nothing. Anything else goes through :func:`find_subject` and is framed as the data set
    was built (MNIST: longest side 20 px, centre of mass at the centre; Fashion-MNIST: longest side
    28 px, centred), its brightest pixel made full white.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown data set {dataset!r}: expected one of {DATASETS}")
    gray = np.asarray(gray)
    if gray.ndim != 2 or gray.dtype != np.uint8 or gray.size == 0:
        raise ValueError(f"expected a non-empty uint8 [H, W] array, got {gray.dtype} {gray.shape}")
    if gray.shape == (FRAME, FRAME):
        return 255 - gray if float(np.median(_outer_ring(gray))) > LIGHT_BACKGROUND else gray.copy()
    subject = find_subject(gray, dataset)
    if subject is None:
        return np.zeros((FRAME, FRAME), dtype=np.uint8)
    if dataset == "mnist":
        return _place_mnist(subject)
    return _place_fashion(subject)


@dataclass(frozen=True)
class _Scene:
    """What the search learnt about a picture, in the coordinates of its working copy."""

    scale: float  # working-copy pixels per picture pixel
    dark_ink: bool
    background: np.ndarray  # the paper's level at each pixel of the working copy (float32)
    threshold: float  # contrast (0..255) above which a pixel is ink
    low: float  # contrast above which a pixel connected to ink is ink too
    reference: float  # the paper's typical level (dark ink: contrast is measured relative to the paper)
    subject: np.ndarray  # bool mask of the kept components, working copy
    box: tuple[int, int, int, int]  # (top, bottom, left, right) of the subject, working copy


def find_subject(gray: np.ndarray, dataset: str) -> np.ndarray | None:
    """The subject of a picture as float32 ink (0 = background, 1 = full ink), cropped to it, or None if blank.

    The crop has DETAIL × the frame's resolution (longest side 80 px for MNIST's 20-px box, 112 px for
    Fashion-MNIST's 28). Digits have their stroke width brought into MNIST's range.
    """
    scene = _search(gray, local=dataset == "mnist")
    if scene is None:
        return None
    ink = _cut_out(gray, scene, dataset)
    if ink is None:
        return None
    if dataset == "mnist":
        ink = _normalise_strokes(ink)
    return _trim(ink)


def _search(gray: np.ndarray, local: bool = False) -> _Scene | None:
    height, width = gray.shape
    scale = min(WORK_SIDE / max(height, width), max(1.0, MIN_WORK_SIDE / max(height, width)))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    work = cv2.resize(gray, size, interpolation=interpolation) if scale != 1 else gray
    smooth = cv2.GaussianBlur(work.astype(np.float32), (0, 0), 1.0)
    sheet = _find_sheet(smooth)
    scenes = [sheet, None] if sheet is not None else [None]
    for region in scenes:  # inside the sheet first; the whole picture if nothing is found there
        scene = _search_region(smooth, region, scale, local)
        if scene is not None:
            return scene
    return None


def _border_mask(shape: tuple[int, int], width: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[:width], mask[-width:], mask[:, :width], mask[:, -width:] = True, True, True, True
    return mask


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every region it encloses filled (what is not reachable from the border)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 1)  # the outside, reached from the padded corner
    return (padded | (1 - flood)).astype(bool)[1:-1, 1:-1]


def _find_sheet(smooth: np.ndarray) -> np.ndarray | None:
    """The sheet of paper when the picture shows one on a table of another shade, else None.

    A sheet is the largest region of one side of an Otsu threshold that, with what lies on it filled
    in, covers 15–95% of the picture, is a near-perfect (possibly tilted) rectangle, and leaves the
    table visible along the picture's border. Clothes are not rectangles that fill their bounding box.
    """
    image = np.clip(smooth, 0, 255).astype(np.uint8)
    level = _otsu(image.ravel())
    # Paper, table and ink are three levels: besides Otsu's split, split each side again, so the sheet is
    # found whether the ink or the table is the darkest thing in the picture.
    levels = [level, _otsu(image[image > level]), _otsu(image[image <= level])]
    sides = [side for t in levels if t is not None for side in (image > t, image <= t)]
    # Light falling off across the table can make one end of the table as bright as the other end of
    # the sheet: divided by its own heavy blur, the picture keeps the sheet's step and loses the slope.
    small = cv2.resize(smooth, (max(1, smooth.shape[1] // 8), max(1, smooth.shape[0] // 8)),
                       interpolation=cv2.INTER_AREA)
    lighting = cv2.resize(cv2.GaussianBlur(small, (0, 0), max(small.shape) / 4), smooth.shape[::-1],
                          interpolation=cv2.INTER_LINEAR)
    flat = smooth / np.maximum(lighting, 1.0)
    flat = np.clip(flat * 128, 0, 255).astype(np.uint8)
    flat_level = _otsu(flat.ravel())
    if flat_level is not None:
        sides += [flat > flat_level, flat <= flat_level]
    total = image.size
    border = _border_mask(image.shape, 1)
    best = None
    for side in sides:
        count, labels, stats, _ = cv2.connectedComponentsWithStats(side.astype(np.uint8), connectivity=8)
        if count < 2:
            continue
        largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        filled = _fill_holes(labels == largest)
        area = int(filled.sum())
        if not 0.15 * total <= area <= 0.95 * total or (~filled & border).sum() < 0.1 * border.sum():
            continue
        (_, _), (w, h), _ = cv2.minAreaRect(_outline(filled))
        if w * h <= 0 or area / (w * h) < 0.92:
            continue
        if best is None or area > best[0]:
            best = (area, filled)
    if best is None:
        return None
    # The sheet's edge is blurred over a few pixels: search only well inside it.
    margin = max(2, round(0.02 * max(image.shape)))
    inner = cv2.erode(best[1].astype(np.uint8), np.ones((2 * margin + 1, 2 * margin + 1), np.uint8))
    return inner.astype(bool) if inner.any() else None


def _otsu(values: np.ndarray) -> float | None:
    """Otsu's threshold of uint8 values (None for fewer than 16 of them)."""
    if values.size < 16:
        return None
    level, _ = cv2.threshold(values.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(level)


def _outline(mask: np.ndarray) -> np.ndarray:
    """The points of a mask's outer contours (enough for its minimum-area rectangle, far fewer than its pixels)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return np.concatenate(contours) if contours else np.zeros((1, 1, 2), np.int32)


def _rim(region: np.ndarray) -> np.ndarray:
    """The outermost pixels of a region (the picture's border when the region is the whole picture)."""
    eroded = cv2.erode(region.astype(np.uint8), np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT,
                       borderValue=0)
    return region & ~eroded.astype(bool)


def _least_squares(design: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Least squares through the 6×6 normal equations (the features are scaled to 0..1, so well conditioned)."""
    gram = design.T @ design + 1e-6 * np.eye(design.shape[1])
    return np.linalg.solve(gram, design.T @ values)


def _mad(values: np.ndarray) -> float:
    """Robust standard deviation (1.4826 × median absolute deviation)."""
    return 1.4826 * float(np.median(np.abs(values - np.median(values)))) if values.size else 0.0


def _design(xs: np.ndarray, ys: np.ndarray, height: int, width: int) -> np.ndarray:
    """Quadratic surface features of picture coordinates, normalised to 0..1 so the fit is well conditioned."""
    u, v = xs / max(width, 1), ys / max(height, 1)
    return np.stack([np.ones_like(u), u, v, u * u, u * v, v * v], axis=1)


def _search_region(smooth: np.ndarray, region: np.ndarray | None, scale: float, local: bool = False
                   ) -> _Scene | None:
    height, width = smooth.shape
    if region is None:
        region = np.ones(smooth.shape, dtype=bool)
    rim = _rim(region)
    paper = float(np.median(smooth[rim]))
    inside = smooth[region]
    low, high = np.percentile(inside, [0.5, 99.5])
    dark_ink = paper - low >= high - paper
    sign = -1.0 if dark_ink else 1.0

    # The paper's surface: a quadratic fitted to the pixels on the paper's side, refitted without the ink.
    ys, xs = np.nonzero(region)
    step = max(1, len(xs) // 6000)
    ys, xs = ys[::step], xs[::step]
    values = smooth[ys, xs].astype(np.float64)
    design = _design((xs + 0.5) / scale, (ys + 0.5) / scale, round(height / scale), round(width / scale))
    # Start from the pixels near the rim's level on the ink's side (the paper), widen as the fit improves.
    start = max(2 * MIN_CONTRAST, 0.1 * abs((high if sign > 0 else low) - paper))
    keep = sign * (values - paper) < start
    # A shadow's edge across the page (serving/shadow.py): the surface gets its step, and the ramps of the
    # step across the page (light multiplies, so a shadow on a gradient is a gradient too); the search's own
    # fit of the paper picks the pixels to start from.
    edge = find_shadow_edge(smooth, region) if dark_ink else None
    if edge is not None:
        on = edge.step[ys, xs].astype(np.float64)
        design = np.concatenate([design, np.stack([on, design[:, 1] * on, design[:, 2] * on], axis=1)], axis=1)
        keep = sign * (values - edge.paper[ys, xs]) < start
    coef = np.zeros(design.shape[1])
    coef[0] = paper
    spread = 0.0
    for _ in range(4):
        if keep.sum() < 12:
            break
        coef = _least_squares(design[keep], values[keep])
        contrast = sign * (values - design @ coef)
        spread = _mad(contrast[keep])
        keep = contrast < max(3.0 * spread, MIN_CONTRAST / 2)
    spread = _mad(sign * (values[keep] - design[keep] @ coef)) if keep.sum() >= 12 else spread

    u = ((np.arange(width) + 0.5) / scale / max(round(width / scale), 1))[None, :]
    v = ((np.arange(height) + 0.5) / scale / max(round(height / scale), 1))[:, None]
    surface = coef[0] + coef[1] * u + coef[2] * v + coef[3] * u * u + coef[4] * u * v + coef[5] * v * v
    if edge is not None:
        surface = surface + edge.step * (coef[6] + coef[7] * u + coef[8] * v)
    reference = float(np.median(surface[region])) if dark_ink else 0.0
    contrast = np.where(region, _contrast(smooth, surface, dark_ink, reference), 0.0).astype(np.float32)
    if float(np.percentile(contrast[region], 99.9)) < MIN_INK and float(contrast.max()) < 1.5 * MIN_INK:
        return None
    noise = spread  # of the paper pixels around the fitted surface
    floor = max(MIN_CONTRAST, 5.0 * noise)
    threshold = max(_otsu(np.clip(contrast[region], 0, 255).astype(np.uint8)) or 0.0, floor)
    if local and (contrast > threshold).any():
        # Strokes are thin: the paper shows in nearly every part of the page, so the surface can follow a
        # shadow's edge, which no quadratic can.
        ink_level = float(np.median(contrast[contrast > threshold]))
        correction = _local_paper(contrast, region, ink_level)
        surface = surface * (1 - correction / reference) if dark_ink else surface + correction
        contrast = np.where(region, _contrast(smooth, surface, dark_ink, reference), 0.0).astype(np.float32)
        threshold = max(_otsu(np.clip(contrast[region], 0, 255).astype(np.uint8)) or 0.0, floor)
    # A flat black or white background (a drawing, a saved data set image, a shop's product shot) has no
    # table or paper edge: whatever reaches its border is the subject filling the picture.
    digital = noise < 4 and (paper < 16 or paper > 239)
    ruling = _ruling((contrast > threshold) & region, region) if not digital else np.zeros_like(region)
    mask = (contrast > threshold) & region & ~ruling
    strong = _pick_components(mask, contrast, region, rim, border_rule=not digital)
    if strong is None:
        return None
    # Hysteresis (as Canny's): the subject is what is connected to the kept components above a lower
    # threshold, so a product's dim body joins its bright seams and strokes keep their soft edges.
    low = max(floor, HYSTERESIS * threshold)
    subject = _connected_to(((contrast > low) & region & ~ruling) | strong, strong)
    rows, cols = np.flatnonzero(subject.any(axis=1)), np.flatnonzero(subject.any(axis=0))
    box = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
    return _Scene(scale, bool(dark_ink), surface.astype(np.float32), threshold, low, reference, subject, box)


def _contrast(image: np.ndarray, surface: np.ndarray, dark_ink: bool, reference: float) -> np.ndarray:
    """How far each pixel lies on the ink's side of the paper, in grey levels.

    Dark ink on paper is measured relative to the paper's local brightness (scaled to its typical
    level ``reference``): light multiplies, so ink under a shadow is as much darker than the shadowed
    paper as ink in the light is than lit paper. Light ink on a dark ground is a plain difference.
    """
    if dark_ink:
        return (surface - image) * (reference / np.maximum(surface, 1.0))
    return image - surface


def _local_paper(contrast: np.ndarray, region: np.ndarray, ink_level: float, cells: int = 16) -> np.ndarray:
    """What the paper's level differs from the fitted surface by, cell by cell (a 16×16 grid), smoothly.

    A cell's paper is its 25th percentile of contrast (strokes cover less than three quarters of almost
    every cell); a cell whose paper would be darker than 60% of the ink is taken to be under a stroke
    and filled from its neighbours (normalised convolution).
    """
    height, width = contrast.shape
    ch, cw = -(-height // cells), -(-width // cells)
    padded = np.full((ch * cells, cw * cells), np.nan, np.float32)
    padded[:height, :width] = np.where(region, contrast, np.nan)
    blocks = padded.reshape(cells, ch, cells, cw).transpose(0, 2, 1, 3).reshape(cells, cells, -1)
    counts = np.isfinite(blocks).sum(axis=2)
    ordered = np.sort(np.where(np.isfinite(blocks), blocks, np.inf), axis=2)  # NaN (outside) sorts last
    quarter = np.take_along_axis(ordered, (np.maximum(counts - 1, 0) // 4)[..., None], axis=2)[..., 0]
    grid = np.where(counts >= 8, quarter, np.nan)
    valid = np.isfinite(grid) & (grid < 0.6 * ink_level)
    values = np.where(valid, grid, 0.0).astype(np.float32)
    weights = valid.astype(np.float32)
    filled = values.copy()
    for sigma in (1.0, 2.0, 4.0, 8.0):
        if valid.all():
            break
        near = cv2.GaussianBlur(weights, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
        estimate = cv2.GaussianBlur(values, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE) / np.maximum(near, 1e-6)
        fill = ~valid & (near > 1e-3)
        filled[fill], valid = estimate[fill], valid | fill
        values, weights = np.where(valid, filled, 0.0).astype(np.float32), valid.astype(np.float32)
    filled[~valid] = 0.0
    return cv2.resize(filled, (cw * cells, ch * cells), interpolation=cv2.INTER_LINEAR)[:height, :width]


def _pick_components(mask: np.ndarray, contrast: np.ndarray, region: np.ndarray, rim: np.ndarray,
                     border_rule: bool = True) -> np.ndarray | None:
    """The subject's components: drop border-touching ones, lines and specks; keep the largest and its neighbours."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count < 2:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA]
    mass = np.bincount(labels.ravel(), weights=contrast.ravel(), minlength=count)[1:]
    rows, cols = np.nonzero(region)
    extent = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
    edge = rim | _border_mask(mask.shape, 1)
    contact = np.bincount(labels[edge], minlength=count)
    candidates = []
    for index in np.argsort(-mass)[:64]:
        label = int(index) + 1
        if areas[index] < max(4, 0.02 * areas.max()):
            continue
        candidates.append(label)
    # Background along the border: a component that runs along the border or the sheet's edge for a
    # good part of its outline (the table, a shadow, a corner of the table left by a tilted sheet). A
    # subject that merely reaches the border (a product filling the picture) touches it briefly.
    touching = {c for c in candidates if border_rule and contact[c] > 0.2 * _perimeter(labels == c)}
    inner = [c for c in candidates if c not in touching]
    lines = {c for c in inner if border_rule and _is_line(labels == c, int(areas[c - 1]), extent)}
    chosen = [c for c in inner if c not in lines] or inner or candidates
    if not chosen:
        return None
    main = max(chosen, key=lambda c: mass[c - 1])
    top, left = stats[main, cv2.CC_STAT_TOP], stats[main, cv2.CC_STAT_LEFT]
    group = [main]
    box = [top, top + stats[main, cv2.CC_STAT_HEIGHT], left, left + stats[main, cv2.CC_STAT_WIDTH]]
    changed = True
    while changed:  # grow the subject by components close to it (a digit's separate strokes)
        changed = False
        reach = 0.3 * max(box[1] - box[0], box[3] - box[2])
        for c in chosen:
            if c in group or mass[c - 1] < 0.02 * mass[main - 1]:
                continue
            ct, cl = stats[c, cv2.CC_STAT_TOP], stats[c, cv2.CC_STAT_LEFT]
            cb, cr = ct + stats[c, cv2.CC_STAT_HEIGHT], cl + stats[c, cv2.CC_STAT_WIDTH]
            gap_y = max(0, ct - box[1], box[0] - cb)
            gap_x = max(0, cl - box[3], box[2] - cr)
            if max(gap_x, gap_y) <= reach:
                group.append(c)
                box = [min(box[0], ct), max(box[1], cb), min(box[2], cl), max(box[3], cr)]
                changed = True
    return np.isin(labels, group)


def _ruling(mask: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The lines of ruled paper in ``mask`` (a bool mask of them; all False when there are none): two or more
    straight, near-horizontal (±20°) lines that each span at least 60% of the page's width (Hough). Where
    a line crosses a stroke only the line's own width is cut, and the stroke's pieces are grouped again
    by :func:`_pick_components`."""
    cols = np.flatnonzero(region.any(axis=0))
    width = int(cols[-1] - cols[0] + 1) if cols.size else mask.shape[1]
    found = cv2.HoughLinesP(mask.astype(np.uint8) * 255, 1, np.pi / 180, threshold=max(10, int(0.3 * width)),
                            minLineLength=int(0.6 * width), maxLineGap=max(2, int(0.03 * width)))
    none = np.zeros(mask.shape, dtype=bool)
    if found is None:
        return none
    ruling = [tuple(int(v) for v in line[0]) for line in found
              if abs(np.degrees(np.arctan2(line[0][3] - line[0][1], line[0][2] - line[0][0]))) <= 20
              or abs(np.degrees(np.arctan2(line[0][3] - line[0][1], line[0][2] - line[0][0]))) >= 160]
    # A ruled line is thin: across it, the mask is a short run. Inside a solid region (a product, a
    # marker stroke) every row of pixels is a straight line to Hough, but the runs across are long.
    limit = max(6, round(0.02 * mask.shape[0]))
    thin, runs = [], []
    for x0, y0, x1, y1 in ruling:
        across = []
        for t in np.linspace(0.1, 0.9, 9):
            x, y = int(round(x0 + t * (x1 - x0))), int(round(y0 + t * (y1 - y0)))
            across.append(int(mask[max(0, y - 2 * limit): y + 2 * limit + 1, x].sum()))
        if np.median(across) <= limit:
            thin.append((x0, y0, x1, y1))
            runs += across
    ruling = thin
    heights = sorted({(y0 + y1) // 2 for _, y0, _, y1 in ruling})
    if len(heights) < 2 or heights[-1] - heights[0] < 0.1 * mask.shape[0]:
        return none  # one line, or one thick stroke seen as several: not a ruling
    thickness = max(1, int(np.median(runs)) + 2)
    lines = np.zeros(mask.shape, np.uint8)
    for x0, y0, x1, y1 in ruling:
        cv2.line(lines, (x0, y0), (x1, y1), 1, thickness)
    return lines.astype(bool)


def _connected_to(weak: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """The components of ``weak`` that hold a pixel of ``strong``."""
    count, labels = cv2.connectedComponents(weak.astype(np.uint8), connectivity=8)
    hit = np.zeros(count, dtype=bool)
    hit[np.unique(labels[strong & weak])] = True
    hit[0] = False
    return hit[labels]


def _perimeter(component: np.ndarray) -> int:
    """Pixels on a component's outline (those with a neighbour outside it, the picture's edge included)."""
    inner = cv2.erode(component.astype(np.uint8), np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT,
                      borderValue=0)
    return int(component.sum() - inner.sum())


def _is_line(component: np.ndarray, area: int, extent: int) -> bool:
    """A long thin component spanning much of the paper: a ruled line, a fold, a paper edge."""
    (_, _), (w, h), _ = cv2.minAreaRect(_outline(component))
    length = max(w, h)
    return length >= 0.35 * extent and length / max(area / max(length, 1.0), 1.0) >= 12


def _cut_out(gray: np.ndarray, scene: _Scene, dataset: str) -> np.ndarray | None:
    """The subject from the full-resolution picture, at DETAIL × the frame's resolution, as 0..1 ink."""
    box_side = MNIST_BOX if dataset == "mnist" else FRAME
    top, bottom, left, right = (v / scene.scale for v in scene.box)
    longest = max(bottom - top, right - left)
    margin = 0.15 * longest + 2 / scene.scale
    y0, y1 = max(0, math.floor(top - margin)), min(gray.shape[0], math.ceil(bottom + margin))
    x0, x1 = max(0, math.floor(left - margin)), min(gray.shape[1], math.ceil(right + margin))
    zoom = DETAIL * box_side / max(longest, 1e-6)  # detail pixels per picture pixel
    size = (max(1, round((x1 - x0) * zoom)), max(1, round((y1 - y0) * zoom)))
    crop = gray[y0:y1, x0:x1]
    interpolation = cv2.INTER_AREA if zoom < 1 else cv2.INTER_LINEAR
    detail = cv2.resize(crop, size, interpolation=interpolation).astype(np.float32)
    # Light smoothing; an enlarged picture's noise comes in blobs of ``zoom`` pixels, smoothed to match.
    detail = cv2.GaussianBlur(detail, (0, 0), max(0.7, 0.5 * zoom))
    # The paper's level over the crop: the working copy's surface, resampled (it is smooth).
    work_h, work_w = scene.background.shape
    map_x = ((x0 + (np.arange(size[0], dtype=np.float32) + 0.5) / zoom) * scene.scale - 0.5).clip(0, work_w - 1)
    map_y = ((y0 + (np.arange(size[1], dtype=np.float32) + 0.5) / zoom) * scene.scale - 0.5).clip(0, work_h - 1)
    grid_x, grid_y = np.meshgrid(map_x, map_y)
    surface = cv2.remap(scene.background, grid_x, grid_y, cv2.INTER_LINEAR)
    contrast = _contrast(detail, surface, scene.dark_ink, scene.reference)
    # Only what the search kept, widened a little: the anti-aliased edges of its strokes, no stray specks.
    kept = cv2.resize(scene.subject[round(y0 * scene.scale): round(y1 * scene.scale) + 1,
                                    round(x0 * scene.scale): round(x1 * scene.scale) + 1].astype(np.uint8),
                      size, interpolation=cv2.INTER_NEAREST)
    grow = max(3, round(0.04 * DETAIL * box_side))
    near = cv2.dilate(kept, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1))) > 0
    strong = (contrast > scene.threshold) & near
    if not strong.any():
        return None
    strokes = _connected_to((contrast > scene.low) & near, strong)
    if dataset == "mnist":
        # Digits: ink is ink, whatever the pen's pressure: the strokes' typical contrast is full white.
        level = float(np.median(contrast[strong]))
    else:
        # Clothes keep their shading (a white shirt on paper is faint in Fashion-MNIST too).
        strokes = _fill_holes(strokes)
        level = float(np.percentile(contrast[strokes], 98))
    soft = cv2.dilate(strokes.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    ink = np.clip(contrast / max(level, 1e-6), 0, 1) * soft
    return ink.astype(np.float32)


def _stroke_width(ink: np.ndarray) -> float:
    """Mean stroke width in detail pixels: 2 × area / perimeter of the half-ink mask (a stroke is long and thin)."""
    mask = (ink > 0.5).astype(np.uint8)
    edge = mask & (1 - cv2.erode(mask, np.ones((3, 3), np.uint8)))
    return 2.0 * float(mask.sum()) / max(float(edge.sum()), 1.0)


def _normalise_strokes(ink: np.ndarray) -> np.ndarray:
    """Thicken hairlines and thin marker strokes toward MNIST's stroke width (in the frame's 20-px box).

    The width is judged in frame pixels after the subject is fitted into the box; growing strokes by
    ``k`` pixels on each side also grows the box, so ``k`` solves (w + 2k) / (L + 2k) = target / L_box.
    """
    trimmed = _trim(ink)
    if trimmed is None:
        return ink
    longest = max(trimmed.shape)
    per_frame_px = longest / MNIST_BOX  # detail pixels per frame pixel
    width = _stroke_width(trimmed)
    in_frame = width / per_frame_px
    if STROKE_MIN <= in_frame <= STROKE_MAX:
        return ink
    goal = STROKE_TARGET if in_frame < STROKE_MIN else STROKE_MAX - 0.5
    k = (goal * longest - MNIST_BOX * width) / (2 * MNIST_BOX - 2 * goal)
    radius = round(abs(k))
    if radius == 0:
        return ink
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    if k > 0:
        padded = np.pad(ink, radius)
        return cv2.dilate(padded, kernel)
    radius = min(radius, max(1, round(width / 3)))  # never erase a stroke
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.erode(ink, kernel)


def _trim(ink: np.ndarray | None) -> np.ndarray | None:
    """Crop to the pixels that carry at least a twentieth of full ink; None if there are none."""
    if ink is None:
        return None
    mask = ink >= 0.05
    if not mask.any():
        return None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return ink[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]


def _outer_ring(gray: np.ndarray) -> np.ndarray:
    """The border pixels, where the background shows even when the subject is off-centre."""
    if min(gray.shape) <= 2:
        return gray.ravel()
    return np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])


def _resize_longest(crop: np.ndarray, longest: int) -> np.ndarray:
    """Scale float ink so the longest side is ``longest`` px, keeping the aspect ratio (the data sets never stretch).

    Shrinking averages areas, which is the anti-aliasing MNIST's 20×20 normalisation had.
    """
    height, width = crop.shape
    scale = longest / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(crop.astype(np.float32), size, interpolation=interpolation)


def _to_uint8(ink: np.ndarray) -> np.ndarray:
    """Float ink → uint8 with the brightest pixel at 255, as in the data sets."""
    peak = float(ink.max())
    if peak <= 0:
        return np.zeros(ink.shape, dtype=np.uint8)
    return np.clip(np.floor(ink * (255.0 / peak) + 0.5), 0, 255).astype(np.uint8)


def _place_mnist(crop: np.ndarray) -> np.ndarray:
    """Fit into a 20×20 box and put the centre of mass at the frame's centre, as MNIST was built."""
    digit = _to_uint8(_resize_longest(crop, MNIST_BOX))
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
    product = _to_uint8(_resize_longest(crop, FRAME))
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
    if values.dtype.kind == "i":  # whole numbers (most requests): no NaN to look for, nothing to round
        low, high = int(values.min()), int(values.max())
    else:
        if not np.isfinite(values).all():
            raise ImageInputError("pixel values must be finite numbers; NaN and Infinity are not allowed")
        low, high = values.min(), values.max()
    if low < 0:
        raise ImageInputError(f"pixel values must not be negative (found {low:g}); use 0..255 or 0..1")
    if high > 255:
        raise ImageInputError(f"pixel values must be at most 255 (found {high:g}); use 0..255 or 0..1")
    if high <= 1:
        values = values * 255.0
    if values.dtype.kind == "i":
        return values.astype(np.uint8).reshape(FRAME, FRAME)
    return np.floor(values + 0.5).astype(np.uint8).reshape(FRAME, FRAME)


_SHAPE_HINT = f"send {FRAME} rows of {FRAME} numbers, or one flat list of {FRAME * FRAME}"


def _numbers_from_array(array: np.ndarray) -> np.ndarray:
    """Check a numpy array's type and shape; bool and non-numeric dtypes are not pixels."""
    if array.dtype == np.bool_ or array.dtype.kind not in "iuf":
        raise ImageInputError(f"pixel values must be numbers, got an array of {array.dtype}")
    if array.shape not in ((FRAME, FRAME), (FRAME * FRAME,)):
        raise ImageInputError(f"expected shape [{FRAME}, {FRAME}] or [{FRAME * FRAME}], got {list(array.shape)}; "
                              + _SHAPE_HINT)
    if array.dtype.kind == "i":  # whole numbers (the fast JSON path hands int64 arrays): the int path below
        return array.ravel()
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
    kinds = set(map(type, flat))
    if not kinds <= {int, float}:
        return None
    try:
        if kinds == {int}:  # kept whole: an int64 array is quicker to build and to check
            return np.fromiter(flat, dtype=np.int64, count=len(flat))
        return np.array(flat, dtype=np.float64)
    except OverflowError:  # an integer beyond int64 or float range: the walk reports it
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
