"""kromhc_vision.cli.sampling: one process and W DDP ranks see the same images per step, augmented alike."""
import random

import numpy as np
import pytest
import torch

from kromhc_vision.cli.sampling import PerSampleSeeded, set_epoch_order


class Draws(torch.utils.data.Dataset):
    """Image i 'augmented' by one draw from each of python's, numpy's and torch's generators."""
    transform = None

    def __len__(self):
        return 12

    def __getitem__(self, index):
        return index, random.random(), float(np.random.rand()), float(torch.rand(()))


def test_an_image_is_augmented_by_its_seed_epoch_and_index_only_and_the_global_generators_are_untouched():
    data = PerSampleSeeded(Draws(), seed=5)
    first = [data[i] for i in range(12)]
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    assert [data[i] for i in reversed(range(12))] == first[::-1]  # another order, another global state
    assert random.getstate() == state[0] and (np.random.get_state()[1] == state[1]).all()
    assert torch.equal(torch.get_rng_state(), state[2])
    for g in (1, 2, 3):  # each of python's, numpy's and torch's generators (torchvision's crops draw from torch's)
        assert len({d[g] for d in first}) == 12, g  # images differ
    data.set_epoch(1)
    assert all(a[g] != b[g] for a, b in zip(first, (data[i] for i in range(12))) for g in (1, 2, 3))  # epochs differ
    assert all(PerSampleSeeded(Draws(), seed=6)[0][g] != first[0][g] for g in (1, 2, 3))  # seeds differ


@pytest.mark.parametrize('world_size', [2, 3])
def test_the_ranks_batches_together_are_the_one_process_batch(world_size):
    """DistributedSampler(rank r) batch k of b/W images == RandomSampler batch k of b images, as sets."""
    dataset, batch, seed, epoch = Draws(), 6 if world_size == 3 else 4, 7, 2
    single = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True)
    set_epoch_order(single, seed, epoch)
    ranks = []
    for rank in range(world_size):
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=world_size, rank=rank)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch // world_size, sampler=sampler,
                                             drop_last=True)
        set_epoch_order(loader, seed, epoch)
        ranks.append([set(b[0].tolist()) for b in loader])
    single_batches = [set(b[0].tolist()) for b in single]
    assert len(single_batches) == 12 // batch
    assert single_batches == [set().union(*parts) for parts in zip(*ranks)]
    set_epoch_order(single, seed, epoch + 1)
    assert [set(b[0].tolist()) for b in single] != single_batches  # a new order each epoch
