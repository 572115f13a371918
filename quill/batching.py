"""Continuous batching: one scheduler thread per loaded model decodes every running request together.

The scheduler owns a `DecodeBatch(model, capacity=max_batch)`. Between decode steps it drops cancelled rows,
admits waiting requests in FIFO order (a request's `n` samples are prefilled together by `DecodeBatch.add`,
which also emits their first tokens), then runs one `step()` for every active row (plain greedy rows may take
several steps in it, ended early as soon as a request arrives or is cancelled). Each request gets its
events through a `Ticket`: an asyncio queue fed with `loop.call_soon_threadsafe`, so torch work never runs
on the server's event loop.

Admission is strictly first in, first out: a request whose samples do not fit in the free rows waits,
and nothing behind it jumps the queue. Greedy results do not depend on what else is in the batch.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator

from quill.errors import InvalidParameter, QuillError
from quill.generate import BURST_S, DecodeBatch, GenerationRequest, Sequence, SequenceState, StepEvent, Usage, new_sequences
from quill.kernels import Interrupt
from quill.prefix_cache import PrefixHit

log = logging.getLogger("quill.batching")

_DONE = object()  # end of a ticket's event stream


class QueueFull(QuillError):
    """The scheduler's waiting queue is full; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class SchedulerClosed(QuillError):
    """The scheduler was stopped (the model is being unloaded or the server is shutting down)."""


class SchedulerObserver:
    """Hooks the scheduler calls from its thread (metrics); the base class ignores them all."""

    def occupancy(self, active_rows: int, queued: int) -> None:
        """Rows decoding and requests waiting, after every change."""

    def first_token(self, seconds: float) -> None:
        """Seconds from a request's submission to its first token."""

    def token_interval(self, seconds: float) -> None:
        """Seconds between two consecutive tokens of one sequence."""

    def finished(self, ticket: Ticket) -> None:
        """A request ended (done, cancelled or failed); `ticket.usage` says what it cost."""


class Ticket:
    """One submitted request: its `n` sequences and the stream of their StepEvents.

    Iterate it with `async for ev in ticket` on the event loop it was submitted from; the stream ends after
    every sequence finished, or raises the scheduler's error. `cancel()` frees its rows before the next
    decode step.
    """

    def __init__(self, request: GenerationRequest, seqs: list[Sequence], loop: asyncio.AbstractEventLoop):
        self.request, self.seqs, self.n = request, seqs, len(seqs)
        self.submitted = time.perf_counter()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.cancelled = False
        self.error: BaseException | None = None
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._scheduler: Scheduler | None = None
        self._last: dict[int, float] = {}  # seq index -> time of its last token
        self._open = self.n  # sequences not finished yet
        self._resume: SequenceState | None = None  # a continued sequence's saved state, placed on admission
        self._hit = PrefixHit()  # its prompt's cached prefix, pinned from submission until its prefill

    # ---- consumer side --------------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop generating (idempotent, thread-safe): a queued ticket leaves the queue, a running one its rows."""
        if self.cancelled or self.finished_at is not None:
            return
        self.cancelled = True
        if self._scheduler is not None:
            self._scheduler._cancelled(self)

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    @property
    def usage(self) -> Usage:
        """Prompt tokens once, generated tokens and FLOPs of every sample, seconds from submission to the end."""
        u = Usage(prompt_tokens=max(s.usage.prompt_tokens for s in self.seqs),
                  cached_tokens=max(s.usage.cached_tokens for s in self.seqs))
        for s in self.seqs:
            u.completion_tokens += s.usage.completion_tokens
            u.flops += s.usage.flops
        u.seconds = (self.finished_at or time.perf_counter()) - self.submitted
        return u

    async def __aiter__(self) -> AsyncIterator[StepEvent]:
        while True:
            item = await self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            for ev in item:
                yield ev

    # ---- scheduler side (its thread) -------------------------------------------------------------------------

    def _put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True


def _loop(loop: asyncio.AbstractEventLoop | None) -> asyncio.AbstractEventLoop:
    """The loop a ticket delivers to: the one given, else the running one (submit is called from the server)."""
    return loop if loop is not None else asyncio.get_running_loop()


class Scheduler:
    """Decodes all running requests of one model together in a background thread."""

    def __init__(self, engine, max_batch: int = 8, max_queue: int = 64, observer: SchedulerObserver | None = None,
                 name: str | None = None):
        if max_batch < 1:
            raise InvalidParameter("max_batch must be at least 1", "max_batch")
        if max_queue < 0:
            raise InvalidParameter("max_queue must be non-negative", "max_queue")
        self.engine = engine
        self.name = name or getattr(engine, "name", "model")
        self.max_batch, self.max_queue = max_batch, max_queue
        self.observer = observer or SchedulerObserver()
        self._batch = self._new_batch()
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._running: list[Ticket] = []
        self._owner: dict[int, Ticket] = {}  # id(seq) -> its ticket
        self._cond = threading.Condition()
        self._interrupt = Interrupt()  # set when the scheduler has something to do between steps
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Retry-After: when recent requests finished (the queue drains at their rate), and a running mean of
        # the time a request holds its rows, for before that rate can be measured
        self._finish_times: collections.deque[float] = collections.deque(maxlen=32)
        self._mean_service_seconds = 1.0

    # ---- public API -------------------------------------------------------------------------------------------

    @property
    def active_rows(self) -> int:
        return len(self._batch.rows)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"quill-scheduler-{self.name}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the thread; every waiting or running ticket ends with SchedulerClosed."""
        with self._cond:
            self._stopping = True
            self._interrupt.set()
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest, n: int = 1, loop: asyncio.AbstractEventLoop | None = None) -> Ticket:
        """Queue a validated request for `n` samples; raises QueueFull when the waiting queue is full.

        Called on an event loop, the ticket delivers to that loop; pass `loop` to choose another.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidParameter(f"n must be a positive integer, got {n!r}", "n")
        if n > self.max_batch:
            raise InvalidParameter(f"n must be at most {self.max_batch} (this server's --max-batch)", "n")
        hit = self._batch.lookup(request, count=False)  # pinned until admission: the budget may count on it
        try:
            request.validate(self.engine.model, hit.tokens)
            seqs = new_sequences(self.engine.model, self.engine.tokenizer, request, n)
            ticket = Ticket(request, seqs, _loop(loop))
            ticket._hit = hit
            return self._enqueue(ticket)
        except BaseException:
            hit.release()
            raise

    def resume(self, state: SequenceState, max_flops: int | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> Ticket:
        """Queue a sequence that a FLOP budget paused (a continuation), to carry on exactly where it stopped.

        Its saved KV cache is copied into a row, or recomputed from its tokens when gone; a budget too small
        for that and one step raises BudgetError here, before anything is queued.
        """
        seq = Sequence.resume(state, self.engine.tokenizer, self.engine.model, max_flops)
        ticket = Ticket(seq.request, [seq], _loop(loop))
        ticket._resume = state
        return self._enqueue(ticket)

    def _enqueue(self, ticket: Ticket) -> Ticket:
        n = ticket.n
        with self._cond:
            if self._stopping:
                raise SchedulerClosed(f"model {self.name!r} is shutting down")
            if self._blocked(n) > self.max_queue:
                raise QueueFull(f"model {self.name!r} is busy: {len(self._waiting)} requests are waiting",
                                self.retry_after())
            ticket._scheduler = self
            self._waiting.append(ticket)
            self._interrupt.set()
            self._cond.notify_all()
        self._observe()
        return ticket

    def _blocked(self, n: int) -> int:
        """How many requests would wait (not fit in the free rows, in FIFO order) with one more of `n` samples."""
        free, blocked = self._batch.free, 0
        for need in [t.n for t in self._waiting] + [n]:
            if blocked or need > free:
                blocked += 1
            else:
                free -= need
        return blocked

    def retry_after(self) -> int:
        """Whole seconds a rejected client should wait: about when it would have been admitted had it queued.

        Every waiting request ahead of it, and then itself, is admitted as a running one finishes, so the wait is
        their count over the rate at which requests have finished lately (over the last minute, up to now, so
        the estimate grows while nothing finishes). With fewer than two recent finishes the rate is the
        batch's rows over the mean time a request holds a row. The mean time from submission to the end is no
        estimate: it already includes the queueing, which the count of waiting requests would then count again.
        """
        now = time.perf_counter()
        recent = [t for t in self._finish_times if now - t <= 60.0]
        if len(recent) >= 2 and now > recent[0]:
            rate = len(recent) / (now - recent[0])
        else:
            rate = self.max_batch / self._mean_service_seconds
        return max(1, min(60, round((len(self._waiting) + 1) / rate)))

    # ---- thread ----------------------------------------------------------------------------------------------

    def _cancelled(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket in self._waiting:  # never started: leave the queue now
                self._waiting.remove(ticket)
                queued = True
            else:
                queued = False
            self._interrupt.set()
            self._cond.notify_all()
        if queued:
            self._finish(ticket)
            self._observe()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._waiting or self._batch.rows or self._has_cancelled()):
                        self._cond.wait()
                    if self._stopping:
                        break
                admitted: list[Ticket] = []
                try:
                    self._drop_cancelled()
                    with self._cond:
                        self._interrupt.clear()  # what is waiting now is admitted below, or waits for a row
                        free = self._batch.free
                        while self._waiting and self._waiting[0].n <= free:  # FIFO: nobody jumps the queue
                            t = self._waiting.popleft()
                            free -= t.n
                            admitted.append(t)
                    while admitted:
                        t = admitted.pop(0)
                        if t.cancelled:
                            self._finish(t)
                            continue
                        try:
                            events = self._admit(t)  # budgets were checked before the request was queued
                        except Exception as e:  # its prefill failed: that request alone, with an answer
                            log.exception("request on %s failed in its prefill", self.name)
                            self._fail(t, e)
                            continue
                        self._route(events)
                        self._observe()
                    if self._batch.rows:
                        self._route(self._batch.step(BURST_S, self._interrupt))
                except Exception as e:  # a failed forward of the batch: fail every running request, start afresh
                    log.exception("scheduler for %s failed", self.name)
                    self._fail_all(e)
                    with self._cond:  # admitted but not started: back to the head of the queue, in order
                        self._waiting.extendleft(reversed(admitted))
        finally:
            with self._cond:
                waiting, self._waiting = list(self._waiting), collections.deque()
            closed = SchedulerClosed(f"model {self.name!r} was unloaded or the server is shutting down")
            for t in waiting + self._running:
                t.error = closed
                t._put(closed)
                self._finish(t, put_done=False)
            self._running.clear()
            self._observe()

    def _admit(self, t: Ticket) -> list[StepEvent]:
        """Prefill a new request (its first tokens come back) or place a continued sequence (tokens on next step)."""
        t.admitted_at = time.perf_counter()
        if t._resume is not None:
            self._batch.resume(t.seqs[0], t._resume.kv)
            events: list[StepEvent] = []
        else:
            # looked up again: what requests admitted since its submission cached counts too (the same prompt
            # arriving twice at once computes it once); the first hit stays pinned until then, so this one is longer
            hit = self._batch.lookup(t.request)
            t._hit.release()
            events = self._batch.add(t.seqs, hit)
        self._running.append(t)
        for s in t.seqs:
            self._owner[id(s)] = t
        return events

    def _fail(self, t: Ticket, error: BaseException) -> None:
        """End `t` with `error`, freeing whatever rows its sequences still hold."""
        for s in t.seqs:
            if s in self._batch.rows and not s.finished:
                self._batch.remove(s)
        t.error = error
        t._put(error)
        self._finish(t, put_done=False)

    def _has_cancelled(self) -> bool:
        return any(t.cancelled for t in self._running)

    def _drop_cancelled(self) -> None:
        dropped = [t for t in self._running if t.cancelled]
        for t in dropped:
            for s in t.seqs:
                if not s.finished:
                    self._batch.remove(s)
            self._finish(t)
        if dropped:
            self._observe()

    def _route(self, events: list[StepEvent]) -> None:
        """Hand each ticket its events in one call, and retire the tickets whose sequences all finished."""
        now = time.perf_counter()
        per_ticket: dict[int, tuple[Ticket, list[StepEvent]]] = {}
        failed: dict[int, tuple[Ticket, Exception]] = {}
        for ev in events:
            t = self._owner[id(ev.seq)]
            if ev.seq.error is not None:  # this sequence alone failed: its request ends with the error
                failed[id(t)] = (t, ev.seq.error)
                self._owner.pop(id(ev.seq), None)
                continue
            per_ticket.setdefault(id(t), (t, []))[1].append(ev)
            if t.first_token_at is None:
                t.first_token_at = now
                self.observer.first_token(now - t.submitted)
            elif ev.seq.index in t._last:
                self.observer.token_interval(now - t._last[ev.seq.index])
            t._last[ev.seq.index] = now
            if ev.finished:
                t._open -= 1
                self._owner.pop(id(ev.seq), None)
        for t, evs in per_ticket.values():
            if id(t) in failed:
                continue
            if not t.cancelled:
                t._put(evs)
            if t._open == 0:
                self._finish(t)
        for t, error in failed.values():
            log.error("request on %s failed: %s", self.name, error, exc_info=error)
            self._fail(t, error)
        self._observe()

    def _finish(self, t: Ticket, put_done: bool = True) -> None:
        if t.finished_at is not None:
            return
        t.finished_at = time.perf_counter()
        t._hit.release()  # never admitted (cancelled, failed, closed): its blocks may go
        if t in self._running:
            self._running.remove(t)
        for s in t.seqs:
            self._owner.pop(id(s), None)
        if put_done:
            t._put(_DONE)
        if t.admitted_at is not None and t.error is None and not t.cancelled:
            self._finish_times.append(t.finished_at)
            self._mean_service_seconds = 0.8 * self._mean_service_seconds + 0.2 * (t.finished_at - t.admitted_at)
        try:
            self.observer.finished(t)
        except Exception:
            log.exception("scheduler observer failed")

    def _fail_all(self, error: Exception) -> None:
        for t in list(self._running):
            self._fail(t, error)
        self._owner.clear()
        self._batch = self._new_batch()
        self._observe()

    def _new_batch(self) -> DecodeBatch:
        return DecodeBatch(self.engine.model, self.max_batch, prefix_cache=self.engine.prefix_cache)

    def _observe(self) -> None:
        try:
            self.observer.occupancy(len(self._batch.rows), len(self._waiting))
        except Exception:
            log.exception("scheduler observer failed")
