"""compare.py's figures: training curves and the parameter count of one connection against n."""
import kromhc_vision as kv
from kromhc_vision.extras import pyplot


def plot_curves(rows, n, path, title):
    plt = pyplot()

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        if row['n'] not in (1, n):
            continue
        label = row['variant'] if row['variant'] == 'residual' else f"{row['variant']} n={n}"
        epochs = range(1, len(row['curves']['top1']) + 1)
        ax_loss.plot(epochs, row['curves']['train_loss'], 'o-', ms=3, label=label)
        ax_acc.plot(epochs, row['curves']['top1'], 'o-', ms=3, label=label)
    ax_loss.set(title='training loss (mean over seeds)', xlabel='epoch')
    ax_acc.set(title='validation top-1 % (mean over seeds)', xlabel='epoch')
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_params(path, dim=768, streams=(2, 3, 4, 6, 8, 12, 16)):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for variant in kv.CONNECTIONS:
        if variant == 'residual':
            continue
        points = []
        for n in streams:
            try:
                points.append((n, kv.connection_num_params(variant, n, dim)))
            except ValueError:
                pass
        ax.plot(*zip(*points), '^--' if variant == 'mhc' else 'o-', ms=4, label=variant)
    ax.set_yscale('log')
    ax.set(title=f'parameters of one connection, C = {dim} (HC = mHC)\nmHC-lite refuses n > 6 (n! logits)',
           xlabel='streams n (with prime factors <= 3 here)', ylabel='parameters')
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

