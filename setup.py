"""Only what pyproject.toml cannot say: the data folders at the repository root are
installed inside the qtool package, so a wheel (``pip install .``) holds everything qtool
reads at run time, and an editable install finds them where they are.

- ``calib_data/`` -> ``qtool/calib_data`` (the bundled calibration text, read by
  ``qtool.calib.bundled_calib_dir``);
- ``schemas/`` -> ``qtool/schemas`` (the JSON schema of ``--json`` output).
"""

from setuptools import find_packages, setup

DATA_PACKAGES = {"qtool.calib_data": "calib_data", "qtool.schemas": "schemas"}

setup(packages=[*find_packages("src"), *DATA_PACKAGES], package_dir={"": "src", **DATA_PACKAGES})
