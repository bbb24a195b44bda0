"""``python -m nephireg ...`` (how the Slicer module starts the engine under PythonSlicer)."""

from nephireg import signals

signals.install()  # before anything else is imported: a signal from the first line on is a cancellation

from nephireg.cli import console_main  # noqa: E402 - after the signal handlers, on purpose

if __name__ == "__main__":
    console_main()
