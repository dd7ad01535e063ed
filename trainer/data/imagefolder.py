"""Your own classes: ROOT/train/<class>/* and ROOT/test/<class>/*, one sub-folder per class.

Any file Pillow opens is turned upright by its EXIF orientation, converted to RGB and resized to 32x32
by contract.preprocess.decode_to_model_input, the steps the gateway takes, so training sees exactly
the pixels serving will (a phone photo stored sideways with Orientation 6 included). Files are decoded
on a thread per CPU (Pillow decodes and resizes without holding the GIL), in a fixed order. Files Pillow
cannot read are skipped with a warning naming each one. Class names are the sorted sub-folder
names, which must be the same in both splits (the label indices depend on it).
"""

from __future__ import annotations

import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from contract.preprocess import decode_to_model_input
from trainer.data.errors import DataError
from trainer.data.raw import RawSplits

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")


def load(root: Path, threads: int | None = None) -> RawSplits:
    """Read both splits under `root`; see the module docstring for the layout. `threads`: decoding
    threads, default one per CPU this process may use."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"image folder {root} does not exist; pass --data-dir ROOT with ROOT/train and ROOT/test"
        )
    class_lists = {split: _class_names(root, split) for split in SPLITS}
    if class_lists["train"] != class_lists["test"]:
        only_train = sorted(set(class_lists["train"]) - set(class_lists["test"]))
        only_test = sorted(set(class_lists["test"]) - set(class_lists["train"]))
        raise DataError(
            f"{root}: train/ and test/ must have the same class sub-folders; only in train: {only_train}, "
            f"only in test: {only_test}. Add or remove folders so both splits list the same classes."
        )
    class_names = class_lists["train"]
    skipped: list[str] = []
    threads = threads or len(os.sched_getaffinity(0))
    with ThreadPoolExecutor(threads, thread_name_prefix="imagefolder") as pool, warnings.catch_warnings():
        # Oversized images warn (DecompressionBombWarning); treat them like other bad files. Set here,
        # around all the threads: the warnings filters are the process's, not a thread's.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        arrays = {split: _read_split(root / split, class_names, skipped, pool) for split in SPLITS}
    (x_train, y_train), (x_test, y_test) = arrays["train"], arrays["test"]
    return RawSplits(
        class_names=class_names,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        source=str(root),
        notes={"skipped_files": skipped} if skipped else {},
    )


def _class_names(root: Path, split: str) -> tuple[str, ...]:
    folder = root / split
    if not folder.is_dir():
        raise DataError(
            f"{folder} is missing; an image folder needs {root}/train/<class>/ and {root}/test/<class>/"
        )
    names = tuple(sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")))
    if not names:
        raise DataError(f"{folder} has no class sub-folders; put each class's images in {folder}/<class>/")
    return names


def _read_split(
    folder: Path, class_names: tuple[str, ...], skipped: list[str], pool: ThreadPoolExecutor
) -> tuple[np.ndarray, np.ndarray]:
    images: list[np.ndarray] = []
    labels: list[int] = []
    for index, name in enumerate(class_names):
        count = 0
        paths = sorted(p for p in (folder / name).rglob("*") if p.is_file() and not p.name.startswith("."))
        for path, pixels in zip(paths, pool.map(_read_image, paths), strict=True):
            if pixels is None:
                skipped.append(str(path))
                continue
            images.append(pixels)
            labels.append(index)
            count += 1
        if count == 0:
            logger.warning("class %r has no readable images in %s", name, folder / name)
    if not images:
        raise DataError(
            f"{folder} holds no readable images; put image files (PNG, JPEG, ...) in {folder}/<class>/"
        )
    return np.stack(images), np.asarray(labels, dtype=np.int32)


def _read_image(path: Path) -> np.ndarray | None:
    """uint8 [32,32,3] pixels of an image file, or None (with a warning) when it is unreadable."""
    try:
        with Image.open(path) as image:
            return decode_to_model_input(image)
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombWarning,
        Image.DecompressionBombError,
    ) as err:
        logger.warning("skipping %s: not a readable image (%s: %s)", path, type(err).__name__, err)
        return None
