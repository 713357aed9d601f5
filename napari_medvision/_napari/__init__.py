"""napari side of medvision: the npe2 reader, writers and sample data (the only code importing napari/Qt).

The Volume <-> layer conversions live in :mod:`.layers` and need no running viewer.
"""
