"""Library versions, recorded with every run, prepared dataset and export so results can be reproduced."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("torch", "transformers", "tokenizers", "accelerate", "peft", "deepspeed", "pillow", "pydicom")


def library_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    import medvl

    out: dict[str, str | None] = {"medvl": medvl.__version__}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
