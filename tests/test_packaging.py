"""Every Python package folder under engine/ and export/ is listed in pyproject.toml, so a non-editable install
from a fresh clone ships it (the editable install in a developer's checkout would hide a missing one)."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for name, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *parts)))
    assert found - listed == set(), f"package folders missing from pyproject.toml packages: {sorted(found - listed)}"
