"""Images in, network inputs out: decoding (``decode.py``), the one letterbox (``letterbox.py``, and its torch
twin ``letterbox_torch.py`` for the model's device), the stretch of depth and RT-DETR models (``stretch.py``)
and the classify resize + crop (``classify_crop.py``). Each takes ``uint8[H, W, 3]`` BGR and returns pixels plus
the geometry it used; numpy, OpenCV, Pillow and torch only."""
