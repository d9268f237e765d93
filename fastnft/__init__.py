"""fastnft: a fast, tested trainer for DiffusionNFT (arXiv 2509.16117)."""

__version__ = "0.1.0"
