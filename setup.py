"""zipchat: a ChatGPT-style assistant built end to end in pure functional JAX."""
from setuptools import find_packages, setup

setup(
    name="zipchat",
    version="0.1.0",
    description="Tokenizer, pretraining, SFT, RL and inference for chat models in pure functional JAX.",
    python_requires=">=3.10",
    packages=find_packages(include=["core", "core.*", "data", "data.*", "experiments", "experiments.*"]),
    install_requires=[
        "jax>=0.4.35",
        "optax",
        "orbax-checkpoint",
        "etils[epath]",  # core/checkpoint.py (orbax's path type)
        "grain",
        "numpy",
        "ml_dtypes",
        "absl-py",
        "tiktoken",
        "regex",
        "jinja2>=3.1.6",  # Hugging Face chat templates (core/chat.py); older versions have sandbox escapes
        "safetensors",
        "pyarrow",
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        "test": [
            "pytest",
            "hypothesis",
            "scipy",
            "rustbpe",
            "tokenizers",
            "transformers",
            # Pinned exactly: tests call GRPOTrainer._compute_loss, an internal (tests/test_rl.py).
            "trl==1.16.0",
            # Pinned: an unpinned torch pulls gigabytes of CUDA wheels; 2.13.0 is a local CPU build.
            "torch==2.13.0",
        ],
    },
)
