"""Build the small C core (shared-memory ring and robust lock) of mpchan."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mpchan._core",
            sources=["mpchan/_core.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
        )
    ]
)
