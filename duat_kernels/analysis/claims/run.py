"""All sections on one model and text: measure_all(model, tokenizer, text) -> {section: results}."""

from __future__ import annotations

from duat_kernels.analysis.claims import contributions, density, dynamic, layer_terms, lora, multilayer, pruning

SECTIONS = ("density", "dynamic", "pruning", "lora", "multilayer", "contributions")


def measure_all(model, tokenizer, text: str, sections=SECTIONS, lora_rank: int = lora.RANK,
                progress: bool = True) -> tuple[dict, dict]:
    """(results keyed by section, facts about the run: tokens, sizes). The text is encoded as one sequence.
    progress: the tqdm bars of the density and dynamic sections."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"sections must be among {', '.join(SECTIONS)}, got {', '.join(unknown)}")
    from duat_kernels.models.zoo import check_positions

    inputs, _ = dynamic.prompted_inputs(tokenizer, text, "")
    check_positions(model, inputs["input_ids"].shape[1], "the text")
    if "dynamic" in sections:  # the passage behind each task prompt is longer
        for prompt in dynamic.PROMPTS:
            longer = dynamic.prompted_inputs(tokenizer, text, prompt)[0]["input_ids"].shape[1]
            check_positions(model, longer, f"the text behind the prompt {prompt!r}")
    terms = layer_terms.collect(model, inputs)
    att = terms[0].attention
    facts = {"tokens": int(inputs["input_ids"].shape[1]),
             "token_strings": tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist()),
             "layers": len(terms), "heads": int(att.attn.shape[1]), "kv_heads": int(att.num_kv_heads),
             "width": int(att.x.shape[-1])}
    results = {}
    if "density" in sections:
        results["density"] = density.measure(terms, progress=progress)
    if "dynamic" in sections:
        results["dynamic"] = dynamic.measure(model, tokenizer, text, base=terms, progress=progress)
    if "pruning" in sections:
        results["pruning"] = pruning.measure(terms)
    if "lora" in sections:
        results["lora"] = lora.measure(model, inputs, rank=lora_rank)
    if "multilayer" in sections:
        results["multilayer"] = multilayer.summarise(multilayer.rebuild(terms))
    if "contributions" in sections:
        results["contributions"] = contributions.measure(terms)
    return results, facts
