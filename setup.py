"""par_jax: Parallelized Autoregressive Visual Generation (PAR) in JAX / Flax NNX."""
import setuptools

setuptools.setup(
    name="par_jax",
    version="0.1.0",
    description="PAR (parallelized autoregressive visual generation) in JAX and Flax NNX",
    packages=setuptools.find_packages(include=["par_jax", "par_jax.*"]),
    # The CPU attention kernel's source: compiled on first use (par_jax/sampling/cpu_attention.py).
    package_data={"par_jax.sampling": ["*.cc"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.8",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "tensorflow-datasets",
        "grain",
        "array-record",
        "ml-collections",
        "clu",
        # clu.metric_writers needs TensorFlow; the CPU build keeps TF off the accelerators.
        "tensorflow-cpu",
        "tensorboard",
        "safetensors",
        "numpy",
        "pillow",
        # Video files for par_jax.data.video's folder source; imageio-ffmpeg's wheel carries the ffmpeg binary.
        "imageio",
        "imageio-ffmpeg",
        "matplotlib",
        "absl-py",
    ],
    extras_require={
        # Reading released .pt files. Pinned to a CPU build: an unpinned torch pulls GBs of CUDA packages.
        "torch": ["torch==2.13.0"],
        "test": ["pytest", "pytest-xdist"],
    },
)
