"""jaxvlm: post-training small vision-language models in JAX (SFT and RL with verifiable rewards)."""

from setuptools import find_packages, setup

setup(
    name="jaxvlm",
    version="0.1.0",
    description="JAX/Flax post-training (SFT, GRPO, DyME, Curr-ReFT, CLGRPO, Infi-MMR) for small VLMs",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["jaxvlm", "jaxvlm.*"]),
    python_requires=">=3.11",
    # Ranges that we test at both ends: jax 0.10.2 / flax 0.12.8 (CPU CI, Python 3.11) and jax 0.11.2 (GPU
    # machines, Python 3.12). constraints.txt pins the exact set CI runs.
    install_requires=[
        "jax>=0.10.2,<0.12",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "ml-collections>=1.1.0",
        "transformers>=5.0,<6",
        "tensorflow-datasets>=4.9.10",
        "numpy>=2.0",
        "pillow>=10.0",
        "ml_dtypes>=0.5",
        "absl-py>=2.0",
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
        "matplotlib>=3.8",  # the reward / accuracy curves a run writes (jaxvlm.report)
        "jinja2>=3.1",  # transformers' apply_chat_template (every prompt); not a transformers dependency
        # Scores math answers (jaxvlm.rewards); without it a run with an accuracy reward stops at start-up.
        "math-verify>=0.9.0",
    ],
    extras_require={
        # libtpu compiles for TPU without a TPU (`python -m jaxvlm.bench.memory --topology v5p:2x2x2`): the version
        # `jax[tpu]==0.10.2` pins (a jax 0.11 machine needs its own: `pip install 'jax[tpu]==<its version>'`).
        # The tests compile for a TPU topology too, so the test extra carries it where it has wheels (Linux x86-64;
        # elsewhere those tests fail, naming this extra).
        "tpu": ["libtpu==0.0.42.*"],
        # `python -m jaxvlm.convert_gguf`: transformers reads a GGUF file only with torch, gguf and accelerate.
        "convert": ["torch==2.13.0", "gguf>=0.19.0", "accelerate>=1.15.0"],
        # `python -m jaxvlm.bench.trl_grpo`: TRL's GRPOTrainer next to jaxvlm's. trl is pinned exactly: the parity
        # check calls GRPOTrainer internals (_compute_loss, _get_per_token_logps_and_entropies) read in 1.16.0. Not in
        # the test extra: its one end-to-end test skips without trl, and trl + datasets add 26 s and 270 MB (pyarrow)
        # to an install that has the test extra (measured: pip, no cache, this 2-core machine).
        "bench": ["torch==2.13.0", "trl==1.16.0", "accelerate>=1.15.0", "datasets>=5.2.0", "peft>=0.21.2"],
        # torch is the parity oracle of the tests (and the PyTorch baseline of the benchmarks); gguf and accelerate
        # are there for the converter test; peft for the LoRA adapters' parity (and the baseline's LoRA).
        # ruff: lint and format (ruff.toml; CI runs `ruff check .` and `ruff format --check .`).
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.6",
            "hypothesis>=6.100",
            "torch==2.13.0",
            "gguf>=0.19.0",
            "accelerate>=1.15.0",
            "peft>=0.21.2",  # the LoRA parity oracle: our PEFT adapter directories load into transformers + peft
            "libtpu==0.0.42.*; sys_platform == 'linux' and platform_machine == 'x86_64'",
            "ruff>=0.17",
        ],
    },
)
