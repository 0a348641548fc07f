"""Where things live: recipes, workspace, store. Env vars override pyproject.

KILN_RECIPES   recipes directory            (default: <repo>/recipes)
KILN_ARTIFACTS workspace root               (default: <repo>/artifacts)
KILN_STORE     content-addressed store      (default: [tool.kiln].store; never a recipe's choice)
KILN_MEMORY_GB memory (GiB) the stages that declare their peak may reserve together
               (default: [tool.kiln].memory_gb, else 90% of physical memory)
KILN_REMOTE    the store's remote tier, s3://bucket[/prefix] (default: [tool.kiln.store].remote;
               "" turns it off); never a recipe's choice. Its endpoint: KILN_REMOTE_ENDPOINT, else
               AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else [tool.kiln.store].endpoint, else AWS.
               Credentials: the AWS environment/profile chain only.
KILN_REMOTE_REQUIRED  1: a remote that cannot be reached fails the build; 0 (default): a warning,
               and stages build locally ([tool.kiln.store].required)
KILN_EXECUTOR  where stages that miss run: local (default) or ray ([tool.kiln].executor); with ray,
               RAY_ADDRESS names the cluster and the store must be shared storage every node
               mounts at the same path, or (KILN_RAY_STORE=remote / [tool.kiln.ray].store) each node
               keeps a store of its own (KILN_NODE_STORE on the node, default ~/.cache/kiln/store)
               and exchanges inputs and outputs through the remote tier. KILN_RAY_RESOURCES (JSON) / [tool.kiln.ray].resources:
               {stage: {resource: amount}}: what a node must offer to run that stage (pyproject ships
               qnn.quantize → calibration: the cluster's calibration nodes).
"""
from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import ROOT
from pipeline.engine.errors import KilnError
from pipeline.engine.proc import build_jobs

if TYPE_CHECKING:
    from pipeline.engine.remote import RemoteTier


@cache
def pyproject_kiln() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f).get("tool", {}).get("kiln", {})


@dataclass(frozen=True)
class Settings:
    root: Path
    recipes_dir: Path
    artifacts: Path
    default_recipe: str
    heavy_slots: int
    memory_gb: float | None = None
    remote: str | None = None           # s3://bucket[/prefix]
    remote_endpoint: str | None = None
    remote_required: bool = False
    executor: str = "local"             # local | ray
    ray_address: str | None = None
    ray_resources: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = ()  # stage -> resources
    ray_store: str = "shared"           # shared: nodes mount the store; remote: nodes go through the bucket

    @classmethod
    def from_env(cls) -> Settings:
        conf = pyproject_kiln()
        settings = cls(
            root=ROOT,
            recipes_dir=Path(os.environ.get("KILN_RECIPES", ROOT / "recipes")).resolve(),
            artifacts=Path(os.environ.get("KILN_ARTIFACTS", ROOT / "artifacts")).resolve(),
            default_recipe=os.environ.get("KILN_DEFAULT_RECIPE", conf.get("default_recipe", "")),
            heavy_slots=_heavy_slots(os.environ.get("KILN_HEAVY_SLOTS") or conf.get("heavy_slots", 1)),
            memory_gb=_memory_gb(os.environ.get("KILN_MEMORY_GB") or conf.get("memory_gb")),
            **_remote(_store_table(conf)),
            **_executor(conf),
        )
        build_jobs()  # reads KILN_JOBS (its default) and KILN_BUILD_JOBS: a bad one is refused before any stage runs
        if settings.executor == "ray" and settings.ray_store == "remote" and not settings.remote:
            raise KilnError("KILN_RAY_STORE=remote: the Ray nodes exchange inputs and outputs through the remote "
                            "tier, and none is configured (KILN_REMOTE or [tool.kiln.store].remote)")
        return settings

    def node_resources(self, stage: str) -> dict[str, float]:
        """The custom Ray resources a node must offer to run `stage` (a node id, or its stage name)."""
        chosen = dict(self.ray_resources)
        return dict(chosen.get(stage, chosen.get(stage.split("@")[0], ())))

    def remote_tier(self) -> RemoteTier | None:
        """The remote tier, when one is configured (one client per process)."""
        return _tier(self.remote, self.remote_endpoint) if self.remote else None

    def store_dir(self) -> Path:
        """KILN_STORE beats pyproject's [tool.kiln].store. A recipe cannot choose where Kiln writes
        or which entries it trusts."""
        chosen = os.environ.get("KILN_STORE") or _store_table(pyproject_kiln()).get("local")
        path = Path(chosen) if chosen else self.artifacts / ".store"
        return (path if path.is_absolute() else self.root / path).resolve()

    def shown(self, path: Path) -> str:
        """A path as the user should see it: relative to the repo when inside it."""
        try:
            return str(path.resolve().relative_to(Path.cwd()))
        except ValueError:
            return str(path)


def _heavy_slots(value: Any) -> int:
    try:
        slots = int(value)
    except (TypeError, ValueError):
        slots = 0
    if not 1 <= slots <= 256:
        raise KilnError(f"KILN_HEAVY_SLOTS / [tool.kiln].heavy_slots: {str(value)[:40]!r} is not a slot count (1 to 256)")
    return slots


def _memory_gb(value: Any) -> float | None:
    if value in (None, ""):
        return None
    try:
        gb = float(value)
    except (TypeError, ValueError):
        gb = -1.0
    if not 0.5 <= gb <= 1 << 20:
        raise KilnError(f"KILN_MEMORY_GB / [tool.kiln].memory_gb: {str(value)[:40]!r} is not a size in GB "
                        f"(0.5 to 1048576)")
    return gb


def _store_table(conf: dict[str, Any]) -> dict[str, Any]:
    """[tool.kiln].store: a path (the local store), or a table {local, remote, endpoint, required}."""
    value = conf.get("store")
    table = value if isinstance(value, dict) else {"local": value}
    unknown = set(table) - {"local", "remote", "endpoint", "required"}
    if unknown:
        raise KilnError(f"pyproject.toml [tool.kiln.store]: unknown key {sorted(unknown)[0]!r} "
                        "(keys: local, remote, endpoint, required)")
    return table


def _remote(table: dict[str, Any]) -> dict[str, Any]:
    from pipeline.engine.objstore import parse_url

    url = os.environ.get("KILN_REMOTE", table.get("remote") or "") or None
    if url is not None:
        parse_url(url)  # refuse a malformed URL before anything runs
    endpoint = (os.environ.get("KILN_REMOTE_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL") or table.get("endpoint") or None)
    required = os.environ.get("KILN_REMOTE_REQUIRED", table.get("required", False))
    flags = {"1": True, "true": True, "0": False, "false": False, "": False}
    if str(required).lower() not in flags:
        raise KilnError(f"KILN_REMOTE_REQUIRED / [tool.kiln.store].required: {str(required)[:40]!r} is not 0/1/true/false")
    return {"remote": url, "remote_endpoint": endpoint, "remote_required": flags[str(required).lower()]}


@cache
def _tier(url: str, endpoint: str | None) -> RemoteTier:
    from pipeline.engine.objstore import Bucket
    from pipeline.engine.remote import RemoteTier

    return RemoteTier(Bucket(url, endpoint))


def _executor(conf: dict[str, Any]) -> dict[str, Any]:
    executor = os.environ.get("KILN_EXECUTOR") or conf.get("executor", "local")
    if executor not in ("local", "ray"):
        raise KilnError(f"KILN_EXECUTOR / [tool.kiln].executor: {str(executor)[:40]!r} is not local or ray")
    ray = conf.get("ray", {})
    resources = ray.get("resources", {}) if isinstance(ray, dict) else None
    if os.environ.get("KILN_RAY_RESOURCES"):
        try:
            resources = json.loads(os.environ["KILN_RAY_RESOURCES"])
        except ValueError:
            resources = None
    if not isinstance(resources, dict) or not all(
            isinstance(stage, str) and isinstance(r, dict) and all(isinstance(k, str) and isinstance(v, int | float)
                                                                   and 0 <= v <= 1e6 for k, v in r.items())
            for stage, r in resources.items()):
        raise KilnError("KILN_RAY_RESOURCES / [tool.kiln.ray].resources: expected {stage: {resource: amount}} "
                        "with amounts from 0 to 1e6")
    address = os.environ.get("RAY_ADDRESS") or ray.get("address") or None
    if executor == "ray" and not address:
        raise KilnError("KILN_EXECUTOR=ray needs the cluster's address: RAY_ADDRESS (e.g. 127.0.0.1:6379, or auto "
                        "on a node of the cluster) or [tool.kiln.ray].address")
    store = os.environ.get("KILN_RAY_STORE") or ray.get("store", "shared")
    if store not in ("shared", "remote"):
        raise KilnError(f"KILN_RAY_STORE / [tool.kiln.ray].store: {str(store)[:40]!r} is not shared or remote")
    return {"executor": executor, "ray_address": address, "ray_store": store,
            "ray_resources": tuple(sorted((stage, tuple(sorted((k, float(v)) for k, v in r.items())))
                                          for stage, r in resources.items()))}
