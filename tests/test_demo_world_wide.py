"""The wide demo world (what users draw), its short answers, the trainers' schedule,
visual chain of thought within the demo model's context, and the app's photo notice."""
from __future__ import annotations

import itertools
import math
import os
import re
from collections import Counter
from pathlib import Path

import cv2

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flmm_demo.demo_world import scenes as S  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wide_scenes() -> list[S.Scene]:
    return list(S.scene_stream(31, 60, wide=True))


def test_the_classic_world_is_untouched_by_the_wide_option():
    a, b = S.make_scene(12), S.make_scene(12, wide=False)
    assert np.array_equal(a.image, b.image) and a.background == "textured" and a.jpeg_quality is None
    assert all(abs(o.angle) <= 0.2 for s in S.scene_stream(3, 20) for o in s.objects)
    assert all(2 <= len(s.objects) <= 5 for s in S.scene_stream(3, 20))


def test_wide_scenes_cover_every_factor(wide_scenes):
    backgrounds = Counter(s.background for s in wide_scenes)
    assert set(backgrounds) == set(S.BACKGROUNDS)
    aspects = [max(s.size) / min(s.size) for s in wide_scenes]
    assert max(aspects) <= S.WIDE_MAX_ASPECT + 0.01 and max(aspects) > 1.7
    counts = Counter(len(s.objects) for s in wide_scenes)
    assert min(counts) == 1 and max(counts) == 7
    objects = [o for s in wide_scenes for o in s.objects]
    assert {o.size for o in objects} == set(S.WIDE_SIZES)
    assert 0.1 < np.mean([not o.filled for o in objects]) < 0.4
    turned = [o.rotation_degrees for o in objects if o.shape == "square"]
    assert max(turned) > 35 and min(turned) < 10
    assert 0.4 < np.mean([s.jpeg_quality is not None for s in wide_scenes]) < 0.9
    short = [min(s.size) for s in wide_scenes]
    diameters = [o.diameter / min(s.size) for s in wide_scenes for o in s.objects]
    assert min(short) >= 128 and max(short) <= 320 and min(diameters) < 0.12 and max(diameters) > 0.4
    # Overlap: some shape is partly hidden, none below the minimum visible share.
    assert any(o.mask.sum() < 0.9 * _full_area(o) for o in objects if o.filled)


def _full_area(obj: S.SceneObject) -> float:
    return float(S._shape_mask(obj.shape, obj.cx, obj.cy, obj.diameter, obj.angle, *obj.mask.shape[::-1]).sum())


@pytest.mark.parametrize("seed", range(6))
def test_a_square_is_drawn_at_the_angle_it_claims(seed):
    rng = np.random.default_rng(seed)
    angle = float(rng.uniform(0, 2 * math.pi))
    obj = S.SceneObject("red", "square", "big", 100.0, 100.0, 120.0, 0, np.zeros((1, 1), bool), angle)
    mask = S._shape_mask("square", 100, 100, 120, angle, 200, 200)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    (_, _), (_, _), drawn = cv2.minAreaRect(contours[0])
    drawn = drawn % 90
    seen = min(drawn, 90 - drawn)
    assert seen == pytest.approx(obj.rotation_degrees, abs=2.0)


def test_backgrounds_outlines_and_jpeg_are_what_the_scene_says(wide_scenes):
    for scene in wide_scenes:
        background = ~np.any([o.mask for o in scene.objects], axis=0)
        level = scene.image[background].mean()
        if scene.background == "white":
            assert level > 225
        elif scene.background == "black":
            assert level < 45
        elif scene.background == "noisy":
            assert scene.image[background].std() > 8
        for obj in scene.objects:
            if not obj.filled:  # only the outline is the object: its centre shows the background
                assert not obj.mask[int(obj.cy), int(obj.cx)] or obj.shape == "cross"
                assert obj.mask.sum() < 0.8 * _full_area(obj)  # less than the filled shape
    jpeg = next(s for s in wide_scenes if s.jpeg_quality is not None)
    again = S.make_scene(jpeg.seed, 1, 7, wide=True)
    assert np.array_equal(jpeg.image, again.image)  # deterministic, artefacts included


def _referent(scene: S.Scene, expression: str) -> S.SceneObject:
    (obj,) = [o for o, names in zip(scene.objects, S.referring_expressions(scene)) if expression in names]
    return obj


def _check_short_answer(scene: S.Scene, question: str, answer: str) -> None:
    """Fail unless answer is the right short answer to question about scene."""
    objs = scene.objects
    assert answer == answer.strip() and "." not in answer and len(answer.split()) <= 3
    if m := re.fullmatch(r"(?:what colou?r|which colour) is (.+)\?", question):
        assert answer == _referent(scene, m.group(1)).colour
    elif m := re.fullmatch(r"(?:what shape is the (\w+) (?:one|object)|what is the (\w+) shape)\?", question):
        colour = m.group(1) or m.group(2)
        (obj,) = [o for o in objs if o.colour == colour]
        assert answer == obj.shape
    elif question in ("how many shapes are there?", "how many objects are there?"):
        assert answer == S.NUMBERS[len(objs)]
    elif m := re.fullmatch(r"how many (\w+) are there\?", question):
        shape = {v: k for k, v in S.PLURALS.items()}[m.group(1)]
        assert answer == S.NUMBERS[sum(o.shape == shape for o in objs)]
    elif m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        assert answer == S.NUMBERS[sum(o.colour == m.group(1) for o in objs)]
    elif m := re.fullmatch(r"where is (.+)\?", question):
        x = _referent(scene, m.group(1)).cx / scene.size[0]
        assert answer == ("on the left" if x < 1 / 3 else "in the middle" if x < 2 / 3 else "on the right")
    elif m := re.fullmatch(r"is (.+) on the left or on the right\?", question):
        assert answer == ("left" if _referent(scene, m.group(1)).cx < scene.size[0] / 2 else "right")
    elif m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        assert answer == ("yes" if any((o.colour, o.shape) == m.groups() for o in objs) else "no")
    elif m := re.fullmatch(r"are there any (\w+)\?", question):
        shape = {v: k for k, v in S.PLURALS.items()}[m.group(1)]
        assert answer == ("yes" if any(o.shape == shape for o in objs) else "no")
    elif m := re.fullmatch(r"is (.+) (\w+)\?", question):
        assert answer == ("yes" if _referent(scene, m.group(1)).colour == m.group(2) else "no")
    else:
        pytest.fail(f"unchecked question {question!r}")


def test_short_answers_are_right_for_generated_scenes(wide_scenes):
    kinds = Counter()
    for scene in wide_scenes + list(S.scene_stream(5, 20)):
        for kind, question, answer in S.short_questions(scene, np.random.default_rng(scene.seed)):
            kinds[kind] += 1
            _check_short_answer(scene, question, answer)
    assert set(kinds) == set(S.QUESTION_KINDS) and min(kinds.values()) >= 20


def test_balanced_chats_ask_every_kind_alike_and_each_answer_is_right(wide_scenes):
    kinds, answers = Counter(), {kind: Counter() for kind in S.QUESTION_KINDS}
    for scene in wide_scenes + list(S.scene_stream(5, 40)):
        turns = S.balanced_short_turns(scene, np.random.default_rng(scene.seed), 4)
        assert len(turns) == 4 and len({q for _, q, _ in turns}) == 4  # four different questions
        for kind, question, segments in turns:
            kinds[kind] += 1
            answers[kind][S.text_of(segments)] += 1
            _check_short_answer(scene, question, S.text_of(segments))
    total = sum(kinds.values())
    assert all(0.12 < kinds[kind] / total < 0.3 for kind in S.QUESTION_KINDS), kinds
    # the rare answers get their share: no answer of a kind crowds out the others
    assert answers["position"]["in the middle"] > 0.2 * sum(answers["position"].values())
    assert answers["count"]["one"] > 0.15 * sum(answers["count"].values())
    assert 0.35 < answers["yes/no"]["no"] / sum(answers["yes/no"].values()) < 0.65
    # a chat of balanced questions, as training draws it (with balanced_share 1): short questions only
    for scene in wide_scenes[:20]:
        chat = S.annotated_conversation(scene, np.random.default_rng(scene.seed), max_turns=3, short=True,
                                        balanced_share=1.0)
        assert 1 <= len(chat) <= 3
        for question, segments in chat:
            _check_short_answer(scene, question, S.text_of(segments))


def test_short_qa_chats_replace_the_sentence_answers_and_every_word_is_known():
    from flmm_demo.demo_world.tokenizer import build_tokenizer

    tok = build_tokenizer()
    for scene in S.scene_stream(8, 10, wide=True):
        rng = np.random.default_rng(scene.seed)
        qa = S.questions_and_answers(scene, rng, short=True)
        assert not any(q.startswith("what colour is") and a.endswith(".") for q, a in qa)
        for q, a in qa:
            assert tok.unk_token_id not in tok(f"{q} {a}")["input_ids"], (q, a)


def test_chats_teach_visual_chain_of_thoughts_probe_on_the_object_the_question_names():
    from flmm_demo.prompts import VCOT_HINT, VCOT_LEAD, VCOT_REGION_ALONE

    hint, lead, preamble = VCOT_HINT.lower(), VCOT_LEAD.lower(), VCOT_REGION_ALONE.lower()
    probes = prefixed = 0
    for scene in S.scene_stream(21, 40, wide=True):
        rng = np.random.default_rng(scene.seed)
        chat = S.annotated_conversation(scene, rng, max_turns=3, short=True, vcot_share=1.0)
        refs = S.referring_expressions(scene)
        for user, segments in chat:
            answer = S.text_of(segments)
            if user.endswith(hint):
                probes += 1
                question = user[:-len(hint)].strip()
                expression = answer[len(lead) + 1:-1]
                assert answer.startswith(lead + " ") and answer.endswith(".")
                named = [i for i, names in enumerate(refs) if expression in names]
                assert len(named) == 1 and expression in question, (user, answer)
                # every word of the expression points at the object (an anchor's words mention the anchor)
                pointed = [(t, m, r) for t, m, r in segments if r is not None]
                assert "".join(t for t, _, _ in pointed) == expression
                assert {r for _, _, r in pointed} == set(named)
                assert chat.index((user, segments)) <= 1  # first question, maybe after the description
            elif user.startswith(preamble):
                prefixed += 1
            else:  # with vcot_share 1 every question has the preamble
                assert user in S.DESCRIBE_PROMPTS, user
    assert probes >= 30 and prefixed >= 10
    # the default chats are unchanged: no probe and no preamble
    for scene in S.scene_stream(21, 10, wide=True):
        for user, _ in S.annotated_conversation(scene, np.random.default_rng(0), short=True):
            assert hint not in user and preamble not in user


def test_answer_only_training_leaves_every_attention_map_as_it_was(tiny_demo_lmm, tmp_path):
    from flmm_demo.demo_world.lmm import LmmTrainConfig, encode_chat, load, train

    lmm, _ = tiny_demo_lmm
    train(LmmTrainConfig(tmp_path / "answers", seed=3, tiny=True, init=lmm, short_qa=True, balanced_share=1.0,
                         answer_only=True, chat_lr=1e-2, attention_weight=0.0), log=lambda _: None)
    (before, processor), (after, _) = load(lmm), load(tmp_path / "answers")
    old, new = before.state_dict(), after.state_dict()
    moved = {k for k in old if not torch.equal(old[k], new[k])}
    last = before.config.text_config.num_hidden_layers - 1
    assert moved and all(k.startswith(("lm_head.", "model.language_model.norm.",
                                       f"model.language_model.layers.{last}.mlp.",
                                       f"model.language_model.layers.{last}.post_attention_layernorm."))
                         for k in moved), sorted(moved)
    # the same chat through both: identical attention weights in every layer, other logits
    scene = S.make_scene(4)
    ids, _ = encode_chat(processor, [(S.DESCRIBE_PROMPTS[0], S.describe(scene))],
                         before.config.image_seq_length)
    pixels = processor.image_processor(scene.pil(), return_tensors="pt").pixel_values
    for m in (before, after):
        m.set_attn_implementation("eager")  # sdpa returns no attention weights
    outs = [m(input_ids=torch.tensor([ids]), pixel_values=pixels, output_attentions=True) for m in (before, after)]
    assert len(outs[0].attentions) == last + 1
    for a, b in zip(outs[0].attentions, outs[1].attentions):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(outs[0].logits, outs[1].logits, atol=1e-3)


@pytest.mark.skipif(not (REPO / "checkpoints/demo-shapes/lmm/model.safetensors").exists(), reason="no demo LMM")
def test_a_model_of_the_first_vocabulary_keeps_its_words_when_it_grows(monkeypatch):
    from flmm_demo.demo_world import tokenizer
    from flmm_demo.demo_world.lmm import build_processor, extend_vocabulary, load
    from flmm_demo.demo_world.tokenizer import _LATER_WORDS, vocabulary

    # An LMM saved with the first vocabulary (76 tokens, the releases before round 8): the
    # shipped one cut back to it, with the tokenizer built without the later words.
    model, _ = load(REPO / "checkpoints/demo-shapes/lmm")
    with monkeypatch.context() as m:
        m.setattr(tokenizer, "_LATER_WORDS", ())
        vc = model.config.vision_config
        processor = build_processor(vc.image_size, vc.patch_size)
    n_old = len(processor.tokenizer)
    assert n_old == 76
    model.resize_token_embeddings(n_old)
    rows = model.get_input_embeddings().weight.detach().clone()
    out_rows = model.lm_head.weight.detach().clone()
    grown, new_processor = extend_vocabulary(model, processor)
    assert len(new_processor.tokenizer) == len(vocabulary()) == n_old + len(set().union(*_LATER_WORDS))
    assert grown.get_input_embeddings().weight.shape[0] == len(vocabulary())
    assert torch.equal(grown.get_input_embeddings().weight[:n_old], rows)
    assert torch.equal(grown.lm_head.weight[:n_old], out_rows)
    for word in ("red", "circle", "describe", "<image>"):
        assert processor.tokenizer.convert_tokens_to_ids(word) == new_processor.tokenizer.convert_tokens_to_ids(word)
    assert new_processor.tokenizer.convert_tokens_to_ids("circles") >= n_old


def test_each_rounds_vocabulary_is_the_start_of_the_next(monkeypatch):
    from flmm_demo.demo_world import tokenizer
    from flmm_demo.prompts import VCOT_HINT, VCOT_LEAD, VCOT_REGION, VCOT_REGION_ALONE

    today = tokenizer.vocabulary()
    assert len(today) == len(set(today))
    for k in range(len(tokenizer._LATER_WORDS)):
        with monkeypatch.context() as m:
            m.setattr(tokenizer, "_LATER_WORDS", tokenizer._LATER_WORDS[:k])
            earlier = tokenizer.vocabulary()
        assert today[:len(earlier)] == earlier and len(earlier) < len(today)
    tok = tokenizer.build_tokenizer()
    for text in (VCOT_HINT, VCOT_LEAD, VCOT_REGION, VCOT_REGION_ALONE):
        assert tok.unk_token not in tok.tokenize(text), text


def _old_lmm_rate(step: int, progress: float, peak: float, warmup: int) -> float:
    """The hand-written schedule train-lmm had before BudgetSchedule (the reference curve)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _old_sam_rate(progress: float, peak: float, warmup: float = 0.03) -> float:
    """The hand-written schedule train-sam had before BudgetSchedule."""
    if progress < warmup:
        return peak * max(progress, 1e-3) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def test_the_budget_schedule_draws_the_old_curves():
    from flmm_demo.demo_world.schedule import BudgetSchedule

    def optimizer(lr):
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)

    for warmup in (0, 2, 50, 100):
        schedule = BudgetSchedule(optimizer(1e-3), warmup_steps=warmup)
        for step in range(0, 400, 7):
            progress = step / 400
            assert schedule.set(step, progress) == pytest.approx(_old_lmm_rate(step, progress, 1e-3, warmup),
                                                                 rel=1e-4, abs=1e-9)
    schedule = BudgetSchedule(optimizer(4e-4), warmup_share=0.03)
    for progress in np.linspace(0, 1.2, 241):
        assert schedule.set(0, float(progress)) == pytest.approx(_old_sam_rate(float(progress), 4e-4), rel=1e-4,
                                                                 abs=1e-9)
    with pytest.raises(ValueError, match="not both"):
        BudgetSchedule(optimizer(1e-3), warmup_steps=3, warmup_share=0.1)


def test_photos_are_told_apart_from_drawings(wide_scenes):
    from PIL import Image

    from flmm_demo.demo_world.examples import PHOTO_CAPTION, example_samples, looks_like_photo, photo_notice

    assert sum(looks_like_photo(s.pil()) for s in wide_scenes) <= 1  # a strong gradient may pass for one
    assert not any(looks_like_photo(s.pil()) for s in S.scene_stream(4, 10))
    samples = example_samples(REPO / "assets", demo=True)
    names = [Path(p).name for p, _ in samples]
    photos = [Path(p).name for p, caption in samples if caption == PHOTO_CAPTION]
    assert set(photos) == {"astronaut.jpg", "cat.jpg", "coffee.jpg", "rocket.jpg"}
    assert names[:3] == ["shapes_2.png", "shapes_24.png", "shapes_8.png"]
    cat = Image.open(REPO / "assets" / "cat.jpg")
    assert photo_notice(cat, demo=True).startswith("This looks like a photo")
    assert "\n" not in photo_notice(cat, demo=True)
    assert photo_notice(cat, demo=False) == "" and photo_notice(S.make_scene(4).pil(), demo=True) == ""


def _recording_backend():
    """The shipped demo LMM's backend, recording the length of every prompt it runs."""
    from flmm_demo.backends import load_backend

    backend = load_backend(str(REPO / "checkpoints/demo-shapes/lmm"), device="cpu", dtype=torch.float32)
    backend.lengths = []
    prefilled = backend._prefilled

    def recording(prompt):
        backend.lengths.append(prompt.input_ids.shape[1])
        return prefilled(prompt)

    backend._prefilled = recording
    return backend


@pytest.mark.skipif(not (REPO / "checkpoints/demo-shapes/lmm/model.safetensors").exists(), reason="no demo LMM")
def test_visual_chain_of_thought_shows_the_demo_model_both_images_with_a_longer_context():
    from flmm_demo.grounder import Grounder

    backend = _recording_backend()  # the shipped demo model: 2,048 positions since round 9 (`--context 2048`)
    session = Grounder(backend).new_session(S.make_scene(4, 2, 3).pil())
    image = session.model_image
    assert backend.context_length == 2048
    assert backend.prompt_fits(image, [], "what colour is the circle?", [image], max_new_tokens=32)
    cot = session.visual_cot("what colour is the circle?", max_new_tokens=32, mode="training_free")
    assert cot.answer
    grid = backend.model.config.image_seq_length
    assert max(backend.lengths) > 2 * grid  # the crop question holds both images
    assert max(backend.lengths) + 32 <= backend.context_length


@pytest.mark.skipif(not (REPO / "checkpoints/demo-shapes/lmm/model.safetensors").exists(), reason="no demo LMM")
def test_visual_chain_of_thought_sends_the_crop_alone_when_both_images_do_not_fit(caplog):
    from flmm_demo.demo_world.lmm import set_context
    from flmm_demo.grounder import Grounder

    backend = _recording_backend()
    set_context(backend.model, backend.processor, 1024)  # the demo model's context before round 9
    session = Grounder(backend).new_session(S.make_scene(4, 2, 3).pil())
    image = session.model_image
    assert backend.context_length == 1024
    assert not backend.prompt_fits(image, [], "what colour is the circle?", [image], max_new_tokens=32)
    cot = session.visual_cot("what colour is the circle?", max_new_tokens=32, mode="training_free")
    assert cot.answer
    assert backend.lengths and max(backend.lengths) + 32 <= 1024
    # Measuring the two-image prompt that does not fit raises no "indexing errors" warning.
    assert not [r for r in caplog.records if "indexing errors" in r.getMessage()]


def test_the_wide_rounds_of_the_recipe_continue_the_classic_weights():
    from flmm_demo.demo_world import recipe
    from flmm_demo.demo_world.__main__ import build_parser

    by_out = {step.out: step for step in recipe.STEPS}
    parse = build_parser().parse_args
    wide = parse(list(by_out[recipe.WIDE_LMM].args))
    assert wide.init == recipe.CLASSIC_LMM and wide.wide_share == 0.5 and wide.short_qa
    assert wide.tune_vision and 0 < wide.probe_share < 1
    attention = parse(list(by_out[recipe.ATTENTION_LMM].args))
    assert attention.init == recipe.WIDE_LMM and attention.short_qa and not attention.tune_vision
    assert 0 < attention.vcot_share < 1 and attention.context == 2048
    answers = parse(list(by_out[recipe.ANSWER_LMM].args))  # an answer round on top: same context and chats
    assert answers.init == recipe.ATTENTION_LMM and answers.answer_only and 0 < answers.balanced_share < 1
    assert answers.context == 2048 and answers.vcot_share == attention.vcot_share
    cue = parse(list(by_out[recipe.CUE_LMM].args))  # then the cue round on the same chats, and answers again
    assert cue.init == recipe.ANSWER_LMM and cue.cue_attention and cue.cue_groups and not cue.answer_only
    assert (cue.context, cue.vcot_share, cue.balanced_share) == (2048, answers.vcot_share, answers.balanced_share)
    near = parse(list(by_out[recipe.NEAR_LMM].args))  # a second cue round with the 'no' answers cued too
    assert near.init == recipe.CUE_LMM and near.cue_near and not cue.cue_near and near.seed != cue.seed
    assert {k: v for k, v in vars(near).items() if k not in {"out", "init", "seed", "cue_near"}} == {
        k: v for k, v in vars(cue).items() if k not in {"out", "init", "seed", "cue_near"}}
    near_answers = parse(list(by_out[recipe.NEAR_ANSWER_LMM].args))
    assert near_answers.init == recipe.NEAR_LMM and near_answers.answer_only
    same = {"out", "init", "seed"}  # the two answer rounds differ in nothing else
    assert {k: v for k, v in vars(near_answers).items() if k not in same} == {
        k: v for k, v in vars(answers).items() if k not in same}
    # round 16: the tower alone (the language side kept), then a cue round and an answer round on it
    tower = parse(list(by_out[recipe.TOWER_LMM].args))
    assert tower.init == recipe.NEAR_ANSWER_LMM and tower.tune_vision and tower.vision_share == 1
    assert tower.object_weight > 0 and 0 < tower.probe_share < 1
    tower_cue = parse(list(by_out[recipe.TOWER_CUE_LMM].args))
    assert tower_cue.init == recipe.TOWER_LMM and tower_cue.seed not in (cue.seed, near.seed)
    assert {k: v for k, v in vars(tower_cue).items() if k not in {"out", "init", "seed", "chat_lr"}} == {
        k: v for k, v in vars(near).items() if k not in {"out", "init", "seed", "chat_lr"}}
    tower_answers = parse(list(by_out[recipe.TOWER_ANSWER_LMM].args))
    assert tower_answers.init == recipe.TOWER_CUE_LMM and tower_answers.answer_only
    assert {k: v for k, v in vars(tower_answers).items() if k not in same | {"minutes"}} == {
        k: v for k, v in vars(answers).items() if k not in same | {"minutes"}}
    # rounds 18 and 20-23: the same three rounds again on top of round 16's, five times, on new seeds
    again = {"out", "init", "seed", "minutes"}
    chains = recipe.TOWER_CHAINS
    assert len(chains) == 6 and chains[0][0] == recipe.TOWER_LMM and chains[-1][-1] == recipe.FINAL_LMM
    seeds = set()
    for before, chain in zip(chains, chains[1:]):
        init = before[-1]  # each chain starts from the answer round of the one before
        for first, second in zip(before, chain):
            a, b = parse(list(by_out[first].args)), parse(list(by_out[second].args))
            assert {k: v for k, v in vars(a).items() if k not in again} == {
                k: v for k, v in vars(b).items() if k not in again}
            assert b.init == init and b.seed != a.seed and b.seed not in seeds
            seeds.add(b.seed)
            init = second
    # round 22: the head learns the maps of round 21's answer round, which the last two chains continue (the loop
    # above checks that each chain starts from the one before)
    assert recipe.HEAD_LMM == chains[-3][-1]
    assert parse(list(by_out[recipe.HEAD_DATA].args)).wide_train == 1000
    sam = parse(list(by_out[recipe.SAM_RUN].args))
    assert sam.wide and str(sam.init).startswith(recipe.WIDE_SAM + "/")
    assert parse(list(by_out[recipe.WIDE_SAM].args)).init.startswith("runs/sam-wide/")
    assert parse(list(by_out["runs/sam-wide"].args)).init.startswith(recipe.CLASSIC_SAM + "/")
    # every step's --init names the output of a step that comes before it
    outs = [step.out for step in recipe.STEPS]
    for i, step in enumerate(recipe.STEPS):
        if "--init" in step.args:
            init = step.args[step.args.index("--init") + 1]
            assert any(init == o or init.startswith(o + "/") for o in outs[:i]), step.out


@pytest.mark.skipif(not (REPO / "checkpoints/demo-shapes/lmm/model.safetensors").exists(), reason="no demo LMM")
def test_the_app_with_the_demo_model_lists_shapes_first_and_flags_an_uploaded_photo(tmp_path):
    from PIL import Image

    from flmm_demo import ui
    from flmm_demo.grounder import Grounder
    from flmm_demo.ui_callbacks import Callbacks
    from flmm_demo.ui_state import ModelPool, SessionRegistry, UIState

    assert [Path(p).name for p in ui.example_paths()[:3]] == ["shapes_2.png", "shapes_24.png", "shapes_8.png"]
    callbacks = Callbacks(ModelPool(Grounder.from_preset("demo-shapes"), Grounder.from_preset), SessionRegistry(4),
                          tmp_path, ui.example_paths(), math.inf)
    state = UIState()
    status = callbacks._start(state, Image.open(REPO / "assets" / "cat.jpg"), None)["status"]
    assert "This looks like a photo" in status and "real preset" in status and "\n" not in status
    status = callbacks._start(state, S.make_scene(3).pil(), None)["status"]
    assert status.startswith("New conversation") and "photo" not in status


def test_scenes_drawn_outside_the_generator_are_what_they_claim(monkeypatch):
    """benchmarks/outside_scenes.py (OpenCV, its own layout and colours): each mask is
    where its colour was drawn, the varied scenes vary as issue 15 describes, and the
    close ones stay near the training conditions."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from outside_scenes import PALETTE, outside_scenes

    close, varied = outside_scenes(0, 40, varied=False), outside_scenes(0, 40, varied=True)
    for scene in close + varied:
        assert 1 <= len(scene.objects) <= 5
        assert [o.cx for o in scene.objects] == sorted(o.cx for o in scene.objects)
        for obj in scene.objects:
            assert obj.mask.shape == scene.image.shape[:2] and obj.mask.sum() > 10
            if obj.filled:  # the masked pixels carry the object's colour (within JPEG's error)
                mean = scene.image[obj.mask].astype(float).mean(0)
                assert np.abs(mean - PALETTE[obj.colour]).max() < 45, (scene.seed, obj.phrase, mean)
            assert obj.rotation_degrees <= (25.5 if scene.jpeg_quality else 10.5)
    assert all(s.background == "grey" and s.jpeg_quality is None for s in close)
    assert {s.background for s in varied} == {"white", "dark", "tinted", "noisy"}
    assert all(60 <= s.jpeg_quality <= 90 for s in varied)
    assert any(not o.filled for s in varied for o in s.objects)
    assert max(max(s.size) / min(s.size) for s in varied) > 1.6
    assert np.array_equal(outside_scenes(3, 1, True)[0].image, varied[3].image)  # deterministic


def test_answer_confusions_tally_every_count_position_and_yes_no_question(tiny_demo_lmm, monkeypatch, capsys):
    """benchmarks/answer_confusions.py asks each such question once, files it under its
    template and true answer, and counts every wrong reply among the confusions."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from answer_confusions import KINDS, main, middle_odds, tally, template

    from flmm_demo.demo_world.lmm import load  # the benchmark's functions take a loaded model

    assert template("how many red shapes are there?") == "how many"
    assert template("are there any circles?") == "are there any"
    lmm, _ = tiny_demo_lmm
    scenes = list(S.scene_stream(1010, 3))
    rng = np.random.default_rng(0)
    expected = [(kind, template(q), a) for scene in scenes for kind, q, a in S.short_questions(scene, rng)
                if kind in KINDS]
    model, processor = load(lmm)
    right, confusions, n_asked = tally(model, processor, scenes)
    assert n_asked == len(expected) > 0
    assert sorted(k for k, oks in right.items() for _ in oks) == sorted(expected)
    assert sum(confusions.values()) == sum(not ok for oks in right.values() for ok in oks)
    assert all(reply != truth for (_, truth, reply) in confusions)
    # P('in') before the answer: one probability per 'where is ...?' question, by true answer
    odds = middle_odds(model, processor, scenes)
    rng = np.random.default_rng(0)
    wheres = Counter(a for scene in scenes for _, q, a in S.short_questions(scene, rng) if q.startswith("where is "))
    assert {a: len(p) for a, p in odds.items()} == dict(wheres)
    assert all(0 < p < 1 for ps in odds.values() for p in ps)
    main(["--model", str(lmm), "--scenes", "3"])
    printed = capsys.readouterr().out
    assert printed.startswith(f"{n_asked} questions on 3 regular scenes") and "| count | how many ... |" in printed
    assert "| where is ...? true answer |" in printed


def test_cue_supervises_the_token_that_predicts_each_one_word_answer():
    from types import SimpleNamespace

    from flmm_demo.demo_world.lmm import encode_annotated_chat
    from flmm_demo.demo_world.tokenizer import build_tokenizer

    processor = SimpleNamespace(tokenizer=build_tokenizer())
    colon = processor.tokenizer.convert_tokens_to_ids(":")
    cued = 0
    for scene in S.scene_stream(41, 12, wide=True):
        rng = np.random.default_rng(scene.seed)
        turns = [(q, a) for _, q, a in S.short_question_segments(scene, rng)]
        plain = encode_annotated_chat(processor, turns, 9)
        ids, labels, mention, referent = encode_annotated_chat(processor, turns, 9, cue=True)
        assert (ids, labels) == plain[:2]  # the tokens and what the chat loss sees are the same
        changed = [t for t in range(len(ids)) if (mention[t], referent[t]) != (plain[2][t], plain[3][t])]
        # only prompt tokens change: each is the ':' right before an answer's first
        # (supervised) word, and takes that word's objects
        starts = [t for t in range(1, len(ids)) if labels[t] != -100 and labels[t - 1] == -100]
        assert changed == [t - 1 for t in starts if mention[t] >= 0]
        assert len(starts) == len(turns)
        for (_, segments), t in zip(turns, starts):
            _, mentioned, referred = segments[0]
            if not isinstance(mentioned, int):  # counts and 'is there a ...?' are about no one object:
                assert t - 1 not in changed      # without groups nothing is cued
            else:  # 'what colour is the circle?': the ':' before 'red' points at the circle
                assert ids[t - 1] == colon and (mention[t - 1], referent[t - 1]) == (mentioned, referred)
                cued += 1
    assert cued >= 30


def test_groups_supervise_counts_and_presence_toward_the_objects_they_are_about():
    from flmm_demo.demo_world.lmm import chat_batch, make_pool
    from flmm_demo.demo_world.tokenizer import build_processor

    # The annotations: a count's group holds as many objects as its answer says, 'yes' to
    # 'is there a ...?' / 'are there any ...?' groups the objects that make it true, 'no' the
    # objects it was checked against (a NearGroup): those sharing the colour or the shape
    # asked about, or all of them when none does.
    numbers = {word: n for n, word in enumerate(S.NUMBERS)}
    checked = {"count": 0, "yes": 0, "no": 0, "partial": 0}
    for scene in S.scene_stream(43, 20, wide=True):
        objs = scene.objects
        for kind, question, segments in S.short_question_segments(scene, np.random.default_rng(scene.seed)):
            (answer, mentioned, referred), = segments
            if kind == "count":
                assert len(mentioned or ()) == numbers[answer] and mentioned == referred, (question, segments)
                if question.startswith("how many shapes") or question.startswith("how many objects"):
                    assert mentioned == tuple(range(len(objs)))
                checked["count"] += 1
            elif question.startswith(("is there a ", "are there any ")):
                words = question[:-1].split()
                colour = None if words[2] == "any" else words[3]
                assert mentioned == referred and (answer == "no") == isinstance(mentioned, S.NearGroup)
                if answer == "yes":
                    assert all(objs[i].shape in words[-1] and colour in (None, objs[i].colour) for i in mentioned)
                else:
                    partial = tuple(i for i, o in enumerate(objs) if colour and colour == o.colour
                                    or colour and words[-1] == o.shape)
                    assert tuple(mentioned) == (partial or tuple(range(len(objs)))), (question, segments)
                    checked["partial"] += bool(partial)
                checked[answer] += 1
    assert min(checked.values()) >= 5, checked

    # The batch: a group token indexes a row of covers after the scene's objects that is
    # the mean of its objects' coverage; without groups the same tokens are about nothing,
    # and without near the 'no' answers (and the cue before them) are about nothing.
    processor = build_processor(image_size=64, patch_size=8)
    tok = processor.tokenizer
    pool = make_pool(23, 6, processor, grid=8, wide_share=0.5)
    n_obj = max(len(s.objects) for s in pool.scenes)
    no_id = tok.convert_tokens_to_ids(tok.tokenize("no"))[0]
    rows = counted = negatives = 0
    for seed in range(4):
        idx = list(range(6))
        batch = chat_batch(processor, pool, idx, np.random.default_rng(seed), 64, max_turns=3, short_qa=True,
                           balanced_share=1.0, cue=True, groups=True)
        plain = chat_batch(processor, pool, idx, np.random.default_rng(seed), 64, max_turns=3, short_qa=True,
                           balanced_share=1.0, cue=True)
        near = chat_batch(processor, pool, idx, np.random.default_rng(seed), 64, max_turns=3, short_qa=True,
                          balanced_share=1.0, cue=True, groups=True, near=True)
        for other in (plain, near):
            assert torch.equal(batch["input_ids"], other["input_ids"]) and torch.equal(batch["labels"], other["labels"])
        for b, i in enumerate(idx):
            for key in ("mention", "referent"):
                marks, before = near[key][b], batch[key][b]
                kept = before >= 0
                assert torch.equal(marks[kept], before[kept])  # near only adds marks
                added = ((marks >= 0) & ~kept).nonzero().squeeze(1).tolist()
                for t in added:  # the 'no' of a presence question, or the cue token just before it
                    word = int(near["input_ids"][b, t + (near["input_ids"][b, t] != no_id)])
                    assert word == no_id and marks[t] >= n_obj
                    row = near["covers"][b, marks[t]]
                    assert any(torch.allclose(row, pool.covers[i][list(g)].mean(0), atol=1e-5)
                               for r in range(1, len(pool.covers[i]) + 1)
                               for g in itertools.combinations(range(len(pool.covers[i])), r))
                    negatives += 1
            own = pool.covers[i]
            subsets = [c for r in range(1, len(own) + 1) for c in itertools.combinations(range(len(own)), r)]
            for key in ("mention", "referent"):
                marks, before = batch[key][b], plain[key][b]
                single = before >= 0
                assert torch.equal(marks[single], before[single])  # one-object marks are unchanged
                grouped = (marks >= n_obj).nonzero().squeeze(1)
                assert (before[grouped] == -1).all()
                for t in grouped.tolist():
                    row = batch["covers"][b, marks[t]]
                    match = [g for g in subsets if torch.allclose(row, own[list(g)].mean(0), atol=1e-5)]
                    assert len(match) == 1  # the mean coverage of one set of the scene's objects
                    word = tok.decode([int(batch["input_ids"][b, t])]).strip()
                    if word in numbers:  # a count's own token (not the cue before it)
                        assert len(match[0]) == numbers[word]
                        counted += 1
                    rows += 1
    assert rows > 10 and counted > 0 and negatives > 0


def test_cue_near_without_cue_groups_is_refused_with_a_message(tmp_path, capsys):
    from flmm_demo.demo_world.__main__ import main
    from flmm_demo.demo_world.lmm import LmmTrainConfig

    with pytest.raises(ValueError, match="cue_groups"):
        LmmTrainConfig(tmp_path / "lmm", cue_near=True)
    with pytest.raises(SystemExit) as exit_info:
        main(["train-lmm", "--out", str(tmp_path / "lmm"), "--tiny", "--cue-attention", "--cue-near"])
    assert exit_info.value.code == 2 and "cue_groups" in capsys.readouterr().err
    assert not (tmp_path / "lmm").exists()  # refused before anything was built


def test_hallucination_breakdown_tells_a_misread_shape_from_a_misread_colour(tiny_demo_lmm, monkeypatch, capsys):
    """benchmarks/hallucinations.py: a true description has no hallucinated phrase; a phrase
    whose shape is swapped for one its colour lacks is a shape misread of that object, one
    whose colour is swapped for one no object has is a colour misread."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from hallucinations import Breakdown, look, main

    scene = next(s for s in S.scene_stream(5010, 40, wide=True)
                 if len({o.colour for o in s.objects}) == len(s.objects) >= 2)
    obj = scene.objects[0]
    truth = S.describe(scene)
    result = Breakdown()
    result.add(truth, scene)
    n = len(scene.objects)
    assert result.kinds == {"right": n} and sum(result.by_background[scene.background]) == n

    other_shape = next(s for s in S.SHAPES if s != obj.shape)
    absent_colour = next(c for c in S.COLOURS if c not in {o.colour for o in scene.objects})
    shapes_there = {o.shape for o in scene.objects}
    result = Breakdown()
    result.add(f"a {obj.colour} {other_shape}.", scene)  # the first object's colour, another shape
    assert result.kinds == {"shape misread": 1}
    assert result.shapes == {(obj.shape, other_shape): 1} and result.looks == {(look(scene, obj), obj.size): 1}
    result.add(f"a {absent_colour} {obj.shape}.", scene)  # a shape that is there, in a colour that is not
    assert result.kinds == {"shape misread": 1, "colour misread": 1}
    absent_shape = next((s for s in S.SHAPES if s not in shapes_there), None)
    if absent_shape:
        result.add(f"a {absent_colour} {absent_shape}.", scene)
        assert result.kinds["neither there"] == 1
    assert result.by_background[scene.background][1] == result.by_background[scene.background][0] == (
        3 if absent_shape else 2)
    table = result.table()
    assert "| shape misread | 1 |" in table and f"| {obj.shape} | {other_shape} | 1 |" in table

    lmm, _ = tiny_demo_lmm
    main(["--model", str(lmm), "--scenes", "2"])
    printed = capsys.readouterr().out
    assert printed.startswith("Descriptions of 2 wide scenes (seed 5010)") and "| background |" in printed


def test_tower_probe_reads_colour_from_object_features_and_reports_every_factor(tiny_demo_lmm, monkeypatch, capsys):
    """benchmarks/tower_probe.py: one feature per visible object, labelled with its shape
    and colour; a linear probe reads colour (a near-linear function of the pixels) from even
    the tiny tower far above chance; the table has a row per value of every factor."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from tower_probe import FACTORS, object_features, probe_accuracy

    from flmm_demo.demo_world.lmm import load

    model, processor = load(tiny_demo_lmm[0])
    scenes = list(S.scene_stream(7000, 6, wide=True))
    feats, shapes, colours, rows = object_features(model, processor, scenes)
    visible = [(s, o) for s in scenes for o in s.objects if o.mask.any()]
    assert feats.shape == (len(visible), model.config.vision_config.hidden_size) and len(rows) == len(visible)
    assert shapes.tolist() == [S.SHAPES.index(o.shape) for _, o in visible]
    assert colours.tolist() == [list(S.COLOURS).index(o.colour) for _, o in visible]
    assert rows[0]["drawn"] == ("filled" if visible[0][1].filled else "outlined")

    result = probe_accuracy(list(S.scene_stream(7000, 60)), list(S.scene_stream(8000, 20)), model, processor,
                            steps=300)
    assert result["colour"]["all"] > 2 / len(S.COLOURS), result["colour"]["all"]
    for name in ("shape", "colour"):
        assert set(result[name]) == {"all", "n", *FACTORS}
        assert sum(n for _, n in result[name]["target size"].values()) == result[name]["n"]


def test_object_heads_read_each_object_from_its_own_patches():
    """ObjectHeads pools each object's patches by its coverage and labels the result with
    that object's shape, colour and size: on features that carry the label of the patch's
    owner (one-hot), linear heads learn to read every object of wide scenes, tiny and
    covered ones included."""
    from flmm_demo.demo_world.lmm import ObjectHeads, make_pool
    from flmm_demo.demo_world.tokenizer import build_processor

    grid = 24  # the demo LMM's: 192 px in patches of 8
    pool = make_pool(31, 24, build_processor(192, 8), grid, wide_share=1.0)
    labels = pool.patch_labels.flatten(2)  # (N, 4, g*g): colour, shape, size, rank (0 = background)
    sizes = (len(S.COLOURS) + 1, len(S.SHAPES) + 1, len(S.SIZES) + 1)
    feats = torch.cat([torch.nn.functional.one_hot(labels[:, k], n) for k, n in enumerate(sizes)], -1).float()
    torch.manual_seed(0)
    heads = ObjectHeads(feats.shape[-1])
    optimizer = torch.optim.Adam(heads.parameters(), lr=0.1)
    idx = list(range(len(pool.scenes)))
    for _ in range(150):
        loss, accs = heads(feats, [pool.covers[i] for i in idx], [pool.scenes[i] for i in idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert set(accs) == {"object shape", "object colour", "object size"}
    # only an object that owns no patch of its own can be misread (its mean is its neighbours')
    owners = [{int(r) for r in labels[i, 3].unique()} - {0} for i in idx]
    seen = sum(int(c.sum(1).gt(0).sum()) for c in pool.covers)
    owning = sum(len(o) for o in owners)
    assert owning / seen > 0.6  # a quarter of the wide objects own no patch: under half of one, or covered
    for name, acc in accs.items():
        assert acc >= 0.95 * owning / seen, (name, acc)


def test_a_tower_round_moves_the_tower_only(tiny_demo_lmm, tmp_path):
    """--vision-share 1 with --init --tune-vision: the whole budget tunes the tower (with
    the object heads when asked) and the language side is saved exactly as it was; a vision
    share of 1 from scratch, or beyond 1, is refused."""
    from flmm_demo.demo_world.lmm import LmmTrainConfig, load, train

    lmm, _ = tiny_demo_lmm
    lines = []
    stats = train(LmmTrainConfig(tmp_path / "tower", seed=2, tiny=True, init=lmm, tune_vision=True, vision_share=1.0,
                                 object_weight=1.0, vision_lr=1e-2), log=lines.append)
    assert "chat_loss" not in stats and stats["vision_loss"] > 0
    assert any("object shape" in line for line in lines)
    old, new = load(lmm)[0].state_dict(), load(tmp_path / "tower")[0].state_dict()
    moved = {k for k in old if not torch.equal(old[k], new[k])}
    assert moved and all(k.startswith("model.vision_tower.") for k in moved), sorted(moved)
    for bad in (dict(vision_share=1.0), dict(init=lmm, tune_vision=True, vision_share=1.5)):
        with pytest.raises(ValueError, match="vision share"):
            LmmTrainConfig(tmp_path / "refused", **bad)


def test_mask_errors_split_each_mask_between_its_object_the_background_and_the_others(tiny_demo_lmm, capsys,
                                                                                      monkeypatch):
    """benchmarks/mask_errors.py: a mask is scored by its IoU with the named object and by
    the shares of its area on no object and on the other objects."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from mask_errors import main, mask_split

    scene = next(s for s in S.scene_stream(5000, 20, wide=True) if len(s.objects) >= 2)
    target, other = scene.objects[0].mask, scene.objects[1].mask
    background = ~np.any([o.mask for o in scene.objects], axis=0)
    assert mask_split(target, scene, 0) == (1.0, 0.0, 0.0)
    assert mask_split(other, scene, 0) == (0.0, 0.0, 1.0)
    assert mask_split(background, scene, 0) == (0.0, 1.0, 0.0)
    assert mask_split(np.zeros_like(target), scene, 0) == (0.0, 0.0, 0.0)
    iou, on_background, on_other = mask_split(target | other, scene, 0)
    share = other.sum() / (target.sum() + other.sum())
    assert iou == pytest.approx(target.sum() / (target.sum() + other.sum()))
    assert on_background == 0.0 and on_other == pytest.approx(share)

    lmm, _ = tiny_demo_lmm
    main(["--model", str(lmm), "--head", "", "--scenes", "2", "--threads", "1"])
    printed = capsys.readouterr().out
    scenes = list(S.scene_stream(5000, 2, wide=True))
    n = sum(len(e) for s in scenes for e in S.referring_expressions(s))
    rows = [line.split(" | ") for line in printed.splitlines() if line.startswith("| all | all |")]
    assert len(rows) == 1 and rows[0][2] == "training-free" and rows[0][-1] == f"{n} |"
    iou, on_background, on_other = (float(x) for x in rows[0][3:6])
    assert 0 <= iou <= 1 and 0 <= on_background + on_other <= 1 + 1e-9
    assert "| background |" in printed and "| drawn |" in printed
