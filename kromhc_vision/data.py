"""The embedded default dataset: scikit-learn's handwritten digits as an ImageNet-style image folder.

``load_digits`` (1797 images, 8x8, 10 classes) is split once, stratified with a fixed seed (80 % train, 20 %
validation), and written as RGB 32x32 PNGs to ``<root>/{train,validation}/<class>/<index>.png``, which timm's
``create_dataset`` reads like any ImageNet folder. The folder is built in a temporary directory next to its final
place and renamed into place, so a reader never sees a partial folder, also with concurrent writers.
"""
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .extras import require

DIGITS_SIZE = 32
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def cache_dir() -> Path:
    """``$KROMHC_CACHE``, else ``~/.cache/kromhc_vision``."""
    return Path(os.environ.get('KROMHC_CACHE') or Path.home() / '.cache' / 'kromhc_vision').expanduser()


def write_digits_folder(root: Union[str, Path], per_class: Optional[int] = None) -> Path:
    """Write the digits folder to ``root`` unless it exists; ``per_class`` keeps the first k images per class and split.

    Returns ``root``.
    """
    from PIL import Image

    require("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    if root.is_dir():
        return root
    digits = load_digits()
    index = np.arange(len(digits.target))
    train, val = train_test_split(
        index, test_size=DIGITS_VAL_FRACTION, stratify=digits.target, random_state=DIGITS_SPLIT_SEED)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{root.name}-', dir=root.parent))
    try:
        for split, indices in (('train', train), ('validation', val)):
            counts = {}
            for i in sorted(indices):
                label = int(digits.target[i])
                counts[label] = counts.get(label, 0) + 1
                if per_class is not None and counts[label] > per_class:
                    continue
                folder = tmp / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)  # values 0..16
                image = Image.fromarray(pixels, mode='L').resize((DIGITS_SIZE, DIGITS_SIZE), Image.BICUBIC)
                image.convert('RGB').save(folder / f'{i:04d}.png')
        try:
            os.rename(tmp, root)
        except OSError:  # another process renamed its copy into place first
            if not root.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def digits_folder() -> Path:
    """The cached digits folder (written on first use): ``cache_dir() / 'digits'``."""
    return write_digits_folder(cache_dir() / 'digits')
