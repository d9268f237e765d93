"""Fused kernels for DiffusionNFT training, each with the plain-PyTorch reference it is held to.

Depends on torch only; triton (Linux) is imported the first time a Triton kernel runs.
"""

from fastnft_kernels.nft_loss import NFTLossOutput, nft_loss, nft_loss_torch, triton_available

__all__ = ["NFTLossOutput", "nft_loss", "nft_loss_torch", "triton_available"]
__version__ = "0.1.0"
