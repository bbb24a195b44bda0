"""``python -m nephireg ...`` (how the Slicer module starts the engine under PythonSlicer)."""

from nephireg.cli import console_main

if __name__ == "__main__":
    console_main()
