"""METEOR 1.5 through the Meteor jar that pycocoevalcap ships (needs Java).

Talks the jar's `-stdio` protocol the way coco-caption does: one
"SCORE ||| ref ||| ... ||| hyp" line per image returns that image's statistics,
then one "EVAL ||| stats ||| ..." line returns every image's score and the
corpus score. Options as in coco-caption: `-l en -norm`, 2 GB heap.
"""

import importlib.util
import os
import shutil
import subprocess
import threading
from typing import Dict, List, Optional, Tuple

JAVA = "java"
METEOR_JAR = "meteor-1.5.jar"
JAVA_HEAP = "-Xmx2G"
_SEP = " ||| "


def meteor_jar_dir() -> Optional[str]:
  """Directory of pycocoevalcap's meteor-1.5.jar, or None if not installed."""
  try:
    spec = importlib.util.find_spec("pycocoevalcap.meteor.meteor")
  except ImportError:
    spec = None
  if spec is None or not spec.origin:
    return None
  d = os.path.dirname(os.path.abspath(spec.origin))
  return d if os.path.exists(os.path.join(d, METEOR_JAR)) else None


def missing_requirement() -> Optional[str]:
  """Why METEOR cannot run here (a one-line message), or None if it can.

  CAPTIONJAX_METEOR=0 in the environment turns it off (Java's start costs
  about 12 s of CPU per scoring: quick runs such as scripts/ --dry_run skip it).
  """
  if os.environ.get("CAPTIONJAX_METEOR", "1") == "0":
    return "METEOR turned off (CAPTIONJAX_METEOR=0)"
  if shutil.which(JAVA) is None:
    return "METEOR needs Java: no `java` executable on PATH"
  if meteor_jar_dir() is None:
    return f"METEOR needs pycocoevalcap's {METEOR_JAR}: pycocoevalcap not installed"
  return None


def _clean_hypothesis(hyp: str) -> str:
  """coco-caption's cleaning: drop the separator, collapse one double space."""
  return hyp.replace("|||", "").replace("  ", " ")


def compute_meteor(gts: Dict, res: Dict) -> Tuple[float, List[float]]:
  """Corpus and per-image METEOR through the jar.

  Args:
    gts: dict key -> list of tokenized reference strings.
    res: dict key -> list holding one tokenized hypothesis; same keys.

  Returns:
    (corpus score, list of per-image scores in the order of `gts`' keys).

  Raises:
    RuntimeError: Java or the jar is missing, or the jar fails.
  """
  why = missing_requirement()
  if why:
    raise RuntimeError(why)
  keys = list(gts)
  cmd = [JAVA, "-jar", JAVA_HEAP, METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm"]
  proc = subprocess.Popen(cmd, cwd=meteor_jar_dir(), stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  # stderr is drained by a thread so a chatty jar cannot block on a full pipe.
  err_chunks: List[bytes] = []
  drain = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
  drain.start()

  def write_all():
    for k in keys:
      line = _SEP.join(("SCORE", _SEP.join(gts[k]), _clean_hypothesis(res[k][0])))
      proc.stdin.write((line + "\n").encode())
    proc.stdin.flush()

  try:
    writer = threading.Thread(target=write_all, daemon=True)
    writer.start()
    stats = []
    for _ in keys:
      line = proc.stdout.readline()
      if not line:
        raise RuntimeError("METEOR jar stopped early: "
                           + b"".join(err_chunks).decode(errors="replace")[-500:])
      stats.append(line.decode().strip())
    writer.join()
    proc.stdin.write(("EVAL" + "".join(_SEP + s for s in stats) + "\n").encode())
    proc.stdin.flush()
    scores = [float(proc.stdout.readline().strip()) for _ in keys]
    corpus = float(proc.stdout.readline().strip())
  finally:
    proc.stdin.close()
    proc.kill()
    proc.wait()
  return corpus, scores
