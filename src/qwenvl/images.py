"""Image references -> RGB PIL images under an explicit policy, and preprocessing to tensors.

A reference is a local path (``str`` or ``os.PathLike``), a ``file://``, ``http(s)://`` or
``data:`` URL, raw ``bytes`` or a ``PIL.Image.Image``. Every way loading can fail raises
:class:`ImageError`, whose message names the reference and the reason.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import os
import re
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SIZE = 448
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# Raster formats we decode. Pillow can open more (EPS, for one, runs Ghostscript on load),
# which is more attack surface than a vision model needs.
DECODED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "ICO", "PPM")  # JPEG covers MPO

DEFAULT_TIMEOUT = 10.0  # seconds
DEFAULT_MAX_BYTES = 20 * 2**20
DEFAULT_MAX_PIXELS = 64_000_000  # below Pillow's own bomb warning (about 89 M pixels)

ImageRef = str | os.PathLike[str] | bytes | bytearray | Image.Image

_DATA_URL_PREVIEW_CHARS = 60  # enough to show the media type and the start of the payload
_REF_PREVIEW_CHARS = 240  # paths and URLs: keep both ends, the file name is at the end
_READ_CHUNK = 1 << 16
# "C:\\x.png" parses with scheme "c"; a real URL scheme has at least two characters.
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


class ImageError(ValueError):
    """An image reference could not be loaded; the message names the reference and the reason.

    ``ref`` holds the (shortened) reference and ``reason`` the reason alone, for callers that
    want to build their own message.
    """

    def __init__(self, ref: object, reason: str) -> None:
        self.ref = _describe_ref(ref)
        self.reason = reason
        super().__init__(f"cannot load image {self.ref}: {reason}")


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
    """

    local_roots: tuple[str, ...] | None = None
    allow_remote: bool = True
    timeout: float = DEFAULT_TIMEOUT
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.local_roots is not None:
            # Accept any iterable of paths; store plain strings so the policy stays hashable.
            object.__setattr__(self, "local_roots", tuple(os.fspath(root) for root in self.local_roots))
        if self.timeout <= 0 or self.max_bytes <= 0 or self.max_pixels <= 0:
            raise ValueError("ImagePolicy timeout, max_bytes and max_pixels must be positive")

    @classmethod
    def permissive(cls) -> ImagePolicy:
        """For library use: any local file, remote URLs allowed."""
        return cls()

    @classmethod
    def strict(
        cls,
        local_roots: Sequence[str | os.PathLike[str]] = (),
        allow_remote: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> ImagePolicy:
        """For servers: only files under ``local_roots`` (none by default), no remote unless asked."""
        return cls(tuple(local_roots), allow_remote, timeout, max_bytes, max_pixels)


def load_image(ref: ImageRef, policy: ImagePolicy | None = None) -> Image.Image:
    """Load ``ref`` as a fully decoded RGB image, or raise :class:`ImageError`."""
    if policy is None:
        policy = ImagePolicy.permissive()
    if isinstance(ref, Image.Image):
        _check_pixels(ref, ref.size, policy)
        return _to_rgb(ref, ref)
    if isinstance(ref, (bytes, bytearray)):
        return _decode(bytes(ref), ref, policy)
    if isinstance(ref, os.PathLike):
        return _decode(_read_local(ref, os.fspath(ref), policy), ref, policy)
    if isinstance(ref, str):
        return _decode(_read_str_ref(ref, policy), ref, policy)
    raise ImageError(ref, f"unsupported reference type {type(ref).__name__}")


def _read_str_ref(ref: str, policy: ImagePolicy) -> bytes:
    match = _URL_SCHEME.match(ref)
    scheme = match.group(1).lower() if match else ""
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


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib also follows redirects to ftp://, which the policy does not allow."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # signature fixed by urllib
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.URLError(f"redirect to a non-http URL {_describe_ref(newurl)}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, policy: ImagePolicy) -> bytes:
    if not policy.allow_remote:
        raise ImageError(url, "remote URLs are not allowed by the image policy")
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "qwenvl"})
    try:
        with opener.open(request, timeout=policy.timeout) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > policy.max_bytes:
                raise ImageError(url, _too_many_bytes(policy))
            data = _read_with_deadline(response, url, policy)
    except ImageError:
        raise
    except urllib.error.HTTPError as error:
        raise ImageError(url, f"fetch failed: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        if isinstance(error.reason, TimeoutError):
            raise ImageError(url, f"fetch timed out after {policy.timeout:g}s") from None
        raise ImageError(url, f"fetch failed: {error.reason}") from None
    except TimeoutError:
        raise ImageError(url, f"fetch timed out after {policy.timeout:g}s") from None
    except (OSError, ValueError, http.client.HTTPException) as error:  # resets, bad URLs, short bodies
        raise ImageError(url, f"fetch failed: {error}") from None
    if len(data) > policy.max_bytes:
        raise ImageError(url, _too_many_bytes(policy))
    return data


def _read_with_deadline(response: http.client.HTTPResponse, url: str, policy: ImagePolicy) -> bytes:
    # The socket timeout bounds each read; the deadline bounds a server that trickles bytes.
    # read1 returns what has arrived instead of waiting for a full chunk.
    deadline = time.monotonic() + policy.timeout
    chunks: list[bytes] = []
    received = 0
    while received <= policy.max_bytes:
        chunk = response.read1(min(_READ_CHUNK, policy.max_bytes + 1 - received))
        if not chunk:
            break
        chunks.append(chunk)
        received += len(chunk)
        if time.monotonic() > deadline:
            raise ImageError(url, f"fetch timed out after {policy.timeout:g}s")
    return b"".join(chunks)


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
        return _to_rgb(image, ref)


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
