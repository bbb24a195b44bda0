"""The one home of ``_()`` for the Lib's user-visible text. Standard library only.

Inside Slicer this is ``slicer.i18n.tr`` (Slicer's translation files; the module file imports ``slicer.i18n``
before the Lib). Elsewhere (the pure-Python tests, slicer-core's wheel, which has no ``i18n``) the text is returned
as is. ``slicer.i18n`` is looked up, never imported here, so the pure-Python modules stay light.
"""

import sys


def _(text: str) -> str:
    i18n = sys.modules.get("slicer.i18n")
    return i18n.tr(text) if i18n is not None else text


__all__ = ["_"]
