#!/usr/bin/env python3
"""Train a timm image classifier (hyper-connected or plain); timm's train.py options, as a YAML config or flags.

    python train.py -c configs/digits_kromhc.yaml [--key value ...]   # the command line overrides the config

Without ``data_dir`` (and with the folder dataset) it trains on the embedded digits dataset
(:mod:`kromhc_vision.data`). ``batch_size`` is per process: the global batch is
batch_size x processes x grad_accum_steps, and when ``lr`` is not given it is ``lr_base`` scaled by
global batch / ``lr_base_size`` (``lr_base_scale`` linear or sqrt), as in timm.

Distributed data parallel through torchrun (NCCL on GPUs, gloo on CPU)::

    torchrun --nproc_per_node=8 train.py -c configs/imagenet/vit_small_kromhc.yaml --data-dir /data/imagenet
    # several nodes: the same command on every node, meeting at a rendezvous endpoint
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29400 --rdzv_id=JOB \\
        train.py -c configs/imagenet/vit_small_kromhc.yaml --data-dir /data/imagenet

Outputs in ``<output>/<experiment>/``: ``args.yaml``; per epoch ``summary.csv`` and ``summary.json`` (train loss,
eval loss / top-1 / top-5, lr, images/s, peak memory); per optimizer update ``steps.csv`` (loss, lr); timm's
``CheckpointSaver`` files (``last.pth.tar``, ``checkpoint-<epoch>.pth.tar``, written to a temporary file and
renamed) holding model, EMA, optimizer, scaler, epoch and, in ``task_state``, scheduler, update step, RNG states
and the data config. ``--resume <run>/last.pth.tar`` continues a stopped run (in ``<run>`` unless ``output`` or
``experiment`` is given) with the same per-update losses as an uninterrupted one: each epoch reseeds from
(seed, epoch, rank) and loader workers start afresh every epoch.
A resumed run takes its settings from the run it continues and refuses what contradicts them (model, classes, input
size, optimizer, schedule; see :mod:`kromhc_vision.cli.train_config`). A folder that holds a run is refused to a new
run unless ``--overwrite``, and locked while a run uses it (:mod:`kromhc_vision.cli.run_folder`).
A non-finite loss stops the run with exit status 1 before the update, naming the step; the last checkpoint is
then the last good one. Invalid configs stop with exit status 2 before any work.
"""
import gc
import json
import logging
import math
import os
import resource
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
from timm.data import FastCollateMixup, Mixup, create_loader, resolve_data_config
from timm.layers import convert_sync_batchnorm
from timm.models import create_model
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import evaluation_sample_limit, load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import (NativeScaler, dispatch_clip_grad, distribute_bn,
                        init_distributed_device, is_primary, random_seed, reduce_tensor, setup_default_logging,
                        trim_summary, update_summary)

from kromhc_vision.cli import ConfigError, write_json
from kromhc_vision.cli.evaluation import evaluate, progress
from kromhc_vision.cli.run_folder import CheckpointSaver, open_run_dir, resumes_in, write_run_file
from kromhc_vision.cli.train_config import (create_dataset, image_mode, is_folder_dataset, model_kwargs, parse_args,
                                            validate)
from kromhc_vision.cli.sampling import PerSampleSeeded, set_epoch_order
from kromhc_vision.cli.train_state import StepLog, TrainTask, seed_epoch
from kromhc_vision.cpu_allocator import configure_cpu_malloc
from kromhc_vision.data import digits_folder
from kromhc_vision.models import CheckpointFileError, CheckpointMismatchError, PretrainedWeightsUnavailableError
from kromhc_vision.optim import project_orthogonal_

_logger = logging.getLogger('train')


def _file_identity(path):
    """``(inode, mtime)`` of ``path``, or None: a file renamed over it since has another."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, say); the previous one is intact."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite."""


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated since the last reset, else the process's peak RSS."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mean_lr(optimizer) -> float:
    return sum(g['lr'] for g in optimizer.param_groups) / len(optimizer.param_groups)


# ------------------------------------------------------------------------------------------------------- model
def create_train_model(args, device, primary):
    """The model on ``device`` (head init, grad checkpointing, channels last, sync BN) and its data config."""
    random_seed(args.seed, args.rank)
    try:
        model = create_model(args.model, pretrained=args.pretrained, checkpoint_path=args.initial_checkpoint,
                             **model_kwargs(args))
    # unavailable or unreadable (raised before the model is built), or --pretrained weights of other keys or shapes
    except (PretrainedWeightsUnavailableError, CheckpointFileError, CheckpointMismatchError) as e:
        raise ConfigError(f'pretrained weights of {args.model}: {e}') from None
    except RuntimeError as e:  # torch's load_state_dict: other keys, shapes or another variant's connections
        if 'Error(s) in loading state_dict' not in str(e):
            raise
        source = (f'initial_checkpoint: {args.initial_checkpoint}' if args.initial_checkpoint
                  else f'pretrained weights of {args.model}')
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        more = f' (and {len(lines) - 3} more)' if len(lines) > 3 else ''
        raise ConfigError(f"{source} does not fit {args.model!r} with these model settings "
                          f"({model_kwargs(args)}): {' '.join(lines[:3])}{more}") from None
    if args.head_init_scale is not None:
        with torch.no_grad():
            model.get_classifier().weight.mul_(args.head_init_scale)
            model.get_classifier().bias.mul_(args.head_init_scale)
    if args.head_init_bias is not None:
        torch.nn.init.constant_(model.get_classifier().bias, args.head_init_bias)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    if primary:
        _logger.info(f'Model {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters')
    data_config = resolve_data_config(vars(args), model=model, verbose=primary)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        model = convert_sync_batchnorm(model)
    return model, data_config


# ------------------------------------------------------------------------------------------ optimiser and AMP
def create_optimizer(args, model, device, primary):
    """``(optimizer, autocast, loss_scaler)``; ``lr`` defaults to ``lr_base`` scaled by the global batch, as in timm."""
    if args.lr is None:
        batch_ratio = args.batch_size * args.world_size * args.grad_accum_steps / args.lr_base_size
        if not args.lr_base_scale:
            args.lr_base_scale = 'sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear'
        args.lr = args.lr_base * (batch_ratio ** 0.5 if args.lr_base_scale == 'sqrt' else batch_ratio)
        if primary:
            _logger.info(f'lr {args.lr:.3g} = lr_base {args.lr_base} x {args.lr_base_scale}(global batch / '
                         f'{args.lr_base_size})')
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp else nullcontext
    loss_scaler = NativeScaler(device=device.type) if args.amp and amp_dtype == torch.float16 else None
    return optimizer, autocast, loss_scaler


# -------------------------------------------------------------------------------------------------------- data
@dataclass
class TrainData:
    dataset_train: object
    dataset_eval: object
    loader_train: object
    loader_eval: object
    mixup_active: bool
    mixup_fn: object  # Mixup without the prefetcher; FastCollateMixup in the loader with it


def create_data(args, data_config, device) -> TrainData:
    """timm's datasets and loaders (augmentation, mixup / cutmix) for the train and eval splits."""
    prefetcher = not args.no_prefetcher
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    collate_fn = mixup_fn = None
    if mixup_active:
        mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                          prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                          label_smoothing=args.smoothing, num_classes=args.num_classes)
        if prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)

    img_mode = image_mode(args.input_img_mode, data_config['input_size'][0])
    dataset_kwargs = dict(root=args.data_dir, class_map=args.class_map, download=args.dataset_download,
                          seed=args.seed, input_img_mode=img_mode, input_key=args.input_key,
                          target_key=args.target_key, trust_remote_code=args.dataset_trust_remote_code)
    dataset_train = create_dataset(args.dataset, split=args.train_split, is_training=True,
                                   batch_size=args.batch_size, repeats=args.epoch_repeats,
                                   num_samples=args.train_num_samples, **dataset_kwargs)
    if not isinstance(dataset_train, torch.utils.data.IterableDataset):
        dataset_train = PerSampleSeeded(dataset_train, args.seed)  # DDP augments each image as one process does
    eval_batch_size = args.validation_batch_size or args.batch_size
    dataset_eval = create_dataset(args.dataset, split=args.val_split, is_training=False, batch_size=eval_batch_size,
                                  num_samples=args.val_num_samples, **dataset_kwargs)
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config['interpolation']
    common = dict(input_size=data_config['input_size'], mean=data_config['mean'], std=data_config['std'],
                  num_workers=args.workers, distributed=args.distributed, pin_memory=args.pin_mem, device=device,
                  use_prefetcher=prefetcher, worker_seeding=args.worker_seeding)
    loader_train = create_loader(
        dataset_train, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug, re_prob=args.reprob,
        re_mode=args.remode, re_count=args.recount, re_split=args.resplit, train_crop_mode=args.train_crop_mode,
        scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa, num_aug_repeats=int(args.aug_repeats),
        interpolation=train_interpolation, collate_fn=collate_fn,
        persistent_workers=False,  # fresh workers each epoch, seeded from the epoch's seed: reproducible resume
        **common)
    loader_eval = create_loader(dataset_eval, batch_size=eval_batch_size, is_training=False,
                                interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'],
                                crop_mode=data_config['crop_mode'], **common)
    return TrainData(dataset_train, dataset_eval, loader_train, loader_eval, mixup_active, mixup_fn)


def check_train_batches(args, data: TrainData):
    """Refuse a batch larger than the (per-process) training set: timm's train loader drops the last incomplete
    batch, so every epoch would make no update. Known once the dataset is built (before any checkpoint)."""
    if len(data.loader_train) > 0:
        return
    images = len(data.dataset_train)
    per_process = math.ceil(images / args.world_size)  # DistributedSampler pads to a multiple of world_size
    step = (f'{args.batch_size} per process x {args.world_size} processes = {args.batch_size * args.world_size} '
            f'images per step' if args.world_size > 1 else f'{args.batch_size}')
    raise ConfigError(f'batch_size: {step} is more than the {images} training images ({args.train_split!r} split'
                      + (f', {per_process} per process' if args.world_size > 1 else '')
                      + "); timm's train loader drops the last incomplete batch, so no epoch would make an update. "
                      f'Use --batch-size {per_process} or less')


def start_epoch_data(args, data: TrainData, epoch):
    """Reseed every RNG for ``epoch`` (what makes a resumed run replay), set the epoch's image order and
    augmentation seeds (the same for DDP as for one process: :mod:`kromhc_vision.cli.sampling`), switch mixup off."""
    seed_epoch(args.seed, epoch, args.rank, args.world_size)
    if isinstance(data.dataset_train, torch.utils.data.IterableDataset):
        if hasattr(data.dataset_train, 'set_epoch'):
            data.dataset_train.set_epoch(epoch)
    else:
        set_epoch_order(data.loader_train, args.seed, epoch)
    if data.mixup_active and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if data.mixup_fn is None:
            data.loader_train.mixup_enabled = False
        else:
            data.mixup_fn.mixup_enabled = False


# ------------------------------------------------------------------------------------------ task and schedule
def create_task(args, model, data_config, mixup_active, device, primary) -> TrainTask:
    """timm's classification task (loss, EMA) around ``model``; its checkpoint state is the loop's."""
    criterion_kwargs = dict(smoothing=args.smoothing, soft_targets=mixup_active)
    if args.bce_loss:
        criterion_kwargs.update(loss_type='bce', bce_target_thresh=args.bce_target_thresh, bce_sum=args.bce_sum,
                                pos_weight=args.bce_pos_weight)
    task = TrainTask(model, criterion_kwargs=criterion_kwargs, device=device, verbose=primary)
    task.data_config = data_config
    if callable(getattr(model, 'slow_loss', None)):  # Terminator's local feedback loss, parameters only
        task.slow_loss, task.slow_loss_weight = model.slow_loss, args.slow_loss_weight
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device='cpu' if args.model_ema_force_cpu else None)
    return task


def evaluates_ema(args, task, device) -> bool:
    """Whether each epoch also evaluates the EMA weights: where there are some, unless ``--model-ema-force-cpu`` keeps
    them on the CPU while the model trains on another device (the eval batches arrive on that device: the EMA model
    would get CUDA inputs; timm's train.py skips this evaluation too)."""
    return task.has_ema() and not (args.model_ema_force_cpu and device.type != 'cpu')


def create_schedule(args, optimizer, task, batches_per_epoch):
    """timm's scheduler, kept in ``task`` for the checkpoints; ``(scheduler, num_epochs, updates_per_epoch)``."""
    updates_per_epoch = (batches_per_epoch + args.grad_accum_steps - 1) // args.grad_accum_steps
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
        updates_per_epoch=updates_per_epoch)
    task.scheduler = scheduler
    return scheduler, num_epochs, updates_per_epoch


# ------------------------------------------------------------------------------------------------------ resume
def resume(args, task, optimizer, loss_scaler, scheduler, updates_per_epoch, primary) -> int:
    """Load ``args.resume`` into the task, optimizer, scaler and scheduler; returns the epoch to start from."""
    start_epoch = 0
    if args.resume:
        start_epoch = resume_task_checkpoint(
            task, args.resume, optimizer=None if args.no_resume_opt else optimizer,
            loss_scaler=None if args.no_resume_opt else loss_scaler, log_info=primary)
        if task.has_ema():
            load_task_ema_checkpoint(task, args.resume)
    if args.start_epoch is not None:
        start_epoch = args.start_epoch
    if scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            scheduler.step(start_epoch)
    return start_epoch


# ----------------------------------------------------------------------------------------------------- outputs
class RunOutputs:
    """The run folder (primary process only): args.yaml, summaries, steps.csv and timm's CheckpointSaver."""

    def __init__(self, folder, args, args_text, model, task, optimizer, loss_scaler, start_epoch):
        self.dir = folder
        self.saver = CheckpointSaver(model=model, optimizer=optimizer, args=args, amp_scaler=loss_scaler,
                                     checkpoint_dir=self.dir, recovery_dir=self.dir,
                                     decreasing=args.eval_metric == 'loss', max_history=args.checkpoint_hist,
                                     task=task)
        if resumes_in(args, self.dir):
            self.saver.load_state_dict_from_checkpoint(args.resume)
        write_run_file(self.dir, 'args.yaml', args_text)  # atomic: a resume rewrites the run's own
        trim_summary(self.path('summary.csv'), start_epoch)
        self.step_log = StepLog(self.path('steps.csv'), start_epoch)
        self.rows = []
        if start_epoch > 0 and os.path.exists(self.path('summary.json')):
            self.rows = [r for r in json.load(open(self.path('summary.json'))) if r['epoch'] < start_epoch]

    def path(self, name):
        return os.path.join(self.dir, name)

    def end_epoch(self, epoch, lr, elapsed, train_metrics, eval_metrics, ema_metrics, metric):
        """Summaries first: a kill before the checkpoint resumes this epoch and rewrites its rows."""
        evals = dict(eval_metrics, **{f'ema_{k}': v for k, v in (ema_metrics or {}).items()})
        update_summary(epoch, train_metrics, evals, self.path('summary.csv'), lr=lr)
        self.rows.append(dict(epoch=epoch, lr=lr, epoch_time_s=elapsed,
                              **{f'train_{k}': v for k, v in train_metrics.items()},
                              **{f'eval_{k}': v for k, v in evals.items()}))
        write_json(self.path('summary.json'), self.rows)
        last = self.path('last' + self.saver.extension)
        before = _file_identity(last)
        try:  # timm's saver writes a temporary file and renames it over last.pth.tar: a failed write leaves it
            self.saver.save_checkpoint(epoch, metric=metric)
        except OSError as e:
            tmp = self.path('tmp' + self.saver.extension)
            if os.path.exists(tmp):
                os.unlink(tmp)  # the partial write, which would only fill the disk further
            if _file_identity(last) not in (None, before):  # renamed into place; copying it (checkpoint-N) failed
                raise CheckpointWriteError(
                    f'wrote the checkpoint of epoch {epoch} to {last}, but not its copy in {self.dir} ({e}); {last} '
                    f'holds epoch {epoch} (intact). Free space, then continue with --resume {last}') from None
            raise CheckpointWriteError(
                f'could not write the checkpoint of epoch {epoch} in {self.dir} ({e}); last good checkpoint: '
                f'{self.last_good_checkpoint()} (intact). Free space, then continue with --resume {last}') from None

    def last_good_checkpoint(self):
        last = self.path('last.pth.tar')
        return last if os.path.exists(last) else 'none (no epoch finished)'


# ------------------------------------------------------------------------------------------------ the training
def train_one_epoch(epoch, task, loader, optimizer, args, device, autocast, loss_scaler, scheduler, mixup_fn,
                    step_log, primary):
    """One pass over ``loader``; returns the mean update loss, images/s and peak memory."""
    task.train()
    accum, num_batches = args.grad_accum_steps, len(loader)
    full_updates = num_batches // accum
    losses, update_loss, samples, slow_losses = [], 0., 0, []
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    optimizer.zero_grad()
    bar = progress(loader, num_batches, f'Train {epoch}', primary)
    for i, (input, target) in enumerate(bar):
        in_update = accum if i // accum < full_updates else num_batches - full_updates * accum
        last = (i + 1) % accum == 0 or i + 1 == num_batches
        input, target = input.to(device), target.to(device)  # no-op with the prefetcher
        if mixup_fn is not None:
            input, target = mixup_fn(input, target)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with nullcontext() if last else task.no_sync():
            with autocast():
                result = task(input, target)
            loss = result['loss']
            if 'slow_loss' in result:  # identical on every rank (parameters only)
                slow_losses.append(result['slow_loss'].item())
            value = (reduce_tensor(loss.detach(), args.world_size) if args.distributed else loss.detach()).item()
            if not math.isfinite(value):
                raise NonFiniteLoss(f'non-finite loss ({value}) at epoch {epoch}, batch {i}, update step '
                                    f'{task.step + 1}: stopping before that update')
            loss = loss / in_update
            if loss_scaler is not None:
                loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            parameters=task.get_clip_parameters(exclude_head='agc' in args.clip_mode),
                            need_update=last)
            else:
                loss.backward()
                if last:
                    if args.clip_grad is not None:
                        dispatch_clip_grad(task.get_clip_parameters(exclude_head='agc' in args.clip_mode),
                                           args.clip_grad, mode=args.clip_mode)
                    optimizer.step()
        update_loss += value / in_update
        samples += input.shape[0] * args.world_size
        if not last:
            continue
        optimizer.zero_grad()
        task.step += 1
        task.update_ema(step=task.step)
        lr = mean_lr(optimizer)
        losses.append(update_loss)
        if primary:
            step_log.add(epoch, task.step, update_loss, lr)
            if hasattr(bar, 'set_postfix'):
                bar.set_postfix(loss=f'{update_loss:.4f}', lr=f'{lr:.3g}')
            elif len(losses) % args.log_interval == 0 or i + 1 == num_batches:
                _logger.info(f'Train {epoch} [{i + 1:>4d}/{num_batches}] loss {update_loss:.4f} lr {lr:.3g} '
                             f'{samples / (time.perf_counter() - start):.0f} img/s')
        update_loss = 0.
        if scheduler is not None and args.sched_on_updates:
            scheduler.step_update(num_updates=task.step)
    elapsed = time.perf_counter() - start
    slow = dict(slow_loss=sum(slow_losses) / len(slow_losses)) if slow_losses else {}  # unweighted, per batch
    return dict(loss=sum(losses) / max(len(losses), 1), **slow, img_per_sec=samples / elapsed,
                peak_memory_mb=peak_memory_mb(device))


def train(args, args_text, run_dir):
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = init_distributed_device(args)
    configure_cpu_malloc(args.cpu_malloc, device)
    primary = is_primary(args)
    if args.distributed:
        _logger.info(f'Process {args.rank} of {args.world_size} on {device}')
    if args.data_dir is None and is_folder_dataset(args):
        args.data_dir = str(digits_folder())

    model, data_config = create_train_model(args, device, primary)
    optimizer, autocast, loss_scaler = create_optimizer(args, model, device, primary)
    data = create_data(args, data_config, device)
    check_train_batches(args, data)
    task = create_task(args, model, data_config, data.mixup_active, device, primary)
    task.class_to_idx = getattr(getattr(data.dataset_train, 'reader', None), 'class_to_idx', None)
    scheduler, num_epochs, updates_per_epoch = create_schedule(args, optimizer, task, len(data.loader_train))
    start_epoch = resume(args, task, optimizer, loss_scaler, scheduler, updates_per_epoch, primary)
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    if args.distributed:
        task.prepare_distributed(device_ids=[device.index] if device.type == 'cuda' else None)
    out = None
    if primary:
        out = RunOutputs(run_dir, args, args_text, model, task, optimizer, loss_scaler, start_epoch)
        _logger.info(f'Output: {out.dir}; {num_epochs - start_epoch} epochs of {updates_per_epoch} updates, '
                     f'{len(data.dataset_train)} train / {len(data.dataset_eval)} eval images')
        if start_epoch >= num_epochs and out.saver.made_copies:  # validate lets a finished run resume for this
            print(f'the run in {out.dir} had finished; made the copies of its last checkpoint that a kill left '
                  f"unmade: {', '.join(os.path.basename(p) for p in out.saver.made_copies)}", flush=True)

    def run_eval(ema):
        evaluator = task.create_evaluator(max_samples=evaluation_sample_limit(data.loader_eval))
        return evaluate(task.get_eval_model(ema=ema), data.loader_eval, device, autocast, evaluator,
                        distributed=args.distributed, desc='EMA eval' if ema else 'Eval', log=primary,
                        channels_last=args.channels_last)

    eval_metrics = None
    for epoch in range(start_epoch, num_epochs):
        start_epoch_data(args, data, epoch)
        start, lr = time.perf_counter(), mean_lr(optimizer)
        try:
            train_metrics = train_one_epoch(epoch, task, data.loader_train, optimizer, args, device, autocast,
                                            loss_scaler, scheduler, data.mixup_fn, out and out.step_log, primary)
        except NonFiniteLoss as e:
            good = out.last_good_checkpoint() if primary else 'none (no epoch finished)'
            raise NonFiniteLoss(f'{e}; last good checkpoint: {good}') from None
        finally:
            if primary:
                out.step_log.flush()
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            distribute_bn(model, args.world_size, args.dist_bn == 'reduce')
        eval_metrics = run_eval(ema=False)
        if task.has_ema():  # an average of orthogonal (projUNN) weights is not orthogonal: project it before use
            project_orthogonal_(task.get_trainable_module(ema=True).module)
        ema_metrics = run_eval(ema=True) if evaluates_ema(args, task, device) else None
        metric = (ema_metrics or eval_metrics)[args.eval_metric]
        if scheduler is not None:
            scheduler.step(epoch + 1, metric)
        if primary:
            out.end_epoch(epoch, lr, time.perf_counter() - start, train_metrics, eval_metrics, ema_metrics, metric)
            ema_text = f", EMA top-1 {ema_metrics['top1']:.2f}%" if ema_metrics else ''
            slow_text = f" (slow loss {train_metrics['slow_loss']:.4g})" if 'slow_loss' in train_metrics else ''
            _logger.info(f"Epoch {epoch}: train loss {train_metrics['loss']:.4f}{slow_text}, eval loss "
                         f"{eval_metrics['loss']:.4f}, top-1 {eval_metrics['top1']:.2f}%, top-5 "
                         f"{eval_metrics['top5']:.2f}%{ema_text}, lr {lr:.3g}, "
                         f"{train_metrics['img_per_sec']:.0f} img/s, peak memory "
                         f"{train_metrics['peak_memory_mb']:.0f} MiB, {time.perf_counter() - start:.1f} s")
    if primary and eval_metrics is not None:
        print(f"final validation top-1 {eval_metrics['top1']:.2f}% (top-5 {eval_metrics['top5']:.2f}%, "
              f"loss {eval_metrics['loss']:.4f}); outputs in {out.dir}", flush=True)


def end_distributed():
    """Destroy the process group for good. The DistributedDataParallel model holds it (``destroy_process_group``
    alone leaves it alive then): collected first (it sits in reference cycles), the group goes with
    ``destroy_process_group``, which joins gloo's worker threads. Left running into the interpreter's shutdown,
    one of them releasing a finished collective's tensors takes the GIL and aborts the process (exit -6 after a
    good run)."""
    gc.collect()
    torch.distributed.destroy_process_group()


def drop_frame_locals(error: BaseException):
    """Clear the local variables of the finished frames in ``error``'s traceback and in those of the errors it was
    raised from or during: they keep ``train()``'s DistributedDataParallel model, and so the process group, for as
    long as the error propagates (to the interpreter's shutdown for one nothing catches). The traceback still
    prints (files, lines, source), without the values a post-mortem debugger would show."""
    pending, seen = [error], set()
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)  # skips the frames still running (this one's caller)
        pending += [error.__cause__, error.__context__]


def main(argv=None):
    if not logging.root.handlers:  # not yet configured (e.g. by a test runner)
        setup_default_logging()
    logging.getLogger('timm.utils.checkpoint_saver').setLevel(logging.WARNING)  # lists every file each epoch
    try:
        args, args_text = parse_args(argv)
        run_dir = validate(args)
    except ConfigError as e:
        sys.stderr.write(f'train.py: error: {e}\n')
        sys.exit(2)
    lock, exit_with = None, None
    try:
        if int(os.environ.get('RANK', 0)) == 0:  # the process that writes the run folder (rank 0 under torchrun)
            lock = open_run_dir(args, run_dir)  # and checks it again, under the lock
        train(args, args_text, run_dir)
    except ConfigError as e:
        sys.stderr.write(f'train.py: error: {e}\n')
        exit_with = 2
        if lock is not None:
            lock.release_unused()
            lock = None
    except (NonFiniteLoss, CheckpointWriteError) as e:
        exit_with = f'train.py: error: {e}'  # printed, exit status 1
    except BaseException as e:  # a bug or Ctrl-C: it propagates as it came, without its frames' locals
        if torch.distributed.is_initialized():
            drop_frame_locals(e)
        raise
    finally:  # train()'s frame, whose model holds the group, is gone: a handled error's traceback, any other's locals
        if lock is not None:
            lock.release()
        if torch.distributed.is_initialized():
            end_distributed()
    if exit_with is not None:
        raise SystemExit(exit_with)


if __name__ == '__main__':
    main()
