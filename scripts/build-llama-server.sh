#!/usr/bin/env bash
# Builds llama.cpp's llama-server once, from the llama.cpp sources that the llama-cpp-python
# source package carries (the copy vendored by llama-cpp-sys-2 has no tools/), into a cache
# directory, and prints the binary's path. Used as the reference server: `geek bench http`
# runs against it and geek's remote backend is tried on it.
#   scripts/build-llama-server.sh [VERSION]     (default 0.3.36)
set -euo pipefail
version="${1:-0.3.36}"
cache="${GEEK_LLAMA_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/geek/llama-server-$version}"
bin="$cache/build/bin/llama-server"
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$cache"
if [ ! -d "$cache/src" ]; then
  python3 -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
    "llama-cpp-python==$version" -d "$cache/sdist" >&2 ||
    python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$cache/sdist" >&2
  tar -xzf "$cache"/sdist/llama_cpp_python-*.tar.gz -C "$cache"
  mv "$cache"/llama_cpp_python-*/vendor/llama.cpp "$cache/src"
  rm -rf "$cache"/llama_cpp_python-* "$cache/sdist"
fi
cmake -S "$cache/src" -B "$cache/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >&2
cmake --build "$cache/build" --target llama-server -j "$(nproc)" >&2
echo "$bin"
