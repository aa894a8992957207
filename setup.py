"""Package discovery for setuptools (everything else is in pyproject.toml).

The browser side lives in the repository's top-level web/ folder (node tests, npm lock file, pages,
driver); the distribution installs its assets as the package ``edgesmith_web`` so that a wheel
install has them too (toolchain/core/webassets.py finds them, in a clone and in site-packages alike).
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["toolchain*", "exporters*", "runtimes*"]) + ["edgesmith_web"],
    package_dir={"edgesmith_web": "web"},
)
