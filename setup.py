"""Build the compiled fan-out module.

Everything declarative lives in pyproject.toml; this file only exists because
the Cython extensions must be cythonized at build time. There is deliberately no
pure-Python fallback: a failed compile must fail the install.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

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
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
    )
)
