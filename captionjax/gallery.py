"""A static, self-contained HTML gallery of captioned images.

    gallery.write_gallery("out/gallery", results, failures, thumbnails)

writes out/gallery/index.html and out/gallery/thumbs/<image_id>.jpg. The page
needs no script, no network and no server: it opens from disk, or through
`python -m http.server`. Every string that comes from a file name or from the
model is HTML-escaped; thumbnail file names are built from the numeric image
ids only, never from input file names.
"""

import html
import io
import os
from typing import Dict, Sequence, Tuple

import numpy as np

THUMB_SIZE = 320  # longest side of a thumbnail, in pixels
THUMB_DIR = "thumbs"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 1.5em; background: #fafafa; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .2em 0; }
.summary { color: #555; margin: 0 0 1.2em 0; }
.gallery { display: flex; flex-wrap: wrap; gap: 14px; }
figure.result { margin: 0; width: 320px; background: #fff; border: 1px solid #ddd;
                border-radius: 6px; overflow: hidden; }
figure.result img { display: block; width: 320px; height: 240px; object-fit: contain;
                    background: #eee; }
figcaption { padding: 8px 10px; }
.caption { font-size: 1.05em; margin: 0 0 4px 0; }
.meta { font-size: .8em; color: #666; margin: 0; word-break: break-all; }
ol.nbest { font-size: .85em; margin: 6px 0 0 0; padding-left: 1.4em; color: #333; }
.logprob { color: #888; font-variant-numeric: tabular-nums; }
.failed { margin-top: 2em; }
.failed li { color: #a00; word-break: break-all; }
"""


def _e(text) -> str:
  """HTML-escapes any value (quotes included: safe in attributes too)."""
  return html.escape(str(text), quote=True)


def thumbnail(image: np.ndarray, max_side: int = THUMB_SIZE, quality: int = 85) -> bytes:
  """uint8 [H, W, 3] -> JPEG bytes with the longest side at most `max_side`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  im = Image.fromarray(image)
  im.thumbnail((max_side, max_side), Image.BICUBIC)
  buf = io.BytesIO()
  im.save(buf, "JPEG", quality=quality)
  return buf.getvalue()


def thumbnail_file(path: str, max_side: int = THUMB_SIZE) -> bytes:
  """A file's thumbnail (JPEG bytes), decoded at reduced scale where the format allows.

  Raises images.ImageError as images.load_image does.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from captionjax import images  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      w, h = im.size
      if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF says: rotated by 90 degrees
        w, h = h, w
  except Exception:  # pylint: disable=broad-except
    return thumbnail(images.load_image(path), max_side)  # let load_image name the problem
  scale = min(1.0, max_side / max(w, h, 1))
  size = (max(1, round(h * scale)), max(1, round(w * scale)))
  return thumbnail(images.load_image(path, size=size), max_side)


def thumb_name(image_id) -> str:
  return f"{THUMB_DIR}/{int(image_id):06d}.jpg"


def render(results: Sequence[dict], failures: Sequence[Tuple[str, str]] = (),
           title: str = "captions", summary: str = "",
           thumbs: Sequence = ()) -> str:
  """The page's HTML.

  Args:
    results: {"image_id", "file_name", "caption", "logprob"[, "n_best"]} each.
    failures: (file name, one-line reason) of the inputs that were not captioned.
    title: the page title.
    summary: a line under the title (escaped like everything else).
    thumbs: image ids that have a thumbnail under thumbs/.
  """
  have = set(thumbs)
  out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
         '<meta name="viewport" content="width=device-width, initial-scale=1">',
         f"<title>{_e(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
         f"<h1>{_e(title)}</h1>"]
  if summary:
    out.append(f'<p class="summary">{_e(summary)}</p>')
  out.append('<main class="gallery">')
  for r in results:
    iid = int(r["image_id"])
    out.append(f'<figure class="result" id="image-{iid}" data-image-id="{iid}">')
    if iid in have:
      out.append(f'<img src="{_e(thumb_name(iid))}" alt="{_e(r["caption"])}" loading="lazy">')
    out.append("<figcaption>")
    if r["caption"]:
      out.append(f'<p class="caption">{_e(r["caption"])}</p>')
    else:  # the model ended the caption at once
      out.append('<p class="caption empty"><i>(empty caption)</i></p>')
    out.append(f'<p class="meta"><span class="file">{_e(r["file_name"])}</span> '
               f'<span class="logprob">logprob {float(r["logprob"]):.3f}</span></p>')
    if len(r.get("n_best", ())) > 1:
      out.append('<ol class="nbest">')
      for alt in r["n_best"]:
        text = _e(alt["caption"]) if alt["caption"] else "<i>(empty caption)</i>"
        out.append(f'<li><span class="caption">{text}</span> '
                   f'<span class="logprob">{float(alt["logprob"]):.3f}</span></li>')
      out.append("</ol>")
    out.append("</figcaption>")
    out.append("</figure>")
  out.append("</main>")
  if failures:
    out.append('<section class="failed">')
    out.append(f"<h2>Not captioned ({len(failures)})</h2>")
    out.append("<ul>")
    for name, reason in failures:
      out.append(f'<li><span class="file">{_e(name)}</span>: '
                 f'<span class="reason">{_e(reason)}</span></li>')
    out.append("</ul>")
    out.append("</section>")
  out += ["</body>", "</html>", ""]
  return "\n".join(out)


def write_gallery(out_dir: str, results: Sequence[dict],
                  failures: Sequence[Tuple[str, str]] = (),
                  thumbnails: Dict[int, bytes] = None, title: str = "captions",
                  summary: str = "") -> str:
  """Writes out_dir/index.html and out_dir/thumbs/*.jpg; returns index.html's path.

  `thumbnails` maps image ids to JPEG bytes (see `thumbnail`).
  """
  thumbnails = thumbnails or {}
  return write_files(out_dir, render(results, failures, title, summary, list(thumbnails)),
                     {thumb_name(iid): data for iid, data in thumbnails.items()})


def write_files(out_dir: str, page: str, files: Dict[str, bytes]) -> str:
  """Writes `files` (path inside out_dir -> bytes) and out_dir/index.html = `page`;
  returns index.html's path. Also the ranking demo's (rank_page.py)."""
  for name, data in files.items():
    os.makedirs(os.path.dirname(os.path.join(out_dir, name)), exist_ok=True)
    with open(os.path.join(out_dir, name), "wb") as f:
      f.write(data)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "index.html")
  with open(path, "w", encoding="utf-8") as f:
    f.write(page)
  return path
