"""The one home of ``_()`` for the Lib's user-visible text.

Inside Slicer this is ``slicer.i18n.tr`` (the strings reach Slicer's translation files); where Slicer's Python
package has no ``i18n`` (slicer-core's wheel, used by the tests) the text is returned as is.
"""

try:
    from slicer.i18n import tr as _
except ImportError:  # slicer-core outside the application

    def _(text: str) -> str:
        return text


__all__ = ["_"]
