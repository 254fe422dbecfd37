"""Statistics over compare.py's runs: accuracy over seeds and costs relative to residual, per configuration."""
import math
import statistics


def mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float('nan'))


def diff_se(std_a, n_a, std_b, n_b):
    """Standard error of the difference of two means of independent samples, sqrt(s_a²/n_a + s_b²/n_b) (each
    sample's own size); None where a standard deviation is missing (fewer than two values)."""
    if any(s is None or math.isnan(s) for s in (std_a, std_b)) or min(n_a, n_b) < 2:
        return None
    return math.sqrt(std_a ** 2 / n_a + std_b ** 2 / n_b)


def throughput(record) -> float:
    """Median training images/s over the epochs after the first (the first includes warm-up), or the only one's
    (:func:`throughput_epochs` says which in the reports)."""
    rates = [r['train_img_per_sec'] for r in record['epochs']]
    return statistics.median(rates[1:] or rates)


def throughput_epochs(epochs: int) -> str:
    """Which epochs :func:`throughput` takes from runs of ``epochs`` epochs, as the reports say it."""
    return 'the epochs after the first' if epochs > 1 else 'the only epoch (its rate includes the warm-up)'


def summarize(records, facts, size) -> list:
    """One row per configuration of ``size``: accuracy over seeds, costs relative to residual, diagnostics."""
    groups = {}
    for r in records:
        if r['size'] == size:
            groups.setdefault((r['variant'], r['n']), []).append(r)
    rows = []
    for (variant, n), runs in groups.items():
        top1 = [r['epochs'][-1]['eval_top1'] for r in runs]
        row = dict(variant=variant, n=n, seeds=len(runs), top1=mean_std(top1), top1_all=top1,
                   img_per_sec=statistics.fmean(throughput(r) for r in runs),
                   peak_mb=statistics.fmean(max(e['train_peak_memory_mb'] for e in r['epochs']) for r in runs),
                   params=facts[(size, variant, n)]['params'],
                   activation_bytes=facts[(size, variant, n)]['activation_bytes'],
                   curves=dict(train_loss=[statistics.fmean(r['epochs'][e]['train_loss'] for r in runs)
                                           for e in range(len(runs[0]['epochs']))],
                               top1=[statistics.fmean(r['epochs'][e]['eval_top1'] for r in runs)
                                     for e in range(len(runs[0]['epochs']))]))
        if variant != 'residual':
            row['max_ds_error'] = max(max(d['max_row_error'], d['max_col_error'])
                                      for r in runs for d in r['diagnostics'])
            row['final_gain'] = max(max(layer['gain_row'], layer['gain_col']) for r in runs
                                    for layer in r['final_diagnostics']['layers'])
        rows.append(row)
    ref = next((r for r in rows if r['variant'] == 'residual'), None)
    if ref is None:
        return rows
    for row in rows:
        row['speed_ratio'] = row['img_per_sec'] / ref['img_per_sec']
        row['peak_ratio'] = row['peak_mb'] / ref['peak_mb']
        row['activation_ratio'] = row['activation_bytes'] / ref['activation_bytes']
        row['extra_params'] = row['params'] - ref['params']
        diff = row['top1'][0] - ref['top1'][0]
        se = diff_se(row['top1'][1], row['seeds'], ref['top1'][1], ref['seeds'])
        row['top1_diff'], row['top1_se'] = diff, se
    return rows

