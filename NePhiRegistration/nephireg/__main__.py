"""``python -m nephireg ...`` (how the Slicer module starts the engine under PythonSlicer)."""

from nephireg.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
