"""Slicer-side plumbing of the NePhiRegistration module.

Pure-Python parts (importable without Slicer and without torch, tested with plain pytest):
``settings`` (registration options -> engine command line), ``engine`` (which interpreter, which environment),
``runner`` (the background process: reader thread, queue, poll, cancel), ``progress`` (events -> progress bar
text), ``availability`` (which methods can run), ``result`` (engine outputs -> VTK objects, summary text),
``demodata`` (writes the shipped demo pair).

Slicer-only parts (import ``slicer``/``qt``): ``parameters`` (parameter node), ``sceneio`` (scene <-> files),
``logic`` (the register path), ``widget`` (the panel), ``sampledata``.

Importing this package imports nothing heavy.
"""
