"""Builds the API reference, HTML from the public API's docstrings, with pdoc.

    python docs/build_api.py [--output_dir=docs/api]

Documents `captionjax` (`load`, `Captioner`, `Caption`, `evaluate`, `train`),
not the internal modules. Any warning while building is an error (exit
status 1), so a docstring pdoc cannot render fails the build (the test suite
runs this).
"""

import argparse
import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--output_dir", default=os.path.join(ROOT, "docs", "api"),
                 help="where index.html and captionjax.html go")
  args = p.parse_args(argv)
  sys.path.insert(0, ROOT)  # this checkout's package
  import pathlib  # pylint: disable=g-import-not-at-top
  import pdoc  # pylint: disable=g-import-not-at-top
  import pdoc.render  # pylint: disable=g-import-not-at-top
  import captionjax  # pylint: disable=g-import-not-at-top
  pdoc.render.configure(docformat="google", footer_text=f"captionjax {captionjax.__version__}",
                        template_directory=pathlib.Path(ROOT, "docs", "templates"))
  # pdoc takes a name of __all__ missing from the package's namespace (the API is
  # imported lazily) for a submodule and imports it: captionjax/train.py (`python -m
  # captionjax.train`, never imported) would replace the function captionjax.train.
  for name in captionjax.__all__:
    getattr(captionjax, name)  # resolved into the namespace first
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    try:
      pdoc.pdoc("captionjax", r"!captionjax\..*", output_directory=pathlib.Path(args.output_dir))
    except Warning as w:
      print(f"docs/build_api.py: error: {type(w).__name__}: {str(w).splitlines()[0]}",
            file=sys.stderr)
      return 1
  print(os.path.join(args.output_dir, "captionjax.html"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
