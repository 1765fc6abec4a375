"""The demo world: scenes, their language, the refer layout, the tokenizer and the tiny LLaVA."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flmm_demo.demo_world import (  # noqa: E402
    DEFAULT_LMM_DIR,
    describe,
    make_scene,
    questions_and_answers,
    referring_expressions,
    scene_stream,
    write_refer_dataset,
)
from flmm_demo.demo_world.scenes import COLOURS, SHAPES, SIZE_WORD  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_same_seed_gives_identical_scenes_and_text():
    a, b, c = make_scene(11), make_scene(11), make_scene(12)
    assert np.array_equal(a.image, b.image)
    assert describe(a) == describe(b)
    assert referring_expressions(a) == referring_expressions(b)
    qa = [questions_and_answers(s, np.random.default_rng(0)) for s in (a, b)]
    assert qa[0] == qa[1]
    assert not np.array_equal(a.image, c.image) or describe(a) != describe(c)


def test_scenes_vary_in_size_and_count_and_held_out_is_crowded():
    scenes = list(scene_stream(3, 30))
    sizes = {s.size for s in scenes}
    counts = {len(s.objects) for s in scenes}
    assert len(sizes) > 10 and all(160 <= min(wh) and max(wh) <= 320 for wh in sizes)
    assert counts == {2, 3, 4, 5}
    crowded = list(scene_stream(3, 4, held_out=True))
    assert all(len(s.objects) in (6, 7) for s in crowded)


def test_masks_are_exact_disjoint_and_painted_in_their_colour():
    for scene in scene_stream(5, 12):
        w, h = scene.size
        union = np.zeros((h, w), dtype=int)
        for obj in scene.objects:
            assert obj.mask.shape == (h, w) and obj.mask.dtype == bool
            assert obj.mask.sum() > 50
            union += obj.mask
            mean = scene.image[obj.mask].mean(0)
            assert np.abs(mean - np.array(COLOURS[obj.colour])).max() < 30, (obj.colour, mean)
        assert union.max() == 1  # visible masks never overlap
        xs = [o.cx for o in scene.objects]
        assert xs == sorted(xs)  # canonical order: left to right


def test_description_lists_objects_left_to_right():
    scene = make_scene(21)
    text = describe(scene)
    assert text.endswith(".")
    positions = [text.index(f"{o.colour} {o.shape}") for o in scene.objects]
    assert positions == sorted(positions)


def _matches(expr: str, scene) -> list[int]:
    """An independent reading of a referring expression: the objects it fits."""
    rels = {"left of": lambda a, b: a.cx < b.cx, "right of": lambda a, b: a.cx > b.cx,
            "above": lambda a, b: a.cy < b.cy, "below": lambda a, b: a.cy > b.cy}
    for rel, test in rels.items():
        if f" {rel} " in expr:
            head, anchor = expr.split(f" {rel} ")
            (a,) = _matches(anchor, scene)
            return [i for i in _matches(head, scene) if i != a and test(scene.objects[i], scene.objects[a])]
    words = expr.split()[1:]
    size_of = {v: k for k, v in SIZE_WORD.items() if v}
    out = []
    for i, o in enumerate(scene.objects):
        ok = words[-1] == o.shape
        ok &= all(w == o.colour for w in words[:-1] if w in COLOURS)
        ok &= all(size_of[w] == o.size for w in words[:-1] if w in size_of)
        if ok:
            out.append(i)
    return out


def test_referring_expressions_name_exactly_their_object():
    n_relational = 0
    for scene in scene_stream(8, 20):
        for i, names in enumerate(referring_expressions(scene)):
            for name in names:
                assert _matches(name, scene) == [i], (name, describe(scene))
                n_relational += " of " in name or " above " in name or " below " in name
    assert n_relational > 20


def test_annotated_answers_spell_the_plain_text_and_point_at_the_named_objects():
    from flmm_demo.demo_world.scenes import describe_segments, questions_and_answer_segments, text_of

    relational = 0
    for scene in scene_stream(7, 12):
        objs = scene.objects
        assert text_of(describe_segments(scene)) == describe(scene)
        annotated = questions_and_answer_segments(scene, np.random.default_rng(1))
        assert [(q, text_of(a)) for q, a in annotated] == questions_and_answers(scene, np.random.default_rng(1))
        refs = referring_expressions(scene)
        for question, segments in [("describe", describe_segments(scene))] + annotated:
            for k, (text, mentioned, referent) in enumerate(segments):
                if mentioned is None:
                    assert referent is None
                    continue
                words = text.split()
                assert objs[mentioned].shape in words or objs[mentioned].colour in words, (text, objs[mentioned])
                if referent != mentioned:  # the anchor of "the X left of <anchor>"
                    relational += 1
                    expression = segments[k - 1][0] + text
                    assert segments[k - 1][1:] == (referent, referent)
                    assert expression in refs[referent]
            if question.startswith("which shape is the ") and question not in (
                    "which shape is the biggest?", "which shape is the smallest?"):
                expression = question[len("which shape is "):-1]
                named = [i for i, names in enumerate(refs) if expression in names]
                assert len(named) == 1 and segments[0][2] == named[0], (question, segments)
    assert relational > 0


def test_annotated_encoding_marks_the_tokens_of_each_mention():
    from flmm_demo.demo_world.lmm import encode_annotated_chat, encode_chat
    from flmm_demo.demo_world.scenes import describe_segments
    from flmm_demo.demo_world.tokenizer import build_processor

    processor = build_processor(image_size=64, patch_size=8)
    scene = make_scene(2)
    turns = [("describe the image.", describe_segments(scene))]
    ids, labels, mention, referent = encode_annotated_chat(processor, turns, n_image_tokens=64)
    assert (ids, labels) == tuple(encode_chat(processor, [("describe the image.", describe(scene))], 64))
    assert mention == referent and len(mention) == len(ids)
    tok = processor.tokenizer
    for k, obj in enumerate(scene.objects):
        words = tok.convert_ids_to_tokens([t for t, m in zip(ids, mention) if m == k])
        assert words == ["a"] + obj.phrase.split()
    assert all(m == -1 for m, y in zip(mention, labels) if y == -100)


def test_grounding_turns_are_expressions_for_the_attention_loss_only():
    from flmm_demo.demo_world.lmm import encode_annotated_chat
    from flmm_demo.demo_world.scenes import DESCRIBE_PROMPTS, grounding_turn, text_of
    from flmm_demo.demo_world.tokenizer import build_processor

    processor = build_processor(image_size=64, patch_size=8)
    rng = np.random.default_rng(0)
    counts = set()
    for scene in scene_stream(11, 12):
        refs = referring_expressions(scene)
        prompt, segments = grounding_turn(scene, rng)
        assert prompt in DESCRIBE_PROMPTS
        # Each comma-separated expression names exactly one object, and its words refer to it.
        expressions = text_of(segments).split(", ")
        counts.add(len(expressions))
        referents = [r for _, _, r in segments if r is not None]
        named = [next(i for i, names in enumerate(refs) if e in names) for e in expressions]
        assert len(set(named)) == len(named) and set(referents) == set(named)
        ids, labels, mention, referent = encode_annotated_chat(processor, [(prompt, segments)], 64, answer_loss=False)
        assert set(labels) == {-100}  # no language-model loss on these answers
        assert {r for r in referent if r >= 0} == set(named)
        ids2, labels2, _, referent2 = encode_annotated_chat(processor, [(prompt, segments)], 64)
        assert ids2 == ids and referent2 == referent and any(y != -100 for y in labels2)
    assert len(counts) > 1


def test_grounding_chats_hold_several_turns_over_one_image():
    from flmm_demo.demo_world.lmm import chat_batch, make_pool
    from flmm_demo.demo_world.tokenizer import IMAGE_TOKEN, build_processor

    processor = build_processor(image_size=64, patch_size=8)
    tok = processor.tokenizer
    pool = make_pool(21, 4, processor, grid=8)
    batch = chat_batch(processor, pool, [0, 1, 2, 3], np.random.default_rng(0), 64, max_turns=3,
                       ground_share=1.0, ground_turns=3)
    assert (batch["labels"] == -100).all()  # grounding chats teach attention only
    assistant = tok.encode("ASSISTANT:", add_special_tokens=False)
    for b in range(4):
        ids = batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist()
        assert ids.count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) == 64  # the image once, in the first turn
        starts = [t for t in range(len(ids)) if ids[t:t + len(assistant)] == assistant]
        assert len(starts) == 3
        # Every turn's answer names objects of this scene, each token pointing at one of them.
        referents = batch["referent"][b]
        n_objects = len(pool.scenes[b].objects)
        for k, start in enumerate(starts):
            end = starts[k + 1] if k + 1 < len(starts) else len(ids)
            named = referents[start:end]
            assert (named >= 0).any() and int(named.max()) < n_objects


def test_attention_loss_is_lowest_when_the_heads_look_at_the_named_object():
    from flmm_demo.demo_world.lmm import MENTION_HEADS, REFERENT_HEADS, attention_loss
    from flmm_demo.demo_world.tokenizer import IMAGE_TOKEN, build_processor

    image_id = build_processor(64, 8).tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    T, layers, heads = 8, 4, 2
    ids = torch.tensor([[2, image_id, image_id, image_id, image_id, 10, 11, 3]])
    covers = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]])
    mention = torch.tensor([[-1, -1, -1, -1, -1, 0, 1, -1]])  # token 5 names object 0, token 6 object 1
    referent = torch.tensor([[-1, -1, -1, -1, -1, 0, 0, -1]])  # ... but both are about object 0
    batch = {"input_ids": ids, "mention": mention, "referent": referent, "covers": covers}

    def attentions(rows_for):
        att = torch.full((1, heads, T, T), 1.0 / T)
        for head in range(heads):
            for t in (5, 6):
                att[0, head, t] = 0.0
                att[0, head, t, 1:5] = rows_for(head, t)
        return tuple(att.clone() for _ in range(layers))

    def named(head, t):
        return int((mention if head == 0 else referent)[0, t])

    right = attention_loss(attentions(lambda head, t: covers[0, named(head, t)]), batch, image_id)
    wrong = attention_loss(attentions(lambda head, t: covers[0, 1 - named(head, t)]), batch, image_id)
    uniform = attention_loss(attentions(lambda head, t: torch.full((4,), 0.25)), batch, image_id)
    # Looking exactly at the target costs its entropy: log 2 for object 0, 0 for object 1.
    # Mention heads average tokens 5 and 6 (log 2 / 2); referent heads see object 0 twice.
    n_m, n_r = len(MENTION_HEADS), len(REFERENT_HEADS)
    expected = (n_m * 0.5 + n_r * 1.0) / (n_m + n_r) * np.log(2)
    assert abs(right.item() - expected) < 1e-4
    assert right < uniform < wrong


def test_refer_dataset_loads_with_consistent_ids(tmp_path):
    from pycocotools import mask as mask_utils

    write_refer_dataset(tmp_path, 3, seed=1, split="train")
    write_refer_dataset(tmp_path, 2, seed=2, split="val")
    coco = json.loads((tmp_path / "instances.json").read_text())
    refs = pickle.loads((tmp_path / "refs(unc).p").read_bytes())
    images = {im["id"]: im for im in coco["images"]}
    anns = {a["id"]: a for a in coco["annotations"]}
    assert len(images) == 5 and len(anns) == len(coco["annotations"])
    assert {c["name"] for c in coco["categories"]} == set(SHAPES)
    assert {r["split"] for r in refs} == {"train", "val"}
    assert len({r["ref_id"] for r in refs}) == len(refs)
    for ref in refs:
        ann = anns[ref["ann_id"]]
        im = images[ref["image_id"]]
        assert ann["image_id"] == ref["image_id"] and ann["category_id"] == ref["category_id"]
        assert (tmp_path / "images" / im["file_name"]).exists()
        m = mask_utils.decode(ann["segmentation"])
        assert m.shape == (im["height"], im["width"]) and m.sum() == ann["area"]
        x, y, w, h = ann["bbox"]
        assert m[y:y + h, x:x + w].sum() == ann["area"]
        assert all(set(s) >= {"sent", "tokens", "raw", "sent_id"} for s in ref["sentences"])


def test_tokenizer_round_trips_scene_text_with_offsets():
    from flmm_demo.demo_world.tokenizer import build_tokenizer

    tok = build_tokenizer()
    rng = np.random.default_rng(0)
    for scene in scene_stream(4, 5):
        for text in [describe(scene)] + [t for qa in questions_and_answers(scene, rng)[:5] for t in qa]:
            enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
            assert tok.unk_token_id not in enc.input_ids, text
            assert tok.decode(enc.input_ids) == text
            words = [text[a:b] for a, b in enc.offset_mapping]
            assert words == tok.convert_ids_to_tokens(enc.input_ids)


def test_chat_template_and_training_encoding_agree():
    from flmm_demo.demo_world.lmm import encode_chat
    from flmm_demo.demo_world.tokenizer import build_processor

    processor = build_processor(image_size=64, patch_size=8)
    scene = make_scene(2)
    turns = [("describe the image.", describe(scene)), ("how many shapes are there?", "there are two shapes.")]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turns[0][0]}]},
            {"role": "assistant", "content": [{"type": "text", "text": turns[0][1]}]},
            {"role": "user", "content": [{"type": "text", "text": turns[1][0]}]},
            {"role": "assistant", "content": [{"type": "text", "text": turns[1][1]}]}]
    text = processor.apply_chat_template(msgs)
    ids = processor(images=scene.pil(), text=text, return_tensors="pt").input_ids[0].tolist()
    mine, labels = encode_chat(processor, turns, n_image_tokens=64)
    assert ids == mine
    answer_text = processor.tokenizer.decode([t for t, y in zip(mine, labels) if y != -100], skip_special_tokens=True)
    assert answer_text == turns[0][1] + " " + turns[1][1]


def test_tiny_training_lowers_the_loss_and_saves_a_loadable_llava(tiny_demo_lmm, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from flmm_demo.demo_world.lmm import LmmTrainConfig, train

    lmm, stats = tiny_demo_lmm  # train(LmmTrainConfig(lmm, seed=0, tiny=True)), shared with the e2e miniature run
    assert stats["vision_loss"] < stats["first_vision_loss"]
    assert stats["chat_loss"] < stats["first_chat_loss"]
    processor = AutoProcessor.from_pretrained(lmm)
    assert processor.tokenizer.decode(processor.tokenizer("the red circle")["input_ids"], skip_special_tokens=True) \
        == "the red circle"
    model = LlavaForConditionalGeneration.from_pretrained(lmm)
    assert next(model.parameters()).dtype == torch.float32
    assert (lmm / "model.safetensors").stat().st_size < 2 * 2**20

    # Continuing from it with grounding turns trains the language side only.
    stats = train(LmmTrainConfig(tmp_path / "lmm2", seed=0, tiny=True, init=lmm, ground_share=0.5,
                                 ground_turns=2, chat_lr=5e-4), log=lambda _: None)
    assert "vision_loss" not in stats and stats["attention_loss"] < stats["first_attention_loss"]
    model2 = LlavaForConditionalGeneration.from_pretrained(tmp_path / "lmm2")
    before, after = model.state_dict(), model2.state_dict()
    tower = [k for k in before if "vision_tower" in k]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower)
    assert any(not torch.equal(before[k], after[k]) for k in before if "language_model" in k)

    # On the wide world with short answers and the tower tuned: the tower moves too, after
    # a linear probe that fits the fresh patch heads to the frozen tower first.
    lines: list[str] = []
    stats = train(LmmTrainConfig(tmp_path / "lmm3", seed=1, tiny=True, init=tmp_path / "lmm2", tune_vision=True,
                                 probe_share=0.5, vision_lr=5e-4, wide_share=0.5, short_qa=True), log=lines.append)
    assert stats["vision_loss"] < stats["first_vision_loss"]
    vision_lines = [line for line in lines if line.startswith("vision step")]
    assert [" probe " in line for line in vision_lines] == [True, False]  # one log line per phase (steps 0)
    model3 = LlavaForConditionalGeneration.from_pretrained(tmp_path / "lmm3")
    assert any(not torch.equal(after[k], model3.state_dict()[k]) for k in tower)


def test_a_new_rope_base_is_used_saved_and_loaded(tmp_path):
    from flmm_demo.demo_world.lmm import TINY, build_model, load, save, set_rope_theta

    model, processor = build_model(TINY, seed=0)
    ids = torch.tensor([[2, 10, 11, 12, 13, 14]])
    before = model.model.language_model(input_ids=ids).last_hidden_state
    slowest = model.model.language_model.rotary_emb.inv_freq[-1].item()
    set_rope_theta(model, 1e6)
    after = model.model.language_model(input_ids=ids).last_hidden_state
    assert model.model.language_model.rotary_emb.inv_freq[-1].item() < slowest / 10  # slower rotations
    assert not torch.allclose(before, after)  # positions now enter differently
    save(model, processor, tmp_path / "lmm")
    loaded, _ = load(tmp_path / "lmm")
    assert loaded.config.text_config.rope_parameters["rope_theta"] == 1e6
    assert torch.allclose(loaded.model.language_model(input_ids=ids).last_hidden_state, after, atol=1e-2)


def test_a_longer_context_changes_no_output_and_is_saved(tmp_path):
    from transformers import AutoProcessor

    from flmm_demo.demo_world.lmm import TINY, build_model, load, save, set_context

    model, processor = build_model(TINY, seed=0)
    ids = torch.randint(5, 40, (1, 1500))
    ids[0, 0] = 2
    before = model.model.language_model(input_ids=ids[:, :600]).last_hidden_state
    set_context(model, processor, 2048)
    save(model, processor, tmp_path / "lmm")
    loaded, _ = load(tmp_path / "lmm")
    assert loaded.config.text_config.max_position_embeddings == 2048
    assert AutoProcessor.from_pretrained(tmp_path / "lmm").tokenizer.model_max_length == 2048
    # rotary positions: the same outputs (up to the fp16 weights saved), and 1,500 tokens run
    assert torch.allclose(loaded.model.language_model(input_ids=ids[:, :600]).last_hidden_state, before, atol=1e-2)
    assert torch.isfinite(loaded.model.language_model(input_ids=ids).last_hidden_state).all()


@pytest.mark.skipif(not (REPO / DEFAULT_LMM_DIR / "config.json").exists(), reason="no shipped checkpoint")
def test_shipped_checkpoint_describes_generated_scenes():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from flmm_demo.demo_world.lmm import answer

    folder = REPO / DEFAULT_LMM_DIR
    assert all(f.stat().st_size < 20 * 2**20 for f in folder.iterdir())
    processor = AutoProcessor.from_pretrained(folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    scenes = list(scene_stream(99, 4))
    texts = answer(model, processor, [s.pil() for s in scenes], ["Please give me a description of the image."] * 4)
    colours_right = 0
    for scene, text in zip(scenes, texts):
        assert text.startswith("a ") and text.endswith("."), text
        colours_right += scene.objects[0].colour in text.split()
    assert colours_right >= 3, texts


def test_rebuild_recipe_parses_chains_and_ends_in_the_shipped_folders(capsys):
    from transformers import HfArgumentParser

    from flmm_demo.training.train import TrainConfig
    from flmm_demo.demo_world import recipe
    from flmm_demo.demo_world.__main__ import build_parser, rebuild

    demo_parser = build_parser()
    head_parser = HfArgumentParser(TrainConfig)
    made: list[str] = []
    for step in recipe.STEPS:
        if step.module == "flmm_demo.demo_world":
            args = demo_parser.parse_args(list(step.args))  # every flag is one the command takes
            assert args.out == step.out
            if getattr(args, "init", None):  # each round continues an earlier one (its folder or a file in it)
                assert args.init in made or str(Path(args.init).parent) in made, args.init
        else:
            assert step.args[0] == "train"
            args = head_parser.parse_args(list(step.args[1:]))
            # The head learns the maps of round 21's LMM, made by an earlier step (rounds 22 and 23, whose
            # LMM ships, continue it).
            assert args.model == recipe.HEAD_LMM and recipe.HEAD_LMM in made
            assert str(args.data) in made and str(args.out) == step.out
            # The refiner is trained on the demo world's SAM, made by an earlier step.
            assert str(args.sam) == recipe.FINAL_SAM and args.sam_variant == "vit_tiny"
            assert any(recipe.FINAL_SAM.startswith(out + "/") for out in made)
        made.append(step.out)
    assert recipe.FINAL_LMM in made and recipe.FINAL_HEAD.startswith(recipe.STEPS[-1].out)
    # From the attention LMM (round 9) to the shipped one, only the cue rounds (rounds 13-23) and
    # the tower rounds (16, 18 and 20-23) change what the maps are made of; every other one is an
    # answer round, which keeps every map.
    lmm_rounds = [s.out for s in recipe.STEPS if s.args[0] == "train-lmm"]
    after = lmm_rounds[lmm_rounds.index(recipe.ATTENTION_LMM) + 1:]
    assert after and after[-1] == recipe.FINAL_LMM
    rounds = {s.out: demo_parser.parse_args(list(s.args)) for s in recipe.STEPS if s.out in after}
    cues = (recipe.CUE_LMM, recipe.NEAR_LMM, *(cue for _, cue, _ in recipe.TOWER_CHAINS))
    assert [out for out, a in rounds.items() if not a.answer_only] == [
        *cues[:2], *(out for tower, cue, _ in recipe.TOWER_CHAINS for out in (tower, cue))]
    assert recipe.HEAD_LMM in after and rounds[recipe.HEAD_LMM].answer_only
    assert all(rounds[out].cue_attention and rounds[out].attention_weight > 0 for out in cues)

    rebuild(dry_run=True, root="/nonexistent")  # prints every command, runs none
    printed = capsys.readouterr().out
    assert all(step.command() in printed for step in recipe.STEPS)
    assert printed.count("(to run)") == len(recipe.STEPS)
