"""euphonium_jax: Euphonium (process-reward-guided RL for video flow models) in JAX/Flax NNX."""
import setuptools

setuptools.setup(
    name="euphonium_jax",
    version="0.1.0",
    description=(
        "Post-training text-to-video flow-matching models with process-reward-guided "
        "SDE rollouts and dual-reward GRPO, in JAX/Flax NNX."
    ),
    packages=setuptools.find_packages(include=["euphonium_jax", "euphonium_jax.*"]),
    python_requires=">=3.11",
    # Floors, not exact pins: the floor is what Python 3.11 gets from pip today; the code
    # also runs on the newest releases.
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "chex>=0.1.92",
        "ml-collections>=1.1.0",
        "absl-py>=2.1",
        "numpy>=2.0",
        "transformers>=5.0",
        "tokenizers>=0.22",
        "einops>=0.8",
        "imageio>=2.37",
        "imageio-ffmpeg>=0.6",
        "pillow>=11.0",
        "matplotlib>=3.9",
        "tqdm>=4.66",
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow or PyTorch.
    ],
    extras_require={
        # nbclient, nbformat, ipykernel: tests/test_notebook.py executes the Colab notebook.
        # torch, diffusers, peft: the Wan parity tests compare against the PyTorch reference
        # implementations. torch is pinned exactly: the 2.13.0 CPU build is what pip finds on
        # these machines, and an unpinned torch pulls a multi-GB CUDA build.
        "test": ["pytest>=8.0", "scipy>=1.13", "nbclient>=0.11.0", "nbformat>=5.11.1",
                 "ipykernel>=7.4.0", "torch==2.13.0", "diffusers>=0.42.1", "peft>=0.21.2"],
    },
)
