"""Build the compiled modules.

Everything declarative lives in pyproject.toml; this file only exists because
the Cython extensions must be cythonized at build time. There is deliberately no
pure-Python fallback: a failed compile must fail the install.
"""

from importlib.metadata import version

from Cython.Build import cythonize
from setuptools import Extension, setup

# The fan-out modules cimport picows' WSTransport: they are only valid with the
# picows they were built against. Its version is baked in (_wire), checked at import.
PICOWS_BUILD_VERSION = version("picows")

# The fan-out is split by job; the modules share C declarations (.pxd) and
# _fanout re-exports their public names.
MODULES = ["_wire", "_outbox", "_subscriber", "_channel", "_fanout", "_history", "_protocol"]

extensions = [
    Extension(f"fastaphlict.{name}", [f"src/fastaphlict/{name}.pyx"], extra_compile_args=["-O3"])
    for name in MODULES
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
