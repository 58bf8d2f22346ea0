"""What a user runs to look inside a run: diagnostics, dispatch counts, analysis (README.md here)."""
