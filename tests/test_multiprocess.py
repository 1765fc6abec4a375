"""`train`, `eval` and `ground` as two processes (torchrun, gloo on the CPU) against one process.

Two launches of `torchrun --nproc_per_node 2 tests/multiprocess_probe.py ...`:
  1. train a head on the tiny random LLaVA for 2 of its 4 steps (global batch 2: one image
     per process per step), then eval the bundled demo model on 3 validation scenes, then
     ground a folder of those scenes plus a broken file;
  2. train --resume from the checkpoint of launch 1 to step 4.
Each is compared with one process in this pytest process: train with
--gradient-accumulation-steps 2 (the same global batch, the same images per step), eval
and ground as plain calls. Each launch has a free port and a timeout, so a hang fails.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import HfArgumentParser

from flmm_demo.backends.testing import tiny_llava
from flmm_demo.cli import main as cli_main
from flmm_demo.demo_world.scenes import write_refer_dataset
from flmm_demo.training import evaluate, train
from flmm_demo.training.refer import open_refer

# The one-process references run in this process, on its device: on a GPU they would not be
# the CPU workers' numbers.
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="compares CPU processes with this process; run with CUDA_VISIBLE_DEVICES="
)

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("multiprocess_probe.py")
LAUNCH_TIMEOUT_S = 300
TRAIN_SEED = 0  # its shuffles hand each training image to the other process in epoch 1
EXPRESSION = "the circle"


@dataclass
class Launch:
    """What one torchrun launch left: each rank's stdout and stderr, and the probe's records."""

    stdout: list[str]
    stderr: list[str]
    records: Path

    def train_records(self, rank: int) -> list[dict]:
        return [json.loads(line) for line in (self.records / f"train-rank{rank}.jsonl").read_text().splitlines()]

    def train_result(self, rank: int) -> dict:
        return json.loads((self.records / f"train-rank{rank}-result.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(records: Path, *commands: list[str]) -> Launch:
    """Run the probe in 2 CPU processes with `commands`; fail on a non-zero exit or a hang."""
    logs = records / "logs"
    port = free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",  # gloo on the CPU, also on a machine with one GPU
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    argv = [str(records)]
    for command in commands:
        argv += [*(["+"] if len(argv) > 1 else []), *command]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(port),
        "--log-dir", str(logs), "--redirects", "3", str(PROBE), *argv,
    ]
    process = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        agent_output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and both workers
        agent_output, _ = process.communicate()
        pytest.fail(f"torchrun did not finish in {LAUNCH_TIMEOUT_S} s:\n{agent_output[-3000:]}{_rank_logs(logs)}")
    if process.returncode != 0:
        pytest.fail(f"torchrun exited with {process.returncode}:\n{agent_output[-3000:]}{_rank_logs(logs)}")
    (attempt,) = logs.glob("*/attempt_0")
    return Launch(
        stdout=[(attempt / str(rank) / "stdout.log").read_text() for rank in range(2)],
        stderr=[(attempt / str(rank) / "stderr.log").read_text() for rank in range(2)],
        records=records,
    )


def _rank_logs(logs: Path) -> str:
    return "".join(f"\n--- {log}:\n{log.read_text()[-3000:]}" for log in sorted(logs.glob("*/attempt_*/*/*.log")))


@contextmanager
def one_thread():
    """Run the single-process reference with the workers' thread count, so the float sums
    add up in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """lmm/: the tiny random LLaVA. data/: 2 training scenes whose objects keep one sentence
    each (so every epoch asks the same answers and later epochs read the cache) and 3
    validation scenes. images/: the validation scenes and a broken JPEG."""
    root = tmp_path_factory.mktemp("multiprocess")
    model, processor = tiny_llava()
    model.save_pretrained(root / "lmm")
    processor.save_pretrained(root / "lmm")
    write_refer_dataset(root / "data", 2, 3, "train")
    write_refer_dataset(root / "data", 3, 7, "val")
    refs_path = root / "data" / "refs(unc).p"
    refs = pickle.loads(refs_path.read_bytes())
    for ref in refs:
        if ref["split"] == "train":
            ref["sentences"] = ref["sentences"][:1]
    refs_path.write_bytes(pickle.dumps(refs))
    (root / "images").mkdir()
    for image in open_refer(root / "data", "val"):
        shutil.copy(image.path, root / "images")
    (root / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def train_flags(world: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(world / "lmm"), "--data", str(world / "data"), "--out", str(out),
        "--epochs", "4", "--lr", "1e-3", "--seed", str(TRAIN_SEED), "--log-every", "1",
        "--checkpoint-every", "100", *extra,
    ]


def eval_flags(world: Path, json_path: Path) -> list[str]:
    return [
        "eval", "--model", "demo-shapes", "--data", str(world / "data"), "--split", "val",
        "--protocol", "first", "--device", "cpu", "--json", str(json_path),
    ]


def ground_flags(world: Path, out: Path) -> list[str]:
    return [
        "ground", str(world / "images"), "--expression", EXPRESSION, "--model", "demo-shapes", "--device", "cpu",
        "--out", str(out),
    ]


@pytest.fixture(scope="module")
def first_launch(world) -> Launch:
    return torchrun(
        world / "launch-1",
        train_flags(world, world / "run", "--max-steps", "2"),
        eval_flags(world, world / "eval-2proc.json"),
        ground_flags(world, world / "ground-2proc"),
    )


@pytest.fixture(scope="module")
def resumed_launch(world, first_launch) -> Launch:
    return torchrun(world / "launch-2", train_flags(world, world / "run", "--resume"))


@pytest.fixture(scope="module")
def one_process_training(world) -> train.TrainResult:
    args = train_flags(world, world / "run-1proc", "--gradient-accumulation-steps", "2")[1:]
    with one_thread():
        return _train(args)


def _train(argv: list[str]) -> train.TrainResult:
    """`python -m flmm_demo train ARGV` in this process."""
    (config,) = HfArgumentParser(train.TrainConfig).parse_args_into_dataclasses(argv)
    return train.train(config)


# ------------------------------------------------------------------ train


def test_both_processes_hold_the_same_weights_after_every_step(world, first_launch, resumed_launch):
    steps = {rank: first_launch.train_records(rank) + resumed_launch.train_records(rank) for rank in range(2)}
    assert [r["step"] for r in steps[0]] == [r["step"] for r in steps[1]] == [1, 2, 3, 4]
    for zero, one in zip(steps[0], steps[1]):
        np.testing.assert_allclose(zero["fingerprint"], one["fingerprint"], rtol=1e-9, atol=1e-9)
        assert zero["loss"] == pytest.approx(one["loss"], rel=1e-6)  # the global batch's mean, on both
    # Not a vacuous match: every step with a learning rate above 0 (all but the last) moved the weights.
    rates = [json.loads(line)["lr"] for line in (world / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [rate > 0 for rate in rates] == [True, True, True, False]
    for before, after in zip(steps[0][:2], steps[0][1:3]):
        assert not np.allclose(before["fingerprint"], after["fingerprint"], rtol=1e-6, atol=0)


def test_loss_curve_matches_one_process_with_the_same_global_batch(world, first_launch, resumed_launch, one_process_training):
    two = [r["loss"] for r in first_launch.train_records(0) + resumed_launch.train_records(0)]
    one = one_process_training.losses
    assert len(one) == len(two) == 4
    np.testing.assert_allclose(two, one, rtol=1e-4)
    logged = [json.loads(line) for line in (world / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]  # one process logs, each step once
    np.testing.assert_allclose([r["loss"] for r in logged], one, rtol=1e-4)
    assert logged[-1]["lr"] == pytest.approx(0.0)  # the schedule ended where planned, across the resume


def test_every_sample_is_computed_once_and_the_cache_is_shared(world, first_launch, resumed_launch):
    # Precondition: epoch 1 hands each training image to the other process than epoch 0.
    assert train._epoch_order(2, TRAIN_SEED, 0) != train._epoch_order(2, TRAIN_SEED, 1)
    first, resumed = first_launch.train_result(0), resumed_launch.train_result(0)
    assert first == first_launch.train_result(1) and resumed == resumed_launch.train_result(1)
    # Launch 1: epoch 0 computes both images' answers, epoch 1 reads what the other process wrote.
    assert first["cache_computed"] == {"lmm": 2} and first["cache_read"] == {"lmm": 2}
    # Launch 2 (epochs 2 and 3) computes nothing.
    assert resumed["cache_computed"] == {} and resumed["cache_read"] == {"lmm": 4}
    cache = world / "run" / "cache"
    assert len(list(cache.glob("lmm-*.safetensors"))) == 2
    assert not list(cache.glob("*.tmp"))


def test_one_checkpoint_is_written_and_resume_continues_in_both_processes(world, first_launch, resumed_launch):
    checkpoints = world / "run" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-00000004"]  # launch 1's step 2 was replaced
    folder = checkpoints / "step-00000004"
    assert json.loads((folder / "trainer_state.json").read_text()) == {"step": 4, "epoch": 3, "global_batch": 2}
    assert (folder / "random_states_0.pkl").exists() and (folder / "random_states_1.pkl").exists()
    assert "resumed from" in resumed_launch.stdout[0] and "at step 2" in resumed_launch.stdout[0]
    assert [r["step"] for r in resumed_launch.train_records(1)] == [3, 4]
    head_files = [p for p in (world / "run" / "head").iterdir()]
    assert sorted(p.name for p in head_files) == ["config.json", "model.safetensors"]


def test_resume_with_another_global_batch_says_how_to_match_it(world, resumed_launch):
    with pytest.raises(ValueError, match=r"global batch of 2 images, this run has 1 .* --gradient-accumulation-steps 2"):
        _train(train_flags(world, world / "run", "--resume")[1:])


# ------------------------------------------------------------------ eval


def test_eval_scores_each_expression_once_and_matches_one_process(world, first_launch):
    two = json.loads((world / "eval-2proc.json").read_text())
    with one_thread():
        one = evaluate.evaluate(evaluate.EvalConfig(
            model="demo-shapes", data=world / "data", split="val", protocol="first", device="cpu",
        ))
    expected = [(image.image_id, obj.ref_id) for image in open_refer(world / "data", "val") for obj in image.objects]
    keys = [(r["image_id"], r["ref_id"]) for r in two["per_expression"]]
    assert keys == expected and two["n"] == one.scores.n == len(expected)  # each once, none padded in
    # cIoU is the sum of all intersections over the sum of all unions, as with one process.
    assert two["intersection"] == sum(r["intersection"] for r in two["per_expression"])
    assert two["union"] == sum(r["union"] for r in two["per_expression"])
    assert two["ciou"] == pytest.approx(one.scores.ciou, abs=1e-6) and two["ciou"] > 0.5
    assert two["giou"] == pytest.approx(one.scores.giou, abs=1e-6)
    np.testing.assert_allclose([r["iou"] for r in two["per_expression"]], [r["iou"] for r in one.per_expression], atol=1e-6)
    assert sum(log.count("cIoU") for log in first_launch.stdout) == 1  # one table, from the main process


# ------------------------------------------------------------------ ground


def test_ground_splits_the_folder_matches_one_process_and_reports_a_bad_file_once(world, first_launch, tmp_path, capsys):
    good = sorted(p.name for p in (world / "images").glob("*.png"))
    done_by = [[line.split(":")[0] for line in log.splitlines() if "phrase(s) ->" in line] for log in first_launch.stdout]
    assert done_by[0] and done_by[1] and not set(done_by[0]) & set(done_by[1])  # both worked, on different images
    assert sorted(Path(p).name for p in done_by[0] + done_by[1]) == good
    logs = "".join(first_launch.stdout + first_launch.stderr)
    assert logs.count(f"skipped {world / 'images' / 'broken.jpg'}") == 1
    assert logs.count("grounded 3 of 4 image(s)") == 1

    with one_thread():
        assert cli_main(ground_flags(world, tmp_path / "one")) == 0
    assert "skipped" in capsys.readouterr().err
    two_dir, one_dir = world / "ground-2proc", tmp_path / "one"
    assert sorted(p.name for p in two_dir.iterdir()) == sorted(p.name for p in one_dir.iterdir()) == [Path(g).stem for g in good]
    for image_dir in one_dir.iterdir():
        one, two = (json.loads((d / image_dir.name / "result.json").read_text()) for d in (one_dir, two_dir))
        for a, b in zip(one.pop("phrases"), two.pop("phrases"), strict=True):
            assert a.pop("score") == pytest.approx(b.pop("score"), abs=1e-3)
            assert a == b  # text, spans, box, colour, RLE mask
        assert one == two
        for png in image_dir.glob("*.png"):
            assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(two_dir / image_dir.name / png.name)))
