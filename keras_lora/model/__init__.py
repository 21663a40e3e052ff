"""Model-level LoRA: the layer walk, target selection, surgery and merge."""
