"""The demo world: synthetic scenes of coloured shapes and a tiny LLaVA that chats about them.

    from flmm_demo.demo_world import make_scene, describe
    scene = make_scene(seed=0)          # image, exact masks, objects left to right
    describe(scene)                     # 'a red circle, a small blue square and ...'

Commands: python -m flmm_demo.demo_world {rebuild, train-lmm, train-sam, eval-lmm, write-refer, show}.
"""
from flmm_demo.demo_world.scenes import (
    Scene,
    SceneObject,
    conversation,
    describe,
    make_scene,
    questions_and_answers,
    referring_expressions,
    scene_stream,
    write_refer_dataset,
)

DEFAULT_LMM_DIR = "checkpoints/demo-shapes/lmm"

__all__ = [
    "DEFAULT_LMM_DIR", "Scene", "SceneObject", "conversation", "describe", "make_scene",
    "questions_and_answers", "referring_expressions", "scene_stream", "write_refer_dataset",
]
