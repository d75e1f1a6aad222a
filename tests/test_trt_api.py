"""TensorRT API conformance, on CPU: our TensorRT modules against the real bindings of each supported version.

What this proves: every TensorRT name, enum member, method, argument count and
argument type in attn_export's TensorRT modules (and the keyword arguments we
pass to Polygraphy) exists in the real Python bindings of each version, and
the progress-monitor subclass is accepted by the real pybind11 trampoline.
What it does not prove: that an engine builds or runs. The bindings are
imported over stand-in libraries that return NULL (tests/trt_api/standin.py);
nothing here executes TensorRT. The GPU tests (``make test-gpu``) do that.

Skipped, with the reason, only when no package index can be reached to
download the bindings wheels; they are cached under build/trt-bindings/.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from trt_api import check, standin

REPO = Path(__file__).resolve().parents[1]
NEWEST = [v for v in check.SUPPORTED_VERSIONS if not v.startswith(check.RTX_PREFIX)][-1]
RTX_VERSION = next(v for v in check.SUPPORTED_VERSIONS if v.startswith(check.RTX_PREFIX))


def _run(version: str, path: Path = check.PACKAGE) -> check.VersionResult:
    try:
        return check.check_version(version, path)
    except check.IndexUnreachable as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("version", check.SUPPORTED_VERSIONS)
def test_our_tensorrt_code_conforms(version: str) -> None:
    result = _run(version)
    assert result.passed, result.summary()
    names = {Path(m).name for m in result.modules}
    assert {"trt_build.py", "trt_runner.py"} <= names
    probe = result.probe
    # What ran against the real module, without TensorRT's libraries:
    assert probe["progress_monitor"]["steps"] == [True, True, False]
    assert set(probe["hardware_levels"]) == {"none", "ampere_plus", "same_compute_capability"}
    assert probe["layer_information_format"].endswith("JSON")
    assert probe["tensor_io_mode"].endswith("INPUT")
    assert list(probe["nptype"].values()) == ["float32", "float16", "int32", "int64", "bool"]
    assert all(probe["names"].values()) and "trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED" in probe["names"]
    # Both version branches of network_flags: STRONGLY_TYPED asked for on 10.x and TensorRT-RTX, nothing on 11.x.
    rtx = version.startswith(check.RTX_PREFIX)
    major = 0 if rtx else int(version.split(".")[0])
    assert probe["polygraphy"]["loader"] == "EngineBytesFromNetwork"
    # (the flag's bit: NetworkDefinitionCreationFlag.STRONGLY_TYPED is member 1 in TensorRT, member 0 in TensorRT-RTX)
    assert probe["network_flags"] == ({"True": 1, "False": 0} if rtx else {"True": 2, "False": 0} if major == 10
                                      else {"True": 0, "False": 0})
    # The RTX runtime's own branch ran: CreateConfigRTX, with every compute capability we accept validated by Polygraphy.
    assert probe["polygraphy"]["config_types"] == (["CreateConfigRTX"] if rtx else ["CreateConfig"])
    assert probe["polygraphy"]["configs"] == (10 if rtx else 9)
    # Attention layers can be marked decomposable from 10.14 on, and in TensorRT-RTX.
    assert probe["polygraphy"]["decomposable"] == (rtx or version >= "10.14")


def test_standins_cover_exactly_what_the_module_leaves_undefined() -> None:
    result = _run(NEWEST)
    module = check.BUILD / NEWEST / "site" / "tensorrt_bindings" / "tensorrt.so"
    missing_libs, symbols = standin.missing_symbols(module)
    assert sorted(missing_libs) == ["libnvinfer.so.11", "libnvinfer_plugin.so.11", "libnvonnxparser.so.11"]
    assert "createInferBuilder_INTERNAL" in symbols and "createNvOnnxParser_INTERNAL" in symbols
    assert not any(s.startswith(("Py", "_Py", "__tls")) for s in symbols)  # the runtime's own symbols stay real
    built = sorted(p.name for p in (check.BUILD / NEWEST / "standin-libs").glob("standin_*.so.*") if p.suffix != ".c")
    assert built == ["standin_" + n for n in sorted(missing_libs)]
    assert result.passed


def test_supported_range_is_the_checked_range() -> None:
    """README, readiness's --target choices and the CLI help name the versions this check covers."""
    from attn_export import cli
    from attn_export.engines import readiness

    checked = [tuple(int(x) for x in v.split(".")[:2]) for v in check.SUPPORTED_VERSIONS if not v.startswith(check.RTX_PREFIX)]
    assert min(checked) == readiness.MIN_TARGET and max(checked) == readiness.MAX_TARGET
    assert all(f"{a}.{b}" in readiness.SUPPORTED_TARGETS for a, b in checked)
    assert {(10, 14), (11, 0)} <= set(checked)  # first with the Attention op; first 11.x
    assert cli.SUPPORTED_TRT == readiness.supported_range()
    assert readiness.supported_range() in (REPO / "README.md").read_text()


# --------------------------------------------------------------------------- broken copies must fail
def _broken_copy(tmp_path: Path, file: str, old: str, new: str) -> Path:
    """A copy of attn_export with ``old`` replaced by ``new`` (once) in ``file``."""
    dest = tmp_path / "attn_export"
    shutil.copytree(check.PACKAGE, dest, ignore=shutil.ignore_patterns("__pycache__", "cpp"))
    target = dest / file
    text = target.read_text()
    assert text.count(old) >= 1, f"{old!r} is not in {file}"
    target.write_text(text.replace(old, new, 1))
    return dest


BROKEN = {
    # name: (file, original text, broken text, what the error must mention)
    "misspelled method": ("runners/trt_runner.py", "context.execute_async_v3(", "context.execute_async_v4(", "execute_async_v4"),
    "misspelled method (overloaded)": ("runners/trt_runner.py", "context.set_input_shape(", "context.set_input_shapes(",
                                       "set_input_shapes"),
    "missing method on the engine": ("engines/trt_build.py", "engine.get_tensor_mode(", "engine.get_tensor_modes(",
                                     "get_tensor_modes"),
    "nonexistent runtime method": ("runners/trt_runner.py", "runtime.deserialize_cuda_engine(", "runtime.deserialize_engine(",
                                   "deserialize_engine"),
    "misspelled enum member": ("engines/trt_build.py", "NetworkDefinitionCreationFlag.STRONGLY_TYPED",
                               "NetworkDefinitionCreationFlag.STRONGLY_TYPEDX", "STRONGLY_TYPEDX"),
    "removed enum member": ("engines/trt_build.py", "trt.LayerInformationFormat.JSON", "trt.LayerInformationFormat.XML",
                            "XML"),
    "wrong argument count": ("runners/trt_runner.py", "context.set_tensor_address(name, t.data_ptr())",
                             "context.set_tensor_address(name)", "set_tensor_address"),
    "wrong argument type": ("engines/trt_build.py", "parser.parse_from_file(str(onnx_path))",
                            "parser.parse_from_file(onnx_path)", "parse_from_file"),
    "bad subclass override": ("engines/trt_build.py", "def step_complete(self, phase_name: str, step: SupportsInt) -> bool:",
                              "def step_complete(self, phase_name: str) -> bool:", "step_complete"),
    "wrong Polygraphy keyword": ("engines/trt_build.py", "builder_optimization_level=int(opt_level),",
                                 "builder_optimisation_level=int(opt_level),", "builder_optimisation_level"),
    "type: ignore hiding an error": ("runners/trt_runner.py", "context.execute_async_v3(stream.cuda_stream):\n",
                                     "context.execute_async_v4(stream.cuda_stream):  # type: ignore[attr-defined]\n",
                                     "type: ignore"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_copy_fails(tmp_path: Path, name: str) -> None:
    file, old, new, mention = BROKEN[name]
    result = _run(NEWEST, _broken_copy(tmp_path, file, old, new))
    assert not result.passed, f"{name}: the check passed a broken copy"
    assert any(mention in e for e in result.mypy_errors + result.probe_errors), result.summary()
    # mypy names the line in the broken file (Polygraphy's keywords are checked at run time, by the probe).
    assert any(Path(file).name in e for e in result.mypy_errors) or name == "wrong Polygraphy keyword", result.summary()


def test_member_removed_in_11_fails_only_on_11(tmp_path: Path) -> None:
    """BuilderFlag.FP16 exists in 10.x and was removed in 11.0: the same edit passes on 10.16 and fails on 11.0."""
    broken = _broken_copy(tmp_path, "engines/trt_build.py", "    network = builder.create_network(network_flags(strongly_typed))\n",
                          "    network = builder.create_network(network_flags(strongly_typed))\n"
                          "    builder.create_builder_config().set_flag(trt.BuilderFlag.FP16)\n")
    assert _run("10.16.1.11", broken).passed
    result = _run("11.0.0.114", broken)
    assert not result.passed
    assert any(re.search(r"BuilderFlag.*FP16|FP16.*BuilderFlag", e) for e in result.mypy_errors), result.summary()
    assert any("trt.BuilderFlag.FP16" in e for e in result.probe_errors), result.summary()
    # TensorRT-RTX has no FP16 builder flag either: the same code is checked against its API too.
    rtx = _run(RTX_VERSION, broken)
    assert not rtx.passed and any("FP16" in e for e in rtx.mypy_errors), rtx.summary()


def test_rtx_branch_is_checked_against_rtx(tmp_path: Path) -> None:
    """A compute capability TensorRT-RTX has no name for is caught by the RTX check (Polygraphy validates it on the
    real module), and only there: TensorRT never takes that branch."""
    broken = _broken_copy(tmp_path, "engines/runtime.py", 'compute_capabilities=("7.5", ', 'compute_capabilities=("9.9", "7.5", ')
    result = _run(RTX_VERSION, broken)
    assert not result.passed and any("9" in e and "Polygraphy construction" in e for e in result.probe_errors), result.summary()
    assert _run(NEWEST, broken).passed


def test_stub_repairs_keep_names() -> None:
    """The two mechanical stub fixes: `in` renamed, defaults added after a defaulted parameter; names untouched."""
    from trt_api.stubs import add_buffer_protocol, repair

    text = ("class A:\n    def f(self, in: int, out: int) -> int: ...\n"
            "    def g(self, a: int, b: int = None, c: int) -> None: ...\n")
    fixed = repair(text)
    assert "def f(self, in_: int, out: int)" in fixed and "c: int = ..." in fixed and "def g(" in fixed
    buf = add_buffer_protocol('class M:\n    """Exposes the buffer protocol."""\n    x: int\nclass N:\n    """no"""\n')
    assert buf.count("__buffer__") == 1 and buf.index("__buffer__") < buf.index("class N")
