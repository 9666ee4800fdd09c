"""scripts/ (the GPU reproduction, steps 01 to 06) run end to end with --dry_run.

The dry run fetches stand-ins of COCO, Karpathy's splits and the VGG16 weight
file from local files (scripts/dry_run_data.py; no network), preprocesses at
32 pixels, imports the weights, trains 2 frozen-CNN, 2 fine-tuning and 2
self-critical steps and writes the final scores.json, through the same scripts a user runs on a
GPU machine. A second pass over the scripts must redo nothing.
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["01_environment.sh", "02_data.sh", "03_prepro.sh", "04_import_weights.sh",
           "05_train.sh", "06_evaluate.sh"]


def _run(script, env, root):
  r = subprocess.run(["bash", os.path.join(REPO, "scripts", script), "--dry_run"], env=env,
                     capture_output=True, text=True, timeout=900, check=False)
  with open(os.path.join(root, f"{script}.log"), "a", encoding="utf-8") as f:
    f.write(r.stdout + r.stderr)
  assert r.returncode == 0, f"{script} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
  return r.stdout


def test_scripts_dry_run_end_to_end_and_resumable(tmp_path, jax_compilation_cache):
  root = str(tmp_path / "coco")
  os.makedirs(root)
  env = dict(os.environ, COCO_ROOT=root, PYTHON=sys.executable,
             JAX_COMPILATION_CACHE_DIR=jax_compilation_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1")
  assert sorted(s for s in os.listdir(os.path.join(REPO, "scripts")) if s[:2].isdigit()) == SCRIPTS
  for script in SCRIPTS:
    _run(script, env, root)

  with open(os.path.join(root, "scores.json"), encoding="utf-8") as f:
    scores = json.load(f)
  assert scores["test_images"] == 4 and scores["beam_size"] == 2 and scores["step"] == 6
  for stage in ("scst", "finetuned", "frozen_cnn"):
    assert {"Bleu_4", "ROUGE_L", "CIDEr"} <= set(scores[stage]), scores
  checked = open(os.path.join(root, "downloads", "SHA256SUMS"), encoding="utf-8").read().split()
  assert len(checked) == 8  # four files: "<sha256> <name>"
  with open(os.path.join(root, "runs", "coco_vgg16", "train_log.jsonl"), encoding="utf-8") as f:
    log = [json.loads(line) for line in f]
  assert sorted(r["step"] for r in log if "loss" in r) == [1, 2, 3, 4, 5, 6]
  assert [r["phase"] for r in log if r["step"] in (5, 6) and "loss" in r] == ["scst", "scst"]

  # Every step is done: a second pass redoes nothing (and trains no step).
  mtime = os.path.getmtime(os.path.join(root, "scores.json"))
  out = {s: _run(s, env, root) for s in SCRIPTS[1:]}
  assert out["02_data.sh"].count("checked already") == 4
  assert out["02_data.sh"].count("unpacked already") == 3
  assert "already" in out["04_import_weights.sh"]
  assert "stage 1 (frozen CNN) done already" in out["05_train.sh"]
  assert "stage 2 (fine-tuning) done already" in out["05_train.sh"]
  assert "stage 3 (self-critical training) done already" in out["05_train.sh"]
  assert "up to date" in out["06_evaluate.sh"]
  assert os.path.getmtime(os.path.join(root, "scores.json")) >= mtime


def test_data_script_stops_on_a_bad_download_and_resumes_a_partial_one(tmp_path):
  # A download that fails its checksum is moved aside and named, and the script
  # stops; a partial download is completed where it stopped (curl -C -).
  root = str(tmp_path / "coco")
  env = dict(os.environ, COCO_ROOT=root, PYTHON=sys.executable)
  stand_ins = os.path.join(root, "stand_ins")
  subprocess.run([sys.executable, os.path.join(REPO, "scripts", "dry_run_data.py"),
                  f"--output={stand_ins}"], check=True, capture_output=True)
  path = os.path.join(stand_ins, "caption_datasets.zip")
  with open(path, "rb") as f:
    good = f.read()
  with open(path, "wb") as f:
    f.write(good[:-10] + b"x" * 10)
  script = ["bash", os.path.join(REPO, "scripts", "02_data.sh"), "--dry_run"]
  r = subprocess.run(script, env=env, capture_output=True, text=True, check=False)
  assert r.returncode != 0
  assert "caption_datasets.zip" in r.stderr and "expected" in r.stderr, r.stderr
  downloads = os.path.join(root, "downloads")
  assert os.path.exists(os.path.join(downloads, "caption_datasets.zip.bad"))
  assert os.path.exists(os.path.join(downloads, "train2014.zip.checked"))
  assert not os.path.exists(os.path.join(downloads, "caption_datasets.zip.checked"))

  with open(path, "wb") as f:
    f.write(good)
  with open(os.path.join(downloads, "caption_datasets.zip"), "wb") as f:
    f.write(good[:len(good) // 2])  # an interrupted download
  r = subprocess.run(script, env=env, capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stderr
  assert f"{len(good) // 2} already here" in r.stdout
  with open(os.path.join(downloads, "caption_datasets.zip"), "rb") as f:
    assert f.read() == good
  assert os.path.exists(os.path.join(root, "images", "dataset_coco.json"))
