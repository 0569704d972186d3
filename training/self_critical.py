"""Self-critical sequence training: fine-tune a trained captioner on its own sampled captions, scored by CIDEr-D."""

import logging

import torch

logger = logging.getLogger(__name__)


class WithReferences:
    """The usual batch plus `references`: each image's captions (all of them for COCO-layout rows, else its text),
    the targets self-critical training scores its samples against."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        return {**self.collator(examples), "references": [list(ex.get("references") or [ex["text"]]) for ex in examples]}


class SelfCritical:
    """Self-critical sequence training (Rennie et al. 2017), with the mean reward of the image's other samples as
    each sample's baseline (Luo 2020, "A Better Variant of Self-Critical Sequence Training").

    For each image, sample `num_samples` captions from the model (plain sampling, no beam, no n-gram rule, never
    an `<image>`, `<bos>` or pad token), score each with `reward` (CIDEr-D against the image's captions, document
    frequencies of the training captions), and take the policy-gradient loss
    `-(reward - mean reward of the image's other samples) * log p(token)`, averaged over the sampled tokens (the
    `<eos>` included). Captions that score above their siblings become likelier,
    those below less likely: the model is trained on whole captions of its own, scored by the metric, where the
    caption loss trains the next word after a human's words. With `caption_weight`, the NanoVLMTrainer adds that
    times the caption loss of the batch's human captions (a mixed objective that keeps the model near them).

    With `distinct_weight`, a sample's reward is its score against its own image's captions less that weight
    times its mean score against the captions of up to `num_others` other images of the batch (the next ones,
    cyclically): the metric alone pays a safe caption that fits many photos ("a dog runs through the grass")
    about as well as one that fits this photo only, and plain self-critical training drifts towards the former.
    """

    num_others = 4

    def __init__(self, processor, reward, num_samples: int, max_new_tokens: int, caption_weight: float = 0.0,
                 distinct_weight: float = 0.0):
        if num_samples < 2:
            raise ValueError(f"--self_critical_samples must be 2 or more (each sample's baseline is its siblings' mean), got {num_samples}")
        self.processor, self.reward, self.num_samples, self.max_new_tokens = processor, reward, num_samples, max_new_tokens
        self.caption_weight = caption_weight  # the NanoVLMTrainer adds this times the caption loss
        self.distinct_weight = distinct_weight

    def rewards(self, texts: list[str], references: list[list[str]]) -> tuple[torch.Tensor, float]:
        """(each sample's reward `(B, num_samples)`, the samples' mean score against their own image's captions)
        for `texts`, the samples of image i at `i * num_samples ...`, and `references`, one list per image."""
        k, n = self.num_samples, len(references)
        others = min(self.num_others, n - 1) if self.distinct_weight else 0
        # shift 0 scores each sample against its own image's captions, shift s against those of image i + s
        refs = [references[(i // k + shift) % n] for shift in range(others + 1) for i in range(len(texts))]
        scores = torch.tensor(self.reward(texts * (others + 1), refs), dtype=torch.float32).view(others + 1, -1, k)
        own = scores[0]
        rewards = own - self.distinct_weight * scores[1:].mean(0) if others else own
        return rewards, float(own.mean())

    @torch.no_grad()
    def sample(self, model, pixel_values):
        """(prompt ids `(B, P)`, sampled caption ids `(B * num_samples, L)`, mask of their tokens up to the first
        `<eos>`) from the model in evaluation mode, the samples of one image next to each other."""
        prompt = torch.tensor(self.processor.image_prompt_ids([""] * len(pixel_values)), device=pixel_values.device)
        was_training = model.training
        model.eval()
        tokenizer = self.processor.tokenizer
        never = {self.processor.image_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id} - {tokenizer.eos_token_id, None}
        sequences = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), pixel_values=pixel_values,
                                   do_sample=True, num_beams=1, num_return_sequences=self.num_samples, top_k=0, top_p=1.0,
                                   temperature=1.0, no_repeat_ngram_size=0, suppress_tokens=sorted(never),
                                   max_new_tokens=self.max_new_tokens)
        model.train(was_training)
        new = sequences[:, prompt.shape[1]:]
        is_eos = new == tokenizer.eos_token_id
        keep = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # before or at the first <eos>
        return prompt, new, keep

    def loss(self, model, unwrapped, pixel_values, references):
        """(the loss, the samples' mean CIDEr-D against their own image's captions). `model` takes the gradient
        pass (DDP-wrapped or not), `unwrapped` samples."""
        prompt, new, keep = self.sample(unwrapped, pixel_values)
        k = self.num_samples
        rewards, own = self.rewards(self.processor.batch_decode(new), references)
        rewards = rewards.to(new.device)
        baseline = (rewards.sum(1, keepdim=True) - rewards) / (k - 1)
        advantage = (rewards - baseline).flatten()
        input_ids = torch.cat([prompt.repeat_interleave(k, 0), new], 1)
        logits = model(input_ids=input_ids, pixel_values=pixel_values.repeat_interleave(k, 0),
                       logits_to_keep=new.shape[1] + 1).logits[:, :-1]  # the logits that predict each sampled token
        log_probs = logits.float().log_softmax(-1).gather(-1, new[..., None]).squeeze(-1)
        loss = -(advantage[:, None] * log_probs * keep).sum() / keep.sum().clamp(min=1)
        return loss, own


def self_critical_setup(model_args, training_args, processor, train) -> SelfCritical:
    """The self-critical loss for --self_critical_samples: CIDEr-D with the document frequencies of the
    training images' captions. It fine-tunes a trained captioner, without the training-only losses."""
    if not model_args.model_name_or_path:
        raise ValueError("--self_critical_samples fine-tunes a captioner: pass --model_name_or_path, a model trained with the "
                         "caption loss (its samples must already be captions for their rewards to tell them apart)")
    from evaluation.caption_metrics import CiderD  # pycocoevalcap: only loaded when asked for

    texts = train["text"]
    keys = train["image_id"] if "image_id" in train.column_names else range(len(texts))
    references = train["references"] if "references" in train.column_names else [None] * len(texts)
    corpus = {}
    for key, refs, text in zip(keys, references, texts):  # one reference list per image
        corpus.setdefault(key, refs or [text])
    logger.info("self-critical training: %d samples per image, CIDEr-D reward with the document frequencies of %d training "
                "images' captions; the training-only losses are off", training_args.self_critical_samples, len(corpus))
    return SelfCritical(processor, CiderD(list(corpus.values())), training_args.self_critical_samples,
                        training_args.self_critical_max_new_tokens, training_args.self_critical_caption_weight,
                        training_args.self_critical_distinct_weight)
