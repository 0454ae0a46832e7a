"""Packaging beyond pyproject.toml: an installed package carries Envoy's files.

`segments run` starts Envoy with the committed configuration, Lua filter and descriptor
set (envoy/) and serves openapi/openapi.json. A checkout reads them where they are; a
built package (wheel) gets copies under segments_service/bundle/, in the same layout
(config.envoy_root), so that `pip install` and `segments run` work without the checkout.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BUNDLED = ("envoy/envoy.json", "envoy/filter.lua", "envoy/segments.pb", "openapi/openapi.json")


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout itself
            return
        bundle = Path(self.build_lib) / "segments_service" / "bundle"
        for name in BUNDLED:
            target = bundle / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / name, target)


setup(cmdclass={"build_py": BuildPy})
