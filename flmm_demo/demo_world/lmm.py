"""The demo world's tiny LLaVA: its configuration, training from scratch, and evaluation.

The model is a plain transformers LlavaForConditionalGeneration (CLIP vision tower,
two-layer projector, Llama decoder), small enough to train on a CPU in minutes.

Training, in two stages:
1. Vision pre-training. The vision tower alone learns, for every patch, the colour,
   shape and size of the shape covering it and that shape's rank from the left. The
   labels come from the exact scene masks; they are cheap and make each image token
   carry "which object is here", which the language model then only has to read.
2. Chat training. The tower is frozen and its features of the scene pool cached; the
   projector and the Llama decoder are teacher-forced on conversations (description,
   questions, several turns); the loss covers the assistant's tokens only.
   An auxiliary loss teaches a few attention heads to look where the words point:
   while the answer names an object, MENTION_HEADS attend to the object the words
   name and REFERENT_HEADS to the object the whole expression is about (in "the
   triangle left of the blue square" both are the triangle until "the blue square",
   whose words mention the square but still refer to the triangle). The target is the
   object's share of each patch, normalised; the other heads learn freely. Optionally
   (cue_attention) the prompt's last token, whose output is the answer's first word,
   is supervised too: for 'what colour is the circle?' it attends to the circle, and
   (cue_groups) for 'how many squares are there?' to the squares, and (cue_near) for
   'no' to 'is there a red circle?' to the red objects and the circles. This is the
   demo world's stand-in for the web-scale pre-training that gives real LMMs grounded
   attention; the F-LMM head still reads all layers x heads and is trained as usual.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from flmm_demo.demo_world import scenes as S
from flmm_demo.demo_world.schedule import BudgetSchedule
from flmm_demo.demo_world.tokenizer import IMAGE_TOKEN, build_processor


@dataclass(frozen=True)
class ModelSize:
    """Plain sizes of the tiny LLaVA. grid = image_size // patch_size tokens a side."""

    image_size: int = 192
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 384

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


TINY = ModelSize(image_size=64, vision_hidden=64, vision_layers=2, vision_heads=2,
                 text_hidden=64, text_layers=2, text_heads=2, text_intermediate=128)


DESCRIBE = "describe the image."
# (layer, head) pairs of the language model whose attention is supervised in stage 2,
# layers counted from the last (-1); pairs a smaller model lacks are skipped.
MENTION_HEADS: tuple[tuple[int, int], ...] = ((-3, 0), (-2, 0), (-1, 0))
REFERENT_HEADS: tuple[tuple[int, int], ...] = ((-2, 1), (-1, 1))


def build_config(size: ModelSize, vocab_size: int, image_token_id: int, pad_token_id: int) -> LlavaConfig:
    """LlavaConfig of a tiny CLIP tower and a tiny Llama; the CLS token is dropped ('default')."""
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden, intermediate_size=4 * size.vision_hidden,
        num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
        image_size=size.image_size, patch_size=size.patch_size, projection_dim=size.vision_hidden)
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=size.text_hidden, intermediate_size=size.text_intermediate,
        num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_heads, max_position_embeddings=1024, rms_norm_eps=1e-5,
        bos_token_id=2, eos_token_id=3, pad_token_id=pad_token_id, tie_word_embeddings=False)
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_seq_length=size.grid ** 2, projector_hidden_act="gelu", tie_word_embeddings=False)


def build_model(size: ModelSize, seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised tiny LLaVA and its processor."""
    processor = build_processor(size.image_size, size.patch_size)
    tok = processor.tokenizer
    config = build_config(size, len(tok), tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model, processor


# ----------------------------------------------------------------------------- data


@dataclass
class ScenePool:
    """Pre-processed scenes. pixels: (N, 3, S, S) float16; patch_labels: (N, 4, g, g) int64
    with channels colour, shape, size, rank (0 = background, else 1 + index);
    covers[i]: (objects, g*g) float32, each object's share of each patch, rows summing to 1."""

    scenes: list[S.Scene]
    pixels: torch.Tensor
    patch_labels: torch.Tensor
    covers: list[torch.Tensor]


def coverage(scene: S.Scene, grid: int) -> np.ndarray:
    """(1 + objects, grid, grid): the fraction of each patch of the padded-square image
    covered by the background (channel 0) and by each object."""
    w, h = scene.size
    side = max(w, h)
    left, top = (side - w) // 2, (side - h) // 2
    cover = [np.ones((grid, grid), np.float32)]
    for obj in scene.objects:
        sq = np.zeros((side, side), np.float32)
        sq[top:top + h, left:left + w] = obj.mask
        frac = np.asarray(Image.fromarray(sq).resize((grid, grid), Image.BOX))
        cover.append(frac)
        cover[0] = cover[0] - frac
    return np.stack(cover)


def patch_labels(scene: S.Scene, grid: int) -> np.ndarray:
    """(4, grid, grid) labels of the patches of the padded-square image: colour, shape, size, rank.

    A patch takes the object covering most of it, or background (0) when the
    background covers more.
    """
    owner = np.argmax(coverage(scene, grid), axis=0)  # 0 background, k object k-1
    out = np.zeros((4, grid, grid), np.int64)
    for k, obj in enumerate(scene.objects, start=1):
        sel = owner == k
        out[0][sel] = list(S.COLOURS).index(obj.colour) + 1
        out[1][sel] = S.SHAPES.index(obj.shape) + 1
        out[2][sel] = list(S.SIZES).index(obj.size) + 1
        out[3][sel] = k
    return out


def make_pool(seed: int, n: int, processor: LlavaProcessor, grid: int, held_out: bool = False,
              wide_share: float = 0.0) -> ScenePool:
    """n scenes of seed, pre-processed: the first n x wide_share from the wide world
    (scenes.make_wide_scene), the rest classic (crowded when held_out)."""
    n_wide = round(n * wide_share)
    scenes = list(S.scene_stream(seed, n_wide, wide=True)) + list(S.scene_stream(seed, n - n_wide, held_out))
    pixels = torch.cat([processor.image_processor(s.pil(), return_tensors="pt").pixel_values for s in scenes])
    labels = torch.from_numpy(np.stack([patch_labels(s, grid) for s in scenes]))
    covers = []
    for s in scenes:
        c = torch.from_numpy(coverage(s, grid)[1:]).flatten(1)
        covers.append(c / c.sum(1, keepdim=True).clamp_min(1e-6))
    return ScenePool(scenes, pixels.half(), labels, covers)


def encode_annotated_chat(processor: LlavaProcessor, turns: list[tuple[str, str | list[S.Segment]]],
                          n_image_tokens: int, answer_loss: bool = True,
                          cue: bool = False, groups: bool = False, near: bool = False
                          ) -> tuple[list[int], list[int], list[int | tuple[int, ...]], list[int | tuple[int, ...]]]:
    """Token ids of a chat as the chat template renders it (image in the first user turn);
    labels: the assistant's tokens and their </s>, -100 elsewhere (everywhere when not
    answer_loss); and, per token, the object its words mention and the object they refer
    to (-1: none). An answer is a string or a list of segments (text, mentioned, referent).
    cue: the last token of each prompt (':' of 'ASSISTANT:'), the position whose output
    predicts the answer's first word, also gets that word's object, so a one-word answer
    ('red' to 'what colour is the circle?') is predicted where attention is on the circle.
    groups: a segment about several objects ('two' to 'how many squares are there?') keeps
    its tuple of objects (chat_batch turns it into their mean coverage); otherwise it is -1.
    near (with groups): so does a 'no' about the objects it was checked against
    (scenes.NearGroup); otherwise it is -1."""
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    ids, labels, mention, referent = [tok.bos_token_id], [-100], [-1], [-1]
    for k, (user, assistant) in enumerate(turns):
        prompt = tok.encode("USER:", add_special_tokens=False)
        if k == 0:
            prompt += [image_id] * n_image_tokens
        prompt += tok.encode(user + " ASSISTANT:", add_special_tokens=False)
        segments = [(assistant, None, None)] if isinstance(assistant, str) else assistant
        answer, ment, ref = [], [], []
        for text, m, r in segments:
            piece = tok.encode(text, add_special_tokens=False)
            answer += piece
            ment += [_annotation(m, groups, near)] * len(piece)
            ref += [_annotation(r, groups, near)] * len(piece)
        answer.append(tok.eos_token_id)
        ids += prompt + answer
        labels += [-100] * len(prompt) + (answer if answer_loss else [-100] * len(answer))
        last_m, last_r = (ment[0], ref[0]) if cue and ment else (-1, -1)
        mention += [-1] * (len(prompt) - 1) + [last_m] + ment + [-1]
        referent += [-1] * (len(prompt) - 1) + [last_r] + ref + [-1]
    return ids, labels, mention, referent


def _annotation(objects: int | tuple[int, ...] | None, groups: bool, near: bool) -> int | tuple[int, ...]:
    if objects is None or (isinstance(objects, tuple) and not groups):
        return -1
    if isinstance(objects, S.NearGroup):
        return tuple(objects) if near else -1
    return objects


def encode_chat(processor: LlavaProcessor, turns: list[tuple[str, str]], n_image_tokens: int) -> tuple[list[int], list[int]]:
    """Token ids of a chat as the chat template renders it (image in the first user turn),
    and labels: the assistant's tokens and their </s>, -100 elsewhere."""
    return encode_annotated_chat(processor, turns, n_image_tokens)[:2]


def chat_batch(processor: LlavaProcessor, pool: ScenePool, idx: list[int], rng: np.random.Generator,
               n_image_tokens: int, max_turns: int, ground_share: float = 0.0,
               ground_turns: int = 1, short_qa: bool = False, vcot_share: float = 0.0,
               balanced_share: float = 0.0, cue: bool = False, groups: bool = False,
               near: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded teacher-forcing batch: input_ids, attention_mask, labels, mention,
    referent (B, T); covers (B, max objects, g*g); pixel_values. Each chat is, with
    probability ground_share, ground_turns grounding turns (each a description prompt
    answered by referring expressions) that only the attention loss sees, else a
    conversation. Several grounding turns share one pass over the 576 image tokens, so
    they multiply the supervised words of a step for a few more text tokens. short_qa:
    questions get short answers ('red', 'three', 'yes'; see scenes.short_question_segments).
    vcot_share: chats with visual chain of thought's probe and crop preamble, balanced_share:
    chats of answer-balanced short questions (see scenes.annotated_conversation); cue: the
    conversations' prompts end on a token supervised like the answer's first word
    (encode_annotated_chat); groups: answers about several objects are supervised toward
    their mean coverage, a row of covers after the scene's objects (mention and referent
    index it); near: so are the 'no' answers, toward the objects they were checked against."""
    seqs = []
    for i in idx:
        if rng.random() < ground_share:
            turns = [S.grounding_turn(pool.scenes[i], rng) for _ in range(ground_turns)]
            seqs.append(encode_annotated_chat(processor, turns, n_image_tokens, answer_loss=False))
        else:
            chat = S.annotated_conversation(pool.scenes[i], rng, max_turns, short=short_qa, vcot_share=vcot_share,
                                            balanced_share=balanced_share)
            seqs.append(encode_annotated_chat(processor, chat, n_image_tokens, cue=cue, groups=groups, near=near))
    n_obj = max(pool.covers[i].shape[0] for i in idx)
    # per chat: its objects' coverage, zeros up to n_obj, then its groups' mean coverage
    rows = [list(F.pad(pool.covers[i], (0, 0, 0, n_obj - pool.covers[i].shape[0]))) for i in idx]
    for b, (_, _, m, r) in enumerate(seqs):
        row_of: dict[tuple[int, ...], int] = {}
        for marks in (m, r):
            for t, g in enumerate(marks):
                if isinstance(g, tuple):
                    if g not in row_of:
                        row_of[g] = len(rows[b])
                        rows[b].append(torch.stack([pool.covers[idx[b]][k] for k in g]).mean(0))
                    marks[t] = row_of[g]
    T = max(len(s[0]) for s in seqs)
    pad = processor.tokenizer.pad_token_id
    ids = torch.full((len(idx), T), pad)
    labels = torch.full((len(idx), T), -100)
    mention = torch.full((len(idx), T), -1)
    referent = torch.full((len(idx), T), -1)
    mask = torch.zeros((len(idx), T), dtype=torch.long)
    for b, (x, y, m, r) in enumerate(seqs):
        ids[b, :len(x)] = torch.tensor(x)
        labels[b, :len(y)] = torch.tensor(y)
        mention[b, :len(m)] = torch.tensor(m)
        referent[b, :len(r)] = torch.tensor(r)
        mask[b, :len(x)] = 1
    covers = torch.zeros(len(idx), max(len(r) for r in rows), pool.covers[idx[0]].shape[1])
    for b, r in enumerate(rows):
        covers[b, :len(r)] = torch.stack(r)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "mention": mention,
            "referent": referent, "covers": covers, "pixel_values": pool.pixels[idx].float()}


# ----------------------------------------------------------------------------- training


class PatchHeads(torch.nn.Module):
    """Linear classifiers of patch features, used only to pre-train the vision tower:
    colour, shape, size and rank from the left (each with a background class)."""

    def __init__(self, dim: int):
        super().__init__()
        classes = (len(S.COLOURS) + 1, len(S.SHAPES) + 1, len(S.SIZES) + 1, 8)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(dim, c) for c in classes)

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """feats: (B, g*g, D); labels: (B, 4, g, g). Returns the summed cross-entropy and
        each head's accuracy on the patches that show an object."""
        flat = labels.flatten(2)  # (B, 4, g*g)
        on_object = flat[:, 0] > 0
        loss, accs = feats.new_zeros(()), {}
        for k, (name, head) in enumerate(zip(("colour", "shape", "size", "rank"), self.heads)):
            logits = head(feats)  # (B, g*g, classes)
            loss = loss + F.cross_entropy(logits.transpose(1, 2), flat[:, k])
            accs[name] = (logits.argmax(-1) == flat[:, k])[on_object].float().mean().item()
        return loss, accs


class ObjectHeads(torch.nn.Module):
    """Linear classifiers of whole objects, used only to tune the vision tower: each
    object's coverage-weighted mean patch feature (what benchmarks/tower_probe.py probes)
    is classified by shape, colour and size. Per-patch labels leave a small, turned or
    outlined object's shape to the one or two patches it covers, mixed with background;
    this loss asks that the object as a whole be readable."""

    def __init__(self, dim: int):
        super().__init__()
        classes = (len(S.SHAPES), len(S.COLOURS), len(S.SIZES))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(dim, c) for c in classes)

    def forward(self, feats: torch.Tensor, covers: list[torch.Tensor],
                scenes: list[S.Scene]) -> tuple[torch.Tensor, dict[str, float]]:
        """feats: (B, g*g, D); covers[b]: (objects, g*g), rows summing to 1 (0 for an object
        that covers no patch, which is left out). Returns the summed cross-entropy and
        each head's accuracy over the batch's objects."""
        pooled, labels = [], []
        for f, cover, scene in zip(feats, covers, scenes):
            seen = cover.sum(1) > 0
            pooled.append(cover[seen] @ f)
            labels += [(S.SHAPES.index(o.shape), list(S.COLOURS).index(o.colour), list(S.SIZES).index(o.size))
                       for o, s in zip(scene.objects, seen.tolist()) if s]
        x, y = torch.cat(pooled), torch.tensor(labels)
        loss, accs = feats.new_zeros(()), {}
        for k, (name, head) in enumerate(zip(("object shape", "object colour", "object size"), self.heads)):
            logits = head(x)
            loss = loss + F.cross_entropy(logits, y[:, k])
            accs[name] = (logits.argmax(-1) == y[:, k]).float().mean().item()
        return loss, accs


def _vision_features(model: LlavaForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """(B, g*g, D) the vision tower's features of the layer LLaVA reads, CLS dropped. Pixels
    smaller than the tower's image size use its position embeddings resized to their grid."""
    smaller = pixels.shape[-1] != model.config.vision_config.image_size
    out = model.model.vision_tower(pixels, output_hidden_states=True, interpolate_pos_encoding=smaller)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def _chat_logits(model: LlavaForConditionalGeneration, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 features: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(B, T, V) logits, as LlavaForConditionalGeneration computes them, from cached
    vision features (B, g*g, D) instead of pixels (the vision tower is frozen in stage 2),
    and every layer's attention weights (B, heads, T, T) (the language model runs eager)."""
    embeds = model.get_input_embeddings()(input_ids)
    image = model.model.multi_modal_projector(features)  # (B, g*g, hidden)
    is_image = input_ids == model.config.image_token_id
    embeds = embeds.masked_scatter(is_image[..., None], image.to(embeds.dtype))
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask, output_attentions=True)
    return model.lm_head(out.last_hidden_state), out.attentions


def attention_loss(attentions: tuple[torch.Tensor, ...], batch: dict[str, torch.Tensor],
                   image_token_id: int) -> torch.Tensor:
    """Cross-entropy of the supervised heads' attention over the image tokens against
    the named object's coverage, averaged over the annotated tokens and heads."""
    ids = batch["input_ids"]
    image_pos = (ids[0] == image_token_id).nonzero().squeeze(1)
    losses = []
    for key, heads in (("mention", MENTION_HEADS), ("referent", REFERENT_HEADS)):
        b, t = (batch[key] >= 0).nonzero(as_tuple=True)
        if not len(b):
            continue
        target = batch["covers"][b, batch[key][b, t]]  # (N, g*g)
        for layer, head in heads:
            if -layer > len(attentions) or head >= attentions[0].shape[1]:
                continue
            p = attentions[layer][b, head, t][:, image_pos]  # (N, g*g)
            losses.append(-(target * torch.log(p.float() + 1e-6)).sum(-1).mean())
    return torch.stack(losses).mean() if losses else ids.new_zeros((), dtype=torch.float32)


def set_rope_theta(model: LlavaForConditionalGeneration, theta: float) -> None:
    """Give the language model a new RoPE base, in its config (so it is saved) and in its
    rotary embedding. With 32-dim heads and base 1e4 only the 3-4 slowest of the 16
    rotary pairs turn less than half a radian across the 576 image tokens, and those are
    the pairs the supervised heads use to match words to image tokens by content; a
    larger base frees more of them (continuing a trained model on a new base is how
    long-context LLMs are adapted, "adjusted base frequency")."""
    text = model.config.text_config
    text.rope_parameters = {**text.rope_parameters, "rope_theta": float(theta)}
    language = model.model.language_model
    language.rotary_emb = type(language.rotary_emb)(config=text).to(next(language.parameters()).device)


def set_context(model: LlavaForConditionalGeneration, processor: LlavaProcessor, positions: int) -> None:
    """Let the language model take `positions` tokens (config and tokenizer). Its positions
    are rotary (RoPE), computed rather than learned, so no weight changes; 2,048 holds
    visual chain of thought's two images (2 x 576 tokens) and its question, which 1,024
    does not."""
    model.config.text_config.max_position_embeddings = positions
    processor.tokenizer.model_max_length = positions


@dataclass(frozen=True)
class LmmTrainConfig:
    """One `train-lmm` run; `python -m flmm_demo.demo_world train-lmm --help` says each option.

    From scratch (init=None): vision_share of the wall-clock budget pre-trains the vision
    tower on patch labels, the first low_res_share of it on images of 2/3 the size (a
    coarser patch grid, so each step is cheaper and shapes span fewer patches; the
    position embeddings are resized on the fly, as in progressive-resizing ViT training);
    then the tower is frozen, its features of the scene pool cached, and the projector and
    the language model learn the conversations, with attention_weight x the attention
    loss (0 turns the attention supervision off). A share ground_share of the chats are
    grounding turns: referring expressions teacher-forced after a description prompt,
    which only the attention loss sees (the answers they would teach are wrong), so the
    supervised heads follow the words rather than where a description usually goes next;
    each such chat has ground_turns turns.

    init: continue from a saved model instead, on the scene pool of seed + 100 (a new pool
    for a new seed): the whole budget is chat, unless tune_vision, which first tunes the
    tower on patch labels for vision_share of it at vision_lr (new scenes may look new to it);
    its first probe_share trains only the fresh patch heads on the frozen tower, so the
    tower is not moved by heads that are still at chance. vision_share 1 (with init and
    tune_vision) spends the whole budget on the tower and skips the chat stage: a tower
    round, to check with benchmarks/tower_probe.py before a chat round adapts the language
    model to it.
    object_weight: in the vision stage, add object_weight x the loss of linear heads that
    read each object's shape, colour and size from its coverage-weighted mean feature
    (ObjectHeads), besides the per-patch labels.
    rope_theta: a new RoPE base for the language model (see set_rope_theta).
    context: a new context length in tokens (see set_context).
    wide_share: share of the pool drawn from the wide world (scenes.make_wide_scene).
    short_qa: questions about colour, shape, count, position and yes/no get short answers.
    vcot_share: share of chats that open with visual chain of thought's probe, and of
    questions asked after its crop preamble (scenes.annotated_conversation).
    balanced_share (with short_qa): share of chats made of short questions drawn with
    every kind and answer equally likely (scenes.balanced_short_turns).
    answer_only: the chat stage trains only what comes after the last layer's attention
    (its MLP and norm, the final norm and the output layer), so every layer's attention
    weights, which the F-LMM head reads, stay exactly those of config.init.
    cue_attention: the attention loss also supervises the last prompt token of each
    conversation turn, toward the object the answer's first word is about (the position
    that predicts a one-word answer; see encode_annotated_chat).
    cue_groups: short answers about several objects (counts, 'is there a ...?', 'are
    there any ...?') are supervised toward the mean coverage of the objects they are about
    (with cue_attention, so is the prompt token that predicts them); without it they are
    about no object.
    cue_near (with cue_groups): a 'no' to 'is there a red circle?' or 'are there any
    squares?' is supervised toward the objects it was checked against, the red objects and
    the circles (every object when none matches in part), so the answer is predicted
    while looking at what makes it false; without it a 'no' is about no object.
    """

    out_dir: str | Path
    seed: int = 0
    minutes: float = 30.0
    tiny: bool = False
    n_scenes: int = 3000
    batch_size: int = 8
    vision_share: float = 0.3
    low_res_share: float = 0.0
    vision_lr: float = 2e-3
    tune_vision: bool = False
    probe_share: float = 0.0
    attention_weight: float = 1.0
    ground_share: float = 0.0
    ground_turns: int = 1
    init: str | Path | None = None
    chat_lr: float = 1e-3
    rope_theta: float | None = None
    context: int | None = None
    wide_share: float = 0.0
    short_qa: bool = False
    vcot_share: float = 0.0
    balanced_share: float = 0.0
    answer_only: bool = False
    cue_attention: bool = False
    cue_groups: bool = False
    cue_near: bool = False
    object_weight: float = 0.0
    threads: int = 2

    def __post_init__(self):
        if self.cue_near and not self.cue_groups:
            raise ValueError("cue_near marks each 'no' with a group of objects: it needs cue_groups too")
        if not 0.0 <= self.vision_share <= 1.0:
            raise ValueError(f"the vision share is a fraction of the budget, 0 to 1, not {self.vision_share}")
        if self.tower_only and (self.init is None or not self.tune_vision):
            raise ValueError("a vision share of 1 leaves no time to chat: it only tunes the tower of a saved "
                             "model (with init and tune_vision)")

    @property
    def tower_only(self) -> bool:
        """The whole budget tunes the tower; the language side is saved as it was."""
        return self.vision_share >= 1.0


def train(config: LmmTrainConfig, log=print) -> dict[str, float]:
    """Train the tiny LLaVA (see LmmTrainConfig) and save it (fp16 safetensors + processor)
    to config.out_dir. Returns the first and last losses and the minutes taken."""
    torch.set_num_threads(config.threads)
    t0 = time.time()
    budget = config.minutes * 60
    model, processor, size = _starting_model(config)
    pool = make_pool(config.seed + 100, 64 if config.tiny else config.n_scenes, processor, size.grid,
                     wide_share=config.wide_share)
    log(f"pool of {len(pool.scenes)} scenes in {time.time() - t0:.0f}s; "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    rng = np.random.default_rng(config.seed)
    stats: dict[str, float] = {}
    if config.init is None or config.tune_vision:
        low = _low_res_copy(pool, size, log) if config.low_res_share > 0 and config.init is None else None
        stats.update(train_vision(model, pool, low, size, config, rng, config.vision_share * budget, log))
    if not config.tower_only:
        features = cache_vision_features(model, pool)
        log(f"cached vision features {tuple(features.shape)} ({time.time() - t0:.0f}s)")
        stats.update(train_chat(model, processor, pool, features, size, config, rng, t0 + budget, log))
    stats["minutes"] = (time.time() - t0) / 60
    model.requires_grad_(True)
    save(model, processor, config.out_dir)
    log(f"saved to {config.out_dir} after {stats['minutes']:.1f} min: {stats}")
    return stats


def _starting_model(config: LmmTrainConfig) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, ModelSize]:
    """A new model, or the one at config.init (its vocabulary extended to today's); the
    new RoPE base and context length if asked; sdpa attention for speed (stage 2 switches to eager)."""
    size = TINY if config.tiny else ModelSize()
    if config.init is not None:
        model, processor = extend_vocabulary(*load(config.init))
        vc = model.config.vision_config
        size = replace(size, image_size=vc.image_size, patch_size=vc.patch_size)
    else:
        model, processor = build_model(size, config.seed)
    if config.rope_theta is not None:
        set_rope_theta(model, config.rope_theta)
    if config.context is not None:
        set_context(model, processor, config.context)
    model.config._attn_implementation = "sdpa"
    model.model.language_model.config._attn_implementation = "sdpa"
    return model, processor, size


def extend_vocabulary(model: LlavaForConditionalGeneration,
                      processor: LlavaProcessor) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A model saved with an earlier vocabulary, given today's tokenizer: the later words
    come after the earlier ones (tokenizer._LATER_WORDS), so the earlier rows of the
    embedding and the output layer stay and the new ones start at their mean."""
    old = processor.tokenizer.get_vocab()
    vc = model.config.vision_config
    new_processor = build_processor(vc.image_size, vc.patch_size)
    new = new_processor.tokenizer.get_vocab()
    if len(new) == len(old):
        return model, processor
    moved = [w for w, i in old.items() if new.get(w) != i]
    if moved:
        raise ValueError(f"cannot extend this model's vocabulary: the words {moved[:5]} have other ids today")
    model.resize_token_embeddings(len(new), mean_resizing=True)
    return model, new_processor


def _low_res_copy(pool: ScenePool, size: ModelSize, log) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool's pixels and patch labels at 2/3 the size (a coarser grid, cheaper steps)."""
    low_size = size.image_size * 2 // 3 // size.patch_size * size.patch_size
    low_processor = build_processor(low_size, size.patch_size)
    low_grid = low_size // size.patch_size
    pixels = torch.cat([low_processor.image_processor(s.pil(), return_tensors="pt").pixel_values for s in pool.scenes])
    labels = torch.from_numpy(np.stack([patch_labels(s, low_grid) for s in pool.scenes]))
    log(f"low-resolution copy of the pool: {low_size} px, {low_grid}x{low_grid} patches")
    return pixels.half(), labels


def train_vision(model: LlavaForConditionalGeneration, pool: ScenePool,
                 low: tuple[torch.Tensor, torch.Tensor] | None, size: ModelSize, config: LmmTrainConfig,
                 rng: np.random.Generator, seconds: float, log) -> dict[str, float]:
    """Stage 1: the vision tower learns per-patch labels for `seconds` (first on the
    low-resolution copy, when there is one, for config.low_res_share of the time)."""
    heads = PatchHeads(size.vision_hidden)
    if config.object_weight > 0:
        heads.objects = ObjectHeads(size.vision_hidden)
    max_steps = 6 if config.tiny else 1_000_000
    probe = config.probe_share * seconds if config.init is not None else 0.0
    # A tower that is already trained: fit fresh heads to it first (linear probe); the
    # stage's first loss is then the probe's.
    first = (_vision_phase(model, heads, pool, None, config, rng, probe, max_steps, log, tower=False)
             if probe > 0 else {})
    tuned = _vision_phase(model, heads, pool, low, config, rng, seconds - probe, max_steps, log, tower=True)
    return {**tuned, **{k: v for k, v in first.items() if k.startswith("first_")}}


def _vision_phase(model: LlavaForConditionalGeneration, heads: PatchHeads, pool: ScenePool,
                  low: tuple[torch.Tensor, torch.Tensor] | None, config: LmmTrainConfig, rng: np.random.Generator,
                  seconds: float, max_steps: int, log, tower: bool) -> dict[str, float]:
    """One phase of stage 1: the patch heads, and the tower too when `tower` (otherwise the
    tower runs without gradients: a cheap linear probe of its current features)."""
    params = list(heads.parameters()) + (list(model.model.vision_tower.parameters()) if tower else [])
    optimizer = torch.optim.AdamW(params, lr=config.vision_lr, weight_decay=0.01)
    schedule = BudgetSchedule(optimizer, warmup_steps=min(50, max_steps // 3))
    stats: dict[str, float] = {}
    start, step = time.time(), 0
    while step < max_steps and (time.time() < start + seconds or step < 2):
        idx = rng.integers(0, len(pool.scenes), 4 * config.batch_size).tolist()
        elapsed = step / max_steps if config.tiny else (time.time() - start) / seconds
        in_low = low is not None and elapsed < config.low_res_share
        pixels, labels = low if in_low else (pool.pixels, pool.patch_labels)
        with torch.set_grad_enabled(tower):
            feats = _vision_features(model, pixels[idx].float())
        loss, accs = heads(feats, labels[idx])
        if config.object_weight > 0 and not in_low:  # the covers are those of the full-size grid
            object_loss, object_accs = heads.objects(feats, [pool.covers[i] for i in idx],
                                                     [pool.scenes[i] for i in idx])
            loss, accs = loss + config.object_weight * object_loss, {**accs, **object_accs}
        schedule.set(step, max(step / max_steps, (time.time() - start) / seconds))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        stats.setdefault("first_vision_loss", loss.item())
        stats["vision_loss"] = loss.item()
        if step % 20 == 0:
            acc = " ".join(f"{n} {a:.2f}" for n, a in accs.items())
            phase = ("" if tower else "probe ") + ("low-res " if in_low else "")
            log(f"vision step {step} {phase}loss {loss.item():.3f} patch acc: {acc} ({time.time() - start:.0f}s)")
        step += 1
    return stats


@torch.no_grad()
def cache_vision_features(model: LlavaForConditionalGeneration, pool: ScenePool) -> torch.Tensor:
    """Freeze the tower and return its features of the whole pool: (N, g*g, D) float16."""
    model.model.vision_tower.requires_grad_(False).eval()
    return torch.cat([_vision_features(model, pool.pixels[i:i + 64].float()).half()
                      for i in range(0, len(pool.scenes), 64)])


def train_chat(model: LlavaForConditionalGeneration, processor: LlavaProcessor, pool: ScenePool,
               features: torch.Tensor, size: ModelSize, config: LmmTrainConfig, rng: np.random.Generator,
               deadline: float, log) -> dict[str, float]:
    """Stage 2 until `deadline` (time.time()): projector + language model on conversations,
    teacher-forced, plus config.attention_weight x the attention loss; eager attention so
    the supervised heads' weights are there to be trained."""
    model.model.language_model.config._attn_implementation = "eager"
    if config.answer_only:
        model.requires_grad_(False)
        last = model.model.language_model.layers[-1]
        for part in (last.post_attention_layernorm, last.mlp, model.model.language_model.norm, model.lm_head):
            part.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.chat_lr, weight_decay=0.01)
    max_steps = 8 if config.tiny else 1_000_000
    schedule = BudgetSchedule(optimizer, warmup_steps=min(100, max_steps // 4))
    stats: dict[str, float] = {}
    step, step_time, start = 0, 1.0, time.time()
    while step < max_steps and (time.time() + step_time < deadline or step < 2):
        idx = rng.integers(0, len(pool.scenes), config.batch_size).tolist()
        batch = chat_batch(processor, pool, idx, rng, size.grid ** 2, max_turns=3, ground_share=config.ground_share,
                           ground_turns=config.ground_turns, short_qa=config.short_qa,
                           vcot_share=config.vcot_share, balanced_share=config.balanced_share,
                           cue=config.cue_attention, groups=config.cue_groups,
                           near=config.cue_near)
        logits, attentions = _chat_logits(model, batch["input_ids"], batch["attention_mask"], features[idx].float())
        labels = batch["labels"]
        if (labels[:, 1:] != -100).any():
            chat_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        else:  # every chat of the batch is a grounding turn
            chat_loss = logits.new_zeros(())
        attn_loss = attention_loss(attentions, batch, model.config.image_token_id)
        loss = chat_loss + config.attention_weight * attn_loss
        schedule.set(step, max(step / max_steps, (time.time() - start) / max(1.0, deadline - start)))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step_time = (time.time() - start) / (step + 1)
        stats.setdefault("first_chat_loss", chat_loss.item())
        stats.setdefault("first_attention_loss", attn_loss.item())
        stats["chat_loss"] = chat_loss.item()
        stats["attention_loss"] = attn_loss.item()
        if step % 20 == 0:
            log(f"chat step {step} loss {chat_loss.item():.3f} attention {attn_loss.item():.3f} "
                f"({time.time() - start:.0f}s, {step_time:.2f}s/step)")
        step += 1
    return stats


def save(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out_dir: str | Path) -> None:
    """Weights as fp16 safetensors (half the size); config.json says float32, so a plain
    from_pretrained computes in float32, which CPUs run fastest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config._attn_implementation = "eager"
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    for part in (config, config.get("text_config", {}), config.get("vision_config", {})):
        if "dtype" in part:
            part["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    processor.save_pretrained(out)
    # A processor loaded from a folder records how it was loaded; that is not part of the model.
    tok_path = out / "tokenizer_config.json"
    tok_config = json.loads(tok_path.read_text())
    dropped = [tok_config.pop(k) for k in ("is_local", "local_files_only") if k in tok_config]
    if dropped:
        tok_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")


def load(folder: str | Path) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The saved model in float32 (eval mode) and its processor, offline."""
    if not (Path(folder) / "config.json").exists():
        raise FileNotFoundError(f"no model in {folder}; train one with "
                                f"`python -m flmm_demo.demo_world train-lmm --out {folder}`")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return model, processor


# ----------------------------------------------------------------------------- evaluation


def chat_inputs(processor: LlavaProcessor, images: list[Image.Image],
                prompts: list[list[tuple[str, str]] | str]) -> dict[str, torch.Tensor]:
    """Left-padded model inputs of each chat up to its assistant's next turn (earlier turns
    as (user, assistant); the image in the first user turn)."""
    texts = []
    for chat in prompts:
        turns = [(chat, None)] if isinstance(chat, str) else chat
        msgs = []
        for k, (user, assistant) in enumerate(turns):
            content = ([{"type": "image"}] if k == 0 else []) + [{"type": "text", "text": user}]
            msgs.append({"role": "user", "content": content})
            if assistant is not None:
                msgs.append({"role": "assistant", "content": [{"type": "text", "text": assistant}]})
        texts.append(processor.apply_chat_template(msgs, add_generation_prompt=True))
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


@torch.no_grad()
def answer(model: LlavaForConditionalGeneration, processor: LlavaProcessor, images: list[Image.Image],
           prompts: list[list[tuple[str, str]] | str], max_new_tokens: int = 48) -> list[str]:
    """Greedy answers to the last user message of each chat (earlier turns as (user, assistant))."""
    inputs = chat_inputs(processor, images, prompts)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [s.strip() for s in processor.batch_decode(out[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)]


@torch.no_grad()
def first_word_probability(model: LlavaForConditionalGeneration, processor: LlavaProcessor,
                           images: list[Image.Image], questions: list[str], word: str) -> list[float]:
    """The probability of `word` as the first word of the answer to each question: what
    the model believes before it has said anything. One chat per pass: unpadded, so the
    positions are those generation uses."""
    token = processor.tokenizer.convert_tokens_to_ids(word)
    return [model(**chat_inputs(processor, [image], [question])).logits[0, -1].softmax(-1)[token].item()
            for image, question in zip(images, questions)]


@torch.no_grad()
def _word_hits(model: LlavaForConditionalGeneration, processor: LlavaProcessor, scenes: list[S.Scene],
               n_image_tokens: int) -> dict[str, list[int]]:
    """Teacher-forced description: per word kind (colour, shape, size), [right, total] of
    the next-word predictions."""
    kinds = {"colour": set(S.COLOURS), "shape": set(S.SHAPES), "size": {w for w in S.SIZE_WORD.values() if w}}
    tok = processor.tokenizer
    hits = {k: [0, 0] for k in kinds}
    for scene in scenes:
        ids, labels = encode_chat(processor, [("describe the image.", S.describe(scene))], n_image_tokens)
        pixels = processor.image_processor(scene.pil(), return_tensors="pt").pixel_values
        logits = model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]
        pred = logits[:-1].argmax(-1).tolist()
        for p_id, y in zip(pred, labels[1:]):
            word = tok.convert_ids_to_tokens(y) if y != -100 else None
            for kind, words in kinds.items():
                if word in words:
                    hits[kind][0] += p_id == y
                    hits[kind][1] += 1
    return hits


def evaluate(folder: str | Path, seed: int = 777, n: int = 100, held_out: bool = False,
             batch_size: int = 16) -> dict[str, float]:
    """Exact-match accuracy on scenes of a seed not used in training.

    description: the generated description equals the canonical one. qa: one random
    question per scene, the answer exact. multi_turn: the question asked after the
    description turn. {colour,shape,size}_word: teacher-forced next-word accuracy on the
    description's words of that kind.
    """
    torch.set_num_threads(2)
    model, processor = load(folder)
    scenes = list(S.scene_stream(seed, n, held_out))
    rng = np.random.default_rng(seed)
    qas = [S.questions_and_answers(s, rng)[0] for s in scenes]
    desc_ok = qa_ok = mt_ok = 0
    for b in range(0, n, batch_size):
        chunk = scenes[b:b + batch_size]
        imgs = [s.pil() for s in chunk]
        descs = answer(model, processor, imgs, ["describe the image."] * len(chunk))
        answers = answer(model, processor, imgs, [q for q, _ in qas[b:b + batch_size]])
        multi = answer(model, processor, imgs, [[("describe the image.", S.describe(s)), (q, None)]
                                                for s, (q, _) in zip(chunk, qas[b:b + batch_size])])
        for s, d, a, m, (_, ref) in zip(chunk, descs, answers, multi, qas[b:b + batch_size]):
            desc_ok += d == S.describe(s)
            qa_ok += a == ref
            mt_ok += m == ref
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    words = _word_hits(model, processor, scenes, grid ** 2)
    out = {"description": desc_ok / n, "qa": qa_ok / n, "multi_turn_qa": mt_ok / n, "n": n}
    out.update({f"{k}_word": right / max(1, total) for k, (right, total) in words.items()})
    return out


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, single spaces: what exact match compares."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


_NAMED = re.compile(r"\b(?:a|an|the)\s+(?:(small|big)\s+)?(red|yellow|green|cyan|blue|purple)\s+"
                    r"(circle|square|triangle|cross)\b")


def hallucinated_phrases(description: str, scene: S.Scene) -> tuple[int, int]:
    """(phrases naming a colour and shape that no object of the scene has, phrases naming
    a colour and shape) in a description ('a small red circle, a blue square.')."""
    there = {(o.colour, o.shape) for o in scene.objects}
    named = [(m.group(2), m.group(3)) for m in _NAMED.finditer(description.lower())]
    return sum(n not in there for n in named), len(named)


@torch.no_grad()
def short_replies(model: LlavaForConditionalGeneration, processor: LlavaProcessor, scenes: list[S.Scene],
                  asked: list[tuple[int, str, str, str]], batch_size: int = 16) -> list[tuple[str, bool]]:
    """Ask each (scene index, kind, question, true answer) of asked as a chat's first turn:
    (the reply after normalise_answer, whether it matches the true answer exactly)."""
    out: list[tuple[str, bool]] = []
    for b in range(0, len(asked), batch_size):
        chunk = asked[b:b + batch_size]
        replies = answer(model, processor, [scenes[k].pil() for k, _, _, _ in chunk], [q for _, _, q, _ in chunk],
                         max_new_tokens=16)
        for (_, _, _, a), reply in zip(chunk, replies):
            reply = normalise_answer(reply)
            out.append((reply, reply == normalise_answer(a)))
    return out


def evaluate_answers(model: LlavaForConditionalGeneration, processor: LlavaProcessor, scenes: list[S.Scene],
                     seed: int, batch_size: int = 16) -> dict[str, float]:
    """On these scenes: the share of exact descriptions, the share of described phrases
    that name a shape not in the scene ('hallucinated'), and the exact match (after
    normalise_answer) of one short question of each kind (scenes.QUESTION_KINDS) per
    scene, asked as the first turn: per kind and over all ('question')."""
    rng = np.random.default_rng(seed)
    asked: list[tuple[int, str, str, str]] = []  # (scene, kind, question, answer)
    for k, scene in enumerate(scenes):
        by_kind: dict[str, list[tuple[str, str]]] = {}
        for kind, q, a in S.short_questions(scene, rng):
            by_kind.setdefault(kind, []).append((q, a))
        for kind, qas in by_kind.items():
            q, a = qas[int(rng.integers(0, len(qas)))]
            asked.append((k, kind, q, a))
    exact = wrong = named = 0
    for b in range(0, len(scenes), batch_size):
        chunk = scenes[b:b + batch_size]
        for scene, d in zip(chunk, answer(model, processor, [s.pil() for s in chunk], [DESCRIBE] * len(chunk))):
            exact += d == S.describe(scene)
            w, n = hallucinated_phrases(d, scene)
            wrong, named = wrong + w, named + n
    right: dict[str, list[bool]] = {kind: [] for kind in S.QUESTION_KINDS}
    for (_, kind, _, _), (_, ok) in zip(asked, short_replies(model, processor, scenes, asked, batch_size)):
        right[kind].append(ok)
    out = {"description": exact / max(1, len(scenes)), "hallucinated_phrases": wrong / max(1, named),
           "named_phrases": named, "n": len(scenes)}
    out.update({f"question_{kind}": float(np.mean(v)) if v else float("nan") for kind, v in right.items()})
    every = [x for v in right.values() for x in v]
    out["question"] = float(np.mean(every)) if every else float("nan")
    out["questions"] = len(every)
    return out
