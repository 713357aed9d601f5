"""One function per user action; the API, the CLI and the napari panels all call these."""
