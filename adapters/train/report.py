"""What a run leaves beside its adapter: training_report.json and a PNG of the loss curves.

The report is enough to tell, months later, what was trained on what with which settings, what it
learned (validation loss) and what it cost the base (general-text perplexity, before and after).
"""
from __future__ import annotations

import json
import platform
import resource
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from .datasets import Dataset
from ..eval.evaluate import Comparison
from ..formats.base_fingerprint import TRAINING_REPORT_FILE
from ..general_text import GeneralText
from .config import TrainConfig
from .loop import TrainState

REPORT_FILE = TRAINING_REPORT_FILE
PLOT_FILE = "loss_curves.png"
_LIBRARIES = ("cartridge-lora", "torch", "transformers", "peft", "bitsandbytes", "safetensors", "accelerate")


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def peak_memory(device: torch.device) -> dict[str, int]:
    # ru_maxrss is in KiB on Linux: the process's resident high-water mark, model and data included.
    peak = {"host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        peak["cuda_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        peak["cuda_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return peak


def data_summary(dataset: Dataset) -> dict:
    return {"fingerprint": dataset.fingerprint, "rows_used": dataset.rows_used, "rows_rejected": dataset.rows_rejected,
            "files": [asdict(f) for f in dataset.files],
            "rejected": [asdict(row) for row in dataset.rejected]}


def comparison_summary(comparison: Comparison) -> dict:
    return {"base": asdict(comparison.base), "adapter": asdict(comparison.adapter),
            "perplexity_change": comparison.adapter.perplexity / comparison.base.perplexity - 1}


def general_summary(general: GeneralText, comparison: Comparison) -> dict:
    return {"source": general.source, "fingerprint": general.fingerprint, **comparison_summary(comparison)}


def write_training_report(output: Path, *, config: TrainConfig, base_dir: Path, base_hash: str, train: Dataset,
                          validation: Dataset | None, num_train: int, num_val: int, state: TrainState,
                          kept_step: int, recall: dict | None, continued: dict | None, domain: Comparison, general: GeneralText, general_figures: Comparison, wall_s: float,
                          device: torch.device) -> dict:
    # Step 0 is the base itself: where the validation curve starts.
    val_curve = [(0, domain.base.loss), *state.val_losses]
    report = {
        "base": {"path": str(base_dir), "fingerprint": base_hash,
                 "quantization": "nf4" if config.quantized else "none", "device": str(device)},
        "data": {**data_summary(train), "train_examples": num_train, "validation_examples": num_val,
                 "validation": (data_summary(validation) if validation is not None
                                else f"{config.val_fraction:.0%} of the data rows, chosen by seed {config.seed}")},
        "hyperparameters": config.stored_settings,
        "training": {"steps": state.step, "best_step": state.best_step, "kept_step": kept_step,
                     "kept": "best validation loss" if config.early_stopping_patience else "last step",
                     "stop_reason": state.stop_reason,
                     "tokens_trained": state.tokens_trained, "training_s": state.training_s,
                     "tokens_per_s": state.tokens_trained / state.training_s if state.training_s else None,
                     "wall_time_s": wall_s, "peak_memory": peak_memory(device)},
        "loss_curve": {"train": state.train_losses, "validation": val_curve},
        "final": {"validation_loss": domain.adapter.loss, "validation_perplexity": domain.adapter.perplexity,
                  "train_recall": recall},
        "continued": continued,
        "forgetting": {"domain_validation": comparison_summary(domain),
                       "general_text": general_summary(general, general_figures)},
        "libraries": library_versions(),
    }
    (output / REPORT_FILE).write_text(json.dumps(report, indent=1))
    write_loss_plot(output / PLOT_FILE, state.train_losses, val_curve, kept_step)
    return report


def write_loss_plot(path: Path, train_curve: list[tuple[int, float]], val_curve: list[tuple[int, float]],
                    kept_step: int) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on training hosts
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if train_curve:
        axes.plot(*zip(*train_curve), label="train", alpha=0.6, linewidth=1)
    axes.plot(*zip(*val_curve), label="validation", marker="o", linewidth=2)
    axes.axvline(kept_step, color="grey", linestyle=":", label=f"kept (step {kept_step})")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss per answer token")
    axes.set_title("Training and validation loss (step 0: the base)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
