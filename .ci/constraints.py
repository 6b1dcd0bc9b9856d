#!/usr/bin/env python
"""Write constraints.txt: the exact version of every package `pip install -e ".[dev]"` pulls
into this environment (the dependency closure of zopro-lightning[dev], read from the installed
metadata), as `name==version` lines; the package itself and torch are left out (.ci/run
installs the CPU build of torch first, by its own pin). Run it in the environment the test
suite just passed in:

    python .ci/constraints.py            # rewrites constraints.txt at the repository root
    python .ci/constraints.py --check    # exit 1 if constraints.txt differs from this environment
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PACKAGE, EXTRAS = "zopro-lightning", ("dev",)
# ourselves (editable); torch (.ci/run's own pin); pip's own tools, as `pip freeze` leaves them
LEFT_OUT = {"zopro-lightning", "torch", "pip", "setuptools", "wheel"}
HEADER = (
    "# The versions the test suite last passed with (.ci/run installs with -c constraints.txt);\n"
    "# pyproject.toml keeps ranges. Refresh: python .ci/constraints.py (README: Installs).\n"
    "# torch is pinned by .ci/run itself (torch==2.13.0, the CPU build).\n"
)


def required(name: str, extras: tuple[str, ...]) -> list[Requirement]:
    """The requirements of installed distribution ``name`` that apply here with ``extras``."""
    wanted = []
    for line in metadata.requires(name) or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": e}) for e in ("", *extras)):
            wanted.append(requirement)
    return wanted


def closure(name: str, extras: tuple[str, ...]) -> dict[str, str]:
    """``{canonical name: installed version}`` of ``name`` and everything it pulls."""
    versions: dict[str, str] = {}
    seen: set[tuple[str, tuple[str, ...]]] = set()
    stack = [(name, extras)]
    while stack:
        current, current_extras = stack.pop()
        if (current, current_extras) in seen:
            continue
        seen.add((current, current_extras))
        versions[canonicalize_name(current)] = metadata.version(current)
        for requirement in required(current, current_extras):
            stack.append((requirement.name, tuple(sorted(requirement.extras))))
    return versions


def constraints_text() -> str:
    versions = closure(PACKAGE, EXTRAS)
    lines = [f"{n}=={v}" for n, v in sorted(versions.items()) if n not in LEFT_OUT]
    return HEADER + "\n".join(lines) + "\n"


def main() -> int:
    target = ROOT / "constraints.txt"
    text = constraints_text()
    if "--check" in sys.argv[1:]:
        if target.read_text() != text:
            print(f"{target} differs from this environment: run python .ci/constraints.py")
            return 1
        return 0
    target.write_text(text)
    print(f"wrote {target} ({text.count('==')} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
