"""omnicompile: a torch.compile backend that caches diffusion-transformer blocks.

``passes/``, ``graphs/`` and ``kernels/`` live at the top of the repository (the layout is
part of the design) but install only as ``omnicompile.passes``, ``omnicompile.graphs`` and
``omnicompile.kernels``: ``kernels`` is another PyPI package and the others are too generic.
"""
from setuptools import setup

setup(
    name="omnicompile",
    version="0.1.0",
    description="torch.compile backend that caches diffusion-transformer blocks across denoising steps",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["omnicompile", "omnicompile.cli", "omnicompile.dump", "omnicompile.runtime", "omnicompile.policies",
              "omnicompile.policies.trajectory", "omnicompile.policies.layered",
              "omnicompile.passes", "omnicompile.passes.merge", "omnicompile.graphs", "omnicompile.kernels"],
    package_dir={
        "omnicompile": "omnicompile",
        "omnicompile.passes": "passes",
        "omnicompile.graphs": "graphs",
        "omnicompile.kernels": "kernels",
    },
    package_data={"omnicompile.passes": ["README.md"]},
    install_requires=["torch>=2.11", "triton", "networkx>=3.0", "sympy>=1.12"],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6", "numpy", "diffusers>=0.35", "safetensors", "matplotlib",
                 "scikit-learn", "scikit-image", "tqdm", "transformers"],
        "viz": ["matplotlib"],
        "diffusers": ["diffusers>=0.35", "safetensors", "numpy"],
        "bench": ["diffusers>=0.35", "transformers", "safetensors", "numpy", "tqdm", "matplotlib",
                  "scikit-learn", "scikit-image", "scipy", "cache-dit"],
    },
    entry_points={
        "torch_dynamo_backends": ["omnicache = omnicompile.backend:omnicache_backend"],
        "console_scripts": ["omnicache = omnicompile.cli:main"],
    },
)
