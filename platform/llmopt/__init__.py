"""llmopt: search, fine-tune and serve language models on Ray.

Subpackages: `config` (the run schema and the rules derived from it), `models` (zoo and loading), `data`
(datasets, tokenization, evaluation), `train` (Ray Train + DeepSpeed), `serve` (the generation engine behind
the Serve app), `tune` (the cost model and the strategy search); modules `cluster`, `devices`, `deployment`
and `cli`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
