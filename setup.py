"""Build glue that pyproject.toml cannot express: ship the repository's top-level ``conf/`` as ``proscale/conf``.

Metadata and dependencies are in pyproject.toml. ``conf/`` stays at the top of the repository (where users edit
it); in a wheel it becomes the data folder ``proscale/conf``, which ``proscale.cli`` reads when the package is
installed (a checkout or an editable install reads ``conf/`` itself). Each config folder is declared as a
package so that setuptools copies its YAML files as package data.
"""

from pathlib import Path

from setuptools import find_packages, setup

CONF = Path(__file__).resolve().parent / "conf"
conf_folders = [CONF, *sorted(p for p in CONF.rglob("*") if p.is_dir())]
conf_packages = [".".join(("proscale", "conf", *folder.relative_to(CONF).parts)) for folder in conf_folders]

setup(
    packages=[*find_packages(include=["proscale", "proscale.*"]), *conf_packages],
    package_dir={"proscale.conf": "conf"},
    package_data={package: ["*.yaml"] for package in conf_packages},
)
