"""verify --trajectory: the sampler math against diffusers, SSIM, whole runs, the planted fault, the PNG, bad options."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from attn_export.trajectory import (DEFAULT_RULES, beta_schedule, ddim_step, ddpm_step, psnr, sampling_timesteps, ssim,
                                    verify_trajectory)
from conftest import make_fake_engine, run_cli_in_process as run


def one_line_error(result, needle: str, code: int = 2) -> None:
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert needle in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# schedule and steps against diffusers
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,start,end", [("linear", 1e-4, 0.02), ("scaled_linear", 8.5e-4, 0.012),
                                            ("squaredcos_cap_v2", 1e-4, 0.02)])
def test_betas_match_diffusers(kind: str, start: float, end: float) -> None:
    from diffusers import DDPMScheduler

    ours = beta_schedule(kind, 1000, start, end)
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_start=start, beta_end=end, beta_schedule=kind).betas.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("steps", [1, 10, 50, 999])
def test_timesteps_match_diffusers(steps: int) -> None:
    from diffusers import DDIMScheduler, DDPMScheduler

    for cls in (DDIMScheduler, DDPMScheduler):
        s = cls(num_train_timesteps=1000)
        s.set_timesteps(steps)
        assert sampling_timesteps(steps, 1000).tolist() == s.timesteps.tolist(), cls.__name__


def _tensors(seed: int, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2, channels, 8, 8)), rng.standard_normal((2, 3, 8, 8))


@pytest.mark.parametrize("clip,eta", [(True, 0.0), (False, 0.0), (True, 0.7)])
def test_ddim_steps_match_diffusers(clip: bool, eta: float) -> None:
    import torch
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          clip_sample=clip)
    sched.set_timesteps(10)
    abar = np.cumprod(1 - beta_schedule("linear", 1000, 1e-4, 0.02))
    for k, t in enumerate(sched.timesteps.tolist()):
        eps, x = _tensors(k)
        noise = np.random.default_rng(100 + k).standard_normal(x.shape)
        theirs = sched.step(torch.from_numpy(eps), t, torch.from_numpy(x), eta=eta,
                            variance_noise=torch.from_numpy(noise)).prev_sample.numpy()
        ours = ddim_step(eps, t, t - 100, x, abar, clip=clip, eta=eta, noise=noise)
        # diffusers keeps alpha-bar in float32: agreement to its rounding.
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5, err_msg=f"t={t}")


@pytest.mark.parametrize("learned", [False, True])
def test_ddpm_steps_match_diffusers(learned: bool) -> None:
    import torch
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          variance_type="learned_range" if learned else "fixed_small")
    sched.set_timesteps(20)
    abar = np.cumprod(1 - beta_schedule("linear", 1000, 1e-4, 0.02))
    for k, t in enumerate(sched.timesteps.tolist()):
        out, x = _tensors(k, 6 if learned else 3)
        if learned:
            out[:, 3:] = np.tanh(out[:, 3:])  # the variance channels lie in [-1, 1]
        theirs = sched.step(torch.from_numpy(out), t, torch.from_numpy(x),
                            generator=torch.Generator().manual_seed(k)).prev_sample.numpy()
        # diffusers draws its noise with torch.randn from that generator: the same noise, given to ours.
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64).numpy()
        ours = ddpm_step(out[:, :3], t, t - 50, x, abar, clip=True, noise=noise,
                         variance_out=out[:, 3:] if learned else None)
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5, err_msg=f"t={t}")


# ---------------------------------------------------------------------------------------------------------------------
# image metrics
# ---------------------------------------------------------------------------------------------------------------------
def test_ssim_identical_is_one_and_noise_lowers_it() -> None:
    a = np.random.default_rng(0).random((2, 3, 32, 32))
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-12)
    noisy = np.clip(a + np.random.default_rng(1).normal(0, 0.1, a.shape), 0, 1)
    s = ssim(a, noisy)
    assert np.all(s < 0.95) and np.all(s > 0.0), s
    np.testing.assert_allclose(ssim(noisy, a), s, atol=1e-12)  # symmetric


def test_ssim_of_constant_images_is_the_luminance_term() -> None:
    # Flat images have no variance: SSIM = (2ab + C1) / (a^2 + b^2 + C1), a value known in closed form.
    a, b = np.full((1, 1, 16, 16), 0.2), np.full((1, 1, 16, 16), 0.6)
    c1 = (0.01 * 1.0) ** 2
    np.testing.assert_allclose(ssim(a, b), (2 * 0.2 * 0.6 + c1) / (0.2 ** 2 + 0.6 ** 2 + c1), rtol=1e-9)


def _ssim_by_windows(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM by its definition: every 11x11 window, its Gaussian-weighted statistics, one position at a time."""
    u = np.arange(11) - 5.0
    g = np.exp(-u ** 2 / (2 * 1.5 ** 2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
            ma, mb = (win * pa).sum(), (win * pb).sum()
            va, vb = (win * (pa - ma) ** 2).sum(), (win * (pb - mb) ** 2).sum()
            cov = (win * (pa - ma) * (pb - mb)).sum()
            values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_matches_the_definition_window_by_window() -> None:
    rng = np.random.default_rng(3)
    a = rng.random((20, 24))
    b = np.clip(0.7 * a + 0.3 * rng.random((20, 24)), 0, 1)
    np.testing.assert_allclose(ssim(a[None, None], b[None, None])[0], _ssim_by_windows(a, b), rtol=1e-10)


@pytest.mark.parametrize("noise", [0.02, 0.1, 0.3])
def test_ssim_equals_scikit_image(noise: float) -> None:
    # scikit-image's structural_similarity with Wang et al.'s settings crops the border the window cannot cover
    # before averaging: the same valid region as ours, so the two agree to rounding, per channel and averaged.
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(4)
    a = rng.random((3, 40, 36))
    b = np.clip(a + rng.normal(0, noise, a.shape), 0, 1)
    want = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=1.0, channel_axis=0)
    assert ssim(a[None], b[None])[0] == pytest.approx(want, abs=1e-12)


def test_psnr_known_values() -> None:
    a = np.zeros((2, 3, 4, 4))
    b = a.copy()
    b[0] += 0.1  # MSE 0.01 -> 20 dB
    p = psnr(a, b)
    assert p[0] == pytest.approx(20.0) and p[1] == np.inf


# ---------------------------------------------------------------------------------------------------------------------
# whole runs
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_fp16(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from attn_export.pipeline import convert_fp16

    out = tmp_path_factory.mktemp("fp16") / "tiny.fp16.onnx"
    convert_fp16(tiny_onnx, out, check=False)
    return out


def test_fp32_onnx_matches_pytorch_over_ten_ddim_steps(tiny_onnx: Path) -> None:
    r = verify_trajectory(tiny_onnx, 10, sampler="ddim")
    assert r.passed, r.failures()
    assert r.rule == DEFAULT_RULES["fp32"]
    worst = r.worst()
    # Far above what the FP16 class needs: FP32 ONNX Runtime and PyTorch differ by rounding only.
    assert worst["psnr"] > DEFAULT_RULES["fp16"].min_psnr + 30, worst
    assert len(r.steps) == 10 and [s.timestep for s in r.steps] == list(range(900, -1, -100))
    assert all(s.nonfinite_candidate == 0 for s in r.steps)
    # The error grows along the trajectory (what a single call does not show).
    assert r.steps[-1].sample_mean_abs > r.steps[0].sample_mean_abs > 0


def test_fp16_file_passes_at_its_default(tiny_fp16: Path, tmp_path: Path) -> None:
    report = tmp_path / "t.json"
    result = run("verify", tiny_fp16, "--trajectory", 10, "--report", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["passed"] and data["precision"] == "fp16"
    assert data["rule"] == {"min_psnr": DEFAULT_RULES["fp16"].min_psnr, "min_ssim": DEFAULT_RULES["fp16"].min_ssim,
                            "max_abs": DEFAULT_RULES["fp16"].max_abs}
    # Every number is in the report: each step's four differences, each image's three figures.
    assert len(data["steps"]) == 10
    for s in data["steps"]:
        assert {"output_max_abs", "output_mean_abs", "sample_max_abs", "sample_mean_abs", "nonfinite_candidate"} <= set(s)
    assert len(data["images"]) == 2 and all({"psnr", "ssim", "max_abs"} <= set(i) for i in data["images"])
    # FP16 is measurably off the reference, unlike FP32: the report is not trivially perfect.
    assert 0 < data["final"]["max_abs"] and data["final"]["psnr"] < 80


def plant_bias(src: Path, dst: Path, site: str, value: float) -> None:
    """Add a constant to the output of attention site ``site``'s output projection (a fault that compounds)."""
    m = onnx.load(src)
    g = m.graph
    conv = next(n for n in g.node if n.name == f"/{site}/attention/to_out/Conv")
    weight = next(i for i in g.initializer if i.name == conv.input[1])
    out, biased = conv.output[0], conv.output[0] + "_planted"
    for n in g.node:
        for k, name in enumerate(n.input):
            if name == out:
                n.input[k] = biased
    const = numpy_helper.from_array(np.full((1, 1, 1, 1), value, dtype=numpy_helper.to_array(weight).dtype), out + "_bias")
    g.initializer.append(const)
    g.node.insert(list(g.node).index(conv) + 1, helper.make_node("Add", [out, const.name], [biased], name=f"/{site}/planted"))
    onnx.save(m, dst)


def test_planted_fault_passes_single_calls_but_fails_the_trajectory(tiny_fp16: Path, tmp_path: Path) -> None:
    faulty = tmp_path / "faulty.fp16.onnx"
    plant_bias(tiny_fp16, faulty, "mids.0", 0.1)
    single = run("verify", faulty, "--report", tmp_path / "single.json")
    assert single.exit_code == 0, single.output  # every shape within the FP16 tolerances
    assert json.loads((tmp_path / "single.json").read_text())["tolerances"]["stat"] == "mean"
    report = tmp_path / "traj.json"
    whole = run("verify", faulty, "--trajectory", 10, "--report", report)
    assert whole.exit_code == 1, whole.output
    data = json.loads(report.read_text())
    assert not data["passed"] and data["failures"]
    assert data["final"]["psnr"] < DEFAULT_RULES["fp16"].min_psnr
    # The same check of the unfaulted file passes: the fault, not the FP16 rounding, fails it.
    assert verify_trajectory(tiny_fp16, 10).passed


def test_images_png_has_the_documented_layout(tiny_onnx: Path, tmp_path: Path) -> None:
    from PIL import Image

    from attn_export import trajectory_images as ti

    png = tmp_path / "grid.png"
    report = tmp_path / "r.json"
    result = run("verify", tiny_onnx, "--trajectory", 4, "--batch", 3, "--images", png, "--report", report)
    assert result.exit_code == 0, result.output
    with Image.open(png) as img:
        img.load()
        assert img.format == "PNG" and img.mode == "RGB"
        s = max(1, ti.TILE // 32)  # the tiny preset samples at 32x32
        want = (max(3 * 32 * s + 4 * ti.PAD, ti.MIN_WIDTH), ti.PAD + ti.LINE + 3 * (32 * s + ti.LINE + ti.PAD) + ti.PLOT_H + ti.PAD)
        assert img.size == want == ti.grid_size(3, 32, 32)
        pixels = np.asarray(img)
    # The first tile is the reference image, upscaled: its top-left pixel is the reference's.
    data = json.loads(report.read_text())
    assert data["images_written"] == str(png)
    ref = verify_trajectory(tiny_onnx, 4, batch=3).reference_images
    assert ref is not None
    top, left = ti.PAD + ti.LINE, ti.PAD
    np.testing.assert_allclose(pixels[top, left], np.round(ref[0, :, 0, 0] * 255), atol=1)
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_learned_variance_output_is_read_as_epsilon_and_variance(export_model) -> None:
    path = export_model("tiny", "op", out_channels=6)
    r = verify_trajectory(path, 5, sampler="ddpm")
    assert r.settings.prediction == "learned-variance"
    assert r.passed, r.failures()
    assert r.candidate_images is not None and r.candidate_images.shape[1] == 3


def test_reference_onnx_file(tiny_onnx: Path, tiny_fp16: Path) -> None:
    # The FP16 file against the FP32 file in ONNX Runtime: a reference of the user's choosing.
    r = verify_trajectory(tiny_fp16, 5, reference=tiny_onnx)
    assert r.reference.startswith("onnxruntime (") and r.passed, r.failures()


# ---------------------------------------------------------------------------------------------------------------------
# bad options: one line, exit 2
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["--trajectory", "0"], "at least 1"),
    (["--trajectory", "5", "--sampler", "euler"], "unknown --sampler"),
    (["--trajectory", "5", "--images", "grid.jpg"], "ending in .png"),
    (["--trajectory", "5", "--images", "no/such/folder/grid.png"], "does not exist"),
    (["--sampler", "ddpm"], "add --trajectory"),
    (["--images", "grid.png"], "add --trajectory"),
    (["--trajectory", "5", "--atol", "0.1"], "--atol"),
    (["--trajectory", "5", "--localize"], "--localize"),
    (["--trajectory", "5", "--batch", "0"], "--batch"),
    (["--trajectory", "5", "--shapes", "1x32x32,2x32x32"], "one shape"),
    (["--trajectory", "5", "--shapes", "1x30x30"], "multiples"),
    (["--trajectory", "2000"], "between 1 and the 1000"),
    (["--trajectory", "5", "--beta-schedule", "quadratic"], "beta schedule"),
    (["--trajectory", "5", "--prediction", "v"], "--prediction"),
])
def test_bad_options_are_one_line(tiny_onnx: Path, args: list[str], needle: str) -> None:
    one_line_error(run("verify", tiny_onnx, *args), needle)


def test_existing_images_file_needs_force(tiny_onnx: Path, tmp_path: Path) -> None:
    png = tmp_path / "grid.png"
    png.write_bytes(b"mine")
    one_line_error(run("verify", tiny_onnx, "--trajectory", 2, "--images", png), "--force")
    assert png.read_bytes() == b"mine"


@pytest.fixture
def fake_engine(tiny_onnx: Path, tmp_path: Path) -> Path:
    from attn_export.engines.profiles import Profile

    return make_fake_engine(tiny_onnx, tmp_path, Profile((1, 32, 32), (2, 32, 32), (4, 64, 64)))


def _have_trt_and_gpu() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    from attn_export.engines.trt_build import gpu_info

    return gpu_info() is not None


@pytest.mark.skipif(_have_trt_and_gpu(), reason="checks the refusal where TensorRT or a GPU is missing")
def test_engine_without_tensorrt_is_one_line(fake_engine: Path) -> None:
    one_line_error(run("verify", fake_engine, "--trajectory", 5), "TensorRT")
    one_line_error(run("verify", fake_engine, "--trajectory", 5, "--shapes", "1x256x256"), "outside the engine's")


@pytest.mark.gpu
@pytest.mark.skipif(not _have_trt_and_gpu(), reason="needs TensorRT and an NVIDIA GPU")
def test_engine_trajectory_on_gpu(tiny_onnx: Path, tmp_path: Path) -> None:
    from attn_export import build_engine
    from attn_export.engines.profiles import Profile

    engine = tmp_path / "tiny.plan"
    build_engine(tiny_onnx, engine, [Profile((1, 32, 32), (2, 32, 32), (4, 64, 64))], fp16=True)
    png = tmp_path / "grid.png"
    r = verify_trajectory(engine, 20)
    assert r.candidate.startswith("tensorrt") and r.passed, r.failures()
    result = run("verify", engine, "--trajectory", 10, "--sampler", "ddpm", "--images", png)
    assert result.exit_code == 0, result.output
    assert png.is_file()
