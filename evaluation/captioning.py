"""Batched caption generation with a NanoVLM and its processor."""

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def generate_captions(
    model, processor, images, prompts=None, batch_size: int = 32, max_new_tokens: int = 64, progress: bool = False, **generate_kwargs
) -> list[str]:
    """Greedy captions (or continuations of `prompts`, one per image), prompt text included."""
    was_training = model.training
    model.eval()
    captions = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="captioning", disable=not progress):
        batch = images[start : start + batch_size]
        batch_prompts = prompts[start : start + batch_size] if prompts is not None else [""] * len(batch)
        inputs = processor(images=batch, text=batch_prompts).to(model.device)
        generate_kwargs.setdefault("do_sample", False)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
        new = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :])
        captions.extend(p + t for p, t in zip(batch_prompts, new))
    model.train(was_training)
    return captions
