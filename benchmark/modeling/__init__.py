"""Models and SAEs, the bottom layer: the model registry and loading, SAEs and their math and training, the
tiny stand-ins, offline text sources, and every forward pass (composable residual edits, cached generation)."""
