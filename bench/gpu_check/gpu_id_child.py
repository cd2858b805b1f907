"""A worker in a child process: ``YoloHandler.initialize`` with a TorchServe-like context, one request, then where
memory went; prints one JSON line. Run by ``gpu_id.py`` as

    python gpu_id_child.py REPO MODEL_DIR GPU_ID FALLBACK(0|1) IMAGE

TorchServe's ``ts`` package is stubbed when it is not installed (the handler only subclasses ``BaseHandler`` and
names ``MetricTypes.GAUGE`` and ``Dimension``)."""

import json, os, sys, types, warnings
warnings.simplefilter("ignore")
repo, model_dir, gpu_id, fallback, image = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
sys.path.insert(0, repo)
try:
    import ts.torch_handler.base_handler  # noqa: F401
    stub = False
except ImportError:
    stub = True
    for name in ("ts", "ts.metrics", "ts.metrics.dimension", "ts.metrics.metric_type_enum", "ts.torch_handler",
                 "ts.torch_handler.base_handler"):
        sys.modules[name] = types.ModuleType(name)
    class BaseHandler:
        def __init__(self):
            self.initialized = False
    class MetricTypes:
        GAUGE = "gauge"
    class Dimension:
        def __init__(self, name, value):
            self.name, self.value = name, value
    sys.modules["ts.torch_handler.base_handler"].BaseHandler = BaseHandler
    sys.modules["ts.metrics.metric_type_enum"].MetricTypes = MetricTypes
    sys.modules["ts.metrics.dimension"].Dimension = Dimension
import torch
from handler.yolo_handler import YoloHandler

class Context:
    def __init__(self):
        self.system_properties = {"model_dir": model_dir, "gpu_id": gpu_id, "batch_size": 1}
        self.model_yaml_config = {"handler": {"warmup": 1, "cpu_fallback": fallback}}
        self.manifest = {"model": {"modelVersion": "1.0"}}
        self.model_name = "yolo"
        self.metrics = None
        self.statuses = {}
    def get_request_header(self, idx, name):
        return None
    def get_all_request_header(self, idx):
        return {}
    def set_response_status(self, code, phrase, idx):
        self.statuses[idx] = code
    def set_response_content_type(self, idx, value):
        pass
    def set_response_header(self, idx, key, value):
        pass

out = {"gpu_id": gpu_id, "cpu_fallback": fallback, "ts_stubbed": stub,
       "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid()}
try:
    h = YoloHandler()
    ctx = Context()
    h.initialize(ctx)
    answer = json.loads(h.handle([{"body": open(image, "rb").read()}], ctx)[0])
    out["device"] = str(h.device)
    out["answer_keys"] = sorted(answer)
    out["detections"] = len(answer.get("detections", []))
    out["param_devices"] = sorted({str(p.device) for p in h.service.pipeline.backbone.parameters()})
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        out["allocated_mib_by_device"] = {i: round(torch.cuda.memory_allocated(i) / 2**20, 1) for i in range(torch.cuda.device_count())}
        out["reserved_mib_by_device"] = {i: round(torch.cuda.memory_reserved(i) / 2**20, 1) for i in range(torch.cuda.device_count())}
        try:
            import subprocess
            q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
            g = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
            index = {u.strip(): i.strip() for i, u in (line.split(",") for line in g)}
            mine = [line.split(",") for line in q if line.split(",")[0].strip() == str(os.getpid())]
            out["nvidia_smi_this_process"] = [{"gpu": index.get(u.strip(), u.strip()), "used_mib": m.strip()} for _, u, m in mine]
        except Exception as e:
            out["nvidia_smi_this_process"] = f"unavailable: {e}"
except Exception as e:
    out["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
print(json.dumps(out))
