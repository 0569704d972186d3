"""The training-only objectives: losses on the visual tokens, added to the caption loss while training, that
give the image tower a denser signal than the few caption words that name what it sees.

Each objective adds its head to the model (`attach`), adds its targets to the batch (`targets`, through
`ObjectiveTargets`) and scores the projected visual tokens the decoder reads (`loss`); `NanoVLMTrainer` adds
`weight * loss` to the caption loss and logs it as `aux_<name>`. The heads are trained and checkpointed with the
model and removed before the final save (`remove_training_heads`): the released model is a plain captioner.
"""

import functools
import json
import logging
import math

import torch
import torch.nn.functional as F

from modeling_nanovlm import NanoVLMConfig
from evaluation.grounding import group_references, named_group
from processing import scenes
from processing.word_targets import word_targets, word_vocabulary

logger = logging.getLogger(__name__)

TRAINING_HEADS = ("aux_grounding_head", "aux_places_head", "aux_mention_places_head", "aux_mention_relations_head",
                  "aux_words_head", "aux_mim_head")
RELATIONS = tuple(scenes.RELATION_PHRASES)  # "left of", "right of", "above", "below", "next to"


class Objective:
    """A training-only loss: `weight * loss(model, image_tokens, batch)` joins the caption loss."""

    name = ""  # logged as aux_<name>
    reads_text = False  # True: loss() reads the decoder's states, batch["decoder_hidden_states"] (each (B, T, hidden))

    def __init__(self, weight: float):
        self.weight = weight

    def attach(self, model) -> None:
        """Give `model` this objective's head."""
        raise NotImplementedError

    def targets(self, examples: list[dict]) -> dict:
        """This objective's `aux_*` batch targets for the dataset rows `examples` (none by default)."""
        return {}

    def loss(self, model, image_tokens, batch: dict) -> torch.Tensor:
        """The loss of `image_tokens` `(B, V, hidden)` against `batch`'s targets (and its `pixel_values`)."""
        raise NotImplementedError


def token_grid(config: NanoVLMConfig) -> int:
    """Side of the square map of visual tokens the decoder reads (the [CLS] token aside)."""
    if config.vision_feature_select == "cls":
        raise ValueError("--aux_grounding_weight and --aux_places_weight need a map of visual tokens: use "
                         "--vision_feature_select pooled or all (or set the weight to 0)")
    return config.vision_pool_size if config.vision_feature_select == "pooled" else config.vision_grid


@functools.lru_cache(maxsize=4096)
def _cell_map(scene_json: str, grid: int) -> tuple[list[int], list[int], list[int]]:
    """`scenes.token_map` of a scenes row's scene: the grounding and places losses read the same map, drawn once."""
    return scenes.token_map(json.loads(scene_json), grid)


def _split_cross_entropy(logits: torch.Tensor, first: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """CE of the first `first` logits against targets `a` plus CE of the rest against `b`, over every token (a
    target of -100, F.cross_entropy's ignore_index, gives no loss)."""
    return F.cross_entropy(logits[..., :first].flatten(0, 1), a.flatten()) + F.cross_entropy(
        logits[..., first:].flatten(0, 1), b.flatten())


class GroundingObjective(Objective):
    """Scenes (`--aux_grounding_weight`, on by default there): every visual token of the map says which object
    (kind, colour) its cell shows, `scenes.token_labels` (0 = background); CE(kind) + CE(colour).

    Why: a caption names an object in two or three of ~25 tokens and reaches the image tower only through the
    decoder; this gives each picture one target per visual token, straight into the tower. It is what made the
    default run see: docs/experiments/scenes.md (recipes 8-10, `results/see_*.json`)."""

    name = "grounding"

    def __init__(self, weight: float, config: NanoVLMConfig):
        super().__init__(weight)
        self.grid = token_grid(config)

    def attach(self, model) -> None:
        model.aux_grounding_head = torch.nn.Linear(model.config.hidden_size, len(scenes.KINDS) + len(scenes.COLORS) + 2)

    def targets(self, examples):
        labels = [_cell_map(ex["scene"], self.grid) for ex in examples]  # scenes.token_labels, with the places
        return {"aux_kinds": torch.tensor([k for k, _, _ in labels]), "aux_colors": torch.tensor([c for _, c, _ in labels])}

    def loss(self, model, image_tokens, batch):
        kinds, colors = batch["aux_kinds"], batch["aux_colors"]
        logits = model.aux_grounding_head(image_tokens[:, -kinds.shape[1]:]).float()  # the map, without [CLS]
        return _split_cross_entropy(logits, len(scenes.KINDS) + 1, kinds, colors)


class PlacesObjective(Objective):
    """Scenes (`--aux_places_weight`): every visual token that shows an object says where that object stands in
    the scene, its row (top, bottom) and column (left, middle, right) from `scenes.token_map`; CE(row) + CE(column)
    over those tokens (background tokens give no target).

    Why: the long style says where each group is, and a model reads it off the visual tokens it attends to for
    that group. The decoder's position table could tell it where a token sits, but as one vector a position; this
    puts the row and the column into the token itself, shared by every token of that row or column."""

    name = "places"

    def __init__(self, weight: float, config: NanoVLMConfig):
        super().__init__(weight)
        self.grid = token_grid(config)

    def attach(self, model) -> None:
        model.aux_places_head = torch.nn.Linear(model.config.hidden_size, len(scenes.VERTICAL) + len(scenes.HORIZONTAL))

    def targets(self, examples):
        places = torch.tensor([_cell_map(ex["scene"], self.grid)[2] for ex in examples]) - 1
        columns = len(scenes.HORIZONTAL)  # PLACES runs row by row: place p is row p // 3, column p % 3
        return {"aux_rows": torch.where(places >= 0, places // columns, -100),
                "aux_columns": torch.where(places >= 0, places % columns, -100)}

    def loss(self, model, image_tokens, batch):
        rows, columns = batch["aux_rows"], batch["aux_columns"]
        logits = model.aux_places_head(image_tokens[:, -rows.shape[1]:]).float()  # the map, without [CLS]
        return _split_cross_entropy(logits, len(scenes.VERTICAL), rows, columns)  # background tokens are -100


class MentionPlacesObjective(Objective):
    """Scenes (`--aux_mention_places_weight`): at every word of the caption that refers to a group (its kind noun,
    and a sentence-initial "It"/"They" after it: `evaluation.grounding.group_references`), the decoder's last hidden
    state says which of the six cells the group's members stand in (BCE per cell) and how many members it has (CE).

    Why: the places loss puts each cell into the visual tokens, but a long description's place and relation
    claims are written by the decoder, about the group it has just named; its errors are binding errors (a group's
    places said of another, members merged or miscounted; docs/experiments/scenes.md "Earning the places"). This
    asks the decoder to hold, at the word that names a group, where that group is and how many it is."""

    name = "mention_places"
    reads_text = True
    multi_hot = len(scenes.PLACES)  # BCE outputs of the head: one per cell
    classes = len(scenes.PLACES)  # CE outputs after them: the count, 1..6 (one member a cell)

    def __init__(self, weight: float, processor, layer: int = -1):
        super().__init__(weight)
        self.tokenizer, self.prefix = processor.tokenizer, processor.num_image_tokens
        self.head = f"aux_{self.name}_head"
        self.layer = layer  # the decoder's hidden_states[layer]: -1 the last (normed) states, k the output of layer k

    def attach(self, model) -> None:
        layers = model.config.num_hidden_layers
        if self.layer != -1 and not 1 <= self.layer < layers:
            raise ValueError(f"--aux_mention_layer must be -1 (the last decoder state) or a decoder layer 1 .. {layers - 1} "
                             f"(this decoder has {layers}), got {self.layer}")
        setattr(model, self.head, torch.nn.Linear(model.config.hidden_size, self.multi_hot + self.classes))

    def target(self, group: dict, scene: dict) -> tuple[list[float], int]:
        """What the decoder says at a word naming `group` of `scene`: the multi-hot and the class (-100: none)."""
        return [float(p in group["places"]) for p in scenes.PLACES], group["count"] - 1

    def mentions(self, example: dict) -> list[tuple[int, dict, dict]]:
        """(position in the sequence of the word's last token, the group it refers to, the scene) for each word of
        `example`'s caption that refers to a group of its scene."""
        scene, text = json.loads(example["scene"]), example["text"]
        offsets = self.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        found = []
        for ref in group_references(text):
            group = named_group(ref["kind"], ref["color"], scene)
            start, end = ref["span"]
            token = max((t for t, (a, b) in enumerate(offsets) if a < end and b > start), default=None)  # the word's last
            if group is not None and token is not None:
                found.append((self.prefix + token, group, scene))
        return found

    def targets(self, examples):
        rows = []
        for example in examples:
            mentions, said = self.mentions(example), {}  # a group is often named more than once: one target each
            for _, group, scene in mentions:
                if id(group) not in said:
                    said[id(group)] = self.target(group, scene)
            rows.append([(position, *said[id(group)]) for position, group, _ in mentions])
        width = max(1, max(map(len, rows)))
        positions = torch.full((len(rows), width), -1)
        multi_hot = torch.zeros(len(rows), width, self.multi_hot)
        classes = torch.full((len(rows), width), -100)
        for i, found in enumerate(rows):
            for j, (position, hot, label) in enumerate(found):
                positions[i, j], multi_hot[i, j], classes[i, j] = position, torch.tensor(hot), label
        return {f"aux_{self.name}_positions": positions, f"aux_{self.name}_multi_hot": multi_hot,
                f"aux_{self.name}_classes": classes}

    def loss(self, model, image_tokens, batch):
        states, positions = batch["decoder_hidden_states"][self.layer], batch[f"aux_{self.name}_positions"]
        head = getattr(model, self.head)
        keep = (positions >= 0) & (positions < states.shape[1])  # a caption cut by --max_length loses its tail
        if not keep.any():  # no group named in this batch: a zero that still reaches the head (DDP wants every parameter used)
            return head(states[:, :1]).sum() * 0.0
        rows = torch.arange(len(positions), device=states.device)[:, None].expand_as(positions)
        logits = head(states[rows[keep], positions[keep]]).float()
        loss = F.binary_cross_entropy_with_logits(logits[:, : self.multi_hot], batch[f"aux_{self.name}_multi_hot"][keep])
        if self.classes:
            loss = loss + F.cross_entropy(logits[:, self.multi_hot:], batch[f"aux_{self.name}_classes"][keep])
        return loss


class MentionRelationsObjective(MentionPlacesObjective):
    """Scenes (`--aux_mention_relations_weight`): at every word of the caption that refers to a group (as
    `MentionPlacesObjective` finds them), the decoder's last hidden state says, for each relation ("left of", "right
    of", "above", "below", "next to"), in which cells the groups stand that the named group is in that relation to
    (`scenes.relations`; all six zero when there is none). BCE per (relation, cell), times the number of relations.

    Why: the long style's relation claims go wrong mostly on diagonals (one group up high, the other down low in
    other columns) called "above", "below" or "next to" (docs/experiments/scenes.md, `experiments.claim_errors`).
    The decoder writes the relation word before it names the other group, so at "The red ball is" it must already
    know whether the ball has a group right below it, and where. This asks for exactly that, at every naming word,
    "none" included: the caption loss alone sees a relation only when a sentence states one."""

    name = "mention_relations"
    multi_hot = len(RELATIONS) * len(scenes.PLACES)
    classes = 0

    def target(self, group, scene):
        partners = {relation: set() for relation in RELATIONS}
        for other in scene["objects"]:
            if other is not group:
                for relation in scenes.relations(group, other):
                    partners[relation].update(other["places"])
        return [float(p in partners[relation]) for relation in RELATIONS for p in scenes.PLACES], -100

    def loss(self, model, image_tokens, batch):
        return super().loss(model, image_tokens, batch) * len(RELATIONS)  # the mean BCE per relation, summed


class WordsObjective(Objective):
    """Photos (`--aux_words_weight`): from the mean visual token, predict which content words (used
    `--aux_words_min_count`+ times in the training captions, stop words out) the image's captions use;
    multi-label BCE summed over the vocabulary, divided by the number of target words (a loss per named word).

    Why: a photo's five captions name its content; the tower learns to see it without waiting for the decoder.
    Measured: recipe 4 against recipe 3 (docs/experiments/photos.md; `results/photos_levers.json`)."""

    name = "words"

    def __init__(self, weight: float, train_texts, min_count: int):
        super().__init__(weight)
        vocabulary = word_vocabulary(train_texts, min_count)
        if not vocabulary:
            raise ValueError(f"--aux_words_weight: no content word is used {min_count}+ times in the "
                             "training captions; lower --aux_words_min_count")
        logger.info("words loss over %d content words (used %d+ times)", len(vocabulary), min_count)
        self.word_index = {w: i for i, w in enumerate(vocabulary)}

    def attach(self, model) -> None:
        hidden = model.config.hidden_size
        model.aux_words_head = torch.nn.Sequential(torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, len(self.word_index)))
        # Start at the prior that a photo's captions use ~10 of the words: a first loss near the caption
        # loss's size, not one dominated by thousands of 50% guesses.
        torch.nn.init.constant_(model.aux_words_head[1].bias, -math.log(len(self.word_index) / 10))

    def targets(self, examples):
        words = torch.zeros(len(examples), len(self.word_index))
        for row, ex in enumerate(examples):
            words[row, word_targets(ex.get("references") or [ex["text"]], self.word_index)] = 1.0
        return {"aux_words": words}

    def loss(self, model, image_tokens, batch):
        words = batch["aux_words"]
        logits = model.aux_words_head(image_tokens.mean(1)).float()
        bce = F.binary_cross_entropy_with_logits(logits, words, reduction="sum")
        return bce / words.sum().clamp(min=1.0)


class MaskedImageHead(torch.nn.Module):
    """Masked-image modelling's training-only parts: the mask token the vision tower puts in place of the masked
    patches, and a linear map from each patch's output to its pixels (as SimMIM's one-layer head)."""

    def __init__(self, config: NanoVLMConfig, mask_ratio: float):
        super().__init__()
        if not 0 < mask_ratio < 1:
            raise ValueError(f"--aux_mim_mask_ratio must be between 0 and 1 (a share of the patches), got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.mask_token = torch.nn.Parameter(torch.randn(config.vision_hidden_size) * 0.02)
        self.to_pixels = torch.nn.Linear(config.vision_hidden_size, config.num_channels * config.patch_size**2)


class MaskedImageObjective(Objective):
    """Any images (`--aux_mim_weight`): masked-image modelling (SimMIM / MAE-style). Mask a random
    `--aux_mim_mask_ratio` of each image's patches, run the vision tower on the rest and the mask tokens (a second
    pass of the tower a step), and score the predicted pixels of the masked patches: MSE against each patch's pixels
    normalized to mean 0, variance 1 (MAE's best target). With `vision_stem="conv"` the overlapping convolutions let
    a visible patch see the edge of a masked neighbour.

    Why: a signal for the tower from the photos themselves. Measured: recipe 17 against recipe 9
    (docs/experiments/photos.md; `results/eval_flickr8k_17_mim.json`)."""

    name = "mim"

    def __init__(self, weight: float, mask_ratio: float):
        super().__init__(weight)
        self.mask_ratio = mask_ratio

    def attach(self, model) -> None:
        if model.config.vision_tower_type != "vit":
            raise ValueError("--aux_mim_weight masks the ViT tower's patches: it needs vision_tower_type='vit' (this model's "
                             f"is {model.config.vision_tower_type!r}); pass --aux_mim_weight 0")
        model.aux_mim_head = MaskedImageHead(model.config, self.mask_ratio)

    def loss(self, model, image_tokens, batch):  # image_tokens unused: a second pass of the tower
        head, pixels, config = model.aux_mim_head, batch["pixel_values"], model.config
        size, patches = pixels.shape[0], config.num_patches
        masked = round(head.mask_ratio * patches)
        order = torch.rand(size, patches, device=pixels.device).argsort(dim=1)
        mask = torch.zeros(size, patches, dtype=torch.bool, device=pixels.device).scatter_(1, order[:, :masked], True)
        hidden = model.model.vision_tower(pixels.to(model.dtype), bool_masked_pos=mask, mask_token=head.mask_token)
        predicted = head.to_pixels(hidden[:, 1:]).float()  # (B, patches, channels * patch * patch)
        target = F.unfold(pixels.float(), config.patch_size, stride=config.patch_size).transpose(1, 2)  # the same layout
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        return ((predicted - target) ** 2).mean(-1)[mask].mean()


def objectives_for(model, data_args, train_texts=(), processor=None) -> list[Objective]:
    """The objectives this run asks for, their heads attached to `model` (the grounding loss is on by default on
    scenes when the decoder reads a map of visual tokens); `processor` (the run's) places the caption's tokens."""
    grounding = data_args.aux_grounding_weight
    if grounding is None:
        grounding = 1.0 if data_args.dataset == "scenes" and model.config.vision_feature_select != "cls" else 0.0
    objectives = []
    if grounding > 0:
        if data_args.dataset != "scenes":
            raise ValueError("--aux_grounding_weight needs --dataset scenes (it uses the scenes' ground truth)")
        objectives.append(GroundingObjective(grounding, model.config))
    if data_args.aux_places_weight > 0:
        if data_args.dataset != "scenes":
            raise ValueError("--aux_places_weight needs --dataset scenes (it uses the scenes' ground truth)")
        objectives.append(PlacesObjective(data_args.aux_places_weight, model.config))
    mentions = (MentionPlacesObjective, MentionRelationsObjective)  # the decoder-side losses
    if data_args.aux_mention_layer != -1 and not any(getattr(data_args, f"aux_{m.name}_weight") > 0 for m in mentions):
        raise ValueError("--aux_mention_layer picks the decoder layer the decoder-side losses read, but neither "
                         "--aux_mention_places_weight nor --aux_mention_relations_weight is on: set one, or drop the flag")
    for mention in mentions:
        weight, flag = getattr(data_args, f"aux_{mention.name}_weight"), f"--aux_{mention.name}_weight"
        if weight > 0:
            if data_args.dataset != "scenes":
                raise ValueError(f"{flag} needs --dataset scenes (it uses the scenes' ground truth)")
            if processor is None:
                raise ValueError(f"{flag} places the caption's tokens: pass the run's processor")
            objectives.append(mention(weight, processor, data_args.aux_mention_layer))
    if data_args.aux_words_weight > 0:
        objectives.append(WordsObjective(data_args.aux_words_weight, train_texts, data_args.aux_words_min_count))
    if data_args.aux_mim_weight > 0:
        objectives.append(MaskedImageObjective(data_args.aux_mim_weight, data_args.aux_mim_mask_ratio))
    for objective in objectives:
        objective.attach(model)
    return objectives


def with_objectives(model, data_args, collator, train_texts=()):
    """(collator, NanoVLMTrainer kwargs) for a run with the objectives it asks for (`objectives_for`): the collator
    adds their targets to each batch; with none, the collator and no kwargs."""
    objectives = objectives_for(model, data_args, train_texts, getattr(collator, "processor", None))
    return (ObjectiveTargets(collator, objectives), {"objectives": objectives}) if objectives else (collator, {})


class ObjectiveTargets:
    """A collator: the usual batch plus each objective's `aux_*` targets."""

    def __init__(self, collator, objectives: list[Objective]):
        self.collator, self.objectives = collator, objectives

    def __call__(self, examples):
        batch = self.collator(examples)
        for objective in self.objectives:
            batch.update(objective.targets(examples))
        return batch


def remove_training_heads(model) -> None:
    """Drop the training-only objectives' heads: the released model is a plain captioner."""
    for head in TRAINING_HEADS:
        if hasattr(model, head):
            delattr(model, head)
