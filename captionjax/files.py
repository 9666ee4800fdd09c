"""Writing results safely: one helper for every JSON and text file the tools write.

    files.write_text(path, text)              # atomic for files, through for devices
    files.write_json(path, obj)               # any file name, any string in obj
    files.check_output(path, inputs=paths)    # before the work: refuse to clobber an input

A regular file (or a new one) is written to a temporary file beside it and
renamed over it, so a crash never leaves half a file; a symbolic link is
followed (its target is replaced, the link stays); anything else (a device
such as /dev/stdout, a FIFO) is written through in place and never replaced.
Strings that are not valid Unicode (file names in a non-UTF-8 encoding) are
written as JSON escapes rather than failing the whole write.
"""

import json
import os
import stat
import tempfile


def _is_special(path: str) -> bool:
  """Whether `path` exists and is not a regular file (a device, a FIFO, a socket)."""
  try:
    mode = os.stat(path).st_mode
  except OSError:
    return False
  return not stat.S_ISREG(mode)


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` (see the module docstring); OSError names the file."""
  if _is_special(path):
    if stat.S_ISDIR(os.stat(path).st_mode):
      raise IsADirectoryError(21, "is a directory", path)
    try:
      with open(path, "wb") as f:
        f.write(data)
    except OSError as e:  # a device's write errors carry no file name
      raise OSError(e.errno, e.strerror, e.filename or path) from None
    return
  target = os.path.realpath(path)  # through a symlink: replace what it points to
  folder = os.path.dirname(target) or "."
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    if os.path.exists(target):
      os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
    else:
      umask = os.umask(0)
      os.umask(umask)
      os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, target)
  except BaseException:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def dumps(obj, indent=1) -> str:
  """JSON text of `obj`: UTF-8 characters as they are; undecodable file names escaped."""
  text = json.dumps(obj, ensure_ascii=False, indent=indent)
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:  # lone surrogates (os.fsdecode of non-UTF-8 bytes)
    text = json.dumps(obj, ensure_ascii=True, indent=indent)
  return text


def write_json(path: str, obj, indent=1) -> None:
  write_text(path, dumps(obj, indent) + "\n")


def check_output(path: str, inputs=(), flag: str = "--output") -> None:
  """ValueError if writing `path` would replace one of `inputs` (or a directory)."""
  if not path:
    return
  if os.path.isdir(path):
    raise ValueError(f"{flag}={path}: is a directory; give a file name")
  if not os.path.exists(path):
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
      raise ValueError(f"{flag}={path}: no such directory {parent}")
    return
  for x in inputs:
    try:
      if os.path.samefile(path, x):
        raise ValueError(f"{flag}={path}: that is an input file ({x}); refusing to overwrite it")
    except OSError:
      continue
