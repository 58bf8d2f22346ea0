"""The preconditioner work split across ranks and DTensor shards (README.md here)."""
