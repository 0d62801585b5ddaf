from setuptools import find_packages, setup

setup(
    name="megamor",
    version="0.1.0",
    description="Pretraining and evaluation of Mixture-of-Recursions language models",
    packages=find_packages(include=["megamor", "megamor.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "datasets>=2.19",
        "sentencepiece>=0.2",
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
        "dev": ["pytest", "transformers", "lm-eval>=0.4", "accelerate", "ruff"],
        # lm-eval (our `megamor` model, and its `hf` model on an export: accelerate), AutoTokenizer on exports
        "eval": ["transformers", "lm-eval>=0.4", "accelerate"],
        "gpu": ["flash-attn"],
    },
)
