# swapper tasks. Prerequisites: Python >= 3.11 and `pip install rust-just`.
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
py := venv / "bin/python"
# llama-server: $SWAPPER_LLAMA_SERVER, else built once from llama-cpp-python's sdist and cached
llama := "${SWAPPER_LLAMA_SERVER:-$(scripts/build-llama-server.sh)}"

default:
    @just --list

# create .venv and install swapper with its test extras
install:
    test -x {{py}} || python3 -m venv {{venv}}
    {{py}} -m pip install --quiet --disable-pip-version-check -e '.[test]'
    # the example third-party backend plugin the tests use
    {{py}} -m pip install --quiet --disable-pip-version-check --no-deps -e tests/plugins/swapper-example-backend

# build (once) and print the cached llama-server binary
llama-server:
    @scripts/build-llama-server.sh

# generate the tiny demo models into models/
models: install
    {{py}} scripts/tiny_gguf.py models

# serve config/demo.yaml on this machine with real llama-server backends
demo: models
    SWAPPER_LLAMA_SERVER="{{llama}}" {{venv}}/bin/swapper serve --config config/demo.yaml

# Debian's Chromium, which the dashboard tests drive (installed once, with apt-get)
browser:
    #!/usr/bin/env bash
    set -euo pipefail
    command -v chromium >/dev/null && exit 0
    sudo=""; [[ $(id -u) == 0 ]] || sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium

# run the whole test suite (unit and integration, on a real llama-server)
test *ARGS: install browser
    SWAPPER_LLAMA_SERVER="{{llama}}" {{py}} -m pytest {{ARGS}}

# added latency (p50/p99) and swap overhead against a real llama-server
bench: models
    {{py}} scripts/bench.py --llama-server "{{llama}}" --models models

# on a lent GPU (under 4 min): VRAM-budget eviction and the wait for freed memory, as NVML sees them
gpu-check:
    $(test -x {{py}} && echo {{py}} || echo python3) scripts/gpu_check.py

# restart the compose service on the server (docker compose or podman-compose)
restart:
    ${COMPOSE:-docker compose} -f compose.yaml restart swapper
