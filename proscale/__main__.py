"""``python -m proscale <app> [overrides]`` and the ``proscale`` console script: run one of the apps.

``python -m proscale --help`` lists the apps; ``python -m proscale <app> --help`` prints that app's help (what it
does, its main options and config groups). Everything after the app name goes to the app unchanged (Hydra
overrides, ``-m``, ``--cfg job``, ...).
"""

from __future__ import annotations

import sys


def usage() -> str:
    """The app list printed for ``--help`` (and for an unknown app)."""
    from proscale.cli import APPS, CONFIG_DIR

    width = max(len(name) for name in APPS)
    lines = [
        "usage: python -m proscale <app> [override ...]   (or: proscale <app> ..., proscale-<app> ...)",
        "",
        "apps:",
        *(f"  {name:<{width}}  {summary}" for name, (_, summary) in APPS.items()),
        "",
        "`python -m proscale <app> --help` describes an app and its main options; every config value can be",
        "overridden (key=value, Hydra syntax), e.g. `python -m proscale train experiment=tiny trainer.max_steps=2`.",
        f"configs: {CONFIG_DIR}",
        "  (PROSCALE_CONFIG_DIR replaces this tree; PROSCALE_CONFIG_PATH=dir1:dir2 adds user config folders)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``argv`` (default: ``sys.argv[1:]``) to an app of :data:`proscale.cli.APPS`."""
    args = sys.argv[1:] if argv is None else list(argv)
    from proscale.cli import APPS

    if not args:
        print(usage(), file=sys.stderr)
        raise SystemExit(2)
    if args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name, rest = args[0], args[1:]
    if name not in APPS:
        print(f"proscale: unknown app {name!r} (choose one of: {', '.join(APPS)})\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        raise SystemExit(2)
    entry_point, _ = APPS[name]
    # Hydra reads the command line from sys.argv; the program name shows in its messages.
    sys.argv = [f"proscale {name}", *rest]
    entry_point()


if __name__ == "__main__":
    main()
