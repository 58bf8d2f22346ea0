"""What is specific to each algorithm, and the math of a block (README.md here)."""
