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
    ("NePhiDemoFixed", "NePhiDemoFixed.nrrd", "cba99093f1c8ee21bd1d586d9a008bba82d9bd0137a78e5ffa64f977787f1080"),
    ("NePhiDemoMoving", "NePhiDemoMoving.nrrd", "80af947cad4438b0e0682c3132c9f81888eb880f78e717cbdeaf42c572780f19"),
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
