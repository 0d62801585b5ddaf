import re
from pathlib import Path

from setuptools import find_packages, setup

# One version, in megamor/__init__.py (CHANGELOG.md's newest release; checked by a test).
VERSION = re.search(r'__version__ = "([^"]+)"', Path(__file__).with_name("megamor").joinpath("__init__.py").read_text()).group(1)

setup(
    name="megamor",
    version=VERSION,
    license="MIT",
    description="Pretraining and evaluation of Mixture-of-Recursions language models",
    packages=find_packages(include=["megamor", "megamor.*"]),
    python_requires=">=3.10",
    classifiers=["License :: OSI Approved :: MIT License", "Programming Language :: Python :: 3"],
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "datasets>=2.19",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",  # Hugging Face tokenizer.json (megamor.data.tokenizer): encode_batch_fast
        "wandb>=0.17",
        "omegaconf>=2.3",
        "pyyaml",  # megamor.config reads YAML itself to reject empty and non-mapping files
        "numpy",
        "tqdm",
        "rich",
        "zstandard",
        "xxhash",  # checkpoint content hashes (megamor.runs.integrity)
        "pyarrow",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest", "pytest-xdist", "transformers", "lm-eval>=0.4", "accelerate", "ruff", "tensorboard",
                "nbclient", "nbformat", "ipykernel"],  # nbclient etc.: tests/test_notebook.py runs notebooks/
        # lm-eval (our `megamor` model, and its `hf` model on an export: accelerate), AutoTokenizer on exports
        "eval": ["transformers", "lm-eval>=0.4", "accelerate"],
        "gpu": ["flash-attn"],
        "tensorboard": ["tensorboard"],  # logging.tensorboard: true
    },
)
