"""The ranking demo page: grounded image-sentence retrieval as a static page.

`captionjax rank ... --html=DIR` writes DIR/index.html and DIR/thumbs/*.png
(open it from disk: no server, nothing fetched). Two sections:

  image search      each sentence, its words with their grounding scores, and
                    its top images with their scores: a green border for the
                    ground-truth image, red for the others, and the
                    ground-truth image in yellow (with its rank) when it is
                    missing from the top. Clicking an image marks the region
                    each word aligned to (and shows the words' scores against
                    that image); the address DIR/index.html#qM/K opens image
                    K of sentence M at load.
  image annotation  each image and its top sentences, colored the same way.

Every string is HTML-escaped (the words and alignments travel as JSON in
escaped attributes, and the script writes them with textContent). File
names inside DIR come from numeric image ids only.
"""

import html
import json
from typing import Dict, Sequence

from captionjax import gallery

THUMB_DIR = "thumbs"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 1.5em; background: #fafafa; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .2em 0; }
h2 { font-size: 1.15em; margin: 1.4em 0 .6em 0; }
.summary { color: #555; margin: 0 0 .8em 0; }
table.metrics { border-collapse: collapse; margin: 0 0 .8em 0; font-variant-numeric: tabular-nums; }
table.metrics td, table.metrics th { border: 1px solid #ccc; padding: 3px 9px; text-align: right; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
.legend span { margin-right: 1.2em; padding: 1px 6px; border: 3px solid; border-radius: 3px; }
.query, .annotation { background: #fff; border: 1px solid #ddd; border-radius: 6px;
                      padding: 8px 10px; margin: 0 0 12px 0; }
.sentence { margin: 0 0 6px 0; font-size: 1.05em; }
.w { display: inline-block; margin-right: .35em; padding: 0 2px; border-radius: 3px; }
.w sub { color: #666; font-size: .7em; margin-left: 1px; font-variant-numeric: tabular-nums; }
.w.grounded { background: #dbeafe; }
.hits { display: flex; flex-wrap: wrap; gap: 10px; }
figure.hit { margin: 0; cursor: pointer; border: 5px solid #999; border-radius: 4px;
             background: #fff; }
figure.hit.selected { box-shadow: 0 0 0 3px #333; }
.thumb { position: relative; width: 160px; height: 160px; }
.thumb img, .annotation img { display: block; width: 160px; height: 160px;
                              image-rendering: pixelated; background: #eee; }
figure.hit figcaption { font-size: .8em; padding: 2px 4px; font-variant-numeric: tabular-nums; }
.correct { border-color: #16a34a !important; }
.wrong { border-color: #dc2626 !important; }
.missed { border-color: #eab308 !important; }
.overlay { position: absolute; inset: 0; pointer-events: none; }
.cell { position: absolute; box-sizing: border-box; border: 1px dashed rgba(255,255,255,.6);
        display: flex; flex-wrap: wrap; align-content: center; justify-content: center;
        overflow: hidden; }
.cell.used { border: 2px solid #facc15; background: rgba(250, 204, 21, .18); }
.cell span { font-size: 10px; line-height: 11px; color: #fff; background: rgba(0,0,0,.7);
             padding: 0 2px; margin: 1px; border-radius: 2px; }
.annotation { display: flex; gap: 12px; align-items: flex-start; }
.annotation img { border: 5px solid #999; border-radius: 4px; }
.annotation ol { margin: 0; padding-left: 2.2em; }
.annotation li { margin: 2px 0; padding: 1px 4px; border-left: 5px solid; }
.annotation li.correct { color: #166534; } .annotation li.wrong { color: #991b1b; }
.annotation li.missed { color: #854d0e; }
.score { color: #666; font-variant-numeric: tabular-nums; margin-right: .5em; }
"""

# Click an image: select it, show its words' scores against it, mark each word's region.
_SCRIPT = """
(function () {
  var grid = +document.body.getAttribute("data-grid") || 1;
  function select(fig) {
    var query = fig.closest(".query");
    var open = fig.classList.contains("selected") && fig.querySelector(".overlay");
    query.querySelectorAll("figure.hit").forEach(function (f) {
      f.classList.remove("selected");
      var o = f.querySelector(".overlay");
      if (o) o.remove();
    });
    if (open) return;
    fig.classList.add("selected");
    var raw = fig.getAttribute("data-align");
    if (!raw) return;
    var align = JSON.parse(raw);
    var words = JSON.parse(query.getAttribute("data-words"));
    query.querySelectorAll(".w").forEach(function (w, i) {
      var a = align[i];
      w.querySelector("sub").textContent = a ? a[1].toFixed(2) : "";
      w.classList.toggle("grounded", !!a && a[1] > 0);
    });
    var overlay = document.createElement("div");
    overlay.className = "overlay";
    var cells = [];
    for (var p = 0; p < grid * grid; p++) {
      var c = document.createElement("div");
      c.className = "cell";
      c.style.left = (100 * (p % grid) / grid) + "%";
      c.style.top = (100 * Math.floor(p / grid) / grid) + "%";
      c.style.width = c.style.height = (100 / grid) + "%";
      overlay.appendChild(c);
      cells.push(c);
    }
    align.forEach(function (a, i) {
      if (!a || a[1] <= 0 || !cells[a[0]]) return;
      var s = document.createElement("span");
      s.textContent = words[i];
      cells[a[0]].appendChild(s);
      cells[a[0]].classList.add("used");
    });
    fig.querySelector(".thumb").appendChild(overlay);
  }
  document.addEventListener("click", function (e) {
    var fig = e.target.closest && e.target.closest("figure.hit");
    if (fig) select(fig);
  });
  var m = /^#q(\\d+)\\/(\\d+)$/.exec(location.hash);
  if (m) {
    var q = document.getElementById("q" + m[1]);
    var figs = q ? q.querySelectorAll("figure.hit") : [];
    if (figs[+m[2]]) { select(figs[+m[2]]); q.scrollIntoView(); }
  }
})();
"""


def _e(text) -> str:
  """HTML-escapes any value (quotes included: safe in attributes too)."""
  return html.escape(str(text), quote=True)


def thumb_name(image_id) -> str:
  return f"{THUMB_DIR}/{int(image_id):06d}.png"


def _metrics_table(result: dict) -> list:
  rows = ['<table class="metrics">',
          "<tr><th></th><th>R@1</th><th>R@5</th><th>R@10</th><th>median rank</th></tr>"]
  for key, name in (("sentence_retrieval", "sentence retrieval (image annotation)"),
                    ("image_retrieval", "image retrieval (image search)")):
    t = result[key]
    rows.append(f'<tr class="{key}"><td>{_e(name)}</td>' + "".join(
        f"<td>{float(t[k]):.1f}</td>" for k in ("R@1", "R@5", "R@10"))
                + f"<td>{float(t['median_rank']):g}</td></tr>")
  rows.append("</table>")
  return rows


def _hit(h: dict, cls: str) -> str:
  align = h.get("align")
  attr = f' data-align="{_e(json.dumps(align))}"' if align is not None else ""
  iid = int(h["image_id"])
  return (f'<figure class="hit {cls}" data-image-id="{iid}"{attr}>'
          f'<div class="thumb"><img src="{_e(thumb_name(iid))}" alt="image {iid}" '
          f'loading="lazy"></div><figcaption><span class="rank">#{int(h["rank"])}</span> '
          f'<span class="score">{float(h["score"]):.3f}</span></figcaption></figure>')


def render(queries: Sequence[dict], images: Sequence[dict], result: dict, grid: int = 1,
           title: str = "image-sentence ranking", summary: str = "") -> str:
  """The page's HTML.

  Args:
    queries: per sentence {"words": [str], "image_id": its image, "hits": [{"image_id",
      "score", "rank", "correct", "align": [[region, score] per word] or None}],
      "missed": the ground-truth image's hit (with "rank") when not in hits, else None}.
      The words show the grounding scores against the first hit.
    images: per image {"image_id", "file_name", "sentences": [{"text", "score", "rank",
      "correct"}], "missed": the best ground-truth sentence when not in them, or None}.
    result: ranking.json's content (the metrics table).
    grid: G, the regions are G x G cells (1: the whole image).
  """
  out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
         '<meta name="viewport" content="width=device-width, initial-scale=1">',
         f"<title>{_e(title)}</title>", f"<style>{_CSS}</style>", "</head>",
         f'<body data-grid="{int(grid)}">', f"<h1>{_e(title)}</h1>"]
  if summary:
    out.append(f'<p class="summary">{_e(summary)}</p>')
  out += _metrics_table(result)
  out.append('<p class="legend"><span class="correct">ground truth, retrieved</span>'
             '<span class="wrong">wrong</span><span class="missed">ground truth missed '
             'from the top</span> (click an image: where each word aligned)</p>')
  out.append(f'<section id="search"><h2>Image search: the top images of each sentence '
             f'({len(queries)} sentences)</h2>')
  for qi, q in enumerate(queries):
    first = q["hits"][0].get("align") if q["hits"] else None
    out.append(f'<div class="query" id="q{qi}" data-words="{_e(json.dumps(q["words"]))}" '
               f'data-image-id="{int(q["image_id"])}">')
    words = []
    for i, w in enumerate(q["words"]):
      g = f"{first[i][1]:.2f}" if first is not None else ""
      cls = "w grounded" if first is not None and first[i][1] > 0 else "w"
      words.append(f'<span class="{cls}">{_e(w)}<sub>{g}</sub></span>')
    out.append(f'<p class="sentence">{"".join(words)}</p>')
    out.append('<div class="hits">')
    for h in q["hits"]:
      out.append(_hit(h, "correct" if h["correct"] else "wrong"))
    if q.get("missed"):
      out.append(_hit(q["missed"], "missed"))
    out.append("</div></div>")
  out.append("</section>")
  out.append(f'<section id="annotation"><h2>Image annotation: the top sentences of each '
             f'image ({len(images)} images)</h2>')
  for im in images:
    iid = int(im["image_id"])
    ok = any(s["correct"] for s in im["sentences"])
    out.append(f'<div class="annotation" id="i{iid}"><img class="{"correct" if ok else "missed"}" '
               f'src="{_e(thumb_name(iid))}" alt="image {iid}" loading="lazy"><div>'
               f'<p class="file">{_e(im["file_name"])}</p><ol>')
    rows = [(s, "correct" if s["correct"] else "wrong") for s in im["sentences"]]
    if im.get("missed"):
      rows.append((im["missed"], "missed"))
    for s, cls in rows:
      out.append(f'<li class="{cls}" value="{int(s["rank"])}"><span class="score">'
                 f'{float(s["score"]):.3f}</span><span class="text">{_e(s["text"])}</span></li>')
    out.append("</ol></div></div>")
  out.append("</section>")
  out += [f"<script>{_SCRIPT}</script>", "</body>", "</html>", ""]
  return "\n".join(out)


def write_page(out_dir: str, queries, images, result: dict, thumbnails: Dict[int, bytes],
               grid: int = 1, title: str = "image-sentence ranking", summary: str = "") -> str:
  """Writes out_dir/index.html and out_dir/thumbs/*.png; returns index.html's path.

  `thumbnails` maps image ids to PNG bytes.
  """
  return gallery.write_files(out_dir, render(queries, images, result, grid, title, summary),
                             {thumb_name(iid): data for iid, data in thumbnails.items()})
