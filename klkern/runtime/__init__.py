"""What klkern needs from the platform, below everything else: the matmul precision convention,
the torch-or-Triton backend probe and error text (README.md here)."""
