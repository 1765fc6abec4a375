"""Command line: `python -m flmm_demo {doctor,download,ground,train,eval}`.

    python -m flmm_demo doctor
    python -m flmm_demo download llava-1.5-7b        # or --all-missing
    python -m flmm_demo ground photo.jpg more/*.png --question "What is in the image?" --out results/
    python -m flmm_demo ground scene.png --expression "the red circle" --out results/
    torchrun --nproc_per_node 2 -m flmm_demo ground photos/ --question "What is in the image?" --out results/
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from accelerate.utils import gather_object
from PIL import Image
from tqdm import tqdm

from flmm_demo import download
from flmm_demo.devices import add_load_arguments, load_options
from flmm_demo.distributed import process_state
from flmm_demo.doctor import doctor_report
from flmm_demo.grounder import MODES, Grounder, Session
from flmm_demo.images import ImageError, image_files
from flmm_demo.presets import MissingWeightsError
from flmm_demo.render import export_coco_json, hex_colors, mask_file_name, mask_to_rle, overlay, palette
from flmm_demo.training import evaluate, train
from flmm_demo.types import GroundedPhrase


def ground_images(args: argparse.Namespace) -> int:
    """Ground each image; a bad file is reported and skipped, the rest go on.

    Started by `torchrun` / `accelerate launch`, the processes split the images (each
    process grounds its share on its own device and writes those images' folders); the
    main process prints the summary of all of them.
    """
    try:
        paths = image_files(args.images)
    except ImageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    state = process_state()
    options = load_options(args)
    if state.num_processes > 1 and options.device in ("auto", "cuda"):
        options = replace(options, device=str(state.device))  # each process its own GPU: cuda:<local rank>
    try:
        grounder = Grounder.from_preset(args.model, **asdict(options))
    except (MissingWeightsError, ValueError) as error:
        print(f"Cannot load the model: {error}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    grounded_here = []
    with state.split_between_processes(paths) as share:
        for path in tqdm(share, desc="grounding", unit="image", disable=len(share) < 2 or not state.is_main_process):
            try:
                session = grounder.new_session(path)
                if args.expression:
                    answer = args.expression
                    grounded = [session.ground_expression(args.expression, mode=args.mode, refine=not args.no_refine)]
                else:
                    answer = session.chat(args.question, max_new_tokens=args.max_new_tokens)
                    grounded = session.ground(mode=args.mode, refine=not args.no_refine)
            except (ImageError, ValueError) as error:
                # Each file is in one process's share, so it is reported once.
                tqdm.write(f"skipped {path}: {error}", file=sys.stderr)
                continue
            image_dir = out_dir / path.stem
            write_result(image_dir, path, session, answer, grounded, args)
            grounded_here.append(path)
            tqdm.write(f"{path}: {len(grounded)} phrase(s) -> {image_dir}")
    done = len(gather_object(grounded_here))
    if state.is_main_process:
        print(f"grounded {done} of {len(paths)} image(s); results in {out_dir}")
    return 0 if done else 1


def write_result(
    image_dir: Path, path: Path, session: Session, answer: str, grounded: list[GroundedPhrase], args: argparse.Namespace
) -> None:
    """One image's folder: result.json, coco.json, a PNG per phrase's mask and overlay.png."""
    image_dir.mkdir(parents=True, exist_ok=True)
    colors = palette(len(grounded))
    record = {
        "image": str(path),
        "size": list(session.image.size),
        "question": args.question,
        "expression": args.expression,
        "answer": answer,
        "phrases": [],
    }
    for i, (g, color) in enumerate(zip(grounded, hex_colors(len(grounded)))):
        mask_file = mask_file_name(i, g.phrase.text)
        Image.fromarray(g.mask.astype("uint8") * 255).save(image_dir / mask_file)
        record["phrases"].append({
            "text": g.phrase.text,
            "char_span": list(g.phrase.char_span),
            "token_span": list(g.phrase.token_span),
            "box": list(g.box) if g.box else None,
            "score": round(g.score, 4),
            "color": color,
            "mask_png": mask_file,
            "rle": mask_to_rle(g.mask),
        })
    overlay(session.image, [g.mask for g in grounded], colors).save(image_dir / "overlay.png")
    export_coco_json(session.image, grounded, image_dir / "coco.json")
    (image_dir / "result.json").write_text(json.dumps(record, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flmm_demo", description="F-LMM grounding demo tools")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("doctor", help="list model presets and which weights are present")

    ground = sub.add_parser("ground", help="answer about images and ground the answer's phrases")
    ground.add_argument("images", nargs="+", help="image files or folders (a folder: its image files, by name)")
    what = ground.add_mutually_exclusive_group(required=True)
    what.add_argument("--question", help="ask this and ground every noun phrase of the answer")
    what.add_argument("--expression", help="ground this referring expression (teacher-forced)")
    ground.add_argument("--out", required=True, help="output folder (one subfolder per image)")
    ground.add_argument("--model", default=None, help="preset name or model folder (default: $FLMM_PRESET or demo-shapes)")
    ground.add_argument("--mode", default="auto", choices=MODES)
    ground.add_argument("--no-refine", action="store_true", help="skip the SAM refiner")
    ground.add_argument("--max-new-tokens", type=int, default=128)
    add_load_arguments(ground)
    download.add_arguments(sub.add_parser("download", help="fetch a preset's LMM, F-LMM head and SAM checkpoint"))
    # Their flags are their config dataclasses (TrainConfig, EvalConfig), parsed by their own main.
    sub.add_parser("train", help="train an F-LMM head on a frozen LMM", add_help=False)
    sub.add_parser("eval", help="referring segmentation cIoU / gIoU", add_help=False)

    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        return train.main(rest)
    if args.command == "eval":
        return evaluate.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "doctor":
        print(doctor_report())
        return 0
    if args.command == "download":
        return download.run(args)
    return ground_images(args)
