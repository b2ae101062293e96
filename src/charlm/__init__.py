"""charlm: train, watch and sample character-level language models with PyTorch Lightning."""
