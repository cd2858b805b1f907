"""``yolo-ts-client`` on many images (a folder, a glob, a text file of paths, a dataset YAML): concurrent
requests with retries and a progress bar, resumable outputs in the formats other tools read (JSON lines,
COCO results, YOLO label files), and COCO metrics. ``tools/client.py`` hands its arguments to
:func:`tools.batch.cli.run` when the input is not one image file; docs/batch.md is the user's page.

* ``sources.py``: the input -> the image paths and the names the outputs use;
* ``runner.py``: the threads that send, retry and renew keys;
* ``formats.py``: one answer -> a JSON line, COCO results, a YOLO label file;
* ``outputs.py``: the files ``--out`` names, and resuming from them;
* ``coco_eval.py``: ``--eval``;
* ``cli.py``: the options and the run.
"""
