"""Shared fixtures: an isolated Kiln project (recipes, workspace, store in tmp)
and a tiny seeded random Llama saved as a HF directory."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline import ROOT
from pipeline.engine.settings import Settings
from tests.tiny_models import save_tiny_llama

pytest_plugins = ("tests.s3_server",)  # the S3 endpoint fixtures of the remote-tier tests


@dataclass
class Project:
    """An isolated Kiln setup: recipes/, artifacts/ and a store under tmp."""

    dir: Path
    shared_store: Path | None = None  # a store several tests reuse (see tiny_htp_project)
    root: Path = ROOT  # the Kiln checkout doit runs (tests of code edits run a copy: tests/checkout.py)

    @property
    def recipes(self) -> Path:
        return self.dir / "recipes"

    @property
    def artifacts(self) -> Path:
        return self.dir / "artifacts"

    @property
    def store(self) -> Path:
        return self.shared_store or self.dir / "store"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
        env.update(KILN_RECIPES=str(self.recipes), KILN_ARTIFACTS=str(self.artifacts), KILN_STORE=str(self.store),
                   KILN_JOBS=os.environ.get("KILN_JOBS") or worker_threads(),
                   KILN_BUILD_JOBS=os.environ.get("KILN_BUILD_JOBS") or str(os.cpu_count() or 2))
        env.update(extra)
        env.pop("SOURCE_DATE_EPOCH", None)
        return env

    def settings(self, monkeypatch: pytest.MonkeyPatch) -> Settings:
        for k, v in self.env().items():
            if k.startswith("KILN_"):
                monkeypatch.setenv(k, v)
        return Settings.from_env()

    def write(self, rel: str, text: str) -> Path:
        path = self.recipes / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    def doit(self, *args: str, check: bool = True, timeout: float = 900, **extra_env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(self.root / "dodo.py"), "--dir", str(self.root), *args],
                              env=self.env(**extra_env), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"doit {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def popen_doit(self, *args: str, stdout: Any = subprocess.PIPE, **extra_env: str) -> subprocess.Popen:
        """Start doit in its own process group (so a test can kill the whole group), with Ctrl-C's
        SIGINT handled as in a terminal even when the test run itself ignores it (a shell runs a
        background job, `cmd &`, with SIGINT ignored, and that is inherited)."""
        return subprocess.Popen([sys.executable, "-m", "doit", "-f", str(self.root / "dodo.py"), "--dir", str(self.root), *args],
                                env=self.env(**extra_env), stdout=stdout, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def worker_threads() -> str:
    """Threads (and build jobs) per test worker: the cores shared out among xdist's workers. ggml's
    threads spin while they wait for each other, so two workers each running `-t 2` on two cores
    made llama-completion 5x slower than `-t 1` (measured 2026-12-02: 7.6 s vs 0.8 s a reply).
    Compiles (KILN_BUILD_JOBS) keep every core: compilers do not spin, and the llama.cpp e2e module's
    two cold builds are CI's longest path."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return str(max(1, (os.cpu_count() or 2) // workers))


def new_project(directory: Path) -> Project:
    p = Project(directory)
    p.recipes.mkdir(parents=True)
    for sub in ("targets", "schemes"):
        shutil.copytree(ROOT / "recipes" / sub, p.recipes / sub)
    p.artifacts.mkdir()
    return p


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return new_project(tmp_path / "proj")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama (seed 0) with a word-level tokenizer, as a HF dir."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_bpe_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a byte-level BPE tokenizer (320 tokens, trained on three sentences):
    for tools that export only BPE/SentencePiece vocabularies (MNN's llmexport)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_bpe_llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["The capital of France is Paris.", "The capital of Germany is Berlin.",
            "In the beginning God created the heaven and the earth."]
    tok.train_from_iterator(text * 4, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                            unk_token="<|endoftext|>").save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture
def tiny_project(project: Project, tiny_model_dir: Path) -> Project:
    """A project with recipe `tiny` (tiny Llama → model → bundle) and its base `_tiny`."""
    project.write("_tiny.yaml", f"""\
        model:
          name: tiny-llama
          hf_dir: {tiny_model_dir}
        target: x86_64
        scheme: fp32
        eval: {{perplexity: {{window: 32, windows: 2}}}}
        """)
    project.write("tiny.yaml", """\
        # a tiny recipe for tests
        extends: _tiny
        description: tiny random Llama
        stages:
          bundle: {compress_level: 1}
        """)
    return project


# Modules whose tests wait on one long real build (llama.cpp built twice, cold: ~15 min on 2 cores):
# collected first, so that under xdist one worker starts it at once while the others run the rest.
LONG_FIRST = ("test_llamacpp_e2e.py",)


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`-n`, `--dist loadgroup`: pyproject's addopts) the tests sharing the
    Qualcomm-path store (`tiny_htp_project`) run on one worker: its session-wide entries are then
    built once, not once per worker. The longest build's tests come first (LONG_FIRST)."""
    for item in items:
        if "tiny_htp_project" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("htp_store"))
    items.sort(key=lambda item: item.path.name not in LONG_FIRST)  # stable: otherwise collection order


def pytest_collection_finish(session: pytest.Session) -> None:
    """On an xdist worker under `--dist loadgroup`, xdist tags a grouped test by appending
    `@group` to its node id; the scheduler reads only that. pytest 9.2 ignores the rewrite
    (pytest-dev/pytest-xdist#1386) and the groups then spread silently over the workers, so a
    module fixture's build runs once per worker and its later tests see another worker's empty
    store. Fail collection instead of running a suite whose grouping is gone."""
    if not (hasattr(session.config, "workerinput") and session.config.getvalue("loadgroup")):
        return
    lost = [item.nodeid for item in session.items
            if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        message = (f"--dist loadgroup lost the xdist_group of {len(lost)} tests (e.g. {lost[0]}): this "
                   "pytest/pytest-xdist pair does not group (pyproject's test extra pins one that does)")
        sys.__stderr__.write(f"\nERROR: {message}\n")  # xdist shows a worker's UsageError only as a traceback
        raise pytest.UsageError(message)


@pytest.fixture(scope="session")
def htp_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("htp_store")


@pytest.fixture
def tiny_htp_project(tiny_project: Project, htp_store: Path) -> Project:
    """`tiny_project` with a store shared by the Qualcomm-path tests: the tiny model's export and
    quantize entries are built once per session (their keys match across tests), as a team's
    shared store would serve them."""
    tiny_project.shared_store = htp_store
    return tiny_project


def fake_hf_cache(root: Path, repo_id: str, kind: str, files: dict[str, bytes]) -> str:
    """Lay files out the way huggingface_hub caches a download: blobs named by sha256."""
    import hashlib

    repo = root / f"{kind}s--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / sha).write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / sha, link.parent))
    return commit


def tiny_htp_recipe(stages: dict[str, str] | None = None, *, scheme: str = "w8a16_kv8", algorithm: str = "rtn",
                    target: str = "sm8750", scheme_extra: str = "") -> str:
    """A recipe over `tiny` for the Qualcomm path, small enough for tests: context 64, AR-16 + AR-1,
    short calibration; `stages` adds `name: {flow mapping}` lines, `scheme_extra` scheme keys."""
    lines = {"qnn.quantize": "{calibration_samples: 2, calibration_tokens: 16, eval_windows: 2}", **(stages or {})}
    extra = f", {scheme_extra}" if scheme_extra else ""
    return (f"extends: tiny\ntarget: {target}\ncontext_length: 64\nar_lengths: [16, 1]\n"
            f"scheme: {{use: {scheme}, algorithm: {algorithm}{extra}}}\nstages:\n"
            + "".join(f"  {name}: {value}\n" for name, value in lines.items()))


def wait_for(predicate: Any, timeout: float) -> None:
    """Poll `predicate` until it holds; fail the test after `timeout` seconds."""
    end = time.time() + timeout
    while not predicate():
        assert time.time() < end, "timed out"
        time.sleep(0.1)
