"""The torch target: runs the (possibly quantized) torch module itself, eagerly."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from compiler.core.capabilities import TargetCapabilities
from compiler.core.errors import BuildError
from compiler.runners.callable import torch_predictor
from targets.base import Engine, Target


class TorchTarget(Target):
    name = "torch"
    needs_onnx = False
    capabilities = TargetCapabilities("torch", runs_onnx=False, ort_session=False, trt_custom_ops=False,
                                      symmetric_int8_only=False, gpu=False)
    summary = "the torch module itself (modelopt fake-quant or torch int8 kernels), eager"

    def check_environment(self, recipe) -> None:
        import torch

        if self.cfg.device == "cuda" and not torch.cuda.is_available():
            raise BuildError("target.device=cuda but torch sees no CUDA device "
                             f"(torch {torch.__version__}); use target.device=cpu")

    def lower(self, model, onnx_path: Optional[Path], run_dir: Path, build_info=None) -> Engine:
        import torch

        module = model.module.to(self.cfg.device)
        path = Path(run_dir) / "engine.pt"
        # the state dict is the artifact: packed int8 weights for dynamic int8, fake-quant amax for modelopt
        torch.save(module.state_dict(), path)
        return Engine(target=self.name, path=path, handle=module, input_names=list(model.input_names),
                      output_names=list(model.output_names), files=[path],
                      info={"device": self.cfg.device, "torch": torch.__version__})

    def load(self, run_dir: Path, info, input_names, output_names) -> Engine:
        # engine.pt is a state dict: its module is the recipe's quantized model, which only the build makes
        raise BuildError("a target=torch run keeps engine.pt, the state dict of the quantized torch module, and no "
                         "graph: running it means rebuilding that module from the recipe (`qcompile rebuild "
                         f"{run_dir}` does). `qcompile predict` runs the engines of target=ort and target=trt runs; "
                         "build with target=ort for a directory that deploys on its own")

    def predictor(self, engine: Engine, threads: Optional[int] = None, profile_prefix: Optional[str] = None):
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        return torch_predictor(engine.handle, engine.input_names, engine.output_names, self.cfg.device)

    def placement(self, engine: Engine):
        import collections

        devices = collections.Counter(str(p.device) for p in engine.handle.parameters())
        return {"parameters_by_device": dict(devices)}
