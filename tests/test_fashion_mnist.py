"""Fashion-MNIST: torchvision's folder prepared from IDX files (tiny ones built here), its checks, and the
comparison command. No test needs Debian's dataset-fashion-mnist package."""
import gzip
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.data import create_dataset, create_loader

from kromhc_vision import data
from kromhc_vision.cli import ConfigError
from kromhc_vision.cli.train_config import parse_args, validate

NAMES = list(data.FASHION_MNIST_FILES)
CONFIG = str(Path(__file__).resolve().parents[1] / 'configs' / 'fashion_mnist_kromhc.yaml')


def tiny_set(train_per_class=3, test_per_class=2, seed=0):
    """Decompressed bytes of a tiny Fashion-MNIST-shaped IDX set (classes interleaved like the real files)."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, k in (('train', train_per_class), ('t10k', test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), k))
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        out[f'{split}-images-idx3-ubyte'] = data.idx_bytes(images)
        out[f'{split}-labels-idx1-ubyte'] = data.idx_bytes(labels)
    return out


def write_source(folder, files, compress=True):
    folder.mkdir(parents=True, exist_ok=True)
    for name, raw in files.items():
        if compress:
            (folder / f'{name}.gz').write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return folder


def sha(files):
    return {name: hashlib.sha256(raw).hexdigest() for name, raw in files.items()}


def test_idx_round_trip_and_header_checks():
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    raw = data.idx_bytes(array)
    assert raw[:4] == bytes([0, 0, 8, 3]) and int.from_bytes(raw[4:8], 'big') == 2
    assert np.array_equal(data.read_idx(raw), array)
    with pytest.raises(data.DatasetIntegrityError, match=r'x: .* bytes, but its header \(2, 28, 28\).*truncated'):
        data.read_idx(raw[:-1], 'x')
    with pytest.raises(data.DatasetIntegrityError, match='not a uint8 IDX file'):
        data.read_idx(b'\x00\x00\x0d\x03' + raw[4:], 'x')  # float32 type code


def test_prepared_root_is_read_by_torchvision_through_timm(tmp_path):
    files = tiny_set()
    source = write_source(tmp_path / 'debian', files)
    root = data.write_fashion_mnist_root(tmp_path / 'root', source, checksums=sha(files))
    assert sorted(p.name for p in (root / 'FashionMNIST' / 'raw').iterdir()) == sorted(NAMES)
    assert sorted(p.name for p in (root / 'FashionMNIST').iterdir()) == ['raw']  # no temporary folder left
    train = create_dataset('torch/fashion_mnist', root=str(root), split='train')
    test = create_dataset('torch/fashion_mnist', root=str(root), split='test')
    assert len(train) == 30 and len(test) == 20
    labels = data.read_idx(files['t10k-labels-idx1-ubyte'])
    images = data.read_idx(files['t10k-images-idx3-ubyte'])
    image, label = test[3]
    assert label == labels[3] and np.array_equal(np.asarray(image), images[3])
    # grayscale through timm's loader: one channel, normalised with the configs' mean / std
    loader = create_loader(test, input_size=(1, 28, 28), batch_size=20, mean=(0.286,), std=(0.353,), crop_pct=1.0,
                           interpolation='bilinear', device=torch.device('cpu'))
    x, y = next(iter(loader))
    assert x.shape == (20, 1, 28, 28) and torch.equal(y, torch.as_tensor(labels.copy(), dtype=torch.long))
    expected = (torch.as_tensor(images.copy(), dtype=torch.float32) / 255 - 0.286) / 0.353
    torch.testing.assert_close(x[:, 0], expected, atol=1e-5, rtol=0)  # crop_pct 1: the whole image, unresized


def test_train_per_class_keeps_the_first_k_of_each_class(tmp_path):
    files = tiny_set(train_per_class=5)
    source = write_source(tmp_path / 'src', files, compress=False)  # uncompressed sources are read too
    root = data.write_fashion_mnist_root(tmp_path / 'root', source, train_per_class=2, checksums=None)
    raw = root / 'FashionMNIST' / 'raw'
    labels = data.read_idx((raw / 'train-labels-idx1-ubyte').read_bytes())
    images = data.read_idx((raw / 'train-images-idx3-ubyte').read_bytes())
    assert np.bincount(labels).tolist() == [2] * 10
    all_labels = data.read_idx(files['train-labels-idx1-ubyte'])
    keep = [i for i in range(len(all_labels)) if list(all_labels[:i]).count(all_labels[i]) < 2]
    assert np.array_equal(images, data.read_idx(files['train-images-idx3-ubyte'])[keep])
    assert (raw / 't10k-images-idx3-ubyte').read_bytes() == files['t10k-images-idx3-ubyte']  # test set whole
    with pytest.raises(ValueError, match='class .* has only 5 images'):
        data.write_fashion_mnist_root(tmp_path / 'r2', source, train_per_class=6, checksums=None)


@pytest.mark.parametrize('fault, message', [
    ('checksum', r'train-images-idx3-ubyte: SHA-256 of the decompressed file is [0-9a-f]{64}, expected c59f'),
    ('count', r'train has 30 images but 29 labels'),
    ('label', r't10k label 10 is not a class'),
    ('shape', r'train-images-idx3-ubyte: IDX header .* expected magic 00000803 and shape \(count, 28, 28\)'),
    ('gzip', r'train-labels-idx1-ubyte.gz: cannot be decompressed'),
])
def test_a_faulty_set_is_refused_naming_the_file_and_nothing_is_written(tmp_path, fault, message):
    files = tiny_set()
    checksums = sha(files)
    if fault == 'checksum':
        checksums = data.FASHION_MNIST_SHA256  # the real files' digests: the tiny files are not those
    elif fault == 'count':
        labels = data.read_idx(files['train-labels-idx1-ubyte'])
        files['train-labels-idx1-ubyte'] = data.idx_bytes(labels[:-1])
    elif fault == 'label':
        labels = data.read_idx(files['t10k-labels-idx1-ubyte']).copy()
        labels[0] = 10
        files['t10k-labels-idx1-ubyte'] = data.idx_bytes(labels)
    elif fault == 'shape':
        files['train-images-idx3-ubyte'] = data.idx_bytes(np.zeros((30, 32, 32), np.uint8))
    if fault in ('count', 'label', 'shape'):
        checksums = None
    source = write_source(tmp_path / 'src', files)
    if fault == 'gzip':
        (source / 'train-labels-idx1-ubyte.gz').write_bytes(b'\x1f\x8b garbage')
    with pytest.raises(data.DatasetIntegrityError, match=message):
        data.write_fashion_mnist_root(tmp_path / 'root', source, checksums=checksums)
    assert not (tmp_path / 'root').exists() or not list((tmp_path / 'root').iterdir())


def test_missing_files_name_the_apt_command_and_the_download_flag(tmp_path, monkeypatch):
    with pytest.raises(data.DatasetUnavailableError) as e:
        data.write_fashion_mnist_root(tmp_path / 'root', tmp_path / 'nothing')
    assert 'apt-get install dataset-fashion-mnist' in str(e.value) and '--dataset-download' in str(e.value)
    assert 'train-images-idx3-ubyte.gz' in str(e.value)
    # train.py: no Debian package and no --data-dir: refused before any work, with the same advice
    monkeypatch.setenv('KROMHC_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(data, 'FASHION_MNIST_DEBIAN', tmp_path / 'nothing')
    args, _ = parse_args(['-c', CONFIG, '--output', str(tmp_path / 'out')])
    with pytest.raises(ConfigError, match=r'apt-get install dataset-fashion-mnist.*--dataset-download'):
        validate(args)
    # a --data-dir without torchvision's raw files: refused, naming the folder and both remedies
    args, _ = parse_args(['-c', CONFIG, '--output', str(tmp_path / 'out'),
                          '--data-dir', str(tmp_path)])
    with pytest.raises(ConfigError, match=r'FashionMNIST/raw lacks train-images-idx3-ubyte.*--dataset-download'):
        validate(args)


def test_torch_dataset_root_rule(tmp_path, monkeypatch):
    monkeypatch.setenv('KROMHC_CACHE', str(tmp_path / 'cache'))
    files = tiny_set()
    monkeypatch.setattr(data, 'FASHION_MNIST_DEBIAN', write_source(tmp_path / 'debian', files))
    monkeypatch.setattr(data, 'FASHION_MNIST_SHA256', sha(files))
    assert data.torch_dataset_root('', None, False) is None  # the folder dataset: train.py's digits default
    assert data.torch_dataset_root('torch/cifar10', '/x', False) == '/x'
    root = data.torch_dataset_root('torch/fashion_mnist', None, False)  # prepared from the Debian files
    assert root == str(tmp_path / 'cache' / 'fashion_mnist')
    assert (tmp_path / 'cache' / 'fashion_mnist' / 'FashionMNIST' / 'raw' / NAMES[0]).read_bytes() == files[NAMES[0]]
    assert data.torch_dataset_root('torch/fashion_mnist', root, False) == root  # a prepared --data-dir
    # torchvision downloads into a root of its own: one it leaves half written (killed) is never taken for the
    # prepared one, which is written whole or not at all (they were the same folder)
    down = data.torch_dataset_root('torch/fashion_mnist', None, True)
    assert down == str(tmp_path / 'cache' / 'fashion_mnist_download') != root


def test_blow_up_rule():
    from kromhc_vision.cli.compare.fashion import blow_up
    assert not blow_up([2.3, 2.0, 1.5, 1.2, 1.0, 0.9, 0.9, 0.8, 0.8, 0.7, 0.7])
    assert blow_up([2.3, 2.0, 1.5, 1.2, 1.0, 0.9, 3.6, 0.8, 0.8, 0.7, 0.7])  # above 1.5x the first loss
    assert blow_up([2.3, 2.0, 1.5, 1.2, 1.0, 0.9, float('nan'), 0.8, 0.8, 0.7, 0.7])
    assert not blow_up([])


def test_results_sections_keep_each_other_in_order(tmp_path):
    from kromhc_vision.cli.compare import fashion, report
    path = tmp_path / 'RESULTS.md'
    path.write_text('# Results\n\nold unmarked digits text\n\n<!-- other:begin -->\nkept\n<!-- other:end -->\n')
    report.write_results_section(path, '## Digits\n\ndigits v1')
    # text outside the sections is kept (it was dropped, with any section whose name has a '-', when the file had
    # no digits section yet)
    assert 'old unmarked' in path.read_text() and '<!-- other:begin -->\nkept' in path.read_text()
    fashion.write_results_section(path, '## Fashion-MNIST\n\nfashion v1')
    text = path.read_text()
    assert text.startswith('# Results') and text.index('fashion v1') < text.index('digits v1')
    report.write_results_section(path, '## Digits\n\ndigits v2')
    fashion.write_results_section(path, '## Fashion-MNIST\n\nfashion v2')
    text = path.read_text()
    assert 'v1' not in text and text.index('fashion v2') < text.index('digits v2')
    assert text.count('<!-- fashion_mnist:begin -->') == 1 and text.count('<!-- compare:begin -->') == 1


@pytest.mark.slow  # two train.py runs, each evaluated; a few minutes on a busy 2-core machine
def test_fashion_comparison_runs_reuses_and_reports(tmp_path, monkeypatch):
    from kromhc_vision.cli import compare
    from kromhc_vision.cli.compare import fashion
    files = tiny_set(train_per_class=7, test_per_class=3)
    root = data.write_fashion_mnist_root(tmp_path / 'root', write_source(tmp_path / 'src', files), checksums=None)
    monkeypatch.setattr(fashion, 'data_root', lambda args: root)
    out, results = tmp_path / 'runs', tmp_path / 'RESULTS.md'
    argv = ['--dataset', 'fashion_mnist', '--parts', 'depth', '--depth-rows', 'residual', 'kromhc', '--depths', '1',
            '--diag-images', '8', '--output', str(out), '--results', str(results)]
    compare.main(argv)
    text = results.read_text()
    record = json.loads((out / 'kromhc_d1_n4_s0' / 'run.json').read_text())
    summary = json.loads((out / 'kromhc_d1_n4_s0' / 'summary.json').read_text())
    assert record['epochs'] == summary and len(record['losses']) == 1  # 70 images, batch 64: one update
    assert len(record['diagnostics']['layers']) == 2  # one block: attention and MLP connections
    assert abs(max(layer['gain_row'] for layer in record['diagnostics']['layers']) - 1) < 1e-5
    assert record['grad_norms']['first'] > 0 and record['grad_norms']['last'] > 0
    row = next(line for line in text.splitlines() if line.startswith('| kromhc | 4 |'))
    assert f"{summary[-1]['eval_top1']:.2f}" in row
    assert '2 of ' in text and 'reused' not in text.split('###')[0]
    assert record['device'] and f"` on {record['device']}" in text.split('###')[0]  # the runs' own device
    assert '`residual_d6_n1_s1`' in text  # the grid, not run, is listed
    assert (tmp_path / 'results' / 'fashion_depth.png').read_bytes()[:4] == b'\x89PNG'
    logs = {p: p.stat().st_mtime_ns for p in out.glob('*.log')}
    compare.main(argv + ['--no-train'])  # the same section from the stored runs, none retrained
    assert {p: p.stat().st_mtime_ns for p in out.glob('*.log')} == logs
    assert '(2 reused from earlier calls)' in results.read_text() and row in results.read_text()


@pytest.mark.parametrize('bad, message', [
    (['--grid-rows', 'resnet'], r"no configs/fashion_mnist_<row>.yaml for \['resnet'\]"),
    (['--wide-rows', 'residual'], r"\['residual'\] take no num_streams"),
    (['--depths', '0'], 'depths must be >= 1'),
    (['--seeds', '0'], '--seeds must be >= 1'),
    (['--parts', 'all'], "invalid choice: 'all'"),
    (['--depth-rows', 'residual', 'terminator'], r"the models of \['terminator'\] take no depth"),
])
def test_bad_fashion_arguments_are_refused(bad, message, capsys):
    from kromhc_vision.cli.compare import fashion
    with pytest.raises(SystemExit):
        fashion.parse_args(['--dataset', 'fashion_mnist', *bad])
    assert re.search(message, capsys.readouterr().err)


def test_plan_order_and_the_shared_run():
    from kromhc_vision.cli.compare import fashion
    args = fashion.parse_args(['--dataset', 'fashion_mnist', '--seeds', '2', '--depths', '6', '12',
                               '--grid-rows', 'residual', 'kromhc', '--depth-rows', 'residual', 'kromhc',
                               '--wide-rows', 'kromhc'])
    names = [(part, fashion.spec_name(*spec)) for part, *spec in fashion.plan(args)]
    assert names == [('depth', 'residual_d6_n1_s0'), ('depth', 'kromhc_d6_n4_s0'), ('depth', 'residual_d12_n1_s0'),
                     ('depth', 'kromhc_d12_n4_s0'), ('grid', 'residual_d6_n1_s1'), ('grid', 'kromhc_d6_n4_s1'),
                     ('wide', 'kromhc_d6_n8_s0')]  # the grid's seed 0 is the depth study's depth-6 run
    assert '8! = 40320' in fashion.refusal('mhclite', 6, 8)
    assert fashion.refusal('kromhc', 6, 8) is None


def test_a_fixed_depth_row_runs_in_the_grid_as_its_config_builds_it(monkeypatch, tmp_path):
    from kromhc_vision.cli.compare import fashion
    monkeypatch.setattr(fashion, 'data_root', lambda args: tmp_path)  # no Debian package needed
    args = fashion.parse_args(['--dataset', 'fashion_mnist', '--seeds', '2', '--depths', '6',
                               '--grid-rows', 'residual', 'terminator', '--depth-rows', 'residual',
                               '--wide-rows', 'kromhc'])
    names = [(part, fashion.spec_name(*spec)) for part, *spec in fashion.plan(args)]
    assert names == [('depth', 'residual_d6_n1_s0'), ('grid', 'terminator_n1_s0'), ('grid', 'residual_d6_n1_s1'),
                     ('grid', 'terminator_n1_s1'), ('wide', 'kromhc_d6_n8_s0')]
    name, kwargs = fashion.model_settings('terminator', 6, 4)
    assert name == fashion.row_config('terminator')['model'] and 'depth' not in kwargs
    assert fashion.model_settings('residual', 12, 4)[1]['depth'] == 12
    command = fashion.train_command(args, 'terminator', 6, 1, 0, Path('out'), 'terminator_n1_s0')
    assert not any(c.startswith('depth=') for c in command)
    note = fashion.recipe_note(dict(depth=['residual'], grid=['residual', 'terminator'], wide=[]))
    assert 'terminator: slow_loss_weight 1.0, smoothing 0.09' in note and 'its own depth' in note


def test_idx_sizes_past_int64_and_empty_digits_folders_are_refused(tmp_path):
    """An IDX header whose sizes multiply past int64 (4 x 65536: NumPy's product wrapped to 0, so a 20-byte file
    passed the length check and failed in a reshape) is a DatasetIntegrityError; a digits folder of 0 images per
    class (written empty, then taken for the digits) is refused."""
    from kromhc_vision.data import DatasetIntegrityError, read_idx, write_digits_folder
    header = bytes([0, 0, 8, 4]) + (65536).to_bytes(4, 'big') * 4
    with pytest.raises(DatasetIntegrityError, match='truncated'):
        read_idx(header + bytes(4), 'x')
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match='per_class must be a positive int or None'):
            write_digits_folder(tmp_path / 'digits', per_class=bad)
    assert not (tmp_path / 'digits').exists()


def test_a_changed_digits_folder_is_refused(tmp_path):
    """A digits folder (the cache under ~/.cache) with images deleted since it was written was read as it was: a
    smaller training set, silently. Its manifest's counts are checked when it is reused."""
    from kromhc_vision.data import DatasetIntegrityError, write_digits_folder
    root = write_digits_folder(tmp_path / 'digits', per_class=2)
    assert write_digits_folder(root, per_class=2) == root  # intact: reused
    next((root / 'train' / '3').iterdir()).unlink()
    with pytest.raises(DatasetIntegrityError, match=r'train holds 19 images, its manifest 20: changed since'):
        write_digits_folder(root, per_class=2)


def test_hand_written_text_and_other_sections_survive_a_new_digits_section(tmp_path):
    from kromhc_vision.cli.compare import report
    path = tmp_path / 'RESULTS.md'
    path.write_text('# Results\n\nHow to read these tables.\n\n<!-- bench-x:begin -->\nX\n<!-- bench-x:end -->\n')
    report.write_results_section(path, '## Digits\n\ndigits v1')
    text = path.read_text()
    assert 'How to read these tables.' in text and '<!-- bench-x:begin -->\nX\n<!-- bench-x:end -->' in text
    assert text.startswith('# Results') and 'digits v1' in text


def test_grid_standard_error_counts_only_the_finite_seeds():
    """The grid's standard deviation is over the runs that did not diverge; its standard error divided by every
    run, diverged ones included (and by the smaller count for both rows): here 2.00 instead of sqrt(4/3 + 8/2) =
    2.31, which called a +4.30 difference "beyond 2 s.e.\""""
    import math
    from kromhc_vision.cli.compare import fashion

    def rec(row, seed, acc):
        return dict(row=row, depth=6, n=1 if row == 'residual' else 4, seed=seed, losses=[], diagnostics=None,
                    grad_norms=None, nonfinite=None if acc is not None else 'non-finite loss',
                    epochs=[dict(eval_top1=acc, train_img_per_sec=1.0)])
    records = [rec('residual', 0, 80.0), rec('residual', 1, 82.0), rec('residual', 2, 84.0),
               rec('kromhc', 0, 84.3), rec('kromhc', 1, None), rec('kromhc', 2, 88.3)]
    facts = {('residual', 6, 1): dict(params=1, activation_bytes=1),
             ('kromhc', 6, 4): dict(params=2, activation_bytes=1)}
    table = fashion.grid_rows(records, facts, ['residual', 'kromhc'], 6, 4)
    row = table[1]
    assert row['diff'] == pytest.approx(4.3) and row['se'] == pytest.approx(math.sqrt(4 / 3 + 8 / 2))
    assert '+4.30 (noise)' in fashion.grid_table(table, [])
