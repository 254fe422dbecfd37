"""What train.py's loop keeps between epochs and in its checkpoints besides the weights, and ``steps.csv``."""
import csv
import os
import random

import numpy as np
import torch
from timm.scheduler import PlateauLRScheduler
from timm.task import ClassificationTask
from timm.utils import random_seed, trim_summary


class TrainTask(ClassificationTask):
    """timm's ClassificationTask whose checkpoint ``task_state`` also holds the loop state.

    That is: scheduler state, update count ``step``, RNG states and the data config the model was trained with.
    Each epoch also reseeds every RNG from (seed, epoch, rank), which is what makes a resumed run replay the
    uninterrupted one under DDP too (the RNG states saved are rank 0's).
    """
    scheduler = None
    step = 0
    data_config = None
    class_to_idx = None  # of the training data: eval.py checks the classes of what it evaluates against it
    slow_loss = None  # a model's parameter-only auxiliary loss (Terminator's model.slow_loss), or None
    slow_loss_weight = 0.

    def forward(self, input, target):
        """timm's classification loss, plus ``slow_loss_weight * slow_loss()`` when the model has one; then the
        result also holds ``task_loss`` (the criterion alone) and ``slow_loss`` (unweighted)."""
        result = super().forward(input, target)
        if self.slow_loss is not None and self.slow_loss_weight:
            slow = self.slow_loss()
            result.update(task_loss=result['loss'], slow_loss=slow, loss=result['loss'] + self.slow_loss_weight * slow)
        return result

    def get_task_state(self, module=None, ema=False):
        if ema:
            return {}
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return dict(
            scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
            # timm's PlateauLRScheduler saves only best and last_epoch: its torch ReduceLROnPlateau's bad-epoch and
            # cooldown counters (and the lr before its noise) are needed too, for a resume to follow the same lrs
            plateau=(dict(lr_scheduler=self.scheduler.lr_scheduler.state_dict(),
                          restore_lr=self.scheduler.restore_lr) if isinstance(self.scheduler, PlateauLRScheduler)
                     else None),
            step=self.step,
            data_config=self.data_config,
            class_to_idx=self.class_to_idx,
            rng=dict(torch=torch.get_rng_state(), numpy=(kind, keys.tolist(), pos, has_gauss, gauss),
                     python=random.getstate(),
                     cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []),
        )

    def load_task_state(self, state, strict=True, module=None, ema=False):
        if ema or not state:
            return
        if self.scheduler is not None and state.get('scheduler') is not None:
            self.scheduler.load_state_dict(state['scheduler'])
        if isinstance(self.scheduler, PlateauLRScheduler) and state.get('plateau'):  # absent in older checkpoints
            self.scheduler.lr_scheduler.load_state_dict(state['plateau']['lr_scheduler'])
            self.scheduler.restore_lr = state['plateau']['restore_lr']
        self.step = state['step']
        rng = state['rng']
        torch.set_rng_state(rng['torch'])
        kind, keys, pos, has_gauss, gauss = rng['numpy']
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
        random.setstate(rng['python'])
        if rng['cuda'] and torch.cuda.is_available():
            # as many as this process sees devices: a checkpoint from a node with more GPUs holds more states, and
            # torch.cuda.set_rng_state for a device index not here raises IndexError (each epoch reseeds them anyway)
            torch.cuda.set_rng_state_all(rng['cuda'][:torch.cuda.device_count()])


def seed_epoch(seed: int, epoch: int, rank: int, world_size: int):
    """Seed python, numpy and torch for one epoch (loader order, worker seeds, augmentation, mixup, drop path)."""
    random_seed(seed + epoch * world_size, rank)



class StepLog:
    """``steps.csv``: epoch, update step, loss and lr of every optimizer update; rows of resumed epochs dropped."""

    def __init__(self, path, start_epoch: int):
        self.path = path
        trim_summary(path, start_epoch)
        self.rows = []

    def add(self, epoch, step, loss, lr):
        self.rows.append((epoch, step, repr(loss), repr(lr)))

    def flush(self):
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        with open(self.path, 'a', newline='') as f:
            w = csv.writer(f)
            if new:
                w.writerow(('epoch', 'step', 'loss', 'lr'))
            w.writerows(self.rows)
        self.rows = []
