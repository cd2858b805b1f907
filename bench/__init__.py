"""``python -m bench``: one interleaved run of L0, L1, S, U and T (see ``bench/__main__.py``)."""
