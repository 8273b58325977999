#!/usr/bin/env python3
"""A Stagecoach client in Python: stores a plan, starts a migration of it and
follows it to the end over the WatchMigration stream, printing its events
and each stage's progress.

Exits 0 when the migration succeeded, 1 when it failed or was canceled (or
the coordinator could not be used), 2 for bad flags.

    python client.py --coordinator 127.0.0.1:50051 --token "$TOKEN"
    python client.py --plan-file plan.json --subject project/42 --parameters '{"dry_run": true}'
"""

import argparse
import asyncio
import json
import sys
import time

import grpc
from google.protobuf import struct_pb2

from connection import add_connection_flags, check_connection_flags, import_stubs, metadata, open_channel

pb = import_stubs()

# Streams that drop (a coordinator restart, a network blip) are resumed
# after the last event seen; these codes are worth that.
RESUMABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
TERMINAL = {
    pb.common.MIGRATION_STATE_SUCCEEDED,
    pb.common.MIGRATION_STATE_FAILED,
    pb.common.MIGRATION_STATE_CANCELED,
}
CALL_TIMEOUT_S = 30


def demo_plan(fan_out: int, sleep_ms: int) -> dict:
    """Used without --plan-file: a stage of `fan_out` noop tasks that run in
    parallel, then one sleep task."""
    return {
        "name": "python-demo",
        "description": "the Python example client's plan: a noop fan-out, then a sleep",
        "stages": [
            {"name": "fan-out", "tasks": [{"kind": "noop", "payload": {"part": i}} for i in range(fan_out)]},
            {"name": "sleep", "tasks": [{"kind": "sleep", "payload": {"ms": sleep_ms}}]},
        ],
    }


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_connection_flags(parser)
    parser.add_argument("--plan-file", metavar="FILE", help="plan as JSON (fields of Plan, snake_case); default: a demo plan")
    parser.add_argument("--fan-out", type=int, default=4, help="noop tasks of the demo plan (default %(default)s)")
    parser.add_argument("--sleep-ms", type=int, default=1000, help="the demo plan's sleep, in ms (default %(default)s)")
    parser.add_argument("--subject", help="what is migrated (default python/demo-<unix time>)")
    parser.add_argument("--parameters", default="{}", metavar="JSON", help="a JSON object handed to every task")
    parser.add_argument("--pool", default="", help="pool whose slots the migration uses (default: 'default')")
    parser.add_argument("--idempotency-key", default="", help="repeating a create with this key returns the same migration")
    parser.add_argument("--timeout", type=float, default=0, metavar="SECONDS", help="give up following after this long (0: never)")
    args = parser.parse_args()
    check_connection_flags(parser, args)
    if args.plan_file:
        try:
            with open(args.plan_file, encoding="utf-8") as f:
                args.plan_json = f.read()
            json.loads(args.plan_json)
        except (OSError, ValueError) as e:
            parser.error(f"--plan-file: cannot read {args.plan_file!r} as JSON: {e}")
    else:
        if not 1 <= args.fan_out <= 1000:
            parser.error(f"--fan-out: between 1 and 1000, got {args.fan_out}")
        if args.sleep_ms < 0:
            parser.error(f"--sleep-ms: not negative, got {args.sleep_ms}")
        args.plan_json = json.dumps(demo_plan(args.fan_out, args.sleep_ms))
    try:
        params = json.loads(args.parameters)
    except ValueError as e:
        parser.error(f"--parameters: not JSON: {e}")
    if not isinstance(params, dict):
        parser.error(f"--parameters: a JSON object such as '{{\"key\": 1}}', got {args.parameters!r}")
    args.parameters = struct_pb2.Struct()
    args.parameters.update(params)
    if args.timeout < 0:
        parser.error(f"--timeout: not negative, got {args.timeout}")
    args.subject = args.subject or f"python/demo-{int(time.time())}"
    return args


def state_name(state: int) -> str:
    return pb.common.MigrationState.Name(state).removeprefix("MIGRATION_STATE_").lower()


def describe_event(e, started: float) -> str:
    parts = [f"{time.monotonic() - started:7.2f}s", pb.migration.EventKind.Name(e.kind).removeprefix("EVENT_KIND_").lower()]
    if e.HasField("stage_index"):
        parts.append(f"stage={e.stage_index}")
    if e.task_id:
        parts.append(f"task={e.task_id}")
    if e.attempt:
        parts.append(f"attempt={e.attempt}")
    if e.worker_id:
        parts.append(f"worker={e.worker_id}")
    if e.message:
        parts.append(repr(e.message))
    return "  ".join(parts)


def describe_stage(s, stages: int) -> str:
    state = pb.common.StageState.Name(s.state).removeprefix("STAGE_STATE_").lower()
    return f"         stage {s.index + 1}/{stages} {s.name:<12} {s.succeeded}/{s.total} done  {s.running} running  {state}"


async def follow(stub, migration_id: int, args, started: float):
    """Prints the migration's events and progress until it is finished;
    returns it then."""
    after = 0
    shown = {}
    while True:
        try:
            stream = stub.WatchMigration(
                pb.migration.WatchMigrationRequest(migration_id=migration_id, after_event_id=after),
                metadata=metadata(args),
            )
            async for msg in stream:
                for e in msg.events:
                    print(describe_event(e, started), flush=True)
                    after = max(after, e.id)
                m = msg.migration
                for s in m.stages:
                    row = (s.state, s.total, s.succeeded, s.failed, s.canceled, s.running)
                    if shown.get(s.index) != row:
                        shown[s.index] = row
                        print(describe_stage(s, len(m.stages)), flush=True)
                if m.state in TERMINAL:
                    return m
            print("the watch stream ended before the migration finished; resuming", file=sys.stderr)
        except grpc.aio.AioRpcError as e:
            if e.code() not in RESUMABLE:
                raise
            print(f"the watch stream broke ({e.code().name}: {e.details()}); resuming", file=sys.stderr)
        await asyncio.sleep(0.5)


async def run(args) -> int:
    started = time.monotonic()
    async with open_channel(args) as channel:
        stub = pb.migration_grpc.MigrationServiceStub(channel)
        put = await stub.PutPlan(
            pb.migration.PutPlanRequest(plan_json=args.plan_json), metadata=metadata(args), timeout=CALL_TIMEOUT_S
        )
        plan = put.plan
        print(f"stored plan {plan.name} v{plan.version} ({len(plan.stages)} stages)", flush=True)
        created = await stub.CreateMigration(
            pb.migration.CreateMigrationRequest(
                plan_name=plan.name,
                subject=args.subject,
                parameters=args.parameters,
                pool=args.pool,
                idempotency_key=args.idempotency_key,
            ),
            metadata=metadata(args),
            timeout=CALL_TIMEOUT_S,
        )
        m = created.migration
        verb = "created" if created.created else "found (same idempotency key)"
        print(f"migration {m.id} {verb} for {m.subject}: plan {m.plan_name} v{m.plan_version}, pool {m.pool}", flush=True)
        following = follow(stub, m.id, args, started)
        m = await (asyncio.wait_for(following, args.timeout) if args.timeout else following)
    took = time.monotonic() - started
    reason = f": {m.reason}" if m.reason else ""
    print(f"migration {m.id} {state_name(m.state)} in {took:.2f}s{reason}", flush=True)
    return 0 if m.state == pb.common.MIGRATION_STATE_SUCCEEDED else 1


def main() -> int:
    args = parse_args()
    try:
        return asyncio.run(run(args))
    except grpc.aio.AioRpcError as e:
        print(f"error: the coordinator at {args.coordinator} answered {e.code().name}: {e.details()}", file=sys.stderr)
    except asyncio.TimeoutError:
        print(f"error: the migration did not finish within --timeout {args.timeout}s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
