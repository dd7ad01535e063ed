"""Image folders: real photos with the right class mapping, the serving resize, bad files skipped
with a warning naming them, and clear errors for layouts that cannot work."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contract.preprocess import to_model_input
from trainer.data import DataError, load_dataset
from trainer.data.imagefolder import load as load_imagefolder


@pytest.fixture(scope="session")
def photo_folder(cifar_sample, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The real photos as ROOT/{train,test}/<label>/<file>: every 4th photo of a class goes to test.

    Returns the root and {relative path: label}.
    """
    root = tmp_path_factory.mktemp("photos")
    seen: dict[str, int] = {}
    where: dict[str, str] = {}
    for path, label in cifar_sample:
        index = seen[label] = seen.get(label, 0) + 1
        split = "test" if index % 4 == 0 else "train"
        target = root / split / label / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
        where[str(target.relative_to(root))] = label
    return root, where


def test_real_photos_load_with_the_right_class_mapping(photo_folder) -> None:
    root, where = photo_folder
    raw = load_imagefolder(root)
    labels = sorted(set(where.values()))
    assert raw.class_names == tuple(labels)
    assert raw.notes == {}
    for split, x, y in (("train", raw.x_train, raw.y_train), ("test", raw.x_test, raw.y_test)):
        files = sorted((rel for rel in where if rel.startswith(split + "/")), key=lambda r: (where[r], r))
        assert len(x) == len(files) and x.dtype == np.uint8 and x.shape[1:] == (32, 32, 3)
        for pixels, label_index, rel in zip(x, y, files, strict=True):
            # The photos are 32x32 already, so the loaded pixels are the file's pixels exactly.
            np.testing.assert_array_equal(pixels, np.asarray(Image.open(root / rel).convert("RGB")))
            assert raw.class_names[label_index] == where[rel]


def test_load_dataset_on_photos(photo_folder) -> None:
    root, where = photo_folder
    d = load_dataset("imagefolder", data_dir=root, val_fraction=0.2, seed=3)
    n_train = sum(rel.startswith("train/") for rel in where)
    assert len(d.x_train) + len(d.x_val) == n_train and len(d.x_val) > 0
    assert d.source == str(root) and not d.synthetic and d.name == "imagefolder"
    assert set(d.y_val.tolist()) == set(range(d.num_classes))  # stratified: every class validated


def _write_folder(root: Path, classes: dict[str, list[tuple[str, Image.Image | bytes]]], split: str) -> None:
    for name, files in classes.items():
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for filename, content in files:
            path = root / split / name / filename
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                content.save(path)


def _solid(color: tuple[int, int, int], size: tuple[int, int] = (32, 32), mode: str = "RGB") -> Image.Image:
    return Image.new("RGB", size, color).convert(mode)


def test_corrupt_and_non_image_files_are_skipped_with_a_warning(tmp_path: Path, caplog) -> None:
    good = _solid((10, 200, 30))
    png = tmp_path / "whole.png"
    good.save(png)
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    _write_folder(
        tmp_path,
        {
            "cats": [("a.png", good), ("big.jpg", big), ("grey.bmp", _solid((90, 90, 90), mode="L"))],
            "dogs": [
                ("b.gif", _solid((255, 0, 0), mode="P")),
                ("broken.png", png.read_bytes()[:40]),  # truncated mid-header
                ("notes.txt", b"these are not pixels\n"),
            ],
        },
        "train",
    )
    _write_folder(tmp_path, {"cats": [("c.png", good)], "dogs": [("d.png", good)]}, "test")

    with caplog.at_level(logging.WARNING, logger="trainer.data.imagefolder"):
        raw = load_imagefolder(tmp_path)

    warned = "\n".join(r.getMessage() for r in caplog.records)
    broken, notes = tmp_path / "train/dogs/broken.png", tmp_path / "train/dogs/notes.txt"
    assert f"skipping {broken}" in warned and f"skipping {notes}" in warned
    assert raw.notes == {"skipped_files": [str(broken), str(notes)]}
    assert raw.class_names == ("cats", "dogs")
    assert raw.y_train.tolist() == [0, 0, 0, 1]
    # Sorted file order within a class: a.png, big.jpg, grey.bmp.
    assert (raw.x_train[0] == (10, 200, 30)).all()
    saved_big = Image.open(tmp_path / "train/cats/big.jpg")
    np.testing.assert_array_equal(raw.x_train[1], to_model_input(saved_big))  # the serving resize
    assert (raw.x_train[2] == 90).all()  # greyscale converted to RGB
    assert (raw.x_train[3] == (255, 0, 0)).all()  # palette image converted to RGB


def test_class_folders_must_match_across_splits(tmp_path: Path) -> None:
    _write_folder(
        tmp_path, {"cats": [("a.png", _solid((1, 2, 3)))], "owls": [("o.png", _solid((1, 2, 3)))]}, "train"
    )
    _write_folder(tmp_path, {"cats": [("a.png", _solid((1, 2, 3)))]}, "test")
    with pytest.raises(
        DataError, match=r"same class sub-folders; only in train: \['owls'\], only in test: \[\]"
    ):
        load_imagefolder(tmp_path)


def test_split_without_images_is_a_clear_error(tmp_path: Path) -> None:
    _write_folder(tmp_path, {"cats": [("a.png", _solid((1, 2, 3)))]}, "train")
    _write_folder(tmp_path, {"cats": [("junk.txt", b"nope")]}, "test")
    with pytest.raises(DataError, match=rf"{tmp_path / 'test'} holds no readable images"):
        load_imagefolder(tmp_path)


def test_missing_layout_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs a data directory"):
        load_dataset("imagefolder")
    with pytest.raises(DataError, match=rf"{tmp_path / 'train'} is missing"):
        load_dataset("imagefolder", data_dir=tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="has no class sub-folders"):
        load_imagefolder(tmp_path)


def test_exif_oriented_photos_train_as_the_gateway_serves_them(tmp_path: Path) -> None:
    """A phone stores a portrait photo sideways with EXIF Orientation 6; the gateway turns it upright,
    so training must too, or the model learns pictures turned a quarter from what it will be shown."""
    from tests.trainer.graph_image_cases import exif_block, gateway_pixels, jpeg, synthetic_photo

    photo = synthetic_photo()
    files = {k: jpeg(photo, exif_block(k)) for k in range(1, 9)}
    _write_folder(tmp_path, {"turned": [(f"{k}.jpg", data) for k, data in files.items()]}, "train")
    _write_folder(tmp_path, {"turned": [("6.jpg", files[6])]}, "test")

    raw = load_imagefolder(tmp_path)

    served = gateway_pixels([files[k] for k in range(1, 9)]).astype(np.uint8)
    np.testing.assert_array_equal(raw.x_train, served)
    np.testing.assert_array_equal(raw.x_test[0], served[5])
    assert len({pixels.tobytes() for pixels in raw.x_train}) == 8  # each orientation its own pixels


def test_oversized_images_are_skipped_on_every_decoding_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Pillow only warns (DecompressionBombWarning) between MAX_IMAGE_PIXELS and twice that; the
    reader makes the warning an error on its decoding threads too, so such files are skipped."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    warns, raises = _solid((1, 2, 3), size=(50, 50)), _solid((1, 2, 3), size=(80, 80))  # 2500, 6400 px
    small = [(f"ok{i}.png", _solid((9, 9, 9))) for i in range(6)]
    classes = {"a": [("warns.png", warns), *small], "b": [("raises.png", raises), *small]}
    _write_folder(tmp_path, classes, "train")
    _write_folder(tmp_path, {"a": small[:1], "b": small[:1]}, "test")
    with caplog.at_level(logging.WARNING, logger="trainer.data.imagefolder"):
        raw = load_imagefolder(tmp_path, threads=4)
    skipped = [str(tmp_path / "train/a/warns.png"), str(tmp_path / "train/b/raises.png")]
    assert raw.notes == {"skipped_files": skipped}
    assert "DecompressionBombWarning" in caplog.text and "DecompressionBombError" in caplog.text
    assert len(raw.x_train) == 12


def test_threads_change_nothing_but_the_time(tmp_path: Path) -> None:
    """Files decode on several threads; the arrays and their order are those of one thread."""
    from tests.trainer.graph_image_cases import large_jpeg

    kinds = ["420", "444", "progressive", "grayscale", "oriented"]
    files = {name: [(f"{i}.jpg", large_jpeg((300 + 37 * i + c, 260 + 11 * i), kinds[i % 5]))
                    for i in range(9)] for c, name in enumerate(("cats", "dogs"))}  # fmt: skip
    _write_folder(tmp_path, files, "train")
    _write_folder(tmp_path, {name: f[:2] for name, f in files.items()}, "test")
    one, many = load_imagefolder(tmp_path, threads=1), load_imagefolder(tmp_path, threads=4)
    np.testing.assert_array_equal(one.x_train, many.x_train)
    np.testing.assert_array_equal(one.y_train, many.y_train)
    np.testing.assert_array_equal(one.x_test, many.x_test)
    assert len({x.tobytes() for x in many.x_train}) == 18  # every file its own pixels
