"""Stand-in ``torchvision.transforms.v2`` (imported for its ``functional`` module only)."""
