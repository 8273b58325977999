"""What client.py and worker.py share: finding the generated stubs, the
flags that say how to reach a coordinator, and the channel built from them.

The stubs are generated from proto/ by generate.sh into ./generated (or
the directory named by $STAGECOACH_PY_STUBS); nothing generated is kept in
the repository, so a changed proto cannot go stale here.
"""

import argparse
import os
import sys
from pathlib import Path

STUBS_ENV = "STAGECOACH_PY_STUBS"
TOKEN_ENV = "STAGECOACH_TOKEN"


def import_stubs():
    """Puts the generated stubs on sys.path and returns the modules
    (common, migration, worker, with their *_grpc companions), or exits
    saying how to generate them."""
    stubs = Path(os.environ.get(STUBS_ENV) or Path(__file__).parent / "generated")
    if not (stubs / "stagecoach" / "v1" / "worker_pb2.py").is_file():
        sys.exit(
            f"no generated stubs in {stubs}: run ./generate.sh first "
            f"(or point ${STUBS_ENV} at the directory it wrote)"
        )
    sys.path.insert(0, str(stubs))
    # Imported late on purpose: the path above must be set first.
    from stagecoach.v1 import common_pb2, migration_pb2, migration_pb2_grpc  # noqa: E402
    from stagecoach.v1 import worker_pb2, worker_pb2_grpc  # noqa: E402

    return argparse.Namespace(
        common=common_pb2,
        migration=migration_pb2,
        migration_grpc=migration_pb2_grpc,
        worker=worker_pb2,
        worker_grpc=worker_pb2_grpc,
    )


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--coordinator",
        default="127.0.0.1:50051",
        metavar="HOST:PORT",
        help="the coordinator's gRPC address (default %(default)s)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"bearer token sent as 'authorization: Bearer TOKEN' (default ${TOKEN_ENV})",
    )
    parser.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="PEM file of the CA that signed the coordinator's certificate; "
        "with it the channel uses TLS",
    )


def check_connection_flags(parser: argparse.ArgumentParser, args) -> None:
    """Refuses bad connection flags with a message naming the flag."""
    host, sep, port = args.coordinator.rpartition(":")
    if "://" in args.coordinator or not sep or not host or not port.isdigit():
        parser.error(
            f"--coordinator: expected HOST:PORT such as 127.0.0.1:50051, got {args.coordinator!r}"
        )
    if args.token is not None and (not args.token.strip() or any(c.isspace() for c in args.token)):
        parser.error(f"--token (or ${TOKEN_ENV}): a token is one word without spaces")
    if args.tls_ca and not Path(args.tls_ca).is_file():
        parser.error(f"--tls-ca: no such file {args.tls_ca!r}")


def metadata(args):
    """The call metadata every request carries."""
    return (("authorization", f"Bearer {args.token}"),) if args.token else ()


def open_channel(args):
    """An asyncio channel to the coordinator, over TLS when --tls-ca is set."""
    import grpc

    if args.tls_ca:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(args.tls_ca).read_bytes())
        return grpc.aio.secure_channel(args.coordinator, credentials)
    return grpc.aio.insecure_channel(args.coordinator)
