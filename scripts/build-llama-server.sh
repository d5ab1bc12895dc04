#!/usr/bin/env bash
# Build llama.cpp's llama-server once and cache it outside the repository.
# The source comes from the PyPI sdist of llama-cpp-python, which vendors llama.cpp.
# Prints the path of the binary on stdout; everything else goes to stderr.
set -euo pipefail

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
cache="${SWAPPER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/swapper}"
bin="$cache/llama-server-$version/llama-server"

if [[ -x "$bin" ]]; then
    echo "$bin"
    exit 0
fi

mkdir -p "$cache"
work="$(mktemp -d "$cache/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "building llama-server from llama-cpp-python==$version (about 6 minutes on 2 cores)" >&2
python3 -m pip download --quiet --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version" >&2
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$work/build" --target llama-server -j "$(nproc)" >&2

mkdir -p "$(dirname "$bin")"
install -m 0755 "$work/build/bin/llama-server" "$bin.tmp"
mv "$bin.tmp" "$bin"
echo "$bin"
