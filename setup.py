"""The one native piece: the int8 scan kernel (``proponent/query/_int8dot.c``), built by pip at install.

Everything else is in pyproject.toml. The extension is optional: where no C compiler is found the
install still succeeds and the scan uses its pure-torch kernel (``proponent.query.kernels`` says which
one runs; ``make setup`` and CI have gcc, and a test checks that the native kernel was built there).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "proponent.query._int8dot",
            ["proponent/query/_int8dot.c"],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wno-unused-function"],
            optional=True,
        )
    ]
)
