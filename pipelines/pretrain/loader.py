"""Step batches built ahead of the training step, by one thread or by k loader processes.

A step's batch, masks and sample ids are a pure function of (seed, step, rank)
(pipelines.pretrain.data), so who builds them changes nothing but the speed:

- ``loader_workers: 1``: one background thread in the training process builds step
  t+1 while step t trains (no process start, no copy between processes);
- ``loader_workers: k > 1``: a torch DataLoader with k worker processes over the steps
  as a map-style dataset (index = step). Only Pillow's PNG decode releases the GIL; row
  conversion, tensor building and masking hold it, so threads of one process stop adding
  cores early, while processes scale. Worker w builds steps start + w, start + w + k, ...
  and the DataLoader hands them back in step order, ``prefetch_factor`` steps ahead per
  worker.

The processes come from a forkserver, never a plain fork: a training process runs
threads (Ray, NCCL, torch's pools) whose locks a fork could copy mid-use. A resume at
step t starts the step sampler at t.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ThreadPoolExecutor

import torch.utils.data

from model.batch import MixedBatch, collate_rows
from model.task import Masker, PretrainMasks
from pipelines.common.shards import ShardIndex
from pipelines.pretrain.data import MixedStream, count_tokens, step_masks

# One step's data for this worker: (batch, masks, sample ids in rows() order or None, the
# sequence positions the backbone processes). batch: text ids / padding_mask (B_text, L) int64
# / bool, image pixels (B_image, 3, S, S) float32 in [-1, 1] with visual_tokens (B_image, N),
# pair both; masks: TextMask per text part (B, L), block masks (B, N) bool per image part.
StepData = tuple[MixedBatch, PretrainMasks, list[str] | None, int]

PREFETCH_PER_WORKER = 2  # steps queued per loader process: a slow step is absorbed by the next
_CONTEXT = "forkserver"
# The forkserver imports these once; every loader process forks from it with torch and the
# pipeline already imported instead of importing them again.
_PRELOAD = ["pipelines.pretrain.loader"]


class StepSource(torch.utils.data.Dataset):
    """Map-style dataset over steps: ``source[step]`` is this worker's StepData of that step.

    Picklable: a loader process gets the arguments and builds its own stream (shard
    cache included) on first use, so nothing read by another process is copied.
    """

    def __init__(self, index: ShardIndex, batch: dict[str, int], seed: int, rank: int, world_size: int,
                 masker: Masker, pad_id: int, log_samples: bool):
        self.args = (index, batch, seed, rank, world_size)
        self.masker, self.pad_id, self.seed, self.log_samples = masker, pad_id, seed, log_samples
        self._stream: MixedStream | None = None

    @property
    def stream(self) -> MixedStream:
        if self._stream is None:
            self._stream = MixedStream(*self.args)
        return self._stream

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stream": None}  # the shard cache stays in its process

    def __getitem__(self, step: int) -> StepData:
        """Rows -> MixedBatch (PNG decode, text padding) -> masks of (seed, step, positions)."""
        rows = self.stream.rows(step)
        batch = collate_rows(rows, self.pad_id)
        masks = step_masks(self.masker, batch, step, self.seed, self.stream.positions(step), self.stream.batch)
        ids = [r["id"] for r in rows] if self.log_samples else None
        return batch, masks, ids, count_tokens(batch)


class StepLoader:
    """Builds step t+1's data in one background thread while step t trains."""

    def __init__(self, source: StepSource):
        self.source = source
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step-loader")
        self.pending: dict[int, object] = {}

    def get(self, step: int, last_step: int) -> StepData:
        """Step ``step``'s data; queues step+1 unless it is ``last_step`` (exclusive)."""
        future = self.pending.pop(step, None) or self.pool.submit(self.source.__getitem__, step)
        if step + 1 < last_step:
            self.pending[step + 1] = self.pool.submit(self.source.__getitem__, step + 1)
        return future.result()

    def _load(self, step: int) -> StepData:
        """Step ``step``'s data built in the calling thread (tests compare it across workers)."""
        return self.source[step]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _StepRange(torch.utils.data.Sampler):
    """The steps [start, stop) in order; reset before each (re)start of the iterator."""

    def __init__(self):
        self.start = self.stop = 0

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def _as_is(data: StepData) -> StepData:
    """The DataLoader's collate_fn: a step is already a batch (default_convert would turn
    the tuple into a list)."""
    return data


class ProcessStepLoader:
    """Builds the next steps' data in ``workers`` processes (torch DataLoader, forkserver).

    Steps are asked for in order; asking for any other step restarts the sampler there
    (the processes are kept and their queued steps dropped). The processes start on the
    first ``get`` and stop at ``close``.
    """

    def __init__(self, source: StepSource, workers: int, prefetch: int = PREFETCH_PER_WORKER):
        context = multiprocessing.get_context(_CONTEXT)
        context.set_forkserver_preload(_PRELOAD)
        self.steps = _StepRange()
        self.loader = torch.utils.data.DataLoader(
            source, batch_size=None, sampler=self.steps, num_workers=workers, collate_fn=_as_is,
            prefetch_factor=prefetch, persistent_workers=True, multiprocessing_context=context)
        self._iterator = None
        self._next = None

    def get(self, step: int, last_step: int) -> StepData:
        """Step ``step``'s data; the processes work ahead up to ``last_step`` (exclusive)."""
        if self._iterator is None or step != self._next or last_step != self.steps.stop:
            self.steps.start, self.steps.stop = step, last_step
            self._iterator = iter(self.loader)
        self._next = step + 1
        return next(self._iterator)

    def worker_pids(self) -> list[int]:
        """The loader processes' ids (empty before the first ``get``)."""
        return [w.pid for w in getattr(self._iterator, "_workers", [])]

    def close(self) -> None:
        """Stops the processes and waits for them (DataLoader's own shutdown path)."""
        if self._iterator is not None:
            self._iterator._shutdown_workers()
        self._iterator = None
        self.loader._iterator = None


def step_loader(source: StepSource, workers: int = 1) -> StepLoader | ProcessStepLoader:
    """The loader for ``pretrain.loader_workers``: a thread for 1, processes beyond."""
    if workers < 1:
        raise ValueError(f"loader workers must be >= 1, got {workers}")
    return StepLoader(source) if workers == 1 else ProcessStepLoader(source, workers)


__all__ = ["StepData", "StepSource", "StepLoader", "ProcessStepLoader", "step_loader"]
