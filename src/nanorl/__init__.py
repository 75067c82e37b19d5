"""nanorl: train a small GPT from scratch, then teach it to reason with RL.

Importing this package is cheap (no torch): the heavy modules load inside the commands that need them.
"""

__version__ = "0.1.0"
