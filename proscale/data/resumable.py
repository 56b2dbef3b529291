"""A training DataLoader that resumes mid-epoch where the checkpoint left off.

Lightning saves a checkpoint inside an epoch (an interrupted run's ``last.ckpt``, or ``every_n_train_steps``) with
the number of batches already trained, but a plain DataLoader restarts its epoch from the first batch: the resumed
run would train on those batches twice and never see the epoch's last ones (Lightning warns "your dataloader is not
resumable"). :class:`ResumableDataLoader` implements the ``state_dict`` / ``load_state_dict`` interface Lightning
looks for: the state is the number of batches of the current epoch already trained, and on resume the
:class:`SkippingBatchSampler` skips that many batches of indices (nothing is loaded for them). The epoch's order is
the same as in the original run, and so are the random numbers that follow: the state saved with the position
holds the global generators' states (Python, NumPy, torch CPU and CUDA) at the two moments the resumed epoch
needs them -- when the epoch's order was drawn and when the checkpoint was written (Lightning loads the next batch
right after) -- and the sampler puts each back at the same moment of the resumed run. With ``num_workers=0`` a run resumed
mid-epoch therefore ends with exactly the weights of an uninterrupted one (tests/test_resume.py); with worker
processes the data order is still exact, the augmentations' random draws are not.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader


def rng_state() -> dict[str, Any]:
    """The global generators' states as tensors and plain lists (loadable with ``weights_only=True``)."""
    version, mt_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class SkippingBatchSampler(BatchSampler):
    """A :class:`BatchSampler` that can restart an epoch at a given batch with the random state it had there.

    Every pass records the generators' state when it starts (before the random sampler draws the order).
    ``resume`` (set by :meth:`ResumableDataLoader.load_state_dict`) makes the next pass draw its order from the
    interrupted epoch's start state, skip ``skip`` batches and restore the state of the checkpoint before it
    yields the next batch, so that the pass draws and loads exactly as the interrupted one did. Same constructor as
    ``BatchSampler`` so that Lightning can rebuild it around a ``DistributedSampler``.
    """

    resume: dict[str, Any] | None = None
    epoch_start_state: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[list[int]]:
        resume, self.resume = self.resume, None
        if resume is not None:
            set_rng_state(resume["epoch_start"])  # the same order as the interrupted epoch
        self.epoch_start_state = rng_state()
        skip = resume["skip"] if resume is not None else 0
        for index, batch in enumerate(super().__iter__()):
            if index < skip:
                continue
            if resume is not None and index == skip:
                set_rng_state(resume["after_step"])  # as when the checkpoint was written, before this batch
            yield batch


class ResumableDataLoader(DataLoader):
    """DataLoader over a :class:`SkippingBatchSampler` whose state is the position in the epoch.

    Args:
        batches_done: returns how many batches of the current epoch have been trained (read when a checkpoint is
            saved; the datamodule asks its trainer's loop progress, which counts trained batches, not the ones the
            loader has already prefetched).
        *args, **kwargs: ``DataLoader`` arguments; ``batch_sampler`` must be a :class:`SkippingBatchSampler`.
    """

    def __init__(self, *args: Any, batches_done: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict[str, Any]:
        """Position in the epoch and the random states a resumed run needs (see the module docstring)."""
        state: dict[str, Any] = {"batches_done": int(self.batches_done()) if self.batches_done is not None else 0}
        sampler = self.batch_sampler
        if isinstance(sampler, SkippingBatchSampler) and sampler.epoch_start_state is not None:
            state.update(epoch_start=sampler.epoch_start_state, after_step=rng_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        done = int(state.get("batches_done", 0))
        sampler = self.batch_sampler
        if isinstance(sampler, SkippingBatchSampler) and 0 < done < len(self) and state.get("after_step"):
            sampler.resume = {"skip": done, "epoch_start": state["epoch_start"], "after_step": state["after_step"]}
        # else: a finished epoch (the next one starts afresh, seeded by EpochSeeding) or an older checkpoint
