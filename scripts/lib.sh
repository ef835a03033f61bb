# Sourced by the scripts in this folder: repo root as cwd, tools on PATH, quiet helpers.
# shellcheck shell=bash

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# buf's local plugins: tools/ (protoc and grpc_python shims), the venv
# (mypy-protobuf, grpc_tools) and node_modules (protoc-gen-es).
export PATH="$PWD/tools:$PWD/.venv/bin:$PWD/clients/typescript/node_modules/.bin:$PATH"

# say MESSAGE: a progress line on stderr.
say() { echo "--- $*" >&2; }

# quietly COMMAND...: run it with its output hidden, showing the output only if it fails.
quietly() {
  local out
  if ! out=$("$@" 2>&1); then
    echo "$out" >&2
    echo "FAILED: $*" >&2
    return 1
  fi
}
