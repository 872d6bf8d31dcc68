"""The optional dependencies of `alpamayo-jax serve` (the `serve` extra): checked where they are
first needed, so that the rest of the package, and `alpamayo-jax --help`, never need them."""

from __future__ import annotations

import importlib

INSTALL_HINT = "pip install 'alpamayo-jax[serve]'"

# module -> the distribution that installs it
_DISTRIBUTIONS = {
    "carla_driver_interface": "carla-driver-interface",
    "grpc": "grpcio",
    "fastapi": "fastapi",
    "pydantic": "pydantic",
    "uvicorn": "uvicorn",
}


class MissingServeDependency(ImportError):
    """A module of the `serve` extra is not installed; the message says how to install it."""


def require(*modules: str) -> None:
    """Raises `MissingServeDependency`, naming every missing distribution and the install command,
    unless all of `modules` import."""
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(_DISTRIBUTIONS.get(module, module))
    if missing:
        raise MissingServeDependency(f"alpamayo-jax serve needs {', '.join(missing)}, which is not installed: "
                                     f"{INSTALL_HINT}")
