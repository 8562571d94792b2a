#!/usr/bin/env bash
# Installs what building and running geek needs and is missing (Debian/Ubuntu, as root or
# with sudo): cmake and clang/libclang for llama.cpp and its bindings, pip for fetching the
# default model, a font for report plots, tmux for the terminal UI's end-to-end test, and the
# openai Python client and curl for the server's tests, kiwix-tools and zim-tools for the
# kiwix provider's test. Idempotent: installs nothing when everything is
# there.
set -euo pipefail

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v clang >/dev/null 2>&1 || missing+=(clang)
compgen -G "/usr/lib/llvm-*/lib/libclang*.so*" >/dev/null || missing+=(libclang-dev)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
command -v curl >/dev/null 2>&1 || missing+=(curl)
# kiwix-serve and zimwriterfs: the kiwix provider's test serves a ZIM it builds.
command -v kiwix-serve >/dev/null 2>&1 || missing+=(kiwix-tools)
command -v zimwriterfs >/dev/null 2>&1 || missing+=(zim-tools)

if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The official OpenAI client: `geek serve`'s tests talk to the server with it.
if ! python3 -c "import openai" >/dev/null 2>&1; then
  echo "installing the openai Python package" >&2
  python3 -m pip install -q --disable-pip-version-check openai
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install a Rust toolchain (rustup) first" >&2
  exit 1
fi
