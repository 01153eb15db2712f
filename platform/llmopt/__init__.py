"""llmopt: search, fine-tune and serve language models on Ray.

Subpackages: `config` (the run schema), `models` (zoo and loading), `data` (datasets, tokenization,
evaluation); training, search, serving and monitoring arrive as their own packages.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
