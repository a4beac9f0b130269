"""LV-ViT training on token labels from the store (models, data, loss: see issue 4)."""
