"""Read a QNN HTP context binary's metadata through libQnnSystem's C API (ctypes).

The qnn.compile stage checks the compiled context binary against the recipe before it is
bundled: it was built for the right SoC, it holds both AR graphs, and each graph has the
expected input and output tensors. A wrong binary otherwise only shows up on the phone, as an
opaque load failure in Genie. libQnnSystem is the SDK's own parser for these files, so we ask it
rather than guess at the binary format; onnxruntime-qnn ships it for x86_64 Linux.

Struct layouts follow the QNN SDK v2.43.0 headers (QNN_API_VERSION 2.32, QNN_SYSTEM_API_VERSION
1.5): QnnTypes.h, QnnCommon.h, QnnDevice.h, System/QnnSystemContext.h,
System/QnnSystemInterface.h, HTP/QnnHtpDevice.h, HTP/QnnHtpSystemContext.h. They were checked
against libQnnSystem.so of QNN 2.51.0 (onnxruntime-qnn 2.7.0). QNN only appends new versions of
its versioned structs, so every version not modelled here is refused with QnnBinaryError.
"""
from __future__ import annotations

import ctypes as C
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.engine.errors import KilnError, ToolMissing

__all__ = ["QnnBinaryError", "check_binary", "read_binary_info"]


class QnnBinaryError(KilnError):
    """A file libQnnSystem cannot read as a context binary, or one in a layout we do not know."""


# --------------------------------------------------------------------------------------------
# Enums (values from QnnTypes.h, QnnCommon.h, HTP/QnnHtpDevice.h)
# --------------------------------------------------------------------------------------------

DATA_TYPES = {
    0x0008: "INT_8", 0x0016: "INT_16", 0x0032: "INT_32", 0x0064: "INT_64",
    0x0108: "UINT_8", 0x0116: "UINT_16", 0x0132: "UINT_32", 0x0164: "UINT_64",
    0x0216: "FLOAT_16", 0x0226: "BFLOAT_16", 0x0232: "FLOAT_32", 0x0264: "FLOAT_64",
    0x0304: "SFIXED_POINT_4", 0x0308: "SFIXED_POINT_8", 0x0316: "SFIXED_POINT_16", 0x0332: "SFIXED_POINT_32",
    0x0404: "UFIXED_POINT_4", 0x0408: "UFIXED_POINT_8", 0x0416: "UFIXED_POINT_16", 0x0432: "UFIXED_POINT_32",
    0x0508: "BOOL_8", 0x0608: "STRING", 0x7FFFFFFF: "UNDEFINED",
}

ENC_SCALE_OFFSET, ENC_AXIS_SCALE_OFFSET, ENC_BW_SCALE_OFFSET, ENC_BW_AXIS_SCALE_OFFSET = 0, 1, 2, 3
ENCODINGS = {
    ENC_SCALE_OFFSET: "SCALE_OFFSET", ENC_AXIS_SCALE_OFFSET: "AXIS_SCALE_OFFSET",
    ENC_BW_SCALE_OFFSET: "BW_SCALE_OFFSET", ENC_BW_AXIS_SCALE_OFFSET: "BW_AXIS_SCALE_OFFSET",
    4: "BLOCK", 5: "BLOCKWISE_EXPANSION", 6: "VECTOR", 7: "FLOAT_BLOCK", 8: "BW_AXIS_SCALE_OFFSET_MAPPED",
    9: "BW_BLOCK_MAPPED", 10: "BW_BLOCKWISE_EXPANSION_MAPPED", 11: "BW_FLOAT_BLOCK", 0x7FFFFFFF: "UNDEFINED",
}
QNN_DEFINITION_DEFINED = 1  # Qnn_Definition_t: the encoding is set (else "implementation generated")

BACKENDS = {0: "NULL", 1: "REFERENCE", 2: "SAVER", 3: "CPU", 4: "GPU", 5: "DSP", 6: "HTP"}
QNN_BACKEND_ID_HTP = 6
QNN_HTP_DEVICE_TYPE_ON_CHIP = 0
QNN_SYSTEM_API_VERSION_MAJOR = 1  # the interface table below is the 1.x one

# Error codes (QnnCommon.h, System/QnnSystemContext.h) worth a word in a message.
ERRORS = {
    1000: "not supported", 1002: "out of memory", 1004: "invalid argument", 1008: "incompatible binaries",
    30002: "operation failed", 30010: "malformed binary",
}


def _name(table: dict[int, str], value: int) -> str:
    """The readable name of an enum value; unknown values stay visible as hex, not dropped."""
    return table.get(value, f"UNKNOWN_0x{value:x}")


# --------------------------------------------------------------------------------------------
# QnnTypes.h / QnnCommon.h
# --------------------------------------------------------------------------------------------

class Version(C.Structure):  # Qnn_Version_t
    _fields_ = [("major", C.c_uint32), ("minor", C.c_uint32), ("patch", C.c_uint32)]

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


class ScaleOffset(C.Structure):  # Qnn_ScaleOffset_t: float = (q + offset) * scale
    _fields_ = [("scale", C.c_float), ("offset", C.c_int32)]


class AxisScaleOffset(C.Structure):  # Qnn_AxisScaleOffset_t
    _fields_ = [("axis", C.c_int32), ("numScaleOffsets", C.c_uint32), ("scaleOffset", C.POINTER(ScaleOffset))]


class BwScaleOffset(C.Structure):  # Qnn_BwScaleOffset_t
    _fields_ = [("bitwidth", C.c_uint32), ("scale", C.c_float), ("offset", C.c_int32)]


class BwAxisScaleOffset(C.Structure):  # Qnn_BwAxisScaleOffset_t
    _fields_ = [("bitwidth", C.c_uint32), ("axis", C.c_int32), ("numElements", C.c_uint32),
                ("scales", C.POINTER(C.c_float)), ("offsets", C.POINTER(C.c_int32))]


class BlockEncoding(C.Structure):  # Qnn_BlockEncoding_t
    _fields_ = [("blockSize", C.POINTER(C.c_uint32)), ("scaleOffset", C.POINTER(ScaleOffset))]


class FloatBlockEncoding(C.Structure):  # Qnn_FloatBlockEncoding_t
    _fields_ = [("blockSize", C.POINTER(C.c_uint32)), ("floatScaleOffset", C.c_void_p)]


class BwFloatBlockEncoding(C.Structure):  # Qnn_BwFloatBlockEncoding_t
    _fields_ = [("bitwidth", C.c_uint32), ("blockSize", C.POINTER(C.c_uint32)), ("floatScaleOffset", C.c_void_p)]


class _QuantizeUnion(C.Union):
    # Every member is declared, value members with their real types, because together they fix
    # the union's size (32 bytes) and hence where rank/dimensions sit in the tensor structs.
    _fields_ = [
        ("scaleOffsetEncoding", ScaleOffset),
        ("axisScaleOffsetEncoding", AxisScaleOffset),
        ("bwScaleOffsetEncoding", BwScaleOffset),
        ("bwAxisScaleOffsetEncoding", BwAxisScaleOffset),
        ("blockEncoding", BlockEncoding),
        ("blockwiseExpansion", C.c_void_p),
        ("vectorEncoding", C.c_void_p),
        ("floatBlockEncoding", FloatBlockEncoding),
        ("bwAxisScaleOffsetMappedEncoding", C.c_void_p),
        ("bwBlockMappedEncoding", C.c_void_p),
        ("bwBlockwiseExpansionMappedEncoding", C.c_void_p),
        ("bwFloatBlockEncoding", BwFloatBlockEncoding),
    ]


class QuantizeParams(C.Structure):  # Qnn_QuantizeParams_t
    _anonymous_ = ("u",)
    _fields_ = [("encodingDefinition", C.c_uint32), ("quantizationEncoding", C.c_uint32), ("u", _QuantizeUnion)]


class ClientBuffer(C.Structure):  # Qnn_ClientBuffer_t
    _fields_ = [("data", C.c_void_p), ("dataSize", C.c_uint32)]


class _TensorV1Memory(C.Union):
    _fields_ = [("clientBuf", ClientBuffer), ("memHandle", C.c_void_p)]


class _TensorV2Memory(C.Union):
    _fields_ = [("clientBuf", ClientBuffer), ("memHandle", C.c_void_p), ("retrieveRaw", C.c_void_p)]


_TENSOR_HEAD = [  # the fields Qnn_TensorV1_t and Qnn_TensorV2_t share, in order
    ("id", C.c_uint32), ("name", C.c_char_p), ("type", C.c_uint32), ("dataFormat", C.c_uint32),
    ("dataType", C.c_uint32), ("quantizeParams", QuantizeParams), ("rank", C.c_uint32),
    ("dimensions", C.POINTER(C.c_uint32)), ("memType", C.c_uint32),
]


class TensorV1(C.Structure):  # Qnn_TensorV1_t
    _anonymous_ = ("mem",)
    _fields_ = [*_TENSOR_HEAD, ("mem", _TensorV1Memory)]


class SparseParams(C.Structure):  # Qnn_SparseParams_t (union of one Qnn_SparseLayoutHybridCoo_t)
    _fields_ = [("type", C.c_uint32), ("numSpecifiedElements", C.c_uint32), ("numSparseDimensions", C.c_uint32)]


class TensorV2(C.Structure):  # Qnn_TensorV2_t
    _anonymous_ = ("mem",)
    _fields_ = [*_TENSOR_HEAD, ("mem", _TensorV2Memory), ("isDynamicDimensions", C.POINTER(C.c_uint8)),
                ("sparseParams", SparseParams), ("isProduced", C.c_uint8)]


class _TensorUnion(C.Union):
    _fields_ = [("v1", TensorV1), ("v2", TensorV2)]


class Tensor(C.Structure):  # Qnn_Tensor_t
    _anonymous_ = ("u",)
    _fields_ = [("version", C.c_uint32), ("u", _TensorUnion)]


# --------------------------------------------------------------------------------------------
# QnnDevice.h / HTP/QnnHtpDevice.h: platform info, where V2+ binaries record the target device
# --------------------------------------------------------------------------------------------

class CoreInfoV1(C.Structure):  # QnnDevice_CoreInfoV1_t
    _fields_ = [("coreId", C.c_uint32), ("coreType", C.c_uint32), ("coreInfoExtension", C.c_void_p)]


class CoreInfo(C.Structure):  # QnnDevice_CoreInfo_t (union of one version)
    _fields_ = [("version", C.c_uint32), ("v1", CoreInfoV1)]


class HardwareDeviceInfoV1(C.Structure):  # QnnDevice_HardwareDeviceInfoV1_t
    _fields_ = [("deviceId", C.c_uint32), ("deviceType", C.c_uint32), ("numCores", C.c_uint32),
                ("cores", C.POINTER(CoreInfo)), ("deviceInfoExtension", C.c_void_p)]


class HardwareDeviceInfo(C.Structure):  # QnnDevice_HardwareDeviceInfo_t (union of one version)
    _fields_ = [("version", C.c_uint32), ("v1", HardwareDeviceInfoV1)]


class PlatformInfoV1(C.Structure):  # QnnDevice_PlatformInfoV1_t
    _fields_ = [("numHwDevices", C.c_uint32), ("hwDevices", C.POINTER(HardwareDeviceInfo))]


class PlatformInfo(C.Structure):  # QnnDevice_PlatformInfo_t (union of one version)
    _fields_ = [("version", C.c_uint32), ("v1", PlatformInfoV1)]


class HtpOnChipDeviceInfo(C.Structure):  # QnnHtpDevice_OnChipDeviceInfoExtension_t
    _fields_ = [("vtcmSize", C.c_size_t), ("socModel", C.c_uint32), ("signedPdSupport", C.c_bool),
                ("dlbcSupport", C.c_bool), ("arch", C.c_uint32)]


class HtpDeviceInfoExtension(C.Structure):  # QnnHtpDevice_DeviceInfoExtension_t (union of one type)
    _fields_ = [("devType", C.c_uint32), ("onChipDevice", HtpOnChipDeviceInfo)]


# --------------------------------------------------------------------------------------------
# HTP/QnnHtpSystemContext.h: HTP's own blobs inside the binary info
# --------------------------------------------------------------------------------------------

class HtpContextBlobInfo(C.Structure):  # QnnHtpSystemContext_ContextBlobInfo_t, V1 member inlined
    _fields_ = [("version", C.c_uint32), ("dspArch", C.c_uint32)]


class HtpGraphBlobInfoV1(C.Structure):  # QnnHtpSystemContext_GraphBlobInfoV1_t
    _fields_ = [("spillFillBufferSize", C.c_uint64), ("vtcmSize", C.c_uint32), ("optimizationLevel", C.c_uint32),
                ("htpDlbc", C.c_uint8), ("numHvxThreads", C.c_uint64)]


class HtpGraphBlobInfo(C.Structure):  # QnnHtpSystemContext_GraphBlobInfo_t (union of V1 only)
    _fields_ = [("version", C.c_uint32), ("v1", HtpGraphBlobInfoV1)]


class HtpGraphBlobInfoV2(C.Structure):  # QnnHtpSystemContext_GraphBlobInfoV2_t: carries its own version
    _fields_ = [("version", C.c_uint32), ("nativeKChannelSize", C.c_uint64), ("nativeVChannelSize", C.c_uint64),
                ("isSafeShareIO", C.c_uint32), ("ioTensorSize", C.c_uint64), ("opDataSize", C.c_uint64),
                ("constSize", C.c_uint64), ("ddrTensorSize", C.c_uint64), ("sharedWeightsSize", C.c_uint64)]


# --------------------------------------------------------------------------------------------
# System/QnnSystemContext.h
# --------------------------------------------------------------------------------------------

_GRAPH_V1 = [("graphName", C.c_char_p), ("numGraphInputs", C.c_uint32), ("graphInputs", C.POINTER(Tensor)),
             ("numGraphOutputs", C.c_uint32), ("graphOutputs", C.POINTER(Tensor))]
_GRAPH_V2 = [*_GRAPH_V1, ("numUpdateableTensors", C.c_uint32), ("updateableTensors", C.POINTER(Tensor))]


class GraphInfoV1(C.Structure):  # QnnSystemContext_GraphInfoV1_t
    _fields_ = _GRAPH_V1


class GraphInfoV2(C.Structure):  # QnnSystemContext_GraphInfoV2_t
    _fields_ = _GRAPH_V2


class GraphInfoV3(C.Structure):  # QnnSystemContext_GraphInfoV3_t
    _fields_ = [*_GRAPH_V2, ("graphBlobInfoSize", C.c_uint32), ("graphBlobInfo", C.c_void_p),
                ("startOpIndex", C.c_uint32), ("endOpIndex", C.c_uint32)]


class _GraphInfoUnion(C.Union):
    _fields_ = [("graphInfoV1", GraphInfoV1), ("graphInfoV2", GraphInfoV2), ("graphInfoV3", GraphInfoV3)]


class GraphInfo(C.Structure):  # QnnSystemContext_GraphInfo_t
    _anonymous_ = ("u",)
    _fields_ = [("version", C.c_uint32), ("u", _GraphInfoUnion)]


_BINARY_HEAD = [("backendId", C.c_uint32), ("buildId", C.c_char_p), ("coreApiVersion", Version),
                ("backendApiVersion", Version), ("socVersion", C.c_char_p)]
_BINARY_V1 = [*_BINARY_HEAD, ("hwInfoBlobVersion", Version), ("contextBlobVersion", Version),
              ("hwInfoBlobSize", C.c_uint32), ("hwInfoBlob", C.c_void_p), ("contextBlobSize", C.c_uint64),
              ("numContextTensors", C.c_uint32), ("contextTensors", C.POINTER(Tensor)),
              ("numGraphs", C.c_uint32), ("graphs", C.POINTER(GraphInfo))]


class BinaryInfoV1(C.Structure):  # QnnSystemContext_BinaryInfoV1_t
    _fields_ = _BINARY_V1


class BinaryInfoV2(C.Structure):  # QnnSystemContext_BinaryInfoV2_t
    _fields_ = [*_BINARY_V1, ("platformInfo", C.POINTER(PlatformInfo))]


class BinaryInfoV3(C.Structure):  # QnnSystemContext_BinaryInfoV3_t: no hwInfoBlob, socModel instead
    _fields_ = [*_BINARY_HEAD, ("contextBlobVersion", Version), ("contextBlobSize", C.c_uint64),
                ("numContextTensors", C.c_uint32), ("contextTensors", C.POINTER(Tensor)),
                ("numGraphs", C.c_uint32), ("graphs", C.POINTER(GraphInfo)),
                ("platformInfo", C.POINTER(PlatformInfo)), ("contextMetadataSize", C.c_uint32),
                ("contextMetadata", C.c_void_p), ("socModel", C.c_uint32)]


class _BinaryInfoUnion(C.Union):
    _fields_ = [("contextBinaryInfoV1", BinaryInfoV1), ("contextBinaryInfoV2", BinaryInfoV2),
                ("contextBinaryInfoV3", BinaryInfoV3)]


class BinaryInfo(C.Structure):  # QnnSystemContext_BinaryInfo_t
    _anonymous_ = ("u",)
    _fields_ = [("version", C.c_uint32), ("u", _BinaryInfoUnion)]


# --------------------------------------------------------------------------------------------
# System/QnnSystemInterface.h
# --------------------------------------------------------------------------------------------

ErrorHandle = C.c_uint64  # Qnn_ErrorHandle_t; the error code is its low 16 bits
CreateFn = C.CFUNCTYPE(ErrorHandle, C.POINTER(C.c_void_p))
GetBinaryInfoFn = C.CFUNCTYPE(ErrorHandle, C.c_void_p, C.c_void_p, C.c_uint64,
                              C.POINTER(C.POINTER(BinaryInfo)), C.POINTER(C.c_uint64))
GetMetaDataFn = C.CFUNCTYPE(ErrorHandle, C.c_void_p, C.c_void_p, C.c_uint64, C.POINTER(C.POINTER(BinaryInfo)))
FreeFn = C.CFUNCTYPE(ErrorHandle, C.c_void_p)


class SystemInterfaceImpl(C.Structure):  # QnnSystemInterface_ImplementationV1_x_t
    # Only the first four entries are called; the rest (tensor, log, DLC, profile) are kept as
    # plain pointers so the table has the header's shape.
    _fields_ = [("systemContextCreate", CreateFn), ("systemContextGetBinaryInfo", GetBinaryInfoFn),
                ("systemContextGetMetaData", GetMetaDataFn), ("systemContextFree", FreeFn),
                *((name, C.c_void_p) for name in (
                    "systemTensorGetMemoryFootprint", "systemLogCreate", "systemLogSetLogLevel", "systemLogFree",
                    "systemDlcCreateFromFile", "systemDlcCreateFromBinary", "systemDlcComposeGraphs",
                    "systemDlcGetOpMappings", "systemDlcFree", "systemProfileCreateSerializationTarget",
                    "systemProfileSerializeEventData", "systemProfileFreeSerializationTarget"))]


class SystemInterface(C.Structure):  # QnnSystemInterface_t
    _fields_ = [("backendId", C.c_uint32), ("providerName", C.c_char_p), ("systemApiVersion", Version),
                ("impl", SystemInterfaceImpl)]


# --------------------------------------------------------------------------------------------
# Loading libQnnSystem and calling it
# --------------------------------------------------------------------------------------------

_lib: C.CDLL | None = None  # held so the function table below stays valid
_interface: SystemInterfaceImpl | None = None


def _library_path() -> Path:
    try:
        import onnxruntime_qnn
    except ImportError as e:
        raise ToolMissing("reading a QNN context binary needs libQnnSystem from onnxruntime-qnn: "
                          "pip install onnxruntime-qnn") from e
    return Path(onnxruntime_qnn.__file__).parent / "libQnnSystem.so"


def _system_interface() -> SystemInterfaceImpl:
    """The 1.x function table of libQnnSystem, loaded once per process (the library stays loaded:
    the table's pointers are only valid while it is)."""
    global _lib, _interface
    if _interface is not None:
        return _interface
    lib_path = _library_path()
    if not lib_path.is_file():
        raise ToolMissing(f"{lib_path} is missing: reinstall it with pip install --force-reinstall onnxruntime-qnn")
    _lib = C.CDLL(str(lib_path))
    get_providers = _lib.QnnSystemInterface_getProviders
    get_providers.restype = ErrorHandle
    get_providers.argtypes = [C.POINTER(C.POINTER(C.POINTER(SystemInterface))), C.POINTER(C.c_uint32)]
    providers = C.POINTER(C.POINTER(SystemInterface))()
    count = C.c_uint32()
    _check(get_providers(C.byref(providers), C.byref(count)), "QnnSystemInterface_getProviders", lib_path)
    found = []
    for i in range(count.value):
        provider = providers[i].contents
        found.append(str(provider.systemApiVersion))
        if provider.systemApiVersion.major == QNN_SYSTEM_API_VERSION_MAJOR:
            _interface = provider.impl
            return _interface
    raise ToolMissing(f"{lib_path} offers no QNN System API {QNN_SYSTEM_API_VERSION_MAJOR}.x interface "
                      f"(it has {', '.join(found) or 'none'}); install an onnxruntime-qnn that matches this Kiln")


def _error_text(err: int) -> str:
    code = err & 0xFFFF  # the low 16 bits are the code; QNN keeps tracking data above them
    return f"QNN error {code}" + (f", {ERRORS[code]}" if code in ERRORS else "")


def _check(err: int, what: str, path: Path) -> None:
    if err & 0xFFFF:
        raise QnnBinaryError(f"{path}: {what} failed ({_error_text(err)})")


@contextmanager
def _system_context(api: SystemInterfaceImpl, path: Path) -> Iterator[C.c_void_p]:
    """A QnnSystemContext handle, freed on exit; it owns the binary info memory QNN hands out."""
    if not (api.systemContextCreate and api.systemContextFree and api.systemContextGetBinaryInfo):
        raise ToolMissing("this libQnnSystem lacks the system context functions; reinstall onnxruntime-qnn")
    handle = C.c_void_p()
    _check(api.systemContextCreate(C.byref(handle)), "QnnSystemContext_create", path)
    try:
        yield handle
    finally:
        api.systemContextFree(handle)


# --------------------------------------------------------------------------------------------
# Turning the structs into plain data
# --------------------------------------------------------------------------------------------

def _text(raw: bytes | None) -> str | None:
    return raw.decode("utf-8", "replace") if raw is not None else None


def _unknown(path: Path, what: str, version: int) -> QnnBinaryError:
    return QnnBinaryError(f"{path}: {what} version {version} is not one this reader knows "
                          f"(it follows the QNN 2.43 headers); update pipeline/qnn/qnn_binary.py")


def _quantization(q: QuantizeParams) -> dict[str, Any]:
    """scale/offset for per-tensor encodings; per-axis ones give the axis and channel count."""
    if q.encodingDefinition != QNN_DEFINITION_DEFINED:
        return {"encoding": None, "scale": None, "offset": None}
    enc = q.quantizationEncoding
    out: dict[str, Any] = {"encoding": _name(ENCODINGS, enc), "scale": None, "offset": None}
    if enc == ENC_SCALE_OFFSET:
        out.update(scale=float(q.scaleOffsetEncoding.scale), offset=int(q.scaleOffsetEncoding.offset))
    elif enc == ENC_BW_SCALE_OFFSET:
        e = q.bwScaleOffsetEncoding
        out.update(scale=float(e.scale), offset=int(e.offset), bitwidth=int(e.bitwidth))
    elif enc == ENC_AXIS_SCALE_OFFSET:
        out.update(axis=int(q.axisScaleOffsetEncoding.axis), channels=int(q.axisScaleOffsetEncoding.numScaleOffsets))
    elif enc == ENC_BW_AXIS_SCALE_OFFSET:
        e = q.bwAxisScaleOffsetEncoding
        out.update(axis=int(e.axis), channels=int(e.numElements), bitwidth=int(e.bitwidth))
    return out


def _tensor(t: Tensor, path: Path) -> dict[str, Any]:
    if t.version == 1:
        v: TensorV1 | TensorV2 = t.v1
    elif t.version == 2:
        v = t.v2
    else:
        raise _unknown(path, "Qnn_Tensor_t", t.version)
    dims = [int(v.dimensions[i]) for i in range(v.rank)] if v.dimensions else []
    return {"name": _text(v.name), "dtype": _name(DATA_TYPES, v.dataType), "dims": dims,
            **_quantization(v.quantizeParams)}


def _tensors(array: Any, count: int, path: Path) -> list[dict[str, Any]]:
    return [_tensor(array[i], path) for i in range(count)] if array else []


def _mb(nbytes: int) -> int | float:
    return nbytes // 2**20 if nbytes % 2**20 == 0 else nbytes / 2**20


def _htp_graph_blob(blob: int | None, size: int) -> dict[str, Any]:
    """vtcm_mb and memory figures from HTP's per-graph blob (a QnnHtpSystemContext_GraphBlobInfo_t)."""
    if not blob or size < C.sizeof(HtpGraphBlobInfo):
        return {}
    head = HtpGraphBlobInfo.from_address(blob)
    if head.version != 1:
        return {}  # backend-private extras: an unknown version loses detail, not correctness
    # The header calls vtcmSize "MB", but QNN 2.51 stores bytes (vtcm_mb=2 at compile reads 2097152).
    out: dict[str, Any] = {"vtcm_mb": _mb(head.v1.vtcmSize), "spill_fill_bytes": int(head.v1.spillFillBufferSize)}
    # QNN 2.51 writes 112 bytes: the V1 struct above followed by a GraphBlobInfoV2_t (which carries
    # its own version field). The header does not spell that out, so it is read only when it says 2.
    tail = blob + C.sizeof(HtpGraphBlobInfo)
    if size >= C.sizeof(HtpGraphBlobInfo) + C.sizeof(HtpGraphBlobInfoV2) and C.c_uint32.from_address(tail).value == 2:
        v2 = HtpGraphBlobInfoV2.from_address(tail)
        out.update(io_tensor_bytes=int(v2.ioTensorSize), const_bytes=int(v2.constSize))
    return out


def _graph(g: GraphInfo, path: Path, htp: bool) -> dict[str, Any]:
    if g.version not in (1, 2, 3):
        raise _unknown(path, "QnnSystemContext_GraphInfo_t", g.version)
    v = (g.graphInfoV1, g.graphInfoV2, g.graphInfoV3)[g.version - 1]
    out = {"name": _text(v.graphName),
           "inputs": _tensors(v.graphInputs, v.numGraphInputs, path),
           "outputs": _tensors(v.graphOutputs, v.numGraphOutputs, path)}
    if g.version == 3 and htp:
        out.update(_htp_graph_blob(v.graphBlobInfo, v.graphBlobInfoSize))
    return out


def _htp_device(platform: Any) -> dict[str, Any]:
    """soc_model and htp_arch of the first on-chip HTP device in the platform info."""
    if not platform or platform.contents.version != 1:
        return {}
    p = platform.contents.v1
    for i in range(p.numHwDevices if p.hwDevices else 0):
        dev = p.hwDevices[i]
        if dev.version != 1 or not dev.v1.deviceInfoExtension:
            continue
        ext = HtpDeviceInfoExtension.from_address(dev.v1.deviceInfoExtension)
        if ext.devType == QNN_HTP_DEVICE_TYPE_ON_CHIP:
            chip = ext.onChipDevice
            return {"soc_model": int(chip.socModel), "htp_arch": int(chip.arch)}
    return {}


def _htp_context_metadata(blob: int | None, size: int) -> dict[str, Any]:
    if blob and size >= C.sizeof(HtpContextBlobInfo):
        meta = HtpContextBlobInfo.from_address(blob)
        if meta.version == 1:
            return {"htp_arch": int(meta.dspArch)}
    return {}


def _htp_target(version: int, v: Any) -> dict[str, Any]:
    """soc_model and htp_arch the binary was prepared for.

    V3 has socModel as a field of its own and HTP puts the DSP arch in contextMetadata; V2 only has
    the platform info (which QNN 2.51 leaves without a device extension, so it is a fallback). A V1
    binary records neither: its hwInfoBlob holds spill-fill sizes only.
    """
    hw = _htp_device(v.platformInfo) if version >= 2 else {}
    if version == 3:
        hw.update(_htp_context_metadata(v.contextMetadata, v.contextMetadataSize))
        if v.socModel:
            hw["soc_model"] = int(v.socModel)
    return hw


def _binary_info(info: BinaryInfo, path: Path) -> dict[str, Any]:
    if info.version not in (1, 2, 3):
        raise _unknown(path, "QnnSystemContext_BinaryInfo_t", info.version)
    v = (info.contextBinaryInfoV1, info.contextBinaryInfoV2, info.contextBinaryInfoV3)[info.version - 1]
    htp = v.backendId == QNN_BACKEND_ID_HTP
    out: dict[str, Any] = {
        "binary_info_version": int(info.version),
        "backend_id": int(v.backendId),
        "backend": _name(BACKENDS, v.backendId),
        "build_id": _text(v.buildId),
        "core_api_version": str(v.coreApiVersion),
        "backend_api_version": str(v.backendApiVersion),
        "soc_version": _text(v.socVersion),
        "context_blob_version": str(v.contextBlobVersion),
        "context_blob_bytes": int(v.contextBlobSize),
    }
    if htp:
        out.update(_htp_target(info.version, v))
    out["graphs"] = [_graph(v.graphs[i], path, htp) for i in range(v.numGraphs)] if v.graphs else []
    vtcm = [g["vtcm_mb"] for g in out["graphs"] if "vtcm_mb" in g]
    if vtcm:
        out["vtcm_mb"] = max(vtcm)  # the context reserves what its hungriest graph asks for
    return out


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def read_binary_info(path: Path) -> dict[str, Any]:
    """The metadata of the QNN context binary at `path`, as JSON-ready data.

    Keys: binary_info_version, backend_id, backend, build_id, core_api_version,
    backend_api_version, soc_version, context_blob_version, context_blob_bytes, graphs; for HTP
    binaries also soc_model, htp_arch and vtcm_mb where the binary records them. Each graph is
    {name, inputs, outputs} (plus HTP per-graph figures such as vtcm_mb when present) and each
    tensor {name, dtype, dims, encoding, scale, offset} (scale/offset None unless per-tensor).
    Raises QnnBinaryError when libQnnSystem cannot parse the file or a struct version is unknown,
    ToolMissing when onnxruntime-qnn is not installed.
    """
    path = Path(path)
    data = path.read_bytes()
    if not data:
        raise QnnBinaryError(f"{path}: empty file, not a QNN context binary")
    api = _system_interface()
    # QNN's getBinaryInfo takes a non-const buffer: hand it a private copy.
    buffer = (C.c_uint8 * len(data)).from_buffer_copy(data)
    with _system_context(api, path) as handle:
        info = C.POINTER(BinaryInfo)()
        info_size = C.c_uint64()
        err = api.systemContextGetBinaryInfo(handle, buffer, len(data), C.byref(info), C.byref(info_size))
        if err & 0xFFFF or not info:
            raise QnnBinaryError(f"{path}: not a QNN context binary (libQnnSystem: {_error_text(err)})")
        # Everything is copied out before the handle (which owns the info's memory) is freed.
        return _binary_info(info.contents, path)


def check_binary(info: dict[str, Any], soc_model: int, graphs: dict[str, dict[str, list[str]]]) -> list[str]:
    """Human-readable problems of a binary against what the recipe expects; [] when it matches.

    `graphs` maps graph name -> {"inputs": [names], "outputs": [names]}; an omitted key is not
    checked. Order is not compared: QNN does not promise to keep the ONNX order.
    """
    problems = []
    if info.get("soc_model") is None:
        problems.append(f"the binary does not record its SoC model; the recipe wants {soc_model}")
    elif info["soc_model"] != soc_model:
        problems.append(f"built for SoC model {info['soc_model']}, the recipe wants {soc_model}")
    found = {g["name"]: g for g in info.get("graphs", [])}
    for name, want in graphs.items():
        graph = found.get(name)
        if graph is None:
            problems.append(f"graph {name!r} is missing (the binary has {', '.join(sorted(found)) or 'no graphs'})")
            continue
        for kind in ("inputs", "outputs"):
            if kind not in want:
                continue
            have = {t["name"] for t in graph[kind]}
            missing = [n for n in want[kind] if n not in have]
            extra = sorted(have - set(want[kind]))
            if missing:
                problems.append(f"graph {name!r}: {kind} missing: {', '.join(missing)}")
            if extra:
                problems.append(f"graph {name!r}: unexpected {kind}: {', '.join(extra)}")
    return problems
