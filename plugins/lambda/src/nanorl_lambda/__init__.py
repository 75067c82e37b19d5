"""nanorl-plugin-lambda: launch nanorl runs on Lambda Cloud GPUs."""
