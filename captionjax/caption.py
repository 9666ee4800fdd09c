"""`captionjax caption`: caption images, a video or a camera with a trained checkpoint.

    captionjax caption --checkpoint=WORKDIR --images=FILE_OR_FOLDER --output=FILE.json \\
        [--html=DIR] [--beam_size=2] [--n_best=1] [--batch_size=16] [--num_images=-1] \\
        [--vis_json=FILE] [decoding flags]
    captionjax caption --checkpoint=WORKDIR --video=FILE [--every_seconds=1] \\
        --output=TIMELINE.json [--video_output=CAPTIONED.mp4]
    captionjax caption --checkpoint=WORKDIR --camera=0 [--every_seconds=1]

Decoding: beam search (--beam_size, 1 = greedy; --num_groups G > 1 with
--diversity_lambda: diverse beam search, G groups of beam_size/G beams), or
--sample with --temperature, --top_k, --top_p and --num_samples draws per
image (listed best first). Every decoder takes --min_length (default 1: never
an empty caption), --block_trigrams and --bad_endings (END forbidden after
these words; default: the checkpoint's training config, else a list of
function words; --bad_endings=none turns it off). --checkpoint given several
times decodes with the ensemble of the checkpoints (their per-step
log-probabilities averaged; one vocabulary); a checkpoint is a workdir (its
latest step, or --step) or one step's folder WORKDIR/checkpoints/STEP.

--output is a JSON list of {"image_id", "file_name", "caption", "logprob"}
(plus "n_best": [{"caption", "logprob"}, ...] with --n_best > 1); without
--output it goes to stdout. --vis_json writes NeuralTalk2's vis/vis.json
layout ([{"image_id", "caption"}], ids "1".."N" in input order) with the
images beside it as imgs/img1.jpg.., so NeuralTalk2's vis/index.html shows
them. --html writes a static gallery (index.html and thumbnails).

A folder gives its files with an image extension (sorted; --recursive for
subfolders); a file that fails to decode is named on stderr and skipped.
Exit status: 0 every input captioned, 1 some failed (the rest are still
captioned and written), 2 usage errors (bad flags, no checkpoint, no images).
"""

import math
import os
import sys
import time
import warnings

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .gif .bmp .dib .tif .tiff .webp .ppm .pgm .pbm .pnm "
    ".ico .tga .sgi .jp2 .j2k .pcx".split())


class UsageError(ValueError):
  """A bad command line or input path (exit status 2)."""


def add_arguments(p):
  p.epilog = __doc__.split("\n", 1)[1]  # the usage lines, output format and exit statuses
  p.add_argument("--checkpoint", required=True, action="append",
                 help="a `captionjax train` workdir (its latest checkpoint) or WORKDIR/checkpoints/"
                      "STEP; repeat it for an ensemble")
  p.add_argument("--step", type=int, default=None,
                 help="a checkpoint step instead of the latest (for each workdir given)")
  src = p.add_mutually_exclusive_group()
  src.add_argument("--images", help="an image file or a folder of images")
  src.add_argument("--video", help="a video file: caption a frame every --every_seconds")
  src.add_argument("--camera", type=int, default=None, metavar="N",
                   help="caption the live camera /dev/videoN (Linux, ffmpeg's v4l2)")
  p.add_argument("--output", default="",
                 help="JSON results (images) or timeline (video); default: stdout")
  p.add_argument("--html", default="", metavar="DIR",
                 help="also write a static gallery: DIR/index.html and DIR/thumbs/")
  p.add_argument("--vis_json", default="", metavar="FILE",
                 help="also write NeuralTalk2's vis.json layout (and imgs/ beside it)")
  p.add_argument("--beam_size", type=int, default=2, help="beam size (1 = greedy)")
  p.add_argument("--n_best", type=int, default=1,
                 help="captions kept per image, best first (at most --beam_size)")
  p.add_argument("--num_groups", type=int, default=1,
                 help="diverse beam search: groups of beam_size/num_groups beams (1 = plain)")
  p.add_argument("--diversity_lambda", type=float, default=0.5,
                 help="diverse beam search: penalty for a token an earlier group chose")
  p.add_argument("--length_penalty", type=float, default=None,
                 help="beam search length normalization exponent (default: the training config's)")
  p.add_argument("--sample", action="store_true",
                 help="sample captions from the model instead of the beam search")
  p.add_argument("--temperature", type=float, default=1.0,
                 help="with --sample: lower is safer, higher more varied")
  p.add_argument("--top_k", type=int, default=0,
                 help="with --sample: only the k likeliest words (0 = all)")
  p.add_argument("--top_p", type=float, default=1.0,
                 help="with --sample: only the likeliest words holding this probability (nucleus)")
  p.add_argument("--num_samples", type=int, default=1,
                 help="with --sample: captions drawn per image (--n_best shows them, best first)")
  add_rule_arguments(p)
  p.add_argument("--seed", type=int, default=0, help="seed of --sample")
  p.add_argument("--batch_size", type=int, default=16, help="images per jitted batch")
  p.add_argument("--num_images", type=int, default=-1, help="caption at most N images (-1 = all)")
  p.add_argument("--recursive", action="store_true", help="include the folder's subfolders")
  p.add_argument("--workers", type=int, default=2, help="image decoding threads")
  p.add_argument("--every_seconds", type=float, default=1.0,
                 help="video/camera: seconds between captioned frames")
  p.add_argument("--video_output", default="", metavar="FILE",
                 help="video: write a copy with the captions drawn on it (e.g. out.mp4)")
  p.add_argument("--max_frames", type=int, default=-1,
                 help="camera: stop after N captions (-1 = until Ctrl-C)")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")


def add_rule_arguments(p) -> None:
  """The decoding rules' flags on argparse parser `p` (--min_length,
  --block_trigrams, --bad_endings): this command's and `captionjax serve`'s."""
  p.add_argument("--min_length", type=int, default=1,
                 help="no END before this many words (0 allows an empty caption)")
  p.add_argument("--block_trigrams", action="store_true",
                 help="forbid a word that would repeat a trigram of the caption")
  p.add_argument("--bad_endings", default=None, metavar="WORDS",
                 help="comma-separated words a caption may not end on; 'none' for no such rule "
                      "(default: the training config's, else a list of function words)")


def _say(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def list_images(path: str, recursive: bool = False):
  """(paths, ignored): the image files of a file or folder, sorted.

  A single file is always tried, whatever its extension; in a folder only
  files with an image extension are (hidden files are ignored).
  """
  if os.path.isfile(path):
    return [path], []
  if not os.path.isdir(path):
    raise UsageError(f"--images={path}: no such file or folder")
  found, ignored = [], []
  for root, dirs, files in os.walk(path):
    dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
    for name in sorted(files):
      if name.startswith("."):
        continue
      full = os.path.join(root, name)
      ext = os.path.splitext(name)[1].lower()
      (found if ext in IMAGE_EXTENSIONS else ignored).append(full)
  return sorted(found), ignored


def _check_args(args) -> None:
  if args.images is None and args.video is None and args.camera is None:
    raise UsageError("give one of --images, --video or --camera")
  if args.batch_size < 1:
    raise UsageError(f"--batch_size={args.batch_size}: must be >= 1")
  if args.beam_size < 1:
    raise UsageError(f"--beam_size={args.beam_size}: must be >= 1")
  decode_options(args, {})  # the decoding flags' errors, before loading a model
  if args.sample and not 1 <= args.n_best <= args.num_samples:
    raise UsageError(f"--n_best={args.n_best}: must be between 1 and "
                     f"--num_samples={args.num_samples} (with --sample)")
  if not args.sample and not 1 <= args.n_best <= args.beam_size:
    raise UsageError(f"--n_best={args.n_best}: must be between 1 and --beam_size={args.beam_size}")
  if args.every_seconds <= 0:
    raise UsageError(f"--every_seconds={args.every_seconds}: must be > 0")
  if args.num_images == 0 or args.num_images < -1:
    raise UsageError(f"--num_images={args.num_images}: must be -1 (all) or positive")
  for flag in ("output", "vis_json", "video_output", "html"):
    value = getattr(args, flag)
    folder = value if flag == "html" else os.path.dirname(os.path.abspath(value or "."))
    if value and os.path.isdir(value) and flag != "html":
      raise UsageError(f"--{flag}={value}: is a folder, give a file name")
    try:
      if value:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
      raise UsageError(f"--{flag}={value}: cannot create folder {folder} ({e.strerror})") from None
  if args.video_output and args.video is None:
    raise UsageError("--video_output needs --video")
  for flag in ("temperature", "length_penalty", "every_seconds", "top_p", "diversity_lambda"):
    value = getattr(args, flag)
    if value is not None and not math.isfinite(value):
      raise UsageError(f"--{flag}={value}: must be a finite number")
  if args.images is None:  # flags that only the image path uses are refused, not ignored
    unused = [f"--{f}" for f in ("html", "vis_json") if getattr(args, f)]
    unused += ["--num_images"] if args.num_images != -1 else []
    if unused:
      raise UsageError(f"{', '.join(unused)}: only with --images")
  unused = [f"--{f}={getattr(args, f)}" for f, default in (
      ("temperature", 1.0), ("top_k", 0), ("top_p", 1.0), ("num_samples", 1))
             if getattr(args, f) != default]
  if not args.sample and unused:
    raise UsageError(f"{', '.join(unused)}: only with --sample")
  if args.sample and args.num_groups != 1:
    raise UsageError(f"--num_groups={args.num_groups}: only with beam search (drop --sample)")
  if args.num_groups == 1 and args.diversity_lambda != 0.5:
    raise UsageError(f"--diversity_lambda={args.diversity_lambda}: only with --num_groups > 1")


def decode_options(args, config):
  """The decode.DecodeOptions of the flags; length_penalty and bad_endings
  default to the training config's (a dict-like; {} before loading)."""
  from captionjax import decode  # pylint: disable=g-import-not-at-top
  lp = args.length_penalty
  if lp is None:
    lp = float(config.get("length_penalty", 0.0))
  bad = args.bad_endings
  if bad is None:
    bad = config.get("bad_endings", ",".join(decode.BAD_ENDINGS))
  try:
    return decode.DecodeOptions(
        beam_size=1 if args.sample else args.beam_size, length_penalty=lp,
        min_length=args.min_length, block_trigrams=args.block_trigrams,
        bad_endings=decode.parse_words(bad), num_groups=args.num_groups,
        diversity_lambda=args.diversity_lambda, sample=args.sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        num_samples=args.num_samples)
  except ValueError as e:
    raise UsageError(f"--{e}") from None


def _captioner(args, models, batch_size):
  from captionjax import inference  # pylint: disable=g-import-not-at-top
  return inference.BatchCaptioner(models, batch_size=batch_size, n_best=args.n_best,
                                  seed=args.seed,
                                  options=decode_options(args, models[0].config))


def _record(image_id, file_name, captions, n_best: int) -> dict:
  """The JSON entry of one captioned image."""
  caption, logprob = captions[0] if captions else ("", float("nan"))
  rec = {"image_id": image_id, "file_name": file_name, "caption": caption,
         "logprob": round(logprob, 5)}
  if n_best > 1:
    rec["n_best"] = [{"caption": c, "logprob": round(lp, 5)} for c, lp in captions]
  return rec


def write_json(path: str, obj) -> None:
  """Writes `obj` as JSON to `path` (captionjax/files.py), or to stdout when path is empty."""
  from captionjax import files  # pylint: disable=g-import-not-at-top
  if not path:
    print(files.dumps(obj))
    return
  files.write_json(path, obj)


def write_vis(path: str, records: list, images: dict) -> None:
  """NeuralTalk2's vis.json ([{image_id, caption}], ids "1".."N") and imgs/imgN.jpg beside it."""
  vis = [{"image_id": str(i), "caption": r["caption"]} for i, r in enumerate(records, 1)]
  write_json(path, vis)
  img_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "imgs")
  os.makedirs(img_dir, exist_ok=True)
  for i, r in enumerate(records, 1):
    data = images.get(r["image_id"])
    if data is not None:
      with open(os.path.join(img_dir, f"img{i}.jpg"), "wb") as f:
        f.write(data)


def _write_results(args, records: list) -> None:
  """The captions JSON to --output (or stdout); UsageError naming what was not saved."""
  try:
    write_json(args.output, records)
  except OSError as e:
    raise UsageError(f"cannot write {e.filename or args.output}: {e.strerror or e}; "
                     f"the captions of {len(records)} images were not saved") from None


def run(args) -> int:
  try:
    _check_args(args)
    if args.camera is not None:
      return run_camera(args)
    if args.video is not None:
      if not os.path.isfile(args.video):
        raise UsageError(f"--video={args.video}: no such file")
      return run_video(args)
    return run_images(args)
  except UsageError as e:
    _say(f"captionjax caption: error: {e}")
    return EXIT_USAGE


def checkpoint_step(path: str, step=None):
  """(workdir, step): WORKDIR/checkpoints/STEP names one step; a workdir takes `step`."""
  norm = os.path.normpath(path)
  parent, name = os.path.split(norm)
  if name.isdigit() and os.path.basename(parent) == "checkpoints":
    return os.path.dirname(parent) or ".", int(name)
  return path, step


def _load_models(args):
  """The models of the --checkpoint flags (several: an ensemble, checked)."""
  from captionjax import inference  # pylint: disable=g-import-not-at-top
  try:
    models = [inference.load_workdir(*checkpoint_step(c, args.step)) for c in args.checkpoint]
    inference.check_ensemble(models)
  except inference.CheckpointError as e:
    raise UsageError(str(e)) from None
  return models


def _describe(models, captioner) -> str:
  """"WORKDIR step N" of each model, and the decoding."""
  names = " + ".join(f"{m.workdir} step {m.step}" for m in models)
  return (f"{'ensemble ' if len(models) > 1 else ''}{names}, {captioner.options.describe()}")


def run_images(args) -> int:
  """Captions a file or folder; returns the exit status."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  from captionjax import files  # pylint: disable=g-import-not-at-top
  from captionjax import gallery  # pylint: disable=g-import-not-at-top
  from captionjax import inference  # pylint: disable=g-import-not-at-top

  paths, ignored = list_images(args.images, args.recursive)
  if ignored:
    shown = ", ".join(os.path.basename(x) for x in ignored[:3])
    _say(f"note: {len(ignored)} file(s) without an image extension ignored "
         f"({shown}{', ...' if len(ignored) > 3 else ''})")
  if not paths:
    raise UsageError(f"--images={args.images}: no image files found")
  if args.num_images > 0:
    paths = paths[:args.num_images]
  try:
    for flag in ("output", "vis_json"):
      files.check_output(getattr(args, flag), paths, flag=f"--{flag}")
  except ValueError as e:
    raise UsageError(str(e)) from None
  folder = os.path.isdir(args.images)
  names = [os.path.relpath(p, args.images).replace(os.sep, "/") if folder
           else os.path.basename(p) for p in paths]

  models = _load_models(args)
  model = models[0]
  captioner = _captioner(args, models, min(args.batch_size, len(paths)))
  t0 = time.time()
  captioner.compile()
  t_compile = time.time() - t0
  _say(f"model: {_describe(models, captioner)}, {model.input_size} px input, "
       f"batch {captioner.batch_size}; compiled in {t_compile:.1f}s")

  keep_images = bool(args.html or args.vis_json)
  base_load = inference.image_loader(model)

  def load(path):
    image, _ = base_load(path)
    if not keep_images:
      return image, None
    return image, gallery.thumbnail_file(path)

  records, failures, thumbs = [], [], {}
  t0 = time.time()
  bar = tqdm(total=len(paths), unit="img", disable=args.no_progress, file=sys.stderr,
             dynamic_ncols=True)
  try:
    for item in inference.caption_files(captioner, paths, load, workers=args.workers):
      bar.update()
      image_id, name = item.index + 1, names[item.index]
      if not item.ok:
        tqdm.write(f"skipped {item.path}: {item.error}", file=sys.stderr)
        failures.append((name, item.error))
        continue
      records.append(_record(image_id, name, item.captions, args.n_best))
      if item.extra is not None:
        thumbs[image_id] = item.extra
  except KeyboardInterrupt:  # keep what is done
    bar.close()
    _write_results(args, records)
    _say(f"captionjax caption: interrupted after {len(records)} of {len(paths)} images; "
         + (f"their captions are in {args.output}" if args.output else
            "their captions were printed"))
    return EXIT_INTERRUPTED
  bar.close()
  dt = time.time() - t0

  _write_results(args, records)
  try:
    if args.vis_json:
      write_vis(args.vis_json, records, thumbs)
    if args.html:
      summary = (f"{len(records)} of {len(paths)} images captioned by "
                 f"{_describe(models, captioner)}")
      page = gallery.write_gallery(args.html, records, failures, thumbs,
                                   title="captionjax captions", summary=summary)
      _say(f"gallery: {page}")
  except OSError as e:
    raise UsageError(f"cannot write {e.filename or args.vis_json or args.html}: "
                     f"{e.strerror or e}") from None
  rate = len(paths) / dt if dt > 0 else float("inf")
  _say(f"captioned {len(records)} of {len(paths)} images in {dt:.1f}s ({rate:.1f} images/s, "
       f"decoding included, compile excluded)"
       + (f"; {len(failures)} failed (named above)" if failures else "")
       + (f"; results in {args.output}" if args.output else ""))
  return EXIT_SOME_FAILED if failures else EXIT_OK


# ---------------------------------------------------------------- video


def _ffmpeg():
  try:
    import imageio_ffmpeg  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UsageError("video needs the imageio-ffmpeg package: pip install imageio-ffmpeg") from None
  # ffmpeg runs as a subprocess (fork + exec at once), which JAX's fork warning does not mean.
  warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
  return imageio_ffmpeg


def video_frames(path: str, every_seconds: float, input_params=None):
  """(meta, iterator of (frame index, time s, uint8 [H, W, 3])): the first frame
  at or after each multiple of `every_seconds`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  ffmpeg = _ffmpeg()
  try:
    reader = ffmpeg.read_frames(path, input_params=input_params or [])
    meta = reader.__next__()
  except (RuntimeError, OSError, StopIteration) as e:
    msg = str(e).strip().splitlines()
    raise UsageError(f"{path}: cannot read video ({msg[-1] if msg else type(e).__name__})") from None
  w, h = meta["size"]
  fps = float(meta.get("fps") or 25.0)

  def frames():
    mark = 0  # the next time to caption is mark * every_seconds
    for i, raw in enumerate(reader):
      t = i / fps
      if t + 1e-6 >= mark * every_seconds:
        mark = int((t + 1e-6) // every_seconds) + 1
        yield i, t, np.frombuffer(raw, np.uint8).reshape(h, w, 3)

  return meta, frames()


def _frame_input(model, frame):
  """NeuralTalk2's video crop: the central square, resized, then the model's center crop."""
  from captionjax import inference  # pylint: disable=g-import-not-at-top
  return model.preprocess(inference.resize(inference.square_crop(frame), model.image_size))


def caption_video(model, captioner, path: str, every_seconds: float, n_best: int = 1,
                  input_params=None, max_frames: int = -1, on_caption=None) -> dict:
  """The timeline of a video: a caption every `every_seconds`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  meta, frames = video_frames(path, every_seconds, input_params)
  timeline, batch = [], []

  def flush():
    caps = captioner(np.stack([_frame_input(model, f) for _, _, f in batch]))
    for (i, t, _), c in zip(batch, caps):
      rec = {"time": round(t, 3), "frame": i, **{k: v for k, v in _record(
          0, "", c, n_best).items() if k in ("caption", "logprob", "n_best")}}
      timeline.append(rec)
      if on_caption is not None:
        on_caption(rec)
    batch.clear()

  for i, t, frame in frames:
    batch.append((i, t, frame))
    if len(batch) == captioner.batch_size:
      flush()
    if 0 < max_frames <= len(timeline) + len(batch):
      break
  if batch:
    flush()
  return {"video": path, "fps": meta.get("fps"), "duration": meta.get("duration"),
          "size": list(meta["size"]), "every_seconds": every_seconds, "frames": timeline}


def write_captioned_video(src: str, dst: str, timeline: dict) -> None:
  """A copy of `src` with, on each frame, the latest caption drawn at the bottom."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  ffmpeg = _ffmpeg()
  reader = ffmpeg.read_frames(src)
  meta = reader.__next__()
  w, h = meta["size"]
  ew, eh = w + w % 2, h + h % 2  # H.264 wants even sizes
  fps = float(meta.get("fps") or 25.0)
  writer = ffmpeg.write_frames(dst, (ew, eh), fps=fps, macro_block_size=1, quality=7)
  writer.send(None)
  try:
    font = ImageFont.load_default(size=max(10, eh // 24))  # scalable with FreeType
  except (TypeError, OSError):
    font = ImageFont.load_default()
  marks = [(f["frame"], f["caption"]) for f in timeline["frames"]]
  k, caption = 0, ""
  try:
    for i, raw in enumerate(reader):
      while k < len(marks) and marks[k][0] <= i:
        caption = marks[k][1]
        k += 1
      im = Image.new("RGB", (ew, eh))
      im.paste(Image.frombuffer("RGB", (w, h), raw, "raw", "RGB", 0, 1))
      if caption:
        draw = ImageDraw.Draw(im)
        box = draw.textbbox((0, 0), caption, font=font)
        th = box[3] + 8
        draw.rectangle([0, eh - th, ew, eh], fill=(0, 0, 0))
        draw.text((6, eh - th + 4), caption, fill=(255, 255, 0), font=font)
      writer.send(np.asarray(im).tobytes())
  finally:
    writer.close()


def run_video(args) -> int:
  models = _load_models(args)
  model = models[0]
  captioner = _captioner(args, models, args.batch_size)
  t0 = time.time()
  timeline = caption_video(
      model, captioner, args.video, args.every_seconds, args.n_best,
      on_caption=lambda r: _say(f"{r['time']:8.2f}s  {r['caption']}"))
  dt = time.time() - t0
  write_json(args.output, timeline)
  _say(f"captioned {len(timeline['frames'])} frames of {args.video} in {dt:.1f}s "
       "(compile included)")
  if args.video_output:
    write_captioned_video(args.video, args.video_output, timeline)
    _say(f"captioned video: {args.video_output}")
  return EXIT_OK


def camera_device(index: int) -> str:
  """/dev/videoN, or UsageError saying clearly that there is no such camera."""
  dev = f"/dev/video{index}"
  if not os.path.exists(dev):
    have = sorted(d for d in os.listdir("/dev") if d.startswith("video")) if os.path.isdir("/dev") else []
    found = ("cameras here: " + ", ".join("/dev/" + d for d in have) if have
             else "no /dev/video* device at all")
    raise UsageError(f"--camera={index}: no camera {dev} on this machine ({found})")
  return dev


def run_camera(args) -> int:
  dev = camera_device(args.camera)
  models = _load_models(args)
  model = models[0]
  captioner = _captioner(args, models, 1)
  _say(f"captioning {dev} every {args.every_seconds}s; Ctrl-C stops")
  frames = []

  def show(rec):
    frames.append(rec)
    print(f"{rec['time']:8.2f}s  {rec['caption']}", flush=True)

  try:
    caption_video(model, captioner, dev, args.every_seconds, args.n_best,
                  input_params=["-f", "v4l2"], max_frames=args.max_frames, on_caption=show)
  except KeyboardInterrupt:
    pass
  if args.output:
    write_json(args.output, {"camera": dev, "every_seconds": args.every_seconds,
                             "frames": frames})
  return EXIT_OK
