"""Write ``constraints.txt``: the exact versions of everything ``pip install -e '.[dev]'`` installed into this venv.

``pyproject.toml`` gives ranges; ``make install`` passes this file to pip (``-c constraints.txt``) so that CI keeps
installing the set it was tested with. Only the project's dependency tree is written (its requirements with all
extras, then theirs, recursively, as the installed distributions declare them), not whatever else the venv holds.

    .venv/bin/python scripts/update_constraints.py            # rewrite constraints.txt
    .venv/bin/python scripts/update_constraints.py --check    # exit 1 when constraints.txt differs
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from proscale.utils.io import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
HEADER = """\
# Exact versions CI installs and tests (`make install`: pip install -c constraints.txt -e '.[dev]').
# pyproject.toml holds the ranges a user's install may take; torch and torchvision are pinned together here
# (see docs/install.md). Regenerate after changing dependencies:
#   .venv/bin/python scripts/update_constraints.py
"""


def project_requirements(pyproject: Path) -> list[Requirement]:
    """The project's dependencies and those of every extra (self-references such as ``proscale[slurm]`` dropped)."""
    import tomllib  # Python 3.11+ (the script is for maintainers; the package itself supports 3.10)

    project = tomllib.loads(pyproject.read_text())["project"]
    name = canonicalize_name(project["name"])
    lines = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        lines.extend(extra)
    return [r for r in map(Requirement, lines) if canonicalize_name(r.name) != name]


def installed_closure(roots: list[Requirement]) -> dict[str, str]:
    """``{name: version}`` of the installed distributions ``roots`` need, recursively (markers evaluated here)."""
    pinned: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    todo = [(r, "") for r in roots]
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(
                f"{requirement.name} (required) is not installed in {sys.prefix}: run make install"
            ) from None
        pinned[name] = dist.version
        for wanted_extra in ["", *sorted(requirement.extras)]:
            if (name, wanted_extra) in seen:
                continue
            seen.add((name, wanted_extra))
            for line in dist.requires or []:
                todo.append((Requirement(line), wanted_extra))
    return pinned


def render(pinned: dict[str, str]) -> str:
    return HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(pinned.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "constraints.txt")
    parser.add_argument("--check", action="store_true", help="compare with --output instead of writing it")
    args = parser.parse_args()
    text = render(installed_closure(project_requirements(ROOT / "pyproject.toml")))
    if args.check:
        current = args.output.read_text() if args.output.is_file() else ""
        if current != text:
            raise SystemExit(f"{args.output} differs from the installed versions: run scripts/update_constraints.py")
        print(f"{args.output}: up to date")
        return
    atomic_write_text(args.output, text)
    print(f"wrote {args.output} ({len(text.splitlines()) - HEADER.count(chr(10))} packages)")


if __name__ == "__main__":
    main()
