"""Declares the Cython extensions; everything else lives in pyproject.toml."""

import subprocess

from Cython.Build import cythonize
from setuptools import Extension, setup


def _fuse3_includes() -> list[str]:
    try:
        out = subprocess.run(["pkg-config", "--cflags-only-I", "fuse3"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ["/usr/include/fuse3"]
    return [flag[2:] for flag in out.split() if flag.startswith("-I")]


setup(
    ext_modules=[
        *cythonize(
            [Extension("_native.fastcdc", ["_native/fastcdc.pyx"], extra_compile_args=["-O3"])],
            compiler_directives={"language_level": "3", "boundscheck": False,
                                 "wraparound": False},
        ),
        # plain C: asks the kernel to cache symlinks on the FUSE mount (snapshotter/fuse/kernelcaps)
        Extension("_native.fuseinit", ["_native/fuseinit.c"], include_dirs=_fuse3_includes(),
                  libraries=["dl"]),
    ],
)
