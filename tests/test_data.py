"""Training images from users: every format converted, bad files skipped by name."""
import numpy as np
import pytest
from PIL import Image

from loldu_diffusion.training.data import (DataError, ImageSet, caption_for, check_identifier, read_images,
                                           step_generator, to_rgb)


def test_conversions_to_8bit_rgb(tmp_path):
    gray = Image.new("L", (8, 6), 100)
    assert to_rgb(gray).mode == "RGB" and to_rgb(gray).getpixel((0, 0)) == (100, 100, 100)
    rgba = Image.new("RGBA", (8, 6), (255, 0, 0, 0))  # fully transparent red → white
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (8, 6), (0, 255, 255, 0))
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)
    deep = Image.fromarray(np.full((6, 8), 65535, dtype=np.uint16))
    assert deep.mode.startswith("I") and to_rgb(deep).getpixel((0, 0)) == (255, 255, 255)
    # EXIF orientation 6 (rotate 90° clockwise on display): width and height swap
    path = tmp_path / "rot.jpg"
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, exif=exif)
    with Image.open(path) as im:
        assert to_rgb(im).size == (20, 40)


def test_unreadable_files_are_skipped_by_name(tmp_path):
    Image.new("RGB", (10, 10), (1, 2, 3)).save(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "notes.md").write_text("ignored: not an image extension")
    images, skipped = read_images(str(tmp_path))
    assert [p.split("/")[-1] for p, _ in images] == ["good.png"]
    assert len(skipped) == 1 and skipped[0].startswith("broken.jpg (")
    warnings = []
    s = ImageSet.from_folder(str(tmp_path), "a photo of sks dog", 8, warn=warnings.append)
    assert len(s) == 1 and "broken.jpg" in warnings[0] and s.images[0].shape == (3, 8, 8)


def test_no_usable_image_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        ImageSet.from_folder(str(tmp_path / "nope"), "p", 8)
    with pytest.raises(DataError, match="no image .* found"):
        ImageSet.from_folder(str(tmp_path), "p", 8)
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="no readable image found"):
        ImageSet.from_folder(str(tmp_path), "p", 8, warn=lambda m: None)


def test_caption_files(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(img)
    assert caption_for(str(img), "default") == "default"
    (tmp_path / "a.txt").write_text("a photo of sks dog on the beach\n")
    assert caption_for(str(img), "default") == "a photo of sks dog on the beach"


def test_captioned_toy_subject_names_each_images_background(tmp_path):
    # the bench's captioned rows: each instance image's caption is the instance prompt on its own background,
    # which the trainer reads as that image's caption; the judge's subject.json is the same as without captions
    from loldu_diffusion.toy.concepts import DEFAULT_SUBJECT, TRAIN_BACKGROUNDS, read_subject, render_subject
    from loldu_diffusion.toy.judge import load_judge

    paths = render_subject(DEFAULT_SUBJECT, str(tmp_path), n=3, captions=True)
    seen = load_judge().read([Image.open(p) for p in paths])
    for p, a in zip(paths, seen):
        assert caption_for(p, "unused") == f"a photo of sks heart on a {a['background_color']} background"
    assert {a["background_color"] for a in seen} == set(TRAIN_BACKGROUNDS)
    assert read_subject(str(tmp_path)) == DEFAULT_SUBJECT
    render_subject(DEFAULT_SUBJECT, str(tmp_path / "plain"), n=3)
    assert not list((tmp_path / "plain").glob("*.txt"))


def test_identifier_warning():
    assert check_identifier("a photo of sks dog") is None
    assert check_identifier("a photo of ohwx man") is None
    warning = check_identifier("a photo of my dog")
    assert "no rare identifier" in warning and "sks dog" in warning


def test_step_generators_are_reproducible_and_distinct():
    a = torch_rand(step_generator(42, 10, 0, 0))
    assert a == torch_rand(step_generator(42, 10, 0, 0))
    assert a != torch_rand(step_generator(42, 10, 0, 1)) and a != torch_rand(step_generator(42, 11, 0, 0))


def torch_rand(g):
    import torch

    return torch.rand(3, generator=g).tolist()


def test_photo_warning_counts_each_photo_once_and_reads_each_file_once(tmp_path, monkeypatch):
    """The embedded base warns about photos from the sizes read with the images (no second read), once per photo
    whatever --repeats is."""
    from loldu_diffusion.training.loop import warn_about_photos

    for name, size in (("a.png", (300, 200)), ("b.png", (200, 240)), ("small.png", (32, 32))):
        Image.new("RGB", size, (9, 9, 9)).save(tmp_path / name)
    images = ImageSet.from_folder(str(tmp_path), "a photo of sks dog", 32).repeated(3)
    assert len(images) == 9 and sorted(images.read_sides) == [32, 200, 200]
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("a photo was opened again"))
    said = []
    warn_about_photos(images, 32, said.append)
    assert len(said) == 1 and "2 of the 3 instance images are larger pictures" in said[0]
    said.clear()
    warn_about_photos(images, 128, said.append)  # 200 px is no photo for a 128 px base
    assert said == []
