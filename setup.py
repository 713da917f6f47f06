"""Wheel build hooks: compile the prebuilt cubins with NVRTC and ship them with the templates.

The metadata lives in pyproject.toml; this file only adds the build steps and the
platform tag (the cubins are sm_90a code for x86-64 Linux, not a pure-Python wheel).
"""

import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PLATFORM_TAG = "manylinux_2_28_x86_64"


class BuildWithCubins(build_py):
    def run(self):
        super().run()
        package = ROOT / "gdn_nvrtc" if self.editable_mode else Path(self.build_lib) / "gdn_nvrtc"
        subprocess.run(
            [sys.executable, str(ROOT / "build_cubins.py"), "--out", str(package / "cubins")], check=True
        )
        if not self.editable_mode:
            shutil.copytree(ROOT / "templates", package / "templates", dirs_exist_ok=True)


class BinaryDistribution(Distribution):
    """Cubins are platform code: install into platlib, at the wheel's root."""

    def has_ext_modules(self):
        return True


class PlatformWheel(bdist_wheel):
    def get_tag(self):
        return "py3", "none", PLATFORM_TAG


setup(distclass=BinaryDistribution, cmdclass={"build_py": BuildWithCubins, "bdist_wheel": PlatformWheel})
