#!/usr/bin/env python3
"""Sends a Complete and a Fail for a lease held by another worker, naming
its worker id and lease token but a made-up lease secret, through the
generated Python stubs; prints each answer as one JSON line
{"rpc", "code", "details"} for tests/tests/python_clients.rs to judge.
"""

import argparse
import asyncio
import json
import secrets

import grpc

from connection import add_connection_flags, check_connection_flags, import_stubs, metadata, open_channel

pb = import_stubs()


async def main(args):
    token = pb.common.LeaseToken(task_id=args.task_id, attempt=args.attempt)
    forged = secrets.randbits(64) or 1
    async with open_channel(args) as channel:
        stub = pb.worker_grpc.WorkerServiceStub(channel)
        # One after the other: each call starts as soon as it is made.
        calls = {
            "Complete": lambda: stub.Complete(
                pb.worker.CompleteRequest(
                    worker_id=args.worker_id,
                    completions=[pb.worker.Completion(lease=token, lease_secret=forged)],
                ),
                metadata=metadata(args),
            ),
            "Fail": lambda: stub.Fail(
                pb.worker.FailRequest(
                    worker_id=args.worker_id,
                    failures=[pb.worker.Failure(lease=token, error="forged", retryable=False, lease_secret=forged)],
                ),
                metadata=metadata(args),
            ),
        }
        for rpc, call in calls.items():
            try:
                await call()
                answer = {"rpc": rpc, "code": "OK", "details": ""}
            except grpc.aio.AioRpcError as e:
                answer = {"rpc": rpc, "code": e.code().name, "details": e.details()}
            print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_connection_flags(parser)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--task-id", type=int, required=True)
    parser.add_argument("--attempt", type=int, required=True)
    args = parser.parse_args()
    check_connection_flags(parser, args)
    asyncio.run(main(args))
