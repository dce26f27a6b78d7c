"""Image reading (every PIL mode, bad files), DINO resizing and image lists."""

import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image, ImageFile

from hassod_jax.data import images


def rgb_array(h=12, w=17, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def pil_reference(path):
    """HASSOD's reading: Image.open(path).convert('RGB') (no EXIF transpose)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("RGB", "PNG"),
        ("RGB", "JPEG"),
        ("L", "PNG"),
        ("L", "JPEG"),
        ("LA", "PNG"),
        ("RGBA", "PNG"),
        ("P", "PNG"),
        ("P", "GIF"),
        ("1", "PNG"),
        ("CMYK", "JPEG"),
        ("CMYK", "TIFF"),
        ("RGB", "BMP"),
        ("RGB", "WEBP"),
        ("YCbCr", "JPEG"),
    ],
)
def test_modes_match_pil_convert(tmp_path, mode, fmt):
    src = Image.fromarray(rgb_array())
    im = src.convert(mode) if mode != "P" else src.quantize(16)
    path = tmp_path / f"x.{fmt.lower()}"
    im.save(path, format=fmt)
    out = images.load_image_rgb(path)
    assert out.dtype == np.uint8 and out.shape == (12, 17, 3)
    np.testing.assert_array_equal(out, pil_reference(path))


def test_palette_with_transparency_and_rgba_drop_alpha(tmp_path):
    src = Image.fromarray(rgb_array()).quantize(8)
    src.info["transparency"] = 0
    path = tmp_path / "pt.png"
    src.save(path, transparency=0)
    with Image.open(path) as im:
        assert "transparency" in im.info
    np.testing.assert_array_equal(images.load_image_rgb(path), pil_reference(path))
    rgba = np.concatenate([rgb_array(), np.zeros((12, 17, 1), np.uint8)], axis=-1)
    path = tmp_path / "a.png"
    Image.fromarray(rgba).save(path)
    # Alpha 0 everywhere: colours are kept as stored, not composited on black.
    np.testing.assert_array_equal(images.load_image_rgb(path), rgba[..., :3])


def test_16bit_grey_keeps_high_byte(tmp_path):
    a = np.random.default_rng(1).integers(0, 65536, size=(9, 11), dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(a).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    out = images.load_image_rgb(path)
    expected = (a >> 8).astype(np.uint8)
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, -1))


def test_32bit_int_and_float_modes(tmp_path):
    small = np.arange(20, dtype=np.int32).reshape(4, 5) * 10  # <= 255: used as 8-bit data
    im = Image.fromarray(small)
    assert im.mode == "I"
    np.testing.assert_array_equal(images.pil_to_rgb(im)[..., 0], small.astype(np.uint8))
    big = np.array([[0, 300, 65535, 70000, -5]], dtype=np.int32)
    np.testing.assert_array_equal(
        images.pil_to_rgb(Image.fromarray(big))[0, :, 1], [0, 1, 255, 255, 0]
    )
    f = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    path = tmp_path / "f.tif"
    Image.fromarray(f).save(path)
    np.testing.assert_array_equal(images.load_image_rgb(path)[0, :, 2], [0, 128, 255])
    f2 = np.array([[-3.0, 100.4, 300.0]], dtype=np.float32)
    np.testing.assert_array_equal(images.pil_to_rgb(Image.fromarray(f2))[0, :, 0], [0, 100, 255])


def test_tiny_and_multiframe(tmp_path):
    path = tmp_path / "one.png"
    Image.fromarray(np.array([[[1, 2, 3]]], np.uint8)).save(path)
    np.testing.assert_array_equal(images.load_image_rgb(path), [[[1, 2, 3]]])
    frames = [Image.fromarray(rgb_array(seed=s)).quantize(32) for s in range(3)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    np.testing.assert_array_equal(images.load_image_rgb(path), pil_reference(path))


def test_exif_orientation_not_applied(tmp_path):
    img = Image.fromarray(rgb_array(8, 16))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "exif.jpg"
    img.save(path, exif=exif.tobytes())
    out = images.load_image_rgb(path)
    assert out.shape == (8, 16, 3)  # stored grid, as HASSOD and COCO annotations use
    np.testing.assert_array_equal(out, pil_reference(path))


def jpeg_bytes():
    buf = io.BytesIO()
    Image.fromarray(rgb_array(64, 64)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("empty.jpg", b"", "0 bytes"),
        ("trunc.jpg", "jpeg_half", "truncated"),
        ("text.jpg", b"this is not an image\n" * 10, "not a recognised image"),
        ("trunc.png", "png_half", "truncated|corrupt"),
    ],
)
def test_bad_files_raise_image_read_error(tmp_path, name, content, reason):
    if content == "jpeg_half":
        content = jpeg_bytes()[: len(jpeg_bytes()) // 2]
    elif content == "png_half":
        buf = io.BytesIO()
        Image.fromarray(rgb_array(64, 64)).save(buf, format="PNG")
        content = buf.getvalue()[: len(buf.getvalue()) // 2]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(images.ImageReadError, match=reason) as e:
        images.load_image_rgb(path)
    assert str(path) in str(e.value) and isinstance(e.value, ValueError)
    assert e.value.path == str(path)


def test_truncated_detected_even_if_pil_global_allows_it(tmp_path, monkeypatch):
    path = tmp_path / "trunc.jpg"
    path.write_bytes(jpeg_bytes()[:600])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(images.ImageReadError, match="truncated"):
        images.load_image_rgb(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the global is restored


def test_missing_dir_and_error_pickles(tmp_path):
    with pytest.raises(images.ImageReadError, match="file not found"):
        images.load_image_rgb(tmp_path / "nope.jpg")
    with pytest.raises(images.ImageReadError, match="directory"):
        images.load_image_rgb(tmp_path)
    e = pickle.loads(pickle.dumps(images.ImageReadError("/a/b.jpg", "why")))
    assert (e.path, e.reason, str(e)) == ("/a/b.jpg", "why", "Cannot read image /a/b.jpg: why")


def test_max_pixels_guard(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(rgb_array(10, 10)).save(path)
    with pytest.raises(images.ImageReadError, match="max_pixels"):
        images.load_image_rgb(path, max_pixels=99)
    assert images.load_image_rgb(path, max_pixels=100).shape == (10, 10, 3)
    assert images.load_image_rgb(path, max_pixels=None).shape == (10, 10, 3)
    assert Image.MAX_IMAGE_PIXELS is not None  # restored after lifting it


def test_resize_for_dino_matches_torch_transcription():
    """Reference: PIL Lanczos, then torchvision's ToTensor + Normalize written out in torch
    (`img.float().div(255)`, `sub_(mean).div_(std)`), as HASSOD's hac.py applies them;
    torchvision itself is not imported because it doubles the import time."""
    torch = pytest.importorskip("torch")
    img = rgb_array(37, 53, seed=3)
    x, small = images.resize_for_dino(img, 48, return_uint8=True)
    ref_small = Image.fromarray(img).resize((48, 48), Image.LANCZOS)
    np.testing.assert_array_equal(small, np.asarray(ref_small))
    assert small.flags.writeable and small.flags.c_contiguous  # pydensecrf needs both
    t = torch.from_numpy(np.asarray(ref_small).copy()).permute(2, 0, 1).float().div(255)
    mean = torch.tensor((0.485, 0.456, 0.406))[:, None, None]
    std = torch.tensor((0.229, 0.224, 0.225))[:, None, None]
    ref = t.sub_(mean).div_(std).permute(1, 2, 0).numpy()
    assert x.dtype == np.float32 and x.shape == (48, 48, 3)
    np.testing.assert_allclose(x, ref, rtol=0, atol=1e-6)
    # Non-square target, and a same-size resize is the identity.
    assert images.resize_uint8(img, (20, 30)).shape == (20, 30, 3)
    np.testing.assert_array_equal(images.resize_uint8(img, (37, 53)), img)
    with pytest.raises(ValueError, match="uint8"):
        images.resize_uint8(img.astype(np.float32), 8)


def touch_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.fromarray(rgb_array(4, 4)).save(folder / n, format="PNG")


def test_list_images_numeric_and_sequential(tmp_path):
    d = tmp_path / "num"
    touch_images(d, ["000000000139.jpg", "000000000632.png", "12.jpg"])
    (d / "notes.txt").write_text("x")
    (d / ".tmp_1.jpg").write_bytes(b"")
    assert images.list_images(d) == [
        (139, "000000000139.jpg"),
        (632, "000000000632.png"),
        (12, "12.jpg"),
    ]
    d2 = tmp_path / "named"
    touch_images(d2, ["b.png", "a.jpg", "10.png", "C.JPG"])
    assert images.list_images(d2) == [(1, "10.png"), (2, "C.JPG"), (3, "a.jpg"), (4, "b.png")]
    d3 = tmp_path / "dupes"  # 1.png and 001.jpg would collide: sequential ids instead
    touch_images(d3, ["1.png", "001.jpg"])
    assert images.list_images(d3) == [(1, "001.jpg"), (2, "1.png")]
    assert images.list_images(tmp_path / "named") == images.list_images(str(d2))  # stable


def test_list_images_from_coco_json_and_missing_folder(tmp_path):
    d = tmp_path / "imgs"
    touch_images(d, ["a.jpg"])
    js = tmp_path / "list.json"
    js.write_text(
        json.dumps(
            {
                "images": [{"id": 7, "file_name": "a.jpg"}, {"id": 3, "file_name": "b.jpg"}],
                "annotations": [],
            }
        )
    )
    assert images.list_images(d, js) == [(7, "a.jpg"), (3, "b.jpg")]
    js.write_text(json.dumps({"images": [{"id": 7}], "annotations": []}))
    with pytest.raises(ValueError, match="file_name"):
        images.list_images(d, js)
    with pytest.raises(FileNotFoundError, match="config.images"):
        images.list_images(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.images"):
        images.list_images(None)
