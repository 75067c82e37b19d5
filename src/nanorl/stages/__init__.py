"""The pipeline's stages (one module each) and the runner that orders, skips and resumes them."""
