"""Stand-in ``torchvision.transforms.v2.functional``: imported by transformers, never called on our path."""
