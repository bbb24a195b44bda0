"""nephireg: the registration engine of the NePhiRegistration 3D Slicer extension.

Importing this package is cheap: it imports neither torch nor SimpleITK. Heavy modules are imported by the
functions that need them, so the Slicer side can import ``nephireg.protocol`` (standard library only) and
``nephireg.geometry`` (numpy only) inside Slicer's own process.
"""

__version__ = "0.1.0"
