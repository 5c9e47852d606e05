"""The study pipeline: plan (runs, identities, input checks) → runners (sequential, fused,
pool) → record (the one place that writes a result); `sweep` is the study's outline.

Import from the modules themselves (`lora_lab.pipeline.sweep.run_sweep`, …): this file
imports none of them, so the plan and its checks of plain values load without torch.
"""
