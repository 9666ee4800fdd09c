"""The embedded default data set, "shapes": generated scenes with captions.

Each image (64 to 128 pixels a side) shows 1 to 3 objects on a varied
background. An object has one of 6 shapes, 7 colors and 2 sizes, and sits in
its own cell of a 3 x 3 grid (with jitter), so every caption can speak of
positions ("in the top left corner") and relations ("to the left of"). Each
image gets at least 5 captions in varied phrasings, and its true object list
is kept beside it, so a caption can be checked for objects that are not
there (`hallucination_free`), and exactly the objects there (`names_exactly`).

Splits: train, val and test never show the HELD_OUT (color, shape) pairs;
the split "novel" shows at least one of them in every image, to measure how
a model composes attributes it never saw together.

Everything is deterministic given the seed. `make_shapes` writes the raw
format (`raw.json` + PNG files) that `captionjax prepro` reads like any real
data set.
"""

import json
import multiprocessing
import os

import numpy as np
from PIL import Image, ImageDraw

VERSION = 2  # bumped whenever the generated images or captions change (cache key)
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLORS = {  # name -> RGB
    "red": (220, 30, 30), "green": (40, 180, 60), "blue": (40, 80, 230),
    "yellow": (240, 220, 40), "purple": (150, 50, 200), "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
SIZES = ("small", "big")
SIZE_WORDS = {"small": ("small", "little"), "big": ("big", "large")}
HELD_OUT = (("red", "star"), ("blue", "triangle"), ("green", "cross"),
            ("yellow", "circle"), ("purple", "square"))
GRID = 3  # objects sit in distinct cells of a GRID x GRID layout
MAX_OBJECTS = 3
CAPTIONS_PER_IMAGE = 5
MAX_WORDS = 16  # every caption fits NeuralTalk2's default max_length

_WHERE = {  # (row, col) -> phrases
    (0, 0): ("in the top left corner", "at the top left", "in the upper left corner"),
    (0, 1): ("at the top", "at the top center", "near the top"),
    (0, 2): ("in the top right corner", "at the top right", "in the upper right corner"),
    (1, 0): ("on the left", "on the left side", "at the left"),
    (1, 1): ("in the center", "in the middle", "at the center"),
    (1, 2): ("on the right", "on the right side", "at the right"),
    (2, 0): ("in the bottom left corner", "at the bottom left", "in the lower left corner"),
    (2, 1): ("at the bottom", "at the bottom center", "near the bottom"),
    (2, 2): ("in the bottom right corner", "at the bottom right", "in the lower right corner"),
}
_COUNT = {1: "one", 2: "two", 3: "three"}
DEFAULT_SPLITS = {"train": 8000, "val": 500, "test": 1000, "novel": 500}


# ---------------------------------------------------------------- scenes


def _sample_objects(rng: np.random.Generator, novel: bool) -> list[dict]:
  n = int(rng.integers(1, MAX_OBJECTS + 1))
  cells = rng.choice(GRID * GRID, size=n, replace=False)
  held = set(HELD_OUT)
  while True:
    objs = []
    for cell in cells:
      objs.append({
          "shape": SHAPES[rng.integers(len(SHAPES))],
          "color": list(COLORS)[rng.integers(len(COLORS))],
          "size": SIZES[rng.integers(len(SIZES))],
          "row": int(cell // GRID), "col": int(cell % GRID),
      })
    pairs = {(o["color"], o["shape"]) for o in objs}
    if novel:
      if pairs & held:
        return objs
      # Force one held-out pair, keeping the draw deterministic.
      c, s = HELD_OUT[rng.integers(len(HELD_OUT))]
      objs[int(rng.integers(n))].update(color=c, shape=s)
      return objs
    if not pairs & held:
      return objs


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """Dark, low-saturation backgrounds: solid, gradient or noise."""
  base = rng.uniform(10, 110, size=3)
  kind = rng.integers(3)
  if kind == 0:
    img = np.broadcast_to(base, (size, size, 3)).copy()
  elif kind == 1:
    other = rng.uniform(10, 110, size=3)
    t = np.linspace(0, 1, size)[:, None, None]
    if rng.integers(2):
      t = t.transpose(1, 0, 2)
    img = base * (1 - t) + other * t
    img = np.broadcast_to(img, (size, size, 3)).copy()
  else:
    img = base + rng.normal(0, 12, size=(size, size, 3))
  return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(shape: str, cx: float, cy: float, r: float):
  if shape == "square":
    r *= 0.85
    return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
  if shape == "triangle":
    return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
  if shape == "diamond":
    return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
  if shape == "cross":
    a = r * 0.35
    return [(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a),
            (cx + r, cy + a), (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r),
            (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a)]
  if shape == "star":
    ang = np.pi / 2 + np.arange(10) * np.pi / 5
    rad = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
    return list(zip(cx + rad * np.cos(ang), cy - rad * np.sin(ang)))
  raise ValueError(shape)


def render(objects: list[dict], size: int, rng: np.random.Generator) -> np.ndarray:
  """Draws a scene: uint8 [size, size, 3]."""
  scale = 2  # supersampling for smooth edges
  big = size * scale
  bg = _background(rng, size)
  im = Image.fromarray(bg).resize((big, big), Image.NEAREST)
  draw = ImageDraw.Draw(im)
  cell = big / GRID
  for o in objects:
    frac = rng.uniform(0.36, 0.44) if o["size"] == "big" else rng.uniform(0.2, 0.25)
    r = frac * cell
    slack = cell / 2 - r
    cx = (o["col"] + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
    cy = (o["row"] + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
    jitter = rng.integers(-15, 16, size=3)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[o["color"]], jitter))
    if o["shape"] == "circle":
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
      draw.polygon(_polygon(o["shape"], cx, cy, r), fill=fill)
  return np.asarray(im.resize((size, size), Image.LANCZOS), dtype=np.uint8)


# ---------------------------------------------------------------- captions


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _np(o: dict, rng, size_p=0.6) -> str:
  """A noun phrase: 'a big red circle', 'an orange star'."""
  words = []
  if rng.random() < size_p:
    words.append(SIZE_WORDS[o["size"]][rng.integers(2)])
  words += [o["color"], o["shape"]]
  return f"{_article(words[0])} {' '.join(words)}"


def _where(o: dict, rng) -> str:
  return _pick(_WHERE[(o["row"], o["col"])], rng)


def _pick(options, rng):
  return options[rng.integers(len(options))]


def _relation(a: dict, b: dict) -> str | None:
  if a["col"] < b["col"] and a["row"] == b["row"]:
    return "to the left of"
  if a["col"] > b["col"] and a["row"] == b["row"]:
    return "to the right of"
  if a["row"] < b["row"]:
    return "above"
  if a["row"] > b["row"]:
    return "below"
  return None


_RELATION_WORDS = {"to the left of": ("to the left of", "left of"),
                   "to the right of": ("to the right of", "right of"),
                   "above": ("above", "over"), "below": ("below", "under", "beneath")}
_LEADS = ("a picture of", "an image of", "a photo of", "a drawing of")
_WITH = ("a picture with", "an image with", "a dark background with", "an image showing",
         "a photo showing")


def _join(parts: list[str]) -> str:
  if len(parts) == 1:
    return parts[0]
  return ", ".join(parts[:-1]) + " and " + parts[-1]


def _one_caption(objs: list[dict], rng) -> str:
  """One caption in one of several phrasings (object order shuffled)."""
  order = list(rng.permutation(len(objs)))
  objs = [objs[i] for i in order]
  n = len(objs)
  kind = rng.integers(8)
  if kind == 0:
    return _join([_np(o, rng) for o in objs])
  if kind == 1:
    return _join([f"{_np(o, rng, 0.3)} {_where(o, rng)}" for o in objs])
  if kind == 2 and n >= 2:
    rel = _relation(objs[0], objs[1])
    if rel:
      s = f"{_np(objs[0], rng, 0.3)} {_pick(_RELATION_WORDS[rel], rng)} {_np(objs[1], rng, 0.3)}"
      if n == 3:
        s += f" and {_np(objs[2], rng, 0.0)}"
      return s
  if kind == 3:
    verb = "is" if n == 1 else "are"
    lead = _pick((f"there {verb}", "we can see", "you can see"), rng)
    return f"{lead} {_join([_np(o, rng, 0.4) for o in objs])}"
  if kind == 4:
    noun = "shape" if n == 1 else "shapes"
    lead = _pick(_LEADS + ("",), rng)
    s = f"{_COUNT[n]} {noun} {_join([_np(o, rng, 0.2) for o in objs])}"
    return f"{lead} {s}".strip()
  if kind == 5:
    return f"{_pick(_WITH, rng)} {_join([_np(o, rng, 0.5) for o in objs])}"
  if kind == 6:
    return f"{_join([_np(o, rng, 0.5) for o in objs])} on a dark background"
  if kind == 7 and n >= 2:
    return f"{_np(objs[0], rng, 0.5)} with {_join([_np(o, rng, 0.3) for o in objs[1:]])}"
  return f"{_pick(_LEADS, rng)} {_join([_np(o, rng, 0.5) for o in objs])}"


def captions_for(objects: list[dict], rng, count: int = CAPTIONS_PER_IMAGE) -> list[str]:
  """`count` distinct captions of at most MAX_WORDS words (varied phrasings)."""
  out, tries = [], 0
  while len(out) < count:
    c = _one_caption(objects, rng)
    tries += 1
    if len(c.replace(",", " ").split()) <= MAX_WORDS and (c not in out or tries > 200):
      out.append(c)
  return out


# ---------------------------------------------------------------- checking

_SHAPE_SET = set(SHAPES)
_COLOR_SET = set(COLORS)


def mentions(caption: str) -> list[tuple[str | None, str]]:
  """The (color or None, shape) pairs a caption mentions, in order."""
  words = caption.lower().replace(",", " ").split()
  out = []
  for i, w in enumerate(words):
    shape = w[:-1] if w.endswith("s") and w[:-1] in _SHAPE_SET else w
    if shape in _SHAPE_SET:
      color = None
      j = i - 1
      while j >= 0 and words[j] in _COLOR_SET | {"small", "little", "big", "large"}:
        if words[j] in _COLOR_SET:
          color = words[j]
          break
        j -= 1
      out.append((color, shape))
  return out


def hallucinations(caption: str, objects: list[dict]) -> int:
  """How many of the shapes the caption mentions (with their colors, where said)
  are not in the image."""
  present = {(o["color"], o["shape"]) for o in objects}
  shapes = {o["shape"] for o in objects}
  return sum(shape not in shapes or (color is not None and (color, shape) not in present)
             for color, shape in mentions(caption))


def hallucination_free(caption: str, objects: list[dict]) -> bool:
  """True when every shape (and its color, if said) the caption mentions is there."""
  return hallucinations(caption, objects) == 0


def names_exactly(caption: str, objects: list[dict]) -> bool:
  """True when the caption names exactly the image's objects: each (color, shape)
  as many times as it is there, nothing absent, nothing left out."""
  said = sorted(mentions(caption), key=str)
  there = sorted(((o["color"], o["shape"]) for o in objects), key=str)
  return said == there


# ---------------------------------------------------------------- writing


def _make_one(job):
  """Worker: renders and saves one image; returns its raw-format item."""
  seed, split_index, split, i, image_size, img_dir = job
  rng = np.random.default_rng([seed, split_index, i])
  objs = _sample_objects(rng, novel=(split == "novel"))
  img = render(objs, image_size, rng)
  name = f"{split}_{i:05d}.png"
  Image.fromarray(img).save(os.path.join(img_dir, name), compress_level=1)
  return {"file_path": f"images/{name}", "captions": captions_for(objs, rng),
          "split": split, "objects": objs}


def make_shapes(output_dir: str, splits: dict | None = None, image_size: int = 64,
                seed: int = 0, progress: bool = True, num_workers: int | None = None) -> str:
  """Writes `output_dir/raw.json` and `output_dir/images/*.png`; returns raw.json's path.

  Image i of a split depends only on (seed, split, i), so the result is the
  same whatever the number of workers.
  """
  if not 16 <= image_size <= 512:
    raise ValueError(f"image_size must be in 16..512, got {image_size}")
  splits = dict(DEFAULT_SPLITS if splits is None else splits)
  img_dir = os.path.join(output_dir, "images")
  os.makedirs(img_dir, exist_ok=True)
  jobs = [(seed, k, split, i, image_size, img_dir)
          for k, (split, count) in enumerate(splits.items()) for i in range(count)]
  num_workers = num_workers or os.cpu_count() or 1
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=len(jobs), desc="shapes", unit="img", disable=not progress)
  items = []
  if num_workers > 1:
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
      for item in pool.imap(_make_one, jobs, chunksize=64):
        items.append(item)
        bar.update()
  else:
    for job in jobs:
      items.append(_make_one(job))
      bar.update()
  bar.close()
  for i, item in enumerate(items):
    item["id"] = i
  raw = os.path.join(output_dir, "raw.json")
  with open(raw, "w", encoding="utf-8") as f:
    f.write(json.dumps(items))
  return raw


def add_arguments(p):
  p.add_argument("--output_dir", required=True, help="where raw.json and images/ go")
  for split, n in DEFAULT_SPLITS.items():
    p.add_argument(f"--num_{split}", type=int, default=n, help=f"images in split {split}")
  p.add_argument("--image_size", type=int, default=64, help="pixels a side (16 to 512)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--prepro", action="store_true",
                 help="also run prepro into OUTPUT_DIR/prepro")


def run(args) -> int:
  splits = {s: getattr(args, f"num_{s}") for s in DEFAULT_SPLITS}
  for s, n in splits.items():
    if n < 0:
      raise ValueError(f"--num_{s}={n}: must be >= 0")
  raw = make_shapes(args.output_dir, splits, args.image_size, args.seed)
  print(raw)
  if args.prepro:
    prepare(args.output_dir, splits, args.image_size, args.seed, generate=False)
  return 0


def prepare(root: str, splits: dict | None = None, image_size: int = 64, seed: int = 0,
            generate: bool = True, num_workers: int | None = None) -> str:
  """Generates (if needed) and preprocesses the shapes set; returns the prepro dir.

  A prepro output made with other settings (another version, split sizes,
  image size or seed) is made again, not reused. Runs that prepare the same
  `root` at once take turns (a lock file), so none deletes another's shards.
  """
  import fcntl  # pylint: disable=g-import-not-at-top
  from captionjax import datasets, prepro  # pylint: disable=g-import-not-at-top
  out = os.path.join(root, "prepro")
  splits = dict(DEFAULT_SPLITS if splits is None else splits)
  made_by = {"version": VERSION, "splits": splits, "image_size": image_size, "seed": seed}
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, ".prepare.lock"), "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if _made_by(out) == made_by:
      return out
    if generate or not os.path.exists(os.path.join(root, "raw.json")):
      make_shapes(root, splits, image_size, seed)
    items = datasets.read_raw_json(os.path.join(root, "raw.json"))
    prepro.prepro(items, out, images_root=root, max_length=MAX_WORDS,
                  word_count_threshold=0, image_size=image_size, image_format="png",
                  num_workers=num_workers or os.cpu_count() or 1,
                  extra_info={"name": "shapes", "seed": seed, "made_by": made_by}, force=True)
  return out


def _made_by(prepro_dir: str):
  """The generator settings recorded in a prepro output's dataset_info.json (None if none)."""
  try:
    with open(os.path.join(prepro_dir, "dataset_info.json"), encoding="utf-8") as f:
      return json.load(f).get("made_by")
  except (OSError, ValueError, AttributeError):
    return None


def object_targets(objects_list: list, grid: int = GRID) -> dict:
  """Per-cell labels for CNN pretraining, from each image's object list.

  Returns int32 arrays [N, grid, grid]: `shape` (0 = empty cell, 1..6),
  `color` (0..6) and `size` (0 small, 1 big); color and size are only
  meaningful where shape > 0.
  """
  n = len(objects_list)
  out = {k: np.zeros((n, grid, grid), np.int32) for k in ("shape", "color", "size")}
  colors = list(COLORS)
  for i, objs in enumerate(objects_list):
    for o in objs or ():
      r, c = o["row"] * grid // GRID, o["col"] * grid // GRID
      out["shape"][i, r, c] = SHAPES.index(o["shape"]) + 1
      out["color"][i, r, c] = colors.index(o["color"])
      out["size"][i, r, c] = SIZES.index(o["size"])
  return out
