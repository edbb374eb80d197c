"""The card of a fine-tuned model: ``README.md`` (model card), ``finetune.json`` (the same, as data) and
``loss.png`` (the loss curve from ``loss.csv``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..training import read_loss_csv


def plot_loss(csv_path: Path, png_path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_loss_csv(csv_path)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("loss (mean over the logging window)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def write_card(folder: Path, card: dict[str, Any]) -> None:
    """``finetune.json``, ``loss.png`` and ``README.md`` into ``folder`` (which already holds ``loss.csv``)."""
    rows = read_loss_csv(folder / "loss.csv")
    card = {**card, "loss_curve": {"first": rows[0]["loss"] if rows else None,
                                   "last": rows[-1]["loss"] if rows else None, "rows": len(rows)}}
    (folder / "finetune.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    base = card["base_model"]["name"]
    plot_loss(folder / "loss.csv", folder / "loss.png", f"{card['kind']} fine-tuning of {Path(base).name}")
    (folder / "README.md").write_text(markdown(card))


def markdown(card: dict[str, Any]) -> str:
    base, data, opts, train = card["base_model"], card["data"], card["options"], card["training"]
    what = {"projections": "attention projections only", "full": "the whole denoiser",
            "lora": "LoRA adapters on attention projections"}[card["kind"]]
    sel = card.get("selection")
    version = (f"revision `{base['revision']}`" if base.get("revision")
               else f"weights sha256 `{base.get('weights_sha256')}`")
    lines = [
        f"# Fine-tuned {Path(base['name']).name} ({what})",
        "",
        f"Base model: `{base['name']}` ({base.get('family')}; {version}).",
        f"Data: {data['images']} images from `{data['folder']}` (sha256 `{data['sha256'][:16]}...`).",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    rows = {
        "trained": what,
        "blocks": ", ".join(sel["blocks"]) if sel else "all",
        "attention": ", ".join(sel["attentions"]) if sel else "all",
        "projections": ", ".join(sel["projections"]) if sel else "all",
        "trainable parameters": f"{card['trainable_parameters']:,} of {card['denoiser_parameters']:,}",
        "LoRA": f"rank {card['lora']['rank']}, alpha {card['lora']['alpha']}" if card.get("lora") else "no",
        "resolution": f"{card['resolution']} px (centre crop: {opts['center_crop']}, random flip: "
                      f"{opts['random_flip']})",
        "prediction target": card["prediction_type"],
        "steps": card["steps"],
        "batch x accumulation x processes": f"{opts['batch']} x {train['accumulation']} x {card['processes']}",
        "learning rate": f"{train['lr']} (constant after {train['warmup']} warm-up steps)",
        "optimizer": f"AdamW, betas {tuple(train['betas'])}, weight decay {train['weight_decay']}, "
                     f"eps {train['eps']}, grad-norm clip {train['max_grad_norm']}",
        "EMA": f"decay {train['ema_decay']}" if train["ema_decay"] is not None else "none",
        "saved weights": card["saved"],
        "mixed precision": card["mixed_precision"],
        "device": card["device"],
        "seed": train["seed"],
    }
    lines += [f"| {k} | {v} |" for k, v in rows.items()]
    curve = card["loss_curve"]
    lines += ["", "## Loss", "", "![loss curve](loss.png)", "",
              f"{curve['rows']} rows in `loss.csv` (mean over {train['log_every']} steps each); first "
              f"{curve['first']}, last {curve['last']}.", "", "## Use", ""]
    if card["kind"] == "lora":
        lines.append(f"`diffprobe generate --model {base['name']} --lora THIS_FOLDER[:SCALE] --prompt ...`")
    else:
        lines.append("`diffprobe generate --model THIS_FOLDER --prompt ...`")
    lines += ["", "Everything above is also in `finetune.json`.", ""]
    return "\n".join(lines)
