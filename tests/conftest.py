"""Session setup. The environment variables have to be set before any test module imports torch and, through
torch._dynamo, triton."""
import os

# Triton's CPU interpreter multiplies its blocks with numpy, whose OpenBLAS threads fight torch's for the CI
# machine's 2 cores: the kernel tests ran 4x slower with them.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# One torch thread in every test and every process a test starts: the tests' shapes are tiny, and when anything else
# keeps one of the 2 cores busy, each parallel op waits for a descheduled thread (measured: 100x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import time  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import settings  # noqa: E402

from cosmos_reference import B, C, H, L_TEXT, REF_CONFIG, T, W  # noqa: E402

# Without a GPU Triton can only run on its CPU interpreter, and triton fixes that choice when it is first imported
# (see kernels/__init__.py). This only selects the interpreter: CPU tensors still take the fast torch path outside
# kernels.force("triton").
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Wall-clock deadlines make property tests flaky on a loaded 2-core CI machine; correctness is what they check.
settings.register_profile("project", deadline=None, max_examples=int(__import__("os").environ.get("HYPOTHESIS_EXAMPLES", 50)))
settings.load_profile("project")

# ----------------------------------------------------------------------------- where a test run's time goes
# A module that takes over SLOW_MODULE_S prints one line with its time and the run's, so that a run cut short (CI
# stops at 90 minutes) shows in its output how far it got and what took the time.
SLOW_MODULE_S = 30
_module = {"name": None, "start": 0.0}


def pytest_configure(config):
    _module.update(config=config, session_start=time.monotonic())


def _report_module():
    now = time.monotonic()
    if _module["name"] and now - _module["start"] > SLOW_MODULE_S:
        _module["config"].pluginmanager.get_plugin("terminalreporter").write_line(
            f"\n[time] {_module['name']}: {now - _module['start']:.0f} s ({now - _module['session_start']:.0f} s "
            f"into the run)")


def pytest_runtest_logstart(nodeid, location):
    if nodeid.split("::")[0] != _module["name"]:
        _report_module()
        _module.update(name=nodeid.split("::")[0], start=time.monotonic())


def pytest_sessionfinish(session):
    _report_module()


# ----------------------------------------------------------------------------- the video model's reference


@pytest.fixture(scope="module")
def one_thread():
    """These shapes are tiny: a second thread gains nothing, and on a busy 2-core machine each parallel op would
    wait for a descheduled thread (measured: 100x slower). (OMP_NUM_THREADS above already asks for one; this holds
    where a caller set its own.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(one_thread):
    """A random diffusers CosmosTransformer3DModel (every weight randomised, norms included), in fp32: the
    independent reference of the video model's tests."""
    import diffusers.models.transformers.transformer_cosmos as diffusers_cosmos   # a test dependency
    torch.manual_seed(0)
    ref = diffusers_cosmos.CosmosTransformer3DModel(**REF_CONFIG).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / p.shape[1] ** 0.5)
    # diffusers resizes its (all-zero) padding mask with torchvision, which the CI does not install
    resize = lambda img, size, interpolation: F.interpolate(img, size=size, mode="nearest")   # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diffusers_cosmos, "transforms", types.SimpleNamespace(
            functional=types.SimpleNamespace(resize=resize), InterpolationMode=types.SimpleNamespace(NEAREST=None)),
            raising=False)
        yield ref


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    cond_mask = torch.zeros(B, T)
    cond_mask[:, 0] = 1
    cond_mask[1, 1] = 1   # one or two context frames
    return dict(x=torch.randn(B, C, T, H, W, generator=g), tau=torch.rand(B, T, generator=g),
                text=torch.randn(B, L_TEXT, 32, generator=g), cond_mask=cond_mask)


@pytest.fixture(scope="module")
def folders(reference, tmp_path_factory):
    """The reference saved by diffusers: sharded with an index json, and as one file."""
    root = tmp_path_factory.mktemp("ckpt")
    reference.save_pretrained(root / "sharded", max_shard_size="300KB")
    reference.save_pretrained(root / "single")
    assert len(list((root / "sharded").glob("*.safetensors"))) > 1
    assert len(list((root / "single").glob("*.safetensors"))) == 1
    return root


@pytest.fixture(scope="module")
def model(folders):
    import cosmos_weights
    return cosmos_weights.from_pretrained(folders / "single").eval()

# ----------------------------------------------------------------------------- a tiny LIBERO-shaped run


@pytest.fixture(scope="session")
def libero_run(tmp_path_factory):
    """A run directory trained for a few smoke steps on random LIBERO-shaped episodes (tests/tiny_runs.py)."""
    import tiny_runs
    return tiny_runs.train_tiny_run(tmp_path_factory.mktemp("libero-run"))
