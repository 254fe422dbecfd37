"""compare.py regenerates RESULTS.md, its figures and BENCHMARKS.md from its own runs, and reuses finished runs."""
import json
import statistics

import pytest

from kromhc_vision.cli import compare


def test_configurations_keep_refused_stream_counts():
    args = compare.parse_args(['--variants', 'residual', 'mhclite', 'kromhc', '--streams', '2', '8'])
    configs = list(compare.configurations(args))
    assert [(v, n) for _, v, n, why in configs if not why] == [
        ('residual', 1), ('mhclite', 2), ('kromhc', 2), ('kromhc', 8)]
    refused = [(v, n, why) for _, v, n, why in configs if why]
    assert len(refused) == 1 and refused[0][:2] == ('mhclite', 8) and '8!' in refused[0][2]


@pytest.mark.parametrize('bad', [['--streams', '1'], ['--seeds', '0'], ['--variants', 'resnet']])
def test_bad_arguments_are_refused(bad, capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(bad)
    assert 'error' in capsys.readouterr().err


def test_settings_that_refuse_every_run_are_refused_before_the_benchmarks(capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(['--variants', 'mhclite', '--streams', '7', '8'])
    err = capsys.readouterr().err
    assert "no run to make: variant 'mhclite' cannot take num_streams=7" in err and 'num_streams=8' in err


@pytest.mark.parametrize('option', ['--diag-images', '--bench-rounds', '--bench-batch'])
def test_counts_below_one_are_refused_before_any_benchmark_or_run(option, capsys):
    with pytest.raises(SystemExit):
        compare.parse_args([option, '0'])
    assert f'{option} must be >= 1, got 0' in capsys.readouterr().err


def test_compare_writes_results_from_its_runs(tmp_path):
    out = tmp_path / 'runs'
    # mhc too: the reading of its Sinkhorn iterations broke unseen when the option moved to MHC.OPTIONS
    argv = ['--variants', 'residual', 'mhc', 'kromhc', '--streams', '2', '--seeds', '2', '--epochs', '1',
            '--bench-rounds', '1', '--bench-streams', '8', '--bench-batch', '2', '--no-kernel-benchmarks',
            '--diag-images', '32',
            '--output', str(out), '--results', str(tmp_path / 'RESULTS.md'),
            '--benchmarks', str(tmp_path / 'BENCHMARKS.md')]
    gpu_section = '<!-- gpu_suite:begin -->\nGPU figures of another generator\n<!-- gpu_suite:end -->'
    (tmp_path / 'BENCHMARKS.md').write_text(f'# Benchmarks\n\n{gpu_section}\n')
    compare.main(argv)
    results = (tmp_path / 'RESULTS.md').read_text()
    assert 'The 6 training runs took' in results and 'reused' not in results
    assert 'whose Sinkhorn-Knopp stops after 20 iterations' in results
    for figure in ('curves_micro.png', 'composite_gain_micro.png', 'params.png'):
        path = tmp_path / 'results' / figure
        assert path.read_bytes()[:4] == b'\x89PNG' and f'results/{figure}' in results

    # the table's top-1 is the mean over the seeds' last-epoch validation top-1 that train.py wrote
    for variant, n in (('residual', 1), ('kromhc', 2)):
        top1 = [json.loads((out / f'micro_{variant}_n{n}_s{s}' / 'summary.json').read_text())[-1]['eval_top1']
                for s in (0, 1)]
        row = next(line for line in results.splitlines() if line.startswith(f'| {variant} | {n} |'))
        assert f'{statistics.fmean(top1):.2f} ± {statistics.stdev(top1):.2f}' in row
    record = json.loads((out / 'micro_kromhc_n2_s0' / 'run.json').read_text())
    assert len(record['diagnostics']) == 1 and record['diagnostics'][0]['max_row_error'] < 1e-5
    assert not list((out / 'micro_kromhc_n2_s0').glob('checkpoint-*'))
    benchmarks = (tmp_path / 'BENCHMARKS.md').read_text()
    assert 'bench_trunk_cpu.py --streams 8 --rounds 1 --batch 2' in benchmarks and 'ms/step' in benchmarks
    assert 'bench_trunk_cpu.py --streams 4 --rounds 1 --batch 2 --backend torch' in benchmarks
    assert 'mhclite   refused' in benchmarks  # mHC-lite refuses n = 8; the others are timed
    assert '| kromhc | 2 |' in benchmarks
    assert gpu_section in benchmarks and benchmarks.startswith('# Benchmarks')  # another generator's section kept

    # a second call with the same settings reuses every run; other settings retrain
    logs = {p: p.stat().st_mtime_ns for p in out.glob('*.log')}
    compare.main(argv)
    assert {p: p.stat().st_mtime_ns for p in out.glob('*.log')} == logs
    assert '(6 reused from an earlier call)' in (tmp_path / 'RESULTS.md').read_text()


def test_a_stored_run_is_reused_for_its_config_content_not_its_path(tmp_path):
    """The reuse key holds the config's content (an edited config retrains: it was reused with stale settings) and
    no absolute path (a moved checkout, or another output folder, reuses its runs: all were redone)."""
    from kromhc_vision.cli.compare.runs import digits_config, run_settings, train_command
    config = tmp_path / 'a' / 'configs' / 'digits_kromhc.yaml'
    config.parent.mkdir(parents=True)
    config.write_bytes(digits_config('kromhc').read_bytes())

    def settings(config_path, out):
        command = train_command('micro', 'kromhc', 2, 0, 1, out, 'name')
        command[command.index('-c') + 1] = str(config_path)
        return run_settings(command, config_path, 32)

    here = settings(config, tmp_path / 'out')
    moved = tmp_path / 'b' / 'digits_kromhc.yaml'
    moved.parent.mkdir()
    moved.write_bytes(config.read_bytes())
    assert settings(moved, tmp_path / 'elsewhere') == here
    config.write_text(config.read_text() + '\nlr: 0.5\n')
    assert settings(config, tmp_path / 'out') != here


def test_model_facts_count_the_model_as_the_run_builds_it():
    """The digits configs train with ``hc_recompute: false``; the activation count must be of that model, not of
    the models' default (recomputation on), which keeps less."""
    import timm
    import torch
    from kromhc_vision.cli.compare.runs import config_model_kwargs, model_facts
    from kromhc_vision.memory import saved_activation_bytes

    assert config_model_kwargs("kromhc")["hc_recompute"] is False
    facts = model_facts("micro", "kromhc", 4, 4)

    def count(recompute):
        torch.manual_seed(0)
        model = timm.create_model("vit_micro_patch4_32_kromhc", num_classes=10, img_size=16, num_streams=4,
                                  hc_recompute=recompute).train()
        return saved_activation_bytes(model, torch.randn(4, 3, 16, 16))

    assert facts["activation_bytes"] == count(False) > count(True)


@pytest.mark.parametrize('bad', [['--streams', '2', '2'], ['--variants', 'residual', 'kromhc', 'kromhc'],
                                 ['--sizes', 'micro', 'micro'], ['--bench-streams', '4', '4']])
def test_a_repeated_value_is_refused(bad, capsys):
    """A repeat ran the same configuration twice (the second reused) and counted both as seeds: kromhc n=2 with
    ``--streams 2 2 --seeds 2`` was reported over 8 "seeds", its standard error halved."""
    with pytest.raises(SystemExit):
        compare.parse_args(bad)
    assert f'{bad[0]}: [' in capsys.readouterr().err


def _record(variant, n, seed, top1):
    return dict(size='micro', variant=variant, n=n, seed=seed, reused=False, wall_s=1.0,
                epochs=[dict(eval_top1=top1, train_img_per_sec=100.0, train_peak_memory_mb=1.0, train_loss=1.0)],
                diagnostics=[dict(max_row_error=0.0, max_col_error=0.0)],
                final_diagnostics=dict(layers=[dict(gain_row=1.0, gain_col=1.0)]))


def test_the_difference_standard_error_is_the_textbook_one():
    """s.e. of a difference of two independent means: sqrt(s1²/n1 + s2²/n2), each mean with its own count (it
    divided both variances by the hyper-connected row's count)."""
    import math
    from kromhc_vision.cli.compare.stats import diff_se, summarize
    assert diff_se(2.0, 3, 3.0, 2) == pytest.approx(math.sqrt(4 / 3 + 9 / 2))
    assert diff_se(2.0, 1, 3.0, 2) is None and diff_se(float('nan'), 3, 1.0, 3) is None
    records = [_record('residual', 1, s, t) for s, t in enumerate((90.0, 92.0, 94.0))]  # mean 92, s = 2
    records += [_record('kromhc', 2, s, t) for s, t in enumerate((91.0, 95.0))]  # mean 93, s = 2.83
    facts = {('micro', 'residual', 1): dict(params=10, activation_bytes=1),
             ('micro', 'kromhc', 2): dict(params=12, activation_bytes=2)}
    row = next(r for r in summarize(records, facts, 'micro') if r['variant'] == 'kromhc')
    assert row['top1_diff'] == pytest.approx(1.0)
    assert row['top1_se'] == pytest.approx(math.sqrt(statistics.variance([90, 92, 94]) / 3
                                                     + statistics.variance([91, 95]) / 2))


def test_a_stored_run_of_another_device_is_not_reused(tmp_path, monkeypatch):
    """Reused runs' throughput is reported as this device's: a run made on another machine (or with another
    thread count) trains again."""
    from kromhc_vision.cli.compare import runs
    args = compare.parse_args(['--variants', 'residual', '--seeds', '1', '--epochs', '1', '--output', str(tmp_path)])
    command = runs.train_command('micro', 'residual', 1, 0, 1, tmp_path, 'micro_residual_n1_s0')
    settings = runs.run_settings(command, runs.digits_config('residual'), args.diag_images)
    (tmp_path / 'micro_residual_n1_s0').mkdir()
    (tmp_path / 'micro_residual_n1_s0' / 'run.json').write_text(json.dumps(dict(
        _record('residual', 1, 0, 90.0), settings=settings, commit='abc', device='CPU: A, 64 cores')))
    assert runs.train_run(args, 'micro', 'residual', 1, 0, 'def', 'CPU: A, 64 cores')['reused']

    class Trained(Exception):
        pass

    def run_logged(*a):
        raise Trained
    monkeypatch.setattr(runs, 'run_logged', run_logged)
    with pytest.raises(Trained):
        runs.train_run(args, 'micro', 'residual', 1, 0, 'def', 'CPU: B, 2 cores')


def test_benchmarks_and_results_name_the_commit_and_device_of_reused_runs(tmp_path):
    """BENCHMARKS.md's throughput table named only this call's commit, and RESULTS.md said "measured in this run",
    when every run had been reused from an earlier commit."""
    from kromhc_vision.cli.compare import report
    records = [dict(_record('residual', 1, 0, 90.0), reused=True, commit='old1234', device='CPU: Old, 2 cores'),
               dict(_record('kromhc', 2, 0, 91.0), reused=True, commit='old1234', device='CPU: Old, 2 cores')]
    facts = {('micro', 'residual', 1): dict(params=10, activation_bytes=1),
             ('micro', 'kromhc', 2): dict(params=12, activation_bytes=2)}
    args = compare.parse_args(['--variants', 'residual', 'kromhc', '--streams', '2', '--seeds', '1'])
    tables = {'micro': compare.summarize(records, facts, 'micro')}
    prov = dict(command='python compare.py', commit='new5678', date='today', device='CPU: Old, 2 cores',
                torch='t', timm='t', python='p')
    path = tmp_path / 'BENCHMARKS.md'
    report.write_benchmarks(path, prov, [], tables, args, records)
    text = path.read_text()
    throughput = text[text.index('## Training throughput'):]
    assert '`old1234`' in throughput and 'CPU: Old, 2 cores' in throughput and '2 reused' in throughput
    cost = next(s for s in report.reading(tables['micro'], args, dict(train=10, validation=10), 'micro', reused=2)
                if s.startswith('**Cost.**'))
    assert 'measured in this run' not in cost


def test_provenance_quotes_the_command_and_one_epoch_throughput_says_so(tmp_path):
    """The command line is written as a shell would take it again (an argument with a space was split in two), and
    with one epoch per run the throughput text names the only epoch, warm-up included (it claimed "the epochs
    after the first")."""
    from kromhc_vision.cli.compare import report
    assert report.provenance(['--output', 'my runs'])['command'] == "python compare.py --output 'my runs'"
    records = [dict(_record('residual', 1, 0, 90.0), reused=False, commit='c', device='CPU: X, 2 cores'),
               dict(_record('kromhc', 2, 0, 91.0), reused=False, commit='c', device='CPU: X, 2 cores')]
    facts = {('micro', 'residual', 1): dict(params=10, activation_bytes=1),
             ('micro', 'kromhc', 2): dict(params=12, activation_bytes=2)}
    prov = dict(command='python compare.py', commit='c', date='today', device='CPU: X, 2 cores', torch='t',
                timm='t', python='p')
    for epochs, words in ((1, 'the only epoch (its rate includes the warm-up)'), (2, 'the epochs after the first')):
        args = compare.parse_args(['--variants', 'residual', 'kromhc', '--streams', '2', '--seeds', '1',
                                   '--epochs', str(epochs)])
        tables = {'micro': compare.summarize(records, facts, 'micro')}
        path = tmp_path / f'BENCHMARKS{epochs}.md'
        report.write_benchmarks(path, prov, [], tables, args, records)
        assert f'median images/s over {words}, mean over seeds' in path.read_text()
