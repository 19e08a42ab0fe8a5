"""The DataLoader over LowMemDataset, built from the memory guard's current plan.

DataLoader workers start from a small fork server, not from the trainer. A worker forked from the trainer shares
its pages copy-on-write; every page the trainer then rewrites (weights, gradients, Adam moments: all of them,
every step) stays behind as a private copy in every worker, so by the end of an epoch each worker holds about one
more copy of the model states (measured: ~0.55 GB per worker for t5_small). The fork server imports the data path
once, and its workers share those pages. With no worker left, the idle server goes too.

Without workers, a thread prepares the next batches while a step computes (Prefetcher): data off the critical path
either way.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from lowmem_train.trainer.compat import stop_forkserver
from lowmem_train.trainer.data.packing import unpack


def worker_context():
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "lowmem_train.trainer.data.dataset"])
    return context


def make_loader(dataset, plan, seed: int) -> DataLoader:
    """A loader of whole per-rank steps (the dataset batches them already) with the plan's workers, prefetch and
    pin_memory (pin_memory only where there is a GPU to copy to)."""
    kwargs = plan.loader_kwargs()
    kwargs["pin_memory"] = kwargs["pin_memory"] and torch.cuda.is_available()
    kwargs["batch_size"] = None
    if kwargs["num_workers"]:
        kwargs["multiprocessing_context"] = worker_context()
    else:
        stop_forkserver()  # a no-op while a worker of an old loader is still alive (compat.py)
    # Its own generator: creating an iterator must not draw from the global RNG that dropout uses,
    # or a resumed run (which creates its iterator at another moment) would see other dropout masks.
    return DataLoader(dataset, persistent_workers=False, generator=torch.Generator().manual_seed(seed), **kwargs)


class Prefetcher:
    """Without workers, the next batches are read, tokenized and collated in a background thread while the current
    step computes. Parquet decoding and the Rust tokenizer release the GIL, and so do the step's tensor operations.
    At most `depth` batches wait (each a few tensors; the reader's one block is shared, not copied), in the loader's
    own order, so positions and resume are untouched. An exception in the thread (a MemoryError while collating)
    is raised by next() in the training thread, where the memory guard handles it."""

    def __init__(self, loader, depth: int = 2):
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(loader,), name="lowmem-prefetch", daemon=True)
        self._thread.start()

    def _fill(self, loader) -> None:
        try:
            for item in loader:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread, which decides
            self._put(("error", exc))

    def _put(self, entry) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        kind, value = self._queue.get()
        if kind == "item":
            return value
        if kind == "end":
            raise StopIteration
        raise value

    def close(self) -> None:
        """Stop the thread and drop what it prepared (the loop resumes from its own position, not from these)."""
        import queue

        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join()


@contextlib.contextmanager
def batches_of(dataset, plan, seed: int) -> Iterator[Iterator[dict]]:
    """The batches of `dataset` from its start position, on a loader built from `plan`; what the loader or its
    prefetch thread holds is let go on leaving (before a loader with another plan starts)."""
    loader = make_loader(dataset, plan, seed)
    if plan.num_workers:
        iterator = map(unpack, loader)
        try:
            yield iterator
        finally:
            del iterator  # its last reference: the workers shut down here, before new ones start
        return
    prefetcher = Prefetcher(loader)
    try:
        yield prefetcher
    finally:
        prefetcher.close()
