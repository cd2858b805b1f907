"""Dense results as bytes a response can carry: instance and class masks as COCO RLE and polygons
(``masks.py``), class maps and depth maps as PNG or raw float32 (``dense.py``)."""
