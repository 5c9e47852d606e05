"""Weight-update spectra and subspace similarity (LoRA paper §7)."""
