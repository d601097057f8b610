"""Number formats declared once: storage bits, float or integer, the export opset a graph that holds the format
in standard ONNX ops needs (per target), and which formats may stand in for a layer of it (a mixed-precision
map's fallbacks). Steps, targets and the repair ask this registry; nothing reads a format's facts from its name.
A new format is one `register_format` call (tests/core/test_tasks_formats.py adds one)."""

from __future__ import annotations

from dataclasses import dataclass

FLOAT, INT = "float", "int"


@dataclass(frozen=True)
class NumberFormat:
    name: str
    bits: float  # storage bits per value, block scales included (nvfp4: 4 + 8 / 16)
    kind: str  # FLOAT | INT
    # the lowest opset whose standard ONNX ops hold the format (0: any), and which ops need it, for messages
    onnx_opset: int = 0
    opset_reason: str = ""
    # TensorRT reads its own custom ops for the format at any opset (modelopt's trt::TRT_FP8* ops)
    trt_own_ops: bool = False
    # formats a layer of this format may be given instead, most preferred first
    fallbacks: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in (FLOAT, INT):
            raise ValueError(f"format {self.name}: kind {self.kind!r} is not {FLOAT} or {INT}")

    @property
    def quantized(self) -> bool:
        """Narrower than half precision: a quantized format."""
        return self.bits < 16

    def min_opset(self, target) -> int:
        """The lowest export opset a graph holding this format needs on a target (TargetCapabilities)."""
        if not target.runs_onnx or (self.trt_own_ops and target.trt_custom_ops):
            return 0
        return self.onnx_opset


FORMATS: dict[str, NumberFormat] = {}


def register_format(fmt: NumberFormat) -> NumberFormat:
    FORMATS[fmt.name] = fmt
    return fmt


def number_format(name: str) -> NumberFormat:
    try:
        return FORMATS[str(name)]
    except KeyError:
        raise KeyError(f"unknown number format {name!r}; known: {', '.join(FORMATS)}") from None


def narrowest_first(names) -> list[str]:
    """Registered formats among names, narrowest first (at equal bits a float format before an integer one)."""
    return sorted((n for n in set(names) if n in FORMATS), key=lambda n: (FORMATS[n].bits, FORMATS[n].kind != FLOAT))


FULL_PRECISION = register_format(NumberFormat("fp32", 32, FLOAT)).name
register_format(NumberFormat("fp16", 16, FLOAT))
register_format(NumberFormat("int8", 8, INT, fallbacks=("fp8",)))
register_format(NumberFormat("fp8", 8, FLOAT, onnx_opset=19, trt_own_ops=True, fallbacks=("int8",),
                             opset_reason="float8e4m3fn QuantizeLinear/DequantizeLinear"))
register_format(NumberFormat("nvfp4", 4.5, FLOAT, onnx_opset=23, fallbacks=("fp8", "int8"),
                             opset_reason="FLOAT4E2M1 and blocked DequantizeLinear"))
# weight-only int4 in blocks with fp16 scales (onnxruntime MatMulNBits, a contrib op: no opset requirement)
register_format(NumberFormat("int4", 5.0, INT))
