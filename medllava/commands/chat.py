"""`medllava chat`: ask a model (optionally with a task head) one question about one image, for a
quick look; plus the two pieces every caller that asks questions needs.

    medllava chat --model checkpoints/llava-med --head runs/finetune/vqa_rad/vqa_rad-head \\
        --image scan.dcm --question "Is there a fracture?" --closed

- `question_image(path)`: an image file (PNG, JPEG, DICOM, ...) or a DICOM series folder, as RGB.
  For a folder the middle slice is used: the folder's DICOM image files, sorted by InstanceNumber
  (by file name when some file lacks one), element `n // 2`: the slice a reader scrolls to first
  and, for a volume centred on the organ, the most representative one.
- `answer_batch(...)`: greedy answers for a batch of (image, question text), asked with a
  template exactly as training renders it (`medllava.templates.prompt_text`).

A head's `head.json` says how it was taught (template, prompt style, closed options), and the
question is asked the same way here; without a head, `--template` and `--prompt-style` apply.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medllava.families import FAMILIES
from medllava.question_styles import PROMPT_STYLES
from medllava.templates import DEFAULT_TEMPLATE, GENERATION_TEMPLATES
from medllava.tiny import TINY_SPECS

DEFAULT_MAX_NEW_TOKENS = 64


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "chat",
        help="answer one question about one image (DICOM included) with a model and optional head",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--model", required=True,
                   help=f"checkpoint folder of a supported family ({', '.join(FAMILIES)}; a full head works too) or a "
                        f"named model ({', '.join(TINY_SPECS)})")
    p.add_argument("--head", type=Path, help="head folder (LoRA adapter + head.json) to load onto --model")
    p.add_argument("--image", required=True, type=Path,
                   help="image file (PNG, JPEG, DICOM, ...) or DICOM series folder")
    p.add_argument("--question", required=True, help="the question")
    p.add_argument("--closed", action="store_true", help="a closed question: ask it in the head's closed-question form")
    p.add_argument("--template", choices=GENERATION_TEMPLATES,
                   help=f"conversation template (default: the head's, else the model family's: {DEFAULT_TEMPLATE} "
                        "for llava)")
    p.add_argument("--prompt-style", choices=PROMPT_STYLES, help="question style (default: the head's, else plain)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="answer length limit in tokens")
    p.set_defaults(func=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    from medllava.families import model_family
    from medllava.heads import HEAD_FILE, HeadInfo, load_with_heads
    from medllava.model import ModelConfig
    from medllava.question_styles import format_question

    image = question_image(args.image)  # a bad image fails before the model is loaded
    model, processor, infos = load_with_heads(ModelConfig(name_or_path=args.model), [args.head] if args.head else [])
    info = next(iter(infos.values()), None)
    if info is None and (Path(args.model) / HEAD_FILE).is_file():
        info = read_full_head_info(Path(args.model))  # a full-checkpoint head carries head.json itself
    info = info or HeadInfo(task="", template=model_family(model).default_template, prompt_style="plain")
    template = args.template or info.template
    style = args.prompt_style or info.prompt_style
    question = format_question(args.question, style, "closed" if args.closed else "open", tuple(info.closed_options))
    (answer,) = answer_batch(model, processor, [image], [question], template, args.max_new_tokens)
    print(answer)
    return 0


def read_full_head_info(folder: Path):
    """HeadInfo from the head.json of a full-checkpoint head (a folder that is a model, not an adapter)."""
    from medllava.heads import HEAD_FILE, read_head_file

    return read_head_file(folder / HEAD_FILE)


def answer_batch(model, processor, images: list, questions: list[str], template: str,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers, one per (RGB image, question text); the text is the human turn without `<image>`.

    Asked and decoded exactly as `eval run` asks (`medllava.eval.generate.generate_answers`): a
    left-padded batch, the template's own BOS handling and stop tokens.
    """
    from medllava.eval.generate import ensure_pad_token, generate_answers
    from medllava.templates import prompt_text

    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    ensure_pad_token(processor)
    texts = [prompt_text(q, template, processor) for q in questions]
    return generate_answers(model, processor, texts, images, max_new_tokens, template)


def question_image(path: str | Path):
    """`path` as an RGB PIL image: an image file, or the middle slice of a DICOM series folder."""
    from medllava.images import load_image

    path = Path(path)
    return load_image(series_slice(path) if path.is_dir() else path)


def series_slice(folder: Path) -> Path:
    """The middle slice file of the DICOM series in `folder` (see the module docstring).

    Files that are not DICOM images (notes, DICOMDIR indexes, structured reports) are ignored;
    a folder holding two series is refused, since which one was meant cannot be known.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    from medllava.images import ImageLoadError

    slices = []
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["Rows", "InstanceNumber", "SeriesInstanceUID"])
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError):
            continue
        if "Rows" in ds:  # only image objects have pixel rows
            slices.append((path, ds.get("InstanceNumber"), ds.get("SeriesInstanceUID")))
    if not slices:
        raise ImageLoadError(f"{folder}: no DICOM image files in this folder")
    series = {uid for _, _, uid in slices}
    if len(series) > 1:
        raise ImageLoadError(f"{folder}: {len(series)} DICOM series in one folder; give one series folder or one file")
    if all(number is not None for _, number, _ in slices):
        slices.sort(key=lambda s: (int(s[1]), s[0].name))
    return slices[len(slices) // 2][0]
