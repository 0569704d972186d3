"""Train a NanoVLM with transformers' Trainer, on one CPU, one GPU or many.

    python train.py                                   # mini, built-in short scenes, 2-core CPU, ~15 min
    python train.py --scenes_style long --preset base --max_steps 5000
    python train.py --dataset coco --caption_file ../shared/data/flickr8k/captions_train.json \
        --image_dir ../shared/data/flickr8k/images \
        --validation_caption_file ../shared/data/flickr8k/captions_val.json
    python train.py --dataset hf --data_path DIR_OR_HUB_NAME --image_column image --text_column caption
    python train.py --recipe configuration/recipes/flickr8k/best.json   # real photos from scratch (~90 min here)
    python train.py --recipe configuration/recipes/flickr8k/best.json --max_steps 100   # recipe, then overrides
    python train.py --push_to_hub --hub_model_id ORG/NAME   # then push model, code and model card to the Hub
    accelerate launch --config_file configuration/accelerate/multi_gpu.yaml train.py --preset base
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no train.py                    # two CPU ranks (--num_processes 2 alone starts one: refused)

The output folder holds a model + processor + Hub code loadable with `from_pretrained`,
metrics.json, loss_curve.png and samples.png. Resume with `--resume_from_checkpoint latest` (the newest
complete checkpoint); a folder an earlier run used is refused unless `--overwrite_output_dir true`.
A recipe whose "then" object holds a second stage's flags (e.g. self-critical fine-tuning) trains its
first stage into OUTPUT_DIR/stage-1 and the second, from that model, into OUTPUT_DIR.
"""

import json
import logging
import os
import sys
import time
from dataclasses import asdict

import torch.distributed as dist
import transformers

from evaluation.captioning import generate_captions
from evaluation.grounding import claim_marks, grounding_scores, repetition_scores
from evaluation.image_use import image_gap, unique_caption_share
from evaluation.plots import plot_caption_grid, plot_loss_curve
from processing import data, scenes
from processing.augment import CaptionAugment
from processing.collator import NanoVLMCollator
from processing.photo_groups import group_by_photo
from publishing import push_to_hub
from publishing.model_card import write_model_card
from training.arguments import check_arguments, parse_args
from training.checkpoints import check_fits, prepare_output_dir, resolve_resume
from training.data import build_processor, load_splits
from training.launch import check_launch
from training.model import build_model, caption_length, image_size_of, model_config
from training.objectives import remove_training_heads, with_objectives
from training.recipes import second_stage, train_in_stages
from training.self_critical import WithReferences, self_critical_setup
from training.trainer import CaptionEvaluation, NanoVLMTrainer

logger = logging.getLogger(__name__)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    then = second_stage(argv)
    if then:
        train_in_stages(argv, then, train_once)
    else:
        train_once(*parse_args(argv))


def train_once(model_args, data_args, training_args):
    """One training run: data -> processor -> model -> trainer -> train -> save, model card and report."""
    check_arguments(model_args, data_args, training_args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_launch(training_args)
    transformers.set_seed(training_args.seed)
    hub_repo = push_to_hub.take_over_trainer_push(training_args)  # --push_to_hub: repo checked now, pushed at the end
    started = time.time()
    image_size = image_size_of(model_args)
    bad = data.BadImages()

    # output folder: refuse one an earlier run used, unless resuming or overwriting
    if training_args.process_index == 0:  # other ranks could see the files rank 0 is already writing
        prepare_output_dir(training_args)
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir, training_args.resume_with_fresh_state)
    os.makedirs(training_args.output_dir, exist_ok=True)

    # data and processor (rank 0 first: it trains the tokenizer, the others load what it saved)
    with training_args.main_process_first(desc="data and tokenizer"):
        train, validation = load_splits(data_args, image_size, training_args.seed, bad)
        processor = build_processor(model_args, train["text"], image_size, training_args.output_dir, resume_from=resume)
        if resume:  # before this run writes over the run's processor and arguments.json
            check_fits(resume, model_config(model_args, len(processor.tokenizer)))
        if training_args.process_index == 0:
            processor.save_pretrained(training_args.output_dir)
            with open(os.path.join(training_args.output_dir, "arguments.json"), "w") as f:  # for the model card
                json.dump({"model": asdict(model_args), "data": asdict(data_args), "training": training_args.to_dict()}, f, indent=2)

    # model, with the decoding its evaluations and the saved generation_config use
    model = build_model(model_args, len(processor.tokenizer))
    if model_args.generation_num_beams is not None:
        model.generation_config.num_beams = model_args.generation_num_beams
    if model_args.generation_no_repeat_ngram_size is not None:
        model.generation_config.no_repeat_ngram_size = model_args.generation_no_repeat_ngram_size
    max_length = caption_length(model, model_args.max_length)
    logger.info("%s parameters, %d training / %d validation examples", f"{model.num_parameters():,}", len(train), len(validation))

    # trainer: the caption loss, plus self-critical training or the training-only objectives, and caption evaluations
    max_new_tokens = data_args.max_new_tokens or (110 if data_args.scenes_style == "long" else 48)
    n_eval = max(data_args.num_sample_captions, data_args.eval_metrics_examples if data_args.eval_metrics else 0)
    samples = [validation[i] for i in range(min(n_eval, len(validation)))]
    if data_args.language_only:  # the captions alone: no image is read, decoded or augmented
        train = train.select_columns(["text"])  # (--augment has no image to act on here)
        collator, extra = NanoVLMCollator(processor, max_length, language_only=True), {}
    elif training_args.self_critical_samples:
        collator, extra = WithReferences(NanoVLMCollator(processor, max_length)), {
            "self_critical": self_critical_setup(model_args, training_args, processor, train)}
    else:
        grouped = data_args.captions_per_image > 1  # a photo's captions share one row of pixel_values
        collator, extra = with_objectives(model, data_args, NanoVLMCollator(processor, max_length, share_images=grouped), train["text"])
    caption_eval = CaptionEvaluation(processor, samples, max_new_tokens, os.path.join(training_args.output_dir, "samples.jsonl"),
                                     data_args.eval_metrics, data_args.num_sample_captions)
    if data_args.captions_per_image > 1:  # one pass of the image tower (and one decode, one augmentation) per photo
        train, extra["train_sampler"] = group_by_photo(train, data_args.captions_per_image, training_args.seed, data_args.augment)
    elif data_args.augment and not data_args.language_only:
        train = train.with_transform(CaptionAugment(seed=training_args.seed).transform_batch)
    trainer = NanoVLMTrainer(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=processor,
        caption_eval=caption_eval,
        callbacks=push_to_hub.checkpoint_pusher(training_args, hub_repo),  # --hub_strategy checkpoint: each save to the Hub
        **extra,
    )

    # train, then save the plain captioner, its model card and the report
    trainer.train(resume_from_checkpoint=resume)
    remove_training_heads(model)
    trainer.save_model()
    eval_metrics = trainer.evaluate()  # every rank takes part
    trainer.save_state()  # trainer_state.json: the whole log history (experiments.convergence reads it)
    if trainer.is_world_process_zero():
        metrics = final_report(trainer, processor, validation, data_args, max_new_tokens, bad, started, eval_metrics)
        name = os.path.basename(os.path.abspath(training_args.output_dir))
        write_model_card(training_args.output_dir, hub_repo or training_args.hub_model_id or f"ORG/{name}")  # README.md
        for sample in metrics["samples"][:6]:
            print(f"model: {sample['model']}\ntruth: {sample['truth']}\n")
        keys = ("final.eval_loss", "grounding.object_recall", "grounding.chair_i", "image_use.image_gap", "image_use.unique_caption_share")
        summary = {k: metrics[k] for k in keys if k in metrics}
        print(json.dumps(summary | {"wall_seconds": metrics["wall_seconds"], "output_dir": training_args.output_dir}, indent=2))
        if bad.rows:
            print(f"skipped {len(bad.rows)} unreadable image(s); see metrics.json 'data.skipped_bad_images'")
        if hub_repo:
            push_to_hub.push_after_training(training_args, hub_repo)
    end_processes(trainer)


def end_processes(trainer) -> None:
    """Under a multi-process launch, every rank waits for rank 0's report, then all leave the process group together.
    A rank that exits while the others still use the group can abort in the communication library's teardown
    ("terminate called without an active exception", exit code -6), which fails the whole launch after a good run."""
    if dist.is_available() and dist.is_initialized():
        trainer.accelerator.wait_for_everyone()
        dist.destroy_process_group()


def final_report(trainer, processor, validation, data_args, max_new_tokens, bad, started, eval_metrics) -> dict:
    """Caption validation images; grounding for scenes; metrics.json, loss_curve.png, samples.png."""
    out = trainer.args.output_dir
    metrics = {f"final.{k}": v for k, v in eval_metrics.items()}
    n = len(validation) if data_args.dataset == "scenes" else min(len(validation), 64)
    rows = validation.select(range(n))
    images = rows["image"]
    captions = generate_captions(trainer.model, processor, images, max_new_tokens=max_new_tokens, progress=True)
    truth = [scenes.scene_from_row(r) for r in rows] if data_args.dataset == "scenes" else None
    if truth:
        metrics.update({f"grounding.{k}": v for k, v in grounding_scores(captions, truth).items()})
    metrics.update({f"repetition.{k}": v for k, v in repetition_scores(captions).items()})
    if n >= 2:
        metrics.update({f"image_use.{k}": v for k, v in image_gap(trainer.model, processor, images, rows["text"]).items()})
        metrics["image_use.unique_caption_share"] = unique_caption_share(captions)
    metrics.update({
        "wall_seconds": round(time.time() - started, 1),
        "world_size": trainer.args.world_size,
        "train_examples_seen": trainer.state.global_step * trainer.args.train_batch_size * trainer.args.world_size
        * trainer.args.gradient_accumulation_steps,
        "global_step": trainer.state.global_step,
        "num_parameters": trainer.model.num_parameters(),
        "parameter_bytes": trainer.parameter_bytes.total,
        "parameter_bytes_on_rank_0": trainer.parameter_bytes.local,  # less than the whole when FSDP shards
        "data.skipped_bad_images": bad.summary(),
        "samples": [{"model": c, "truth": t} for c, t in zip(captions[:16], rows["text"][:16])],
    })
    for name, key in (("first_logged_loss", "loss"), ("first_eval_loss", "eval_loss")):
        metrics[name] = next((h[key] for h in trainer.state.log_history if key in h), None)
    for key in sorted({k for h in trainer.state.log_history for k in h if k.startswith("aux_") or k in ("caption_loss", "sample_cider_d")}):
        logged = [h[key] for h in trainer.state.log_history if key in h]
        metrics[f"first_logged_{key}"], metrics[f"last_logged_{key}"] = logged[0], logged[-1]
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    plot_loss_curve(trainer.state.log_history, os.path.join(out, "loss_curve.png"))
    k = min(12, n)
    marks = [claim_marks(c, s) for c, s in zip(captions[:k], truth)] if truth else None  # places right or wrong
    plot_caption_grid(images[:k], captions[:k], os.path.join(out, "samples.png"), references=rows["text"][:k], marks=marks)
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:  # a refused input: its message says what to do
        sys.exit(f"train.py: error: {err}")
