"""nanorl-plugin-aqua: the AQuA-RAT task (multiple-choice algebra word problems with rationales)."""
