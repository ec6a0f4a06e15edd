"""Build hook for the one C extension; everything else is in pyproject.toml.

``fedcore.crypto._montfold`` runs the aggregator's fold and validation loops on OpenSSL
BIGNUMs without the GIL. It is optional: without a C compiler or OpenSSL's headers
(Debian: ``libssl-dev``) the build goes on without it and fedcore folds with gmpy2 in
worker processes instead (see fedcore/crypto/folding.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fedcore.crypto._montfold",
            sources=["fedcore/crypto/_montfold.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)
