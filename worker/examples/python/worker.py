#!/usr/bin/env python3
"""A Stagecoach worker in Python that runs `noop` and `sleep` tasks, speaking
WorkerService the way the Rust worker SDK (worker/src/) does:

- one Subscribe stream (worker id, this process's random `instance`, kinds,
  slots) that delivers assignments and cancel notices, reopened with
  backoff whenever it ends, the same `instance` each time;
- a Heartbeat every `Welcome.heartbeat_interval_ms`, with or without leases,
  naming every held lease with its secret and progress; it renews them, and
  its answer names leases to stop;
- leases end locally a fifth before the coordinator's expiry when renewals
  stop coming, and their handlers are told to stop;
- each outcome reported with Complete or Fail carrying the lease secret,
  retried with backoff while the coordinator may still hold the lease,
  dropped once it says the lease is gone;
- SIGTERM or Ctrl-C: the stream is closed (no new work), running tasks get
  --drain-timeout to finish, then they are canceled and hand their leases
  back with a retryable failure.

    python worker.py --coordinator 127.0.0.1:50051 --token "$TOKEN" --slots 2

Handlers (payloads as the Rust worker's built-in ones):
- noop: succeeds at once with {};
- sleep {"ms": N, "cancel_marker": PATH}: sleeps N ms (default 100),
  recording progress in ms; canceled, it fails retryably with "canceled"
  after writing "canceled after M ms" to cancel_marker if given; output
  {"slept_ms": N}.
"""

import argparse
import asyncio
import logging
import os
import random
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import json_format, struct_pb2

from connection import add_connection_flags, check_connection_flags, import_stubs, metadata, open_channel

pb = import_stubs()
log = logging.getLogger("worker")

# Refusals no retry can fix (worker/src/run.rs `refused`).
REFUSED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
# A report answered with one of these is final: the lease is gone, or the
# report can never be accepted (worker/src/report.rs `verdict`).
REJECTED = {
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
}
REPORT_TIMEOUT_S = 10
# How long a canceled handler may keep running before it is abandoned.
CANCEL_GRACE_S = 5
# How long canceled tasks get to hand their leases back at shutdown.
HAND_BACK_GRACE_S = CANCEL_GRACE_S + 2
SLEEP_STEP_S = 0.05


class TaskError(Exception):
    """A handler's failure; `retryable` says whether another attempt may help."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.message = message
        self.retryable = retryable


@dataclass
class TaskContext:
    """What a handler gets: its input, a progress setter and a cancel flag."""

    kind: str
    payload: dict
    parameters: dict
    lease: "Lease"

    def progress(self, done: int, total: int) -> None:
        self.lease.done, self.lease.total = done, total

    @property
    def cancelled(self) -> asyncio.Event:
        return self.lease.cancel


async def noop(ctx: TaskContext) -> dict:
    return {}


async def sleep(ctx: TaskContext) -> dict:
    ms = ctx.payload.get("ms")
    if ms is None:
        ms = 100
    # JSON numbers arrive as floats through google.protobuf.Struct.
    if isinstance(ms, bool) or not isinstance(ms, (int, float)) or ms < 0 or ms != int(ms):
        raise TaskError(f'payload "ms" must be a non-negative integer, got {ms!r}', retryable=False)
    ms = int(ms)
    marker = ctx.payload.get("cancel_marker")
    if marker is not None and (not isinstance(marker, str) or not marker):
        raise TaskError(f'payload "cancel_marker" must be a file path, got {marker!r}', retryable=False)
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < ms / 1000:
        ctx.progress(int(elapsed * 1000), ms)
        try:
            await asyncio.wait_for(ctx.cancelled.wait(), min(SLEEP_STEP_S, ms / 1000 - elapsed))
        except asyncio.TimeoutError:
            continue
        if marker:
            try:
                Path(marker).write_text(f"canceled after {int((time.monotonic() - start) * 1000)} ms")
            except OSError as e:
                raise TaskError(f"canceled; writing {marker}: {e}", retryable=True) from e
        raise TaskError("canceled", retryable=True)
    ctx.progress(ms, ms)
    return {"slept_ms": ms}


HANDLERS = {"noop": noop, "sleep": sleep}


class Backoff:
    """100 ms doubling to 5 s, each delay drawn from the upper half of its
    step (worker/src/backoff.rs)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.step, self.attempt = 0.1, 0

    def next_delay(self) -> float:
        step, self.step = self.step, min(self.step * 2, 5.0)
        self.attempt += 1
        return step / 2 + random.uniform(0, step / 2)


@dataclass
class Lease:
    """One held lease (worker/src/leases.rs). Times are time.monotonic()."""

    token: object  # the LeaseToken message
    secret: int
    duration_s: float
    renewed_at: float
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    done: int = 0
    total: int = 0
    # None while live; else why it ended here ("revoked: ..." or "expired").
    ended: str | None = None

    @property
    def key(self):
        return (self.token.task_id, self.token.attempt)

    def locally_expired(self, now: float) -> bool:
        # The worker trusts a lease a fifth less than the coordinator does,
        # so a handler is told to stop before its task can go to another.
        return now >= self.renewed_at + self.duration_s * 4 / 5

    def gone(self, now: float) -> str | None:
        """Why a report about it can no longer be accepted, if so."""
        if self.ended and self.ended.startswith("revoked"):
            return self.ended
        if now >= self.renewed_at + self.duration_s:
            return "it expired without being renewed"
        return None


class Worker:
    def __init__(self, args, channel):
        self.args = args
        self.stub = pb.worker_grpc.WorkerServiceStub(channel)
        self.leases: dict[tuple[int, int], Lease] = {}
        self.slots = asyncio.Semaphore(args.slots)
        self.tasks: set[asyncio.Task] = set()
        # From the first Welcome: seconds between heartbeats, lease duration.
        self.heartbeat_interval_s = 1.0
        self.lease_duration_s = 10.0
        self.welcomed = asyncio.Event()
        # Proves to the coordinator that a reconnect is this process's own
        # (SubscribeRequest.instance): drawn once, never 0.
        self.instance = secrets.randbits(64) or 1

    # --- the Subscribe stream -------------------------------------------------

    async def subscribe_forever(self):
        """Keeps a Subscribe stream open; returns only by raising on a refusal."""
        backoff = Backoff()
        request = pb.worker.SubscribeRequest(
            worker_id=self.args.worker_id,
            kinds=sorted(HANDLERS),
            slots=self.args.slots,
            name=self.args.name,
            instance=self.instance,
        )
        while True:
            try:
                async for msg in self.stub.Subscribe(request, metadata=metadata(self.args)):
                    which = msg.WhichOneof("message")
                    if which == "welcome":
                        self.welcome(msg.welcome)
                        backoff.reset()
                    elif which == "assignment":
                        self.assign(msg.assignment)
                    elif which == "cancel":
                        self.revoke(msg.cancel.lease, msg.cancel.reason, "coordinator canceled a task")
                why = "the coordinator closed the stream"
            except grpc.aio.AioRpcError as e:
                if e.code() in REFUSED:
                    raise
                why = f"{e.code().name}: {e.details()}"
            delay = backoff.next_delay()
            log.warning(
                "lost the Subscribe stream; reconnecting reason=%r attempt=%d retry_in_ms=%d held_leases=%d",
                why, backoff.attempt, delay * 1000, len(self.leases),
            )
            await asyncio.sleep(delay)

    def welcome(self, w):
        lease = w.lease_duration_ms / 1000 if w.lease_duration_ms else 30.0
        beat = w.heartbeat_interval_ms / 1000 if w.heartbeat_interval_ms else lease / 3
        self.heartbeat_interval_s, self.lease_duration_s = max(beat, 0.01), lease
        self.welcomed.set()
        log.info(
            "subscribed worker_id=%s coordinator=%s heartbeat_interval_ms=%d lease_duration_ms=%d",
            self.args.worker_id, self.args.coordinator, beat * 1000, lease * 1000,
        )

    def assign(self, a):
        if not a.HasField("lease"):
            log.warning("assignment without a lease token; ignoring it kind=%s", a.kind)
            return
        key = (a.lease.task_id, a.lease.attempt)
        if key in self.leases:
            log.debug("repeated assignment; already running it task_id=%d attempt=%d", *key)
            return
        # The lease started on the coordinator a moment before it arrived;
        # the local margin (a fifth of it) covers that delivery time.
        lease = Lease(
            token=a.lease,
            secret=a.lease_secret,
            duration_s=a.lease_duration_ms / 1000 if a.lease_duration_ms else self.lease_duration_s,
            renewed_at=time.monotonic(),
        )
        self.leases[key] = lease
        log.info(
            "task assigned task_id=%d attempt=%d kind=%s migration_id=%d subject=%s stage=%s",
            *key, a.kind, a.migration_id, a.subject, a.stage_name,
        )
        ctx = TaskContext(
            kind=a.kind,
            payload=json_format.MessageToDict(a.payload),
            parameters=json_format.MessageToDict(a.parameters),
            lease=lease,
        )
        task = asyncio.create_task(self.execute(ctx))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def revoke(self, token, reason: str, what: str):
        lease = self.leases.get((token.task_id, token.attempt))
        if lease is None:
            log.debug("cancel notice for a lease not held task_id=%d attempt=%d", token.task_id, token.attempt)
            return
        lease.ended = f"revoked: {reason}"
        lease.cancel.set()
        log.info("%s task_id=%d attempt=%d reason=%r", what, token.task_id, token.attempt, reason)

    # --- heartbeats and local expiry ------------------------------------------

    async def heartbeat_forever(self):
        await self.welcomed.wait()
        failing = False
        while True:
            sent_at = time.monotonic()
            live = [lease for lease in self.leases.values() if lease.ended is None]
            request = pb.worker.HeartbeatRequest(
                worker_id=self.args.worker_id,
                leases=[
                    pb.worker.LeaseStatus(lease=lease.token, done=lease.done, total=lease.total, lease_secret=lease.secret)
                    for lease in live
                ],
            )
            try:
                response = await self.stub.Heartbeat(
                    request, metadata=metadata(self.args), timeout=max(self.heartbeat_interval_s, 1.0)
                )
                for renewal in response.renewed:
                    lease = self.leases.get((renewal.lease.task_id, renewal.lease.attempt))
                    if lease and lease.ended is None:
                        lease.renewed_at = max(lease.renewed_at, sent_at)
                for notice in response.cancel:
                    self.revoke(notice.lease, notice.reason, "coordinator canceled a lease")
                if failing:
                    log.info("heartbeats are answered again")
                failing = False
            except grpc.aio.AioRpcError as e:
                # Warn once per outage; the stream loop warns on every attempt.
                if not failing:
                    log.warning(
                        "heartbeat failed; held leases end locally unless renewed soon code=%s error=%r",
                        e.code().name, e.details(),
                    )
                failing = True
            await asyncio.sleep(max(0.0, sent_at + self.heartbeat_interval_s - time.monotonic()))

    async def expire_forever(self):
        await self.welcomed.wait()
        while True:
            now = time.monotonic()
            for lease in self.leases.values():
                if lease.ended is None and lease.locally_expired(now):
                    lease.ended = "expired"
                    lease.cancel.set()
                    log.warning("lease not renewed in time; canceling its handler task_id=%d attempt=%d", *lease.key)
            await asyncio.sleep(min(max(self.heartbeat_interval_s / 4, 0.01), 1.0))

    # --- one task -------------------------------------------------------------

    async def execute(self, ctx: TaskContext):
        lease = ctx.lease
        # The slot is held until the report is done: the coordinator counts
        # the lease as live until it records the report.
        acquire = asyncio.ensure_future(self.slots.acquire())
        canceled = asyncio.ensure_future(lease.cancel.wait())
        await asyncio.wait({acquire, canceled}, return_when=asyncio.FIRST_COMPLETED)
        canceled.cancel()
        got_slot = acquire.done() and not acquire.cancelled()
        if not got_slot:
            acquire.cancel()
        try:
            handler = HANDLERS.get(ctx.kind)
            if handler is None:
                outcome = TaskError(f"worker {self.args.worker_id} has no handler for kind {ctx.kind!r}", True)
            elif not got_slot:
                outcome = TaskError("canceled before it started", True)
            else:
                outcome = await run_guarded(handler, ctx)
            if isinstance(outcome, TaskError):
                log.warning("task failed task_id=%d attempt=%d error=%r retryable=%s", *lease.key, outcome.message, outcome.retryable)
            else:
                log.info("task succeeded task_id=%d attempt=%d", *lease.key)
            await self.report(lease, outcome)
        finally:
            self.leases.pop(lease.key, None)
            if got_slot:
                self.slots.release()

    async def report(self, lease: Lease, outcome):
        backoff = Backoff()
        while True:
            why = lease.gone(time.monotonic())
            if why:
                log.warning("lease no longer held; dropping the report task_id=%d attempt=%d why=%r", *lease.key, why)
                return
            try:
                if isinstance(outcome, TaskError):
                    failure = pb.worker.Failure(
                        lease=lease.token, error=outcome.message, retryable=outcome.retryable, lease_secret=lease.secret
                    )
                    call = self.stub.Fail(pb.worker.FailRequest(worker_id=self.args.worker_id, failures=[failure]),
                                          metadata=metadata(self.args), timeout=REPORT_TIMEOUT_S)
                else:
                    output = struct_pb2.Struct()
                    output.update(outcome)
                    completion = pb.worker.Completion(lease=lease.token, output=output, lease_secret=lease.secret)
                    call = self.stub.Complete(pb.worker.CompleteRequest(worker_id=self.args.worker_id, completions=[completion]),
                                              metadata=metadata(self.args), timeout=REPORT_TIMEOUT_S)
                response = await call
                result = response.results[0] if response.results else None
                if result is None or result.accepted:
                    log.debug("report accepted task_id=%d attempt=%d duplicate=%s", *lease.key, bool(result and result.duplicate))
                    return
                log.warning("report rejected; the lease was lost task_id=%d attempt=%d code=%d error=%r",
                            *lease.key, result.code, result.message)
                return
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT and not isinstance(outcome, TaskError):
                    # The output itself is unacceptable: fail the task with the
                    # coordinator's explanation rather than let the lease expire.
                    log.error("the coordinator rejected the task's output; reporting a fatal failure error=%r", e.details())
                    outcome = TaskError(f"the coordinator rejected the task's output: {e.details()}", False)
                    backoff.reset()
                    continue
                if e.code() in REJECTED:
                    log.warning("report rejected; the lease was lost task_id=%d attempt=%d code=%s error=%r",
                                *lease.key, e.code().name, e.details())
                    return
                delay = backoff.next_delay()
                log.warning("could not report the outcome; retrying task_id=%d attempt=%d code=%s retry_in_ms=%d",
                            *lease.key, e.code().name, delay * 1000)
                await asyncio.sleep(delay)

    # --- the whole run --------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        log.info("worker starting worker_id=%s coordinator=%s slots=%d kinds=%s",
                 self.args.worker_id, self.args.coordinator, self.args.slots, ",".join(sorted(HANDLERS)))
        loops = [asyncio.create_task(self.heartbeat_forever()), asyncio.create_task(self.expire_forever())]
        stream = asyncio.create_task(self.subscribe_forever())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({stream, stopping}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if stream.done():
            e = stream.exception()
            if isinstance(e, grpc.aio.AioRpcError):
                log.error("the coordinator refused this worker code=%s error=%r", e.code().name, e.details())
            else:
                log.error("the Subscribe loop stopped", exc_info=e)
            code = 1
        # Closing the stream tells the coordinator to give this worker no more work.
        stream.cancel()
        stopping.cancel()
        await self.drain()
        for loop in loops:
            loop.cancel()
        log.info("worker stopped worker_id=%s", self.args.worker_id)
        return code

    async def drain(self):
        if not self.tasks:
            return
        log.info("shutting down: finishing in-flight tasks in_flight=%d drain_timeout_s=%s", len(self.tasks), self.args.drain_timeout)
        _, pending = await asyncio.wait(set(self.tasks), timeout=self.args.drain_timeout)
        if not pending:
            log.info("every in-flight task finished")
            return
        log.warning("drain bound passed; canceling the remaining tasks remaining=%d", len(pending))
        for lease in self.leases.values():
            lease.cancel.set()
        _, pending = await asyncio.wait(pending, timeout=HAND_BACK_GRACE_S)
        if pending:
            log.warning("tasks did not stop; abandoning them (their leases expire on the coordinator) abandoned=%d", len(pending))
            for task in pending:
                task.cancel()


async def run_guarded(handler, ctx: TaskContext):
    """Runs a handler: its dict output, or a TaskError (an exception becomes
    a retryable one; a handler still running CANCEL_GRACE_S after being
    canceled is abandoned)."""
    job = asyncio.ensure_future(handler(ctx))

    async def overdue():
        await ctx.cancelled.wait()
        await asyncio.sleep(CANCEL_GRACE_S)

    late = asyncio.ensure_future(overdue())
    await asyncio.wait({job, late}, return_when=asyncio.FIRST_COMPLETED)
    late.cancel()
    if not job.done():
        job.cancel()
        return TaskError(f"handler did not stop within {CANCEL_GRACE_S}s of being canceled", True)
    try:
        return job.result()
    except TaskError as e:
        return e
    except Exception as e:  # a buggy handler, like a panic in Rust
        return TaskError(f"handler raised {type(e).__name__}: {e}", True)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_connection_flags(parser)
    parser.add_argument("--worker-id", default=f"{socket.gethostname()}-{os.getpid()}-py",
                        help="stable id, unique in the fleet, 1-200 characters (default HOST-PID-py)")
    parser.add_argument("--name", default=socket.gethostname(), help="free text shown to operators (default: the host name)")
    parser.add_argument("--slots", type=int, default=4, help="tasks run at once, 1-10000 (default %(default)s)")
    parser.add_argument("--drain-timeout", type=float, default=30, metavar="SECONDS",
                        help="on SIGTERM, how long running tasks may take to finish before they are canceled (default %(default)s)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args()
    check_connection_flags(parser, args)
    if not 1 <= len(args.worker_id) <= 200:
        parser.error(f"--worker-id: 1-200 characters, got {len(args.worker_id)}")
    if not 1 <= args.slots <= 10000:
        parser.error(f"--slots: between 1 and 10000, got {args.slots}")
    if args.drain_timeout < 0:
        parser.error(f"--drain-timeout: not negative, got {args.drain_timeout}")
    return args


async def main_async(args) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with open_channel(args) as channel:
        return await Worker(args, channel).run(stop)


def main() -> int:
    args = parse_args()
    logging.basicConfig(stream=sys.stderr, level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
