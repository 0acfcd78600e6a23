"""Log-probs / entropy over vocab-parallel logits and the policy losses (GPPO, clip, CISPO)."""
