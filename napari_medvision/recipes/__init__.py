"""Training recipes that produce the shipped models in ``weights/``; anyone can rerun them.

Each recipe is a module with ``main(argv)``: ``python -m napari_medvision.recipes.fundus_vessels
--help``. They need the real data (``../shared/data`` or ``$MEDVISION_DATA``) and run on the GPU
machine or, at a smaller scale, on a CPU; the card records which.
"""
