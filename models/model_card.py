"""The README.md model card of an exported model or PEFT directory, rendered from lora_vlm.json.

Written for someone who finds the directory without the project: what it is, how to load and
prompt it with plain transformers (or PEFT), what was merged (file, sha256, settings), how it
scored in training, and with which versions it was made.
"""

from __future__ import annotations

from typing import Any

BLIP2_VQA_PROMPT = "Question: {} Answer:"  # models/tasks.py's; repeated so the card needs no model


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, int | float) else str(value)


def _text_input(info: dict[str, Any]) -> tuple[str, str]:
    """(the processor's text= argument in the snippet, the sentence explaining it)."""
    if info["task"] == "vqa":
        if info["architecture"].startswith("Blip2"):
            return (f'text="{BLIP2_VQA_PROMPT.format("how many dogs are there?")}"',
                    f"Ask in the prompt format it was trained with: `{BLIP2_VQA_PROMPT}`.")
        return 'text="how many dogs are there?"', "Pass the question as `text=`."
    if info["prompt"]:
        return (f"text={info['prompt']!r}",
                f"It was trained with the caption prompt `{info['prompt']!r}`: pass it as "
                "`text=` as above (without it captions come out differently); the decoded text "
                "starts with the prompt.")
    return "", "It was trained without a prompt: pass the image only."


def _use_merged(info: dict[str, Any], where: str) -> str:
    arch = info["architecture"]
    text, explain = _text_input(info)
    args = f"images=image, {text}, " if text else "images=image, "
    code = (f'from PIL import Image\nfrom transformers import AutoProcessor, {arch}\n\n'
            f'model = {arch}.from_pretrained("{where}")\n'
            f'processor = AutoProcessor.from_pretrained("{where}")\n'
            'image = Image.open("photo.jpg").convert("RGB")\n'
            f'inputs = processor({args}return_tensors="pt")\n'
            "out = model.generate(**inputs, max_new_tokens=30)\n"
            "print(processor.decode(out[0], skip_special_tokens=True))")
    flag = ' --question "how many dogs are there?"' if info["task"] == "vqa" else ""
    text = (f"## Use\n\n```python\n{code}\n```\n\n{explain}\n\nWith lora-vlm, which reads the "
            f"task and prompt from `lora_vlm.json`: `python infer.py photo.jpg --model {where}"
            f"{flag}`.\n")
    if arch == "BlipForQuestionAnswering":
        text += ("\nIn transformers 5.23 and 5.24 `BlipForQuestionAnswering` lets the answer "
                 "decoder attend to question padding, so in a batch of questions of different "
                 "lengths an answer can depend on its neighbours: ask one question per call "
                 "(lora-vlm's `infer.py` restores the mask).\n")
    return text


def _use_peft(info: dict[str, Any], where: str) -> str:
    arch, base = info["architecture"], info["base_model"]
    code = (f"from peft import PeftModel\nfrom transformers import AutoProcessor, {arch}\n\n"
            f'base = {arch}.from_pretrained("{base}")\n'
            f'model = PeftModel.from_pretrained(base, "{where}")\n'
            f'processor = AutoProcessor.from_pretrained("{base}")')
    _, explain = _text_input(info)
    return (f"## Use\n\nWith PEFT:\n\n```python\n{code}\n```\n\n{explain}\n\nWith lora-vlm (no "
            f"peft needed; task and prompt come from `lora_vlm.json`): `python infer.py "
            f"photo.jpg --adapter {where}`.\n")


def _settings(a: dict[str, Any]) -> list[str]:
    scale = a["alpha"] / (a["r"] ** 0.5 if a["rslora"] else a["r"])
    targets = a["targets"]
    shown = ", ".join(targets) if len(targets) <= 8 else f"{len(targets)} module paths"
    own = len(a["own_r_alpha"])
    lines = [
        f"- sha256 of `{a['weights']}`: `{a['sha256']}`",
        f"- r {a['r']}, alpha {a['alpha']:g} (scale {scale:g}{', rsLoRA' if a['rslora'] else ''})"
        f", dropout {a['dropout']:g} (training only)"
        + (f"; {own} module{'s have their' if own > 1 else ' has its'} own r/alpha "
           "(`own_r_alpha` in lora_vlm.json)" if own else ""),
        f"- targets: {shown} ({a['modules']} Linear modules, {a['parameters']:,} parameters)",
        f"- task: {a['task'] or 'not recorded'}; prompt: "
        + (f"`{a['prompt']!r}`" if a["prompt"] else "none"),
    ]
    if a["trained_on_quantization"] not in (None, "none"):
        lines.append(f"- trained on a {a['trained_on_quantization']}-quantized base")
    if a["trained_with"]:
        lines.append("- trained with " + ", ".join(f"{k} {v}" for k, v in
                                                   a["trained_with"].items()))
    return lines


def _evaluation(a: dict[str, Any]) -> list[str]:
    if not a["eval"]:
        return ["- evaluation: none recorded (no train.py `eval.json` beside the adapter file)"]
    where = f" on `{a['eval_file']}`" if a["eval_file"] else ""
    lines = [f"- exact match{where}, as train.py measured this adapter file (`eval.json` beside "
             "it):"]
    for who, scores in a["eval"].items():
        label = "base model (adapters off)" if who == "base" else f"with the {who}"
        values = (", ".join(f"{k} {_pct(v)}" for k, v in scores.items())
                  if isinstance(scores, dict) else _pct(scores))
        lines.append(f"  - {label}: {values}")
    return lines


def _adapters(info: dict[str, Any]) -> str:
    parts = ["## Adapters\n"]
    for i, a in enumerate(info["adapters"], 1):
        parts.append(f"### {i}. `{a['source']}`\n")
        parts.append("\n".join(_settings(a) + _evaluation(a)) + "\n")
    return "\n".join(parts)


def _header(info: dict[str, Any]) -> str:
    base, n = info["base_model"], len(info["adapters"])
    if info["kind"] == "peft":
        return (f"# LoRA adapter for `{base}` (PEFT format)\n\nA LoRA adapter for the "
                f"{info['task']} task in PEFT's directory layout (`adapter_config.json` + "
                f"`adapter_model.safetensors`), exported by lora-vlm's `export.py` on "
                f"{info['exported_at']}. It needs the base model `{base}`.\n")
    plural = "s" if n > 1 else ""
    same = ("in fp32 it gives the logits of the base with the adapter hooked on to within 1e-5 "
            "(tested on tiny models)" if not info.get("quantization") else
            "its NF4 weights need bitsandbytes (see Quantization)")
    return (f"# `{base}` with {n} LoRA adapter{plural} merged\n\nA standalone "
            f"`{info['architecture']}` checkpoint for the {info['task']} task: `{base}` with the "
            f"LoRA adapter{plural} below added into its weights (W + scale·B·A, computed in "
            f"fp32, saved as {info['dtype']}), exported by lora-vlm's `export.py` on "
            f"{info['exported_at']}. It loads with plain transformers, no lora-vlm or peft "
            f"needed; {same}.\n")


def _quantization(q: dict[str, Any], dtype: str) -> str:
    kept = q["full_precision_linears"]
    shown = ", ".join(f"`{k}`" for k in kept[:4]) + (", ..." if len(kept) > 4 else "")
    return (
        f"## Quantization\n\n- {q['nf4_linears']} Linear weights are stored as {q['method']}"
        ": bit for bit the weights `infer.py --merge --quantize nf4 --no-double-quant` computes "
        "with.\n"
        f"- {len(kept)} Linear weight{'s stay' if len(kept) != 1 else ' stays'} in {dtype}"
        + (f" ({shown})" if kept else "") + ": tied to another weight, the LM head, kept in full "
        "precision by transformers (BLIP-2's Q-Former), or of a width bitsandbytes' CPU kernels "
        "cannot take (in_features not a multiple of 64, out_features not of 32).\n"
        "- Loading needs `pip install bitsandbytes accelerate`; transformers reads "
        "`quantization_config` from `config.json` (also for `infer.py --model`).\n"
        "- Checked on CPU with bitsandbytes 0.50.2: with its generic kernel the reloaded model "
        "gives lora-vlm's NF4 logits to within 1e-5; on CPUs with AVX512-BF16 its default CPU "
        "kernel computes in bf16 (logits about 1e-2 apart on tiny models). Not checked on "
        "CUDA.\n")


def render_card(info: dict[str, Any], where: str = ".") -> str:
    """Markdown model card for export_info's ``info``; ``where`` is the directory's path as
    the snippets should name it."""
    front = (f"---\nlibrary_name: {'peft' if info['kind'] == 'peft' else 'transformers'}\n"
             f"base_model: {info['base_model']}\ntags:\n- lora\n- lora-vlm\n---\n\n")
    use = _use_peft(info, where) if info["kind"] == "peft" else _use_merged(info, where)
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    files = ("`adapter_config.json` and `adapter_model.safetensors` (PEFT)" if info["kind"] ==
             "peft" else "`config.json`, `model.safetensors`, `generation_config.json` and the "
             "processor's files (transformers)")
    provenance = (f"## Provenance\n\n- base model: `{info['base_model']}`\n- exported "
                  f"{info['exported_at']} with {versions}\n- files: {files}; `lora_vlm.json` "
                  "holds everything on this page in machine-readable form\n")
    q = info.get("quantization")
    quantization = [_quantization(q, info["dtype"])] if q else []
    return "\n".join([front + _header(info), use, *quantization, _adapters(info), provenance])
