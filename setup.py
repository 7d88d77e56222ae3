"""jaxgen: generative models in JAX/Flax (DiT-MoE, ViT-VQGAN/VIM, FlexTok, lexinvariant LM)."""
from setuptools import find_packages, setup

setup(
    name='jaxgen',
    version='0.1.0',
    description='JAX/Flax research codebase for generative models with one sharded training loop.',
    packages=find_packages(include=['jaxgen', 'jaxgen.*']),
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.10',
        'flax>=0.12',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12',
        'chex>=0.1.90',
        'ml_collections>=1.0',
        'grain>=0.2.15',
        'tensorflow-datasets>=4.9.9',
        'tensorboardX>=2.6',
        'sentencepiece>=0.2',
        'importlib_resources',  # TFDS needs it to prepare datasets
        'numpy',
        'pillow',
        'tqdm',
        'absl-py',
    ],
    extras_require={
        'test': ['pytest', 'pytest-xdist', 'scipy'],
        'notebooks': ['nbclient', 'nbformat', 'ipykernel', 'matplotlib'],
    },
    entry_points={'console_scripts': ['jaxgen=jaxgen.main:entry_point']},
)
