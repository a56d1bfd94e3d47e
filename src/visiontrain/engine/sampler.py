"""The training sampler: ``DistributedSampler`` that can start an epoch part-way, for step-exact resume."""

from __future__ import annotations

from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (a world of one included) that skips the first ``skip`` samples of this
    rank's share of an epoch: a run resumed mid-epoch sees exactly the batches it had not seen."""

    skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip
