"""Image references -> RGB PIL images under an explicit policy, and preprocessing to tensors.

A reference is a local path (``str`` or ``os.PathLike``), a ``file://``, ``http(s)://`` or
``data:`` URL, raw ``bytes`` or a ``PIL.Image.Image``. Every way loading can fail raises
:class:`ImageError`, whose message names the reference and the reason.

Loading is two steps a server runs in different thread pools: `read_image` (the I/O: a file, a
fetch through `remote_images`, a data URL) and `decode_image` (the CPU work). A decoded picture
carries, in its ``info``, a digest of the bytes it was decoded from (`image_digest`) and, when
the policy had it decoded at a reduced size, the size of the original (`original_size`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import os
import re
import stat
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .remote_images import FetchError, fetch

IMAGE_SIZE = 448
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# Raster formats we decode. Pillow can open more (EPS, for one, runs Ghostscript on load),
# which is more attack surface than a vision model needs.
DECODED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "ICO", "PPM")  # JPEG covers MPO

DEFAULT_TIMEOUT = 10.0  # seconds
DEFAULT_MAX_BYTES = 20 * 2**20
DEFAULT_MAX_PIXELS = 64_000_000  # below Pillow's own bomb warning (about 89 M pixels)
DEFAULT_MAX_REDIRECTS = 5
# A server's pictures past this many pixels are decoded at a reduced size (see ImagePolicy): the
# model sees 448x448, and a 64-megapixel picture decoded whole is 192 MB of RGB.
SERVER_DECODED_PIXELS = 2048 * 2048

DIGEST_KEY = "qwenvl.digest"  # in a loaded picture's info: see image_digest
ORIGINAL_SIZE_KEY = "qwenvl.original_size"  # in a reduced picture's info: see original_size

ImageRef = str | os.PathLike[str] | bytes | bytearray | Image.Image

_DATA_URL_PREVIEW_CHARS = 60  # enough to show the media type and the start of the payload
_REF_PREVIEW_CHARS = 240  # paths and URLs: keep both ends, the file name is at the end
# "C:\\x.png" parses with scheme "c"; a real URL scheme has at least two characters.
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


class ImageError(ValueError):
    """An image reference could not be loaded; the message names the reference and the reason.

    ``ref`` holds the (shortened) reference and ``reason`` the reason alone, for callers that
    want to build their own message.
    """

    def __init__(self, ref: object, reason: str, public_message: str | None = None) -> None:
        self.ref = _describe_ref(ref)
        self.reason = reason
        super().__init__(f"cannot load image {self.ref}: {reason}")
        # What a server tells its client: for a URL it fetched, the same words whatever went
        # wrong (refused address, connection, status, not an image), or the client could map
        # the networks the server reaches. The whole message goes to the server's log.
        self.public_message = public_message or str(self)


def _describe_ref(ref: object) -> str:
    """A short, printable name for a reference (data URLs can be megabytes long)."""
    if isinstance(ref, Image.Image):
        return f"<PIL image {ref.mode} {ref.width}x{ref.height}>"
    if isinstance(ref, (bytes, bytearray)):
        return f"<{len(ref)} bytes>"
    if isinstance(ref, (str, os.PathLike)):
        text = os.fspath(ref)
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        if text[:5].lower() == "data:" and len(text) > _DATA_URL_PREVIEW_CHARS:
            text = text[:_DATA_URL_PREVIEW_CHARS] + "..."
        elif len(text) > _REF_PREVIEW_CHARS:
            half = _REF_PREVIEW_CHARS // 2
            text = text[:half] + "..." + text[-half:]
        return repr(text)
    return f"<{type(ref).__name__}>"


@dataclass(frozen=True)
class ImagePolicy:
    """What :func:`load_image` may read, and how much.

    ``local_roots``: None lets any local path be read; ``()`` forbids local files; otherwise a
    file is read only if its real path (symlinks and ``..`` resolved) lies under one of the roots.
    Remote URLs (``allow_remote``, or any when ``allowed_domains`` names hosts): only public
    addresses unless ``allow_private_addresses``, and when ``allowed_domains`` is given only those
    hosts (``name`` or ``*.name``); see `remote_images.fetch`.
    ``max_decoded_pixels``: a picture with more pixels is decoded at a reduced size (JPEG scales
    while decoding; other formats are shrunk by a whole factor right after) to at most that many,
    its original size kept for boxes (`original_size`); None decodes every picture whole, exactly
    as the original implementation does.
    """

    local_roots: tuple[str, ...] | None = None
    allow_remote: bool = True
    timeout: float = DEFAULT_TIMEOUT
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_private_addresses: bool = True
    allowed_domains: tuple[str, ...] | None = None
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    max_decoded_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.local_roots is not None:
            # Accept any iterable of paths; store plain strings so the policy stays hashable.
            object.__setattr__(self, "local_roots", tuple(os.fspath(root) for root in self.local_roots))
        if self.allowed_domains is not None:
            object.__setattr__(self, "allowed_domains", tuple(self.allowed_domains))
        if self.timeout <= 0 or self.max_bytes <= 0 or self.max_pixels <= 0:
            raise ValueError("ImagePolicy timeout, max_bytes and max_pixels must be positive")
        if self.max_redirects < 0:
            raise ValueError("ImagePolicy max_redirects must be >= 0")
        if self.max_decoded_pixels is not None and self.max_decoded_pixels <= 0:
            raise ValueError("ImagePolicy max_decoded_pixels must be positive (or None)")

    @property
    def fetches(self) -> bool:
        """Whether http(s) URLs may be fetched at all."""
        return self.allow_remote or bool(self.allowed_domains)

    @classmethod
    def permissive(cls) -> ImagePolicy:
        """For library use: any local file, remote URLs allowed (private addresses too: the
        caller is the one who chose them)."""
        return cls()

    @classmethod
    def strict(
        cls,
        local_roots: Sequence[str | os.PathLike[str]] = (),
        allow_remote: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        allow_private_addresses: bool = False,
        allowed_domains: Sequence[str] | None = None,
        max_redirects: int = DEFAULT_MAX_REDIRECTS,
        max_decoded_pixels: int | None = SERVER_DECODED_PIXELS,
    ) -> ImagePolicy:
        """For servers: only files under ``local_roots`` (none by default), no remote unless asked,
        and then only public addresses; large pictures decoded at a reduced size."""
        return cls(
            tuple(local_roots),
            allow_remote,
            timeout,
            max_bytes,
            max_pixels,
            allow_private_addresses,
            None if allowed_domains is None else tuple(allowed_domains),
            max_redirects,
            max_decoded_pixels,
        )


def load_image(ref: ImageRef, policy: ImagePolicy | None = None) -> Image.Image:
    """Load ``ref`` as a fully decoded RGB image, or raise :class:`ImageError`."""
    if policy is None:
        policy = ImagePolicy.permissive()
    return decode_image(read_image(ref, policy), ref, policy)


def read_image(ref: ImageRef, policy: ImagePolicy) -> bytes | Image.Image:
    """The encoded bytes behind ``ref`` (a PIL image is its own), read under ``policy``."""
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    if isinstance(ref, os.PathLike):
        return _read_local(ref, os.fspath(ref), policy)
    if isinstance(ref, str):
        return _read_str_ref(ref, policy)
    raise ImageError(ref, f"unsupported reference type {type(ref).__name__}")


def decode_image(data: bytes | Image.Image, ref: ImageRef, policy: ImagePolicy) -> Image.Image:
    """``read_image``'s result as an RGB image; ``ref`` names it in errors."""
    if isinstance(data, Image.Image):
        _check_pixels(ref, data.size, policy)
        return _to_rgb(data, ref)
    try:
        return _decode(data, ref, policy)
    except ImageError as error:
        if is_remote(ref):
            raise ImageError(ref, error.reason, _could_not_fetch(ref)) from None
        raise


def is_remote(ref: object) -> bool:
    """Whether ``ref`` is an http(s) URL (read over the network)."""
    return isinstance(ref, str) and _scheme(ref) in ("http", "https")


def _scheme(ref: str) -> str:
    match = _URL_SCHEME.match(ref)
    return match.group(1).lower() if match else ""


def image_digest(image: Image.Image) -> str | None:
    """A digest of the encoded bytes a loaded picture was decoded from (None for pictures not
    loaded from bytes): the same bytes decode to the same pixels, and hashing them is cheaper
    than hashing the pixels."""
    return image.info.get(DIGEST_KEY)


def original_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the picture as stored, also when it was decoded at a reduced size."""
    return image.info.get(ORIGINAL_SIZE_KEY, image.size)


def _read_str_ref(ref: str, policy: ImagePolicy) -> bytes:
    scheme = _scheme(ref)
    if not scheme:
        return _read_local(ref, ref, policy)
    if scheme == "file":
        return _read_local(ref, _file_url_path(ref), policy)
    if scheme in ("http", "https"):
        return _fetch(ref, policy)
    if scheme == "data":
        return _decode_data_url(ref, policy)
    raise ImageError(ref, f"scheme {scheme!r} not allowed (use a path, file://, http(s)://, data: URL)")


def _file_url_path(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageError(url, f"file URL names another host ({parts.netloc})")
    return urllib.request.url2pathname(parts.path)


def _read_local(ref: object, path: str, policy: ImagePolicy) -> bytes:
    if policy.local_roots == ():
        raise ImageError(ref, "local files are not allowed by the image policy")
    if "\0" in path:  # the OS would refuse it deep inside os.stat
        raise ImageError(ref, "a path cannot contain a NUL character")
    real = os.path.realpath(path)
    # Check the roots before existence, so a refused path does not reveal whether it exists.
    if policy.local_roots is not None and not any(_is_within(real, root) for root in policy.local_roots):
        raise ImageError(ref, "path is outside the allowed local roots")
    try:
        info = os.stat(real)
    except FileNotFoundError:
        raise ImageError(ref, "file not found") from None
    except OSError as error:
        raise ImageError(ref, f"cannot read file ({error.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(ref, "is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
        raise ImageError(ref, "not a regular file")
    if info.st_size > policy.max_bytes:
        raise ImageError(ref, _too_many_bytes(policy))
    try:
        with open(real, "rb") as file:
            data = file.read(policy.max_bytes + 1)
    except OSError as error:
        raise ImageError(ref, f"cannot read file ({error.strerror})") from None
    if len(data) > policy.max_bytes:  # the file grew after stat
        raise ImageError(ref, _too_many_bytes(policy))
    return data


def _is_within(real_path: str, root: str) -> bool:
    real_root = os.path.realpath(root)
    return os.path.commonpath([real_path, real_root]) == real_root


def _fetch(url: str, policy: ImagePolicy) -> bytes:
    if not policy.fetches:
        raise ImageError(url, "remote URLs are not allowed by the image policy")
    try:
        return fetch(
            url,
            timeout=policy.timeout,
            max_bytes=policy.max_bytes,
            allow_private=policy.allow_private_addresses,
            allowed_domains=policy.allowed_domains,
            max_redirects=policy.max_redirects,
        )
    except FetchError as error:
        raise ImageError(url, f"fetch failed: {error}", _could_not_fetch(url)) from None


def _could_not_fetch(url: str) -> str:
    return f"could not fetch the image at {_describe_ref(url)}"


def _decode_data_url(url: str, policy: ImagePolicy) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise ImageError(url, "data URL must be of the form data:image/...;base64,...")
    payload = "".join(payload.split())  # line breaks are common in pasted data URLs
    if len(payload) // 4 * 3 > policy.max_bytes + 2:
        raise ImageError(url, _too_many_bytes(policy))
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageError(url, f"invalid base64 in data URL ({error})") from None
    if len(data) > policy.max_bytes:
        raise ImageError(url, _too_many_bytes(policy))
    return data


def _decode(data: bytes, ref: object, policy: ImagePolicy) -> Image.Image:
    if len(data) > policy.max_bytes:
        raise ImageError(ref, _too_many_bytes(policy))
    # Pillow warns (and past twice its own limit raises) on huge images: make both errors.
    # The filter is process-wide before Python 3.14; a race can at worst leave it installed,
    # which only turns this one warning into the error we raise anyway.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=DECODED_FORMATS)
        except Exception as error:
            raise _decoder_error(ref, error) from None
        # Opening reads only the header: refuse a pixel bomb before decoding it.
        _check_pixels(ref, image.size, policy)
        size = image.size
        budget = policy.max_decoded_pixels
        if budget is not None and size[0] * size[1] > budget:
            image = _decode_reduced(image, ref, budget)
        else:
            image = _to_rgb(image, ref)
    if image.size != size:
        image.info[ORIGINAL_SIZE_KEY] = size
    # with the decoded size: a policy with another budget decodes the same bytes to other pixels
    digest = hashlib.blake2b(data, digest_size=12).hexdigest()
    image.info[DIGEST_KEY] = f"{digest}-{image.width}x{image.height}"
    return image


def _decode_reduced(image: Image.Image, ref: object, budget: int) -> Image.Image:
    """``image`` (opened, not yet decoded) as RGB with at most ``budget`` pixels, shrunk by a whole
    factor (the same for both sides, so boxes keep their meaning): the pixels of converting it to
    RGB whole and then `Image.reduce`, without the whole-size RGB copy."""
    try:
        if image.format == "JPEG":
            # JPEG decodes at 1/2, 1/4 or 1/8 scale without building the whole picture: the
            # largest of these that keeps the picture at least 1/factor of its size
            factor = _reduction(image.size, budget)
            image.draft("RGB", (-(-image.width // factor), -(-image.height // factor)))
        factor = _reduction(image.size, budget)
        if image.mode == "RGB":
            return image.reduce(factor) if factor > 1 else image.convert("RGB")
        if image.mode == "L":  # gray averages to the same gray
            return (image.reduce(factor) if factor > 1 else image).convert("RGB")
        return _convert_in_bands(image, factor)
    except ImageError:
        raise
    except Exception as error:
        raise _decoder_error(ref, error) from None


# Rows converted at once: about this many pixels (12 MB of RGB), a whole number of reduced rows.
_BAND_PIXELS = 4 * 2**20


def _convert_in_bands(image: Image.Image, factor: int) -> Image.Image:
    """convert("RGB") then reduce(factor), a band of rows at a time. Other modes (palette, alpha,
    CMYK...) must be converted before they are averaged (reduce weighs colour by alpha, which
    convert drops); bands whose tops are multiples of the factor average the same blocks."""
    width, height = image.size
    rows = max(1, _BAND_PIXELS // (width * factor)) * factor
    reduced = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    for top in range(0, height, rows):
        band = image.crop((0, top, width, min(top + rows, height))).convert("RGB")
        reduced.paste(band.reduce(factor) if factor > 1 else band, (0, top // factor))
    return reduced


def _reduction(size: tuple[int, int], budget: int) -> int:
    """The smallest whole factor that brings a picture of ``size`` within ``budget`` pixels."""
    width, height = size
    factor = max(1, math.ceil(math.sqrt(width * height / budget)))
    while -(-width // factor) * -(-height // factor) > budget:
        factor += 1
    return factor


def _to_rgb(image: Image.Image, ref: object) -> Image.Image:
    # Plain convert("RGB") drops alpha exactly as the original does; the golden cases rely on it.
    try:
        return image.convert("RGB")
    except Exception as error:
        raise _decoder_error(ref, error) from None


def _decoder_error(ref: object, error: Exception) -> ImageError:
    # Pillow's plugins raise a zoo of types for bad data (OSError, SyntaxError, struct.error, ...).
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageError(ref, f"too many pixels ({error})")
    if isinstance(error, UnidentifiedImageError):
        return ImageError(ref, f"not an image, or not a supported format ({', '.join(DECODED_FORMATS)})")
    return ImageError(ref, f"truncated or corrupt image data ({type(error).__name__}: {error})")


def _check_pixels(ref: object, size: tuple[int, int], policy: ImagePolicy) -> None:
    width, height = size
    if width * height > policy.max_pixels:
        raise ImageError(ref, f"too many pixels: {width}x{height} exceeds max_pixels={policy.max_pixels}")


def _too_many_bytes(policy: ImagePolicy) -> str:
    return f"too large: more than max_bytes={policy.max_bytes} bytes"


def preprocess(images: Sequence[Image.Image], image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """RGB images -> float32 tensor [N, 3, S, S]: PIL bicubic resize, scale to [0, 1], normalize.

    Bit-identical to torchvision's ``Resize((S, S), BICUBIC)``, ``ToTensor`` and ``Normalize`` on
    PIL images, which call PIL's resize and do the same float32 arithmetic.
    """
    mean = np.asarray(IMAGE_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGE_STD, dtype=np.float32)[:, None, None]
    batch = np.empty((len(images), 3, image_size, image_size), dtype=np.float32)
    for index, image in enumerate(images):
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        resized = rgb.resize((image_size, image_size), Image.BICUBIC)
        pixels = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255
        batch[index] = (pixels - mean) / std
    return torch.from_numpy(batch)
