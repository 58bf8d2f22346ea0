"""One optimizer step and the torch.optim surface around it (README.md here)."""
