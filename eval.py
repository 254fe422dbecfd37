#!/usr/bin/env python3
"""Evaluate a timm classifier: loss, top-1, top-5, images/s; with ``--diagnostics`` what its stream mixing does.

    python eval.py --model vit_micro_patch4_32_kromhc --checkpoint output/train/RUN/last.pth.tar --diagnostics
    python eval.py --model vit_small_patch16_224_kromhc.upcycled_augreg_in21k_ft_in1k --pretrained \\
        --data-dir /data/imagenet

A training checkpoint of train.py supplies the model settings (num_classes, model_kwargs) and the data config it
was trained with (image size, interpolation, crop, mean / std). Without ``--data-dir``: the validation split of
the embedded digits dataset. Writes ``results.json`` to ``--output``; ``--diagnostics`` adds
``diagnostics.json``, ``h_res_mean.png`` and ``composite_gain.png`` for one batch of real images
(see :mod:`kromhc_vision.diagnostics`).
"""
import argparse
import logging
import os
import sys
from contextlib import nullcontext
from functools import partial

import torch
from timm.models import safe_model_name
from timm.task import ClassificationEvaluator
from timm.utils import setup_default_logging

from kromhc_vision.cpu_allocator import CPU_MALLOC_CHOICES, configure_cpu_malloc
from kromhc_vision.data import DatasetIntegrityError, DatasetUnavailableError, digits_folder, torch_dataset_root
from kromhc_vision.diagnostics import connection_diagnostics, plot_composite_gain, plot_h_res
from kromhc_vision.cli import ConfigError, check_device, write_json
from kromhc_vision.cli.train_config import check_torch_root
from kromhc_vision.cli.evaluation import (check_checkpoint, check_model_name, checkpoint_classes, eval_loader,
                                         evaluate, load_trained_model, split_folder)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], allow_abbrev=False)
    p.add_argument('--model', required=True, help='timm model name (a pretrained tag may follow a dot)')
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument('--checkpoint', help='train.py checkpoint (or a plain state dict)')
    weights.add_argument('--pretrained', action='store_true', help="the model's pretrained weights (timm / Hub)")
    p.add_argument('--use-ema', action='store_true', help="the checkpoint's EMA weights")
    p.add_argument('--data-dir', default=None, help='ImageNet-style folder (default: the embedded digits)')
    p.add_argument('--dataset', default='', help="timm dataset spec, e.g. hfds/NAME (default: folder)")
    p.add_argument('--dataset-download', action='store_true',
                   help='torch/<name> datasets: let torchvision download them (into --data-dir, else '
                        '~/.cache/kromhc_vision/<name>_download)')
    p.add_argument('--split', default='validation',
                   help='a subfolder of --data-dir for folder data, else the dataset\'s split name')
    p.add_argument('--num-classes', type=int, default=None, help='for checkpoints without train.py args')
    p.add_argument('--output', default=None, help='results folder (default ./output/eval/<model>)')
    p.add_argument('-b', '--batch-size', type=int, default=128)
    p.add_argument('-j', '--workers', type=int, default=2)
    p.add_argument('--device', default=None, help="default: 'cuda' when available, else 'cpu'")
    p.add_argument('--amp-dtype', default=None, choices=('float16', 'bfloat16'), help='autocast in this dtype')
    p.add_argument('--cpu-malloc', default='retain', choices=CPU_MALLOC_CHOICES,
                   help="on CPU: 'retain' keeps freed memory in glibc's heap (kromhc_vision.cpu_allocator)")
    p.add_argument('--diagnostics', action='store_true', help='hyper-connection diagnostics on one batch')
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        p.error(f'--batch-size must be >= 1 and --workers >= 0 (got {args.batch_size}, {args.workers})')
    if args.use_ema and args.pretrained:
        p.error("--use-ema selects a --checkpoint's EMA weights; --pretrained weights have none (leave it out)")
    return args


def main(argv=None):
    if not logging.root.handlers:
        setup_default_logging()
    args = parse_args(argv)
    try:  # what can be checked before the model and data are built: the device, the data, the checkpoint, the split
        check_model_name(args.model)
        device = check_device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
        configure_cpu_malloc(args.cpu_malloc, device)
        data_dir = torch_dataset_root(args.dataset, args.data_dir, download=args.dataset_download)
        check_torch_root(args.dataset, data_dir)  # else torchvision would be given the digits folder
        data_dir = data_dir or (str(digits_folder()) if '/' not in args.dataset else None)
        meta = check_checkpoint(args.model, args.checkpoint, args.use_ema) if args.checkpoint else {}
        split_dir = split_folder(data_dir, args.split) if '/' not in args.dataset else None
        model, data_config = load_trained_model(args.model, args.checkpoint, args.use_ema, args.num_classes)
        if args.diagnostics and not any(hasattr(m, 'coefficients') for m in model.modules()):
            raise ConfigError(f'--diagnostics: {args.model} has no hyper-connections (no module with `coefficients`) '
                              'to diagnose; leave --diagnostics out to evaluate it')
        loader = eval_loader(data_config, data_dir, args.dataset, args.split, args.batch_size, args.workers, device,
                             class_to_idx=checkpoint_classes(meta), download=args.dataset_download)
    except (ConfigError, DatasetUnavailableError, DatasetIntegrityError) as e:
        raise SystemExit(f'eval.py: error: {e}') from None
    model.to(device).eval()
    dataset = loader.dataset
    autocast = partial(torch.autocast, device_type=device.type,
                       dtype=getattr(torch, args.amp_dtype)) if args.amp_dtype else nullcontext
    metrics = evaluate(model, loader, device, autocast, ClassificationEvaluator(device))
    output = args.output or os.path.join('output', 'eval', safe_model_name(args.model))
    os.makedirs(output, exist_ok=True)
    results = dict(model=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                   weights='ema' if args.use_ema else 'model', data_dir=data_dir, dataset=args.dataset,
                   split=args.split, split_dir=split_dir, num_images=len(dataset), data_config=dict(data_config),
                   param_count=sum(p.numel() for p in model.parameters()), device=str(device), **metrics)
    write_json(os.path.join(output, 'results.json'), results)
    print(f"{args.model}: top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}%, loss {metrics['loss']:.4f}, "
          f"{metrics['img_per_sec']:.0f} img/s on {len(dataset)} images ({args.split} of {data_dir})")
    if args.diagnostics:
        images, _ = next(iter(loader))
        diag = connection_diagnostics(model, images)
        write_json(os.path.join(output, 'diagnostics.json'), diag)
        plot_h_res(diag, os.path.join(output, 'h_res_mean.png'))
        plot_composite_gain({args.model: diag}, os.path.join(output, 'composite_gain.png'))
        s = diag['summary']
        print(f"diagnostics ({diag['variant']}, n={diag['num_streams']}, {diag['num_connections']} connections, "
              f"{diag['num_images']} images): max |row sum - 1| {s['max_row_error']:.2e}, max |col sum - 1| "
              f"{s['max_col_error']:.2e}; composite gain after the last layer - 1: rows {s['final_gain_row'] - 1:.2e}, "
              f"columns {s['final_gain_col'] - 1:.2e}")
    print(f'results in {output}')


if __name__ == '__main__':
    sys.exit(main())
