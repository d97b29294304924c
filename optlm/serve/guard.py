"""A domain guard: a sequence classifier screens each prompt (each user message of a chat) before the generator
sees it. A text is refused when the probability its classifier gives the labels outside ``allow`` reaches
``threshold``; the request then gets OpenAI's ``content_filter`` error and never reaches the engine.

Screening runs on the engine's thread between two of its steps (``AsyncEngine.call``), in one batch for every
text that arrived meanwhile, so the guard shares the generator's compute instead of racing it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..train.predict import Classifier

# Label names that mean "let it through" when --guard-allow is not given.
ALLOW_NAMES = ("allow", "allowed", "in_domain", "in-domain", "indomain", "safe", "ok", "benign")


@dataclass
class Verdict:
    allowed: bool
    label: str  # allowed: the most probable label; refused: the most probable refused label
    score: float  # that label's probability
    refused_score: float  # the summed probability of every refused label (compared with the threshold)


class Guard:
    def __init__(self, classifier: Classifier, threshold: float = 0.5, allow: Sequence[str] | None = None,
                 source: str = "the guard"):
        if classifier.problem_type != "single_label_classification":
            raise ValueError(f"{source} is a {classifier.problem_type} model; a guard needs a single-label "
                             "classifier")
        if not 0 < threshold <= 1:
            raise ValueError(f"--guard-threshold must be in (0, 1], got {threshold}")
        labels = classifier.labels
        if allow is None:
            allow = [n for n in labels if n.lower() in ALLOW_NAMES]
            if not allow:
                raise ValueError(f"{source} has the labels {', '.join(labels)}; say which of them may pass with "
                                 "--guard-allow")
        unknown = [a for a in allow if a not in labels]
        if unknown:
            raise ValueError(f"--guard-allow {unknown[0]!r} is not a label of {source} ({', '.join(labels)})")
        if len(set(allow)) == len(labels):
            raise ValueError(f"--guard-allow lets every label of {source} pass; it would refuse nothing")
        self.classifier, self.threshold, self.labels = classifier, threshold, labels
        self.refused = torch.tensor([n not in allow for n in labels])
        self._lock = threading.Lock()
        self._pending: list[tuple[str, asyncio.Future, asyncio.AbstractEventLoop]] = []
        self._scheduled = False

    def classify(self, texts: list[str]) -> list[Verdict]:
        """The verdicts on ``texts``, in one batch."""
        probs = torch.softmax(self.classifier.logits(texts, batch_size=max(len(texts), 1)), -1)  # (N, labels)
        out = []
        for p in probs:
            refused = float(p[self.refused].sum())
            if refused >= self.threshold:
                masked = torch.where(self.refused, p, torch.zeros_like(p))
                i = int(masked.argmax())
                out.append(Verdict(False, self.labels[i], float(p[i]), refused))
            else:
                i = int(p.argmax())
                out.append(Verdict(True, self.labels[i], float(p[i]), refused))
        return out

    async def check(self, engine: Any, texts: list[str]) -> list[Verdict]:
        """Verdicts for ``texts``, classified on the engine's thread together with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in texts]
        with self._lock:
            self._pending += [(t, f, loop) for t, f in zip(texts, futures, strict=True)]
            schedule, self._scheduled = not self._scheduled, True
        if schedule:
            try:
                await engine.call(self._flush)
            except BaseException as e:  # the engine is gone: nobody waiting may hang
                with self._lock:
                    batch, self._pending, self._scheduled = self._pending, [], False
                for _, future, waiter_loop in batch:
                    waiter_loop.call_soon_threadsafe(_settle, future, None, e)
                raise
        return [await f for f in futures]

    def _flush(self, _engine: Any) -> None:
        with self._lock:
            batch, self._pending, self._scheduled = self._pending, [], False
        if not batch:
            return
        try:
            verdicts = self.classify([t for t, _, _ in batch])
        except Exception as e:  # noqa: BLE001 (handed to every waiter)
            for _, future, loop in batch:
                loop.call_soon_threadsafe(_settle, future, None, e)
            return
        for (_, future, loop), verdict in zip(batch, verdicts, strict=True):
            loop.call_soon_threadsafe(_settle, future, verdict, None)


def _settle(future: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
