"""PEP 517 build backend: setuptools, building against the torch already installed.

fastmb._C links against libtorch, so it must be compiled with the very torch that will import
it. pip's default build isolation hides the environment's packages from the build, which would
either fail (no torch) or compile against a second, different torch. This backend puts the
installing interpreter's own site-packages back at the end of sys.path, so `pip install .`
works in any environment that already has torch, with or without build isolation.
"""

import sys
import sysconfig

for _path in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]):
    if _path not in sys.path:
        sys.path.append(_path)

from setuptools.build_meta import *  # noqa: E402,F401,F403
