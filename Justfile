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

# ruff (lint and format check) on everything, mypy --strict on swapper/ and plugins/
lint: install
    {{venv}}/bin/ruff check swapper plugins tests scripts
    {{venv}}/bin/ruff format --check swapper plugins tests scripts
    {{venv}}/bin/mypy

# what swapper adds against a real llama-server, beside a byte-relay floor; each target met or not
bench *ARGS: models
    {{py}} scripts/bench.py --llama-server "{{llama}}" --models models {{ARGS}}

# `just bench`, with LiteLLM's proxy (installed once into its own venv in the cache) beside swapper
bench-compare *ARGS: models
    #!/usr/bin/env bash
    set -euo pipefail
    venv="${XDG_CACHE_HOME:-$HOME/.cache}/swapper/litellm-venv"
    if ! test -x "$venv/bin/litellm"; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "litellm[proxy]"
    fi
    {{py}} scripts/bench.py --llama-server "{{llama}}" --models models --litellm "$venv/bin/litellm" {{ARGS}}

# on a lent GPU (under 4 min): VRAM-budget eviction and the wait for freed memory, as NVML sees them
gpu-check:
    $(test -x {{py}} && echo {{py}} || echo python3) scripts/gpu_check.py

# the cp312 manylinux wheels a lent GPU's image lacks, into .whl/ (scripts/device_run.sh installs them there)
device-bundle:
    #!/usr/bin/env bash
    set -euo pipefail
    py=$(test -x {{py}} && echo {{py}} || echo python3)
    # The lent machine: CPython 3.12, x86_64 glibc, no network; it has these (and what they need).
    image=(nvidia-ml-py httpx pluggy uvloop rich)
    target=(--quiet --only-binary=:all: --python-version 3.12 --implementation cp
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
            --platform manylinux_2_28_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)
    rm -rf .whl && mkdir .whl
    "$py" -m pip download "${target[@]}" -d .whl "litestar>=2.12" "msgspec>=0.18" "pyyaml>=6" \
        "uvicorn[standard]>=0.30" "prometheus-client>=0.20"
    # Drop what the image already has: its packages and their own dependencies.
    has=$(mktemp -d); trap 'rm -rf "$has"' EXIT
    "$py" -m pip download "${target[@]}" -d "$has" "${image[@]}"
    norm() { basename "$1" | cut -d- -f1 | tr 'A-Z-.' 'a-z__'; }
    for wheel in "$has"/*.whl; do
        name=$(norm "$wheel")
        for ours in .whl/*.whl; do [[ $(norm "$ours") == "$name" ]] && rm -f "$ours"; done
    done
    ls -1 .whl
    size=$(du -sm .whl | cut -f1)
    echo ".whl/: $(ls .whl | wc -l) wheels, ${size} MiB (the device run carries at most 64 MiB with the working tree)"
    (( size <= 48 )) || { echo "too big for the device run"; exit 1; }

# restart the compose service on the server (docker compose or podman-compose)
restart:
    ${COMPOSE:-docker compose} -f compose.yaml restart swapper
