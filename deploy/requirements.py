"""The pinned requirements of an image, read from the project's own `pyproject.toml`.

Why a script of its own: both images install their dependencies in a layer *before* the project's
source (a source change then rebuilds one small layer, not torch and vLLM), and both must take the
versions from the one list in `pyproject.toml`. The Dockerfile runs it with the image's extras
(`python deploy/requirements.py vllm > requirements.txt`), the Modal images import it. It needs the
standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Iterable
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def requirements(pyproject: Path, extras: Iterable[str]) -> list[str]:
    """The project's dependencies, then each extra's, in the file's order, without repeats."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    wanted: list[str] = list(project["dependencies"])
    for extra in extras:
        if extra not in optional:
            raise ValueError(f"{pyproject}: no extra {extra!r} (there are: {', '.join(sorted(optional))})")
        wanted += optional[extra]
    return list(dict.fromkeys(wanted))


def package_name(requirement: str) -> str:
    """`torch==2.13.0` -> `torch` (the name before any version, extra or marker)."""
    for i, char in enumerate(requirement):
        if not (char.isalnum() or char in "-_."):
            return requirement[:i].strip().lower()
    return requirement.strip().lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("extras", nargs="*", help="extras of pyproject.toml to add (e.g. vllm, train)")
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT)
    parser.add_argument("--only", metavar="NAME", help="print only this package's pin (e.g. torch, installed first)")
    args = parser.parse_args()
    pins = requirements(args.pyproject, args.extras)
    if args.only:
        pins = [pin for pin in pins if package_name(pin) == args.only]
        if not pins:
            raise SystemExit(f"{args.pyproject}: {args.only} is not pinned")
    print("\n".join(pins))


if __name__ == "__main__":
    main()
