"""kromhc_vision.data: the embedded digits folder."""
from collections import Counter

from PIL import Image

from kromhc_vision import data


def test_digits_folder_is_a_stratified_image_folder_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv('KROMHC_CACHE', str(tmp_path))
    root = data.digits_folder()
    assert root == tmp_path / 'digits' and sorted(p.name for p in tmp_path.iterdir()) == ['digits']  # no temp dirs
    counts = {split: Counter(p.parent.name for p in (root / split).glob('*/*.png'))
              for split in ('train', 'validation')}
    assert sum(counts['train'].values()) == 1437 and sum(counts['validation'].values()) == 360
    assert sorted(counts['train']) == [str(i) for i in range(10)]
    assert all(abs(counts['validation'][c] / counts['train'][c] - 0.25) < 0.02 for c in counts['train'])  # stratified
    image = Image.open(next((root / 'train' / '0').glob('*.png')))
    assert image.mode == 'RGB' and image.size == (32, 32)
    first = next((root / 'train' / '0').glob('*.png')).stat().st_mtime_ns
    assert data.digits_folder() == root and next((root / 'train' / '0').glob('*.png')).stat().st_mtime_ns == first


def test_per_class_limit(tmp_path):
    root = data.write_digits_folder(tmp_path / 'tiny', per_class=2)
    assert len(list((root / 'train').glob('*/*.png'))) == 20 and len(list((root / 'validation').glob('*/*.png'))) == 20
