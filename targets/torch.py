"""The torch target: runs the (possibly quantized) torch module itself, as a torch.export program saved in the run
directory (engine.pt2), so `qcompile predict` loads it without the build."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

from compiler.core.capabilities import TargetCapabilities
from compiler.core.errors import BuildError
from compiler.core.feeds import synthetic_feed
from compiler.graph.quantized import torchao_weight
from compiler.graph.roles import vocab_rows
from compiler.runners.callable import torch_predictor
from compiler.steps.torchao_kernels import module_kernels, torchao_modules
from targets.base import Engine, Target


PROGRAM = "engine.pt2"  # torch.export.save of the lowered module: graph + weights (torchao tensors included)
STATE_DICT = "engine.pt"  # where the module does not export: its state dict, which only a rebuild can load


class TorchTarget(Target):
    name = "torch"
    needs_onnx = False
    capabilities = TargetCapabilities("torch", runs_onnx=False, ort_session=False, trt_custom_ops=False,
                                      symmetric_int8_only=False, gpu=False)
    summary = "the torch module itself (torchao int8 kernels, or modelopt fake-quant where torchao has none), exported"

    def check_environment(self, recipe) -> None:
        import torch

        if self.cfg.device == "cuda" and not torch.cuda.is_available():
            raise BuildError("target.device=cuda but torch sees no CUDA device "
                             f"(torch {torch.__version__}); use target.device=cpu")

    def lower(self, model, onnx_path: Optional[Path], run_dir: Path, build_info=None) -> Engine:
        import torch

        from compiler.numerics.int4_linear import use_int4_dequant_linears
        from compiler.numerics.int8_linear import use_lean_int8_linears

        module = model.module.to(self.cfg.device).eval()
        # on the CPU, torchao's eager dynamic int8 Linear runs slower than fp32, and modelopt's calibrated W8A8 is
        # fake-quant around fp32 products that torch.export cannot trace: compiler.numerics.int8_linear runs both
        # in int8 with the same numbers (aten ops only: the program exports and loads without torchao)
        lean = use_lean_int8_linears(module) if self.cfg.device == "cpu" else 0
        # modelopt's int4 weight-only fake-quant does not trace either (and no int4 kernel is faster on the CPU):
        # stored as 4-bit codes, dequantized per call, the same numbers (compiler.numerics.int4_linear)
        int4 = use_int4_dequant_linears(module)
        info: dict[str, Any] = {"device": self.cfg.device, "torch": torch.__version__,
                                "kernels": module_kernels(module), "compiled": bool(self.cfg.compile)}
        if lean:
            info["kernels"]["cpu_int8_linear"] = lean
        if int4:
            info["kernels"]["int4_dequant_linear"] = int4
        if any(torchao_weight(m) is not None for m in module.modules()):  # torchao tensors left in the program
            info["torchao"] = _torchao_version()
        program, why = export_program(module, list(model.input_names), self.cfg.device)
        if program is not None:
            path = Path(run_dir) / PROGRAM
            torch.export.save(program, str(path))
            handle = program.module()  # what predict loads: check and bench run the same graph
            info["artifact"] = "exported_program"
        else:
            # a module torch.export cannot trace (e.g. a quantizer whose numerics branch on its tensors' values)
            path = Path(run_dir) / STATE_DICT
            torch.save(module.state_dict(), path)
            handle = module
            info["artifact"] = "state_dict"
            info["notes"] = [f"target=torch kept {STATE_DICT} (a state dict only a rebuild can load): torch.export "
                             f"failed on the quantized module ({why}); `qcompile predict` cannot run this run"]
        if self.cfg.compile:
            handle = compiled(handle)
        return Engine(target=self.name, path=path, handle=handle, input_names=list(model.input_names),
                      output_names=list(model.output_names), files=[path], info=info, module=module)

    def load(self, run_dir: Path, info, input_names, output_names) -> Engine:
        import torch

        path = Path(run_dir) / PROGRAM
        if not path.is_file():
            raise BuildError(f"{run_dir} keeps {STATE_DICT}, the state dict of its quantized torch module, and no "
                             f"exported program ({PROGRAM}): torch.export could not trace that module (the run's "
                             f"report.json lower.notes say why), so running it means rebuilding it (`qcompile rebuild {run_dir}` does). "
                             "`qcompile predict` runs target=torch runs that wrote engine.pt2, and ort / trt runs")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if (info or {}).get("torchao"):
                _torchao_version()  # registers torchao's ops and tensor classes (unpickling would import it too)
            handle = torch.export.load(str(path)).module()
        handle = handle.to(self.cfg.device)
        if self.cfg.compile:
            handle = compiled(handle)
        return Engine(target=self.name, path=path, handle=handle, input_names=list(input_names),
                      output_names=list(output_names), files=[path], info=dict(info or {}))

    def predictor(self, engine: Engine, threads: Optional[int] = None, profile_prefix: Optional[str] = None):
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        return torch_predictor(engine.handle, engine.input_names, engine.output_names, self.cfg.device)

    def placement(self, engine: Engine):
        import collections

        import torch

        devices = collections.Counter(str(p.device) for p in engine.handle.parameters())
        if not devices:  # an exported program's module may hold its weights as buffers
            devices = collections.Counter(str(b.device) for b in engine.handle.buffers() if isinstance(b, torch.Tensor))
        return {"parameters_by_device": dict(devices)}


def quantizer_export_mode(module):
    """modelopt's own export_torch_mode where the module holds modelopt quantizers (fake-quant layers no kernel
    runs): their amax is then read with detach(), not .data, which torch.export would keep as a fake tensor among
    the program's constants. With it the fp8 and NVFP4 fake-quant trace as aten ops (equal to eager: tested), and
    their runs keep an exported program predict loads."""
    import contextlib

    from compiler.steps.modelopt_dynamo import has_quantizers

    if not has_quantizers(module):
        return contextlib.nullcontext()
    from modelopt.torch.quantization.utils import export_torch_mode

    return export_torch_mode()


def export_program(module, input_names: list[str], device: str):
    """(torch.export ExportedProgram of the module with dynamic batch and sequence, None) or (None, why it failed)."""
    import torch

    feed = synthetic_feed(input_names, 2, 16, vocab=vocab_rows(module))
    args = tuple(torch.from_numpy(feed[n]).to(device) for n in input_names)
    dim = torch.export.Dim.DYNAMIC  # the ranges come from the model (e.g. seq <= max_position_embeddings)
    try:
        with warnings.catch_warnings(), quantizer_export_mode(module):
            warnings.simplefilter("ignore")
            return torch.export.export(module, args, dynamic_shapes={n: {0: dim, 1: dim} for n in input_names}), ""
    except Exception as e:  # noqa: BLE001 -- any tracing failure means: keep the state dict, say why
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return None, f"{type(e).__name__}: {first[:200]}"


def compiled(module):
    """torch.compile (inductor) with frozen weights: constants folded, the int8 activation quantization fused."""
    import torch

    return torch.compile(module, options={"freezing": True})


def _torchao_version() -> str:
    torchao_modules()  # quietly: its CUDA extensions log that they cannot load on a CPU machine
    import torchao

    return str(torchao.__version__)
