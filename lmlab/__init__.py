"""lmlab: plan and run the training lifecycle of a language model by recipe."""
__version__ = "0.1.0"
