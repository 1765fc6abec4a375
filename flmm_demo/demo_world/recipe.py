"""How the shipped demo-shapes weights were made, as data: one place for the commands.

`python -m flmm_demo.demo_world rebuild` runs these steps in order (about 21 h 40 min on an
idle 2-core CPU); docs/demo_world_results.md explains each. The time budgets are
wall-clock minutes, so a faster or busier machine takes more or fewer steps in each
round and lands near the documented figures, not on the same bytes.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from flmm_demo.demo_world import DEFAULT_LMM_DIR
from flmm_demo.presets import DEMO_SAM

HEAD_DIR = "checkpoints/demo-shapes/head"
SAM_FILE = f"checkpoints/{DEMO_SAM}"


@dataclass(frozen=True)
class Step:
    """One command of the recipe: `python -m <module> <args...>`; `out` is the folder it fills."""

    module: str
    args: tuple[str, ...]
    out: str
    why: str

    def command(self) -> str:
        return " ".join(["python", "-m", self.module, *self.args])


def _round(out: str, why: str, *args: str) -> Step:
    return Step("flmm_demo.demo_world", ("train-lmm", "--out", out, *args), out, why)


CLASSIC_LMM = "runs/lmm-rope2"  # the last round of the classic world (the LMM of releases before issue 15)
WIDE_LMM = "runs/lmm-wide2"  # the first round on the wide world (the LMM of round 8)
# visual chain of thought's probe and a 2,048-token context (round 9's head was trained on it)
ATTENTION_LMM = "runs/lmm-wide3"
ANSWER_LMM = "runs/lmm-answer"  # round 12, an answer round on top of it (every attention map kept)
# rounds 13-14: the prompt's last token taught to look at the object an answer is about
# (--cue-attention), and at the objects a count or a presence question is about (--cue-groups).
# It moves the maps a little; round 9's head still fitted them, as docs/demo_world_results.md
# measures (a head retrained on the cue round's maps did no better).
CUE_LMM = "runs/lmm-cue3"
# round 15: a second cue round on top, where a 'no' to 'is there a ...?' also looks at the
# objects it was checked against (--cue-near)
NEAR_LMM = "runs/lmm-cue4b"
NEAR_ANSWER_LMM = "runs/lmm-cue4ba"  # round 15's answer round on top of it (its maps kept)
# round 16: a tower round (the tower alone, also taught to read each whole object: --object-weight),
# then a cue round and an answer round that fit the language model to the new features
TOWER_LMM = "runs/lmm-tower"
TOWER_CUE_LMM = "runs/lmm-tower-cue"
TOWER_ANSWER_LMM = "runs/lmm-tower-ans"  # round 16's answer round (round 17's head was trained on its maps)
# rounds 18, 20, 21, 22 and 23: the same three rounds again on top, five times (a tower round, its cue round and
# answer round)
TOWER2_LMM = "runs/lmm-tower2"
TOWER2_CUE_LMM = "runs/lmm-tower2-cue"
TOWER2_ANSWER_LMM = "runs/lmm-tower2-ans"
TOWER3_LMM = "runs/lmm-tower3"
TOWER3_CUE_LMM = "runs/lmm-tower3-cue"
TOWER3_ANSWER_LMM = "runs/lmm-tower3-ans"
TOWER4_LMM = "runs/lmm-tower4"
TOWER4_CUE_LMM = "runs/lmm-tower4-cue"
TOWER4_ANSWER_LMM = "runs/lmm-tower4-ans"
HEAD_LMM = TOWER4_ANSWER_LMM  # round 21's answer round: the head (round 22) was trained on its maps
TOWER5_LMM = "runs/lmm-tower5"
TOWER5_CUE_LMM = "runs/lmm-tower5-cue"
TOWER5_ANSWER_LMM = "runs/lmm-tower5-ans"
TOWER6_LMM = "runs/lmm-tower6"
TOWER6_CUE_LMM = "runs/lmm-tower6-cue"
FINAL_LMM = "runs/lmm-tower6-ans"  # the LMM that ships
# every tower chain's run folders (tower round, cue round, answer round), in order: rounds 16, 18 and 20-23
TOWER_CHAINS = ((TOWER_LMM, TOWER_CUE_LMM, TOWER_ANSWER_LMM), (TOWER2_LMM, TOWER2_CUE_LMM, TOWER2_ANSWER_LMM),
                (TOWER3_LMM, TOWER3_CUE_LMM, TOWER3_ANSWER_LMM), (TOWER4_LMM, TOWER4_CUE_LMM, TOWER4_ANSWER_LMM),
                (TOWER5_LMM, TOWER5_CUE_LMM, TOWER5_ANSWER_LMM), (TOWER6_LMM, TOWER6_CUE_LMM, FINAL_LMM))
HEAD_DATA = "data/demo-shapes-mix2"
FIRST_SAM = "runs/sam-tiny"
CLASSIC_SAM = "runs/sam-tiny2"  # the second round of the classic world
WIDE_SAM = "runs/sam-wide2"  # the second round on the wide world (the SAM of round 8)
SAM_RUN = "runs/sam-wide3"  # the last round on the wide world: the SAM that ships
FINAL_SAM = f"{SAM_RUN}/sam_vit_tiny.safetensors"  # where `train-sam` saves it
HEAD_RUN = "runs/demo-shapes-head-tower4"  # round 22: the head re-trained on round 21's maps
FINAL_HEAD = f"{HEAD_RUN}/head"  # where `train` saves the head

GROUND = ("--ground-share", "0.6", "--ground-turns", "6", "--attention-weight", "3")
# The chats of rounds 12-15: 60% wide pool, short answers, the probe, half answer-balanced.
BALANCED_CHATS = ("--scenes", "2000", "--wide-share", "0.6", "--context", "2048", "--short-qa", "--vcot-share",
                  "0.15", "--balanced-share", "0.5")
# The cue rounds (13-23): grounding turns, the attention loss x3, and the cue on the token
# before each answer, toward the object or objects it is about.
CUES = ("--ground-share", "0.5", "--ground-turns", "6", "--attention-weight", "3", "--cue-attention", "--cue-groups")
# The cue round after each tower round (16, 18 and 20-23): the chats and cues of round 15's (with
# --cue-near), the whole language model fitting the new tower's features at a higher rate.
TOWER_CUES = (*BALANCED_CHATS, "--chat-lr", "5e-4", *CUES, "--cue-near", "--threads", "1")
# The tower rounds (16, 18 and 20-23): the vision tower alone (the language side saved as it was), on a pool
# of 80% wide scenes, per-patch labels and the object heads (x2).
TOWER = ("--scenes", "3000", "--wide-share", "0.8", "--tune-vision", "--vision-share", "1", "--probe-share", "0.1",
         "--vision-lr", "1e-3", "--object-weight", "2", "--threads", "1")
# The answer round: no grounding turns or attention loss (attention cannot move).
ANSWERS = (*BALANCED_CHATS, "--answer-only", "--chat-lr", "1e-3", "--ground-share", "0",
           "--attention-weight", "0", "--threads", "1")


def _tower_chain(init: str, outs: tuple[str, str, str], seeds: tuple[str, str, str], minutes: tuple[str, str, str],
                 tower_why: str, cue_why: str = "a cue round again, the language model fitting the tower's features",
                 ) -> tuple[Step, Step, Step]:
    """A tower round (rounds 16, 18 and 20-23), then the cue round and the answer round that fit the language
    side to the tower's new features; each step continues the one before, the first continues `init`."""
    tower, cue, answer = outs
    return (_round(tower, tower_why, "--init", init, "--seed", seeds[0], "--minutes", minutes[0], *TOWER),
            _round(cue, cue_why, "--init", tower, "--seed", seeds[1], "--minutes", minutes[1], *TOWER_CUES),
            _round(answer, "an answer round on top of it",
                   "--init", cue, *ANSWERS, "--seed", seeds[2], "--minutes", minutes[2]))


STEPS: tuple[Step, ...] = (
    _round("runs/lmm-base", "from scratch: vision tower on patch labels (40%, first at 128 px), then chat",
           "--seed", "0", "--minutes", "50", "--scenes", "3000", "--vision-share", "0.4", "--low-res-share", "0.6"),
    _round("runs/lmm-ground", "grounding turns: expressions after a description prompt, attention loss only",
           "--init", "runs/lmm-base", "--seed", "0", "--minutes", "25", "--ground-share", "0.5", "--chat-lr", "5e-4"),
    _round("runs/lmm-ground2", "a second round on a new scene pool",
           "--init", "runs/lmm-ground", "--seed", "1", "--minutes", "25", "--ground-share", "0.6", "--chat-lr", "5e-4"),
    _round("runs/lmm-ground3", "attention loss x3",
           "--init", "runs/lmm-ground2", "--seed", "2", "--minutes", "20", "--ground-share", "0.6", "--chat-lr", "5e-4",
           "--attention-weight", "3"),
    _round("runs/lmm-dense", "6 grounding turns per grounding chat (6x the supervised words per step)",
           "--init", "runs/lmm-ground3", "--seed", "3", "--minutes", "30", "--chat-lr", "5e-4", *GROUND),
    _round("runs/lmm-rope", "RoPE base 1e4 -> 1e6: more rotary pairs free to match words to image tokens",
           "--init", "runs/lmm-dense", "--seed", "4", "--minutes", "30", "--chat-lr", "1e-3", "--rope-theta", "1e6",
           *GROUND),
    _round(CLASSIC_LMM, "a second round on the new base",
           "--init", "runs/lmm-rope", "--seed", "5", "--minutes", "25", "--chat-lr", "1e-3", *GROUND),
    _round(WIDE_LMM, "the wide world (half the pool) with short answers; the tower tuned after a linear probe",
           "--init", CLASSIC_LMM, "--seed", "7", "--minutes", "70", "--scenes", "2000", "--wide-share", "0.5",
           "--short-qa", "--tune-vision", "--vision-share", "0.3", "--probe-share", "0.25", "--vision-lr", "5e-4",
           "--chat-lr", "5e-4", "--ground-share", "0.5", "--ground-turns", "6", "--attention-weight", "3",
           "--threads", "1"),
    _round(ATTENTION_LMM, "60% wide pool; 15% of chats open with visual chain of thought's probe; 2,048 positions",
           "--init", WIDE_LMM, "--seed", "8", "--minutes", "55", "--scenes", "2000", "--wide-share", "0.6",
           "--context", "2048", "--short-qa", "--vcot-share", "0.15", "--chat-lr", "4e-4", "--ground-share", "0.5",
           "--ground-turns", "6", "--attention-weight", "3", "--threads", "1"),
    _round(ANSWER_LMM, "half the chats are short questions drawn answer-balanced; only the last layer's MLP and "
           "the output layer train, so every attention map stays",
           "--init", ATTENTION_LMM, *ANSWERS, "--seed", "13", "--minutes", "40"),
    _round(CUE_LMM, "the whole language model with the attention loss, on the same chats; the last token of "
           "each prompt also attends to the object the answer's first word is about, or to the objects a count "
           "or 'is there ...?' is about",
           "--init", ANSWER_LMM, "--seed", "16", "--minutes", "40", *BALANCED_CHATS, "--chat-lr", "3e-4",
           *CUES, "--threads", "1"),
    _round(NEAR_LMM, "a second cue round on new chats; a 'no' to 'is there a red circle?' also looks at the "
           "objects it was checked against (the red ones and the circles)",
           "--init", CUE_LMM, "--seed", "18", "--minutes", "40", *BALANCED_CHATS, "--chat-lr", "3e-4",
           *CUES, "--cue-near", "--threads", "1"),
    _round(NEAR_ANSWER_LMM, "an answer round again, on the cue rounds' maps",
           "--init", NEAR_LMM, *ANSWERS, "--seed", "17", "--minutes", "40"),
    *_tower_chain(NEAR_ANSWER_LMM, (TOWER_LMM, TOWER_CUE_LMM, TOWER_ANSWER_LMM), ("20", "22", "24"),
                  ("30", "40", "35"),
                  "the tower alone on a pool of 80% wide scenes: per-patch labels, and linear heads that read each "
                  "object's shape, colour and size from its mean feature (small ones own no patch)",
                  "the cue round's chats again (with --cue-near), the whole language model fitting the new tower's "
                  "features"),
    *_tower_chain(TOWER_ANSWER_LMM, (TOWER2_LMM, TOWER2_CUE_LMM, TOWER2_ANSWER_LMM), ("25", "27", "29"),
                  ("30", "35", "30"),
                  "round 18: a second tower round, the shipped language side kept (round 16's tower accuracy was "
                  "still rising when its budget ran out)"),
    *_tower_chain(TOWER2_ANSWER_LMM, (TOWER3_LMM, TOWER3_CUE_LMM, TOWER3_ANSWER_LMM), ("31", "33", "35"),
                  ("30", "35", "30"),
                  "round 20: a third tower round (the tower's shape accuracy still rose in round 18)"),
    *_tower_chain(TOWER3_ANSWER_LMM, (TOWER4_LMM, TOWER4_CUE_LMM, TOWER4_ANSWER_LMM), ("37", "39", "41"),
                  ("30", "35", "30"),
                  "round 21: a fourth tower round (the tower's shape accuracy still rose in round 20)"),
    *_tower_chain(TOWER4_ANSWER_LMM, (TOWER5_LMM, TOWER5_CUE_LMM, TOWER5_ANSWER_LMM), ("43", "45", "47"),
                  ("30", "35", "30"),
                  "round 22: a fifth tower round (the tower's shape accuracy still rose in round 21)"),
    *_tower_chain(TOWER5_ANSWER_LMM, (TOWER6_LMM, TOWER6_CUE_LMM, FINAL_LMM), ("49", "51", "53"), ("30", "35", "30"),
                  "round 23: a sixth tower round (the tower's shape accuracy still rose in round 22)"),
    Step("flmm_demo.demo_world", ("write-refer", "--out", HEAD_DATA, "--seed", "1", "--train", "600",
                                  "--val", "0", "--wide-train", "1000"),
         HEAD_DATA, "the head's training scenes: 600 of 2-5 shapes (seed 1) and 1,000 of the wide world"),
    Step("flmm_demo.demo_world", ("train-sam", "--out", FIRST_SAM, "--seed", "11", "--minutes", "25"),
         FIRST_SAM, "the demo world's small SAM, from scratch: boxes, coarse masks and points as prompts"),
    Step("flmm_demo.demo_world", ("train-sam", "--init", f"{FIRST_SAM}/sam_vit_tiny.safetensors", "--out",
                                  CLASSIC_SAM, "--seed", "12", "--minutes", "20", "--lr", "2e-4"),
         CLASSIC_SAM, "a second round on new scenes at a lower learning rate"),
    Step("flmm_demo.demo_world", ("train-sam", "--init", f"{CLASSIC_SAM}/sam_vit_tiny.safetensors", "--out",
                                  "runs/sam-wide", "--seed", "13", "--minutes", "30", "--lr", "2e-4", "--wide"),
         "runs/sam-wide", "the SAM on the wide world"),
    Step("flmm_demo.demo_world", ("train-sam", "--init", "runs/sam-wide/sam_vit_tiny.safetensors", "--out",
                                  WIDE_SAM, "--seed", "14", "--minutes", "32", "--lr", "1.5e-4", "--wide"),
         WIDE_SAM, "a second round on the wide world at a lower learning rate"),
    Step("flmm_demo.demo_world", ("train-sam", "--init", f"{WIDE_SAM}/sam_vit_tiny.safetensors", "--out",
                                  SAM_RUN, "--seed", "15", "--minutes", "50", "--lr", "1e-4", "--wide"),
         SAM_RUN, "a third round on the wide world, lower again"),
    Step("flmm_demo", ("train", "--model", HEAD_LMM, "--data", HEAD_DATA,
                       "--out", HEAD_RUN, "--sam", FINAL_SAM, "--sam-variant", "vit_tiny",
                       "--epochs", "3", "--lr", "1e-3", "--log-every", "200",
                       "--checkpoint-every", "1200", "--head-dtype", "float16"),
         HEAD_RUN, "the F-LMM head (U-Net and SAM refiner), by the same train command as for any LMM, on the "
         "maps of round 21's LMM (four tower rounds changed the features they are made of); round 23's LMM "
         "ships with this head, which it was measured with (it beat round 17's head, trained on round 16's "
         "maps, on 8 of 10 refined-cIoU sets; a head on round 22's maps did no better in round 23)"),
)

def done(step: Step, root: Path) -> bool:
    """Whether a step's output is already there (a rebuild resumes after the last done step)."""
    out = root / step.out
    marker = {"train-lmm": "model.safetensors", "write-refer": "instances.json", "train": "head/model.safetensors",
              "train-sam": "sam_vit_tiny.safetensors"}
    return (out / marker[step.args[0]]).exists()


def install(root: Path) -> list[Path]:
    """Copy the final LMM, head and SAM into checkpoints/ (what the app loads). Returns the files."""
    copied = []
    for src, dst in ((root / FINAL_LMM, root / DEFAULT_LMM_DIR), (root / FINAL_HEAD, root / HEAD_DIR)):
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted(src.iterdir()):
            if f.is_file() and (f.suffix in (".json", ".safetensors", ".jinja")):
                copied.append(Path(shutil.copy2(f, dst / f.name)))
    copied.append(Path(shutil.copy2(root / FINAL_SAM, root / SAM_FILE)))
    return copied
