"""Dynamic batching: images of concurrent requests run through the network together.

Each request's preprocessed images join one queue. A batch is ready when ``max_batch_size`` images
wait, or ``batch_timeout`` seconds after the oldest one arrived, whichever comes first; it starts
on the first of ``workers`` model threads that is free, and while they are all busy the next
batch keeps gathering. On a CPU several workers, each with its share of the cores' PyTorch
threads, run several small batches at once: an EfficientNet-Lite0 batch of 8 runs hardly faster
on two threads than on one, so two one-thread workers nearly double the images per second of a
2-core machine (``scripts/load_test.py``). The event loop keeps accepting and decoding requests.
Grad-CAM hooks the network, so it runs alone: no batch starts until it is done.

How many requests may be in flight is bounded (``max_queue``): one more is refused at once with
503 and ``Retry-After``, before its body is read, so a burst never builds an unbounded backlog.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from transfer_learning.results.predict import Classifier, Prediction
from transfer_learning.serve.uploads import BadRequest

log = logging.getLogger(__name__)
OVERLAY_SIDE = 512  # the Grad-CAM overlay's longest side, in pixels


@dataclass
class Job:
    tensor: torch.Tensor
    source: str
    top_k: int
    future: asyncio.Future[Prediction]
    arrived: float


class Batcher:
    """The queue in front of the network (see the module's doc)."""

    def __init__(
        self,
        classifier: Classifier,
        max_batch_size: int,
        batch_timeout: float,
        max_queue: int,
        workers: int = 1,
    ) -> None:
        self.classifier = classifier
        self.max_batch_size = max_batch_size
        self.batch_timeout = batch_timeout
        self.max_queue = max_queue
        self.workers = workers
        self.pending: deque[Job] = deque()
        self.requests = 0  # in flight: admitted and not answered yet
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="tl-serve-model")
        self.batches = self.images = 0
        self.running = self.peak = 0  # batches on the workers now, and the most at once
        self.exclusive = 0  # Grad-CAM calls waiting or running: no new batch starts meanwhile
        self._wake: asyncio.Event | None = None
        self._changed: asyncio.Condition | None = None
        self._task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()

    # -- admission ----------------------------------------------------------------------

    def admit(self) -> None:
        """Take one more request in, or refuse it (503) when ``max_queue`` are in flight."""
        if self.requests >= self.max_queue:
            raise BadRequest(
                503, f"the server is busy: {self.requests} requests in flight (max_queue={self.max_queue}); "
                "retry after the time in the Retry-After header",
                {"Retry-After": "1"},
            )  # fmt: skip
        self.requests += 1

    def done(self) -> None:
        self.requests -= 1

    # -- the loop -----------------------------------------------------------------------

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="tl-serve-batcher")

    async def stop(self) -> None:
        """After the last request was answered (the server drains them first)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def predict(
        self, tensors: Sequence[torch.Tensor], sources: Sequence[str], top_k: int
    ) -> list[Prediction]:
        """The predictions of one request's images, once their batch (or batches) ran."""
        assert self._wake is not None, "start() the batcher first"
        loop = asyncio.get_running_loop()
        jobs = [
            Job(t, s, top_k, loop.create_future(), loop.time()) for t, s in zip(tensors, sources, strict=True)
        ]
        self.pending.extend(jobs)
        self._wake.set()
        return list(await asyncio.gather(*(job.future for job in jobs)))

    async def in_worker(self, work: Callable[[], Any]) -> Any:
        """``work`` on a model thread with no batch running (Grad-CAM hooks the network)."""
        assert self._changed is not None, "start() the batcher first"
        self.exclusive += 1
        try:
            async with self._changed:
                await self._changed.wait_for(lambda: self.running == 0)
                return await asyncio.get_running_loop().run_in_executor(self.executor, work)
        finally:
            self.exclusive -= 1
            async with self._changed:
                self._changed.notify_all()

    async def _run(self) -> None:
        assert self._wake is not None and self._changed is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            deadline = self.pending[0].arrived + self.batch_timeout
            while len(self.pending) < self.max_batch_size and (left := deadline - loop.time()) > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except TimeoutError:
                    break
            async with self._changed:  # a free worker, and no Grad-CAM (images keep arriving)
                await self._changed.wait_for(lambda: self.running < self.workers and not self.exclusive)
                jobs = [self.pending.popleft() for _ in range(min(len(self.pending), self.max_batch_size))]
                jobs = [job for job in jobs if not job.future.done()]  # a client that went away
                if not jobs:
                    continue
                self.running += 1
                self.peak = max(self.peak, self.running)
            task = loop.create_task(self._batch(jobs))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _batch(self, jobs: list[Job]) -> None:
        assert self._changed is not None
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.executor, self._forward, jobs)
        except Exception as exc:  # reported to each request (a 500 without the traceback)
            log.exception("the network failed on a batch of %d image(s)", len(jobs))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
        else:
            self.batches += 1  # counted here, on the event loop: the workers share no state
            self.images += len(jobs)
            for job, result in zip(jobs, results, strict=True):
                if not job.future.done():
                    job.future.set_result(result)
        finally:
            async with self._changed:
                self.running -= 1
                self._changed.notify_all()

    def _forward(self, jobs: Sequence[Job]) -> list[Prediction]:
        batch = torch.stack([job.tensor for job in jobs])
        k = max(job.top_k for job in jobs)
        predictions = self.classifier.classify(batch, [job.source for job in jobs], k)
        return [
            p if p.multilabel else dataclasses.replace(p, top_k=p.top_k[: job.top_k])
            for p, job in zip(predictions, jobs, strict=True)
        ]


def gradcam_png(
    classifier: Classifier, tensor: torch.Tensor, image: Image.Image, prediction: Prediction
) -> dict[str, str]:
    """The Grad-CAM overlay of the predicted class (multi-label: the most probable one) on the
    image (at most :data:`OVERLAY_SIDE` pixels a side), as base64 PNG, and the class explained."""
    from transfer_learning.results.explain import class_to_explain, gradcam, overlay, to_original

    module = classifier.module
    index = class_to_explain(prediction, classifier.class_names)
    heatmap = gradcam(module.net, tensor[None].to(classifier.device), [index])[0].cpu()
    thumbnail = image.copy()
    thumbnail.thumbnail((OVERLAY_SIDE, OVERLAY_SIDE))
    picture = overlay(thumbnail, to_original(heatmap, thumbnail.size, module.preprocessing))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return {"class": classifier.class_names[index], "png": base64.b64encode(buffer.getvalue()).decode()}
