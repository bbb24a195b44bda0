"""SampleData entry for the synthetic demo pair shipped in ``Resources/SampleData``. Slicer only.

The files are local (``file://`` URIs into the installed module), so the sample loads offline; SampleData still
verifies their SHA256 checksums. The pair is the engine's synthetic demo pair, not patient data (see ``demodata.py``).
"""

import os
import pathlib

RESOURCES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Resources")
CATEGORY = "NePhi Registration"
SAMPLES = (
    # (node name, file name, SHA256) - the checksums are checked by Testing/test_slicer_packaging.py
    ("NePhiDemoFixed", "NePhiDemoFixed.nrrd", "1abfd69eed0690acb6c7a0348123c03f656f9479e39c771e8e735648f399f612"),
    ("NePhiDemoMoving", "NePhiDemoMoving.nrrd", "4d55da10d8788540de6a6610f3e577906ee647f7e582217f51f1ce364f3d67f9"),
)


def sampleFiles():
    """[(node name, absolute path, "SHA256:<digest>")] of the demo pair."""
    return [(node, os.path.join(RESOURCES, "SampleData", name), f"SHA256:{digest}") for node, name, digest in SAMPLES]


def registerSampleData() -> None:
    import SampleData

    # registerCustomSampleDataSource has no description argument: the sample name is what the user sees.

    files = sampleFiles()
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=CATEGORY,
        sampleName="NePhiDemoPair",
        thumbnailFileName=os.path.join(RESOURCES, "Icons", "NePhiDemoPair.png"),
        uris=[pathlib.Path(path).as_uri() for _, path, _ in files],
        fileNames=[os.path.basename(path) for _, path, _ in files],
        nodeNames=[node for node, _, _ in files],
        checksums=[checksum for _, _, checksum in files],
        loadFileType=["VolumeFile", "VolumeFile"],
    )
