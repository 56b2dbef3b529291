"""Where the apps read their configs and where runs write by default, in a checkout and in an installed package.

Config tree (the primary config directory of every Hydra app, :data:`proscale.cli.CONFIG_DIR`):

1. ``PROSCALE_CONFIG_DIR``: a complete replacement tree, if set;
2. a checkout (this package sits next to ``pyproject.toml`` and ``conf/``, also in an editable install): the
   repository's ``conf/``;
3. an installed wheel: the copy shipped inside the package (``proscale/conf``, built from ``conf/`` by setup.py).

Extra user config folders (``PROSCALE_CONFIG_PATH``, separated like ``PATH``) are searched *before* that tree, so a
file there adds a choice to a group (``experiment/my_run.yaml``) or replaces the built-in one of the same name
(``local/default.yaml``). Hydra's own ``hydra.searchpath=[file:///dir]`` override also works; those folders come
after the built-in tree (new files only).

Outputs and data (``paths.root_dir``, from ``PROJECT_ROOT``): the repository root in a checkout (``logs/`` and
``data/`` next to ``conf/``), otherwise the current working directory, never the installation folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin

CONFIG_DIR_ENV = "PROSCALE_CONFIG_DIR"
USER_CONFIG_PATH_ENV = "PROSCALE_CONFIG_PATH"
PACKAGE_DIR = Path(__file__).resolve().parent
# The folder above the package: the repository root in a checkout, site-packages (or a --target folder) when installed.
REPO_ROOT = PACKAGE_DIR.parent


def is_checkout(root: Path | None = None) -> bool:
    """True when ``root`` (default: the folder above this package) is a source checkout of the project."""
    root = REPO_ROOT if root is None else root
    return (root / "conf" / "train.yaml").is_file() and (root / "pyproject.toml").is_file()


def config_dir() -> str:
    """The primary config directory: ``$PROSCALE_CONFIG_DIR``, else the checkout's ``conf/``, else the packaged copy."""
    override = os.environ.get(CONFIG_DIR_ENV)
    if override:
        return str(Path(override).expanduser().resolve())
    if is_checkout():
        return str(REPO_ROOT / "conf")
    return str(PACKAGE_DIR / "conf")


def default_project_root() -> Path:
    """Anchor of ``paths.root_dir`` (hence ``logs/`` and ``data/``): the checkout, else the working directory."""
    return REPO_ROOT if is_checkout() else Path.cwd()


def user_config_dirs() -> list[Path]:
    """The folders listed in ``$PROSCALE_CONFIG_PATH`` (absolute; a missing one is a ValueError naming it)."""
    folders = []
    for entry in os.environ.get(USER_CONFIG_PATH_ENV, "").split(os.pathsep):
        if not entry.strip():
            continue
        folder = Path(entry.strip()).expanduser().resolve()
        if not folder.is_dir():
            raise ValueError(f"{USER_CONFIG_PATH_ENV}: config folder {folder} does not exist (from {entry!r})")
        folders.append(folder)
    return folders


class UserConfigSearchPath(SearchPathPlugin):
    """Hydra plugin: put the ``$PROSCALE_CONFIG_PATH`` folders in front of the primary config tree.

    Registered by :mod:`proscale.cli`, so it acts in proscale's apps and in ``compose_config`` only, not in other
    Hydra applications of the same environment.
    """

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for folder in user_config_dirs():
            search_path.prepend(USER_CONFIG_PATH_ENV, f"file://{folder}", anchor=SearchPathQuery(provider="main"))


def register_search_path_plugin() -> None:
    """Make Hydra run :class:`UserConfigSearchPath` (idempotent)."""
    Plugins.instance().register(UserConfigSearchPath)
