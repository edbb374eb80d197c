"""The shapes model's MODEL_CARD.md, built from its training record and, when measured, its evaluation summary."""

from __future__ import annotations

from .record import chain, setting


def _precision(run: dict) -> str:
    return run.get("precision") or ("bf16 autocast" if "NVIDIA" in run["device"] else "fp32")


def _training_lines(training: dict) -> list[str]:
    stages = chain(training)
    root = stages[0]
    lines = [
        f"- Data: {root['data']}; each run reads the examples after those of the run it continues. Training captions"
        " never use the held-out colour-shape combinations or phrasings.",
        f"- Phase 1 (autoencoder): {root['vae_steps']} steps, batch {root['batch']}, AdamW 1e-3,"
        " MSE + 0.1 L1 + 1e-6 KL.",
    ]
    for k, st in enumerate(stages, 1):
        command = f"python -m diffprobe.worlds.shapes.train --seed {st['seed']}"
        if k == 1:
            command += f" --vae-steps {st['vae_steps']}"
        else:
            command += f" --init RUN{k - 1}/weights --lr {st['lr']} --warmup {st['warmup']} --ema {st['ema_decay']}"
        partial = setting(st, "partial_captions")
        if partial:
            command += f" --partial-captions {partial:g}"
        command += f" --steps {st['unet_steps']} --batch {st['batch']} --out RUN{k}"
        stopped = (f" (run with `--max-minutes {st['max_minutes']}`, which stopped it at step {st['unet_steps']} of"
                   f" {st['unet_steps_requested']})" if st.get("max_minutes") else "")
        captions = (f" Partial captions: {partial:g} of the binding and relation scenes are captioned with one of"
                    " their two shapes only (\"a red circle\" beside an unnamed blue square); the other scenes name"
                    " every shape." if partial else "")
        what = "from scratch" if k == 1 else f"continued from run {k - 1}'s EMA weights"
        lines += [
            f"- Run {k}, phase 2 (UNet + text encoder, {what}): `{command}`{stopped}. {st['unet_steps']} steps, batch"
            f" {st['batch']}, AdamW {st['lr']}, {st['warmup']} warm-up steps, gradient clip 1.0, caption dropout"
            f" {st['caption_dropout']}, EMA {st['ema_decay']} (the run saves the EMA weights).{captions}"
            f" Hardware: {st['device']}, torch {st['torch']}, {_precision(st)};"
            f" {st['seconds_total'] / 60:.1f} minutes.",
        ]
    earlier = ", ".join(f"`loss-run{k}.csv`" for k in range(1, len(stages)))
    lines += ["- Loss curve: `loss.csv`" + (f" (last run; earlier runs: {earlier})." if earlier else "."),
              "- Replay every run above with its recorded settings (into DIR/run1, DIR/run2, ...; finished runs are"
              " kept): `python -m diffprobe.worlds.shapes.train --replay training.json --out DIR`"
              + (" (`--replay shipped` for the shipped model)." if len(stages) > 1 else "."), ""]
    return lines


def model_card(training: dict, evaluation: dict | None = None) -> str:
    """MODEL_CARD.md text from ``training.json`` and, if given, an evaluation summary (see :func:`evaluate`)."""
    p = training["parameters"]
    size_mb = 4 * sum(p.values()) / 1e6
    lines = [
        "# shapes-world text-to-image model", "",
        "A small latent diffusion model in Stable Diffusion's folder layout (`StableDiffusionPipeline`), trained",
        "from scratch on the shapes world (flat circles, squares and triangles in six colours on white).", "",
        "## Use", "",
        "`diffprobe generate --model shapes --prompt \"two red circles\" --seeds 0-7` (or `load_model(\"shapes\")`,",
        "or `StableDiffusionPipeline.from_pretrained(diffprobe.worlds.shapes.weights_dir())`). Captions follow the",
        "grammar in `grammar.py`; words outside it map to `<|unk|>`. Measured below with 25 DDIM steps and CFG 3.5.",
        "Judge images with `diffprobe.judges.make_judge(\"shapes\")`.", "",
        "## Architecture", "",
        f"- 64x64 RGB images; KL autoencoder of factor 2 -> 32x32x4 latents ({p['vae']:,} parameters,"
        f" scaling factor {training['vae_scaling_factor']:.4f}, reconstruction MSE {training['vae_recon_mse']:.5f}"
        " on [-1, 1] pixels).",
        f"- UNet2DConditionModel, channels {tuple(training['configs']['unet']['block_out_channels'])}, cross-attention"
        f" at 16x16, 8x8, 4x4 and the 4x4 mid block ({p['unet']:,} parameters).",
        f"- CLIPTextModel, {training['configs']['text_encoder']['num_hidden_layers']} layers of width"
        f" {training['configs']['text_encoder']['hidden_size']} ({p['text_encoder']:,} parameters), trained from"
        " scratch; word-level tokenizer over the grammar's vocabulary (BOS at position 0, EOS padding, 24 tokens).",
        f"- Scheduler: DDIM with Stable Diffusion's scaled-linear betas (1000 steps), epsilon prediction."
        f" Weights: {size_mb:.1f} MB fp32 safetensors.", "",
        "## Training", "",
        *_training_lines(training),
    ]
    if evaluation:
        s = evaluation["summary"]
        lines += [
            "## Evaluation", "",
            f"Eval split, {evaluation['per_category']} prompts per category ({4 * evaluation['per_category']} images),"
            f" one image per prompt, seed = prompt index (CPU generator), {evaluation['sampler']}, fp32 on"
            f" {evaluation.get('device', 'cpu')},"
            f" {evaluation['steps']} steps, CFG scale {evaluation['cfg_scale']}; judged by the exact shapes judge."
            " 95% Wilson intervals.", "",
            "| category | accuracy | 95% CI | correct / n |", "|---|---|---|---|",
        ]
        keys = ["single", "single/ignoring-size", "count", "binding", "relation", "all"]
        keys += sorted(k for k in s if "/" in k and k not in keys and "ignoring" not in k)
        for k in keys:
            if k in s:
                v = s[k]
                lines.append(f"| {k} | {v['accuracy']:.3f} | [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] |"
                             f" {v['correct']} / {v['n']} |")
        lines += ["", "Reproduce: `python -m diffprobe.worlds.shapes.evaluate"
                  f" --per-category {evaluation['per_category']} --steps {evaluation['steps']}"
                  f" --cfg {evaluation['cfg_scale']} --card DIR`"
                  f" ({evaluation['seconds'] / 60:.0f} minutes here).", ""]
        lines += evaluation.get("notes", [])
    return "\n".join(lines) + "\n"
