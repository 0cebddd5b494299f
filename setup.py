"""Build and install crbp_fast.

    pip install --no-build-isolation -e .

``--no-build-isolation`` builds against the torch already installed (an isolated build
environment would fetch another torch).
"""

from setuptools import find_packages, setup

ext_modules: list = []
cmdclass: dict = {}

setup(
    name="crbp_fast",
    version="0.1.0",
    description="Fused kernels and a fixed-point engine for recurrent vision models trained with C-RBP",
    packages=find_packages(include=["crbp_fast", "crbp_fast.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "scipy", "matplotlib", "tqdm"],
    extras_require={"triton": ["triton"], "test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["crbp-fast=crbp_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
