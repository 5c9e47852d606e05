"""Parameter accounting: counts for results tables and a readable per-parameter summary."""

from __future__ import annotations

from torch import nn

from lora_lab.lora.layers import LoRALayer


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Count trainable, frozen and total parameters (shared parameters once).

    Args:
        model: Any module.

    Returns:
        {"trainable": int, "frozen": int, "total": int}.
    """
    trainable = frozen = 0
    for param in model.parameters():  # .parameters() already skips shared duplicates
        if param.requires_grad:
            trainable += param.numel()
        else:
            frozen += param.numel()
    return {"trainable": trainable, "frozen": frozen, "total": trainable + frozen}


def full_rank_at(model: nn.Module) -> int | None:
    """The smallest rank at which LoRA is full rank in every adapted layer of `model`.

    A layer's update ΔW is a matrix [out, in] (a conv's [out, in·kh·kw], an embedding's
    [num_embeddings, dim]); a rank-r adapter reaches every ΔW of that layer once
    r ≥ min(out, in·kh·kw). The answer is the largest such minimum over the adapted layers,
    read from their base weights; None when no layer is adapted.
    """
    layers = [m for m in model.modules() if isinstance(m, LoRALayer)]
    weights = [layer.base_layer.weight for layer in layers]
    return max((min(w.shape[0], w[0].numel()) for w in weights), default=None)


def parameter_summary(model: nn.Module) -> str:
    """A table of every parameter: name, shape, trainable/frozen, count; then totals.

    Args:
        model: Any module.

    Returns:
        Multi-line text ending with the totals, the trainable percentage and the size in MB
        (10^6 bytes) of all parameters and of the trainable ones.
    """
    rows = [("name", "shape", "status", "count")]
    total_bytes = trainable_bytes = 0
    for name, param in model.named_parameters():
        status = "trainable" if param.requires_grad else "frozen"
        rows.append((name, str(list(param.shape)), status, f"{param.numel():,}"))
        size = param.numel() * param.element_size()
        total_bytes += size
        trainable_bytes += size if param.requires_grad else 0
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(
            cell.rjust(width) if i == 3 else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    counts = count_parameters(model)
    share = 100.0 * counts["trainable"] / counts["total"] if counts["total"] else 0.0
    lines += [
        "-" * len(lines[0]),
        f"trainable: {counts['trainable']:,} of {counts['total']:,} ({share:.3f}%), "
        f"frozen: {counts['frozen']:,}",
        f"size: {total_bytes / 1e6:.3f} MB total, {trainable_bytes / 1e6:.3f} MB trainable",
    ]
    return "\n".join(lines)
