"""Which images a training step sees and how each is augmented: the same for one process and for DDP.

Two rules make ``W`` processes with batch ``b / W`` each see the images of one process with batch ``b``, augmented
alike:

* **Order.** Every epoch draws one permutation ``perm = randperm(N, generator seeded with seed + epoch)`` of the
  ``N`` training images. One process takes global batch ``k`` as ``perm[k b : (k + 1) b]``; under DDP, timm's
  ``DistributedSampler`` gives rank ``r`` the images ``perm[r::W]``, so its batch ``k`` holds
  ``perm[k b + r], perm[k b + r + W], ...`` and the ranks' batches together are the same ``b`` images.
* **Augmentation.** Image ``i`` of epoch ``e`` is transformed with python's, numpy's and torch's generators seeded
  from ``(seed, e, i)`` only (:class:`PerSampleSeeded`), so its crop, flip and colour jitter do not depend on the
  process, the loader worker or its position in the batch. The global generators are restored afterwards: what the
  model draws (drop path) does not depend on the data loading.

What stays different by construction: mixup and cutmix (drawn per local batch), random erasing with the
prefetcher, timm's default (drawn per batch on the device; with ``--no-prefetcher`` it is a per-image transform
and equal), drop path and dropout
(the model's generator is per process), BatchNorm's batch statistics (per local batch; the project's ConvNeXt
uses LayerNorm), ``--aug-repeats`` (timm's RepeatAugSampler), and a training set whose size is not a multiple
of ``W`` (``DistributedSampler`` pads it by repeating images).
"""
import random

import numpy as np
import torch

__all__ = ['PerSampleSeeded', 'set_epoch_order']


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends on ``(seed, epoch, index)`` only (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class PerSampleSeeded(torch.utils.data.Dataset):
    """``dataset[i]`` loaded and transformed with every generator seeded from ``(seed, epoch, i)``.

    A map-style dataset wrapper; ``transform`` (set by timm's ``create_loader``) and every other attribute are
    the wrapped dataset's. :meth:`set_epoch` chooses the epoch.
    """

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.dataset)

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value):
        self.dataset.transform = value

    def __getattr__(self, name):  # reader, class_to_idx, ... of the wrapped dataset
        if name == 'dataset':  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index):
        seed = sample_seed(self.seed, self.epoch, index)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)
            torch.manual_seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)


def set_epoch_order(loader, seed: int, epoch: int):
    """Make ``loader``'s training order for ``epoch`` the permutation seeded by ``seed + epoch`` (module docstring).

    ``loader`` is timm's train loader: a ``RandomSampler`` in one process (its generator is replaced), timm's
    ``DistributedSampler`` under DDP (its seed and epoch are set).
    """
    sampler = loader.sampler
    if isinstance(sampler, torch.utils.data.distributed.DistributedSampler):
        sampler.seed = int(seed)
        sampler.set_epoch(epoch)
    elif isinstance(sampler, torch.utils.data.RandomSampler):
        sampler.generator = torch.Generator().manual_seed(int(seed) + int(epoch))
    dataset = getattr(loader, 'dataset', None)
    if isinstance(dataset, PerSampleSeeded):
        dataset.set_epoch(epoch)
