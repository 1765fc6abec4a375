"""The tiny LMM's word-level tokenizer and its LLaVA processor, built offline.

Every word of the scene language is one token; text is lower-cased and split on
spaces and punctuation, so character offsets are exact word spans. The processor pairs
the tokenizer with a LlavaImageProcessor (pad to a centred square, resize) and a
LLaVA-1.5 style chat template: "USER: <image>\\n... ASSISTANT: ...</s>".
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import LlavaImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

from flmm_demo.demo_world.scenes import COLOURS, DESCRIBE_PROMPTS, NUMBERS, RELATIONS, SHAPES, SIZE_WORD

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
IMAGE_TOKEN = "<image>"
_PUNCTUATION = (".", ",", "?", ":", "!", "'")
_WORDS = """
a an the and is are there no yes it one shape shapes what colour color which how many
biggest smallest of left right above below nothing user assistant system describe
please give me description image in do you see this that object objects
""".split()
# Words added after the first release, one group per round: each group comes, sorted,
# after the vocabulary before it, so that every earlier word keeps its id (a model
# trained before only needs its embedding rows extended, see lmm.extend_vocabulary).
_LATER_WORDS: tuple[tuple[str, ...], ...] = (
    # round 8: the short answers' questions
    tuple("circles squares triangles crosses where on middle or any".split()),
    # round 9: visual chain of thought's probe and crop question (flmm_demo.prompts)
    tuple("first think most relevant to question region might help answer second".split()),
)

# Mirrors llava-hf's template: the image goes where the user put it, the assistant's
# turns end with </s>, and the generation prompt is "ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def vocabulary() -> list[str]:
    """Special tokens, punctuation, every word of the first scene language (sorted), then
    each group of later words (_LATER_WORDS, each sorted, words already there skipped)."""
    words = set(_WORDS) | set(COLOURS) | set(SHAPES) | set(NUMBERS)
    words |= {w for w in SIZE_WORD.values() if w}
    words |= {w for r in RELATIONS for w in r.split()}
    for prompt in DESCRIBE_PROMPTS:
        words |= set(prompt.replace(".", " ").replace("?", " ").split())
    out = list(SPECIAL_TOKENS) + list(_PUNCTUATION) + sorted(words - set(_PUNCTUATION))
    for group in _LATER_WORDS:
        out += sorted(set(group) - set(out))
    return out


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fast word-level tokenizer with offsets, BOS added in front of every encoding."""
    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    # Joins words with spaces and removes the space before punctuation.
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", model_max_length=1024, clean_up_tokenization_spaces=False)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_processor(image_size: int, patch_size: int) -> LlavaProcessor:
    """LlavaProcessor for a CLIP tower of image_size px and patch_size px patches (CLS dropped)."""
    image_processor = LlavaImageProcessor(
        do_pad=True, size={"height": image_size, "width": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=False)
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN)
