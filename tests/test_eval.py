"""eval.py and kromhc_vision.diagnostics: metrics of a trained checkpoint, H_res exactness per variant."""
import json
import math
import shutil

import pytest
import timm
import torch

from kromhc_vision.data import write_digits_folder
from kromhc_vision.diagnostics import _carry, connection_diagnostics, plot_composite_gain

from _scripts import load_script

train_script, eval_script = load_script('train'), load_script('eval')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A 2-epoch mHC-lite run on 30 digits at 16px: (data folder, run folder)."""
    root = tmp_path_factory.mktemp('run')
    data = write_digits_folder(root / 'digits', per_class=3)
    train_script.main([
        '--data-dir', str(data), '--model', 'vit_micro_patch4_32_mhclite', '--model-kwargs', 'depth=1',
        'img_size=16', '--img-size', '16', '--mean', '0.5', '--std', '0.25', '--num-classes', '10',
        '--batch-size', '8', '--epochs', '2', '--opt', 'adamw', '--lr', '2e-3', '--warmup-epochs', '0',
        '--workers', '0', '--model-ema', '--output', str(root), '--experiment', 'run'])
    return data, root / 'run'


def test_checkpoint_eval_reproduces_the_training_eval_with_the_stored_data_config(trained, tmp_path, capsys):
    data, run = trained
    eval_script.main(['--model', 'vit_micro_patch4_32_mhclite', '--checkpoint', str(run / 'last.pth.tar'),
                      '--data-dir', str(data), '--output', str(tmp_path), '--diagnostics', '--workers', '0'])
    results = json.loads((tmp_path / 'results.json').read_text())
    last = json.loads((run / 'summary.json').read_text())[-1]
    assert results['top1'] == last['eval_top1'] and results['top5'] == last['eval_top5']
    assert results['loss'] == pytest.approx(last['eval_loss'], rel=1e-5)
    assert results['num_images'] == 30 and results['img_per_sec'] > 0
    assert tuple(results['data_config']['input_size']) == (3, 16, 16)
    assert tuple(results['data_config']['mean']) == (0.5, 0.5, 0.5)  # from the checkpoint, not the model default
    diag = json.loads((tmp_path / 'diagnostics.json').read_text())
    assert diag['variant'] == 'mhclite' and diag['num_connections'] == 2
    assert diag['summary']['max_row_error'] < 1e-5 and diag['summary']['max_gain_deviation'] < 1e-5
    assert (tmp_path / 'h_res_mean.png').stat().st_size > 0 and (tmp_path / 'composite_gain.png').stat().st_size > 0
    assert 'diagnostics (mhclite, n=4' in capsys.readouterr().out


def test_ema_weights_and_default_data_is_the_digits_validation_split(trained, tmp_path, monkeypatch):
    data, run = trained
    monkeypatch.setenv('KROMHC_CACHE', str(tmp_path / 'cache'))
    shutil.copytree(data, tmp_path / 'cache' / 'digits')  # stands in for the cached full digits folder
    eval_script.main(['--model', 'vit_micro_patch4_32_mhclite', '--checkpoint', str(run / 'last.pth.tar'),
                      '--use-ema', '--output', str(tmp_path / 'out'), '--workers', '0'])
    results = json.loads((tmp_path / 'out' / 'results.json').read_text())
    assert results['data_dir'] == str(tmp_path / 'cache' / 'digits') and results['split'] == 'validation'
    assert results['weights'] == 'ema'
    assert results['top1'] == json.loads((run / 'summary.json').read_text())[-1]['eval_ema_top1']


def test_a_checkpoint_of_another_model_is_refused(trained, tmp_path):
    _, run = trained
    with pytest.raises(SystemExit, match="trained as 'vit_micro_patch4_32_mhclite', not 'vit_micro_patch4_32_hc'"):
        eval_script.main(['--model', 'vit_micro_patch4_32_hc', '--checkpoint', str(run / 'last.pth.tar')])


def _perturbed(name, **kwargs):
    """A model whose connections mix streams strongly (as after training), from fixed random parameters."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if any(part.startswith('hc') for part in key.split('.')[:-1]):
                if key.endswith('proj_weight'):
                    p.normal_(0, 0.05)
                elif key.endswith('bias'):
                    p.add_(2 * torch.randn_like(p))
                elif key.endswith('scale'):
                    p.fill_(1.0)
    return model


def test_diagnostics_show_mhclite_and_kromhc_exact_mhc_not_and_hc_unbounded(tmp_path):
    images = torch.randn(4, 3, 16, 16)
    runs = {v: connection_diagnostics(_perturbed(f'vit_micro_patch4_32_{v}', img_size=16, depth=3), images)
            for v in ('hc', 'mhc', 'mhclite', 'kromhc', 'residual')}
    for v in ('mhclite', 'kromhc'):
        assert runs[v]['summary']['max_row_error'] < 1e-6 and runs[v]['summary']['max_col_error'] < 1e-6
        assert runs[v]['summary']['max_gain_deviation'] < 1e-5
    mhc = runs['mhc']['summary']
    assert mhc['max_row_error'] > 1e-3 and mhc['max_col_error'] < 1e-5  # Sinkhorn ends on a column step
    assert mhc['max_gain_deviation'] > 1e-2
    assert runs['hc']['summary']['final_gain_row'] > 10
    assert runs['residual']['summary']['max_gain_deviation'] == 0
    layer = runs['kromhc']['layers'][0]
    assert len(layer['h_pre_mean']) == 4 and len(layer['h_res_mean']) == 4 and 0 <= layer['entropy'] <= layer[
        'max_entropy']
    gains = [layer['gain_row'] for layer in runs['hc']['layers']]
    assert gains[-1] > gains[0]  # compounds with depth
    plot_composite_gain(runs, tmp_path / 'gain.png')
    assert (tmp_path / 'gain.png').stat().st_size > 0


class _FixedConnection(torch.nn.Module):
    """A stand-in connection: ``coefficients(X (..., n, C))`` gives ``H_pre = 1/2``, ``H_post = 1`` and the fixed
    ``h_res (n, n)`` for every token; the forward pass hands ``X`` on."""
    variant = 'hc'

    def __init__(self, h_res):
        super().__init__()
        self.h_res = h_res

    def coefficients(self, X):
        lead, n = X.shape[:-2], self.h_res.shape[-1]
        return torch.full((*lead, n), 0.5), torch.ones(*lead, n), self.h_res.expand(*lead, n, n)

    def forward(self, X):
        return X


def test_diagnostics_values_of_known_matrices():
    """Two connections with ``A = [[1, 2], [0, 0.5]]`` then ``B = [[1, 0], [3, 1]]`` on ``X (1, 3, 2, 4)``: each
    layer's errors, entropy and means, and the composite ``B A = [[1, 2], [3, 6.5]]`` (not ``A B``): largest
    absolute row sum 9.5 (``gain_row``), column sum 8.5 (``gain_col``); after ``A`` alone 3 and 2.5."""
    A, B = torch.tensor([[1.0, 2.0], [0.0, 0.5]]), torch.tensor([[1.0, 0.0], [3.0, 1.0]])
    model = torch.nn.Sequential(_FixedConnection(A), _FixedConnection(B))
    diag = connection_diagnostics(model, torch.randn(1, 3, 2, 4))
    first, second = diag['layers']
    assert (first['row_error'], first['col_error'], second['row_error'], second['col_error']) == (2.0, 1.5, 3.0, 3.0)
    assert (first['gain_row'], first['gain_col'], second['gain_row'], second['gain_col']) == (3.0, 2.5, 9.5, 8.5)
    assert diag['summary']['final_gain_row'] == 9.5 and diag['summary']['final_gain_col'] == 8.5
    assert first['entropy'] == pytest.approx((math.log(3) - 2 / 3 * math.log(2)) / 2)  # rows (1/3, 2/3), (0, 1)
    assert first['h_res_mean'] == A.tolist() and first['h_pre_mean'] == [0.5, 0.5] and first['h_post_mean'] == [1, 1]


def test_diagnostics_summary_keeps_a_diverged_layers_nan():
    """A layer whose H_res is NaN (a diverged HC model's overflowed state) makes the summary NaN: Python's max kept
    the finite values after a finite first one, reporting the deviations of the layers before it."""
    A, bad = torch.tensor([[1.0, 2.0], [0.0, 0.5]]), torch.full((2, 2), math.nan)
    diag = connection_diagnostics(torch.nn.Sequential(_FixedConnection(A), _FixedConnection(bad)),
                                  torch.randn(1, 3, 2, 4))
    assert all(math.isnan(v) for v in diag['summary'].values())


def test_diagnostics_carry_the_composite_over_convnext_downsamples():
    diag = connection_diagnostics(_perturbed('convnext_micro_kromhc'), torch.randn(2, 3, 32, 32))
    shapes = {layer['name'].split('.blocks')[0] for layer in diag['layers']}
    assert len(shapes) == 4 and not any(layer['composite_restart'] for layer in diag['layers'])
    assert diag['summary']['max_gain_deviation'] < 1e-5


def test_diagnostics_carry_an_odd_grid_over_the_windows_the_downsample_covers():
    """A 2 x 2 stride-2 downsample maps a 5 x 5 grid to 2 x 2, each output position from its own 2 x 2 window
    (the last row and column unused): the composite is averaged over those windows, not adaptive pooling's
    overlapping 3 x 3 ones."""
    composite = torch.rand(1, 5, 5, 3, 3, dtype=torch.float64)
    carried = _carry(composite, (1, 2, 2))
    for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)):
        window = composite[0, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
        torch.testing.assert_close(carried[0, i, j], window.mean((0, 1)), rtol=0, atol=1e-15)


def test_diagnostics_need_connections():
    with pytest.raises(ValueError, match='no hyper-connections'):
        connection_diagnostics(torch.nn.Linear(3, 3), torch.randn(1, 3))
