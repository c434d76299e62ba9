"""Image loading under policies, every bad-input path, and preprocessing parity with the golden data.

``data/golden_pixels.npz`` holds, per image in ``data/images/``, the original implementation's
normalized 3x448x448 input sampled at ``[:, ::16, ::16]`` (``<name>_pixels_sub``) and the per-channel
mean and (unbiased) std of the full tensor, extracted from the golden ``cases.json``/``arrays.npz``.
"""

from __future__ import annotations

import base64
import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl.conversation import image_name
from qwenvl.images import (
    ORIGINAL_SIZE_KEY,
    ImageError,
    ImagePolicy,
    image_digest,
    load_image,
    original_size,
    preprocess,
)

DATA = Path(__file__).parent / "data"
IMAGES = DATA / "images"
SHAPES = IMAGES / "shapes.png"


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def assert_image_error(
    ref: object, reason: str, policy: ImagePolicy | None = None, culprit: str = ""
) -> None:
    with pytest.raises(ImageError) as caught:
        load_image(ref, policy)
    message = str(caught.value)
    assert reason in message
    assert culprit in message


# --- good references ---------------------------------------------------------------------------


def test_path_string_and_pathlib_load_rgb():
    for ref in (str(SHAPES), SHAPES):
        image = load_image(ref)
        assert image.mode == "RGB"
        assert image.size == (640, 480)


def test_file_url_data_url_bytes_all_give_the_same_pixels():
    expected = np.asarray(Image.open(SHAPES).convert("RGB"))
    data = SHAPES.read_bytes()
    data_url = "data:image/png;base64," + base64.b64encode(data).decode()
    for ref in (SHAPES.resolve().as_uri(), data_url, data, bytearray(data)):
        assert np.array_equal(np.asarray(load_image(ref)), expected)


def test_alpha_is_dropped_like_plain_convert_rgb():
    path = IMAGES / "transparent.png"
    expected = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(np.asarray(load_image(path)), expected)
    rgba = Image.open(path)
    assert rgba.mode == "RGBA"
    loaded = load_image(rgba)
    assert loaded.mode == "RGB"
    assert np.array_equal(np.asarray(loaded), expected)


def test_palette_with_transparency_converts_like_convert_rgb():
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.info["transparency"] = 1
    loaded = load_image(png_bytes(palette))
    assert np.array_equal(np.asarray(loaded), np.asarray(palette.convert("RGB")))


def test_pil_image_input_is_not_modified():
    original = Image.new("LA", (3, 2), (128, 0))
    loaded = load_image(original)
    assert loaded is not original and original.mode == "LA" and loaded.mode == "RGB"


def test_file_under_an_allowed_root_loads(tmp_path):
    (tmp_path / "ok.png").write_bytes(SHAPES.read_bytes())
    policy = ImagePolicy.strict(local_roots=[tmp_path])
    assert load_image(tmp_path / "ok.png", policy).size == (640, 480)


def test_policies():
    assert ImagePolicy.permissive() == ImagePolicy()
    strict = ImagePolicy.strict()
    assert strict.local_roots == () and not strict.allow_remote
    with pytest.raises(ValueError):
        ImagePolicy(max_bytes=0)


# --- bad local input ---------------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.png"
    assert_image_error(str(missing), "file not found", culprit=str(missing))


def test_directory(tmp_path):
    assert_image_error(tmp_path, "is a directory", culprit=str(tmp_path))


def test_text_file_is_not_an_image(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("hello, not a picture")
    assert_image_error(text, "not an image", culprit=str(text))


def test_truncated_png(tmp_path):
    data = SHAPES.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    assert_image_error(cut, "truncated", culprit=str(cut))
    assert_image_error(data[: len(data) // 2], "truncated", culprit=f"<{len(data) // 2} bytes>")


def test_too_many_pixels_from_every_kind_of_reference():
    policy = ImagePolicy(max_pixels=640 * 480 - 1)
    assert_image_error(SHAPES, "too many pixels", policy, culprit=str(SHAPES))
    assert_image_error(SHAPES.read_bytes(), "too many pixels", policy)
    assert_image_error(Image.new("RGB", (640, 480)), "too many pixels", policy, culprit="640x480")


def png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (the data is never reached)."""
    data = png_bytes(Image.new("1", (1, 1)))
    ihdr_start = 8 + 4  # signature, then the chunk length
    fields = struct.pack(">II", width, height) + data[ihdr_start + 12 : ihdr_start + 17]
    chunk = b"IHDR" + fields
    return data[:ihdr_start] + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[ihdr_start + 21 :]


def test_pillow_decompression_bomb_becomes_image_error():
    # 400 M pixels is over twice Pillow's limit: its own bomb error, even when our limit allows it.
    assert_image_error(png_header_claiming(20000, 20000), "too many pixels", ImagePolicy(max_pixels=10**12))
    # 100 M pixels only makes Pillow warn; that warning must become an error too.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_image_error(
            png_header_claiming(10000, 10000), "too many pixels", ImagePolicy(max_pixels=10**12)
        )
    # Under Pillow's limit but over ours (64 M by default): refused from the header alone.
    assert_image_error(png_header_claiming(10000, 7000), "10000x7000 exceeds max_pixels=64000000")


def test_long_paths_keep_their_file_name(tmp_path):
    deep = tmp_path.joinpath(*["d" * 50] * 6, "the-culprit.png")
    with pytest.raises(ImageError) as caught:
        load_image(deep)
    assert "the-culprit.png" in str(caught.value) and str(tmp_path)[:20] in str(caught.value)


def test_too_many_bytes():
    data = SHAPES.read_bytes()
    policy = ImagePolicy(max_bytes=len(data) - 1)
    assert_image_error(SHAPES, "too large", policy, culprit=str(SHAPES))
    assert_image_error(data, "too large", policy)
    data_url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert_image_error(data_url, "too large", policy, culprit="data:image/png;base64,")


def test_broken_base64_data_url_is_named_shortly():
    data_url = "data:image/png;base64," + "A" * 200 + "!!"
    with pytest.raises(ImageError) as caught:
        load_image(data_url)
    message = str(caught.value)
    assert "invalid base64" in message and data_url[:60] in message
    assert len(message) < 200  # the reference is shortened, not pasted whole


def test_unknown_schemes_are_refused():
    for url in ("ftp://example.com/a.png", "gopher://example.com/a.png", "javascript:alert(1)"):
        assert_image_error(url, "scheme", culprit=url)


def test_local_files_refused_when_no_roots():
    policy = ImagePolicy.strict(local_roots=())
    for ref in (SHAPES, str(SHAPES), SHAPES.resolve().as_uri()):
        assert_image_error(ref, "local files are not allowed", policy, culprit=str(SHAPES.name))


def test_path_outside_roots(tmp_path):
    policy = ImagePolicy.strict(local_roots=[tmp_path])
    assert_image_error(SHAPES, "outside the allowed local roots", policy, culprit=str(SHAPES))


def test_dotdot_escape_out_of_a_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(SHAPES.read_bytes())
    escape = f"{root}/../secret.png"
    assert_image_error(escape, "outside the allowed local roots", ImagePolicy.strict([root]), culprit=escape)


def test_symlink_escape_out_of_a_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(SHAPES.read_bytes())
    link = root / "innocent.png"
    link.symlink_to(tmp_path / "secret.png")
    assert_image_error(link, "outside the allowed local roots", ImagePolicy.strict([root]), culprit=str(link))


def test_root_prefix_is_not_a_root(tmp_path):
    # "/x/root2/a.png" starts with "/x/root" as a string, but is not under it.
    (tmp_path / "root").mkdir()
    (tmp_path / "root2").mkdir()
    (tmp_path / "root2" / "a.png").write_bytes(SHAPES.read_bytes())
    policy = ImagePolicy.strict([tmp_path / "root"])
    assert_image_error(tmp_path / "root2" / "a.png", "outside", policy)


def test_fifo_is_not_read(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert_image_error(fifo, "not a regular file", culprit=str(fifo))


def test_unsupported_reference_type():
    assert_image_error(42, "unsupported reference type int")


# --- remote ------------------------------------------------------------------------------------


def test_remote_refused_by_policy():
    url = "http://127.0.0.1:9/image.png"  # refused before any connection, so nothing need listen
    assert_image_error(url, "remote URLs are not allowed", ImagePolicy(allow_remote=False), culprit=url)


# --- preprocessing -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["shapes", "texture", "transparent", "gray"])
def test_preprocess_matches_golden_pixels(name):
    golden = np.load(DATA / "golden_pixels.npz")
    pixels = preprocess([load_image(IMAGES / f"{name}.png")])
    assert pixels.shape == (1, 3, 448, 448) and pixels.dtype == torch.float32
    tensor = pixels[0]
    np.testing.assert_allclose(tensor[:, ::16, ::16].numpy(), golden[f"{name}_pixels_sub"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(tensor.mean(dim=(1, 2)).numpy(), golden[f"{name}_pixels_mean"], atol=1e-6)
    np.testing.assert_allclose(tensor.std(dim=(1, 2)).numpy(), golden[f"{name}_pixels_std"], atol=1e-6)


def test_preprocess_batches_and_sizes():
    images = [load_image(IMAGES / "gray.png"), load_image(SHAPES)]
    batch = preprocess(images, image_size=224)
    assert batch.shape == (2, 3, 224, 224)
    assert torch.equal(batch[1], preprocess([images[1]], image_size=224)[0])
    assert preprocess([]).shape == (0, 3, 448, 448)


# --- large pictures, digests ---------------------------------------------------------------------


def gradient(width: int, height: int, mode: str = "RGB") -> Image.Image:
    x = np.linspace(0, 255, width)[None, :]
    y = np.linspace(0, 255, height)[:, None]
    rgb = np.stack([(x + y) / 2 + 0 * y, 255 - (x + y) / 2, (x * y) / 255], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB").convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_a_large_png_is_shrunk_by_a_whole_factor(mode):
    picture = gradient(3000, 2000, mode)
    data = png_bytes(picture)
    policy = ImagePolicy(max_decoded_pixels=1_000_000)
    image = load_image(data, policy)
    # sqrt(6 MP / 1 MP) = 2.45: a third of each side, rounded up (1000 x 667)
    assert image.mode == "RGB" and image.size == (1000, 667)
    assert original_size(image) == (3000, 2000)
    expected = picture.convert("RGB").reduce(3)  # what the whole picture gives, shrunk afterwards
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    whole = load_image(data)  # no budget: decoded whole, exactly as the original implementation
    assert whole.size == original_size(whole) == (3000, 2000)


def test_a_large_jpeg_is_decoded_at_a_reduced_scale():
    buffer = io.BytesIO()
    gradient(4000, 3000).save(buffer, format="JPEG", quality=90)
    image = load_image(buffer.getvalue(), ImagePolicy(max_decoded_pixels=1_000_000))
    # 12 MP into 1 MP: a factor of 4, which JPEG decodes directly (1/4 scale)
    assert image.size == (1000, 750) and original_size(image) == (4000, 3000)
    whole = np.asarray(load_image(buffer.getvalue()).reduce(4), dtype=np.int16)
    # JPEG's scaled decoding averages the same 4x4 blocks in the DCT domain: the pixels agree
    # with the whole picture's 4x4 averages up to rounding in the integer IDCT (a level or two)
    assert np.abs(np.asarray(image, dtype=np.int16) - whole).mean() < 1.0


def test_pictures_within_the_budget_are_decoded_whole():
    data = SHAPES.read_bytes()
    image = load_image(data, ImagePolicy(max_decoded_pixels=640 * 480))
    assert image.size == (640, 480) and ORIGINAL_SIZE_KEY not in image.info


def test_the_digest_is_of_the_encoded_bytes():
    data = SHAPES.read_bytes()
    first, second = load_image(data), load_image(str(SHAPES))
    assert image_digest(first) == image_digest(second) is not None
    assert image_name(first) == image_name(second) == f"image-{image_digest(first)}"
    buffer = io.BytesIO()
    Image.open(SHAPES).save(buffer, format="PNG", compress_level=1)
    recoded = buffer.getvalue()  # the same pixels in other bytes: another name
    assert recoded != data
    assert np.array_equal(np.asarray(load_image(recoded)), np.asarray(first))
    assert image_digest(load_image(recoded)) != image_digest(first)
    # a picture that was never bytes is named by its pixels
    made = Image.new("RGB", (4, 4), "red")
    assert image_digest(made) is None and image_name(made) == image_name(Image.new("RGB", (4, 4), "red"))
    assert image_name(made) != image_name(Image.new("RGB", (4, 4), "blue"))


def test_a_nul_character_in_a_path_is_named():
    assert_image_error("/tmp/a\x00.png", "NUL character")
    assert_image_error("file:///tmp/a%00.png", "NUL character")
