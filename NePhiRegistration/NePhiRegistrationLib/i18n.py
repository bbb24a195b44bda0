"""The one home of ``_()`` for the Lib's user-visible text. Standard library only.

Inside Slicer this is ``slicer.i18n.tr`` (Slicer's translation files; the module file imports ``slicer.i18n``
before the Lib). Elsewhere (the pure-Python tests, slicer-core's wheel, which has no ``i18n``) the text is returned
as is. ``slicer.i18n`` is looked up, never imported here, so the pure-Python modules stay light.
"""

import sys


def _(text: str) -> str:
    """``text`` translated in the caller's context, as ``slicer.i18n.tr`` would called from the caller's file.

    ``tr`` itself cannot be called from here: it takes the context from its caller's file, which would be this one.
    """
    i18n = sys.modules.get("slicer.i18n")
    if i18n is None:
        return text
    caller_file = sys._getframe(1).f_code.co_filename
    return i18n.translate(i18n.getContext(caller_file), text)


__all__ = ["_"]
