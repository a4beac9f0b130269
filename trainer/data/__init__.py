"""Data: streaming images and token labels from the store."""
