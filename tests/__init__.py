"""lora_lab's tests: a package mirroring lora_lab/ (tiny models, small data; `slow` marker)."""
