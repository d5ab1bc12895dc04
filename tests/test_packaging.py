"""The installed package (the Containerfile's ``pip install .``) holds every module of the tree.

pyproject.toml lists packages explicitly, so a new sub-package that is not listed would work in
the editable checkout the tests run from and be missing from the container image."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_swapper_package_is_listed_in_pyproject() -> None:
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "swapper").rglob("__init__.py")
    }
    assert on_disk, "no package found under swapper/"
    missing = on_disk - listed
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {sorted(missing)}"
