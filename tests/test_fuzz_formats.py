"""Fuzzing the formats fuzzed last: detached NRRD (.nhdr), MetaImage (.mhd + raw), DICOMDIR trees,
OME-TIFF, GIF (written and a real DRIVE mask) and BMP, with their own attacks (data files naming
devices, files outside or a million files; OME-XML entity bombs and links to other files; DICOMDIR
trees whose images are gone or that link out). A fixed seed, nothing but clean ReadErrors.
"""

from __future__ import annotations

import json

from test_fuzz import load_fuzz

NEW_FORMATS = ["nhdr", "mhd", "dicomdir", "ome_tiff", "gif", "gif_real", "bmp"]
CASES = 140


def test_damaged_files_of_the_formats_fuzzed_last_give_only_read_errors(data_dir, tmp_path):
    fuzz = load_fuzz()
    summary = fuzz.run(CASES, seed=1, workers=2, out=tmp_path, memory_gib=2.0, timeout_s=10.0, data=data_dir,
                       formats=NEW_FORMATS)
    described = json.dumps(summary["failed_cases"], indent=1)
    assert summary["failures"] == 0, described
    assert summary["totals"]["generator_error"] == 0, described
    assert sorted(summary["per_format"]) == sorted(NEW_FORMATS)
    for fmt, counts in summary["per_format"].items():  # each format both loads and gets refused
        assert counts["loaded"] >= 2 and counts["read_error"] >= 2, (fmt, counts)
    cases = json.loads((tmp_path / "summary.json").read_text())["cases"]
    specials = {c["format"] for c in cases if c["mutation"].startswith(("data file", "OME-XML", "DICOMDIR"))}
    assert {"nhdr", "mhd", "ome_tiff", "dicomdir"} <= specials, specials
