"""Datasets the scripts prepare offline: scikit-learn's digits as an image folder; Fashion-MNIST for torchvision.

**Digits** (the embedded default). ``load_digits`` (1797 images, 8x8, 10 classes) is split once, stratified with a fixed seed (80 % train, 20 %
validation), and written as RGB 32x32 PNGs to ``<root>/{train,validation}/<class>/<index>.png``, which timm's
``create_dataset`` reads like any ImageNet folder. The folder is built in a temporary directory next to its final
place and renamed into place, so a reader never sees a partial folder, also with concurrent writers.

**Fashion-MNIST** (Zalando; 60,000 training and 10,000 test images, 28x28 grayscale, 10 classes, 6,000 / 1,000
per class). timm reads it through torchvision (``--dataset torch/fashion_mnist``), which expects
``<root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (decompressed IDX files).
:func:`fashion_mnist_root` writes that layout from Debian's package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/*.gz``) when the data is not to be downloaded. Debian recompressed the
publisher's files, so their ``.gz`` checksums (torchvision's) differ; what is checked is the decompressed bytes
(SHA-256 of the publisher's IDX files) and, for any IDX set, the headers: magic number, dimensions, file length,
the same count of images and labels, labels below 10. ``train_per_class=k`` keeps the first ``k`` training
images of every class (file order; the test set is always whole), for a budget run.
:func:`torch_dataset_root` is the rule ``train.py`` applies: which root ``torch/fashion_mnist`` reads.
"""
import contextlib
import gzip
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np

from .extras import require

DIGITS_SIZE = 32
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def cache_dir() -> Path:
    """``$KROMHC_CACHE``, else ``~/.cache/kromhc_vision``."""
    return Path(os.environ.get('KROMHC_CACHE') or Path.home() / '.cache' / 'kromhc_vision').expanduser()


@contextlib.contextmanager
def atomic_folder(final: Path):
    """Yield a temporary folder beside ``final`` to fill; on success rename it to ``final``.

    A reader never sees a partial folder. When another process renamed its copy into place first, that copy
    stays and this one is discarded; on failure nothing is left behind.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{final.name}-', dir=final.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:  # another process renamed its copy into place first
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_digits_folder(root: Union[str, Path], per_class: Optional[int] = None) -> Path:
    """Write the digits folder to ``root`` unless it exists; ``per_class`` keeps the first k images per class and split.

    The folder records its image count per split (``manifest.json``); an existing folder whose count differs (images
    deleted or added since) raises :class:`DatasetIntegrityError` naming it, instead of being read as it is.
    Returns ``root``.
    """
    from PIL import Image

    require("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if per_class is not None and (isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1):
        raise ValueError(f'per_class must be a positive int or None, got {per_class!r}')  # 0: an empty folder
    root = Path(root)
    if root.is_dir():
        check_digits_folder(root)
        return root
    digits = load_digits()
    index = np.arange(len(digits.target))
    train, val = train_test_split(
        index, test_size=DIGITS_VAL_FRACTION, stratify=digits.target, random_state=DIGITS_SPLIT_SEED)
    with atomic_folder(root) as tmp:
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
        counts = {split: _count_images(tmp / split) for split in ('train', 'validation')}
        (tmp / DIGITS_MANIFEST).write_text(json.dumps(counts))
    return root


DIGITS_MANIFEST = 'manifest.json'


def _count_images(folder: Path) -> int:
    return sum(len([f for f in files if f.endswith('.png')]) for _, _, files in os.walk(folder))


def check_digits_folder(root: Path) -> None:
    """Raise :class:`DatasetIntegrityError` unless each split of the digits folder ``root`` holds the images its
    manifest counts (a folder written before manifests were, without one, is taken as it is)."""
    manifest = root / DIGITS_MANIFEST
    if not manifest.is_file():
        return
    for split, expected in json.loads(manifest.read_text()).items():
        found = _count_images(root / split)
        if found != expected:
            raise DatasetIntegrityError(f'digits folder {root}: {split} holds {found} images, its manifest '
                                        f'{expected}: changed since it was written; remove the folder and it is '
                                        'written again')


def digits_folder() -> Path:
    """The cached digits folder (written on first use): ``cache_dir() / 'digits'``."""
    return write_digits_folder(cache_dir() / 'digits')



# ------------------------------------------------------------------------------------------------- Fashion-MNIST
FASHION_MNIST_DEBIAN = Path('/usr/share/datasets/fashion-mnist')
FASHION_MNIST_APT = 'apt-get install dataset-fashion-mnist'
FASHION_MNIST_CLASSES = 10
# (IDX magic number, dimensions) of the publisher's files; magic 0x0803: uint8, 3 dims; 0x0801: uint8, 1 dim
FASHION_MNIST_FILES = {
    'train-images-idx3-ubyte': (0x0803, (60000, 28, 28)),
    'train-labels-idx1-ubyte': (0x0801, (60000,)),
    't10k-images-idx3-ubyte': (0x0803, (10000, 28, 28)),
    't10k-labels-idx1-ubyte': (0x0801, (10000,)),
}
# SHA-256 of the decompressed files, the bytes the publisher's .gz files (torchvision's MD5s) decompress to
FASHION_MNIST_SHA256 = {
    'train-images-idx3-ubyte': 'c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888',
    'train-labels-idx1-ubyte': 'bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9',
    't10k-images-idx3-ubyte': '5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b',
    't10k-labels-idx1-ubyte': '0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34',
}


class DatasetUnavailableError(FileNotFoundError):
    """The dataset's files are not where they are looked for, and it is not to be downloaded."""


class DatasetIntegrityError(ValueError):
    """A dataset file is not what it should be (header, length, labels or checksum); the message names the file."""


def read_idx(data: bytes, name: str = 'IDX file') -> np.ndarray:
    """The array of an IDX file's bytes (``uint8`` data only, what MNIST-style sets hold).

    Header: two zero bytes, type code ``0x08`` (uint8), the number of dimensions ``d``, then ``d`` big-endian
    uint32 sizes. Raises :class:`DatasetIntegrityError` for another layout or a length that is not the header's.
    """
    if len(data) < 4 or data[:2] != b'\0\0' or data[2] != 0x08:
        raise DatasetIntegrityError(f'{name}: not a uint8 IDX file (header {data[:4].hex() or "empty"}, expected '
                                    '0000 08 <dims>)')
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DatasetIntegrityError(f'{name}: truncated IDX header ({len(data)} bytes for {ndim} dimensions)')
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    expected = 4 + 4 * ndim + math.prod(dims)  # Python ints: NumPy's int64 product wraps round (to 0 for 4 x 65536)
    if len(data) != expected:
        raise DatasetIntegrityError(f'{name}: {len(data):,} bytes, but its header {dims} says {expected:,}'
                                    + (' (truncated)' if len(data) < expected else ''))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX file of a ``uint8`` array (what :func:`read_idx` reads)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return bytes([0, 0, 0x08, array.ndim]) + b''.join(d.to_bytes(4, 'big') for d in array.shape) + array.tobytes()


def _read_source(source: Path, name: str) -> bytes:
    for path in (source / f'{name}.gz', source / name):
        if path.is_file():
            try:
                return gzip.decompress(path.read_bytes()) if path.suffix == '.gz' else path.read_bytes()
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                raise DatasetIntegrityError(f'{path}: cannot be decompressed ({e})') from None
    raise DatasetUnavailableError(
        f'Fashion-MNIST: {source / (name + ".gz")} not found. Install Debian\'s copy with `{FASHION_MNIST_APT}` '
        f'(files under {FASHION_MNIST_DEBIAN}), or let torchvision download it with --dataset-download '
        f'(into --data-dir, else {cache_dir() / "fashion_mnist_download"})')


def check_fashion_mnist(files: Dict[str, bytes], checksums: Optional[Dict[str, str]] = FASHION_MNIST_SHA256,
                        where: Union[str, Path] = '') -> Dict[str, np.ndarray]:
    """The four arrays of a Fashion-MNIST IDX set (decompressed bytes by file name), after every check.

    Each file's header must have the publisher's magic number and image size (28x28), images and labels of a
    split the same count, labels ``0 .. 9``. ``checksums`` (default: the publisher's SHA-256) are compared with
    the decompressed bytes; ``None`` skips them (a test's tiny set). Raises :class:`DatasetIntegrityError`.
    """
    arrays = {}
    for name, (magic, dims) in FASHION_MNIST_FILES.items():
        label = str(Path(where) / name) if where else name
        data = files[name]
        arrays[name] = array = read_idx(data, label)
        if int.from_bytes(data[:4], 'big') != magic or array.shape[1:] != dims[1:]:
            raise DatasetIntegrityError(f'{label}: IDX header {data[:4].hex()} with shape {array.shape}; expected '
                                        f'magic {magic:08x} and shape (count, {", ".join(map(str, dims[1:]))})'
                                        .replace(', )', ')'))
        if checksums is not None:
            digest = hashlib.sha256(data).hexdigest()
            if digest != checksums[name]:
                raise DatasetIntegrityError(f'{label}: SHA-256 of the decompressed file is {digest}, expected '
                                            f'{checksums[name]} (the publisher\'s file)')
    for split in ('train', 't10k'):
        images, labels = arrays[f'{split}-images-idx3-ubyte'], arrays[f'{split}-labels-idx1-ubyte']
        if len(images) != len(labels):
            raise DatasetIntegrityError(f'{where or "Fashion-MNIST"}: {split} has {len(images):,} images but '
                                        f'{len(labels):,} labels')
        if labels.size and labels.max() >= FASHION_MNIST_CLASSES:
            raise DatasetIntegrityError(f'{where or "Fashion-MNIST"}: {split} label {int(labels.max())} is not a '
                                        f'class (0 .. {FASHION_MNIST_CLASSES - 1})')
    return arrays


def first_per_class(labels: np.ndarray, k: int) -> np.ndarray:
    """Indices (ascending) of the first ``k`` images of every class; refused if a class has fewer."""
    counts = np.bincount(labels, minlength=FASHION_MNIST_CLASSES)
    if counts.min() < k:
        raise ValueError(f'train_per_class={k}: class {int(counts.argmin())} has only {int(counts.min())} images')
    rank = np.zeros(len(labels), dtype=np.int64)
    for c in range(FASHION_MNIST_CLASSES):
        rank[labels == c] = np.arange(counts[c])
    return np.flatnonzero(rank < k)


def write_fashion_mnist_root(root: Union[str, Path], source: Union[str, Path] = FASHION_MNIST_DEBIAN,
                             train_per_class: Optional[int] = None,
                             checksums: Optional[Dict[str, str]] = FASHION_MNIST_SHA256) -> Path:
    """Write torchvision's ``<root>/FashionMNIST/raw/`` from the IDX files in ``source`` unless it exists.

    ``source`` holds the four files, gzipped (``*.gz``, Debian's layout) or not; they are checked
    (:func:`check_fashion_mnist`) before anything is written; ``train_per_class=k`` writes the first ``k`` training
    images of each class (test set whole). Written in a temporary folder and renamed into place. Returns ``root``.
    Raises :class:`DatasetUnavailableError` (a file is missing: names the apt command and ``--dataset-download``)
    or :class:`DatasetIntegrityError`.
    """
    if train_per_class is not None and (isinstance(train_per_class, bool) or not isinstance(train_per_class, int)
                                        or train_per_class < 1):
        raise ValueError(f'train_per_class must be a positive int or None, got {train_per_class!r}')
    root, source = Path(root), Path(source)
    raw = root / 'FashionMNIST' / 'raw'
    if raw.is_dir():
        return root
    arrays = check_fashion_mnist({name: _read_source(source, name) for name in FASHION_MNIST_FILES}, checksums,
                                 source)
    if train_per_class is not None:
        keep = first_per_class(arrays['train-labels-idx1-ubyte'], train_per_class)
        for name in ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'):
            arrays[name] = arrays[name][keep]
    with atomic_folder(root / 'FashionMNIST') as tmp:
        (tmp / 'raw').mkdir()
        for name, array in arrays.items():
            (tmp / 'raw' / name).write_bytes(idx_bytes(array))
    return root


def fashion_mnist_root(train_per_class: Optional[int] = None, source: Union[str, Path, None] = None) -> Path:
    """The cached torchvision root for ``torch/fashion_mnist`` (written on first use from ``source``, default
    :data:`FASHION_MNIST_DEBIAN`): ``cache_dir() / 'fashion_mnist'``, or ``.../fashion_mnist_train<k>pc`` with
    ``train_per_class=k``."""
    name = 'fashion_mnist' if train_per_class is None else f'fashion_mnist_train{train_per_class}pc'
    return write_fashion_mnist_root(cache_dir() / name, source or FASHION_MNIST_DEBIAN, train_per_class,
                                    checksums=FASHION_MNIST_SHA256)


# torchvision dataset names (timm's ``torch/<name>``) whose files this module can prepare offline
PREPARED_TORCH_DATASETS = {'fashion_mnist': ('FashionMNIST', tuple(FASHION_MNIST_FILES))}


def torch_dataset_root(dataset: str, data_dir: Optional[str], download: bool) -> Optional[str]:
    """The root timm's ``create_dataset(dataset, root=...)`` should read, checked before any work.

    For ``torch/fashion_mnist``: with ``download``, ``data_dir`` (default ``cache_dir()/'fashion_mnist_download'``,
    not the prepared root, which is written whole or not at all: a killed download would leave it half there) and
    torchvision downloads what is missing; else a given ``data_dir`` must hold torchvision's raw files, and
    without one the Debian files are prepared (:func:`fashion_mnist_root`). Raises
    :class:`DatasetUnavailableError` naming the apt command and ``--dataset-download``. Any other dataset:
    ``data_dir`` unchanged.
    """
    prefix, _, name = (dataset or '').partition('/')
    if prefix.lower() != 'torch' or name.lower() not in PREPARED_TORCH_DATASETS:
        return data_dir
    folder, files = PREPARED_TORCH_DATASETS[name.lower()]
    if download:
        root = data_dir or str(cache_dir() / f'{name.lower()}_download')
        os.makedirs(root, exist_ok=True)
        return root
    if data_dir is None:
        return str(fashion_mnist_root())
    missing = [f for f in files if not os.path.isfile(os.path.join(data_dir, folder, 'raw', f))]
    if missing:
        raise DatasetUnavailableError(
            f'{dataset}: {os.path.join(data_dir, folder, "raw")} lacks {", ".join(missing)}. Leave out --data-dir '
            f'to prepare it from Debian\'s package (`{FASHION_MNIST_APT}`), or add --dataset-download to let '
            'torchvision download it there')
    return data_dir
