"""Hand-written attention kernels: FlashAttention-2 in Triton (flash_attention.py) and its plain-PyTorch
tiled reference (flash_reference.py).

Nothing is imported here on purpose: Triton is optional, and its kernels are defined when
``flash_kernels`` is first imported (the CPU interpreter must be switched on before that). Import
``scratchlm.model.kernels.flash_attention`` where it is needed.
"""
