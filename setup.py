"""Packages for setuptools; the metadata is in pyproject.toml.

conf/ (the Hydra config tree) is shipped inside the package as `gptoss_hpc/conf`, so a non-editable
`pip install .` (a container image) has it; a source checkout keeps reading ./conf.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["gptoss_hpc*"]), "gptoss_hpc.conf"],
    package_dir={"gptoss_hpc.conf": "conf"},
    package_data={
        "gptoss_hpc": ["resources/**/*", "data/sample/*"],
        "gptoss_hpc.conf": ["**/*.yaml"],
    },
)
