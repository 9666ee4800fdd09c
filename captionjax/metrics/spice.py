"""SPICE through pycocoevalcap, only when its Stanford models are on disk.

pycocoevalcap's `Spice` downloads CoreNLP models on first use, which fails
offline; this module never triggers that and skips SPICE instead.
"""

import importlib.util
import os
import shutil
from typing import Dict, List, Optional, Tuple

# Files `pycocoevalcap/spice/get_stanford_models.py` would download into lib/.
SPICE_MODEL_FILES = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def missing_requirement() -> Optional[str]:
  """Why SPICE cannot run here (one line), or None if it can."""
  if shutil.which("java") is None:
    return "SPICE needs Java: no `java` executable on PATH"
  try:
    spec = importlib.util.find_spec("pycocoevalcap.spice.spice")
  except ImportError:
    spec = None
  if spec is None or not spec.origin:
    return "SPICE needs pycocoevalcap, which is not installed"
  lib = os.path.join(os.path.dirname(os.path.abspath(spec.origin)), "lib")
  missing = [f for f in SPICE_MODEL_FILES if not os.path.exists(os.path.join(lib, f))]
  if missing:
    return f"SPICE skipped: Stanford models not on disk ({', '.join(missing)} in {lib})"
  return None


def compute_spice(gts: Dict, res: Dict) -> Tuple[float, List[float]]:
  """Corpus and per-image SPICE F-scores (pycocoevalcap's `Spice`)."""
  why = missing_requirement()
  if why:
    raise RuntimeError(why)
  from pycocoevalcap.spice.spice import Spice  # pylint: disable=import-outside-toplevel
  score, scores = Spice().compute_score(gts, res)
  return float(score), [s["All"]["f"] for s in scores]
