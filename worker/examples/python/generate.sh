#!/usr/bin/env bash
# Generates the Python stubs of proto/stagecoach/v1/*.proto into DIR
# (default: ./generated beside this script), with the protoc that grpcio-tools
# ships (it brings google/protobuf/*.proto too, so no system protoc is needed).
#
#   ./generate.sh [DIR]        # PYTHON=path/to/python to pick the interpreter
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
proto="$here/../../../proto"
out="${1:-$here/generated}"
python="${PYTHON:-python3}"
if ! "$python" -c 'import grpc_tools' 2>/dev/null; then
  echo "generate.sh: $python has no grpc_tools; run: $python -m pip install -r $here/requirements.txt" >&2
  exit 1
fi
mkdir -p "$out"
"$python" -m grpc_tools.protoc -I "$proto" --python_out="$out" --grpc_python_out="$out" "$proto"/stagecoach/v1/*.proto
echo "generated the stubs of $(ls "$proto"/stagecoach/v1/*.proto | wc -l) proto files into $out"
