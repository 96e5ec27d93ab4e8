"""Build the compiled fan-out module.

Everything declarative lives in pyproject.toml; this file only exists because
the Cython extensions must be cythonized at build time. There is deliberately no
pure-Python fallback: a failed compile must fail the install.
"""

from importlib.metadata import version

from Cython.Build import cythonize
from setuptools import Extension, setup

# _fanout cimports picows' WSTransport: the compiled module is only valid with
# the picows it was built against. Its version is baked in, checked at import.
PICOWS_BUILD_VERSION = version("picows")

extensions = [
    Extension(
        "fastaphlict._fanout",
        ["src/fastaphlict/_fanout.pyx"],
        extra_compile_args=["-O3"],
    ),
    Extension(
        "fastaphlict._history",
        ["src/fastaphlict/_history.pyx"],
        extra_compile_args=["-O3"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compile_time_env={"PICOWS_BUILD_VERSION": PICOWS_BUILD_VERSION},
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
    )
)
